//! The kind catalogue: for every device kind, its standard signals, setpoints
//! (with units), actions and their typed arguments, and the limits of the
//! built-in simulated lab. `check` uses it when no lab file is given; the
//! protocol parser and the JSON Schema are both generated from these tables,
//! so they cannot disagree.

use crate::units::{Dimension, Limits};
use serde::Serialize;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    LiquidHandler,
    Incubator,
    Bioreactor,
    Pump,
    Sensor,
    TemperatureModule,
    HeaterShaker,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 7] = [
        DeviceKind::LiquidHandler,
        DeviceKind::Incubator,
        DeviceKind::Bioreactor,
        DeviceKind::Pump,
        DeviceKind::Sensor,
        DeviceKind::TemperatureModule,
        DeviceKind::HeaterShaker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::LiquidHandler => "liquid_handler",
            DeviceKind::Incubator => "incubator",
            DeviceKind::Bioreactor => "bioreactor",
            DeviceKind::Pump => "pump",
            DeviceKind::Sensor => "sensor",
            DeviceKind::TemperatureModule => "temperature_module",
            DeviceKind::HeaterShaker => "heater_shaker",
        }
    }

    /// "a liquid_handler", "an incubator".
    pub fn with_article(self) -> String {
        let article = if self.name().starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {}", self.name())
    }

    pub fn from_name(name: &str) -> Option<DeviceKind> {
        DeviceKind::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn spec(self) -> &'static KindSpec {
        match self {
            DeviceKind::LiquidHandler => &LIQUID_HANDLER,
            DeviceKind::Incubator => &INCUBATOR,
            DeviceKind::Bioreactor => &BIOREACTOR,
            DeviceKind::Pump => &PUMP,
            DeviceKind::Sensor => &SENSOR,
            DeviceKind::TemperatureModule => &TEMPERATURE_MODULE,
            DeviceKind::HeaterShaker => &HEATER_SHAKER,
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Serialize)]
pub struct SignalSpec {
    pub name: &'static str,
    pub dimension: Dimension,
    pub description: &'static str,
}

#[derive(Debug, Serialize)]
pub struct SetpointSpec {
    pub name: &'static str,
    pub dimension: Dimension,
    /// Limits of the built-in simulated lab, in the dimension's canonical unit.
    pub min: f64,
    pub max: f64,
}

impl SetpointSpec {
    pub fn limits(&self) -> Limits {
        Limits {
            min: self.min,
            max: self.max,
            dimension: self.dimension,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ArgType {
    Quantity {
        dimension: Dimension,
    },
    /// Wells of one labware: `plate:A1`, `plate:A1:H12`, `plate:A1,B3`, `plate:quadrant(2)`.
    Wells,
    /// The name of a labware declared in `[labware]`.
    Labware,
    /// `<role>:<slot>`.
    Location,
    Integer {
        min: i64,
        max: i64,
    },
    Bool,
    Text,
    Condition,
    /// A list of signal names of the step's device.
    Signals,
    Choice {
        options: &'static [&'static str],
    },
    /// `{ cycles = 3, volume = "50 uL" }`.
    Mix,
    /// A pump of the step's device.
    Pump,
}

#[derive(Debug, Serialize)]
pub struct ArgSpec {
    pub name: &'static str,
    pub ty: ArgType,
    pub required: bool,
    /// The setpoint whose limits this argument must respect.
    pub limit: Option<&'static str>,
    pub description: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ActionSpec {
    pub name: &'static str,
    pub args: &'static [ArgSpec],
    /// At least one argument must be given (e.g. `set`).
    pub needs_any_arg: bool,
    pub description: &'static str,
}

#[derive(Debug, Serialize)]
pub struct KindSpec {
    pub kind: DeviceKind,
    pub signals: &'static [SignalSpec],
    pub setpoints: &'static [SetpointSpec],
    pub actions: &'static [ActionSpec],
    /// Labware positions (deck slots, incubator plate slots); 0 if none.
    pub slots: u32,
    pub pumps: &'static [&'static str],
}

impl KindSpec {
    pub fn action(&self, name: &str) -> Option<&'static ActionSpec> {
        self.actions.iter().find(|a| a.name == name)
    }
    pub fn signal(&self, name: &str) -> Option<&'static SignalSpec> {
        self.signals.iter().find(|s| s.name == name)
    }
    pub fn setpoint(&self, name: &str) -> Option<&'static SetpointSpec> {
        self.setpoints.iter().find(|s| s.name == name)
    }
}

