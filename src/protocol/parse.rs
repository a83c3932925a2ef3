//! TOML text -> [`Protocol`], collecting every problem as a [`Diagnostic`].
//!
//! The document is read with toml's spanned `DeTable`, so every value keeps
//! its byte range; typed extraction then walks the tables by hand rather than
//! through serde, which lets one pass report all errors with exact places,
//! "did you mean" hints for unknown keys, and parameter substitution at each use.

use super::condition::parse_condition;
use super::model::*;
use super::wells::{MAX_SELECTION_WELLS, parse_selection, resolve_at_most};
use crate::catalogue::{
    ActionSpec, ArgSpec, ArgType, BUILTIN_ACTIONS, COMMON_STEP_KEYS, DeviceKind, ERROR_POLICIES,
    VIOLATION_POLICIES,
};
use crate::diagnostics::{Diagnostic, did_you_mean};
use crate::labware::{builtin, opentrons};
use crate::source::{SourceFile, Sp, Span};
use crate::units::{Dimension, Quantity, parse_limits, parse_quantity};
use indexmap::IndexMap;
use std::collections::HashSet;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

type Value<'a> = Spanned<DeValue<'a>>;

/// Largest protocol file accepted, so a runaway generator cannot exhaust memory.
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// Most repetitions of one step.
pub const MAX_REPEAT: i64 = 100_000;
/// Most text `${name}` substitution may produce in one protocol, in bytes. A
/// parameter may be used many times, so without a bound a 1 MiB file (a
/// `start_run` from MES) could expand to many GiB and exhaust memory.
pub const MAX_SUBSTITUTED_BYTES: usize = MAX_FILE_BYTES;
/// Most wells all the well selections and `contents` keys of one protocol may
/// name together (each selection at most [`MAX_SELECTION_WELLS`]).
pub const MAX_PROTOCOL_WELLS: usize = 4_000_000;

/// Longest monitor id (it is part of MQTT alarm topics).
const MAX_MONITOR_ID_CHARS: usize = 64;

const TOO_MANY_WELLS_HINT: &str =
    "a list may repeat wells, but not without bound: split the work over several steps";

/// A parameter value given outside the file (`--param name=value`, or by MES).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamOverride {
    pub name: String,
    pub value: String,
}

impl std::str::FromStr for ParamOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => Ok(ParamOverride {
                name: name.trim().to_string(),
                value: value.trim().to_string(),
            }),
            _ => Err(format!("`{s}` is not name=value")),
        }
    }
}

/// Parses a protocol. Returns the protocol (best effort: steps whose action
/// could not be read are [`Action::Invalid`]) and every diagnostic found; the
/// protocol is `None` only when the text is not TOML at all.
pub fn parse(
    file: Arc<SourceFile>,
    overrides: &[ParamOverride],
) -> (Option<Protocol>, Vec<Diagnostic>) {
    parse_within(file, overrides, MAX_PROTOCOL_WELLS)
}

/// [`parse`] with a well budget (smaller in tests).
fn parse_within(
    file: Arc<SourceFile>,
    overrides: &[ParamOverride],
    wells_budget: usize,
) -> (Option<Protocol>, Vec<Diagnostic>) {
    if file.text.len() > MAX_FILE_BYTES {
        return (
            None,
            vec![Diagnostic::error(
                "file-too-large",
                Span::new(0, 0),
                format!(
                    "the file is {} MiB; protocols may be at most {} MiB",
                    file.text.len() >> 20,
                    MAX_FILE_BYTES >> 20
                ),
            )],
        );
    }
    let (root, errors) = DeTable::parse_recoverable(&file.text);
    if !errors.is_empty() {
        let diags = errors
            .iter()
            .map(|e| {
                let span = e.span().map(Span::from).unwrap_or_default();
                Diagnostic::error("toml-syntax", span, e.message().trim().to_string())
                    .with_hint("the file must be TOML (https://toml.io): `key = value` lines, strings in double quotes, [tables] and [[arrays of tables]]")
            })
            .collect();
        return (None, diags);
    }
    let base_dir = file
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut p = Parser {
        text: &file.text,
        diags: Vec::new(),
        params: IndexMap::new(),
        devices: IndexMap::new(),
        labware: IndexMap::new(),
        role_uses: Vec::new(),
        base_dir,
        broken_roles: HashSet::new(),
        broken_labware: HashSet::new(),
        substituted_left: MAX_SUBSTITUTED_BYTES,
        substituted_over: false,
        wells_left: wells_budget,
        wells_budget,
    };
    let protocol = p.document(root.get_ref(), overrides, Arc::clone(&file));
    (Some(protocol), p.diags)
}

struct Parser<'t> {
    text: &'t str,
    diags: Vec<Diagnostic>,
    params: IndexMap<String, Param>,
    devices: IndexMap<String, DeviceRole>,
    labware: IndexMap<String, Labware>,
    role_uses: Vec<Sp<String>>,
    base_dir: PathBuf,
    /// Roles and labware whose declaration was wrong (already reported): their
    /// uses are not reported again.
    broken_roles: HashSet<String>,
    broken_labware: HashSet<String>,
    /// Bytes `${name}` substitution may still produce ([`MAX_SUBSTITUTED_BYTES`]).
    substituted_left: usize,
    /// The bound was reached (and reported).
    substituted_over: bool,
    /// Wells selections may still name, of `wells_budget` ([`MAX_PROTOCOL_WELLS`]).
    wells_left: usize,
    wells_budget: usize,
}

/// A string value after `${param}` substitution.
struct Text {
    value: String,
    span: Span,
    /// Where substituted values came from, for messages.
    origin: Option<String>,
    /// The parameter's own value when the whole string was one `${name}`.
    exact: Option<ParamValue>,
    /// File offset of the string's first character, when the text is exactly
    /// what the file says (no escapes, no substitution), so parts of it can be pointed at.
    literal_at: Option<usize>,
}

impl Text {
    fn sub_span(&self, range: Range<usize>) -> Span {
        match self.literal_at {
            Some(at) => Span::new(at + range.start, at + range.end),
            None => self.span,
        }
    }

    fn note(&self, message: String) -> String {
        match &self.origin {
            Some(o) => format!("{message} (from {o})"),
            None => message,
        }
    }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a number",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn span_of<T>(v: &Spanned<T>) -> Span {
    Span::from(v.span())
}

fn to_i64(v: &DeValue<'_>) -> Option<i64> {
    match v {
        DeValue::Integer(i) => {
            let digits: String = i.as_str().chars().filter(|c| *c != '_').collect();
            i64::from_str_radix(&digits, i.radix()).ok()
        }
        _ => None,
    }
}

fn to_f64(v: &DeValue<'_>) -> Option<f64> {
    match v {
        DeValue::Float(f) => f.as_str().replace('_', "").parse().ok(),
        DeValue::Integer(_) => to_i64(v).map(|i| i as f64),
        _ => None,
    }
}

const TOP_KEYS: &[&str] = &[
    "format", "protocol", "params", "devices", "labware", "step", "monitor",
];
const PROTOCOL_KEYS: &[&str] = &[
    "name",
    "version",
    "description",
    "authors",
    "on_error",
    "retries",
];
const LABWARE_KEYS: &[&str] = &["type", "definition", "at", "contents", "note"];
const MONITOR_KEYS: &[&str] = &[
    "id",
    "device",
    "read",
    "every",
    "limits",
    "on_violation",
    "after",
    "until",
];
const DEVICE_KEYS: &[&str] = &["kind", "at"];

/// Default attempts for `on_error = "retry"` when `retries` is not given.
pub const DEFAULT_RETRIES: u32 = 3;

