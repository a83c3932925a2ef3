//! The lab file: one per workcell (`format = "biofoundry.lab/1"`). It names the
//! controller, its data directory and MQTT broker, and every device instance:
//! id, profile, transport, per-instance settings, and for a bioreactor the parts
//! it is made of. Errors are reported like protocol errors (file:line:col and a
//! hint). docs/lab-file.md describes every key.

mod build;
mod interlocks;
mod sim;

pub use build::{LabRuntime, SimBacking, connect_lab};
pub use sim::{SimulatedWorkcell, parse_fault, serve_lab};

use crate::catalogue::DeviceKind;
use crate::check::{CheckReport, check_source};
use crate::diagnostics::{Diagnostic, did_you_mean};
use crate::profile::{self, Profile};
use crate::protocol::ParamOverride;
use crate::runtime::executor::{BindError, bind_roles};
use crate::source::{SourceFile, Span};
use crate::transport::{SerialSettings, Transport};
use crate::units::Limits;
use crate::validate::Capability;
use indexmap::IndexMap;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;

pub const FORMAT: &str = "biofoundry.lab/1";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabDoc {
    pub format: Spanned<String>,
    pub controller: Controller,
    pub mqtt: Option<Spanned<MqttSettings>>,
    #[serde(default)]
    pub telemetry: Telemetry,
    /// Present when the workcell is simulated (by `biofoundry sim` or `sim://`).
    pub simulation: Option<Spanned<LabSimulation>>,
    #[serde(default, rename = "device")]
    pub devices: Vec<Spanned<DeviceEntry>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    /// Site, cell and id are MQTT topic levels: `bf/v1/<site>/<cell>/<id>`.
    pub site: Spanned<String>,
    pub cell: Spanned<String>,
    pub id: Spanned<String>,
    /// Journal, outbox and reports; relative paths start at the lab file's folder.
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    /// Folders searched for profiles, relative to the lab file; the shipped
    /// `devices/` folder is searched last.
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Protocols MES may start by name (relative to the lab file).
    pub protocols: Option<String>,
}

fn default_data_dir() -> String {
    "biofoundry-data".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSettings {
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// A file holding the password (never the password itself).
    pub password_file: Option<String>,
    #[serde(default)]
    pub tls: bool,
    pub ca_file: Option<String>,
    /// Start a broker inside the controller on loopback (single workcell).
    #[serde(default)]
    pub embedded: bool,
    /// Shared key file for HMAC-SHA256 command signatures.
    pub command_key_file: Option<String>,
    #[serde(default)]
    pub keep_alive: Option<crate::profile::Duration>,
    /// The outbox keeps at most this many unsent messages.
    pub outbox_limit: Option<u64>,
}

fn default_mqtt_port() -> u16 {
    1883
}

/// A simulated workcell's clock: `sim` and `run` on this lab both use it, so
/// that a 24-hour protocol can be watched in minutes over real wires.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSimulation {
    #[serde(default = "one")]
    pub speed: f64,
    #[serde(default = "one_u64")]
    pub seed: u64,
}

fn one() -> f64 {
    1.0
}

fn one_u64() -> u64 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// How often signals are read and published when their profile gives no `poll`.
    #[serde(default = "ten_seconds")]
    pub every: crate::profile::Duration,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            every: ten_seconds(),
        }
    }
}

