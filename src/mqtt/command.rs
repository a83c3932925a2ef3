//! Commands from MES: a message on `<root>/cmd/<verb>` with a JSON object payload
//! becomes a typed [`Command`], or a [`Rejection`] whose reason says what is wrong.
//! With a command key configured, only HMAC-SHA256-signed envelopes are accepted.
//! The wire format is described in docs/mqtt.md.
//!
//! The bytes come from the network, so nothing here panics on any input, and
//! memory stays bounded by a small multiple of the size-capped payload.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The largest accepted payload: a protocol's TOML text fits with room to spare.
pub const MAX_COMMAND_BYTES: usize = 1 << 20;

const MAX_ID_CHARS: usize = 128;
const MAX_PARAM_NAME_CHARS: usize = 128;
const MAX_OPERATOR_CHARS: usize = 200;
const MAX_ABORT_REASON_CHARS: usize = 1000;
const MAX_RESPONSE_CHARS: usize = 10_000;
const MIN_KEY_BYTES: usize = 16;
/// A key file is a few dozen bytes; a cap keeps a wrong path (a log, a device
/// file) from being read into memory whole.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// How much of a client's string a rejection quotes, so reasons stay short.
const QUOTE_CHARS: usize = 64;
/// `humantime` cannot format times from the year 10000 on.
const FIRST_SECOND_OF_YEAR_10000: u64 = 253_402_300_800;

const ID_RULE: &str = "ids are 1 to 128 ASCII letters, digits, '_', '-', '.' or ':'";
const UNSIGNED: &str =
    "unsigned command: this controller requires an HMAC-SHA256 signature (see docs/mqtt.md)";
const NO_KEY: &str = "signed command, but this controller has no command key configured";
const BAD_SIGNATURE: &str = "bad signature";

/// The command verbs, one per topic `<root>/cmd/<verb>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    StartRun,
    Pause,
    Resume,
    Hold,
    Abort,
    Stop,
    AnswerPrompt,
    AckAlarm,
    Republish,
    SetSetpoint,
    Retry,
    Skip,
}

impl Verb {
    pub const ALL: [Verb; 12] = [
        Verb::StartRun,
        Verb::Pause,
        Verb::Resume,
        Verb::Hold,
        Verb::Abort,
        Verb::Stop,
        Verb::AnswerPrompt,
        Verb::AckAlarm,
        Verb::Republish,
        Verb::SetSetpoint,
        Verb::Retry,
        Verb::Skip,
    ];

    /// The topic level and wire name, e.g. `start_run`.
    pub fn name(self) -> &'static str {
        match self {
            Verb::StartRun => "start_run",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Hold => "hold",
            Verb::Abort => "abort",
            Verb::Stop => "stop",
            Verb::AnswerPrompt => "answer_prompt",
            Verb::AckAlarm => "ack_alarm",
            Verb::Republish => "republish",
            Verb::SetSetpoint => "set_setpoint",
            Verb::Retry => "retry",
            Verb::Skip => "skip",
        }
    }

    pub fn from_name(s: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.name() == s)
    }

    /// The fields this verb takes besides `cmd_id` and `expires_at`.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Verb::StartRun => &["protocol", "protocol_toml", "params", "bind", "operator"],
            Verb::Abort => &["reason"],
            Verb::AnswerPrompt => &["run_id", "step_id", "response"],
            Verb::AckAlarm => &["alarm_id"],
            Verb::SetSetpoint => &["device", "setpoint", "value"],
            Verb::Pause
            | Verb::Resume
            | Verb::Hold
            | Verb::Stop
            | Verb::Republish
            | Verb::Retry
            | Verb::Skip => &[],
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a run's protocol comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ProtocolSource {
    /// A protocol in the controller's library, by name (always [`is_valid_id`],
    /// never starting with '.', so it cannot leave the library folder).
    Name(String),
    /// The protocol's TOML text, sent with the command.
    Toml(String),
}

/// A verb's arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandArgs {
    StartRun {
        protocol: ProtocolSource,
        /// Parameter overrides, values as text (`37`, `2.5`, `true`, `37 C`).
        params: Vec<(String, String)>,
        /// Role -> device id.
        bind: Vec<(String, String)>,
        operator: Option<String>,
    },
    Abort {
        reason: String,
    },
    AnswerPrompt {
        run_id: String,
        step_id: String,
        response: String,
    },
    AckAlarm {
        alarm_id: String,
    },
    /// A setpoint of a device outside runs; `value` as text with its unit
    /// (`"37 C"`), or a number in the setpoint's canonical unit.
    SetSetpoint {
        device: String,
        setpoint: String,
        value: String,
    },
    /// pause, resume, hold, stop, republish, retry, skip.
    None,
}

/// A command that passed every check (and the signature, when a key is set).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub cmd_id: String,
    pub verb: Verb,
    pub args: CommandArgs,
    pub expires_at: Option<SystemTime>,
}

/// Why a command was refused; `cmd_id` is known when the payload got far enough to read it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    pub cmd_id: Option<String>,
    pub reason: String,
}

impl Rejection {
    fn new(cmd_id: Option<String>, reason: impl Into<String>) -> Rejection {
        Rejection {
            cmd_id,
            reason: reason.into(),
        }
    }
}

/// How long a command's `cmd_id` is remembered, and so refused as `duplicate`.
/// A signed command must expire within it: once its id is forgotten, a
/// recorded copy could otherwise be played again.
pub const COMMAND_MEMORY: Duration = Duration::from_secs(30 * 24 * 3600);

/// Turns one MQTT message into a command. `verb` is the last topic level,
/// `key` the shared command key (when set, only signed envelopes pass), `now`
/// the time `expires_at` is compared with.
pub fn parse_command(
    verb: &str,
    payload: &[u8],
    key: Option<&[u8]>,
    now: SystemTime,
) -> Result<Command, Rejection> {
    // Checked before anything looks at the bytes.
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(Rejection::new(
            None,
            format!(
                "payload too large ({} bytes, at most {MAX_COMMAND_BYTES})",
                payload.len()
            ),
        ));
    }
    let Some(verb) = Verb::from_name(verb) else {
        let verbs: Vec<&str> = Verb::ALL.iter().map(|v| v.name()).collect();
        return Err(Rejection::new(
            peek_cmd_id(payload),
            format!(
                "unknown command verb `{}`; verbs: {}",
                quote(verb),
                verbs.join(", ")
            ),
        ));
    };
    let outer = parse_object(payload, "payload").map_err(|r| Rejection::new(None, r))?;
    let is_envelope = outer.contains_key("signed") || outer.contains_key("sig");
    let object = match (key, is_envelope) {
        (None, false) => outer,
        (None, true) => return Err(Rejection::new(envelope_cmd_id(&outer), NO_KEY)),
        (Some(_), false) => return Err(Rejection::new(cmd_id_of(&outer), UNSIGNED)),
        (Some(key), true) => {
            let signed = verify(verb, &outer, key)
                .map_err(|r| Rejection::new(envelope_cmd_id(&outer), r))?;
            // Only verified text is read as a command.
            parse_object(signed.as_bytes(), "signed command")
                .map_err(|r| Rejection::new(None, r))?
        }
    };
    let cmd_id = read_cmd_id(&object).map_err(|r| Rejection::new(None, r))?;
    match read_body(verb, &object, now) {
        Ok((None, _)) if key.is_some() => Err(Rejection::new(
            Some(cmd_id),
            "a signed command needs `expires_at` (at most 30 days ahead), so that a \
             recorded copy cannot be played again once its cmd_id is forgotten",
        )),
        Ok((Some(at), _))
            if key.is_some()
                && now
                    .checked_add(COMMAND_MEMORY)
                    .is_some_and(|last| at > last) =>
        {
            Err(Rejection::new(
                Some(cmd_id),
                format!(
                    "`expires_at` {} is more than 30 days ahead: a signed command must expire \
                 while its cmd_id is remembered",
                    humantime::format_rfc3339(at)
                ),
            ))
        }
        Ok((expires_at, args)) => Ok(Command {
            cmd_id,
            verb,
            args,
            expires_at,
        }),
        Err(reason) => Err(Rejection::new(Some(cmd_id), reason)),
    }
}