/// Actions written without a role (`do = "wait"`).
pub static BUILTIN_ACTIONS: &[ActionSpec] = &[
    ActionSpec {
        name: "wait",
        args: &[arg_req(
            "duration",
            q(Dimension::Time),
            "How long to wait, e.g. \"30 min\".",
        )],
        needs_any_arg: false,
        description: "Wait for a fixed time.",
    },
    ActionSpec {
        name: "wait_until",
        args: &[
            arg_req(
                "condition",
                ArgType::Condition,
                "e.g. \"br.od600 >= 0.6 and br.ph < 7.2\".",
            ),
            arg_opt(
                "poll",
                q(Dimension::Time),
                "How often the condition is read (default 10 s).",
            ),
        ],
        needs_any_arg: false,
        description: "Wait until a condition on device signals holds; `timeout` is required.",
    },
    ActionSpec {
        name: "prompt",
        args: &[arg_req(
            "message",
            ArgType::Text,
            "What the operator must do or confirm.",
        )],
        needs_any_arg: false,
        description: "Ask the operator and wait for the answer.",
    },
    ActionSpec {
        name: "log",
        args: &[arg_req("message", ArgType::Text, "Text for the run log.")],
        needs_any_arg: false,
        description: "Write a line to the run log.",
    },
];

/// Keys every step may have, whatever its action.
pub static COMMON_STEP_KEYS: &[ArgSpec] = &[
    arg_opt("id", ArgType::Text, "Unique step id (default step-<n>)."),
    arg_req(
        "do",
        ArgType::Text,
        "The action: `<role>.<action>` or a built-in (wait, wait_until, prompt, log).",
    ),
    arg_opt(
        "after",
        ArgType::Text,
        "Ids of steps this one waits for, instead of the previous step.",
    ),
    arg_opt(
        "timeout",
        q(Dimension::Time),
        "Longest the step may take; exceeding it is an error.",
    ),
    arg_opt(
        "on_error",
        ArgType::Choice {
            options: ERROR_POLICIES,
        },
        "What happens when the step fails.",
    ),
    arg_opt(
        "retries",
        ArgType::Integer { min: 0, max: 100 },
        "Attempts before holding, with on_error = \"retry\".",
    ),
    arg_opt("note", ArgType::Text, "Free text for the operator."),
    arg_opt(
        "repeat",
        ArgType::Text,
        "{ times = <n>, every = \"<duration>\" }",
    ),
];

pub const ERROR_POLICIES: &[&str] = &["hold", "retry", "skip", "abort"];
pub const VIOLATION_POLICIES: &[&str] = &["hold", "alarm", "abort"];
pub const TIP_POLICIES: &[&str] = &["once", "always", "never"];

const fn q(dimension: Dimension) -> ArgType {
    ArgType::Quantity { dimension }
}

const fn arg_req(name: &'static str, ty: ArgType, description: &'static str) -> ArgSpec {
    ArgSpec {
        name,
        ty,
        required: true,
        limit: None,
        description,
    }
}

const fn arg_opt(name: &'static str, ty: ArgType, description: &'static str) -> ArgSpec {
    ArgSpec {
        name,
        ty,
        required: false,
        limit: None,
        description,
    }
}

const fn limited(
    name: &'static str,
    dimension: Dimension,
    setpoint: &'static str,
    required: bool,
    description: &'static str,
) -> ArgSpec {
    ArgSpec {
        name,
        ty: ArgType::Quantity { dimension },
        required,
        limit: Some(setpoint),
        description,
    }
}

const fn action(
    name: &'static str,
    args: &'static [ArgSpec],
    description: &'static str,
) -> ActionSpec {
    ActionSpec {
        name,
        args,
        needs_any_arg: false,
        description,
    }
}

const fn set_action(args: &'static [ArgSpec]) -> ActionSpec {
    ActionSpec {
        name: "set",
        args,
        needs_any_arg: true,
        description: "Change one or more setpoints; does not wait for them to be reached.",
    }
}

static SAMPLE_ARGS: [ArgSpec; 1] = [arg_req(
    "read",
    ArgType::Signals,
    "Signals to read and record, e.g. [\"ph\", \"od600\"].",
)];

const fn sample_action() -> ActionSpec {
    action("sample", &SAMPLE_ARGS, "Read signals once and record them.")
}

const fn signal(name: &'static str, dimension: Dimension, description: &'static str) -> SignalSpec {
    SignalSpec {
        name,
        dimension,
        description,
    }
}

const fn setpoint(name: &'static str, dimension: Dimension, min: f64, max: f64) -> SetpointSpec {
    SetpointSpec {
        name,
        dimension,
        min,
        max,
    }
}

const MIX: ArgType = ArgType::Mix;