fn ten_seconds() -> crate::profile::Duration {
    crate::profile::Duration(10.0)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    pub id: Spanned<String>,
    /// Required for a bioreactor made of parts; otherwise it must match the profile's.
    pub kind: Option<Spanned<String>>,
    pub profile: Option<Spanned<String>>,
    pub transport: Option<Spanned<String>>,
    #[serde(default)]
    pub settings: IndexMap<String, f64>,
    #[serde(default)]
    pub parts: IndexMap<String, Spanned<PartEntry>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartEntry {
    pub profile: Spanned<String>,
    pub transport: Spanned<String>,
    #[serde(default)]
    pub settings: IndexMap<String, f64>,
}

/// One instrument of the lab, resolved: its profile and transport.
#[derive(Debug, Clone)]
pub struct Instrument {
    pub profile: Arc<Profile>,
    pub transport: Transport,
    pub settings: IndexMap<String, f64>,
}

#[derive(Debug, Clone)]
pub enum LabDevice {
    Instrument(Instrument),
    Bioreactor { parts: IndexMap<String, Instrument> },
}

/// A checked lab file.
#[derive(Debug, Clone)]
pub struct LabFile {
    pub file: Arc<SourceFile>,
    pub doc: LabDoc,
    pub devices: IndexMap<String, LabDevice>,
    /// The lab file's folder: relative paths start here.
    pub base: PathBuf,
}

impl LabFile {
    pub fn kind(&self, id: &str) -> Option<DeviceKind> {
        match self.devices.get(id)? {
            LabDevice::Instrument(i) => Some(i.profile.kind),
            LabDevice::Bioreactor { .. } => Some(DeviceKind::Bioreactor),
        }
    }

    /// The workcell is simulated: every instrument is a `sim://` simulator, or
    /// the lab file says so with `[simulation]` (so a clock speed may apply).
    pub fn all_simulated(&self) -> bool {
        self.doc.simulation.is_some()
            || self.devices.values().all(|d| match d {
                LabDevice::Instrument(i) => matches!(i.transport, Transport::Sim { .. }),
                LabDevice::Bioreactor { parts } => parts
                    .values()
                    .all(|i| matches!(i.transport, Transport::Sim { .. })),
            })
    }

    /// The clock speed the lab file gives a simulated workcell (1 otherwise).
    pub fn simulation_speed(&self) -> f64 {
        self.doc
            .simulation
            .as_ref()
            .map_or(1.0, |s| s.get_ref().speed)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join(&self.doc.controller.data_dir)
    }

    /// The limits of a setpoint of a device, from its profile (or the part that provides it).
    pub fn setpoint_limits(&self, id: &str, setpoint: &str) -> Option<Limits> {
        match self.devices.get(id)? {
            LabDevice::Instrument(i) => i.profile.limits.get(setpoint).copied(),
            LabDevice::Bioreactor { parts } => {
                let part = parts.get(setpoint)?;
                let name = match part.profile.kind {
                    DeviceKind::Pump => "rate",
                    _ => "temperature",
                };
                part.profile
                    .limits
                    .get(setpoint)
                    .or_else(|| part.profile.limits.get(name))
                    .copied()
            }
        }
    }

    pub fn slots(&self, id: &str) -> u32 {
        match self.devices.get(id) {
            Some(LabDevice::Instrument(i)) => i.profile.slots(),
            _ => 0,
        }
    }
}

/// The folder of the profiles shipped with the controller.
pub fn shipped_profiles() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("devices")];
    if let Ok(exe) = std::env::current_exe()
        && let Some(root) = exe.ancestors().nth(3)
    {
        // target/<profile>/biofoundry → the source tree's devices/.
        dirs.push(root.join("devices"));
    }
    dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("devices"));
    dirs
}

fn span(r: std::ops::Range<usize>) -> Span {
    Span::new(r.start, r.end)
}

/// Reads and checks a lab file.
pub fn load(path: &Path) -> Result<LabFile, (Arc<SourceFile>, Vec<Diagnostic>)> {
    let text = match profile::read_bounded(path) {
        Ok(t) => t,
        Err(e) => {
            let file = Arc::new(SourceFile::new(path, ""));
            return Err((
                file,
                vec![Diagnostic::error(
                    "unreadable",
                    Span::default(),
                    e.to_string(),
                )],
            ));
        }
    };
    let (lab, diagnostics) = parse(SourceFile::new(path, text));
    match lab {
        Some(l) if !diagnostics.iter().any(Diagnostic::is_error) => {
            // Warnings (a secret file others can read, a password sent in the
            // clear) do not stop the controller, so they go to its log.
            for d in &diagnostics {
                let (line, column) = l.file.line_col(d.span.start);
                let hint = d
                    .hint
                    .as_deref()
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                tracing::warn!(target: "lab", "{}:{line}:{column}: {} [{}]{hint}", path.display(), d.message, d.code);
            }
            Ok(l)
        }
        Some(l) => Err((l.file, diagnostics)),
        None => Err((Arc::new(SourceFile::new(path, "")), diagnostics)),
    }
}