impl<'t> Parser<'t> {
    fn error(
        &mut self,
        code: &'static str,
        span: Span,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.diags.push(Diagnostic::error(code, span, message));
        let last = self.diags.len() - 1;
        &mut self.diags[last]
    }

    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn document(
        &mut self,
        root: &DeTable<'_>,
        overrides: &[ParamOverride],
        file: Arc<SourceFile>,
    ) -> Protocol {
        let clean_root = self.check_keys(root, TOP_KEYS, "the protocol file");
        match root.get("format") {
            None => {
                self.error(
                    "missing-format",
                    Span::new(0, 0),
                    "the file does not say its format",
                )
                .hint = Some(format!("start the file with format = \"{FORMAT}\""));
            }
            Some(v) => {
                if let Some(t) = self.plain_string(v, "format")
                    && t.value != FORMAT
                {
                    self.error(
                        "unsupported-format",
                        t.span,
                        format!("unsupported format `{}`", t.value),
                    )
                    .hint = Some(format!("this controller reads format = \"{FORMAT}\""));
                }
            }
        }

        // [params] first: every other value may use them.
        if let Some(v) = root.get("params") {
            self.params_table(v, overrides);
        } else {
            self.apply_overrides(overrides, Span::new(0, 0));
        }

        let mut name = String::new();
        let mut version = None;
        let mut description = None;
        let mut authors = Vec::new();
        let mut on_error = ErrorPolicy::Hold;
        let mut default_retries = DEFAULT_RETRIES;
        match root.get("protocol") {
            None if !clean_root => {}
            None => {
                self.error(
                    "missing-section",
                    Span::new(0, 0),
                    "the file has no [protocol] table",
                )
                .hint = Some("add [protocol] with at least name = \"...\"".into());
            }
            Some(v) => {
                if let Some(t) = self.table(v, "[protocol]") {
                    let clean = self.check_keys(t, PROTOCOL_KEYS, "[protocol]");
                    match t.get("name") {
                        Some(n) => name = self.text(n, "name").map(|t| t.value).unwrap_or_default(),
                        None if !clean => {}
                        None => {
                            self.error("missing-key", span_of(v), "[protocol] needs a `name`")
                                .hint = Some("name = \"Serial dilution 1:2\"".into());
                        }
                    }
                    version = t
                        .get("version")
                        .and_then(|v| self.text(v, "version"))
                        .map(|t| t.value);
                    description = t
                        .get("description")
                        .and_then(|v| self.text(v, "description"))
                        .map(|t| t.value);
                    if let Some(a) = t.get("authors") {
                        authors = self
                            .string_list(a, "authors")
                            .unwrap_or_default()
                            .into_iter()
                            .map(|s| s.value)
                            .collect();
                    }
                    if let Some(p) = t.get("on_error")
                        && let Some(c) = self.choice(p, ERROR_POLICIES, "on_error")
                    {
                        on_error = ErrorPolicy::from_name(c.value).unwrap_or(ErrorPolicy::Hold);
                    }
                    if let Some(r) = t.get("retries")
                        && let Some(n) = self.integer(r, 0, 100, "retries")
                    {
                        default_retries = n.value as u32;
                    }
                }
            }
        }

        if let Some(v) = root.get("devices") {
            self.devices_table(v);
        }
        if let Some(v) = root.get("labware") {
            self.labware_table(v);
        }
        let mut steps = Vec::new();
        if let Some(v) = root.get("step") {
            match &v.get_ref() {
                DeValue::Array(items) => {
                    for (index, item) in items.iter().enumerate() {
                        if let Some(step) = self.step(index, item, on_error, default_retries) {
                            steps.push(step);
                        }
                    }
                }
                other => {
                    self.error(
                        "wrong-type",
                        span_of(v),
                        format!(
                            "`step` must be an array of tables, found {}",
                            type_name(other)
                        ),
                    )
                    .hint = Some("write each step as [[step]]".into());
                }
            }
        }
        let mut monitors = Vec::new();
        if let Some(v) = root.get("monitor") {
            match &v.get_ref() {
                DeValue::Array(items) => {
                    for (index, item) in items.iter().enumerate() {
                        if let Some(m) = self.monitor(index, item) {
                            monitors.push(m);
                        }
                    }
                }
                other => {
                    self.error(
                        "wrong-type",
                        span_of(v),
                        format!(
                            "`monitor` must be an array of tables, found {}",
                            type_name(other)
                        ),
                    )
                    .hint = Some("write each monitor as [[monitor]]".into());
                }
            }
        }

        Protocol {
            file,
            name,
            version,
            description,
            authors,
            on_error,
            params: std::mem::take(&mut self.params),
            devices: std::mem::take(&mut self.devices),
            labware: std::mem::take(&mut self.labware),
            steps,
            monitors,
            role_uses: std::mem::take(&mut self.role_uses),
        }
    }

    // ---- generic value helpers -------------------------------------------------

    /// Reports keys not in `allowed`; returns whether all were known. A table with
    /// a misspelt key reports no "missing key" as well: the misspelling is the one
    /// mistake.
    fn check_keys(&mut self, table: &DeTable<'_>, allowed: &[&str], context: &str) -> bool {
        let mut clean = true;
        for key in table.keys() {
            let k: &str = key.get_ref();
            if !allowed.contains(&k) {
                let hint = did_you_mean(k, allowed.iter().copied())
                    .unwrap_or_else(|| format!("{context} accepts: {}", allowed.join(", ")));
                self.error(
                    "unknown-key",
                    span_of(key),
                    format!("unknown key `{k}` in {context}"),
                )
                .hint = Some(hint);
                clean = false;
            }
        }
        clean
    }

