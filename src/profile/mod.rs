//! Device profiles: one TOML file per instrument model (`devices/*.toml`),
//! loaded and checked here, interpreted by `crate::driver`, served by
//! `crate::wiresim`. The format is in docs/device-profiles.md.

pub mod codec;
pub mod expr;
pub mod model;

pub use model::*;

use crate::catalogue::DeviceKind;
use crate::diagnostics::{Diagnostic, did_you_mean};
use crate::source::{SourceFile, Span};
use crate::units::{Dimension, Limits, parse_limits, parse_quantity};
use expr::Template;
use indexmap::IndexMap;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const FORMAT: &str = "biofoundry.profile/1";

/// Profiles larger than this are refused before parsing.
pub const MAX_PROFILE_BYTES: usize = 1 << 20;

/// A checked profile, ready for a driver.
#[derive(Debug, Clone)]
pub struct Profile {
    /// The file name without `.toml`, as lab files name it.
    pub id: String,
    pub file: Arc<SourceFile>,
    pub kind: DeviceKind,
    pub doc: ProfileDoc,
    /// Per setpoint, its limits in the catalogue's canonical unit.
    pub limits: IndexMap<String, Limits>,
    /// Per signal or setpoint: canonical value = device value × factor.
    pub unit_factors: IndexMap<String, f64>,
    /// The interlocks, with `above` in canonical units.
    pub interlocks: Vec<Interlock>,
}

/// What an interlock guards.
#[derive(Debug, Clone, PartialEq)]
pub enum Guarded {
    /// Writes of a setpoint above a value (canonical units; `None`: every write).
    Setpoint {
        name: String,
        above: Option<f64>,
    },
    Action(String),
}

/// A checked interlock of a profile.
#[derive(Debug, Clone)]
pub struct Interlock {
    pub id: String,
    pub guarded: Guarded,
    /// state → required value.
    pub requires: Vec<(String, String)>,
    pub message: String,
}

impl Interlock {
    /// Whether writing `setpoint` = `canonical` is guarded by this interlock.
    pub fn guards_setpoint(&self, setpoint: &str, canonical: f64) -> bool {
        matches!(&self.guarded, Guarded::Setpoint { name, above }
            if name == setpoint && above.is_none_or(|a| canonical > a))
    }

    pub fn guards_action(&self, action: &str) -> bool {
        matches!(&self.guarded, Guarded::Action(a) if a == action)
    }

    /// Why `states` do not allow it, if they do not.
    pub fn refusal(&self, states: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        let wrong: Vec<String> = self
            .requires
            .iter()
            .filter_map(|(state, value)| {
                let now = states(state).unwrap_or_else(|| "unknown".into());
                (now != *value).then(|| format!("{state} is `{now}`, needs `{value}`"))
            })
            .collect();
        (!wrong.is_empty()).then(|| {
            format!(
                "interlock `{}`: {} ({})",
                self.id,
                self.message,
                wrong.join(", ")
            )
        })
    }
}

impl Profile {
    /// The states an instrument has when it connects.
    pub fn initial_states(&self) -> std::collections::BTreeMap<String, String> {
        self.doc
            .states
            .iter()
            .map(|(k, v)| (k.clone(), v.get_ref().clone()))
            .collect()
    }

    /// The first interlock that refuses writing `setpoint` = `canonical`.
    pub fn setpoint_refusal(
        &self,
        setpoint: &str,
        canonical: f64,
        states: &dyn Fn(&str) -> Option<String>,
    ) -> Option<String> {
        self.interlocks
            .iter()
            .filter(|i| i.guards_setpoint(setpoint, canonical))
            .find_map(|i| i.refusal(states))
    }

    /// The first interlock that refuses running `action`.
    pub fn action_refusal(
        &self,
        action: &str,
        states: &dyn Fn(&str) -> Option<String>,
    ) -> Option<String> {
        self.interlocks
            .iter()
            .filter(|i| i.guards_action(action))
            .find_map(|i| i.refusal(states))
    }