static LIQUID_HANDLER: KindSpec = KindSpec {
    kind: DeviceKind::LiquidHandler,
    signals: &[],
    setpoints: &[],
    slots: 12,
    pumps: &[],
    actions: &[
        action(
            "transfer",
            &[
                arg_req("from", ArgType::Wells, "Source wells."),
                arg_req("to", ArgType::Wells, "Destination wells."),
                arg_req(
                    "volume",
                    q(Dimension::Volume),
                    "Volume per destination well.",
                ),
                arg_opt(
                    "tips",
                    ArgType::Choice {
                        options: TIP_POLICIES,
                    },
                    "once (default): one tip for the step; always: a new tip per well; never: use the tip already on.",
                ),
                arg_opt(
                    "tip_rack",
                    ArgType::Labware,
                    "Take tips from this rack instead of the smallest tip that holds the volume.",
                ),
                arg_opt("mix_before", MIX, "Mix the source before aspirating."),
                arg_opt("mix_after", MIX, "Mix the destination after dispensing."),
            ],
            "Move liquid: N->N pairs, 1->N distributes, N->1 pools.",
        ),
        action(
            "aspirate",
            &[
                arg_req(
                    "from",
                    ArgType::Wells,
                    "Wells to aspirate from (each gives `volume`).",
                ),
                arg_req("volume", q(Dimension::Volume), "Volume per well."),
            ],
            "Aspirate into the tip that is on.",
        ),
        action(
            "dispense",
            &[
                arg_req(
                    "to",
                    ArgType::Wells,
                    "Wells to dispense into (each receives `volume`).",
                ),
                arg_req("volume", q(Dimension::Volume), "Volume per well."),
            ],
            "Dispense from the tip that is on.",
        ),
        action(
            "mix",
            &[
                arg_req("at", ArgType::Wells, "Wells to mix."),
                arg_req("volume", q(Dimension::Volume), "Volume moved per cycle."),
                arg_req(
                    "cycles",
                    ArgType::Integer { min: 1, max: 1000 },
                    "Aspirate/dispense cycles.",
                ),
            ],
            "Mix wells with the tip that is on.",
        ),
        action(
            "pick_up_tip",
            &[arg_opt(
                "tip_rack",
                ArgType::Labware,
                "Rack to take the tip from (default: the first rack placed).",
            )],
            "Pick up a tip.",
        ),
        action("drop_tip", &[], "Drop the tip into the trash."),
    ],
};

static INCUBATOR: KindSpec = KindSpec {
    kind: DeviceKind::Incubator,
    signals: &[
        signal(
            "temperature",
            Dimension::Temperature,
            "Chamber temperature.",
        ),
        signal("co2", Dimension::Percent, "CO2 concentration."),
        signal("humidity", Dimension::Percent, "Relative humidity."),
        signal(
            "shaking",
            Dimension::Speed,
            "Shaker speed (0 when stopped).",
        ),
    ],
    setpoints: &[
        setpoint("temperature", Dimension::Temperature, 4.0, 50.0),
        setpoint("co2", Dimension::Percent, 0.0, 20.0),
        setpoint("humidity", Dimension::Percent, 0.0, 95.0),
        setpoint("shaking", Dimension::Speed, 100.0, 1000.0),
    ],
    slots: 44,
    pumps: &[],
    actions: &[
        action(
            "set_temperature",
            &[
                limited(
                    "temperature",
                    Dimension::Temperature,
                    "temperature",
                    true,
                    "Target temperature.",
                ),
                arg_opt(
                    "wait",
                    ArgType::Bool,
                    "true (default): the step ends when the target is reached; false: start ramping and go on.",
                ),
            ],
            "Set the chamber temperature.",
        ),
        action(
            "set_co2",
            &[limited(
                "percent",
                Dimension::Percent,
                "co2",
                true,
                "CO2 setpoint.",
            )],
            "Set the CO2 concentration.",
        ),
        action(
            "set_humidity",
            &[limited(
                "percent",
                Dimension::Percent,
                "humidity",
                true,
                "Humidity setpoint.",
            )],
            "Set the relative humidity.",
        ),
        action(
            "shake",
            &[
                limited("speed", Dimension::Speed, "shaking", true, "Shaker speed."),
                arg_opt(
                    "duration",
                    q(Dimension::Time),
                    "Stop after this long; without it, shake until stop_shaking.",
                ),
            ],
            "Start the shaker.",
        ),
        action("stop_shaking", &[], "Stop the shaker."),
        action(
            "load",
            &[
                arg_req("labware", ArgType::Labware, "Labware to take in."),
                arg_opt(
                    "slot",
                    ArgType::Integer {
                        min: 1,
                        max: 10_000,
                    },
                    "Storage slot (default: the first free one).",
                ),
            ],
            "Take labware from the transfer station into storage.",
        ),
        action(
            "unload",
            &[
                arg_req("labware", ArgType::Labware, "Labware to bring out."),
                arg_req("to", ArgType::Location, "Where it goes, `<role>:<slot>`."),
            ],
            "Bring labware out of storage to a deck slot.",
        ),
        action("open_door", &[], "Open the door."),
        action("close_door", &[], "Close the door."),
        set_action(&[
            limited(
                "temperature",
                Dimension::Temperature,
                "temperature",
                false,
                "Chamber temperature.",
            ),
            limited(
                "co2",
                Dimension::Percent,
                "co2",
                false,
                "CO2 concentration.",
            ),
            limited(
                "humidity",
                Dimension::Percent,
                "humidity",
                false,
                "Relative humidity.",
            ),
        ]),
        sample_action(),
    ],
};