    fn table<'v, 'i>(&mut self, v: &'v Value<'i>, what: &str) -> Option<&'v DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            other => {
                self.error(
                    "wrong-type",
                    span_of(v),
                    format!("{what} must be a table, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// A string value without parameter substitution (for `format`).
    fn plain_string(&mut self, v: &Value<'_>, what: &str) -> Option<Text> {
        match v.get_ref() {
            DeValue::String(s) => Some(Text {
                value: s.to_string(),
                span: span_of(v),
                origin: None,
                exact: None,
                literal_at: self.literal_at(span_of(v), s),
            }),
            other => {
                self.error(
                    "wrong-type",
                    span_of(v),
                    format!("`{what}` must be a string, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn literal_at(&self, span: Span, content: &str) -> Option<usize> {
        let raw = self.text.get(span.start..span.end)?;
        let inner = raw
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .or_else(|| raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))?;
        (inner == content).then_some(span.start + 1)
    }

    /// A string value with `${name}` replaced by parameters.
    fn text(&mut self, v: &Value<'_>, what: &str) -> Option<Text> {
        let raw = self.plain_string(v, what)?;
        self.substitute(raw)
    }

    fn substitute(&mut self, raw: Text) -> Option<Text> {
        if !raw.value.contains("${") {
            return Some(raw);
        }
        let mut out = String::new();
        let mut origins = Vec::new();
        let mut rest: &str = &raw.value;
        let mut consumed = 0;
        let mut exact = None;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                let span = raw.sub_span(consumed + start..raw.value.len());
                self.error("bad-substitution", span, "`${` is not closed with `}`")
                    .hint = Some("write ${name} to use a parameter from [params]".into());
                return None;
            };
            let name = after[..end].trim();
            let span = raw.sub_span(consumed + start..consumed + start + 2 + end + 1);
            match self.params.get_mut(name) {
                Some(param) => {
                    param.used = true;
                    let value = &param.value;
                    if start == 0 && end + 3 == rest.len() && consumed == 0 {
                        exact = Some(value.clone());
                    }
                    let text = match value {
                        ParamValue::Text(s) => std::borrow::Cow::Borrowed(s.as_str()),
                        other => std::borrow::Cow::Owned(other.to_string()),
                    };
                    if self.substituted_over {
                        return None;
                    }
                    if text.len() > self.substituted_left {
                        self.error(
                            "bad-substitution",
                            span,
                            format!(
                                "parameters expand this protocol to more than {} MiB of text",
                                MAX_SUBSTITUTED_BYTES >> 20
                            ),
                        )
                        .hint = Some("use long parameters fewer times".into());
                        // Reported once: every later use fails quietly.
                        self.substituted_over = true;
                        return None;
                    }
                    self.substituted_left -= text.len();
                    out.push_str(&text);
                    // Once per parameter, however often the string uses it.
                    let origin = param.origin();
                    if !origins.contains(&origin) {
                        origins.push(origin);
                    }
                }
                None => {
                    let hint = did_you_mean(name, self.params.keys().map(String::as_str))
                        .unwrap_or_else(|| {
                            if self.params.is_empty() {
                                "declare it in a [params] table".into()
                            } else {
                                format!(
                                    "declared parameters: {}",
                                    self.params.keys().cloned().collect::<Vec<_>>().join(", ")
                                )
                            }
                        });
                    self.error("unknown-param", span, format!("unknown parameter `{name}`"))
                        .hint = Some(hint);
                    return None;
                }
            }
            consumed += start + 2 + end + 1;
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Some(Text {
            value: out,
            span: raw.span,
            origin: Some(origins.join(", ")),
            exact,
            literal_at: None,
        })
    }

    fn quantity(
        &mut self,
        v: &Value<'_>,
        dimension: Dimension,
        what: &str,
    ) -> Option<Sp<Quantity>> {
        let span = span_of(v);
        let number = match v.get_ref() {
            DeValue::Integer(_) | DeValue::Float(_) => to_f64(v.get_ref()).map(|n| (n, None)),
            DeValue::String(_) => {
                let t = self.text(v, what)?;
                match &t.exact {
                    Some(ParamValue::Integer(i)) => Some((*i as f64, t.origin.clone())),
                    Some(ParamValue::Float(f)) => Some((*f, t.origin.clone())),
                    _ => {
                        return match parse_quantity(&t.value, dimension) {
                            Ok(q) => Some(Sp::new(q, span)),
                            Err(e) => {
                                let hint = e.hint();
                                let message = t.note(format!("`{what}`: {e}"));
                                self.error("bad-quantity", span, message).hint = Some(hint);
                                None
                            }
                        };
                    }
                }
            }
            other => {
                self.error(
                    "wrong-type",
                    span,
                    format!(
                        "`{what}` must be a {}, e.g. {}, found {}",
                        dimension.name(),
                        dimension.example(),
                        type_name(other)
                    ),
                );
                return None;
            }
        };
        let (n, origin) = number?;
        let note = |m: String| match &origin {
            Some(o) => format!("{m} (from {o})"),
            None => m,
        };
        if !dimension.accepts_bare_number() {
            let message = note(format!(
                "`{what}`: {} needs a unit, e.g. {}",
                dimension.name(),
                dimension.example()
            ));
            self.error("bad-quantity", span, message).hint = Some(format!(
                "units of {}: {}",
                dimension.name(),
                dimension.units()
            ));
            return None;
        }
        if !n.is_finite() || n < 0.0 {
            let message = note(format!("`{what}` must be a finite, non-negative number"));
            self.error("bad-quantity", span, message);
            return None;
        }
        Some(Sp::new(Quantity::new(n, dimension), span))
    }

    fn positive(&mut self, q: &Sp<Quantity>, what: &str) -> bool {
        if q.value.value > 0.0 {
            return true;
        }
        self.error(
            "not-positive",
            q.span,
            format!("`{what}` must be more than zero"),
        );
        false
    }

    fn integer(&mut self, v: &Value<'_>, min: i64, max: i64, what: &str) -> Option<Sp<i64>> {
        let span = span_of(v);
        let (n, origin) = match v.get_ref() {
            DeValue::Integer(_) => (to_i64(v.get_ref()), None),
            DeValue::String(_) => {
                let t = self.text(v, what)?;
                let n = match &t.exact {
                    Some(ParamValue::Integer(i)) => Some(*i),
                    _ => t.value.trim().parse::<i64>().ok(),
                };
                if n.is_none() {
                    let message = t.note(format!(
                        "`{what}` must be a whole number, found \"{}\"",
                        t.value
                    ));
                    self.error("wrong-type", span, message);
                    return None;
                }
                (n, t.origin)
            }
            other => {
                self.error(
                    "wrong-type",
                    span,
                    format!(
                        "`{what}` must be a whole number, found {}",
                        type_name(other)
                    ),
                );
                return None;
            }
        };
        let Some(n) = n else {
            self.error("wrong-type", span, format!("`{what}` is too large"));
            return None;
        };
        if n < min || n > max {
            let message = format!("`{what}` must be between {min} and {max}, not {n}");
            let message = match origin {
                Some(o) => format!("{message} (from {o})"),
                None => message,
            };
            self.error("out-of-range", span, message);
            return None;
        }
        Some(Sp::new(n, span))
    }

    fn boolean(&mut self, v: &Value<'_>, what: &str) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            DeValue::String(_) => {
                let t = self.text(v, what)?;
                match (&t.exact, t.value.as_str()) {
                    (Some(ParamValue::Bool(b)), _) => Some(*b),
                    (_, "true") => Some(true),
                    (_, "false") => Some(false),
                    _ => {
                        let message = t.note(format!("`{what}` must be true or false"));
                        self.error("wrong-type", t.span, message);
                        None
                    }
                }
            }
            other => {
                self.error(
                    "wrong-type",
                    span_of(v),
                    format!("`{what}` must be true or false, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn choice(
        &mut self,
        v: &Value<'_>,
        options: &'static [&'static str],
        what: &str,
    ) -> Option<Sp<&'static str>> {
        let t = self.text(v, what)?;
        match options.iter().find(|o| **o == t.value) {
            Some(o) => Some(Sp::new(*o, t.span)),
            None => {
                let hint = did_you_mean(&t.value, options.iter().copied())
                    .unwrap_or_else(|| format!("one of: {}", options.join(", ")));
                let message = t.note(format!("`{what}` cannot be \"{}\"", t.value));
                self.error("bad-choice", t.span, message).hint = Some(hint);
                None
            }
        }
    }

    /// An array of strings; a single string is taken as a list of one.
    fn string_list(&mut self, v: &Value<'_>, what: &str) -> Option<Vec<Sp<String>>> {
        match v.get_ref() {
            DeValue::String(_) => self.text(v, what).map(|t| vec![Sp::new(t.value, t.span)]),
            DeValue::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items.iter() {
                    out.push(self.text(item, what).map(|t| Sp::new(t.value, t.span))?);
                }
                Some(out)
            }
            other => {
                self.error(
                    "wrong-type",
                    span_of(v),
                    format!(
                        "`{what}` must be a list of strings, found {}",
                        type_name(other)
                    ),
                );
                None
            }
        }
    }

    fn role_ref(&mut self, role: &str, span: Span) -> Option<DeviceKind> {
        self.role_uses.push(Sp::new(role.to_string(), span));
        if let Some(d) = self.devices.get(role) {
            return Some(d.kind);
        }
        if self.broken_roles.contains(role) {
            return None;
        }
        let hint =
            did_you_mean(role, self.devices.keys().map(String::as_str)).unwrap_or_else(|| {
                format!("declare it in [devices], e.g. {role} = \"liquid_handler\"")
            });
        self.error(
            "unknown-role",
            span,
            format!("role `{role}` is not declared in [devices]"),
        )
        .hint = Some(hint);
        None
    }

    fn location(&mut self, t: &Text) -> Option<Sp<Location>> {
        let bad = |p: &mut Self, msg: String| {
            p.error("bad-location", t.span, t.note(msg)).hint =
                Some("write `<role>:<slot>`, e.g. \"lh:3\"".into());
        };
        let Some((role, slot)) = t.value.split_once(':') else {
            bad(self, format!("`{}` is not a place", t.value));
            return None;
        };
        let Ok(slot) = slot.trim().parse::<u32>() else {
            bad(self, format!("`{slot}` is not a slot number"));
            return None;
        };
        let role = role.trim();
        let role_span = t.sub_span(0..role.len());
        self.role_ref(role, role_span)?;
        Some(Sp::new(
            Location {
                role: role.to_string(),
                slot,
            },
            t.span,
        ))
    }

    fn labware_ref(&mut self, name: &str, span: Span) -> bool {
        if self.labware.contains_key(name) {
            return true;
        }
        if self.broken_labware.contains(name) {
            return false;
        }
        let hint = did_you_mean(name, self.labware.keys().map(String::as_str))
            .unwrap_or_else(|| format!("declare it as [labware.{name}] with a type and a place"));
        self.error(
            "unknown-labware",
            span,
            format!("no labware named `{name}`"),
        )
        .hint = Some(hint);
        false
    }

    fn wells(&mut self, v: &Value<'_>, what: &str) -> Option<WellSet> {
        let t = self.text(v, what)?;
        let selection = match parse_selection(&t.value) {
            Ok(s) => s,
            Err(e) => {
                let span = t.sub_span(e.range);
                self.error("bad-wells", span, t.note(e.message)).hint =
                    Some("wells: `plate:A1`, a range `plate:A1:H12`, a list `plate:A1,B3`, or `plate:quadrant(1)`".into());
                return None;
            }
        };
        let name_span = t.sub_span(0..selection.labware.len());
        if !self.labware_ref(&selection.labware, name_span) {
            return None;
        }
        let definition = Arc::clone(&self.labware[&selection.labware].definition);
        match self.resolve_wells(&selection, &definition) {
            Ok(wells) => Some(WellSet {
                labware: selection.labware,
                wells,
                span: t.span,
            }),
            Err(Some(e)) if e.too_many => {
                let span = t.sub_span(e.range);
                self.error("bad-wells", span, t.note(e.message)).hint =
                    Some(TOO_MANY_WELLS_HINT.into());
                None
            }
            Err(Some(e)) => {
                let span = t.sub_span(e.range);
                self.error("well-outside", span, t.note(e.message)).hint = Some(format!(
                    "`{}` is {}",
                    selection.labware, definition.load_name
                ));
                None
            }
            Err(None) => None,
        }
    }

    /// Resolves a selection within the protocol's well budget
    /// ([`MAX_PROTOCOL_WELLS`]). `Err(None)`: the budget was already used up and
    /// reported; nothing more is said.
    fn resolve_wells(
        &mut self,
        selection: &super::wells::WellSelection,
        definition: &crate::labware::LabwareDefinition,
    ) -> Result<Vec<String>, Option<super::wells::WellRangeError>> {
        if self.wells_left == 0 {
            return Err(None);
        }
        let max = MAX_SELECTION_WELLS.min(self.wells_left);
        match resolve_at_most(selection, definition, max) {
            Ok(wells) => {
                self.wells_left -= wells.len();
                Ok(wells)
            }
            Err(mut e) if e.too_many && max < MAX_SELECTION_WELLS => {
                e.message = format!(
                    "the protocol's well selections name more than {} wells in all",
                    self.wells_budget
                );
                self.wells_left = 0;
                Err(Some(e))
            }
            Err(e) => Err(Some(e)),
        }
    }

    // ---- sections -------------------------------------------------------------------

    fn params_table(&mut self, v: &Value<'_>, overrides: &[ParamOverride]) {
        let span = span_of(v);
        if let Some(t) = self.table(v, "[params]") {
            for (key, value) in t.iter() {
                let name = key.get_ref().to_string();
                let pv = match value.get_ref() {
                    DeValue::String(s) => {
                        if s.contains("${") {
                            self.error(
                                "bad-param",
                                span_of(value),
                                "a parameter cannot use other parameters",
                            );
                            continue;
                        }
                        ParamValue::Text(s.to_string())
                    }
                    DeValue::Integer(_) => match to_i64(value.get_ref()) {
                        Some(i) => ParamValue::Integer(i),
                        None => {
                            self.error("bad-param", span_of(value), "the integer is too large");
                            continue;
                        }
                    },
                    DeValue::Float(_) => match to_f64(value.get_ref()).filter(|f| f.is_finite()) {
                        Some(f) => ParamValue::Float(f),
                        None => {
                            self.error(
                                "bad-param",
                                span_of(value),
                                "a parameter must be a finite number",
                            );
                            continue;
                        }
                    },
                    DeValue::Boolean(b) => ParamValue::Bool(*b),
                    other => {
                        self.error(
                            "bad-param",
                            span_of(value),
                            format!(
                                "a parameter is a string, number or boolean, not {}",
                                type_name(other)
                            ),
                        )
                        .hint = Some("e.g. volume = \"100 uL\" or cycles = 3".into());
                        continue;
                    }
                };
                self.params.insert(
                    name.clone(),
                    Param {
                        name,
                        default: pv.clone(),
                        value: pv,
                        overridden: false,
                        span: span_of(value),
                        used: false,
                    },
                );
            }
        }
        self.apply_overrides(overrides, span);
    }

    fn apply_overrides(&mut self, overrides: &[ParamOverride], params_span: Span) {
        for o in overrides {
            let Some(param) = self.params.get_mut(&o.name) else {
                let hint = did_you_mean(&o.name, self.params.keys().map(String::as_str))
                    .unwrap_or_else(|| {
                        if self.params.is_empty() {
                            "this protocol declares no parameters".into()
                        } else {
                            format!(
                                "declared parameters: {}",
                                self.params.keys().cloned().collect::<Vec<_>>().join(", ")
                            )
                        }
                    });
                self.error(
                    "unknown-param",
                    params_span,
                    format!(
                        "--param {}: the protocol has no parameter `{}`",
                        o.name, o.name
                    ),
                )
                .hint = Some(hint);
                continue;
            };
            match override_value(&param.default, &o.value) {
                Ok(v) => {
                    param.value = v;
                    param.overridden = true;
                }
                Err(expected) => {
                    let span = param.span;
                    let message = format!("--param {}={}: {expected}", o.name, o.value);
                    self.error("bad-param", span, message).hint =
                        Some(format!("the default declared here is {}", param.default));
                }
            }
        }
    }

    fn devices_table(&mut self, v: &Value<'_>) {
        let Some(t) = self.table(v, "[devices]") else {
            return;
        };
        let mut placements = Vec::new();
        for (key, value) in t.iter() {
            let role: &str = key.get_ref();
            let key_span = span_of(key);
            if !valid_name(role) {
                self.error(
                    "bad-name",
                    key_span,
                    format!("`{role}` cannot be a role name"),
                )
                .hint =
                    Some("use letters, digits and _ (it is written as `<role>.<action>`)".into());
                self.broken_roles.insert(role.to_string());
                continue;
            }
            let (kind_value, at) = match value.get_ref() {
                DeValue::Table(inline) => {
                    let clean = self.check_keys(inline, DEVICE_KEYS, &format!("device `{role}`"));
                    let Some(k) = inline.get("kind") else {
                        self.broken_roles.insert(role.to_string());
                        if !clean {
                            continue;
                        }
                        self.error(
                            "missing-key",
                            span_of(value),
                            format!("device `{role}` needs a `kind`"),
                        );
                        continue;
                    };
                    (k, inline.get("at"))
                }
                _ => (value, None),
            };
            let Some(kind_text) = self.text(kind_value, "kind") else {
                self.broken_roles.insert(role.to_string());
                continue;
            };
            let Some(kind) = DeviceKind::from_name(&kind_text.value) else {
                self.broken_roles.insert(role.to_string());
                let names = DeviceKind::ALL.map(DeviceKind::name);
                let hint = did_you_mean(&kind_text.value, names)
                    .unwrap_or_else(|| format!("kinds: {}", names.join(", ")));
                self.error(
                    "unknown-kind",
                    kind_text.span,
                    format!("unknown device kind `{}`", kind_text.value),
                )
                .hint = Some(hint);
                continue;
            };
            self.devices.insert(
                role.to_string(),
                DeviceRole {
                    name: role.to_string(),
                    kind,
                    span: key_span,
                    on_deck: None,
                },
            );
            if let Some(at) = at {
                placements.push((role.to_string(), at));
            }
        }
        // Deck places refer to other roles, so they are read once all roles are known.
        for (role, at) in placements {
            if let Some(t) = self.text(at, "at")
                && let Some(loc) = self.location(&t)
                && let Some(d) = self.devices.get_mut(&role)
            {
                d.on_deck = Some(loc);
            }
        }
    }

    fn labware_table(&mut self, v: &Value<'_>) {
        let Some(t) = self.table(v, "[labware]") else {
            return;
        };
        for (key, value) in t.iter() {
            let name: &str = key.get_ref();
            let key_span = span_of(key);
            if !valid_name(name) {
                self.error(
                    "bad-name",
                    key_span,
                    format!("`{name}` cannot be a labware name"),
                )
                .hint =
                    Some("use letters, digits and _ (it is written as `<labware>:<well>`)".into());
                self.broken_labware.insert(name.to_string());
                continue;
            }
            let Some(lt) = self.table(value, &format!("[labware.{name}]")) else {
                self.broken_labware.insert(name.to_string());
                continue;
            };
            let clean = self.check_keys(lt, LABWARE_KEYS, &format!("[labware.{name}]"));
            let definition = match (lt.get("definition"), lt.get("type")) {
                (Some(d), _) => self.definition_file(d),
                (None, Some(ty)) => self.builtin_type(ty),
                (None, None) if !clean => None,
                (None, None) => {
                    self.error("missing-key", key_span, format!("labware `{name}` needs a `type`"))
                        .hint = Some("e.g. type = \"corning_96_wellplate_360ul_flat\", or definition = \"my_plate.json\"".into());
                    None
                }
            };
            let Some(definition) = definition else {
                self.broken_labware.insert(name.to_string());
                continue;
            };
            let at = lt
                .get("at")
                .and_then(|a| self.text(a, "at"))
                .and_then(|t| self.location(&t));
            let mut labware = Labware {
                name: name.to_string(),
                definition,
                at,
                contents: Vec::new(),
                span: key_span,
            };
            if let Some(c) = lt.get("contents") {
                labware.contents = self.contents(&labware, c);
            }
            self.labware.insert(name.to_string(), labware);
        }
    }

    fn builtin_type(&mut self, ty: &Value<'_>) -> Option<Arc<crate::labware::LabwareDefinition>> {
        let t = self.text(ty, "type")?;
        match builtin::builtin(&t.value) {
            Some(d) => Some(Arc::new(d.clone())),
            None => {
                let hint = did_you_mean(&t.value, builtin::builtin_names().iter().copied()).unwrap_or_else(|| {
                    "see `biofoundry labware` for the built-in types, or load a file with definition = \"plate.json\"".into()
                });
                self.error(
                    "unknown-labware-type",
                    t.span,
                    format!("unknown labware type `{}`", t.value),
                )
                .hint = Some(hint);
                None
            }
        }
    }

    fn definition_file(&mut self, d: &Value<'_>) -> Option<Arc<crate::labware::LabwareDefinition>> {
        let t = self.text(d, "definition")?;
        let rel = Path::new(&t.value);
        let path = self.base_dir.join(rel);
        // A protocol may only read files beside it or below its folder: no
        // absolute paths, no `..`, and no symbolic link that leads elsewhere.
        let base = if self.base_dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            self.base_dir.as_path()
        };
        let escapes_by_link = match (base.canonicalize(), path.canonicalize()) {
            (Ok(base), Ok(target)) => !target.starts_with(base),
            _ => false,
        };
        if rel.is_absolute()
            || escapes_by_link
            || rel
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            self.error(
                "definition-path",
                t.span,
                format!("`{}` is outside the protocol's folder", t.value),
            )
            .hint = Some("put the definition file beside the protocol (or in a folder below it) and give a relative path".into());
            return None;
        }
        match opentrons::load_definition_file(&path) {
            Ok(def) => Some(Arc::new(def)),
            Err(e) => {
                let at = match (e.line, e.column) {
                    (Some(l), Some(c)) => format!(" ({}:{l}:{c})", t.value),
                    _ => String::new(),
                };
                let message = format!(
                    "labware definition `{}` cannot be used: {}{at}",
                    t.value, e.message
                );
                let hint = e.hint.unwrap_or_else(|| {
                    "the file must be an Opentrons labware definition, schema version 2".into()
                });
                self.error("bad-definition", t.span, message).hint = Some(hint);
                None
            }
        }
    }

    fn contents(&mut self, labware: &Labware, v: &Value<'_>) -> Vec<Content> {
        let Some(t) = self.table(v, "`contents`") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, value) in t.iter() {
            let selector = format!("{}:{}", labware.name, key.get_ref());
            let key_span = span_of(key);
            let wells = match parse_selection(&selector)
                .map_err(|e| Some(("bad-wells", e.message)))
                .and_then(|s| {
                    self.resolve_wells(&s, &labware.definition).map_err(|e| {
                        e.map(|e| {
                            let code = if e.too_many {
                                "bad-wells"
                            } else {
                                "well-outside"
                            };
                            (code, e.message)
                        })
                    })
                }) {
                Ok(w) => w,
                Err(None) => continue,
                Err(Some((code, message))) => {
                    self.error(code, key_span, message).hint = Some(
                        "keys are wells (`A1`), ranges (`\"A1:H1\"`) or lists (`\"A1,B1\"`)".into(),
                    );
                    continue;
                }
            };
            let Some(text) = self.text(value, "contents") else {
                continue;
            };
            let (volume_text, liquid) = split_volume_and_liquid(&text.value);
            let volume = match parse_quantity(volume_text, Dimension::Volume) {
                Ok(q) => q,
                Err(e) => {
                    let message = text.note(format!("contents of {}: {e}", key.get_ref()));
                    self.error("bad-quantity", text.span, message).hint =
                        Some("write \"<volume> <liquid>\", e.g. \"200 uL standard\"".into());
                    continue;
                }
            };
            out.push(Content {
                wells,
                volume_ul: volume.value,
                liquid: if liquid.is_empty() {
                    format!("{} contents", labware.name)
                } else {
                    liquid.to_string()
                },
                span: text.span,
            });
        }
        out
    }