/// The signed envelope for a command body (used by MES clients, the example client and tests).
pub fn sign(verb: &str, body: &str, key: &[u8]) -> String {
    // HMAC takes keys of any length, so `mac_over` always succeeds; were it
    // ever to fail, an empty `sig` is rejected as a bad signature (fails closed).
    let sig = mac_over(verb, body, key)
        .map(|mac| hex::encode(mac.finalize().into_bytes()))
        .unwrap_or_default();
    serde_json::json!({ "signed": body, "sig": sig }).to_string()
}

/// Reads a shared key file: its bytes with trailing whitespace/newlines removed; at least 16 bytes, else an error message naming the file.
pub fn load_command_key(path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot read command key file {shown}: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read command key file {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "command key file {shown} is too large (more than {MAX_KEY_FILE_BYTES} bytes); \
             it should hold just the key"
        ));
    }
    // Editors add a final newline; it is not part of the key.
    while bytes.last().is_some_and(u8::is_ascii_whitespace) {
        bytes.pop();
    }
    if bytes.len() < MIN_KEY_BYTES {
        return Err(format!(
            "command key file {shown} holds {} bytes (after trailing whitespace); \
             a command key needs at least {MIN_KEY_BYTES}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// True when `s` is usable as one MQTT topic level and an id: 1..=128 chars of ASCII letters, digits, '_', '-', '.', ':' .
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_CHARS && s.bytes().all(is_id_byte)
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')
}

/// What is wrong with an id that fails [`is_valid_id`], naming the field.
fn id_error(field: &str, s: &str) -> String {
    format!("`{field}` {}", id_problem(s))
}

/// What is wrong with an id, as the end of a sentence about it.
fn id_problem(s: &str) -> String {
    let chars = s.chars().count();
    if s.is_empty() {
        format!("is empty; {ID_RULE}")
    } else if chars > MAX_ID_CHARS {
        format!("is too long ({chars} characters, at most {MAX_ID_CHARS})")
    } else {
        let bad = s
            .chars()
            .find(|c| !c.is_ascii() || !is_id_byte(*c as u8))
            .unwrap_or('?');
        format!(
            "`{}` contains '{}'; {ID_RULE}",
            quote(s),
            bad.escape_debug()
        )
    }
}

fn check_id(field: &str, s: &str) -> Result<(), String> {
    if is_valid_id(s) {
        Ok(())
    } else {
        Err(id_error(field, s))
    }
}

/// A client's string for a reason: at most [`QUOTE_CHARS`] characters, with
/// control characters escaped so a reason is always one readable line.
fn quote(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(QUOTE_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(QUOTE_CHARS).is_some() {
        out.push('…');
    }
    out
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// UTF-8, then JSON (serde_json's recursion limit of 128 stops deep nesting
/// before it can exhaust the stack), then an object.
fn parse_object(bytes: &[u8], what: &str) -> Result<Map<String, Value>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "{what} is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        return Err(format!("{what} is empty; expected a JSON object"));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "{what} must be a JSON object, got {}",
            match other {
                Value::Null => "JSON null",
                other => kind(&other),
            }
        )),
        Err(e) => {
            let full = e.to_string();
            let location = format!(" at line {} column {}", e.line(), e.column());
            let message = full.strip_suffix(&location).unwrap_or(&full);
            Err(format!(
                "{what} is invalid JSON at line {} column {}: {message}",
                e.line(),
                e.column()
            ))
        }
    }
}

/// A valid string `cmd_id`, if the object has one.
fn cmd_id_of(object: &Map<String, Value>) -> Option<String> {
    match object.get("cmd_id") {
        Some(Value::String(s)) if is_valid_id(s) => Some(s.clone()),
        _ => None,
    }
}

/// The `cmd_id` inside an envelope's (not necessarily verified) `signed` text:
/// only ever used to address a rejection, never to run anything.
fn envelope_cmd_id(envelope: &Map<String, Value>) -> Option<String> {
    match envelope.get("signed") {
        Some(Value::String(text)) => parse_object(text.as_bytes(), "")
            .ok()
            .and_then(|inner| cmd_id_of(&inner)),
        _ => None,
    }
}

/// Best effort `cmd_id` of a payload that is refused before it is parsed in earnest.
fn peek_cmd_id(payload: &[u8]) -> Option<String> {
    let object = parse_object(payload, "").ok()?;
    cmd_id_of(&object).or_else(|| envelope_cmd_id(&object))
}

/// The MAC over verb + "\n" + body: covering the verb means a signed `pause`
/// cannot be replayed on the `abort` topic.
fn mac_over(verb: &str, body: &str, key: &[u8]) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(verb.as_bytes());
    mac.update(b"\n");
    mac.update(body.as_bytes());
    Some(mac)
}

/// Checks an envelope `{"signed": "...", "sig": "..."}` and returns the signed text.
fn verify<'a>(verb: Verb, envelope: &'a Map<String, Value>, key: &[u8]) -> Result<&'a str, String> {
    if let Some(field) = envelope.keys().find(|k| *k != "signed" && *k != "sig") {
        return Err(format!(
            "unknown field `{}` in signed envelope; expected exactly `signed` and `sig`",
            quote(field)
        ));
    }
    let signed = match envelope.get("signed") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(format!(
                "`signed` must be a string (the command's JSON text), got {}",
                kind(other)
            ));
        }
        None => return Err("signed envelope has `sig` but no `signed`".to_string()),
    };
    let sig = match envelope.get("sig") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(format!(
                "`sig` must be a string (hex HMAC-SHA256), got {}",
                kind(other)
            ));
        }
        None => return Err("signed envelope has `signed` but no `sig`".to_string()),
    };
    // An HMAC-SHA256 is 32 bytes; checking the length first avoids decoding a huge string.
    if sig.len() != 64 {
        return Err(BAD_SIGNATURE.to_string());
    }
    let sig = hex::decode(sig).map_err(|_| BAD_SIGNATURE.to_string())?;
    let mac = mac_over(verb.name(), signed, key).ok_or_else(|| BAD_SIGNATURE.to_string())?;
    // Constant time, so timing does not reveal how much of a guess was right.
    mac.verify_slice(&sig)
        .map_err(|_| BAD_SIGNATURE.to_string())?;
    Ok(signed)
}

