//! The device profile format (`devices/*.toml`, `format = "biofoundry.profile/1"`),
//! as serde types. Values that need parsing (templates, patterns, durations) are
//! parsed while deserialising, so a bad one is reported at its own line and
//! column; rules that span several tables are checked in `super::validate`.
//! docs/device-profiles.md describes every key.

use super::codec::{DataType, RegisterKind, WordOrder};
use super::expr::Template;
use crate::units::{Dimension, parse_quantity};
use indexmap::IndexMap;
use serde::Deserialize;
use std::fmt;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileDoc {
    pub format: Spanned<String>,
    pub profile: Identity,
    pub link: Spanned<LinkDef>,
    /// Named numbers used by templates (calibrations, geometry); a lab file may
    /// override them per device instance.
    #[serde(default)]
    pub settings: IndexMap<String, f64>,
    /// How `devices probe` asks the instrument who it is.
    pub identify: Option<Spanned<StepDef>>,
    /// Run once after the link opens (start-up handshakes).
    #[serde(default)]
    pub connect: Vec<Spanned<StepDef>>,
    #[serde(default)]
    pub signals: IndexMap<String, Spanned<SignalDef>>,
    #[serde(default)]
    pub setpoints: IndexMap<String, Spanned<SetpointDef>>,
    #[serde(default)]
    pub actions: IndexMap<String, Spanned<ActionDef>>,
    #[serde(default)]
    pub errors: Vec<Spanned<ErrorRule>>,
    /// Run on abort, stop and shutdown: heaters off, pumps and shakers stopped.
    #[serde(default)]
    pub safe_state: Vec<Spanned<StepDef>>,
    /// Liquid handlers: where each deck slot is.
    pub deck: Option<Spanned<DeckDef>>,
    pub simulation: Option<Spanned<SimulationDef>>,
    /// Named conditions of the instrument the controller tracks (e.g. `latch`,
    /// `door`), with the value each has when the instrument connects.
    #[serde(default)]
    pub states: IndexMap<String, Spanned<String>>,
    /// Conditions that must hold before a setpoint is written or an action
    /// runs; enforced by the driver, `check --lab` and MQTT setpoint commands.
    #[serde(default)]
    pub interlocks: Vec<Spanned<InterlockDef>>,
}

