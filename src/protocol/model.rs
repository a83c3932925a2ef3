//! The parsed protocol: typed, with the span of every value a diagnostic may point at.

use crate::catalogue::DeviceKind;
use crate::labware::LabwareDefinition;
use crate::protocol::condition::Op;
use crate::source::{SourceFile, Sp, Span};
use crate::units::{Limits, Quantity};
use indexmap::IndexMap;
use serde::Serialize;
use std::sync::Arc;

pub const FORMAT: &str = "biofoundry.protocol/1";

#[derive(Debug, Clone)]
pub struct Protocol {
    pub file: Arc<SourceFile>,
    pub name: String,
    pub version: Option<String>,
    pub description: Option<String>,
    pub authors: Vec<String>,
    pub on_error: ErrorPolicy,
    pub params: IndexMap<String, Param>,
    pub devices: IndexMap<String, DeviceRole>,
    pub labware: IndexMap<String, Labware>,
    pub steps: Vec<Step>,
    pub monitors: Vec<Monitor>,
    /// Every place a role is referred to (steps, labware places, conditions, monitors).
    pub role_uses: Vec<Sp<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Text(s) => write!(f, "\"{s}\""),
            ParamValue::Integer(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub default: ParamValue,
    /// The value in force: the default, or the override from `--param` / MES.
    pub value: ParamValue,
    pub overridden: bool,
    pub span: Span,
    pub used: bool,
}

impl Param {
    /// Where a value came from, for messages: `--param volume=10 uL` or
    /// ``parameter `volume` = "100 uL"``.
    ///
    /// A long value is cut at [`ORIGIN_VALUE_CHARS`] characters: a message may
    /// name the parameter once per use, and a value can be megabytes long.
    pub fn origin(&self) -> String {
        // Never the whole value first: a message may be built once per use.
        match (&self.value, self.overridden) {
            (ParamValue::Text(s), true) => format!("--param {}={}", self.name, shortened(s)),
            (other, true) => format!("--param {}={other}", self.name),
            (ParamValue::Text(s), false) => {
                let cut = s.chars().nth(ORIGIN_VALUE_CHARS).is_some();
                let end = if cut { "" } else { "\"" };
                format!("parameter `{}` = \"{}{end}", self.name, shortened(s))
            }
            (other, false) => format!("parameter `{}` = {other}", self.name),
        }
    }
}

/// Most characters of a parameter's value a message quotes.
pub const ORIGIN_VALUE_CHARS: usize = 40;

fn shortened(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(ORIGIN_VALUE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]).into(),
        None => text.into(),
    }
}

#[derive(Debug, Clone)]
pub struct DeviceRole {
    pub name: String,
    pub kind: DeviceKind,
    pub span: Span,
    /// A module that sits in a liquid handler's deck slot (`{ kind = ..., at = "lh:4" }`),
    /// so the labware on it can be pipetted.
    pub on_deck: Option<Sp<Location>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Location {
    pub role: String,
    pub slot: u32,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.role, self.slot)
    }
}