    /// The states `action` sets when it succeeds.
    pub fn action_sets(&self, action: &str) -> Vec<(String, String)> {
        self.doc
            .actions
            .get(action)
            .map(|a| {
                a.get_ref()
                    .sets
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Profile {
    pub fn slots(&self) -> u32 {
        if let Some(deck) = &self.doc.deck {
            return deck.get_ref().slots.len() as u32;
        }
        self.doc.profile.slots.unwrap_or(self.kind.spec().slots)
    }

    pub fn is_modbus(&self) -> bool {
        matches!(self.doc.link.get_ref(), LinkDef::Modbus(_))
    }

    /// Canonical value of a reading of `name` in the device's unit.
    pub fn to_canonical(&self, name: &str, device_value: f64) -> f64 {
        device_value * self.unit_factors.get(name).copied().unwrap_or(1.0)
    }

    pub fn to_device(&self, name: &str, canonical: f64) -> f64 {
        canonical / self.unit_factors.get(name).copied().unwrap_or(1.0)
    }

    pub fn setting(&self, name: &str) -> Option<f64> {
        self.doc.settings.get(name).copied()
    }
}

/// Actions and setpoints the drivers need, per kind.
fn required(kind: DeviceKind) -> (&'static [&'static str], &'static [&'static str]) {
    match kind {
        DeviceKind::LiquidHandler => (&[], &["pick_up_tip", "drop_tip", "aspirate", "dispense"]),
        DeviceKind::Incubator => (&[], &["load", "unload"]),
        DeviceKind::Pump => (&["rate"], &["stop"]),
        DeviceKind::TemperatureModule => (&["temperature"], &["deactivate"]),
        DeviceKind::HeaterShaker => (
            &["temperature", "speed"],
            &["stop_shaking", "open_latch", "close_latch", "deactivate"],
        ),
        DeviceKind::Sensor | DeviceKind::Bioreactor => (&[], &[]),
    }
}

/// Names the drivers pass to actions of each kind, beyond the declared params.
fn action_params(kind: DeviceKind, action: &str) -> &'static [&'static str] {
    match (kind, action) {
        (DeviceKind::LiquidHandler, "move_to" | "pick_up_tip" | "drop_tip") => &["x", "y", "z"],
        (DeviceKind::LiquidHandler, "aspirate" | "dispense") => &["volume", "held", "x", "y", "z"],
        (DeviceKind::LiquidHandler, "mix") => &["volume", "cycles", "x", "y", "z"],
        (DeviceKind::Incubator, "load" | "unload") => &["slot"],
        (DeviceKind::Pump, "dispense") => &["volume", "rate", "duration"],
        _ => &[],
    }
}

fn span(r: std::ops::Range<usize>) -> Span {
    Span::new(r.start, r.end)
}

/// Loads a profile file from disk.
pub fn load(path: &Path) -> Result<Profile, ProfileError> {
    let text = read_bounded(path)?;
    let file = SourceFile::new(path, text);
    let (profile, diagnostics) = parse(file);
    match profile {
        Some(p) if !diagnostics.iter().any(Diagnostic::is_error) => Ok(p),
        _ => Err(ProfileError::Invalid {
            path: path.to_path_buf(),
            diagnostics,
        }),
    }
}

pub fn read_bounded(path: &Path) -> Result<String, ProfileError> {
    let meta = std::fs::metadata(path).map_err(|e| ProfileError::Io {
        path: path.to_path_buf(),
        error: e.to_string(),
    })?;
    if meta.len() > MAX_PROFILE_BYTES as u64 {
        return Err(ProfileError::Io {
            path: path.to_path_buf(),
            error: format!("larger than {} KiB", MAX_PROFILE_BYTES / 1024),
        });
    }
    if !meta.is_file() {
        return Err(ProfileError::Io {
            path: path.to_path_buf(),
            error: "not a regular file".into(),
        });
    }
    // The size said is not trusted: read one byte past the limit at most.
    use std::io::Read;
    let io = |e: std::io::Error| ProfileError::Io {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_PROFILE_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() > MAX_PROFILE_BYTES {
        return Err(ProfileError::Io {
            path: path.to_path_buf(),
            error: format!("larger than {} KiB", MAX_PROFILE_BYTES / 1024),
        });
    }
    Ok(text)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read {}: {error}", path.display())]
    Io { path: PathBuf, error: String },
    #[error("{} has {} error(s)", path.display(), diagnostics.iter().filter(|d| d.is_error()).count())]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
    #[error("no profile `{name}` in {}{}", dirs.join(", "), hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    NotFound {
        name: String,
        dirs: Vec<String>,
        hint: Option<String>,
    },
}

/// Finds a profile by name (`opentrons-temperature-module`) in `dirs`, or by path.
pub fn find(name: &str, dirs: &[PathBuf]) -> Result<PathBuf, ProfileError> {
    let as_path = Path::new(name);
    if name.ends_with(".toml") || as_path.components().count() > 1 {
        return Ok(as_path.to_path_buf());
    }
    let mut known = Vec::new();
    for d in dirs {
        let candidate = d.join(format!("{name}.toml"));
        if candidate.is_file() {
            return Ok(candidate);
        }
        if let Ok(entries) = std::fs::read_dir(d) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "toml")
                    && let Some(stem) = p.file_stem()
                {
                    known.push(stem.to_string_lossy().to_string());
                }
            }
        }
    }
    Err(ProfileError::NotFound {
        name: name.to_string(),
        dirs: dirs.iter().map(|d| d.display().to_string()).collect(),
        hint: did_you_mean(name, known.iter().map(String::as_str)),
    })
}