/// Parses lab text; profiles are looked up relative to the file's folder.
pub fn parse(file: SourceFile) -> (Option<LabFile>, Vec<Diagnostic>) {
    let file = Arc::new(file);
    let mut out = Vec::new();
    let doc: LabDoc = match profile::parse_document(&file.text, "lab-syntax", "docs/lab-file.md") {
        Ok(d) => d,
        Err(d) => {
            out.push(*d);
            return (None, out);
        }
    };
    profile::check_format(&doc.format, FORMAT, &mut out);
    if let Some(sim) = &doc.simulation {
        let speed = sim.get_ref().speed;
        if !(speed.is_finite() && speed > 0.0 && speed <= 100_000.0) {
            out.push(
                Diagnostic::error(
                    "bad-speed",
                    span(sim.span()),
                    format!("speed {speed} is not a clock speed"),
                )
                .with_hint("a positive number up to 100000: 60 runs an hour in a minute"),
            );
        }
    }
    let base = file
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    check_mqtt(&doc, &base, &mut out);
    let mut dirs: Vec<PathBuf> = doc
        .controller
        .profiles
        .iter()
        .map(|d| base.join(d))
        .collect();
    dirs.push(base.join("devices"));
    dirs.extend(shipped_profiles());
    let mut loaded: HashMap<PathBuf, Option<Arc<Profile>>> = HashMap::new();
    let mut resolve = |name: &Spanned<String>, out: &mut Vec<Diagnostic>| -> Option<Arc<Profile>> {
        let path = match profile::find(name.get_ref(), &dirs) {
            Ok(p) if p.is_relative() && !p.exists() => base.join(p),
            Ok(p) => p,
            Err(e) => {
                let hint = match &e {
                    profile::ProfileError::NotFound { hint: Some(h), .. } => h.clone(),
                    _ => "profiles are TOML files in devices/; `biofoundry devices profiles` lists them".into(),
                };
                out.push(
                    Diagnostic::error("unknown-profile", span(name.span()), e.to_string())
                        .with_hint(hint),
                );
                return None;
            }
        };
        if let Some(p) = loaded.get(&path) {
            return p.clone();
        }
        let p = match profile::load(&path) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                let detail = match &e {
                    profile::ProfileError::Invalid { diagnostics, .. } => diagnostics
                        .iter()
                        .filter(|d| d.is_error())
                        .map(|d| d.message.clone())
                        .next()
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                out.push(
                    Diagnostic::error("bad-profile", span(name.span()), format!("{e}: {detail}"))
                        .with_hint(format!("run `biofoundry devices check {}`", path.display())),
                );
                None
            }
        };
        loaded.insert(path, p.clone());
        p
    };
    let mut devices = IndexMap::new();
    let mut first_at: HashMap<String, Span> = HashMap::new();
    // Lines shared by several instruments must agree on their serial settings.
    let mut lines: HashMap<String, (SerialSettings, Span)> = HashMap::new();
    let mut instrument = |profile_name: &Spanned<String>,
                          transport: &Spanned<String>,
                          settings: &IndexMap<String, f64>,
                          out: &mut Vec<Diagnostic>|
     -> Option<Instrument> {
        let profile = resolve(profile_name, out)?;
        let t = match Transport::parse(transport.get_ref(), SerialSettings::of(&profile)) {
            Ok(t) => t,
            Err(e) => {
                out.push(Diagnostic::error(
                    "bad-transport",
                    span(transport.span()),
                    e.0,
                ));
                return None;
            }
        };
        let modbus_profile = profile.is_modbus();
        let fits = match &t {
            Transport::Sim { .. } => true,
            t => t.is_modbus() == modbus_profile,
        };
        if !fits {
            out.push(
                Diagnostic::error(
                    "transport-mismatch",
                    span(transport.span()),
                    format!(
                        "profile `{}` speaks {}, but this transport is {}",
                        profile.id,
                        if modbus_profile {
                            "Modbus"
                        } else {
                            "a serial line protocol"
                        },
                        t
                    ),
                )
                .with_hint(if modbus_profile {
                    "use modbus-rtu:///dev/ttyUSB0?unit=1 or modbus-tcp://host:502?unit=1"
                } else {
                    "use serial:///dev/ttyUSB0"
                }),
            );
            return None;
        }
        if let (
            Some(key),
            Transport::Serial { settings, .. } | Transport::ModbusRtu { settings, .. },
        ) = (t.bus_key(), &t)
        {
            match lines.get(&key) {
                Some((other, at)) if other != settings => out.push(
                    Diagnostic::error(
                        "line-settings",
                        span(transport.span()),
                        format!("{key} is used at {other} elsewhere and at {settings} here"),
                    )
                    .with_related(*at, "first used here")
                    .with_hint("devices on one line share its baud rate, parity and stop bits"),
                ),
                Some(_) => {}
                None => {
                    lines.insert(key, (*settings, span(transport.span())));
                }
            }
        }
        for key in settings.keys() {
            if !profile.doc.settings.contains_key(key) {
                out.push(
                    Diagnostic::error(
                        "unknown-setting",
                        span(transport.span()),
                        format!("profile `{}` has no setting `{key}`", profile.id),
                    )
                    .with_optional_hint(did_you_mean(
                        key,
                        profile.doc.settings.keys().map(String::as_str),
                    )),
                );
            }
        }
        Some(Instrument {
            profile,
            transport: t,
            settings: settings.clone(),
        })
    };

    for entry in &doc.devices {
        let e = entry.get_ref();
        let id = e.id.get_ref();
        let id_span = span(e.id.span());
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            out.push(
                Diagnostic::error("bad-id", id_span, format!("`{id}` is not a device id"))
                    .with_hint("letters, digits, `_` and `-` (it appears in MQTT topics)"),
            );
            continue;
        }
        if let Some(first) = first_at.get(id) {
            out.push(
                Diagnostic::error(
                    "duplicate-id",
                    id_span,
                    format!("device `{id}` is declared twice"),
                )
                .with_related(*first, "first declared here"),
            );
            continue;
        }
        first_at.insert(id.clone(), id_span);
        let kind = match &e.kind {
            Some(k) => match DeviceKind::from_name(k.get_ref()) {
                Some(kind) => Some(kind),
                None => {
                    out.push(
                        Diagnostic::error(
                            "unknown-kind",
                            span(k.span()),
                            format!("unknown device kind `{}`", k.get_ref()),
                        )
                        .with_optional_hint(did_you_mean(
                            k.get_ref(),
                            DeviceKind::ALL.iter().map(|k| k.name()),
                        )),
                    );
                    continue;
                }
            },
            None => None,
        };
        let entry_span = span(entry.span());
        if !e.parts.is_empty() || kind == Some(DeviceKind::Bioreactor) {
            if kind != Some(DeviceKind::Bioreactor) {
                out.push(
                    Diagnostic::error(
                        "parts-need-bioreactor",
                        entry_span,
                        format!("device `{id}` has parts, so it is a bioreactor"),
                    )
                    .with_hint("write kind = \"bioreactor\""),
                );
                continue;
            }
            if e.profile.is_some() || e.transport.is_some() {
                out.push(
                    Diagnostic::error("bioreactor-profile", entry_span, "a bioreactor has parts, not one profile and transport")
                        .with_hint("[device.parts.ph] profile = \"hamilton-arc-ph\" transport = \"modbus-rtu:///dev/ttyUSB1?unit=1\""),
                );
                continue;
            }
            if e.parts.is_empty() {
                out.push(
                    Diagnostic::error(
                        "no-parts",
                        entry_span,
                        format!("bioreactor `{id}` has no parts"),
                    )
                    .with_hint(
                        "[device.parts.ph], [device.parts.temperature], [device.parts.feed] ...",
                    ),
                );
                continue;
            }
            let spec = DeviceKind::Bioreactor.spec();
            let mut parts = IndexMap::new();
            for (role, part) in &e.parts {
                let known = spec.signal(role).is_some()
                    || spec.setpoint(role).is_some()
                    || spec.pumps.contains(&role.as_str());
                if !known {
                    let names: Vec<&str> = spec
                        .signals
                        .iter()
                        .map(|s| s.name)
                        .chain(spec.pumps.iter().copied())
                        .collect();
                    out.push(
                        Diagnostic::error(
                            "unknown-part",
                            span(part.span()),
                            format!("a bioreactor has no part `{role}`"),
                        )
                        .with_hint(
                            did_you_mean(role, names.iter().copied())
                                .unwrap_or_else(|| format!("parts: {}", names.join(", "))),
                        ),
                    );
                    continue;
                }
                let p = part.get_ref();
                if let Some(i) = instrument(&p.profile, &p.transport, &p.settings, &mut out) {
                    let is_pump_role = spec.pumps.contains(&role.as_str()) || role == "airflow";
                    let expected_ok = if is_pump_role {
                        i.profile.kind == DeviceKind::Pump
                    } else {
                        i.profile.doc.signals.contains_key(role.as_str())
                            || i.profile.doc.setpoints.contains_key(role.as_str())
                    };
                    if !expected_ok {
                        out.push(
                            Diagnostic::error(
                                "part-mismatch",
                                span(p.profile.span()),
                                if is_pump_role {
                                    format!("part `{role}` must be a pump, and `{}` is {}", i.profile.id, i.profile.kind.with_article())
                                } else {
                                    format!("part `{role}` must measure or control {role}, and `{}` has no signal or setpoint `{role}`", i.profile.id)
                                },
                            ),
                        );
                        continue;
                    }
                    parts.insert(role.clone(), i);
                }
            }
            devices.insert(id.clone(), LabDevice::Bioreactor { parts });
            continue;
        }
        let (Some(profile_name), Some(transport)) = (&e.profile, &e.transport) else {
            out.push(
                Diagnostic::error("incomplete-device", entry_span, format!("device `{id}` needs a `profile` and a `transport`"))
                    .with_hint("profile = \"opentrons-temperature-module\"\ntransport = \"serial:///dev/ttyACM0\" (or \"sim://\")"),
            );
            continue;
        };
        if let Some(i) = instrument(profile_name, transport, &e.settings, &mut out) {
            if let (Some(k), Some(ks)) = (kind, &e.kind)
                && k != i.profile.kind
            {
                out.push(Diagnostic::error(
                    "kind-mismatch",
                    span(ks.span()),
                    format!(
                        "profile `{}` is {}, not {}",
                        i.profile.id,
                        i.profile.kind.with_article(),
                        k.with_article()
                    ),
                ));
                continue;
            }
            devices.insert(id.clone(), LabDevice::Instrument(i));
        }
    }
    if doc.devices.is_empty() {
        out.push(
            Diagnostic::warning(
                "no-devices",
                span(doc.format.span()),
                "the lab has no devices",
            )
            .with_hint("add [[device]] tables"),
        );
    }
    let lab = LabFile {
        file,
        doc,
        devices,
        base,
    };
    (Some(lab), out)
}

