//! A G-code pipetting robot (Smoothie/Marlin style), for the G-code liquid
//! handler profile (`simulation.model = "liquid_handler"`).
//!
//! Axes X, Y, Z (mm, the nozzle; Z is up) and the plunger B (mm, 0 = bottom,
//! up aspirates). Every command answers exactly one line: `ok`, `ok C: ...`
//! for M114, or `error:<code> <text>`.
//!
//! | command | effect |
//! |---|---|
//! | `G28` | home: X=0, Y=0, Z=`z_max`, B=0 (parameters ignored) |
//! | `G90` / `G91` | absolute (default) / relative coordinates |
//! | `G0` / `G1 [X] [Y] [Z] [B] [F]` | queue a move; `F` is the feed rate in mm/min (modal, default `default_feed`); the move takes distance / feed on the clock; `ok` is sent when it is queued |
//! | `M400` | wait until every queued move has ended, then `ok` |
//! | `M114` | `ok C: X:<x> Y:<y> Z:<z> B:<b>` (the position after the queued moves) |
//! | `M701` | pick up a tip (the nozzle is pressed into it); needs no tip on and the plunger at the bottom |
//! | `M702` | eject the tip; the ejector drives the plunger through its stroke, so B ends at 0 and the liquid is lost |
//! | `M115` | `ok FIRMWARE_NAME:biofoundry-gcode-sim` |
//! | `M18`, `M84` | motors off: a G28 is needed before the next move |
//!
//! Refused (error reply, nothing moves): 1 unknown command, 2 move before G28,
//! 3 a target outside an axis's range (0..`x_max`, 0..`y_max`, 0..`z_max`,
//! 0..`plunger_max`), 4 plunger up (aspirating) without a tip, 5 more than
//! `tip_capacity_ul` in the tip (B / `mm_per_ul`), 6 M701 with a tip on,
//! 7 M702 without a tip, 8 a malformed number, 9 M701 with the plunger up.
//! Text after `;` is a comment.

use crate::clock::Clock;
use indexmap::IndexMap;

const AXES: [char; 4] = ['X', 'Y', 'Z', 'B'];
/// mm/min when the profile gives no `default_feed`.
const DEFAULT_FEED: f64 = 6000.0;
/// Slower feeds are refused (a move must end within hours, not centuries).
const MIN_FEED: f64 = 1.0;

#[derive(Debug, Clone)]
pub struct GcodeMachine {
    max: [f64; 4],
    pos: [f64; 4],
    homed: bool,
    absolute: bool,
    feed_mm_min: f64,
    /// Lab time the last queued move ends.
    busy_until: f64,
    tip: bool,
    mm_per_ul: f64,
    tip_capacity_ul: f64,
}

/// What a command asks of the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Now(String),
    /// Answer `ok` once the lab clock reaches this time.
    At(f64, String),
}

fn error(code: u8, text: &str) -> Reply {
    Reply::Now(format!("error:{code} {text}"))
}

impl GcodeMachine {
    /// Geometry from the profile's settings: `x_max`, `y_max`, `z_max`,
    /// `plunger_max`, `mm_per_ul`, `tip_capacity_ul`, `default_feed`.
    pub fn new(settings: &IndexMap<String, f64>) -> Self {
        let get = |name: &str, default: f64| {
            settings
                .get(name)
                .copied()
                .filter(|v| v.is_finite() && *v > 0.0)
                .unwrap_or(default)
        };
        GcodeMachine {
            max: [
                get("x_max", 420.0),
                get("y_max", 350.0),
                get("z_max", 220.0),
                get("plunger_max", 20.0),
            ],
            pos: [0.0; 4],
            homed: false,
            absolute: true,
            feed_mm_min: get("default_feed", DEFAULT_FEED).max(MIN_FEED),
            busy_until: 0.0,
            tip: false,
            mm_per_ul: get("mm_per_ul", 0.05),
            tip_capacity_ul: get("tip_capacity_ul", 300.0),
        }
    }

    pub fn position(&self) -> [f64; 4] {
        self.pos
    }

    pub fn has_tip(&self) -> bool {
        self.tip
    }

