//! `biofoundry serve`: the workcell daemon. It connects the lab's devices,
//! publishes their telemetry on each signal's schedule whether or not a run is
//! active, takes commands from MES (docs/mqtt.md) and runs one protocol at a
//! time; a `start_run` while a run is active is rejected, not queued (MES owns
//! the queue, and a controller that queued would run work MES may have moved).

use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::diagnostics::Diagnostic;
use crate::lab::{LabDevice, LabFile, SimBacking, check_with_lab, connect_lab};
use crate::mqtt::command::{Command, CommandArgs, ProtocolSource, Verb, parse_command};
use crate::mqtt::link::{Incoming, ShutdownReport};
use crate::mqtt::publisher::{CmdStatus, Publisher, RunInfo, new_run_id, now_ms};
use crate::mqtt::sink::MqttRunSink;
use crate::mqtt::{Mqtt, command};
use crate::protocol::ParamOverride;
use crate::runtime::events::EventBus;
use crate::runtime::executor::{RunHandle, RunOptions, RunReport, RunSetup, spawn, spawn_resumed};
use crate::runtime::machine::RunCommand;
use crate::sim::{SimOptions, SimTiming};
use crate::source::SourceFile;
use crate::units::Quantity;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::task::JoinHandle;

/// How long one telemetry read may take before it counts as a fault.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a run may take to reach a safe state when the controller stops.
const ABORT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest diagnostic message quoted in a rejection (the whole one is in
/// `biofoundry check`); keeps `cmd_result` small whatever a protocol holds.
const MAX_REASON_MESSAGE_CHARS: usize = 500;

/// `text` cut to `max` characters, marked when cut.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// Longest a setpoint write from MES may take (the driver has its own reply timeouts).
const SETPOINT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The simulated lab's clock speed (a real lab runs at 1).
    pub speed: f64,
    pub seed: u64,
    /// How long a shutdown waits for the outbox to empty (what is left is kept).
    pub flush: Duration,
    pub run_options: RunOptions,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            speed: 1.0,
            seed: 1,
            flush: Duration::from_secs(5),
            run_options: RunOptions::default(),
        }
    }
}

/// How `serve` ended.
#[derive(Debug, Clone)]
pub struct ServeReport {
    pub link: ShutdownReport,
    /// Messages left in the outbox for the next start.
    pub kept: u64,
}

struct ActiveRun {
    run_id: String,
    handle: RunHandle,
    task: JoinHandle<RunReport>,
}

/// Signals a device publishes, with their period in seconds.
pub fn telemetry_signals(lab: &LabFile, id: &str) -> Vec<(String, f64)> {
    let every = lab.doc.telemetry.every.0;
    match lab.devices.get(id) {
        Some(LabDevice::Instrument(i)) => i
            .profile
            .doc
            .signals
            .iter()
            .map(|(name, def)| {
                let poll = def.get_ref().poll.as_ref().map_or(every, |d| d.0);
                (name.clone(), poll)
            })
            .collect(),
        Some(LabDevice::Bioreactor { parts }) => parts
            .iter()
            .filter_map(|(part, i)| {
                let signals = &i.profile.doc.signals;
                let def = signals.get(part.as_str()).or_else(|| {
                    (i.profile.kind == DeviceKind::Pump).then(|| signals.get("rate"))?
                })?;
                DeviceKind::Bioreactor.spec().signal(part)?;
                let poll = def.get_ref().poll.as_ref().map_or(every, |d| d.0);
                Some((part.clone(), poll))
            })
            .collect(),
        None => Vec::new(),
    }
}