/// The controller's topic levels and the `[mqtt]` table: what `serve` would
/// otherwise only find out when it starts.
fn check_mqtt(doc: &LabDoc, base: &Path, out: &mut Vec<Diagnostic>) {
    let c = &doc.controller;
    for (what, level) in [("site", &c.site), ("cell", &c.cell), ("id", &c.id)] {
        if !crate::mqtt::topics::is_topic_level(level.get_ref()) {
            out.push(
                Diagnostic::error(
                    "bad-topic-level",
                    span(level.span()),
                    format!(
                        "controller {what} `{}` cannot be an MQTT topic level",
                        level.get_ref()
                    ),
                )
                .with_hint("letters, digits, `_`, `-` and `.`, at most 128 characters"),
            );
        }
    }
    let Some(mqtt) = &doc.mqtt else { return };
    let m = mqtt.get_ref();
    let at = span(mqtt.span());
    if m.password_file.is_some() && m.username.is_none() {
        out.push(
            Diagnostic::error("bad-mqtt", at, "[mqtt] password_file without a username")
                .with_hint("add `username = \"...\"`"),
        );
    }
    if m.ca_file.is_some() && !m.tls {
        out.push(
            Diagnostic::warning("bad-mqtt", at, "[mqtt] ca_file is set but tls is off")
                .with_hint("add `tls = true`"),
        );
    }
    if m.embedded && m.host.parse::<std::net::IpAddr>().is_err() {
        out.push(
            Diagnostic::error(
                "bad-mqtt",
                at,
                format!(
                    "an embedded broker listens on an IP address, not `{}`",
                    m.host
                ),
            )
            .with_hint("host = \"127.0.0.1\" (loopback) for a single workcell"),
        );
    }
    if m.outbox_limit == Some(0) {
        out.push(
            Diagnostic::error("bad-mqtt", at, "outbox_limit must be at least 1")
                .with_hint("the default keeps 1000000 messages"),
        );
    }
    for (key, file) in [
        ("password_file", &m.password_file),
        ("ca_file", &m.ca_file),
        ("command_key_file", &m.command_key_file),
    ] {
        if let Some(f) = file
            && !base.join(f).is_file()
        {
            out.push(
                Diagnostic::error(
                    "missing-file",
                    at,
                    format!("[mqtt] {key} `{f}` does not exist"),
                )
                .with_hint("paths are relative to the lab file's folder"),
            );
        } else if let Some(f) = file {
            let secret = key != "ca_file";
            if let Some(problem) = file_exposure(&base.join(f), secret) {
                out.push(
                    Diagnostic::warning(
                        "secret-permissions",
                        at,
                        format!("[mqtt] {key} `{f}` {problem}"),
                    )
                    .with_hint(if secret {
                        "chmod 600 the file (or 640 with a group for the controller), owned by the controller's user"
                    } else {
                        "chmod 644 the file, owned by root or the controller's user"
                    }),
                );
            }
        }
    }
    let loopback = is_loopback_host(&m.host);
    if m.password_file.is_some() && !m.tls && !loopback {
        out.push(
            Diagnostic::warning(
                "insecure-mqtt",
                at,
                format!(
                    "[mqtt] the password is sent to {} unencrypted (tls is off)",
                    m.host
                ),
            )
            .with_hint("add `tls = true` (and `ca_file` for a private CA)"),
        );
    }
    if m.embedded && !loopback {
        out.push(
            Diagnostic::warning(
                "insecure-mqtt",
                at,
                format!(
                    "[mqtt] the embedded broker on {} has no authentication and no TLS: \
                     anyone who can reach it reads telemetry and can publish commands",
                    m.host
                ),
            )
            .with_hint(
                "keep it on 127.0.0.1, or use a broker with TLS and accounts (docs/security.md)",
            ),
        );
    }
    if m.command_key_file.is_none() && !loopback {
        out.push(
            Diagnostic::warning(
                "insecure-mqtt",
                at,
                format!(
                    "[mqtt] commands are not signed: anyone who may publish on {} can start \
                     and abort runs and change setpoints",
                    m.host
                ),
            )
            .with_hint("set `command_key_file` (docs/mqtt.md, signed commands)"),
        );
    }
}