    fn step(
        &mut self,
        index: usize,
        v: &Value<'_>,
        default_policy: ErrorPolicy,
        default_retries: u32,
    ) -> Option<Step> {
        let span = span_of(v);
        let t = self.table(v, "a [[step]]")?;
        let id = match t.get("id") {
            Some(i) => {
                let t = self.text(i, "id")?;
                if t.value.trim().is_empty() {
                    self.error("bad-name", t.span, "a step id cannot be empty");
                }
                Sp::new(t.value, t.span)
            }
            None => Sp::new(format!("step-{}", index + 1), span),
        };
        let Some(do_value) = t.get("do") else {
            self.error(
                "missing-key",
                span,
                format!("step `{}` has no `do`", id.value),
            )
            .hint =
                Some("say what the step does, e.g. do = \"lh.transfer\" or do = \"wait\"".into());
            return None;
        };
        let do_text = self.text(do_value, "do")?;
        let action_name = Sp::new(do_text.value.clone(), do_text.span);

        // Resolve the action spec.
        let (role, kind, spec): (
            Option<Sp<String>>,
            Option<DeviceKind>,
            Option<&'static ActionSpec>,
        ) = match do_text.value.split_once('.') {
            Some((role, action)) => {
                let role_span = do_text.sub_span(0..role.len());
                let action_span = do_text.sub_span(role.len() + 1..do_text.value.len());
                let kind = self.role_ref(role, role_span);
                let spec = kind.and_then(|k| {
                    let s = k.spec().action(action);
                    if s.is_none() {
                        let names: Vec<&str> = k.spec().actions.iter().map(|a| a.name).collect();
                        let hint = did_you_mean(action, names.iter().copied())
                            .unwrap_or_else(|| format!("{k} actions: {}", names.join(", ")));
                        self.error(
                            "unknown-action",
                            action_span,
                            format!("{} has no action `{action}`", k.with_article()),
                        )
                        .hint = Some(hint);
                    }
                    s
                });
                (Some(Sp::new(role.to_string(), role_span)), kind, spec)
            }
            None => {
                let spec = BUILTIN_ACTIONS.iter().find(|a| a.name == do_text.value);
                if spec.is_none() {
                    let names: Vec<&str> = BUILTIN_ACTIONS.iter().map(|a| a.name).collect();
                    let hint =
                        did_you_mean(&do_text.value, names.iter().copied()).unwrap_or_else(|| {
                            format!(
                                "write `<role>.<action>` for a device, or a built-in: {}",
                                names.join(", ")
                            )
                        });
                    self.error(
                        "unknown-action",
                        do_text.span,
                        format!("`{}` is not an action", do_text.value),
                    )
                    .hint = Some(hint);
                }
                (None, None, spec)
            }
        };

        // Common keys.
        let after = t.get("after").and_then(|a| self.string_list(a, "after"));
        let timeout = t
            .get("timeout")
            .and_then(|x| self.quantity(x, Dimension::Time, "timeout"));
        if let Some(tq) = &timeout {
            self.positive(tq, "timeout");
        }
        let on_error = t
            .get("on_error")
            .and_then(|x| self.choice(x, ERROR_POLICIES, "on_error"))
            .and_then(|c| ErrorPolicy::from_name(c.value))
            .unwrap_or(default_policy);
        let retries = t
            .get("retries")
            .and_then(|x| self.integer(x, 0, 100, "retries"))
            .map_or(default_retries, |n| n.value as u32);
        if let Some(r) = t.get("retries")
            && on_error != ErrorPolicy::Retry
        {
            self.push(
                Diagnostic::warning(
                    "retries-unused",
                    span_of(r),
                    "`retries` has no effect without on_error = \"retry\"",
                )
                .with_hint("add on_error = \"retry\" to this step"),
            );
        }
        let note = t
            .get("note")
            .and_then(|x| self.text(x, "note"))
            .map(|t| t.value);
        let repeat = t.get("repeat").and_then(|x| self.repeat(x));

        let Some(spec) = spec else {
            return Some(Step {
                index,
                id,
                action_name,
                role,
                action: Action::Invalid,
                after,
                timeout,
                on_error,
                retries,
                note,
                repeat,
                span,
            });
        };

        // Unknown keys: the common ones plus this action's arguments.
        for key in t.keys() {
            let k: &str = key.get_ref();
            if COMMON_STEP_KEYS.iter().any(|a| a.name == k) || spec.args.iter().any(|a| a.name == k)
            {
                continue;
            }
            let candidates = COMMON_STEP_KEYS.iter().chain(spec.args).map(|a| a.name);
            let hint = did_you_mean(k, candidates).unwrap_or_else(|| {
                let args: Vec<&str> = spec.args.iter().map(|a| a.name).collect();
                if args.is_empty() {
                    format!("`{}` takes no arguments", do_text.value)
                } else {
                    format!("`{}` takes: {}", do_text.value, args.join(", "))
                }
            });
            self.error(
                "unknown-key",
                span_of(key),
                format!("unknown key `{k}` for `{}`", do_text.value),
            )
            .hint = Some(hint);
        }

        let mut args = Args::default();
        let mut complete = true;
        for arg in spec.args {
            match t.get(arg.name) {
                Some(value) => match self.arg(arg, value, kind) {
                    Some(a) => {
                        args.0.insert(arg.name, a);
                    }
                    None => complete = false,
                },
                None if arg.required => {
                    complete = false;
                    self.error(
                        "missing-key",
                        do_text.span,
                        format!("`{}` needs `{}`", do_text.value, arg.name),
                    )
                    .hint = Some(format!("{} = ...  # {}", arg.name, arg.description));
                }
                None => {}
            }
        }
        if spec.needs_any_arg && args.0.is_empty() && complete {
            complete = false;
            let names: Vec<&str> = spec.args.iter().map(|a| a.name).collect();
            self.error(
                "missing-key",
                do_text.span,
                format!(
                    "`{}` needs at least one of: {}",
                    do_text.value,
                    names.join(", ")
                ),
            );
        }
        let action = if complete {
            self.build_action(kind, spec, args, &do_text, &timeout)
                .unwrap_or(Action::Invalid)
        } else {
            Action::Invalid
        };
        Some(Step {
            index,
            id,
            action_name,
            role,
            action,
            after,
            timeout,
            on_error,
            retries,
            note,
            repeat,
            span,
        })
    }