/// `$description`: the controller, its devices with signals (units, periods) and
/// setpoints (limits), the commands it takes and its protocol library.
pub fn description(lab: &LabFile, signed: bool) -> Value {
    let devices: Vec<Value> = lab
        .devices
        .iter()
        .filter_map(|(id, device)| {
            let kind = lab.kind(id)?;
            let spec = kind.spec();
            let signals: Vec<Value> = telemetry_signals(lab, id)
                .into_iter()
                .map(|(name, poll)| {
                    let unit = spec.signal(&name).map(|s| s.dimension.canonical_unit());
                    json!({ "name": name, "unit": unit, "poll_s": poll })
                })
                .collect();
            let setpoints: Vec<Value> = spec
                .setpoints
                .iter()
                .filter_map(|sp| {
                    let l = lab.setpoint_limits(id, sp.name)?;
                    Some(json!({
                        "name": sp.name,
                        "unit": l.dimension.canonical_unit(),
                        "min": l.min,
                        "max": l.max,
                    }))
                })
                .collect();
            let profile = match device {
                LabDevice::Instrument(i) => json!(i.profile.id),
                LabDevice::Bioreactor { parts } => Value::Object(
                    parts
                        .iter()
                        .map(|(p, i)| (p.clone(), json!(i.profile.id)))
                        .collect(),
                ),
            };
            let interlocks: Vec<Value> = match device {
                LabDevice::Instrument(i) => i
                    .profile
                    .interlocks
                    .iter()
                    .map(|il| {
                        let guards = match &il.guarded {
                            crate::profile::Guarded::Setpoint { name, above } => {
                                json!({ "setpoint": name, "above": above })
                            }
                            crate::profile::Guarded::Action(a) => json!({ "action": a }),
                        };
                        json!({
                            "id": il.id,
                            "guards": guards,
                            "requires": il
                                .requires
                                .iter()
                                .map(|(k, v)| (k.clone(), json!(v)))
                                .collect::<serde_json::Map<String, Value>>(),
                            "message": il.message,
                        })
                    })
                    .collect(),
                LabDevice::Bioreactor { .. } => Vec::new(),
            };
            let mut d = json!({
                "id": id,
                "kind": kind.name(),
                "profile": profile,
                "signals": signals,
                "setpoints": setpoints,
            });
            if !interlocks.is_empty() {
                d["interlocks"] = Value::Array(interlocks);
            }
            Some(d)
        })
        .collect();
    let c = &lab.doc.controller;
    json!({
        "controller": { "id": c.id.get_ref(), "site": c.site.get_ref(), "cell": c.cell.get_ref() },
        "version": env!("CARGO_PKG_VERSION"),
        "contract": crate::mqtt::topics::PREFIX,
        "devices": devices,
        "commands": Verb::ALL.iter().map(|v| v.name()).collect::<Vec<_>>(),
        "signed_commands": signed,
        "runs": "one at a time; start_run while a run is active is rejected",
        "protocols": library(lab).map(|(_, names)| names).unwrap_or_default(),
    })
}

/// The protocol library: its folder and the names in it.
fn library(lab: &LabFile) -> Option<(PathBuf, Vec<String>)> {
    let dir = lab.base.join(lab.doc.controller.protocols.as_ref()?);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "toml")
                .then(|| path.file_stem()?.to_str().map(str::to_string))
                .flatten()
        })
        .filter(|n| command::is_valid_id(n))
        .collect();
    names.sort();
    Some((dir, names))
}