fn read_cmd_id(object: &Map<String, Value>) -> Result<String, String> {
    match object.get("cmd_id") {
        None => Err("missing `cmd_id` (the command's id, echoed in its result)".to_string()),
        Some(Value::String(s)) if is_valid_id(s) => Ok(s.clone()),
        Some(Value::String(s)) => Err(id_error("cmd_id", s)),
        Some(other) => Err(format!("`cmd_id` must be a string, got {}", kind(other))),
    }
}

/// Everything after `cmd_id`: the field list, the expiry, the verb's arguments.
fn read_body(
    verb: Verb,
    object: &Map<String, Value>,
    now: SystemTime,
) -> Result<(Option<SystemTime>, CommandArgs), String> {
    let allowed = verb.fields();
    if let Some(field) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "cmd_id" | "expires_at") && !allowed.contains(&k.as_str()))
    {
        let expected: Vec<String> = ["cmd_id", "expires_at"]
            .iter()
            .chain(allowed)
            .map(|f| format!("`{f}`"))
            .collect();
        return Err(format!(
            "unknown field `{}` for {verb}; expected one of {}",
            quote(field),
            expected.join(", ")
        ));
    }
    let expires_at = read_expiry(object, now)?;
    let args = match verb {
        Verb::StartRun => read_start_run(object)?,
        Verb::Abort => {
            let reason = required_str(object, verb, "reason", "a string")?;
            if reason.trim().is_empty() {
                return Err("`reason` is empty; say why the run is aborted".to_string());
            }
            check_length("reason", reason, MAX_ABORT_REASON_CHARS)?;
            CommandArgs::Abort {
                reason: reason.to_string(),
            }
        }
        Verb::AnswerPrompt => {
            let run_id = required_id(object, verb, "run_id")?;
            let step_id = required_id(object, verb, "step_id")?;
            // An empty response is a valid answer (e.g. to a plain confirmation).
            let response = required_str(object, verb, "response", "a string")?;
            check_length("response", response, MAX_RESPONSE_CHARS)?;
            CommandArgs::AnswerPrompt {
                run_id,
                step_id,
                response: response.to_string(),
            }
        }
        Verb::AckAlarm => CommandArgs::AckAlarm {
            alarm_id: required_id(object, verb, "alarm_id")?,
        },
        Verb::SetSetpoint => {
            let device = required_id(object, verb, "device")?;
            let setpoint = required_id(object, verb, "setpoint")?;
            let value = match object.get("value") {
                None => return Err(format!("{verb} needs `value` (e.g. \"37 C\")")),
                Some(Value::String(s)) => {
                    check_length("value", s, MAX_VALUE_CHARS)?;
                    s.clone()
                }
                Some(Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => n.to_string(),
                Some(other) => {
                    return Err(format!(
                        "`value` must be a string with a unit or a number, got {}",
                        kind(other)
                    ));
                }
            };
            CommandArgs::SetSetpoint {
                device,
                setpoint,
                value,
            }
        }
        Verb::Pause
        | Verb::Resume
        | Verb::Hold
        | Verb::Stop
        | Verb::Republish
        | Verb::Retry
        | Verb::Skip => CommandArgs::None,
    };
    Ok((expires_at, args))
}

fn read_expiry(object: &Map<String, Value>, now: SystemTime) -> Result<Option<SystemTime>, String> {
    let text = match object.get("expires_at") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(format!(
                "`expires_at` must be a string (an RFC 3339 time), got {}",
                kind(other)
            ));
        }
    };
    let Some(at) = parse_time(text) else {
        return Err(format!(
            "`expires_at` is not an RFC 3339 time with a zone from 1970 to 9999: `{}` \
             (e.g. 2025-01-31T12:00:00Z)",
            quote(text)
        ));
    };
    if at <= now {
        // The orchestrator relies on this reason starting with "expired".
        return Err(format!("expired at {}", humantime::format_rfc3339(at)));
    }
    Ok(Some(at))
}

/// RFC 3339 with a zone: `Z` or any `±hh:mm` offset (humantime alone reads only
/// UTC, but MES clients often send local offsets). A time without a zone is
/// refused: guessing UTC could expire a command hours early or late.
fn parse_time(text: &str) -> Option<SystemTime> {
    // RFC 3339 allows lowercase `t` and `z`.
    let upper = text.to_ascii_uppercase();
    let b = upper.as_bytes();
    let n = b.len();
    // `2018-02-14T00:28:07+02:00` is the shortest time with an offset.
    let offset = if n >= 25 && matches!(b[n - 6], b'+' | b'-') {
        let digits_ok = [n - 5, n - 4, n - 2, n - 1]
            .iter()
            .all(|&i| b[i].is_ascii_digit());
        if b[n - 3] != b':' || !digits_ok {
            return None;
        }
        let hours = u64::from(b[n - 5] - b'0') * 10 + u64::from(b[n - 4] - b'0');
        let minutes = u64::from(b[n - 2] - b'0') * 10 + u64::from(b[n - 1] - b'0');
        if hours > 23 || minutes > 59 {
            return None;
        }
        let east = b[n - 6] == b'+';
        Some((east, Duration::from_secs(hours * 3600 + minutes * 60)))
    } else {
        None
    };
    let as_utc = match offset {
        // `b[n - 6]` is ASCII, so `n - 6` is a character boundary.
        Some(_) => humantime::parse_rfc3339(&format!("{}Z", upper.get(..n - 6)?)),
        None => humantime::parse_rfc3339(&upper),
    }
    .ok()?;
    // Local time = UTC + offset, so UTC = local - offset.
    let at = match offset {
        None => as_utc,
        Some((true, d)) => as_utc.checked_sub(d)?,
        Some((false, d)) => as_utc.checked_add(d)?,
    };
    let secs = at.duration_since(UNIX_EPOCH).ok()?.as_secs();
    (secs < FIRST_SECOND_OF_YEAR_10000).then_some(at)
}

fn optional_str<'a>(
    object: &'a Map<String, Value>,
    field: &str,
    expected: &str,
) -> Result<Option<&'a str>, String> {
    // `null` counts as absent: many MES serializers write unset options that way.
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("`{field}` must be {expected}, got {}", kind(other))),
    }
}