    fn repeat(&mut self, v: &Value<'_>) -> Option<Repeat> {
        let t = self.table(v, "`repeat`")?;
        let clean = self.check_keys(t, &["times", "every"], "`repeat`");
        let Some(times) = t.get("times") else {
            if !clean {
                return None;
            }
            self.error("missing-key", span_of(v), "`repeat` needs `times`")
                .hint = Some("repeat = { times = 24, every = \"1 h\" }".into());
            return None;
        };
        let times = self.integer(times, 1, MAX_REPEAT, "times")?;
        let every_s = match t.get("every") {
            Some(e) => {
                let q = self.quantity(e, Dimension::Time, "every")?;
                if !self.positive(&q, "every") {
                    return None;
                }
                Some(q.value.value)
            }
            None => None,
        };
        Some(Repeat {
            times: times.value as u32,
            every_s,
        })
    }

    fn arg(&mut self, spec: &ArgSpec, v: &Value<'_>, kind: Option<DeviceKind>) -> Option<ArgValue> {
        let name = spec.name;
        Some(match spec.ty {
            ArgType::Quantity { dimension } => {
                ArgValue::Quantity(self.quantity(v, dimension, name)?)
            }
            ArgType::Wells => ArgValue::Wells(self.wells(v, name)?),
            ArgType::Labware => {
                let t = self.text(v, name)?;
                if !self.labware_ref(&t.value, t.span) {
                    return None;
                }
                ArgValue::Text(Sp::new(t.value, t.span))
            }
            ArgType::Location => {
                let t = self.text(v, name)?;
                ArgValue::Location(self.location(&t)?)
            }
            ArgType::Integer { min, max } => ArgValue::Integer(self.integer(v, min, max, name)?),
            ArgType::Bool => ArgValue::Bool(self.boolean(v, name)?),
            ArgType::Text => {
                let t = self.text(v, name)?;
                ArgValue::Text(Sp::new(t.value, t.span))
            }
            ArgType::Choice { options } => ArgValue::Choice(self.choice(v, options, name)?),
            ArgType::Condition => ArgValue::Condition(self.condition(v)?),
            ArgType::Signals => {
                let list = self.string_list(v, name)?;
                let kind = kind?;
                let mut ok = true;
                for s in &list {
                    ok &= self.signal_of(kind, s).is_some();
                }
                if list.is_empty() {
                    self.error(
                        "missing-key",
                        span_of(v),
                        format!("`{name}` lists no signals"),
                    );
                    return None;
                }
                if !ok {
                    return None;
                }
                ArgValue::Signals(list)
            }
            ArgType::Mix => {
                let t = self.table(v, name)?;
                let clean = self.check_keys(t, &["cycles", "volume"], &format!("`{name}`"));
                let (Some(c), Some(vol)) = (t.get("cycles"), t.get("volume")) else {
                    if !clean {
                        return None;
                    }
                    self.error(
                        "missing-key",
                        span_of(v),
                        format!("`{name}` needs `cycles` and `volume`"),
                    )
                    .hint = Some(format!("{name} = {{ cycles = 3, volume = \"50 uL\" }}"));
                    return None;
                };
                let cycles = self.integer(c, 1, 1000, "cycles");
                let volume = self.quantity(vol, Dimension::Volume, "volume");
                let (cycles, volume) = (cycles?, volume?);
                if !self.positive(&volume, "volume") {
                    return None;
                }
                ArgValue::Mix(Sp::new(
                    MixSpec {
                        cycles: cycles.value as u32,
                        volume_ul: volume.value.value,
                    },
                    span_of(v),
                ))
            }
            ArgType::Pump => {
                let t = self.text(v, name)?;
                let pumps = kind?.spec().pumps;
                if !pumps.contains(&t.value.as_str()) {
                    let hint = did_you_mean(&t.value, pumps.iter().copied())
                        .unwrap_or_else(|| format!("pumps: {}", pumps.join(", ")));
                    self.error(
                        "unknown-pump",
                        t.span,
                        t.note(format!("no pump `{}`", t.value)),
                    )
                    .hint = Some(hint);
                    return None;
                }
                ArgValue::Text(Sp::new(t.value, t.span))
            }
        })
    }