/// Parses and checks profile text; every problem becomes a diagnostic.
pub fn parse(file: SourceFile) -> (Option<Profile>, Vec<Diagnostic>) {
    let file = Arc::new(file);
    let mut out = Vec::new();
    let doc: ProfileDoc =
        match parse_document(&file.text, "profile-syntax", "docs/device-profiles.md") {
            Ok(doc) => doc,
            Err(d) => {
                out.push(*d);
                return (None, out);
            }
        };
    check_format(&doc.format, FORMAT, &mut out);
    let kind_name = doc.profile.kind.get_ref();
    let Some(kind) = DeviceKind::from_name(kind_name) else {
        out.push(
            Diagnostic::error(
                "unknown-kind",
                span(doc.profile.kind.span()),
                format!("unknown device kind `{kind_name}`"),
            )
            .with_optional_hint(did_you_mean(
                kind_name,
                DeviceKind::ALL.iter().map(|k| k.name()),
            )),
        );
        return (None, out);
    };
    if kind == DeviceKind::Bioreactor {
        out.push(
            Diagnostic::error(
                "composite-kind",
                span(doc.profile.kind.span()),
                "a bioreactor is not one instrument",
            )
            .with_hint(
                "describe its probes, controllers and pumps as profiles and combine them \
                 as parts of a bioreactor in the lab file",
            ),
        );
        return (None, out);
    }
    let spec = kind.spec();
    let modbus = matches!(doc.link.get_ref(), LinkDef::Modbus(_));
    let settings: BTreeSet<String> = doc.settings.keys().cloned().collect();
    let mut unit_factors = IndexMap::new();
    let mut limits = IndexMap::new();

    for (name, sig) in &doc.signals {
        let s = span(sig.span());
        let dimension = match spec.signal(name) {
            Some(c) => Some(c.dimension),
            None => {
                let close = did_you_mean(name, spec.signals.iter().map(|c| c.name));
                if close.is_some() {
                    out.push(
                        Diagnostic::error(
                            "unknown-signal",
                            s,
                            format!("{} has no signal `{name}`", kind.with_article()),
                        )
                        .with_optional_hint(close),
                    );
                }
                None
            }
        };
        if let Some(dim) = dimension {
            unit_factor(
                name,
                sig.get_ref().unit.as_ref(),
                dim,
                &mut unit_factors,
                &mut out,
            );
        }
        let sig = sig.get_ref();
        let scope = &settings;
        if modbus {
            if sig.address.is_none() {
                out.push(Diagnostic::error(
                    "missing-address",
                    s,
                    format!("Modbus signal `{name}` needs an `address`"),
                ));
            }
            if sig.query.is_some() || sig.reply.is_some() {
                out.push(wrong_link(s, "query/reply", "serial"));
            }
        } else {
            if sig.query.is_none() || sig.reply.is_none() {
                out.push(
                    Diagnostic::error(
                        "missing-query",
                        s,
                        format!("serial signal `{name}` needs a `query` and a `reply` pattern"),
                    )
                    .with_hint(
                        "reply = 'C:(?<value>-?[0-9.]+)' takes the number from the `value` capture",
                    ),
                );
            }
            if sig.address.is_some() || sig.block.is_some() {
                out.push(wrong_link(s, "address/block", "Modbus"));
            }
            if let Some(re) = &sig.reply {
                let capture = sig.capture.as_deref().unwrap_or("value");
                if !re.0.capture_names().flatten().any(|c| c == capture) {
                    out.push(
                        Diagnostic::error(
                            "missing-capture",
                            s,
                            format!("the reply pattern of `{name}` has no `{capture}` capture"),
                        )
                        .with_hint("write (?<value>...) around the number"),
                    );
                }
            }
        }
        for t in [
            sig.query.as_ref(),
            sig.address.as_ref(),
            sig.scale.as_ref(),
            sig.offset.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            names_in_scope(&file.text, t, scope, &[], s, &mut out);
        }
        if let Some(b) = &sig.block {
            names_in_scope(&file.text, &b.start, scope, &[], s, &mut out);
            if b.count == 0 || b.count > 125 {
                out.push(Diagnostic::error(
                    "bad-block",
                    s,
                    "a read block is 1 to 125 registers",
                ));
            }
        }
    }

    for (name, sp) in &doc.setpoints {
        let s = span(sp.span());
        let Some(c) = spec.setpoint(name) else {
            out.push(
                Diagnostic::error(
                    "unknown-setpoint",
                    s,
                    format!("{} has no setpoint `{name}`", kind.with_article()),
                )
                .with_optional_hint(did_you_mean(name, spec.setpoints.iter().map(|c| c.name))),
            );
            continue;
        };
        let sp = sp.get_ref();
        unit_factor(
            name,
            sp.unit.as_ref(),
            c.dimension,
            &mut unit_factors,
            &mut out,
        );
        match parse_limits(sp.limits.get_ref(), c.dimension) {
            Ok(l) if l.min <= l.max => {
                limits.insert(name.clone(), l);
            }
            Ok(_) => out.push(Diagnostic::error(
                "bad-limits",
                span(sp.limits.span()),
                "the lower limit is above the upper limit",
            )),
            Err(e) => out.push(
                Diagnostic::error("bad-limits", span(sp.limits.span()), e.to_string())
                    .with_hint(e.hint()),
            ),
        }
        let ways = usize::from(sp.command.is_some())
            + usize::from(!sp.steps.is_empty())
            + usize::from(sp.address.is_some());
        if ways != 1 {
            out.push(
                Diagnostic::error(
                    "setpoint-write",
                    s,
                    format!(
                        "setpoint `{name}` needs exactly one of `command`, `steps` or `address`"
                    ),
                )
                .with_hint("serial: command = \"M104 S{value:.0}\"; Modbus: address = 2"),
            );
        }
        if sp.command.is_some() && modbus || sp.address.is_some() && !modbus {
            out.push(wrong_link(
                s,
                if modbus { "command" } else { "address" },
                if modbus { "serial" } else { "Modbus" },
            ));
        }
        for t in [
            sp.command.as_ref(),
            sp.address.as_ref(),
            sp.scale.as_ref(),
            sp.offset.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            names_in_scope(&file.text, t, &settings, &["value"], s, &mut out);
        }
        check_steps(
            &file.text,
            &sp.steps,
            &doc,
            kind,
            &settings,
            &["value"],
            modbus,
            &mut out,
        );
        for signal in [
            sp.readback.as_ref(),
            sp.reached.as_ref().map(|r| &r.get_ref().signal),
        ]
        .into_iter()
        .flatten()
        {
            if !doc.signals.contains_key(signal.get_ref()) {
                out.push(
                    Diagnostic::error(
                        "unknown-signal",
                        span(signal.span()),
                        format!("the profile has no signal `{}`", signal.get_ref()),
                    )
                    .with_optional_hint(did_you_mean(
                        signal.get_ref(),
                        doc.signals.keys().map(String::as_str),
                    )),
                );
            }
        }
    }

    for (name, action) in &doc.actions {
        let params: Vec<&str> = action
            .get_ref()
            .params
            .iter()
            .map(String::as_str)
            .chain(action_params(kind, name).iter().copied())
            .collect();
        check_steps(
            &file.text,
            &action.get_ref().steps,
            &doc,
            kind,
            &settings,
            &params,
            modbus,
            &mut out,
        );
        if action.get_ref().steps.is_empty() {
            out.push(Diagnostic::error(
                "empty-action",
                span(action.span()),
                format!("action `{name}` has no steps"),
            ));
        }
    }
    check_steps(
        &file.text,
        &doc.connect,
        &doc,
        kind,
        &settings,
        &[],
        modbus,
        &mut out,
    );
    check_steps(
        &file.text,
        &doc.safe_state,
        &doc,
        kind,
        &settings,
        &[],
        modbus,
        &mut out,
    );
    if let Some(i) = &doc.identify {
        check_steps(
            &file.text,
            std::slice::from_ref(i),
            &doc,
            kind,
            &settings,
            &[],
            modbus,
            &mut out,
        );
    }

    let (need_setpoints, need_actions) = required(kind);
    let whole = span(doc.profile.kind.span());
    for sp in need_setpoints {
        if !doc.setpoints.contains_key(*sp) {
            out.push(Diagnostic::error(
                "missing-setpoint",
                whole,
                format!("{} profile needs a `{sp}` setpoint", kind.with_article()),
            ));
        }
    }
    for a in need_actions {
        if !doc.actions.contains_key(*a) {
            out.push(
                Diagnostic::error(
                    "missing-action",
                    whole,
                    format!("{} profile needs an action `{a}`", kind.with_article()),
                )
                .with_hint(format!("[actions.{a}] with the steps that do it")),
            );
        }
    }
    if kind == DeviceKind::LiquidHandler && doc.deck.is_none() {
        out.push(
            Diagnostic::error(
                "missing-deck",
                whole,
                "a liquid handler profile needs a [deck]",
            )
            .with_hint("[deck] slots = { \"1\" = [0.0, 0.0, 0.0], ... } and trash = [x, y, z]"),
        );
    }
    if let Some(deck) = &doc.deck {
        for key in deck.get_ref().slots.keys() {
            if key.parse::<u32>().map_or(true, |n| n == 0) {
                out.push(Diagnostic::error(
                    "bad-slot",
                    span(deck.span()),
                    format!("deck slot `{key}` is not a slot number"),
                ));
            }
        }
    }
    if let Some(sim) = &doc.simulation {
        for rule in &sim.get_ref().respond {
            if modbus {
                out.push(wrong_link(span(rule.span()), "respond", "serial"));
                break;
            }
            if let Some(set) = &rule.get_ref().set
                && !doc.setpoints.contains_key(set)
                && spec.setpoint(set).is_none()
            {
                out.push(Diagnostic::error(
                    "unknown-setpoint",
                    span(rule.span()),
                    format!(
                        "the simulation sets `{set}`, which is not a setpoint of {}",
                        kind.with_article()
                    ),
                ));
            }
        }
    }

    let interlocks = check_interlocks(&doc, kind, &mut out);
    let id = file
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let profile = Profile {
        id,
        file,
        kind,
        doc,
        limits,
        unit_factors,
        interlocks,
    };
    (Some(profile), out)
}