/// `localhost` or a loopback address: a broker only this machine reaches.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What is wrong with who may use a file the controller trusts: a `secret`
/// (password, command key) must not be readable by other users; no such file
/// may be writable by them (a replaced CA file or key lets them in).
#[cfg(unix)]
fn file_exposure(path: &Path, secret: bool) -> Option<&'static str> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    if mode & 0o002 != 0 {
        Some("can be changed by every user of this machine")
    } else if secret && mode & 0o004 != 0 {
        Some("can be read by every user of this machine")
    } else {
        None
    }
}

#[cfg(not(unix))]
fn file_exposure(_path: &Path, _secret: bool) -> Option<&'static str> {
    None
}

/// Protocol checks against a lab file's devices: roles bound like a run binds
/// them, limits and slots from the profiles.
pub struct LabLimits<'a> {
    pub lab: &'a LabFile,
    /// role → device id.
    pub bindings: HashMap<String, String>,
}

impl crate::validate::DeviceLimits for LabLimits<'_> {
    fn setpoint_limits(&self, role: &str, kind: DeviceKind, setpoint: &str) -> Option<Limits> {
        match self.bindings.get(role) {
            Some(id) => self.lab.setpoint_limits(id, setpoint),
            None => kind.spec().setpoint(setpoint).map(|s| s.limits()),
        }
    }

    fn slots(&self, role: &str, kind: DeviceKind) -> u32 {
        match self.bindings.get(role) {
            Some(id) => self.lab.slots(id),
            None => kind.spec().slots,
        }
    }

    fn description(&self) -> String {
        format!("lab {}", self.lab.file.display_path())
    }

    fn lacks(&self, role: &str, _kind: DeviceKind, what: Capability<'_>) -> Option<String> {
        let id = self.bindings.get(role)?;
        let (noun, name) = match what {
            Capability::Setpoint(n) => ("setpoint", n),
            Capability::Signal(n) => ("signal", n),
            Capability::Command(n) => ("action", n),
            Capability::Pump(n) => ("pump", n),
        };
        match self.lab.devices.get(id)? {
            LabDevice::Instrument(i) => {
                let d = &i.profile.doc;
                let has = match what {
                    Capability::Setpoint(n) => d.setpoints.contains_key(n),
                    Capability::Signal(n) => d.signals.contains_key(n),
                    Capability::Command(n) => d.actions.contains_key(n),
                    Capability::Pump(_) => false,
                };
                (!has).then(|| {
                    format!(
                        "{role} is `{id}`, a {} ({}), which has no {noun} `{name}`",
                        d.profile.name, i.profile.id
                    )
                })
            }
            LabDevice::Bioreactor { parts } => {
                let has = match what {
                    Capability::Setpoint(n) => parts.get(n).is_some_and(|p| {
                        p.profile.doc.setpoints.contains_key(n)
                            || (p.profile.kind == DeviceKind::Pump
                                && p.profile.doc.setpoints.contains_key("rate"))
                    }),
                    Capability::Signal(n) => parts.get(n).is_some_and(|p| {
                        p.profile.doc.signals.contains_key(n)
                            || (p.profile.kind == DeviceKind::Pump
                                && p.profile.doc.signals.contains_key("rate"))
                    }),
                    Capability::Pump(n) => parts
                        .get(n)
                        .is_some_and(|p| p.profile.kind == DeviceKind::Pump),
                    Capability::Command(_) => false,
                };
                (!has).then(|| {
                    format!(
                        "{role} is bioreactor `{id}`, and none of its parts ({}) provides the {noun} `{name}`",
                        parts.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                })
            }
        }
    }
}