    fn signal_of(
        &mut self,
        kind: DeviceKind,
        s: &Sp<String>,
    ) -> Option<&'static crate::catalogue::SignalSpec> {
        let found = kind.spec().signal(&s.value);
        if found.is_none() {
            let names: Vec<&str> = kind.spec().signals.iter().map(|s| s.name).collect();
            let hint = did_you_mean(&s.value, names.iter().copied()).unwrap_or_else(|| {
                if names.is_empty() {
                    format!("{} has no signals", kind.with_article())
                } else {
                    format!("{kind} signals: {}", names.join(", "))
                }
            });
            self.error(
                "unknown-signal",
                s.span,
                format!("{} has no signal `{}`", kind.with_article(), s.value),
            )
            .hint = Some(hint);
        }
        found
    }

    fn condition(&mut self, v: &Value<'_>) -> Option<Condition> {
        let t = self.text(v, "condition")?;
        let raw = match parse_condition(&t.value) {
            Ok(c) => c,
            Err(e) => {
                let span = t.sub_span(e.range);
                self.error("bad-condition", span, t.note(e.message)).hint =
                    Some("e.g. \"br.od600 >= 0.6 and br.ph < 7.2\"".into());
                // The roles it names still count as used, so no "unused role"
                // warning follows the one real mistake.
                for word in t
                    .value
                    .split(|c: char| c.is_whitespace() || "()<>=!".contains(c))
                {
                    if let Some((role, _)) = word.split_once('.')
                        && self.devices.contains_key(role)
                    {
                        self.role_uses.push(Sp::new(role.to_string(), t.span));
                    }
                }
                return None;
            }
        };
        let mut any = Vec::new();
        let mut ok = true;
        for group in raw.any {
            let mut all = Vec::new();
            for c in group {
                let subject_span = t.sub_span(c.subject_range.clone());
                let Some(kind) = self.role_ref(&c.role, subject_span) else {
                    ok = false;
                    continue;
                };
                let Some(signal) = self.signal_of(kind, &Sp::new(c.signal.clone(), subject_span))
                else {
                    ok = false;
                    continue;
                };
                let value_span = t.sub_span(c.value_range.clone());
                match parse_quantity(&c.value, signal.dimension) {
                    Ok(q) => all.push(Comparison {
                        role: c.role,
                        signal: c.signal,
                        op: c.op,
                        value: q,
                        span: subject_span,
                    }),
                    Err(e) => {
                        ok = false;
                        let hint = e.hint();
                        self.error(
                            "bad-quantity",
                            value_span,
                            t.note(format!(
                                "`{}.{}` is a {}: {e}",
                                c.role,
                                c.signal,
                                signal.dimension.name()
                            )),
                        )
                        .hint = Some(hint);
                    }
                }
            }
            any.push(all);
        }
        ok.then_some(Condition { text: t.value, any })
    }

    fn build_action(
        &mut self,
        kind: Option<DeviceKind>,
        spec: &'static ActionSpec,
        mut args: Args,
        do_text: &Text,
        timeout: &Option<Sp<Quantity>>,
    ) -> Option<Action> {
        use DeviceKind::*;
        let positive_volume = |p: &mut Self, q: Sp<Quantity>| p.positive(&q, "volume").then_some(q);
        Some(match (kind, spec.name) {
            (None, "wait") => Action::Wait {
                duration: args.quantity("duration")?,
            },
            (None, "wait_until") => {
                if timeout.is_none() {
                    self.error(
                        "missing-key",
                        do_text.span,
                        "`wait_until` needs a `timeout`",
                    )
                    .hint = Some(
                        "a condition that never holds must not stall the run: timeout = \"12 h\""
                            .into(),
                    );
                    return None;
                }
                let poll = args.quantity("poll");
                if let Some(p) = &poll
                    && !self.positive(p, "poll")
                {
                    return None;
                }
                Action::WaitUntil {
                    condition: args.condition("condition")?,
                    poll,
                }
            }
            (None, "prompt") => Action::Prompt {
                message: args.text("message")?.value,
            },
            (None, "log") => Action::Log {
                message: args.text("message")?.value,
            },
            (Some(LiquidHandler), "transfer") => {
                let volume = positive_volume(self, args.quantity("volume")?)?;
                let tips = match args.choice("tips") {
                    Some(c) => Sp::new(
                        match c.value {
                            "always" => TipPolicy::Always,
                            "never" => TipPolicy::Never,
                            _ => TipPolicy::Once,
                        },
                        c.span,
                    ),
                    None => Sp::new(TipPolicy::Once, do_text.span),
                };
                Action::Transfer(Box::new(Transfer {
                    from: args.wells("from")?,
                    to: args.wells("to")?,
                    volume,
                    tips,
                    tip_rack: args.text("tip_rack"),
                    mix_before: args.mix("mix_before"),
                    mix_after: args.mix("mix_after"),
                }))
            }
            (Some(LiquidHandler), "aspirate") => Action::Aspirate {
                from: args.wells("from")?,
                volume: positive_volume(self, args.quantity("volume")?)?,
            },
            (Some(LiquidHandler), "dispense") => Action::Dispense {
                to: args.wells("to")?,
                volume: positive_volume(self, args.quantity("volume")?)?,
            },
            (Some(LiquidHandler), "mix") => Action::Mix {
                at: args.wells("at")?,
                volume: positive_volume(self, args.quantity("volume")?)?,
                cycles: args.integer("cycles")?.value as u32,
            },
            (Some(LiquidHandler), "pick_up_tip") => Action::PickUpTip {
                tip_rack: args.text("tip_rack"),
            },
            (Some(LiquidHandler), "drop_tip") => Action::DropTip,
            (Some(Incubator), "load") => Action::Load {
                labware: args.text("labware")?,
                slot: args
                    .integer("slot")
                    .map(|s| Sp::new(s.value as u32, s.span)),
            },
            (Some(Incubator), "unload") => Action::Unload {
                labware: args.text("labware")?,
                to: args.location("to")?,
            },
            (Some(_), "set_temperature") => Action::Set {
                setpoints: vec![SetpointValue {
                    setpoint: "temperature",
                    value: args.quantity("temperature")?,
                }],
                wait: args.bool("wait").unwrap_or(true),
                duration: None,
            },
            (Some(Incubator), "set_co2") => set_one("co2", args.quantity("percent")?),
            (Some(Incubator), "set_humidity") => set_one("humidity", args.quantity("percent")?),
            (Some(k @ (Incubator | HeaterShaker)), "shake") => Action::Set {
                setpoints: vec![SetpointValue {
                    setpoint: if k == Incubator { "shaking" } else { "speed" },
                    value: args.quantity("speed")?,
                }],
                wait: false,
                duration: args.quantity("duration"),
            },
            (Some(Pump), "run") => Action::Set {
                setpoints: vec![SetpointValue {
                    setpoint: "rate",
                    value: args.quantity("rate")?,
                }],
                wait: false,
                duration: args.quantity("duration"),
            },
            (Some(_), "set") => Action::Set {
                setpoints: spec
                    .args
                    .iter()
                    .filter_map(|a| {
                        args.quantity(a.name).map(|value| SetpointValue {
                            setpoint: a.limit.unwrap_or(a.name),
                            value,
                        })
                    })
                    .collect(),
                wait: false,
                duration: None,
            },
            (Some(Bioreactor), "feed") => {
                let volume = args.quantity("volume");
                let rate = args.quantity("rate");
                let duration = args.quantity("duration");
                let shape_ok = matches!(
                    (&volume, &rate, &duration),
                    (Some(_), None, None) | (None, Some(_), Some(_))
                );
                if !shape_ok {
                    self.error(
                        "feed-shape",
                        do_text.span,
                        "`feed` takes either `volume`, or `rate` and `duration`",
                    )
                    .hint = Some("feed = volume = \"5 mL\"; or rate = \"0.5 mL/min\" with duration = \"10 min\"".into());
                    return None;
                }
                if let Some(v) = &volume
                    && !self.positive(v, "volume")
                {
                    return None;
                }
                Action::Feed {
                    pump: args.text("pump")?,
                    volume,
                    rate,
                    duration,
                }
            }
            (Some(Pump), "dispense") => Action::PumpDispense {
                volume: positive_volume(self, args.quantity("volume")?)?,
                rate: args.quantity("rate"),
            },
            (Some(_), "sample") => Action::Sample {
                read: args.signals("read")?,
            },
            (Some(_), _) if spec.args.is_empty() => Action::Command { name: spec.name },
            _ => return None,
        })
    }

    fn monitor(&mut self, index: usize, v: &Value<'_>) -> Option<Monitor> {
        let span = span_of(v);
        let t = self.table(v, "a [[monitor]]")?;
        let clean = self.check_keys(t, MONITOR_KEYS, "[[monitor]]");
        let id_text = t.get("id").and_then(|i| self.text(i, "id"));
        // A monitor's id is a level of its alarms' MQTT topics: `+`, `#`, `/`
        // or a very long id would make topics the broker refuses.
        if let Some(it) = &id_text
            && !(valid_name(&it.value) && it.value.chars().count() <= MAX_MONITOR_ID_CHARS)
        {
            let shown: String = it.value.chars().take(MAX_MONITOR_ID_CHARS).collect();
            let cut = if shown.len() < it.value.len() {
                "…"
            } else {
                ""
            };
            self.error(
                "bad-name",
                it.span,
                format!("`{}{cut}` cannot be a monitor id", shown.escape_debug()),
            )
            .hint = Some(format!(
                "letters, digits, _ and -, at most {MAX_MONITOR_ID_CHARS} characters (alarms are published as alarm/<id>.<signal>)"
            ));
        }
        let id = id_text.map_or_else(|| format!("monitor-{}", index + 1), |t| t.value);
        let Some(device) = t.get("device") else {
            if !clean {
                return None;
            }
            self.error("missing-key", span, "a monitor needs a `device`")
                .hint = Some("device = \"br\"  # a role from [devices]".into());
            return None;
        };
        let role_text = self.text(device, "device")?;
        let kind = self.role_ref(&role_text.value, role_text.span);
        let role = Sp::new(role_text.value.clone(), role_text.span);
        let read = match t.get("read") {
            Some(r) => self.string_list(r, "read").unwrap_or_default(),
            None if !clean => Vec::new(),
            None => {
                self.error(
                    "missing-key",
                    span,
                    "a monitor needs `read`, the signals it samples",
                )
                .hint = Some("read = [\"ph\", \"dissolved_oxygen\"]".into());
                Vec::new()
            }
        };
        let every = match t.get("every") {
            Some(e) => self.quantity(e, Dimension::Time, "every"),
            None if !clean => None,
            None => {
                self.error(
                    "missing-key",
                    span,
                    "a monitor needs `every`, how often it samples",
                )
                .hint = Some("every = \"10 s\"".into());
                None
            }
        };
        if let Some(e) = &every {
            self.positive(e, "every");
        }
        let after = t
            .get("after")
            .and_then(|a| self.text(a, "after"))
            .map(|a| Sp::new(a.value, a.span));
        let until = t
            .get("until")
            .and_then(|a| self.text(a, "until"))
            .map(|a| Sp::new(a.value, a.span));
        let on_violation = t
            .get("on_violation")
            .and_then(|x| self.choice(x, VIOLATION_POLICIES, "on_violation"))
            .map_or(ViolationPolicy::Hold, |c| match c.value {
                "alarm" => ViolationPolicy::Alarm,
                "abort" => ViolationPolicy::Abort,
                _ => ViolationPolicy::Hold,
            });
        let kind = kind?;
        for s in &read {
            self.signal_of(kind, s);
        }
        let mut limits = Vec::new();
        if let Some(l) = t.get("limits")
            && let Some(lt) = self.table(l, "`limits`")
        {
            for (key, value) in lt.iter() {
                let signal = Sp::new(key.get_ref().to_string(), span_of(key));
                let Some(spec) = self.signal_of(kind, &signal) else {
                    continue;
                };
                if !read.iter().any(|r| r.value == signal.value) {
                    self.error(
                        "limit-not-read",
                        signal.span,
                        format!(
                            "a limit on `{}`, which the monitor does not read",
                            signal.value
                        ),
                    )
                    .hint = Some(format!("add \"{}\" to `read`", signal.value));
                }
                let Some(text) = self.text(value, &signal.value) else {
                    continue;
                };
                match parse_limits(&text.value, spec.dimension) {
                    Ok(range) => limits.push((signal, range)),
                    Err(e) => {
                        let message = text.note(format!(
                            "limits of `{}` must be `<low>..<high>` in {} ({e})",
                            signal.value,
                            spec.dimension.units()
                        ));
                        self.error("bad-limits", text.span, message).hint = Some(format!(
                            "e.g. {} = \"{}\"",
                            signal.value,
                            example_limits(spec.dimension)
                        ));
                    }
                }
            }
        }
        Some(Monitor {
            id,
            role,
            read,
            every: every?,
            limits,
            on_violation,
            after,
            until,
            span,
        })
    }
}