/// States, the actions that set them, and interlocks: every name must exist.
fn check_interlocks(
    doc: &ProfileDoc,
    kind: DeviceKind,
    out: &mut Vec<Diagnostic>,
) -> Vec<Interlock> {
    let unknown_state = |name: &str, at: Span| {
        Diagnostic::error(
            "unknown-state",
            at,
            format!("no state `{name}` in [states]"),
        )
        .with_optional_hint(did_you_mean(name, doc.states.keys().map(String::as_str)))
    };
    for (name, action) in &doc.actions {
        for state in action.get_ref().sets.keys() {
            if !doc.states.contains_key(state) {
                out.push(unknown_state(state, span(action.span())).with_hint(format!(
                    "declare it, e.g. [states] {state} = \"unknown\" (action `{name}` sets it)"
                )));
            }
        }
    }
    let mut interlocks = Vec::new();
    for def in &doc.interlocks {
        let at = span(def.span());
        let d = def.get_ref();
        let guarded = match (&d.setpoint, &d.action) {
            (Some(sp), None) => {
                let name = sp.get_ref();
                if !doc.setpoints.contains_key(name) {
                    out.push(Diagnostic::error(
                        "unknown-setpoint",
                        span(sp.span()),
                        format!("interlock `{}` guards `{name}`, which is not a setpoint of this profile", d.id),
                    ).with_optional_hint(did_you_mean(name, doc.setpoints.keys().map(String::as_str))));
                    continue;
                }
                let above = match &d.above {
                    None => None,
                    Some(text) => {
                        let dimension = kind
                            .spec()
                            .setpoint(name)
                            .map_or(crate::units::Dimension::Unitless, |c| c.dimension);
                        match crate::units::parse_quantity(text.get_ref(), dimension) {
                            Ok(q) => Some(q.value),
                            Err(e) => {
                                out.push(
                                    Diagnostic::error(
                                        "bad-interlock",
                                        span(text.span()),
                                        e.to_string(),
                                    )
                                    .with_hint(e.hint()),
                                );
                                continue;
                            }
                        }
                    }
                };
                Guarded::Setpoint {
                    name: name.clone(),
                    above,
                }
            }
            (None, Some(action)) => {
                let name = action.get_ref();
                if !doc.actions.contains_key(name) {
                    out.push(Diagnostic::error(
                        "unknown-action",
                        span(action.span()),
                        format!("interlock `{}` guards `{name}`, which is not an action of this profile", d.id),
                    ).with_optional_hint(did_you_mean(name, doc.actions.keys().map(String::as_str))));
                    continue;
                }
                if d.above.is_some() {
                    out.push(Diagnostic::error(
                        "bad-interlock",
                        at,
                        format!(
                            "interlock `{}`: `above` applies to a setpoint, not an action",
                            d.id
                        ),
                    ));
                }
                Guarded::Action(name.clone())
            }
            _ => {
                out.push(
                    Diagnostic::error(
                        "bad-interlock",
                        at,
                        format!(
                            "interlock `{}` needs exactly one of `setpoint` or `action`",
                            d.id
                        ),
                    )
                    .with_hint("setpoint = \"speed\", above = \"0 rpm\"; or action = \"load\""),
                );
                continue;
            }
        };
        if d.requires.is_empty() {
            out.push(
                Diagnostic::error(
                    "bad-interlock",
                    at,
                    format!("interlock `{}` requires nothing", d.id),
                )
                .with_hint("requires = { latch = \"closed\" }"),
            );
            continue;
        }
        let mut ok = true;
        for state in d.requires.keys() {
            if !doc.states.contains_key(state) {
                out.push(unknown_state(state, at));
                ok = false;
            }
        }
        if ok {
            interlocks.push(Interlock {
                id: d.id.clone(),
                guarded,
                requires: d
                    .requires
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                message: d.message.clone(),
            });
        }
    }
    interlocks
}