/// Runs the workcell until `stop` resolves (SIGTERM, Ctrl-C).
pub async fn serve(
    lab: LabFile,
    mqtt: Mqtt,
    options: ServeOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ServeReport, String> {
    let Mqtt {
        publisher,
        link,
        commands: mut incoming,
        command_key,
        ..
    } = mqtt;
    let report = |e: crate::mqtt::outbox::OutboxError| e.to_string();
    publisher.controller_state("init").map_err(report)?;
    publisher
        .description(&description(&lab, command_key.is_some()))
        .map_err(report)?;
    let t = publisher.topics().clone();
    let known: Vec<String> = lab.devices.keys().cloned().collect();
    // Devices removed from the lab file leave no stale retained state behind.
    publisher
        .forget_retained(
            |topic| match topic.strip_prefix(&format!("{}/device/", t.root())) {
                Some(rest) => known.iter().any(|d| rest.starts_with(&format!("{d}/"))),
                None => true,
            },
        )
        .map_err(report)?;

    let clock = Clock::new(options.speed);
    let backing = SimBacking {
        clock,
        options: SimOptions {
            seed: options.seed,
            timing: SimTiming::Realistic,
        },
    };
    let runtime = connect_lab(&lab, &backing)?;
    let lab = Arc::new(lab);
    let current_run: Arc<Mutex<Option<String>>> = Arc::default();
    let mut pollers = Vec::new();
    for (id, handle) in &runtime.lab.devices {
        let signals = telemetry_signals(&lab, id);
        pollers.push(tokio::spawn(poll_device(
            id.clone(),
            handle.clone(),
            signals,
            publisher.clone(),
            current_run.clone(),
        )));
    }
    publisher.controller_state("ready").map_err(report)?;
    tracing::info!(target: "serve", "serving {} devices on {}", runtime.lab.devices.len(), t.root());

    let mut workcell = Workcell {
        lab: lab.clone(),
        devices: runtime.lab.clone(),
        publisher: publisher.clone(),
        clock,
        key: command_key,
        active: None,
        current_run,
        run_options: options.run_options.clone(),
        malformed: RejectionBudget::default(),
    };
    workcell.resume_unfinished(&runtime).await;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            Some(c) = incoming.recv() => {
                if let Some(Verb::Republish) = workcell.handle(c).await {
                    link.republish();
                }
            }
            report = async {
                match workcell.active.as_mut() {
                    Some(a) => (&mut a.task).await,
                    None => std::future::pending().await,
                }
            } => {
                workcell.finished(report.ok());
            }
            _ = &mut stop => break,
        }
    }
    // A run in progress is aborted: its devices go to their safe states.
    if let Some(mut active) = workcell.active.take() {
        let _ = active
            .handle
            .command(RunCommand::Abort, "controller shutting down")
            .await;
        let _ = tokio::time::timeout(ABORT_TIMEOUT, &mut active.task).await;
        workcell.current_run.lock().map(|mut r| r.take()).ok();
    }
    for p in pollers {
        p.abort();
    }
    let stored = publisher.clone();
    let _ =
        tokio::task::spawn_blocking(move || stored.wait_telemetry_stored(Duration::from_secs(2)))
            .await;
    let link_report = link.shutdown(b"disconnected", options.flush).await;
    Ok(ServeReport {
        link: link_report,
        kept: publisher.unsent(),
    })
}

/// Reads a device's signals on their schedules and publishes one telemetry
/// message per cycle; a device that stops answering is `fault` until it answers.
async fn poll_device(
    id: String,
    handle: crate::device::DeviceHandle,
    signals: Vec<(String, f64)>,
    publisher: Publisher,
    current_run: Arc<Mutex<Option<String>>>,
) {
    use crate::device::DeviceState;
    let device = handle.device();
    let state = match tokio::time::timeout(READ_TIMEOUT, device.connect()).await {
        Ok(Ok(())) => (DeviceState::Ready, None),
        Ok(Err(e)) => (DeviceState::Disconnected, Some(e.to_string())),
        Err(_) => (
            DeviceState::Disconnected,
            Some("did not answer in time".into()),
        ),
    };
    let _ = publisher.device_state(&id, state.0, state.1.as_deref());
    let mut healthy = state.0 == DeviceState::Ready;
    if signals.is_empty() {
        // Nothing to read (a liquid handler): its state comes from runs.
        return;
    }
    // One cycle per distinct period; each cycle reads the signals due.
    let tick = signals
        .iter()
        .map(|(_, p)| *p)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.05, 86_400.0);
    let mut next_due: Vec<f64> = vec![0.0; signals.len()];
    let start = tokio::time::Instant::now();
    let mut interval = tokio::time::interval(Duration::from_secs_f64(tick));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        let now_s = start.elapsed().as_secs_f64();
        let mut values: Vec<(String, Quantity)> = Vec::new();
        let mut failure = None;
        for (i, (name, period)) in signals.iter().enumerate() {
            // Half a tick of slack: a tick that wakes a little early is on time.
            if now_s + tick / 2.0 < next_due[i] {
                continue;
            }
            // On the schedule, not from the wake-up time (which drifts late);
            // after a long stall, start again from now instead of catching up.
            next_due[i] = (next_due[i] + period).max(now_s + period / 2.0);
            match tokio::time::timeout(READ_TIMEOUT, device.read(name)).await {
                Ok(Ok(q)) => values.push((name.clone(), q)),
                Ok(Err(e)) => failure = Some(format!("reading {name}: {e}")),
                Err(_) => failure = Some(format!("reading {name}: no answer in time")),
            }
        }
        match (&failure, values.is_empty()) {
            (Some(reason), true) if healthy => {
                healthy = false;
                let _ = publisher.device_state(&id, DeviceState::Fault, Some(reason));
            }
            (None, false) if !healthy => {
                healthy = true;
                let _ = publisher.device_state(&id, DeviceState::Ready, None);
            }
            _ => {}
        }
        if !values.is_empty() {
            let run = current_run.lock().ok().and_then(|r| r.clone());
            if let Err(e) = publisher.telemetry(&id, run.as_deref(), now_ms(), &values) {
                tracing::error!(target: "serve", "telemetry of {id}: {e}");
            }
        }
    }
}