/// `check --lab`: roles bound as a run binds them, each device's profile limits
/// and abilities applied; a role that cannot be bound is an error at its declaration.
pub fn check_with_lab(
    source: SourceFile,
    params: &[ParamOverride],
    lab: &LabFile,
    binds: &[(String, String)],
) -> Result<CheckReport, String> {
    let (parsed, _) = crate::protocol::parse(Arc::new(source.clone()), params);
    let mut roles: Vec<(String, crate::catalogue::DeviceKind)> = parsed
        .as_ref()
        .map(|p| p.devices.iter().map(|(r, d)| (r.clone(), d.kind)).collect())
        .unwrap_or_default();
    let devices: Vec<_> = lab
        .devices
        .keys()
        .filter_map(|id| lab.kind(id).map(|k| (id.clone(), k)))
        .collect();
    let mut problems = Vec::new();
    let bindings = loop {
        match bind_roles(&roles, &devices, binds) {
            Ok(b) => break b,
            Err(e) => {
                let role = match &e {
                    BindError::NoDevice { role, .. }
                    | BindError::Ambiguous { role, .. }
                    | BindError::UnknownDevice { role, .. }
                    | BindError::WrongKind { role, .. }
                    | BindError::UnknownRole { role } => role.clone(),
                    BindError::Shared { second, .. } => second.clone(),
                };
                if let BindError::UnknownRole { .. } = e {
                    return Err(e.to_string());
                }
                let span = parsed
                    .as_ref()
                    .and_then(|p| p.devices.get(&role))
                    .map(|d| d.span)
                    .unwrap_or_default();
                problems.push(
                    Diagnostic::error("unbound-role", span, e.to_string())
                        .with_hint(format!("in lab {}", lab.file.display_path())),
                );
                roles.retain(|(r, _)| *r != role);
            }
        }
    };
    let limits = LabLimits {
        lab,
        bindings: bindings.into_iter().collect::<HashMap<_, _>>(),
    };
    let mut report = check_source(source, params, &limits);
    report.diagnostics.extend(problems);
    if let (Some(protocol), Some(plan)) = (&report.protocol, &report.plan) {
        let broken = interlocks::check(protocol, plan, lab, &limits.bindings);
        report.diagnostics.extend(broken);
    }
    report
        .diagnostics
        .sort_by_key(|d| (d.span.start, d.severity));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str =
        "format = \"biofoundry.lab/1\"\n[controller]\nsite = \"s\"\ncell = \"c\"\nid = \"x\"\n";

    /// Every error of a lab body: (code, message).
    fn errors(body: &str) -> Vec<(&'static str, String)> {
        let (_, d) = parse(SourceFile::new(
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/t.toml"),
            format!("{HEAD}{body}"),
        ));
        d.into_iter()
            .filter(|d| d.is_error())
            .map(|d| (d.code, d.message))
            .collect()
    }

    fn has(body: &str, code: &str, text: &str) {
        let e = errors(body);
        assert!(
            e.iter().any(|(c, m)| *c == code && m.contains(text)),
            "expected {code} `{text}` in {e:?}"
        );
    }

    #[test]
    fn topic_levels_and_a_ca_file_without_tls_are_reported_where_written() {
        let text = "format = \"biofoundry.lab/1\"\n[controller]\nsite = \"s/1\"\ncell = \"c\"\nid = \"x+\"\n\
                    [mqtt]\nhost = \"h\"\nca_file = \"ca.pem\"\n";
        let file = SourceFile::new(
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/t.toml"),
            text,
        );
        let (_, d) = parse(file.clone());
        let levels: Vec<_> = d.iter().filter(|d| d.code == "bad-topic-level").collect();
        assert_eq!(levels.len(), 2, "{d:?}");
        assert_eq!(file.line_col(levels[0].span.start), (3, 8));
        assert!(
            levels[0].message.contains("site `s/1`"),
            "{}",
            levels[0].message
        );
        assert!(
            d.iter()
                .any(|d| !d.is_error() && d.message.contains("ca_file is set but tls is off")),
            "{d:?}"
        );
    }

    /// Every warning of a lab file written at `dir/lab.toml`: (code, message).
    fn warnings_in(dir: &Path, body: &str) -> Vec<(&'static str, String)> {
        let (_, d) = parse(SourceFile::new(
            dir.join("lab.toml"),
            format!("{HEAD}{body}"),
        ));
        d.into_iter()
            .filter(|d| !d.is_error() && d.code != "no-devices")
            .map(|d| (d.code, d.message))
            .collect()
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_others_can_read_or_change_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let chmod = |name: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let body = "[mqtt]\nhost = \"127.0.0.1\"\nusername = \"u\"\npassword_file = \"pw\"\n\
                    command_key_file = \"key\"\ntls = true\nca_file = \"ca.pem\"\n";
        chmod("pw", 0o600);
        chmod("key", 0o640);
        chmod("ca.pem", 0o644);
        assert_eq!(warnings_in(dir.path(), body), []);
        chmod("pw", 0o644);
        chmod("key", 0o604);
        chmod("ca.pem", 0o666);
        let w = warnings_in(dir.path(), body);
        let expect = [
            "password_file `pw` can be read by every user",
            "ca_file `ca.pem` can be changed by every user",
            "command_key_file `key` can be read by every user",
        ];
        assert_eq!(w.len(), expect.len(), "{w:?}");
        for text in expect {
            assert!(
                w.iter()
                    .any(|(c, m)| *c == "secret-permissions" && m.contains(text)),
                "expected `{text}` in {w:?}"
            );
        }
        // Warnings only: the lab still loads.
        std::fs::write(dir.path().join("lab.toml"), format!("{HEAD}{body}")).unwrap();
        assert!(load(&dir.path().join("lab.toml")).is_ok());
    }

    #[test]
    fn brokers_beyond_this_machine_without_protection_are_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "secret\n").unwrap();
        std::fs::write(dir.path().join("key"), "0123456789abcdef0123\n").unwrap();
        #[cfg(unix)]
        for f in ["pw", "key"] {
            use std::os::unix::fs::PermissionsExt;
            let perms = std::fs::Permissions::from_mode(0o600);
            std::fs::set_permissions(dir.path().join(f), perms).unwrap();
        }
        let codes = |body: &str| -> Vec<String> {
            warnings_in(dir.path(), body)
                .into_iter()
                .filter(|(c, _)| *c == "insecure-mqtt")
                .map(|(_, m)| m)
                .collect()
        };
        let clear =
            codes("[mqtt]\nhost = \"broker.lan\"\nusername = \"u\"\npassword_file = \"pw\"\n");
        assert!(
            clear
                .iter()
                .any(|m| m.contains("password is sent to broker.lan unencrypted")),
            "{clear:?}"
        );
        assert!(
            clear.iter().any(|m| m.contains("commands are not signed")),
            "{clear:?}"
        );
        let open =
            codes("[mqtt]\nhost = \"0.0.0.0\"\nembedded = true\ncommand_key_file = \"key\"\n");
        assert_eq!(open.len(), 1, "{open:?}");
        assert!(open[0].contains("no authentication and no TLS"), "{open:?}");
        // TLS, a password and signed commands: nothing to say.
        let good = "[mqtt]\nhost = \"broker.lan\"\ntls = true\nusername = \"u\"\npassword_file = \"pw\"\n\
                    command_key_file = \"key\"\n";
        assert_eq!(codes(good), Vec::<String>::new());
        // A broker on this machine only: nothing to say either.
        for host in ["127.0.0.1", "localhost", "::1", "[::1]"] {
            let body =
                format!("[mqtt]\nhost = \"{host}\"\nusername = \"u\"\npassword_file = \"pw\"\n");
            assert_eq!(codes(&body), Vec::<String>::new(), "{host}");
        }
    }

    #[test]
    fn a_good_lab_has_no_errors() {
        let body = "[simulation]\nspeed = 10\n[[device]]\nid = \"tm1\"\nprofile = \"opentrons-temperature-module\"\ntransport = \"sim://\"\n";
        assert!(errors(body).is_empty(), "{:?}", errors(body));
    }

    #[test]
    fn every_mistake_is_reported() {
        let tm = "profile = \"opentrons-temperature-module\"\n";
        has(
            &format!(
                "[[device]]\nid = \"a\"\n{tm}transport = \"sim://\"\n[[device]]\nid = \"a\"\n{tm}transport = \"sim://\"\n"
            ),
            "duplicate-id",
            "declared twice",
        );
        has(
            &format!("[[device]]\nid = \"a b\"\n{tm}transport = \"sim://\"\n"),
            "bad-id",
            "not a device id",
        );
        has(
            &format!("[[device]]\nid = \"a\"\n{tm}transport = \"ftp://x\"\n"),
            "bad-transport",
            "unknown transport",
        );
        has(
            &format!("[[device]]\nid = \"a\"\n{tm}"),
            "incomplete-device",
            "needs a `profile` and a `transport`",
        );
        has(
            &format!("[[device]]\nid = \"a\"\nkind = \"incubator\"\n{tm}transport = \"sim://\"\n"),
            "kind-mismatch",
            "not an incubator",
        );
        has(
            &format!(
                "[[device]]\nid = \"a\"\n{tm}transport = \"sim://\"\nsettings = {{ gain = 2.0 }}\n"
            ),
            "unknown-setting",
            "no setting `gain`",
        );
        has(
            "[[device]]\nid = \"br\"\nkind = \"bioreactor\"\n[device.parts.colour]\nprofile = \"hamilton-arc-ph\"\ntransport = \"sim://\"\n",
            "unknown-part",
            "no part `colour`",
        );
        has(
            "[[device]]\nid = \"br\"\nkind = \"bioreactor\"\n[device.parts.feed]\nprofile = \"hamilton-arc-ph\"\ntransport = \"sim://\"\n",
            "part-mismatch",
            "must be a pump",
        );
        has(
            "[[device]]\nid = \"br\"\nkind = \"bioreactor\"\n",
            "no-parts",
            "has no parts",
        );
        has(
            "[[device]]\nid = \"p\"\nprofile = \"hamilton-arc-ph\"\ntransport = \"modbus-rtu:///dev/x?baud=9600&unit=1\"\n\
             [[device]]\nid = \"d\"\nprofile = \"hamilton-visiferm-do\"\ntransport = \"modbus-rtu:///dev/x?baud=19200&unit=2\"\n",
            "line-settings",
            "/dev/x is used at",
        );
        has(
            "[simulation]\nspeed = 0\n",
            "bad-speed",
            "not a clock speed",
        );
        has("[controler]\n", "lab-syntax", "unknown field");
        has(
            "[mqtt]\nhost = \"h\"\npassword_file = \"p\"\n",
            "bad-mqtt",
            "without a username",
        );
        has(
            "[mqtt]\nhost = \"broker.lan\"\nembedded = true\n",
            "bad-mqtt",
            "IP address",
        );
        has(
            "[mqtt]\nhost = \"h\"\ncommand_key_file = \"nope.key\"\n",
            "missing-file",
            "does not exist",
        );
        has(
            "[mqtt]\nhost = \"h\"\noutbox_limit = 0\n",
            "bad-mqtt",
            "at least 1",
        );
    }
}