#[derive(Debug, Clone)]
pub struct Labware {
    pub name: String,
    pub definition: Arc<LabwareDefinition>,
    pub at: Option<Sp<Location>>,
    pub contents: Vec<Content>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Content {
    pub wells: Vec<String>,
    pub volume_ul: f64,
    pub liquid: String,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorPolicy {
    Hold,
    Retry,
    Skip,
    Abort,
}

impl ErrorPolicy {
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "hold" => ErrorPolicy::Hold,
            "retry" => ErrorPolicy::Retry,
            "skip" => ErrorPolicy::Skip,
            "abort" => ErrorPolicy::Abort,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ViolationPolicy {
    Hold,
    Alarm,
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TipPolicy {
    Once,
    Always,
    Never,
}

#[derive(Debug, Clone)]
pub struct Step {
    /// 0-based position in the file.
    pub index: usize,
    pub id: Sp<String>,
    /// `do` as written, e.g. `lh.transfer`.
    pub action_name: Sp<String>,
    /// The device role, for device actions.
    pub role: Option<Sp<String>>,
    pub action: Action,
    /// `None`: after the previous step. `Some`: after exactly these steps.
    pub after: Option<Vec<Sp<String>>>,
    pub timeout: Option<Sp<Quantity>>,
    pub on_error: ErrorPolicy,
    pub retries: u32,
    pub note: Option<String>,
    pub repeat: Option<Repeat>,
    /// The whole `[[step]]` table.
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Repeat {
    pub times: u32,
    /// Seconds from the start of one repetition to the start of the next.
    pub every_s: Option<f64>,
}

/// Wells of one labware, expanded in walking order.
#[derive(Debug, Clone, PartialEq)]
pub struct WellSet {
    pub labware: String,
    pub wells: Vec<String>,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MixSpec {
    pub cycles: u32,
    pub volume_ul: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    pub from: WellSet,
    pub to: WellSet,
    pub volume: Sp<Quantity>,
    /// Where `tips` was written, or the step's `do` when it was left out.
    pub tips: Sp<TipPolicy>,
    pub tip_rack: Option<Sp<String>>,
    pub mix_before: Option<Sp<MixSpec>>,
    pub mix_after: Option<Sp<MixSpec>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SetpointValue {
    /// The setpoint's name in the kind catalogue (`temperature`, `co2`, `shaking` ...).
    pub setpoint: &'static str,
    pub value: Sp<Quantity>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Transfer(Box<Transfer>),
    Aspirate {
        from: WellSet,
        volume: Sp<Quantity>,
    },
    Dispense {
        to: WellSet,
        volume: Sp<Quantity>,
    },
    Mix {
        at: WellSet,
        volume: Sp<Quantity>,
        cycles: u32,
    },
    PickUpTip {
        tip_rack: Option<Sp<String>>,
    },
    DropTip,
    Load {
        labware: Sp<String>,
        slot: Option<Sp<u32>>,
    },
    Unload {
        labware: Sp<String>,
        to: Sp<Location>,
    },
    /// Setpoint changes: `set`, `set_temperature`, `set_co2`, `shake`, a pump's `run` ...
    /// `wait` makes the step last until the values are reached; `duration`
    /// returns the setpoints to off after that long (`shake { duration }`).
    Set {
        setpoints: Vec<SetpointValue>,
        wait: bool,
        duration: Option<Sp<Quantity>>,
    },
    Feed {
        pump: Sp<String>,
        volume: Option<Sp<Quantity>>,
        rate: Option<Sp<Quantity>>,
        duration: Option<Sp<Quantity>>,
    },
    PumpDispense {
        volume: Sp<Quantity>,
        rate: Option<Sp<Quantity>>,
    },
    Sample {
        read: Vec<Sp<String>>,
    },
    /// An action without arguments: open_door, stop_shaking, deactivate, stop ...
    Command {
        name: &'static str,
    },
    Wait {
        duration: Sp<Quantity>,
    },
    WaitUntil {
        condition: Condition,
        poll: Option<Sp<Quantity>>,
    },
    Prompt {
        message: String,
    },
    Log {
        message: String,
    },
    /// A step whose action could not be read; only in protocols that have errors.
    Invalid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub role: String,
    pub signal: String,
    pub op: Op,
    pub value: Quantity,
    pub span: Span,
}

/// `any` of the groups holds when `all` of a group's comparisons hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub text: String,
    pub any: Vec<Vec<Comparison>>,
}

#[derive(Debug, Clone)]
pub struct Monitor {
    pub id: String,
    pub role: Sp<String>,
    pub read: Vec<Sp<String>>,
    pub every: Sp<Quantity>,
    pub limits: Vec<(Sp<String>, Limits)>,
    pub on_violation: ViolationPolicy,
    /// Start sampling when this step completes (default: when the run starts).
    pub after: Option<Sp<String>>,
    /// Stop sampling when this step starts (default: when the run ends).
    pub until: Option<Sp<String>>,
    pub span: Span,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(value: ParamValue, overridden: bool) -> Param {
        Param {
            name: "p".into(),
            default: value.clone(),
            value,
            overridden,
            span: crate::source::Span::default(),
            used: true,
        }
    }

    #[test]
    fn origins_quote_at_most_a_short_value() {
        let short = param(ParamValue::Text("100 uL".into()), false);
        assert_eq!(short.origin(), "parameter `p` = \"100 uL\"");
        let over = param(ParamValue::Text("10 s".into()), true);
        assert_eq!(over.origin(), "--param p=10 s");
        let long = param(ParamValue::Text("µ".repeat(400_000)), false);
        let o = long.origin();
        assert!(o.chars().count() < 70, "{o}");
        assert!(o.ends_with('…'), "{o}");
        let long = param(ParamValue::Text("x".repeat(100)), true);
        assert_eq!(long.origin(), format!("--param p={}…", "x".repeat(40)));
        let edge = param(ParamValue::Text("x".repeat(41)), false);
        assert_eq!(
            edge.origin(),
            format!("parameter `p` = \"{}…", "x".repeat(40))
        );
        let fits = param(ParamValue::Text("x".repeat(40)), false);
        assert_eq!(
            fits.origin(),
            format!("parameter `p` = \"{}\"", "x".repeat(40))
        );
        assert_eq!(
            param(ParamValue::Integer(3), false).origin(),
            "parameter `p` = 3"
        );
    }
}