/// "No `setpoint` above `above` (or no `action`) unless every state in
/// `requires` has its value."
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterlockDef {
    pub id: String,
    /// Guards writes of this setpoint ...
    pub setpoint: Option<Spanned<String>>,
    /// ... above this value (e.g. `"0 rpm"`; without it, every write).
    pub above: Option<Spanned<String>>,
    /// Or guards this action.
    pub action: Option<Spanned<String>>,
    /// state → the value it must have.
    pub requires: IndexMap<String, String>,
    /// What the operator is told.
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub name: String,
    pub vendor: String,
    pub model: String,
    pub kind: Spanned<String>,
    /// Where the facts in the profile come from.
    pub source: String,
    /// Labware positions, if different from the kind's default.
    pub slots: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LinkDef {
    Serial(SerialLinkDef),
    Modbus(ModbusLinkDef),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    #[default]
    None,
    Hardware,
    Software,
}

fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_send_terminator() -> String {
    "\r".into()
}
fn default_reply_terminator() -> String {
    "\r\n".into()
}
fn one_second() -> Duration {
    Duration(1.0)
}
fn default_unit() -> u8 {
    1
}
fn default_max_registers() -> u16 {
    125
}
fn default_busy_retries() -> u32 {
    3
}
fn hundred_ms() -> Duration {
    Duration(0.1)
}
fn default_baud_modbus() -> u32 {
    19200
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialLinkDef {
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Appended to every command.
    #[serde(default = "default_send_terminator")]
    pub send_terminator: String,
    /// Ends every reply line.
    #[serde(default = "default_reply_terminator")]
    pub reply_terminator: String,
    /// The line that completes a reply; without it, the first line does.
    pub reply_end: Option<Pattern>,
    /// The instrument echoes each command before replying.
    #[serde(default)]
    pub echo: bool,
    /// Quiet time between the end of one exchange and the next command.
    #[serde(default)]
    pub min_gap: Duration,
    #[serde(default = "one_second")]
    pub reply_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusLinkDef {
    /// Serial settings, used for `modbus-rtu://` transports.
    #[serde(default = "default_baud_modbus")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Unit id (slave address) unless the transport URL names one.
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// Word order of 32-bit values unless a signal says otherwise.
    #[serde(default)]
    pub word_order: WordOrder,
    #[serde(default = "default_max_registers")]
    pub max_registers_per_read: u16,
    /// Retries of a request answered with exception 06 (server busy).
    #[serde(default = "default_busy_retries")]
    pub busy_retries: u32,
    #[serde(default = "hundred_ms")]
    pub busy_retry_wait: Duration,
    #[serde(default = "one_second")]
    pub timeout: Duration,
    #[serde(default)]
    pub min_gap: Duration,
}

/// Where a value sits in Modbus registers (the register keys of a signal or setpoint).
#[derive(Debug, Clone, Copy)]
pub struct RegisterDef<'a> {
    pub register: RegisterKind,
    pub address: Option<&'a Template>,
    pub data_type: DataType,
    pub word_order: Option<WordOrder>,
    pub scale: Option<&'a Template>,
    pub offset: Option<&'a Template>,
}

macro_rules! register_view {
    ($t:ty) => {
        impl $t {
            pub fn register_def(&self) -> RegisterDef<'_> {
                RegisterDef {
                    register: self.register,
                    address: self.address.as_ref(),
                    data_type: self.data_type,
                    word_order: self.word_order,
                    scale: self.scale.as_ref(),
                    offset: self.offset.as_ref(),
                }
            }
        }
    };
}
register_view!(SignalDef);
register_view!(SetpointDef);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDef {
    /// First register of a block that must be read whole.
    pub start: Template,
    pub count: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusDef {
    pub address: Template,
    #[serde(rename = "type", default)]
    pub data_type: DataType,
    /// The value that means "measurement valid".
    #[serde(default)]
    pub ok: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalDef {
    /// The unit the instrument reports in (converted to the catalogue's unit).
    pub unit: Option<Spanned<String>>,
    pub description: Option<String>,
    /// How often `serve` publishes it (defaults to the lab file's telemetry period).
    pub poll: Option<Duration>,
    // Serial
    pub query: Option<Template>,
    pub reply: Option<Pattern>,
    /// The capture in `reply` holding the number.
    pub capture: Option<String>,
    // Modbus
    #[serde(default)]
    pub register: RegisterKind,
    /// 0-based PDU address; may be an expression of settings, e.g. `"{100 + channel}"`.
    pub address: Option<Template>,
    #[serde(rename = "type", default)]
    pub data_type: DataType,
    pub word_order: Option<WordOrder>,
    /// `value = raw × scale + offset`; both may use settings.
    pub scale: Option<Template>,
    pub offset: Option<Template>,
    pub block: Option<BlockDef>,
    pub status: Option<StatusDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReachedDef {
    pub signal: Spanned<String>,
    /// Reached when |signal − setpoint| ≤ within (in the signal's unit).
    pub within: f64,
    #[serde(default = "one_second")]
    pub poll: Duration,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetpointDef {
    pub unit: Option<Spanned<String>>,
    /// The instrument's range, e.g. `"4..95 C"`: values outside are refused
    /// before anything is sent.
    pub limits: Spanned<String>,
    /// Serial: one command, `{value}` is the setpoint in `unit`.
    pub command: Option<Template>,
    pub expect: Option<Pattern>,
    /// Or a sequence (serial or Modbus) for setpoints that need several steps.
    #[serde(default)]
    pub steps: Vec<Spanned<StepDef>>,
    // Modbus: one register write.
    #[serde(default)]
    pub register: RegisterKind,
    /// 0-based PDU address; may be an expression of settings, e.g. `"{100 + channel}"`.
    pub address: Option<Template>,
    #[serde(rename = "type", default)]
    pub data_type: DataType,
    pub word_order: Option<WordOrder>,
    /// `value = raw × scale + offset`; both may use settings.
    pub scale: Option<Template>,
    pub offset: Option<Template>,
    /// Read this signal back after writing; it must be within `tolerance`.
    pub readback: Option<Spanned<String>>,
    pub tolerance: Option<f64>,
    pub reached: Option<Spanned<ReachedDef>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionDef {
    pub description: Option<String>,
    /// Names the controller passes in (e.g. `slot`, `x`, `volume`).
    #[serde(default)]
    pub params: Vec<String>,
    pub steps: Vec<Spanned<StepDef>>,
    /// States this action changes when it succeeds, e.g. `{ latch = "closed" }`.
    #[serde(default)]
    pub sets: IndexMap<String, String>,
}

/// One step of a sequence. Exactly one of the verbs (`send`, `poll`, `write`,
/// `read`, `wait`, `send_break`, `set`, `action`) is given.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// Serial: send a command and read the reply.
    pub send: Option<Template>,
    /// The reply must match (else the step fails with the reply in the message).
    pub expect: Option<Pattern>,
    /// `false`: the command has no reply.
    pub reply: Option<bool>,
    /// Serial: send a query every `every` until the reply matches `until`.
    pub poll: Option<Template>,
    pub until: Option<Pattern>,
    pub every: Option<Duration>,
    pub timeout: Option<Duration>,
    /// Modbus: write `value` at this address.
    pub write: Option<Template>,
    pub value: Option<Template>,
    /// Modbus: read at this address; with `equals`, poll until it does.
    pub read: Option<Template>,
    pub equals: Option<Template>,
    #[serde(default)]
    pub register: RegisterKind,
    #[serde(rename = "type")]
    pub data_type: Option<DataType>,
    pub word_order: Option<WordOrder>,
    pub wait: Option<Duration>,
    /// Serial: hold the line in break for this long.
    pub send_break: Option<Duration>,
    /// Write a setpoint (limits apply) to `value`.
    pub set: Option<Spanned<String>>,
    /// Run another action of the profile.
    pub action: Option<Spanned<String>>,
}

impl StepDef {
    /// The verbs given, for the "exactly one" rule.
    pub fn verbs(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |present: bool, name| {
            if present {
                v.push(name)
            }
        };
        add(self.send.is_some(), "send");
        add(self.poll.is_some(), "poll");
        add(self.write.is_some(), "write");
        add(self.read.is_some(), "read");
        add(self.wait.is_some(), "wait");
        add(self.send_break.is_some(), "send_break");
        add(self.set.is_some(), "set");
        add(self.action.is_some(), "action");
        v
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorRule {
    /// A reply line that means an error; a `code` capture selects the message.
    pub pattern: Pattern,
    #[serde(default)]
    pub messages: IndexMap<String, String>,
    /// Codes worth retrying (spurious "busy").
    #[serde(default)]
    pub retry: Vec<String>,
    #[serde(default = "default_busy_retries")]
    pub retries: u32,
    #[serde(default = "hundred_ms")]
    pub retry_wait: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeckDef {
    /// Slot number → position of the slot's front-left corner (x, y, z in mm).
    pub slots: IndexMap<String, [f64; 3]>,
    /// Where tips are dropped.
    pub trash: [f64; 3],
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationDef {
    /// The physical model behind the simulator: a device kind, or a bioreactor
    /// part (`ph`, `dissolved_oxygen`, `temperature`, `od600`, `airflow`, a pump).
    pub model: Option<Spanned<String>>,
    /// Time the simulated instrument takes to answer.
    #[serde(default)]
    pub reply_delay: Duration,
    /// Serial: how requests are answered, first match wins.
    #[serde(default)]
    pub respond: Vec<Spanned<RespondRule>>,
    /// Modbus: registers with fixed contents (unit codes, identity).
    #[serde(default)]
    pub registers: Vec<FixedRegister>,
    /// Serial: the lines a busy instrument answers with (e.g. `["er 01"]`), sent
    /// when a "busy" fault is injected; without them a busy instrument is silent.
    #[serde(default)]
    pub busy_reply: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondRule {
    pub request: Pattern,
    /// Set this setpoint of the model to `value` (default: the `value` capture).
    pub set: Option<String>,
    pub value: Option<Template>,
    /// Run this command of the model (`stop`, `open_door`, `load`, ...).
    pub command: Option<String>,
    /// Reply only once the command has finished (instruments that answer at
    /// the end of a motion); otherwise at once, while it runs.
    #[serde(default)]
    pub wait: bool,
    /// Reply lines; `{name}` may use captures, the model's signals,
    /// `target.<setpoint>` and settings.
    #[serde(default)]
    pub reply: Vec<Template>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedRegister {
    pub address: u16,
    #[serde(rename = "type", default)]
    pub data_type: DataType,
    #[serde(default)]
    pub word_order: WordOrder,
    pub value: f64,
}

/// A duration written with its unit (`"100 ms"`, `"15 s"`), in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Duration(pub f64);

impl Duration {
    pub fn std(self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.0.clamp(0.0, 1e9))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let q = parse_quantity(&text, Dimension::Time)
            .map_err(|e| serde::de::Error::custom(format!("{e}; {}", e.hint())))?;
        if q.value < 0.0 {
            return Err(serde::de::Error::custom("a duration cannot be negative"));
        }
        Ok(Duration(q.value))
    }
}

/// A regular expression, compiled when the profile is loaded.
#[derive(Clone)]
pub struct Pattern(pub regex::Regex);

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        regex::RegexBuilder::new(&text)
            // Profiles are small; a pattern that compiles to megabytes is a mistake.
            .size_limit(1 << 20)
            .build()
            .map(Pattern)
            .map_err(|e| serde::de::Error::custom(format!("not a valid pattern: {e}")))
    }
}