struct Workcell {
    lab: Arc<LabFile>,
    devices: crate::device::Lab,
    publisher: Publisher,
    clock: Clock,
    key: Option<Vec<u8>>,
    active: Option<ActiveRun>,
    current_run: Arc<Mutex<Option<String>>>,
    run_options: RunOptions,
    malformed: RejectionBudget,
}

/// How many malformed commands (unreadable, unsigned, badly signed) are
/// answered: a flood of them must not cost an outbox commit and a log line
/// each. Up to `BURST` at once, `PER_SECOND` on average; the rest are counted
/// and dropped, with one warning per second saying how many.
struct RejectionBudget {
    tokens: f64,
    refilled: std::time::Instant,
    dropped: u64,
    warned: std::time::Instant,
}

impl RejectionBudget {
    const BURST: f64 = 50.0;
    const PER_SECOND: f64 = 20.0;

    fn new(now: std::time::Instant) -> Self {
        RejectionBudget {
            tokens: Self::BURST,
            refilled: now,
            dropped: 0,
            warned: now,
        }
    }

    /// Whether this rejection is answered; a dropped one is counted, and the
    /// count is returned for a warning at most once a second.
    fn take(&mut self, now: std::time::Instant) -> (bool, Option<u64>) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * Self::PER_SECOND).min(Self::BURST);
        self.refilled = now;
        let answered = self.tokens >= 1.0;
        if answered {
            self.tokens -= 1.0;
        } else {
            self.dropped += 1;
        }
        let report = (self.dropped > 0
            && now.saturating_duration_since(self.warned) >= std::time::Duration::from_secs(1))
        .then(|| {
            self.warned = now;
            std::mem::take(&mut self.dropped)
        });
        (answered, report)
    }
}

impl Default for RejectionBudget {
    fn default() -> Self {
        RejectionBudget::new(std::time::Instant::now())
    }
}

/// The topic level a command without a readable `cmd_id` is answered on.
pub const INVALID_CMD_ID: &str = "invalid";

impl Workcell {
    fn answer(&self, cmd_id: &str, status: CmdStatus, reason: Option<&str>, run_id: Option<&str>) {
        if let Err(e) = self.publisher.cmd_result(cmd_id, status, reason, run_id) {
            tracing::error!(target: "serve", "answering command {cmd_id}: {e}");
        }
    }

    /// Handles one command; returns the verb when the link must act (republish).
    async fn handle(&mut self, incoming: Incoming) -> Option<Verb> {
        let verb = self
            .publisher
            .topics()
            .command_verb(&incoming.topic)?
            .to_string();
        let command = match parse_command(
            &verb,
            &incoming.payload,
            self.key.as_deref(),
            SystemTime::now(),
        ) {
            Ok(c) => c,
            Err(rejection) => {
                let (answered, dropped) = self.malformed.take(std::time::Instant::now());
                if let Some(n) = dropped {
                    tracing::warn!(target: "serve", "{n} malformed commands dropped unanswered (more than {} a second)", RejectionBudget::PER_SECOND);
                }
                if answered {
                    tracing::warn!(target: "serve", "command on {} rejected: {}", incoming.topic, rejection.reason);
                    let id = rejection.cmd_id.as_deref().unwrap_or(INVALID_CMD_ID);
                    self.answer(id, CmdStatus::Rejected, Some(&rejection.reason), None);
                }
                return None;
            }
        };
        let id = command.cmd_id.clone();
        if incoming.retain {
            self.answer(
                &id,
                CmdStatus::Rejected,
                Some("retained commands are not accepted: publish commands with retain off"),
                None,
            );
            return None;
        }
        match self.publisher.record_command(&id, command.verb.name()) {
            Ok(true) => {}
            Ok(false) => {
                self.answer(
                    &id,
                    CmdStatus::Rejected,
                    Some("duplicate cmd_id: this command was already received"),
                    None,
                );
                return None;
            }
            Err(e) => {
                self.answer(
                    &id,
                    CmdStatus::Rejected,
                    Some(&format!("cannot record the command: {e}")),
                    None,
                );
                return None;
            }
        }
        tracing::info!(target: "serve", "command {} ({})", id, command.verb.name());
        self.execute(command).await
    }