fn example_limits(d: Dimension) -> &'static str {
    match d {
        Dimension::Temperature => "36..38 C",
        Dimension::Percent => "30..100 %",
        Dimension::Unitless => "6.8..7.4",
        Dimension::Speed => "200..400 rpm",
        Dimension::Flow => "0..2 L/min",
        Dimension::Volume => "0.5..1.8 L",
        Dimension::Time => "0..10 min",
    }
}

fn set_one(setpoint: &'static str, value: Sp<Quantity>) -> Action {
    Action::Set {
        setpoints: vec![SetpointValue { setpoint, value }],
        wait: false,
        duration: None,
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// A parameter override, checked against the type of the file's default.
fn override_value(default: &ParamValue, raw: &str) -> Result<ParamValue, String> {
    let unquoted = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    match default {
        ParamValue::Text(_) => Ok(ParamValue::Text(unquoted.to_string())),
        ParamValue::Integer(d) => raw
            .trim()
            .parse()
            .map(ParamValue::Integer)
            .map_err(|_| format!("expected a whole number like the default {d}")),
        ParamValue::Float(d) => raw
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(ParamValue::Float)
            .ok_or_else(|| format!("expected a number like the default {d}")),
        ParamValue::Bool(_) => match raw.trim() {
            "true" => Ok(ParamValue::Bool(true)),
            "false" => Ok(ParamValue::Bool(false)),
            _ => Err("expected true or false".into()),
        },
    }
}

/// "12 mL PBS" -> ("12 mL", "PBS"); "12mL PBS" -> ("12mL", "PBS").
fn split_volume_and_liquid(s: &str) -> (&str, &str) {
    let s = s.trim();
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || ".+-eE".contains(c)))
        .unwrap_or(s.len());
    let rest = &s[number_end..];
    let unit_start = number_end + (rest.len() - rest.trim_start().len());
    let unit_end = s[unit_start..]
        .find(char::is_whitespace)
        .map_or(s.len(), |i| unit_start + i);
    (&s[..unit_end], s[unit_end..].trim())
}