    /// Puts back a tip holding `held_ul` (or none): the state a real machine
    /// keeps while the controller that drove it is restarted.
    pub fn restore_tip(&mut self, held_ul: Option<f64>) {
        self.tip = held_ul.is_some();
        let travel = held_ul.unwrap_or(0.0) * self.mm_per_ul;
        self.pos[3] = if travel.is_finite() {
            travel.clamp(0.0, self.max[3])
        } else {
            0.0
        };
    }

    /// µL in the tip (plunger travel over mm per µL).
    pub fn held_ul(&self) -> f64 {
        if self.tip {
            self.pos[3] / self.mm_per_ul
        } else {
            0.0
        }
    }

    /// Runs one command line at lab time `now`.
    pub fn execute(&mut self, line: &str, now: f64) -> Reply {
        let code = line
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_uppercase();
        let mut words = code.split_whitespace();
        let Some(command) = words.next() else {
            return Reply::Now("ok".into());
        };
        let mut params: Vec<(char, f64)> = Vec::new();
        for w in words {
            let mut chars = w.chars();
            let Some(letter) = chars.next() else { continue };
            let number = chars.as_str();
            match number.parse::<f64>() {
                Ok(v) if v.is_finite() => params.push((letter, v)),
                _ if number.is_empty() => params.push((letter, f64::NAN)),
                _ => return error(8, &format!("bad number in `{w}`")),
            }
        }
        match command {
            "G28" => {
                let target = [0.0, 0.0, self.max[2], 0.0];
                let seconds = self.travel_s(&target, self.feed_mm_min);
                self.busy_until = self.busy_until.max(now) + seconds;
                self.pos = target;
                self.homed = true;
                Reply::Now("ok".into())
            }
            "G90" => {
                self.absolute = true;
                Reply::Now("ok".into())
            }
            "G91" => {
                self.absolute = false;
                Reply::Now("ok".into())
            }
            "G0" | "G1" => self.travel(&params, now),
            "M400" => Reply::At(self.busy_until, "ok".into()),
            "M114" => Reply::Now(format!(
                "ok C: X:{:.3} Y:{:.3} Z:{:.3} B:{:.3}",
                self.pos[0], self.pos[1], self.pos[2], self.pos[3]
            )),
            "M701" => {
                if self.tip {
                    error(6, "a tip is already attached")
                } else if self.pos[3] > 1e-6 {
                    error(9, "the plunger is not at the bottom")
                } else {
                    self.tip = true;
                    Reply::Now("ok".into())
                }
            }
            "M702" => {
                if !self.tip {
                    return error(7, "no tip to eject");
                }
                self.tip = false;
                self.pos[3] = 0.0;
                Reply::Now("ok".into())
            }
            "M115" => Reply::Now("ok FIRMWARE_NAME:biofoundry-gcode-sim".into()),
            "M18" | "M84" => {
                self.homed = false;
                Reply::Now("ok".into())
            }
            other => error(1, &format!("unknown command {other}")),
        }
    }

    fn travel_s(&self, target: &[f64; 4], feed_mm_min: f64) -> f64 {
        let d2: f64 = (0..4).map(|i| (target[i] - self.pos[i]).powi(2)).sum();
        d2.sqrt() / (feed_mm_min / 60.0)
    }

    fn travel(&mut self, params: &[(char, f64)], now: f64) -> Reply {
        if !self.homed {
            return error(2, "not homed (send G28)");
        }
        let mut target = self.pos;
        let mut feed = self.feed_mm_min;
        for &(letter, v) in params {
            if v.is_nan() {
                return error(8, &format!("{letter} needs a number"));
            }
            if letter == 'F' {
                if v < MIN_FEED {
                    return error(8, "the feed rate must be at least 1 mm/min");
                }
                feed = v;
                continue;
            }
            let Some(i) = AXES.iter().position(|a| *a == letter) else {
                return error(8, &format!("no axis {letter}"));
            };
            target[i] = if self.absolute { v } else { self.pos[i] + v };
        }
        for i in 0..4 {
            if !(-1e-9..=self.max[i] + 1e-9).contains(&target[i]) {
                return error(
                    3,
                    &format!("{} {:.3} is outside 0..{}", AXES[i], target[i], self.max[i]),
                );
            }
        }
        if target[3] > self.pos[3] + 1e-9 {
            if !self.tip {
                return error(4, "aspirating without a tip");
            }
            let held = target[3] / self.mm_per_ul;
            if held > self.tip_capacity_ul + 1e-6 {
                return error(
                    5,
                    &format!(
                        "{held:.1} uL is more than the tip holds ({} uL)",
                        self.tip_capacity_ul
                    ),
                );
            }
        }
        let seconds = self.travel_s(&target, feed);
        self.feed_mm_min = feed;
        self.busy_until = self.busy_until.max(now) + seconds;
        self.pos = target;
        Reply::Now("ok".into())
    }
}