    async fn execute(&mut self, command: Command) -> Option<Verb> {
        let id = command.cmd_id.as_str();
        let run_command = match command.verb {
            Verb::Pause => Some(RunCommand::Pause),
            Verb::Resume => Some(RunCommand::Resume),
            Verb::Hold => Some(RunCommand::Hold),
            Verb::Stop => Some(RunCommand::Stop),
            Verb::Abort => Some(RunCommand::Abort),
            Verb::Retry => Some(RunCommand::Retry),
            Verb::Skip => Some(RunCommand::Skip),
            _ => None,
        };
        if let Some(rc) = run_command {
            let Some(active) = &self.active else {
                self.answer(id, CmdStatus::Rejected, Some("no run is active"), None);
                return None;
            };
            let source = match &command.args {
                CommandArgs::Abort { reason } => format!("mes ({id}): {reason}"),
                _ => format!("mes ({id})"),
            };
            let run_id = active.run_id.clone();
            match active.handle.command(rc, &source).await {
                Ok(state) => {
                    self.answer(id, CmdStatus::Accepted, None, Some(&run_id));
                    self.answer(
                        id,
                        CmdStatus::Done,
                        Some(&format!("the run is {state}")),
                        Some(&run_id),
                    );
                }
                Err(rejected) => self.answer(
                    id,
                    CmdStatus::Rejected,
                    Some(&rejected.to_string()),
                    Some(&run_id),
                ),
            }
            return None;
        }
        match command.args {
            CommandArgs::StartRun {
                protocol,
                params,
                bind,
                operator,
            } => self.start_run(id, protocol, params, bind, operator).await,
            CommandArgs::AnswerPrompt {
                run_id,
                step_id,
                response,
            } => {
                let Some(active) = self.active.as_ref().filter(|a| a.run_id == run_id) else {
                    self.answer(
                        id,
                        CmdStatus::Rejected,
                        Some(&format!("run {run_id} is not the active run")),
                        None,
                    );
                    return None;
                };
                match active.handle.answer_prompt(&step_id, &response).await {
                    Ok(()) => {
                        self.answer(id, CmdStatus::Accepted, None, Some(&run_id));
                        self.answer(id, CmdStatus::Done, None, Some(&run_id));
                    }
                    Err(e) => self.answer(id, CmdStatus::Rejected, Some(&e), Some(&run_id)),
                }
            }
            CommandArgs::AckAlarm { alarm_id } => match self.publisher.acknowledge_alarm(&alarm_id)
            {
                Ok(true) => {
                    self.answer(id, CmdStatus::Accepted, None, None);
                    self.answer(id, CmdStatus::Done, None, None);
                }
                Ok(false) => self.answer(
                    id,
                    CmdStatus::Rejected,
                    Some(&format!("no active alarm `{alarm_id}`")),
                    None,
                ),
                Err(e) => self.answer(id, CmdStatus::Failed, Some(&e.to_string()), None),
            },
            CommandArgs::SetSetpoint {
                device,
                setpoint,
                value,
            } => self.set_setpoint(id, &device, &setpoint, &value).await,
            CommandArgs::None if command.verb == Verb::Republish => {
                self.answer(id, CmdStatus::Accepted, None, None);
                self.answer(id, CmdStatus::Done, None, None);
                return Some(Verb::Republish);
            }
            _ => self.answer(
                id,
                CmdStatus::Rejected,
                Some("arguments do not match the verb"),
                None,
            ),
        }
        None
    }