/// A step's reference to a setpoint or action of the profile, which must exist.
fn reference<T>(
    name: &toml::Spanned<String>,
    what: &str,
    known: &IndexMap<String, T>,
    out: &mut Vec<Diagnostic>,
) {
    if known.contains_key(name.get_ref()) {
        return;
    }
    let code = if what == "setpoint" {
        "unknown-setpoint"
    } else {
        "unknown-action"
    };
    out.push(
        Diagnostic::error(
            code,
            span(name.span()),
            format!("the profile has no {what} `{}`", name.get_ref()),
        )
        .with_optional_hint(did_you_mean(
            name.get_ref(),
            known.keys().map(String::as_str),
        )),
    );
}

/// Deserialises a TOML document; a syntax or shape error becomes a diagnostic
/// at its place. Shared by profiles and lab files.
pub(crate) fn parse_document<T: serde::de::DeserializeOwned>(
    text: &str,
    code: &'static str,
    doc_page: &str,
) -> Result<T, Box<Diagnostic>> {
    toml::from_str(text).map_err(|e| {
        Box::new(
            Diagnostic::error(
                code,
                e.span().map(span).unwrap_or_default(),
                e.message().trim().to_string(),
            )
            .with_hint(format!("see {doc_page} for every key")),
        )
    })
}