#[derive(Default)]
struct Args(IndexMap<&'static str, ArgValue>);

enum ArgValue {
    Quantity(Sp<Quantity>),
    Wells(WellSet),
    Location(Sp<Location>),
    Integer(Sp<i64>),
    Bool(bool),
    Text(Sp<String>),
    Choice(Sp<&'static str>),
    Condition(Condition),
    Signals(Vec<Sp<String>>),
    Mix(Sp<MixSpec>),
}

impl Args {
    // Each argument is taken once when the action is built, so values move out
    // instead of being cloned.
    fn take(&mut self, k: &str) -> Option<ArgValue> {
        self.0.swap_remove(k)
    }
    fn quantity(&mut self, k: &str) -> Option<Sp<Quantity>> {
        match self.take(k) {
            Some(ArgValue::Quantity(q)) => Some(q),
            _ => None,
        }
    }
    fn wells(&mut self, k: &str) -> Option<WellSet> {
        match self.take(k) {
            Some(ArgValue::Wells(w)) => Some(w),
            _ => None,
        }
    }
    fn location(&mut self, k: &str) -> Option<Sp<Location>> {
        match self.take(k) {
            Some(ArgValue::Location(l)) => Some(l),
            _ => None,
        }
    }
    fn integer(&mut self, k: &str) -> Option<Sp<i64>> {
        match self.take(k) {
            Some(ArgValue::Integer(i)) => Some(i),
            _ => None,
        }
    }
    fn bool(&mut self, k: &str) -> Option<bool> {
        match self.take(k) {
            Some(ArgValue::Bool(b)) => Some(b),
            _ => None,
        }
    }
    fn text(&mut self, k: &str) -> Option<Sp<String>> {
        match self.take(k) {
            Some(ArgValue::Text(t)) => Some(t),
            _ => None,
        }
    }
    fn choice(&mut self, k: &str) -> Option<Sp<&'static str>> {
        match self.take(k) {
            Some(ArgValue::Choice(c)) => Some(c),
            _ => None,
        }
    }
    fn condition(&mut self, k: &str) -> Option<Condition> {
        match self.take(k) {
            Some(ArgValue::Condition(c)) => Some(c),
            _ => None,
        }
    }
    fn signals(&mut self, k: &str) -> Option<Vec<Sp<String>>> {
        match self.take(k) {
            Some(ArgValue::Signals(s)) => Some(s),
            _ => None,
        }
    }
    fn mix(&mut self, k: &str) -> Option<Sp<MixSpec>> {
        match self.take(k) {
            Some(ArgValue::Mix(m)) => Some(m),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_typed_like_the_default() {
        assert_eq!(
            override_value(&ParamValue::Integer(3), "5"),
            Ok(ParamValue::Integer(5))
        );
        assert!(override_value(&ParamValue::Integer(3), "five").is_err());
        assert_eq!(
            override_value(&ParamValue::Text("100 uL".into()), "\"150 uL\""),
            Ok(ParamValue::Text("150 uL".into()))
        );
        assert!(override_value(&ParamValue::Bool(true), "yes").is_err());
        assert!(override_value(&ParamValue::Float(0.5), "inf").is_err());
    }

    #[test]
    fn volume_and_liquid_split() {
        assert_eq!(split_volume_and_liquid("12 mL PBS"), ("12 mL", "PBS"));
        assert_eq!(
            split_volume_and_liquid("12mL PBS buffer"),
            ("12mL", "PBS buffer")
        );
        assert_eq!(split_volume_and_liquid("200 uL"), ("200 uL", ""));
        assert_eq!(split_volume_and_liquid(""), ("", ""));
    }

    #[test]
    fn param_override_syntax() {
        assert_eq!(
            "volume=150 uL".parse::<ParamOverride>(),
            Ok(ParamOverride {
                name: "volume".into(),
                value: "150 uL".into()
            })
        );
        assert!("=3".parse::<ParamOverride>().is_err());
        assert!("volume".parse::<ParamOverride>().is_err());
    }

    fn parse_text(text: &str) -> Vec<Diagnostic> {
        parse(Arc::new(SourceFile::new("p.toml", text)), &[]).1
    }

    fn with_code<'d>(diags: &'d [Diagnostic], code: &str) -> Vec<&'d Diagnostic> {
        diags.iter().filter(|d| d.code == code).collect()
    }

    const PLATE_HEAD: &str = "format = \"biofoundry.protocol/1\"\n[protocol]\nname = \"x\"\n\
        [devices]\nlh = \"liquid_handler\"\n\
        [labware.plate]\ntype = \"corning_96_wellplate_360ul_flat\"\nat = \"lh:3\"\n";

    #[test]
    fn monitor_ids_are_names_fit_for_alarm_topics() {
        let monitor = |id: &str| {
            format!(
                "format = \"biofoundry.protocol/1\"\n[protocol]\nname = \"x\"\n\
                 [devices]\nbr = \"bioreactor\"\n\
                 [[monitor]]\nid = \"{id}\"\ndevice = \"br\"\nread = [\"ph\"]\nevery = \"10 s\"\n"
            )
        };
        for good in ["watch", "culture_2", "ph-guard"] {
            let d = parse_text(&monitor(good));
            assert!(with_code(&d, "bad-name").is_empty(), "{good}: {d:?}");
        }
        let long = "m".repeat(65);
        for bad in ["a+b", "a#", "a/b", "", "has space", long.as_str()] {
            let text = monitor(bad);
            let d = parse_text(&text);
            let names = with_code(&d, "bad-name");
            assert_eq!(names.len(), 1, "{bad}: {d:?}");
            assert!(
                names[0].message.contains("cannot be a monitor id"),
                "{names:?}"
            );
            // At the id's value.
            assert_eq!(
                names[0].span.start,
                text.find("id = ").unwrap() + 5,
                "{bad}"
            );
        }
    }

    #[test]
    fn substitution_cannot_blow_a_small_file_up() {
        // A 2 MiB parameter used 40 times would be 80 MiB of text.
        let uses = "${p}".repeat(40);
        let text = format!(
            "format = \"biofoundry.protocol/1\"\n[protocol]\nname = \"x\"\n\
             [params]\np = \"{}\"\n\
             [[step]]\ndo = \"log\"\nmessage = \"{uses}\"\n\
             [[step]]\ndo = \"log\"\nmessage = \"{uses}\"\n",
            "x".repeat(2 << 20)
        );
        let diags = parse_text(&text);
        let over = with_code(&diags, "bad-substitution");
        assert_eq!(over.len(), 1, "reported once: {over:?}");
        assert!(
            over[0].message.contains("more than 64 MiB"),
            "{}",
            over[0].message
        );
        // Ordinary use is untouched.
        let ok = "format = \"biofoundry.protocol/1\"\n[protocol]\nname = \"x\"\n\
                  [params]\np = \"hello\"\n[[step]]\ndo = \"log\"\nmessage = \"${p} ${p}\"\n";
        assert!(!parse_text(ok).iter().any(Diagnostic::is_error));
    }

    #[test]
    fn a_well_list_cannot_name_unbounded_wells() {
        // 2 000 x 96 wells in 14 kB of text.
        let ranges = vec!["A1:H12"; 2_000].join(",");
        let text = format!(
            "{PLATE_HEAD}contents = {{ \"{ranges}\" = \"1 uL\" }}\n\
             [[step]]\ndo = \"lh.dispense\"\nto = \"plate:{ranges}\"\nvolume = \"1 uL\"\n"
        );
        let diags = parse_text(&text);
        let bad = with_code(&diags, "bad-wells");
        assert_eq!(bad.len(), 2, "{diags:?}");
        assert!(
            bad.iter()
                .all(|d| d.message.contains("more than 100000 wells")),
            "{bad:?}"
        );
        // The step's error points at the range that went over.
        let at = text.find("to = \"plate:").unwrap() + "to = \"plate:".len() + 1041 * 7;
        assert!(bad.iter().any(|d| d.span.start == at), "{bad:?}");
    }

    #[test]
    fn the_protocol_names_at_most_its_wells_budget() {
        // Three selections of 96 000 wells each, against a budget of 200 000
        // (the real one, 4 000 000, is the same code with a bigger number).
        let ranges = vec!["A1:H12"; 1_000].join(",");
        let mut text = PLATE_HEAD.to_string();
        for _ in 0..3 {
            text.push_str(&format!(
                "[[step]]\ndo = \"lh.dispense\"\nto = \"plate:{ranges}\"\nvolume = \"1 uL\"\n"
            ));
        }
        let file = Arc::new(SourceFile::new("p.toml", text));
        let diags = parse_within(Arc::clone(&file), &[], 200_000).1;
        let bad = with_code(&diags, "bad-wells");
        assert_eq!(bad.len(), 1, "reported once: {bad:?}");
        // At the third selection: the first two (192 000 wells) fit.
        let third = file.text.rfind("to = \"plate:").unwrap();
        assert!(bad[0].span.start > third, "{bad:?}");
        assert!(
            bad[0].message.contains("more than 200000 wells in all"),
            "{}",
            bad[0].message
        );
    }
}