    async fn start_run(
        &mut self,
        id: &str,
        protocol: ProtocolSource,
        params: Vec<(String, String)>,
        bind: Vec<(String, String)>,
        operator: Option<String>,
    ) {
        // A run that has ended but whose task has not been joined yet is over.
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.handle.state().is_final())
            && let Some(mut ended) = self.active.take()
        {
            let report = tokio::time::timeout(Duration::from_secs(10), &mut ended.task).await;
            self.active = Some(ended);
            self.finished(report.ok().and_then(Result::ok));
        }
        if let Some(active) = &self.active {
            let reason = format!(
                "a run is already active ({}); one run at a time",
                active.run_id
            );
            self.answer(id, CmdStatus::Rejected, Some(&reason), Some(&active.run_id));
            return;
        }
        let source = match protocol {
            // Its own empty folder: a `definition` path in it cannot reach
            // files next to the controller's working directory.
            ProtocolSource::Toml(text) => SourceFile::new(
                self.lab
                    .data_dir()
                    .join("mes")
                    .join(format!("mes-{id}.toml")),
                text,
            ),
            ProtocolSource::Name(name) => {
                let Some((dir, names)) = library(&self.lab) else {
                    self.answer(id, CmdStatus::Rejected, Some("this controller has no protocol library ([controller] protocols in the lab file); send protocol_toml"), None);
                    return;
                };
                if !names.contains(&name) {
                    let reason = format!(
                        "no protocol `{name}` in the library ({}); it has: {}",
                        dir.display(),
                        names.join(", ")
                    );
                    self.answer(id, CmdStatus::Rejected, Some(&reason), None);
                    return;
                }
                match SourceFile::read(&dir.join(format!("{name}.toml"))) {
                    Ok(s) => s,
                    Err(e) => {
                        self.answer(
                            id,
                            CmdStatus::Rejected,
                            Some(&format!("cannot read protocol `{name}`: {e}")),
                            None,
                        );
                        return;
                    }
                }
            }
        };
        let overrides: Vec<ParamOverride> = params
            .iter()
            .map(|(name, value)| ParamOverride {
                name: name.clone(),
                value: value.clone(),
            })
            .collect();
        let text = source.text.clone();
        let report = match check_with_lab(source, &overrides, &self.lab, &bind) {
            Ok(r) => r,
            Err(e) => {
                self.answer(
                    id,
                    CmdStatus::Rejected,
                    Some(&format!("protocol fails check: {e}")),
                    None,
                );
                return;
            }
        };
        if report.has_errors() {
            let errors: Vec<&Diagnostic> =
                report.diagnostics.iter().filter(|d| d.is_error()).collect();
            let first: Vec<String> = errors
                .iter()
                .take(3)
                .map(|d| {
                    let (line, col) = report.file.line_col(d.span.start);
                    format!(
                        "{}:{line}:{col}: {} [{}]",
                        report.file.display_path(),
                        clip(&d.message, MAX_REASON_MESSAGE_CHARS),
                        d.code
                    )
                })
                .collect();
            let reason = format!(
                "protocol fails check ({} error{}): {}",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                first.join("; ")
            );
            self.answer(id, CmdStatus::Rejected, Some(&reason), None);
            return;
        }
        let (Some(protocol), Some(plan)) = (report.protocol, report.plan) else {
            self.answer(id, CmdStatus::Rejected, Some("protocol fails check"), None);
            return;
        };
        let run_id = new_run_id();
        let setup = match RunSetup::new(
            &protocol,
            plan,
            &self.devices,
            &bind,
            self.run_options.clone(),
        ) {
            Ok(s) => s,
            Err(e) => {
                self.answer(id, CmdStatus::Rejected, Some(&e.to_string()), None);
                return;
            }
        };
        self.answer(id, CmdStatus::Accepted, None, Some(&run_id));
        let params_json: serde_json::Map<String, Value> = params
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        let info = RunInfo::new(
            &run_id,
            &protocol.name,
            protocol.version.as_deref(),
            &text,
            Value::Object(params_json),
            operator.as_deref(),
        );
        let mut bus = EventBus::new();
        // The journal first: an event is in it before MQTT reports it.
        match crate::journal::begin_run(
            &self.lab,
            &info,
            &text,
            &setup,
            &format!("mes ({id})"),
            &protocol.file.path,
        ) {
            Ok(journal) => bus.add_sink(Box::new(journal)),
            Err(e) => {
                self.answer(
                    id,
                    CmdStatus::Failed,
                    Some(&format!("cannot start the run's journal: {e}")),
                    Some(&run_id),
                );
                return;
            }
        }
        bus.add_sink(Box::new(MqttRunSink::new(self.publisher.clone(), info)));
        let (handle, task) = spawn(setup, self.clock, bus);
        if let Ok(mut r) = self.current_run.lock() {
            *r = Some(run_id.clone());
        }
        match handle
            .command(RunCommand::Start, &format!("mes ({id})"))
            .await
        {
            Ok(_) => self.answer(id, CmdStatus::Done, Some("the run started"), Some(&run_id)),
            Err(e) => self.answer(id, CmdStatus::Failed, Some(&e.to_string()), Some(&run_id)),
        }
        tracing::info!(target: "serve", "run {run_id} of `{}` started", protocol.name);
        self.active = Some(ActiveRun {
            run_id,
            handle,
            task,
        });
    }

    /// `set_setpoint` from MES: outside runs only (a run's protocol owns its
    /// devices' setpoints). The driver checks the profile's limits and
    /// interlocks before anything is sent; a refusal is `rejected` with its
    /// reason, a device that fails is `failed`.
    async fn set_setpoint(&mut self, id: &str, device: &str, setpoint: &str, value: &str) {
        if let Some(active) = self
            .active
            .as_ref()
            .filter(|a| !a.handle.state().is_final())
        {
            let reason = format!(
                "run {} is active; setpoints are its protocol's until it ends",
                active.run_id
            );
            self.answer(id, CmdStatus::Rejected, Some(&reason), Some(&active.run_id));
            return;
        }
        let Some(handle) = self.devices.get(device).cloned() else {
            let known: Vec<&str> = self.devices.devices.keys().map(String::as_str).collect();
            let reason = format!("no device `{device}`; this lab has: {}", known.join(", "));
            self.answer(id, CmdStatus::Rejected, Some(&reason), None);
            return;
        };
        let Some(spec) = handle.kind().spec().setpoint(setpoint) else {
            let reason = format!("{device} ({}) has no setpoint `{setpoint}`", handle.kind());
            self.answer(id, CmdStatus::Rejected, Some(&reason), None);
            return;
        };
        let quantity = match value.parse::<f64>() {
            Ok(n) if n.is_finite() => Quantity::new(n, spec.dimension),
            _ => match crate::units::parse_quantity(value, spec.dimension) {
                Ok(q) => q,
                Err(e) => {
                    self.answer(
                        id,
                        CmdStatus::Rejected,
                        Some(&format!("`value`: {e}")),
                        None,
                    );
                    return;
                }
            },
        };
        let result =
            tokio::time::timeout(SETPOINT_TIMEOUT, handle.device().set(setpoint, quantity)).await;
        match result {
            Ok(Ok(())) => {
                self.answer(id, CmdStatus::Accepted, None, None);
                let done = format!("{device}.{setpoint} = {quantity}");
                self.answer(id, CmdStatus::Done, Some(&done), None);
            }
            Ok(Err(crate::device::DeviceError::Refused { reason, .. })) => {
                self.answer(id, CmdStatus::Rejected, Some(&reason), None);
            }
            Ok(Err(e)) => {
                self.answer(id, CmdStatus::Accepted, None, None);
                self.answer(id, CmdStatus::Failed, Some(&e.to_string()), None);
            }
            Err(_) => {
                self.answer(id, CmdStatus::Accepted, None, None);
                let reason = format!("{device} did not answer within {SETPOINT_TIMEOUT:?}");
                self.answer(id, CmdStatus::Failed, Some(&reason), None);
            }
        }
    }

    /// At start-up: the newest run the journal holds unfinished (the
    /// controller was killed or lost power) is taken up again, as `biofoundry
    /// resume` would, and announced on its `run/<id>/event` (`resumed`).
    async fn resume_unfinished(&mut self, runtime: &crate::lab::LabRuntime) {
        let path = crate::journal::journal_path(&self.lab.data_dir());
        if !path.exists() {
            return;
        }
        let unfinished = crate::journal::Journal::open(&path).and_then(|j| {
            let runs = j.unfinished()?;
            let newest = match runs.first() {
                Some(r) => Some(j.recorded(&r.run_id)?),
                None => None,
            };
            Ok((runs, newest, j))
        });
        let (runs, recorded, journal) = match unfinished {
            Ok((runs, Some(recorded), journal)) => (runs, recorded, journal),
            Ok(_) => return,
            Err(e) => {
                tracing::error!(target: "serve", "no run resumed: {e}");
                return;
            }
        };
        for older in runs.iter().skip(1) {
            tracing::warn!(target: "serve", "run {} was left unfinished too; `biofoundry resume {}` takes it up", older.run_id, older.run_id);
        }
        let run_id = recorded.run_id.clone();
        let source = SourceFile::new(
            recorded.source_path(&self.lab.data_dir()),
            recorded.text.clone(),
        );
        let checked = check_with_lab(source, &recorded.params, &self.lab, &recorded.binds)
            .ok()
            .filter(|r| !r.has_errors());
        let Some((protocol, plan)) = checked.and_then(|r| r.protocol.zip(r.plan)) else {
            tracing::error!(target: "serve", "run {run_id} not resumed: its protocol no longer passes check against this lab");
            return;
        };
        let setup = match RunSetup::new(
            &protocol,
            plan,
            &self.devices,
            &recorded.binds,
            self.run_options.clone(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(target: "serve", "run {run_id} not resumed: {e}");
                return;
            }
        };
        let resumption = match crate::runtime::recovery::recover(
            &recorded.events,
            &setup,
            crate::store::now_ms(),
            self.clock.speed(),
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(target: "serve", "run {run_id} not resumed: {e}");
                return;
            }
        };
        if let Err(e) = runtime.restore_simulators(&resumption, &setup).await {
            tracing::error!(target: "serve", "run {run_id}: simulators not restored: {e}");
        }
        let sink = match journal.resume(&run_id) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(target: "serve", "run {run_id} not resumed: {e}");
                return;
            }
        };
        let params: serde_json::Map<String, Value> = recorded
            .params
            .iter()
            .map(|p| (p.name.clone(), Value::String(p.value.clone())))
            .collect();
        let info = RunInfo::new(
            &run_id,
            &protocol.name,
            protocol.version.as_deref(),
            &recorded.text,
            Value::Object(params),
            recorded.operator.as_deref(),
        );
        let mut bus = EventBus::continuing_after(resumption.after_seq);
        bus.add_sink(Box::new(sink));
        bus.add_sink(Box::new(MqttRunSink::new(self.publisher.clone(), info)));
        let (handle, task) = spawn_resumed(setup, resumption, self.clock, bus);
        if let Ok(mut r) = self.current_run.lock() {
            *r = Some(run_id.clone());
        }
        if let Err(e) = handle
            .command(RunCommand::Start, "controller (resumed at start-up)")
            .await
        {
            tracing::error!(target: "serve", "run {run_id} not resumed: {e}");
        }
        tracing::info!(target: "serve", "run {run_id} of `{}` resumed", protocol.name);
        self.active = Some(ActiveRun {
            run_id,
            handle,
            task,
        });
    }

    fn finished(&mut self, report: Option<RunReport>) {
        if let Some(active) = self.active.take() {
            tracing::info!(
                target: "serve",
                "run {} ended: {}",
                active.run_id,
                report.map_or("the run's task failed".to_string(), |r| r.state.to_string())
            );
        }
        if let Ok(mut r) = self.current_run.lock() {
            *r = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{RejectionBudget, clip};
    use std::time::{Duration, Instant};

    #[test]
    fn a_flood_of_malformed_commands_is_answered_at_a_bounded_rate() {
        let start = Instant::now();
        let mut budget = RejectionBudget::new(start);
        // 10 000 at once: the burst is answered, the rest counted.
        let answered = (0..10_000).filter(|_| budget.take(start).0).count();
        assert_eq!(answered, RejectionBudget::BURST as usize);
        // A second later: one warning with the count, and 20 more answers.
        let later = start + Duration::from_secs(1);
        let (ok, dropped) = budget.take(later);
        assert!(ok);
        assert_eq!(dropped, Some(10_000 - 50));
        let answered = 1 + (0..1_000).filter(|_| budget.take(later).0).count();
        assert_eq!(answered, RejectionBudget::PER_SECOND as usize);
        // After a quiet minute the whole burst is there again.
        let quiet = later + Duration::from_secs(60);
        let answered = (0..100).filter(|_| budget.take(quiet).0).count();
        assert_eq!(answered, RejectionBudget::BURST as usize);
    }

    #[test]
    fn long_messages_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("µµµµ", 2), "µµ…");
    }
}