/// The `format = "..."` line must name the expected format.
pub(crate) fn check_format(
    format: &toml::Spanned<String>,
    expected: &str,
    out: &mut Vec<Diagnostic>,
) {
    if format.get_ref() != expected {
        out.push(
            Diagnostic::error(
                "unknown-format",
                span(format.span()),
                format!("unknown format `{}`", format.get_ref()),
            )
            .with_hint(format!("write format = \"{expected}\"")),
        );
    }
}

fn wrong_link(s: Span, keys: &str, link: &str) -> Diagnostic {
    Diagnostic::error(
        "wrong-link",
        s,
        format!("`{keys}` belongs to {link} profiles, and this link is not {link}"),
    )
}

fn unit_factor(
    name: &str,
    unit: Option<&toml::Spanned<String>>,
    dimension: Dimension,
    factors: &mut IndexMap<String, f64>,
    out: &mut Vec<Diagnostic>,
) {
    let Some(unit) = unit else {
        return;
    };
    let written = unit.get_ref().trim();
    let text = if written.is_empty() {
        "1".to_string()
    } else {
        format!("1 {written}")
    };
    match parse_quantity(&text, dimension) {
        Ok(q) => {
            factors.insert(name.to_string(), q.value);
        }
        Err(e) => out.push(
            Diagnostic::error(
                "bad-unit",
                span(unit.span()),
                format!(
                    "`{written}` is not a unit of {} for `{name}`",
                    dimension.name()
                ),
            )
            .with_hint(format!("{}; {}", e.hint(), dimension.units())),
        ),
    }
}