static BIOREACTOR: KindSpec = KindSpec {
    kind: DeviceKind::Bioreactor,
    signals: &[
        signal("ph", Dimension::Unitless, "Culture pH."),
        signal(
            "dissolved_oxygen",
            Dimension::Percent,
            "Dissolved oxygen, % of air saturation.",
        ),
        signal(
            "temperature",
            Dimension::Temperature,
            "Culture temperature.",
        ),
        signal("od600", Dimension::Unitless, "Optical density at 600 nm."),
        signal("stirrer", Dimension::Speed, "Stirrer speed."),
        signal("airflow", Dimension::Flow, "Gas flow into the vessel."),
        signal("volume", Dimension::Volume, "Culture volume."),
    ],
    setpoints: &[
        setpoint("temperature", Dimension::Temperature, 20.0, 45.0),
        setpoint("ph", Dimension::Unitless, 5.5, 8.5),
        setpoint("dissolved_oxygen", Dimension::Percent, 0.0, 100.0),
        setpoint("stirrer", Dimension::Speed, 0.0, 1200.0),
        setpoint("airflow", Dimension::Flow, 0.0, 5000.0),
        setpoint("pump_rate", Dimension::Flow, 0.0, 50.0),
    ],
    slots: 0,
    pumps: &["feed", "base", "acid", "antifoam"],
    actions: &[
        set_action(&[
            limited(
                "temperature",
                Dimension::Temperature,
                "temperature",
                false,
                "Culture temperature.",
            ),
            limited(
                "ph",
                Dimension::Unitless,
                "ph",
                false,
                "pH setpoint (base and acid pumps hold it).",
            ),
            limited(
                "dissolved_oxygen",
                Dimension::Percent,
                "dissolved_oxygen",
                false,
                "DO setpoint.",
            ),
            limited(
                "stirrer",
                Dimension::Speed,
                "stirrer",
                false,
                "Stirrer speed.",
            ),
            limited("airflow", Dimension::Flow, "airflow", false, "Gas flow."),
        ]),
        action(
            "feed",
            &[
                arg_req("pump", ArgType::Pump, "feed, base, acid or antifoam."),
                arg_opt("volume", q(Dimension::Volume), "Volume to add (alone)."),
                limited(
                    "rate",
                    Dimension::Flow,
                    "pump_rate",
                    false,
                    "Pump rate (with duration).",
                ),
                arg_opt(
                    "duration",
                    q(Dimension::Time),
                    "How long to pump at `rate`.",
                ),
            ],
            "Add liquid: `volume`, or `rate` + `duration`.",
        ),
        sample_action(),
    ],
};

static PUMP: KindSpec = KindSpec {
    kind: DeviceKind::Pump,
    signals: &[
        signal("rate", Dimension::Flow, "Current pump rate."),
        signal(
            "dispensed",
            Dimension::Volume,
            "Volume pumped since the run started.",
        ),
    ],
    setpoints: &[setpoint("rate", Dimension::Flow, 0.0, 100.0)],
    slots: 0,
    pumps: &[],
    actions: &[
        set_action(&[limited(
            "rate",
            Dimension::Flow,
            "rate",
            false,
            "Pump rate.",
        )]),
        action(
            "dispense",
            &[
                arg_req("volume", q(Dimension::Volume), "Volume to pump."),
                limited(
                    "rate",
                    Dimension::Flow,
                    "rate",
                    false,
                    "Pump rate (default: the maximum).",
                ),
            ],
            "Pump a volume and stop.",
        ),
        action(
            "run",
            &[
                limited("rate", Dimension::Flow, "rate", true, "Pump rate."),
                arg_opt("duration", q(Dimension::Time), "Stop after this long."),
            ],
            "Run continuously.",
        ),
        action("stop", &[], "Stop pumping."),
        sample_action(),
    ],
};