fn required_str<'a>(
    object: &'a Map<String, Value>,
    verb: Verb,
    field: &str,
    expected: &str,
) -> Result<&'a str, String> {
    match object.get(field) {
        None => Err(format!("{verb} needs `{field}` ({expected})")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{field}` must be {expected}, got {}", kind(other))),
    }
}

fn required_id(object: &Map<String, Value>, verb: Verb, field: &str) -> Result<String, String> {
    let s = required_str(object, verb, field, "an id string")?;
    check_id(field, s)?;
    Ok(s.to_string())
}

/// The longest setpoint value text (`"37.5 C"`).
const MAX_VALUE_CHARS: usize = 64;

fn check_length(field: &str, s: &str, max: usize) -> Result<(), String> {
    let chars = s.chars().count();
    if chars > max {
        Err(format!(
            "`{field}` is too long ({chars} characters, at most {max})"
        ))
    } else {
        Ok(())
    }
}

fn read_start_run(object: &Map<String, Value>) -> Result<CommandArgs, String> {
    let name = optional_str(
        object,
        "protocol",
        "a string (a protocol name from the library)",
    )?;
    let text = optional_str(
        object,
        "protocol_toml",
        "a string (the protocol's TOML text)",
    )?;
    let protocol = match (name, text) {
        (Some(_), Some(_)) => {
            return Err(
                "give either `protocol` (a library name) or `protocol_toml` (the protocol text), not both"
                    .to_string(),
            );
        }
        (None, None) => {
            return Err(
                "start_run needs `protocol` (a library name) or `protocol_toml` (the protocol text)"
                    .to_string(),
            );
        }
        (Some(name), None) => {
            check_id("protocol", name)?;
            // `.` and `..` are valid ids but name folders, not protocols.
            if name.starts_with('.') {
                return Err(format!(
                    "`protocol` `{}` cannot start with '.'",
                    quote(name)
                ));
            }
            ProtocolSource::Name(name.to_string())
        }
        (None, Some(text)) => {
            if text.trim().is_empty() {
                return Err("`protocol_toml` is empty".to_string());
            }
            ProtocolSource::Toml(text.to_string())
        }
    };

    let mut params = Vec::new();
    match object.get("params") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                let chars = name.chars().count();
                if chars == 0 || chars > MAX_PARAM_NAME_CHARS {
                    return Err(format!(
                        "`params` has a name of {chars} characters; names have 1 to {MAX_PARAM_NAME_CHARS}"
                    ));
                }
                let text = match value {
                    Value::String(s) => s.clone(),
                    // serde_json's Display: 37 -> "37", 2.5 -> "2.5".
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(format!(
                            "`params.{}` must be a string, number or boolean, got {}",
                            quote(name),
                            kind(other)
                        ));
                    }
                };
                params.push((name.clone(), text));
            }
        }
        Some(other) => {
            return Err(format!(
                "`params` must be an object of names to values, got {}",
                kind(other)
            ));
        }
    }

    let mut bind = Vec::new();
    match object.get("bind") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (role, device) in map {
                if !is_valid_id(role) {
                    return Err(format!("`bind`: role {}", id_problem(role)));
                }
                let Value::String(device) = device else {
                    return Err(format!(
                        "`bind.{role}` must be a device id string, got {}",
                        kind(device)
                    ));
                };
                if !is_valid_id(device) {
                    return Err(format!("`bind.{role}`: device id {}", id_problem(device)));
                }
                bind.push((role.clone(), device.clone()));
            }
        }
        Some(other) => {
            return Err(format!(
                "`bind` must be an object of roles to device ids, got {}",
                kind(other)
            ));
        }
    }

    let operator = optional_str(object, "operator", "a string")?;
    if let Some(operator) = operator {
        check_length("operator", operator, MAX_OPERATOR_CHARS)?;
    }

    Ok(CommandArgs::StartRun {
        protocol,
        params,
        bind,
        operator: operator.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const KEY: &[u8] = b"0123456789abcdef-test-key";

    fn now() -> SystemTime {
        // 2023-11-14T22:13:20Z
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn parse(verb: &str, payload: &str) -> Result<Command, Rejection> {
        parse_command(verb, payload.as_bytes(), None, now())
    }

    fn ok(verb: &str, payload: Value) -> Command {
        match parse(verb, &payload.to_string()) {
            Ok(c) => c,
            Err(r) => panic!("{verb} {payload} rejected: {r}"),
        }
    }

    fn reject(verb: &str, payload: &str) -> Rejection {
        match parse(verb, payload) {
            Ok(c) => panic!("{verb} {payload} accepted: {c:?}"),
            Err(r) => r,
        }
    }

    /// A rejection after the cmd_id `c1` was read.
    fn reject_c1(verb: &str, payload: Value) -> String {
        let r = reject(verb, &payload.to_string());
        assert_eq!(r.cmd_id.as_deref(), Some("c1"), "{r:?}");
        r.reason
    }

    fn assert_has(reason: &str, part: &str) {
        assert!(reason.contains(part), "{reason:?} lacks {part:?}");
    }

    // ---- valid commands -------------------------------------------------

    #[test]
    fn start_run_by_name_with_everything() {
        let c = ok(
            "start_run",
            json!({
                "cmd_id": "mes-42:a",
                "protocol": "pcr_setup",
                "params": {"temp": "37 C", "cycles": 30, "ratio": 2.5, "mix": true},
                "bind": {"liquid_handler": "ot2-1", "inc": "incubator.2"},
                "operator": "Ada Lovelace",
                "expires_at": "2023-11-14T22:14:00Z",
            }),
        );
        assert_eq!(c.cmd_id, "mes-42:a");
        assert_eq!(c.verb, Verb::StartRun);
        assert_eq!(
            c.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_040))
        );
        let CommandArgs::StartRun {
            protocol,
            mut params,
            mut bind,
            operator,
        } = c.args
        else {
            panic!("{:?}", c.args)
        };
        assert_eq!(protocol, ProtocolSource::Name("pcr_setup".into()));
        params.sort();
        let p = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            params,
            [
                p("cycles", "30"),
                p("mix", "true"),
                p("ratio", "2.5"),
                p("temp", "37 C")
            ]
        );
        bind.sort();
        assert_eq!(
            bind,
            [p("inc", "incubator.2"), p("liquid_handler", "ot2-1")]
        );
        assert_eq!(operator.as_deref(), Some("Ada Lovelace"));
    }

    #[test]
    fn start_run_with_toml_text_and_nulls_for_unset_options() {
        let toml = "format = \"biofoundry.protocol/1\"\n[protocol]\nname = \"x\"\n";
        let c = ok(
            "start_run",
            json!({"cmd_id": "c1", "protocol": null, "protocol_toml": toml, "operator": null, "params": null}),
        );
        assert_eq!(
            c.args,
            CommandArgs::StartRun {
                protocol: ProtocolSource::Toml(toml.into()),
                params: vec![],
                bind: vec![],
                operator: None,
            }
        );
        assert_eq!(c.expires_at, None);
    }

    #[test]
    fn simple_verbs_take_only_cmd_id_and_expiry() {
        for verb in [
            Verb::Pause,
            Verb::Resume,
            Verb::Hold,
            Verb::Stop,
            Verb::Republish,
        ] {
            let c = ok(verb.name(), json!({"cmd_id": "c1"}));
            assert_eq!((c.verb, c.args), (verb, CommandArgs::None));
            let r = reject_c1(verb.name(), json!({"cmd_id": "c1", "run_id": "r1"}));
            assert_eq!(
                r,
                format!(
                    "unknown field `run_id` for {verb}; expected one of `cmd_id`, `expires_at`"
                )
            );
        }
    }

    #[test]
    fn abort_answer_prompt_and_ack_alarm() {
        let c = ok("abort", json!({"cmd_id": "c1", "reason": "contamination"}));
        assert_eq!(
            c.args,
            CommandArgs::Abort {
                reason: "contamination".into()
            }
        );
        let c = ok(
            "answer_prompt",
            json!({"cmd_id": "c1", "run_id": "run-7", "step_id": "load.plate_2", "response": ""}),
        );
        assert_eq!(
            c.args,
            CommandArgs::AnswerPrompt {
                run_id: "run-7".into(),
                step_id: "load.plate_2".into(),
                response: String::new(),
            }
        );
        let c = ok("ack_alarm", json!({"cmd_id": "c1", "alarm_id": "a:17"}));
        assert_eq!(
            c.args,
            CommandArgs::AckAlarm {
                alarm_id: "a:17".into()
            }
        );
    }

    #[test]
    fn expiry_with_offsets_and_lowercase() {
        let base = UNIX_EPOCH + Duration::from_secs(1_700_000_040);
        for (text, want) in [
            ("2023-11-14T22:14:00Z", base),
            ("2023-11-14t22:14:00z", base),
            ("2023-11-14T22:14:00+00:00", base),
            ("2023-11-15T00:14:00+02:00", base),
            ("2023-11-14T17:14:00-05:00", base),
            ("2023-11-14T22:14:00.5Z", base + Duration::from_millis(500)),
            (
                "2023-11-15T00:14:00.25+02:00",
                base + Duration::from_millis(250),
            ),
        ] {
            let c = ok("pause", json!({"cmd_id": "c1", "expires_at": text}));
            assert_eq!(c.expires_at, Some(want), "{text}");
        }
    }

    #[test]
    fn verb_names_round_trip() {
        for v in Verb::ALL {
            assert_eq!(Verb::from_name(v.name()), Some(v));
            assert_eq!(v.to_string(), v.name());
        }
        assert_eq!(Verb::from_name("START_RUN"), None);
        assert_eq!(Verb::AckAlarm.name(), "ack_alarm");
    }

    #[test]
    fn valid_ids() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("Run_1-2.3:4"));
        assert!(is_valid_id(&"x".repeat(128)));
        for bad in ["", "a/b", "a+b", "a#b", "a b", "é", "a\0", &"x".repeat(129)] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }

    // ---- signatures ------------------------------------------------------

    #[test]
    fn sign_then_parse_round_trips_for_every_verb() {
        let bodies = [
            json!({"cmd_id": "c1", "protocol": "p"}),
            json!({"cmd_id": "c1"}),
            json!({"cmd_id": "c1"}),
            json!({"cmd_id": "c1"}),
            json!({"cmd_id": "c1", "reason": "r"}),
            json!({"cmd_id": "c1"}),
            json!({"cmd_id": "c1", "run_id": "r", "step_id": "s", "response": "yes"}),
            json!({"cmd_id": "c1", "alarm_id": "a"}),
            json!({"cmd_id": "c1"}),
        ];
        for (verb, mut body) in Verb::ALL.into_iter().zip(bodies) {
            body["expires_at"] = json!("2023-11-15T00:00:00Z");
            let body = body.to_string();
            let envelope = sign(verb.name(), &body, KEY);
            let signed = parse_command(verb.name(), envelope.as_bytes(), Some(KEY), now());
            let plain = parse_command(verb.name(), body.as_bytes(), None, now());
            assert!(signed.is_ok(), "{verb}: {signed:?}");
            assert_eq!(signed, plain);
        }
    }

    #[test]
    fn a_signed_command_must_expire_while_its_id_is_remembered() {
        let signed = |body: Value| {
            let envelope = sign("pause", &body.to_string(), KEY);
            parse_command("pause", envelope.as_bytes(), Some(KEY), now())
        };
        let r = signed(json!({"cmd_id": "c1"})).unwrap_err();
        assert!(r.reason.contains("needs `expires_at`"), "{}", r.reason);
        assert_eq!(r.cmd_id.as_deref(), Some("c1"));
        // now() is 2023-11-14T22:13:20Z; 30 days later is 2023-12-14T22:13:20Z.
        let r = signed(json!({"cmd_id": "c2", "expires_at": "2023-12-14T22:13:21Z"})).unwrap_err();
        assert!(r.reason.contains("more than 30 days ahead"), "{}", r.reason);
        assert!(signed(json!({"cmd_id": "c3", "expires_at": "2023-12-14T22:13:20Z"})).is_ok());
        // Without a key, expires_at stays optional.
        assert!(parse("pause", r#"{"cmd_id":"c4"}"#).is_ok());
    }

    #[test]
    fn envelope_shape() {
        let envelope: Value = serde_json::from_str(&sign("pause", "{\"cmd_id\":\"c1\"}", KEY))
            .expect("sign writes JSON");
        let obj = envelope.as_object().expect("an object");
        assert_eq!(obj.len(), 2);
        assert_eq!(obj["signed"], "{\"cmd_id\":\"c1\"}");
        let sig = obj["sig"].as_str().expect("a string");
        assert_eq!(sig.len(), 64);
        assert!(
            sig.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
    }

    #[test]
    fn signature_covers_the_verb() {
        let envelope = sign("pause", "{\"cmd_id\":\"c1\"}", KEY);
        let r = parse_command("abort", envelope.as_bytes(), Some(KEY), now()).unwrap_err();
        assert_eq!(r.reason, "bad signature");
        // The id is still readable for the answer.
        assert_eq!(r.cmd_id.as_deref(), Some("c1"));
    }

    #[test]
    fn signed_body_follows_every_rule() {
        let envelope = sign("pause", "{\"cmd_id\":\"c1\",\"bogus\":1}", KEY);
        let r = parse_command("pause", envelope.as_bytes(), Some(KEY), now()).unwrap_err();
        assert_has(&r.reason, "unknown field `bogus` for pause");
        let envelope = sign("pause", "[1]", KEY);
        let r = parse_command("pause", envelope.as_bytes(), Some(KEY), now()).unwrap_err();
        assert_eq!(
            r.reason,
            "signed command must be a JSON object, got an array"
        );
    }

    // ---- malformed payloads ----------------------------------------------

    #[test]
    fn payload_too_large_is_refused_unread() {
        let payload = vec![b'x'; MAX_COMMAND_BYTES + 1];
        let r = parse_command("pause", &payload, None, now()).unwrap_err();
        assert_eq!(
            r,
            Rejection::new(None, "payload too large (1048577 bytes, at most 1048576)")
        );
        // Exactly the limit is read (and here fails as JSON, not as size).
        let payload = vec![b' '; MAX_COMMAND_BYTES];
        let r = parse_command("pause", &payload, None, now()).unwrap_err();
        assert_has(&r.reason, "empty");
    }

    #[test]
    fn set_setpoint_reads_a_device_a_setpoint_and_a_value() {
        let c = ok(
            "set_setpoint",
            json!({"cmd_id": "s1", "device": "hs1", "setpoint": "speed", "value": "500 rpm"}),
        );
        assert_eq!(
            c.args,
            CommandArgs::SetSetpoint {
                device: "hs1".into(),
                setpoint: "speed".into(),
                value: "500 rpm".into()
            }
        );
        let c = ok(
            "set_setpoint",
            json!({"cmd_id": "s2", "device": "tm1", "setpoint": "temperature", "value": 37.5}),
        );
        assert!(matches!(c.args, CommandArgs::SetSetpoint { ref value, .. } if value == "37.5"));
        for (payload, expected) in [
            (
                json!({"cmd_id": "s3", "setpoint": "speed", "value": "1"}),
                "needs `device`",
            ),
            (
                json!({"cmd_id": "s3", "device": "hs1", "setpoint": "speed"}),
                "needs `value`",
            ),
            (
                json!({"cmd_id": "s3", "device": "hs1", "setpoint": "speed", "value": true}),
                "a string with a unit or a number",
            ),
            (
                json!({"cmd_id": "s3", "device": "../x", "setpoint": "speed", "value": "1"}),
                "device",
            ),
            (
                json!({"cmd_id": "s3", "device": "hs1", "setpoint": "speed", "value": "1".repeat(65)}),
                "too long",
            ),
        ] {
            let r = reject("set_setpoint", &payload.to_string());
            assert_has(&r.reason, expected);
        }
    }

    #[test]
    fn unknown_verb_lists_verbs_and_keeps_cmd_id() {
        let r = reject("launch", "{\"cmd_id\":\"c9\"}");
        assert_eq!(
            r.reason,
            "unknown command verb `launch`; verbs: start_run, pause, resume, hold, abort, stop, \
             answer_prompt, ack_alarm, republish, set_setpoint, retry, skip"
        );
        assert_eq!(r.cmd_id.as_deref(), Some("c9"));
        assert_eq!(reject("launch", "nope").cmd_id, None);
        assert_eq!(reject("launch", "{\"cmd_id\":\"a/b\"}").cmd_id, None);
        let envelope = sign("launch", "{\"cmd_id\":\"c9\"}", KEY);
        assert_eq!(reject("launch", &envelope).cmd_id.as_deref(), Some("c9"));
    }

    #[test]
    fn not_utf8() {
        let r = parse_command("pause", b"{\"cmd_id\":\"\xff\"}", None, now()).unwrap_err();
        assert_eq!(
            r,
            Rejection::new(None, "payload is not UTF-8 (invalid byte at offset 11)")
        );
    }

    #[test]
    fn bad_json_says_where() {
        let r = reject("pause", "{\"cmd_id\" \"c1\"}");
        assert_eq!(r.cmd_id, None);
        assert_eq!(
            r.reason,
            "payload is invalid JSON at line 1 column 11: expected `:`"
        );
        let r = reject("pause", "{\"cmd_id\": \"c1\"");
        assert_has(
            &r.reason,
            "invalid JSON at line 1 column 15: EOF while parsing an object",
        );
        assert_has(&reject("pause", "").reason, "payload is empty");
    }

    #[test]
    fn json_that_is_not_an_object() {
        for (payload, got) in [
            ("[{\"cmd_id\":\"c1\"}]", "an array"),
            ("null", "JSON null"),
            ("\"c1\"", "a string"),
            ("42", "a number"),
            ("true", "a boolean"),
        ] {
            let r = reject("pause", payload);
            assert_eq!(
                r.reason,
                format!("payload must be a JSON object, got {got}")
            );
            assert_eq!(r.cmd_id, None);
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_has(&reject("pause", &deep).reason, "recursion limit exceeded");
        let inner = format!(
            "{{\"cmd_id\":\"c1\",\"params\":{{\"x\":{}{}}}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_has(
            &reject("start_run", &inner).reason,
            "recursion limit exceeded",
        );
        let envelope = sign("pause", &deep, KEY);
        let r = parse_command("pause", envelope.as_bytes(), Some(KEY), now()).unwrap_err();
        assert_has(&r.reason, "signed command is invalid JSON");
    }

    #[test]
    fn missing_or_mistyped_cmd_id() {
        let cases = [
            ("{}", "missing `cmd_id`"),
            ("{\"cmd_id\": 7}", "`cmd_id` must be a string, got a number"),
            ("{\"cmd_id\": null}", "`cmd_id` must be a string, got null"),
            ("{\"cmd_id\": \"\"}", "`cmd_id` is empty"),
            ("{\"cmd_id\": \"a/b\"}", "`cmd_id` `a/b` contains '/'"),
            ("{\"cmd_id\": \"a+\"}", "`cmd_id` `a+` contains '+'"),
            ("{\"cmd_id\": \"#\"}", "`cmd_id` `#` contains '#'"),
            ("{\"cmd_id\": \"a b\"}", "contains ' ';"),
        ];
        for (payload, part) in cases {
            let r = reject("pause", payload);
            assert_has(&r.reason, part);
            assert_eq!(r.cmd_id, None, "{payload}");
        }
        let long = json!({"cmd_id": "x".repeat(200)}).to_string();
        let r = reject("pause", &long);
        assert_eq!(
            r.reason,
            "`cmd_id` is too long (200 characters, at most 128)"
        );
        assert_eq!(r.cmd_id, None);
    }

    #[test]
    fn unknown_field_names_it_and_the_expected_ones() {
        let r = reject_c1("start_run", json!({"cmd_id": "c1", "protocl": "p"}));
        assert_eq!(
            r,
            "unknown field `protocl` for start_run; expected one of `cmd_id`, `expires_at`, \
             `protocol`, `protocol_toml`, `params`, `bind`, `operator`"
        );
        let r = reject_c1("abort", json!({"cmd_id": "c1", "reason": "x", "why": "y"}));
        assert_has(&r, "unknown field `why` for abort");
    }

    #[test]
    fn params_must_be_an_object_of_scalars() {
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "params": ["a"]}),
        );
        assert_eq!(
            r,
            "`params` must be an object of names to values, got an array"
        );
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "params": {"temp": {"v": 37}}}),
        );
        assert_eq!(
            r,
            "`params.temp` must be a string, number or boolean, got an object"
        );
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "params": {"temp": null}}),
        );
        assert_has(&r, "got null");
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "params": {"": 1}}),
        );
        assert_has(&r, "`params` has a name of 0 characters");
    }

    #[test]
    fn bind_must_map_roles_to_device_ids() {
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "bind": {"inc": 3}}),
        );
        assert_eq!(r, "`bind.inc` must be a device id string, got a number");
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "bind": {"inc": "dev/1"}}),
        );
        assert_has(&r, "`bind.inc`: device id `dev/1` contains '/'");
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "bind": {"a b": "d"}}),
        );
        assert_has(&r, "`bind`: role `a b` contains");
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "bind": "d"}),
        );
        assert_eq!(
            r,
            "`bind` must be an object of roles to device ids, got a string"
        );
    }

    #[test]
    fn exactly_one_protocol_source() {
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "protocol_toml": "x = 1"}),
        );
        assert_has(&r, "not both");
        let r = reject_c1("start_run", json!({"cmd_id": "c1"}));
        assert_has(&r, "start_run needs `protocol`");
        let r = reject_c1("start_run", json!({"cmd_id": "c1", "protocol": 5}));
        assert_has(&r, "`protocol` must be a string");
        let r = reject_c1("start_run", json!({"cmd_id": "c1", "protocol_toml": " \n"}));
        assert_eq!(r, "`protocol_toml` is empty");
    }

    #[test]
    fn protocol_names_cannot_leave_the_library() {
        for name in ["../etc/passwd", "a/b", "..", ".hidden", "/abs"] {
            let r = reject_c1("start_run", json!({"cmd_id": "c1", "protocol": name}));
            assert_has(&r, "`protocol`");
        }
    }

    #[test]
    fn operator_limits() {
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "operator": "x".repeat(201)}),
        );
        assert_eq!(r, "`operator` is too long (201 characters, at most 200)");
        let r = reject_c1(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "operator": 1}),
        );
        assert_eq!(r, "`operator` must be a string, got a number");
        ok(
            "start_run",
            json!({"cmd_id": "c1", "protocol": "p", "operator": "é".repeat(200)}),
        );
    }

    #[test]
    fn expires_at_garbage_or_wrong_type() {
        for bad in [
            "tomorrow",
            "2023-11-14",
            "2023-11-14T22:14:00",
            "2023-11-14 22:14:00Z",
            "2023-13-14T22:14:00Z",
            "2023-11-14T22:14:00+24:00",
            "2023-11-14T22:14:00+0200",
            "10000-01-01T00:00:00Z",
            "9999-12-31T23:59:59-01:00",
            "1970-01-01T00:00:00+01:00",
            "2023-11-14T22:14:00Zé",
        ] {
            let r = reject_c1("pause", json!({"cmd_id": "c1", "expires_at": bad}));
            assert_has(&r, "`expires_at` is not an RFC 3339 time");
        }
        let r = reject_c1(
            "pause",
            json!({"cmd_id": "c1", "expires_at": 1_700_000_000}),
        );
        assert_eq!(
            r,
            "`expires_at` must be a string (an RFC 3339 time), got a number"
        );
    }

    #[test]
    fn expired_commands_are_refused() {
        let r = reject_c1(
            "stop",
            json!({"cmd_id": "c1", "expires_at": "2023-11-14T22:13:20Z"}),
        );
        assert_eq!(r, "expired at 2023-11-14T22:13:20Z");
        let r = reject_c1(
            "stop",
            json!({"cmd_id": "c1", "expires_at": "2023-11-14T23:00:00+02:00"}),
        );
        assert_eq!(r, "expired at 2023-11-14T21:00:00Z");
        let r = reject_c1(
            "stop",
            json!({"cmd_id": "c1", "expires_at": "1970-01-01T00:00:00Z"}),
        );
        assert!(r.starts_with("expired"));
    }

    #[test]
    fn abort_needs_a_reason() {
        assert_eq!(
            reject_c1("abort", json!({"cmd_id": "c1"})),
            "abort needs `reason` (a string)"
        );
        assert_has(
            &reject_c1("abort", json!({"cmd_id": "c1", "reason": "  "})),
            "`reason` is empty",
        );
        assert_eq!(
            reject_c1("abort", json!({"cmd_id": "c1", "reason": false})),
            "`reason` must be a string, got a boolean"
        );
        assert_eq!(
            reject_c1("abort", json!({"cmd_id": "c1", "reason": "x".repeat(1001)})),
            "`reason` is too long (1001 characters, at most 1000)"
        );
    }

    #[test]
    fn answer_prompt_needs_ids_and_a_response() {
        let r = reject_c1(
            "answer_prompt",
            json!({"cmd_id": "c1", "run_id": "r", "response": "y"}),
        );
        assert_eq!(r, "answer_prompt needs `step_id` (an id string)");
        let r = reject_c1(
            "answer_prompt",
            json!({"cmd_id": "c1", "run_id": "r/1", "step_id": "s", "response": "y"}),
        );
        assert_has(&r, "`run_id` `r/1` contains '/'");
        let r = reject_c1(
            "answer_prompt",
            json!({"cmd_id": "c1", "run_id": "r", "step_id": "s"}),
        );
        assert_eq!(r, "answer_prompt needs `response` (a string)");
        let r = reject_c1(
            "answer_prompt",
            json!({"cmd_id": "c1", "run_id": "r", "step_id": "s", "response": "y".repeat(10_001)}),
        );
        assert_has(&r, "`response` is too long");
    }

    #[test]
    fn ack_alarm_needs_an_alarm_id() {
        assert_eq!(
            reject_c1("ack_alarm", json!({"cmd_id": "c1"})),
            "ack_alarm needs `alarm_id` (an id string)"
        );
        assert_eq!(
            reject_c1("ack_alarm", json!({"cmd_id": "c1", "alarm_id": ""})),
            "`alarm_id` is empty; ids are 1 to 128 ASCII letters, digits, '_', '-', '.' or ':'"
        );
    }

    #[test]
    fn envelope_with_wrong_or_non_hex_signature() {
        let body = r#"{"cmd_id":"c1","expires_at":"2023-11-15T00:00:00Z"}"#;
        let good: Value = serde_json::from_str(&sign("pause", body, KEY)).unwrap();
        let wrong = sign("pause", "{\"cmd_id\":\"c1\"}", b"another key of 16+ bytes");
        let r = parse_command("pause", wrong.as_bytes(), Some(KEY), now()).unwrap_err();
        assert_eq!(r, Rejection::new(Some("c1".into()), "bad signature"));
        for sig in [
            json!("zz".repeat(32)),
            json!("ab"),
            json!(""),
            json!("AB".repeat(33)),
        ] {
            let env = json!({"signed": good["signed"], "sig": sig}).to_string();
            let r = parse_command("pause", env.as_bytes(), Some(KEY), now()).unwrap_err();
            assert_eq!(r.reason, "bad signature");
        }
        // Uppercase hex of the right MAC is still the right MAC.
        let upper =
            json!({"signed": good["signed"], "sig": good["sig"].as_str().unwrap().to_uppercase()});
        assert!(parse_command("pause", upper.to_string().as_bytes(), Some(KEY), now()).is_ok());
        // A tampered body fails.
        let env = json!({"signed": "{\"cmd_id\":\"c2\"}", "sig": good["sig"]}).to_string();
        let r = parse_command("pause", env.as_bytes(), Some(KEY), now()).unwrap_err();
        assert_eq!(r, Rejection::new(Some("c2".into()), "bad signature"));
    }

    #[test]
    fn malformed_envelopes() {
        let cases = [
            (
                json!({"signed": "{}", "sig": "00", "x": 1}),
                "unknown field `x` in signed envelope",
            ),
            (
                json!({"signed": {"cmd_id": "c1"}, "sig": "00"}),
                "`signed` must be a string",
            ),
            (json!({"signed": "{}", "sig": 0}), "`sig` must be a string"),
            (json!({"sig": "00"}), "no `signed`"),
            (json!({"signed": "{}"}), "no `sig`"),
        ];
        for (env, part) in cases {
            let r =
                parse_command("pause", env.to_string().as_bytes(), Some(KEY), now()).unwrap_err();
            assert_has(&r.reason, part);
        }
    }

    #[test]
    fn unsigned_command_when_a_key_is_required() {
        let r = parse_command("pause", b"{\"cmd_id\":\"c1\"}", Some(KEY), now()).unwrap_err();
        assert_eq!(
            r,
            Rejection::new(
                Some("c1".into()),
                "unsigned command: this controller requires an HMAC-SHA256 signature (see docs/mqtt.md)"
            )
        );
    }

    #[test]
    fn envelope_without_a_key() {
        let envelope = sign("pause", "{\"cmd_id\":\"c1\"}", KEY);
        let r = reject("pause", &envelope);
        assert_eq!(
            r,
            Rejection::new(
                Some("c1".into()),
                "signed command, but this controller has no command key configured"
            )
        );
        // Even a lone `sig` marks an envelope, so it is never run unsigned.
        let r = reject("pause", "{\"cmd_id\":\"c1\",\"sig\":\"00\"}");
        assert_eq!(r.reason, NO_KEY);
    }

    #[test]
    fn rejection_displays_its_reason() {
        let r = reject("pause", "{}");
        assert_eq!(r.to_string(), r.reason);
    }

    #[test]
    fn reasons_quote_client_strings_briefly() {
        let field = format!("{}\n", "f".repeat(500));
        let r = reject_c1("pause", json!({"cmd_id": "c1", field: 1}));
        assert!(r.len() < 200, "{r}");
        assert!(!r.contains('\n'));
    }

    // ---- key files -----------------------------------------------------

    #[test]
    fn key_file_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cmd.key");
        std::fs::write(&path, "0123456789abcdef\r\n \n").unwrap();
        assert_eq!(load_command_key(&path).unwrap(), b"0123456789abcdef");
        std::fs::write(&path, "short\n").unwrap();
        let e = load_command_key(&path).unwrap_err();
        assert_has(&e, &path.display().to_string());
        assert_has(&e, "at least 16");
        let missing = dir.path().join("missing.key");
        let e = load_command_key(&missing).unwrap_err();
        assert_has(&e, &missing.display().to_string());
        std::fs::write(&path, vec![b'k'; 70_000]).unwrap();
        assert_has(&load_command_key(&path).unwrap_err(), "too large");
    }

    // ---- never panics ------------------------------------------------

    fn verb_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(Verb::ALL.map(Verb::name).to_vec()).prop_map(String::from),
            1 => ".{0,12}",
        ]
    }

    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => proptest::sample::select(vec![
                "cmd_id", "expires_at", "protocol", "protocol_toml", "params", "bind",
                "operator", "reason", "run_id", "step_id", "response", "alarm_id", "signed", "sig",
            ])
            .prop_map(String::from),
            1 => ".{0,8}",
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[a-z0-9_./:#+ -]{0,20}".prop_map(Value::String),
            "20[0-9]{2}-[01][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{0,12})?([Zz]|[+-][0-9]{2}:[0-9]{2})?.?"
                .prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::vec((field_name(), inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn command_object() -> impl Strategy<Value = Value> {
        (
            prop_oneof![Just(json!("c1")), json_value()],
            proptest::collection::vec((field_name(), json_value()), 0..6),
        )
            .prop_map(|(cmd_id, fields)| {
                let mut map: Map<String, Value> = fields.into_iter().collect();
                map.insert("cmd_id".into(), cmd_id);
                Value::Object(map)
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            verb in verb_strategy(),
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            keyed in any::<bool>(),
        ) {
            let _ = parse_command(&verb, &bytes, keyed.then_some(KEY), now());
        }

        #[test]
        fn json_ish_text_never_panics(
            verb in verb_strategy(),
            text in "[\\[\\]{}\",:0-9a-z_ .\\\\+-]{0,300}",
            keyed in any::<bool>(),
        ) {
            let _ = parse_command(&verb, text.as_bytes(), keyed.then_some(KEY), now());
        }

        #[test]
        fn structured_commands_never_panic(
            verb in verb_strategy(),
            body in command_object(),
            keyed in any::<bool>(),
            signed in any::<bool>(),
            secs in any::<u64>(),
        ) {
            let body = body.to_string();
            let payload = if signed { sign(&verb, &body, KEY) } else { body.clone() };
            // Any `now`, including ones humantime could not format.
            let now = UNIX_EPOCH.checked_add(Duration::from_secs(secs)).unwrap_or(UNIX_EPOCH);
            let result = parse_command(&verb, payload.as_bytes(), keyed.then_some(KEY), now);
            // A signed body parses like the same body unsigned without a key,
            // but for the expiry a signed command must have.
            if signed && keyed {
                let plain = parse_command(&verb, body.as_bytes(), None, now);
                match (&result, &plain) {
                    (Ok(_), Ok(_)) | (Err(_), Err(_)) => {}
                    (Err(r), Ok(c)) => prop_assert!(
                        r.reason.contains("expires_at")
                            && c.expires_at.is_none_or(|at| now.checked_add(COMMAND_MEMORY).is_some_and(|last| at > last)),
                        "{:?}", r
                    ),
                    (Ok(_), Err(r)) => prop_assert!(false, "signed passed, plain refused: {:?}", r),
                }
            }
        }
    }
}