/// Runs a command and waits (on the clock) for what it waits for.
pub async fn run(machine: &tokio::sync::Mutex<GcodeMachine>, line: &str, clock: Clock) -> String {
    let reply = machine.lock().await.execute(line, clock.now_s());
    match reply {
        Reply::Now(s) => s,
        Reply::At(t, s) => {
            clock.sleep_until(t).await;
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> GcodeMachine {
        let settings: IndexMap<String, f64> = [
            ("x_max", 400.0),
            ("y_max", 300.0),
            ("z_max", 200.0),
            ("plunger_max", 20.0),
            ("mm_per_ul", 0.05),
            ("tip_capacity_ul", 200.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        GcodeMachine::new(&settings)
    }

    fn ok(m: &mut GcodeMachine, line: &str) {
        assert_eq!(m.execute(line, 0.0), Reply::Now("ok".into()), "{line}");
    }

    fn code(m: &mut GcodeMachine, line: &str) -> String {
        match m.execute(line, 0.0) {
            Reply::Now(s) => s.split(' ').next().unwrap_or("").to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pipetting_cycle() {
        let mut m = machine();
        assert_eq!(code(&mut m, "G0 X10"), "error:2");
        ok(&mut m, "G28");
        ok(&mut m, "G0 X100 Y50 F6000");
        ok(&mut m, "G1 Z20");
        assert_eq!(code(&mut m, "G1 B2"), "error:4");
        ok(&mut m, "M701");
        assert_eq!(code(&mut m, "M701"), "error:6");
        ok(&mut m, "G1 B5 F600 ; 100 uL");
        assert!((m.held_ul() - 100.0).abs() < 1e-9);
        assert_eq!(code(&mut m, "G1 B10.5"), "error:5");
        assert_eq!(code(&mut m, "G0 X500"), "error:3");
        assert_eq!(code(&mut m, "G0 Z-1"), "error:3");
        ok(&mut m, "G1 B0");
        assert_eq!(
            m.execute("M114", 0.0),
            Reply::Now("ok C: X:100.000 Y:50.000 Z:20.000 B:0.000".into())
        );
        ok(&mut m, "M702");
        assert_eq!(code(&mut m, "M702"), "error:7");
        assert_eq!(code(&mut m, "G1 Xabc"), "error:8");
        assert_eq!(code(&mut m, "T0"), "error:1");
        ok(&mut m, "G91");
        ok(&mut m, "G0 X-10");
        assert_eq!(m.position()[0], 90.0);
    }

    proptest::proptest! {
        #[test]
        fn any_line_gets_one_reply(line in "\\PC{0,60}", now in 0.0f64..1e6) {
            let mut m = machine();
            let _ = m.execute("G28", 0.0);
            match m.execute(&line, now) {
                Reply::Now(s) | Reply::At(_, s) => {
                    proptest::prop_assert!(s.starts_with("ok") || s.starts_with("error:"))
                }
            }
        }
    }

    #[test]
    fn moves_take_distance_over_feed() {
        let mut m = machine();
        ok(&mut m, "G28");
        let Reply::At(t0, _) = m.execute("M400", 0.0) else {
            panic!()
        };
        ok(&mut m, "G0 X100 F6000");
        let Reply::At(t, _) = m.execute("M400", 0.0) else {
            panic!()
        };
        assert!((t - t0 - 1.0).abs() < 1e-9, "{t}");
    }
}