fn names_in_scope(
    text: &str,
    t: &Template,
    settings: &BTreeSet<String>,
    extra: &[&str],
    s: Span,
    out: &mut Vec<Diagnostic>,
) {
    for name in t.names() {
        if !settings.contains(&name) && !extra.contains(&name.as_str()) {
            // Point at the name inside the template when it can be found.
            // A table's span may be only its header: look up to the next table.
            let end = text
                .get(s.start + 1..)
                .and_then(|rest| rest.find("\n["))
                .map_or(text.len(), |i| s.start + 1 + i)
                .max(s.end)
                .min(text.len());
            let s = text
                .get(s.start..end)
                .and_then(|table| table.find(&format!("{{{name}")))
                .map_or(s, |i| {
                    Span::new(s.start + i + 1, s.start + i + 1 + name.len())
                });
            let candidates: Vec<&str> = settings
                .iter()
                .map(String::as_str)
                .chain(extra.iter().copied())
                .collect();
            out.push(
                Diagnostic::error(
                    "unknown-name",
                    s,
                    format!(
                        "`{{{name}}}` in `{}` is neither a setting nor a parameter here",
                        t.as_str()
                    ),
                )
                .with_hint(match did_you_mean(&name, candidates.iter().copied()) {
                    Some(h) => h,
                    None if candidates.is_empty() => "declare it under [settings]".to_string(),
                    None => format!("known here: {}", candidates.join(", ")),
                }),
            );
        }
    }
}