static SENSOR: KindSpec = KindSpec {
    kind: DeviceKind::Sensor,
    signals: &[
        signal("temperature", Dimension::Temperature, "Temperature."),
        signal("ph", Dimension::Unitless, "pH."),
        signal("dissolved_oxygen", Dimension::Percent, "Dissolved oxygen."),
        signal("od600", Dimension::Unitless, "Optical density at 600 nm."),
    ],
    setpoints: &[],
    slots: 0,
    pumps: &[],
    actions: &[sample_action()],
};

static TEMPERATURE_MODULE: KindSpec = KindSpec {
    kind: DeviceKind::TemperatureModule,
    signals: &[signal(
        "temperature",
        Dimension::Temperature,
        "Block temperature.",
    )],
    setpoints: &[setpoint("temperature", Dimension::Temperature, 4.0, 95.0)],
    slots: 1,
    pumps: &[],
    actions: &[
        set_action(&[limited(
            "temperature",
            Dimension::Temperature,
            "temperature",
            false,
            "Block temperature.",
        )]),
        action(
            "set_temperature",
            &[
                limited(
                    "temperature",
                    Dimension::Temperature,
                    "temperature",
                    true,
                    "Target temperature.",
                ),
                arg_opt(
                    "wait",
                    ArgType::Bool,
                    "Wait until the target is reached (default true).",
                ),
            ],
            "Set the block temperature.",
        ),
        action("deactivate", &[], "Turn the heater/cooler off."),
        sample_action(),
    ],
};

static HEATER_SHAKER: KindSpec = KindSpec {
    kind: DeviceKind::HeaterShaker,
    signals: &[
        signal("temperature", Dimension::Temperature, "Plate temperature."),
        signal("speed", Dimension::Speed, "Shaker speed."),
    ],
    setpoints: &[
        setpoint("temperature", Dimension::Temperature, 37.0, 95.0),
        setpoint("speed", Dimension::Speed, 200.0, 3000.0),
    ],
    slots: 1,
    pumps: &[],
    actions: &[
        set_action(&[
            limited(
                "temperature",
                Dimension::Temperature,
                "temperature",
                false,
                "Plate temperature.",
            ),
            limited("speed", Dimension::Speed, "speed", false, "Shaker speed."),
        ]),
        action(
            "set_temperature",
            &[
                limited(
                    "temperature",
                    Dimension::Temperature,
                    "temperature",
                    true,
                    "Target temperature.",
                ),
                arg_opt(
                    "wait",
                    ArgType::Bool,
                    "Wait until the target is reached (default true).",
                ),
            ],
            "Set the plate temperature.",
        ),
        action(
            "shake",
            &[
                limited("speed", Dimension::Speed, "speed", true, "Shaker speed."),
                arg_opt("duration", q(Dimension::Time), "Stop after this long."),
            ],
            "Start shaking.",
        ),
        action("stop_shaking", &[], "Stop shaking."),
        action("open_latch", &[], "Open the labware latch."),
        action("close_latch", &[], "Close the labware latch."),
        action("deactivate", &[], "Heater off and shaker stopped."),
        sample_action(),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_of_the_simulated_lab() {
        let inc = DeviceKind::Incubator.spec();
        assert_eq!(
            inc.setpoint("temperature").unwrap().limits().to_string(),
            "4..50 C"
        );
        assert_eq!(inc.slots, 44);
        let br = DeviceKind::Bioreactor.spec();
        assert_eq!(br.setpoint("airflow").unwrap().max, 5000.0); // 5 L/min
        assert_eq!(br.pumps, ["feed", "base", "acid", "antifoam"]);
        assert_eq!(DeviceKind::LiquidHandler.spec().slots, 12);
        let hs = DeviceKind::HeaterShaker.spec();
        assert_eq!(
            hs.setpoint("speed").unwrap().limits().to_string(),
            "200..3000 rpm"
        );
    }

    #[test]
    fn every_limited_argument_names_a_setpoint_of_its_kind() {
        for kind in DeviceKind::ALL {
            let spec = kind.spec();
            for a in spec.actions {
                for arg in a.args {
                    if let Some(sp) = arg.limit {
                        let s = spec
                            .setpoint(sp)
                            .unwrap_or_else(|| panic!("{kind}.{} {sp}", a.name));
                        assert_eq!(
                            ArgType::Quantity {
                                dimension: s.dimension
                            },
                            arg.ty
                        );
                    }
                }
            }
            assert_eq!(DeviceKind::from_name(kind.name()), Some(kind));
        }
    }
}