// One private helper over one profile's text, document, kind, settings and
// link: a struct for them would only rename the arguments.
#[allow(clippy::too_many_arguments)]
fn check_steps(
    text: &str,
    steps: &[toml::Spanned<StepDef>],
    doc: &ProfileDoc,
    kind: DeviceKind,
    settings: &BTreeSet<String>,
    params: &[&str],
    modbus: bool,
    out: &mut Vec<Diagnostic>,
) {
    for step in steps {
        let s = span(step.span());
        let st = step.get_ref();
        let verbs = st.verbs();
        if verbs.len() != 1 {
            out.push(
                Diagnostic::error(
                    "step-verb",
                    s,
                    if verbs.is_empty() {
                        "a step needs one of send, poll, write, read, wait, send_break, set, action"
                            .to_string()
                    } else {
                        format!("a step does one thing; this one has {}", verbs.join(", "))
                    },
                )
                .with_hint("split it into several steps"),
            );
            continue;
        }
        let serial_only = st.send.is_some() || st.poll.is_some() || st.send_break.is_some();
        let modbus_only = st.write.is_some() || st.read.is_some();
        if serial_only && modbus {
            out.push(wrong_link(s, verbs[0], "serial"));
        }
        if modbus_only && !modbus {
            out.push(wrong_link(s, verbs[0], "Modbus"));
        }
        if st.poll.is_some() && st.until.is_none() {
            out.push(Diagnostic::error(
                "poll-until",
                s,
                "a `poll` step needs an `until` pattern",
            ));
        }
        if (st.write.is_some() || st.set.is_some()) && st.value.is_none() {
            out.push(Diagnostic::error(
                "missing-value",
                s,
                format!("a `{}` step needs a `value`", verbs[0]),
            ));
        }
        for t in [
            st.send.as_ref(),
            st.poll.as_ref(),
            st.write.as_ref(),
            st.value.as_ref(),
            st.read.as_ref(),
            st.equals.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            names_in_scope(text, t, settings, params, s, out);
        }
        if let Some(set) = &st.set {
            reference(set, "setpoint", &doc.setpoints, out);
        }
        if let Some(a) = &st.action {
            reference(a, "action", &doc.actions, out);
        }
        let _ = kind;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Vec<(String, String)> {
        let (_, d) = parse(SourceFile::new("t.toml", text));
        d.into_iter()
            .map(|d| (d.code.to_string(), d.message))
            .collect()
    }

    const TEMP_MODULE: &str = r#"
format = "biofoundry.profile/1"
[profile]
name = "T"
vendor = "V"
model = "M"
kind = "temperature_module"
source = "test"
[link]
type = "serial"
baud = 115200
[signals.temperature]
unit = "C"
query = "M105"
reply = 'C:(?<value>-?[0-9.]+)'
[setpoints.temperature]
unit = "C"
limits = "4..95 C"
command = "M104 S{value:.0}"
[actions.deactivate]
steps = [{ send = "M18" }]
"#;

    #[test]
    fn a_good_profile_loads() {
        let (p, d) = parse(SourceFile::new("temp.toml", TEMP_MODULE));
        assert!(d.is_empty(), "{d:?}");
        let p = p.unwrap();
        assert_eq!(p.id, "temp");
        assert_eq!(p.kind, DeviceKind::TemperatureModule);
        assert_eq!(p.limits["temperature"].max, 95.0);
    }

    #[test]
    fn only_a_regular_file_of_bounded_size_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_bounded(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_PROFILE_BYTES + 1]).unwrap();
        assert!(
            read_bounded(&big)
                .unwrap_err()
                .to_string()
                .contains("larger than")
        );
        let ok = dir.path().join("ok.toml");
        std::fs::write(&ok, "x = 1").unwrap();
        assert_eq!(read_bounded(&ok).unwrap(), "x = 1");
    }

    #[test]
    fn interlocks_are_checked_and_decide() {
        let with = |tail: &str| {
            format!(
                "{TEMP_MODULE}[actions.lid]\nsteps = [{{ send = \"M1\" }}]\nsets = {{ lid = \"closed\" }}\n{tail}"
            )
        };
        let good = with(
            "[states]\nlid = \"unknown\"\n[[interlocks]]\nid = \"hot\"\nsetpoint = \"temperature\"\nabove = \"40 C\"\nrequires = { lid = \"closed\" }\nmessage = \"close the lid\"\n",
        );
        let (p, d) = parse(SourceFile::new("t.toml", good.as_str()));
        assert!(d.is_empty(), "{d:?}");
        let p = p.unwrap();
        let unknown = |_: &str| None;
        let closed = |_: &str| Some("closed".to_string());
        assert_eq!(p.setpoint_refusal("temperature", 37.0, &unknown), None);
        let r = p.setpoint_refusal("temperature", 60.0, &unknown).unwrap();
        assert_eq!(
            r,
            "interlock `hot`: close the lid (lid is `unknown`, needs `closed`)"
        );
        assert_eq!(p.setpoint_refusal("temperature", 60.0, &closed), None);
        assert_eq!(
            p.action_sets("lid"),
            [("lid".to_string(), "closed".to_string())]
        );

        let codes = |tail: &str| -> Vec<String> {
            check(&with(tail)).into_iter().map(|(c, _)| c).collect()
        };
        let states = "[states]\nlid = \"unknown\"\n";
        let il =
            |body: &str| format!("{states}[[interlocks]]\nid = \"x\"\nmessage = \"m\"\n{body}\n");
        assert_eq!(
            codes(&il("setpoint = \"temp\"\nrequires = { lid = \"closed\" }")),
            ["unknown-setpoint"]
        );
        assert_eq!(
            codes(&il("action = \"lids\"\nrequires = { lid = \"closed\" }")),
            ["unknown-action"]
        );
        assert_eq!(
            codes(&il("requires = { lid = \"closed\" }")),
            ["bad-interlock"]
        );
        assert_eq!(
            codes(&il(
                "setpoint = \"temperature\"\nabove = \"40 rpm\"\nrequires = { lid = \"closed\" }"
            )),
            ["bad-interlock"]
        );
        assert_eq!(
            codes(&il("action = \"lid\"\nrequires = {}")),
            ["bad-interlock"]
        );
        assert_eq!(
            codes(&il("action = \"lid\"\nrequires = { door = \"closed\" }")),
            ["unknown-state"]
        );
        // An action setting a state nobody declared.
        assert_eq!(codes(""), ["unknown-state"]);
    }

    #[test]
    fn mistakes_are_found() {
        let bad = TEMP_MODULE.replace("{value:.0}", "{valu:.0}");
        let d = check(&bad);
        assert_eq!(d[0].0, "unknown-name", "{d:?}");
        let bad = TEMP_MODULE.replace("(?<value>", "(?<v>");
        assert_eq!(check(&bad)[0].0, "missing-capture");
        let bad = TEMP_MODULE.replace(
            "steps = [{ send = \"M18\" }]",
            "steps = [{ send = \"M18\", wait = \"1 s\" }]",
        );
        assert_eq!(check(&bad)[0].0, "step-verb");
        let bad = TEMP_MODULE.replace("[actions.deactivate]", "[actions.deactivat]");
        assert_eq!(check(&bad)[0].0, "missing-action");
        let bad = TEMP_MODULE.replace("4..95 C", "4..95 rpm");
        assert_eq!(check(&bad)[0].0, "bad-limits");
        let bad = TEMP_MODULE.replace("baud = 115200", "baud = 115200\nbogus = 1");
        assert_eq!(check(&bad)[0].0, "profile-syntax");
        let bad = TEMP_MODULE.replace("[signals.temperature]", "[signals.temprature]");
        assert_eq!(check(&bad)[0].0, "unknown-signal");
        let bad = TEMP_MODULE.replace("M104 S{value:.0}", "M104 S{value:.0");
        let d = check(&bad);
        assert_eq!(d[0].0, "profile-syntax");
        assert!(d[0].1.contains("unclosed"), "{d:?}");
    }
}
