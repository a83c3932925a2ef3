//! The executor: one tokio task per run that owns the run state machine, the
//! scheduler and the event bus, and drives devices through the device API.
//!
//! Scheduling rules:
//! - a step starts when the steps it waits for (`after`, or the previous one)
//!   are done and its device is free; steps on different devices run in
//!   parallel; a device runs one step at a time, the earlier step first;
//! - a step's operations run one after another; an operation is atomic, so a
//!   pause, hold or stop takes effect when the operations in flight finish;
//! - a repeated step releases its device between repetitions and starts
//!   repetition r at `start + r × every`;
//! - waits and condition polls are not device operations: they stop at a pause
//!   and go on afterwards until their original end time.

use super::device_machine::{DeviceInput, DeviceStateMachine};
use super::events::{AlarmState, EventBus, EventKind, OperationPhase, StepPhase};
use super::machine::{Effect, Rejected, RunCommand, RunInput, RunState, RunStateMachine};
use super::recovery::{Resumption, StepProgress, split_place};
use crate::catalogue::DeviceKind;
use crate::clock::Clock;
use crate::device::{DeckLabware, DeviceError, DeviceHandle, DeviceState};
use crate::plan::{ConditionTerm, Op, Operation, Plan};
use crate::protocol::{ErrorPolicy, Protocol, ViolationPolicy};
use crate::units::{Limits, Quantity};
use indexmap::IndexMap;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Connect attempts before a device counts as absent when a run starts.
const CONNECT_ATTEMPTS: u32 = 3;
/// Attempts to bring a device to its safe state (reconnecting in between).
const SAFE_STATE_ATTEMPTS: u32 = 3;

/// Runtime settings that are not part of the protocol.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Answer every prompt at once with "ok" (`simulate`).
    pub auto_answer_prompts: bool,
    /// First retry delay in lab seconds; it doubles for each attempt.
    pub retry_base_s: f64,
    pub retry_max_s: f64,
    /// How long a device may take to connect or reach its safe state, in real
    /// seconds whatever the clock's speed (instrument I/O does not speed up).
    pub connect_timeout_s: f64,
    pub safe_state_timeout_s: f64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            auto_answer_prompts: false,
            retry_base_s: 1.0,
            retry_max_s: 60.0,
            connect_timeout_s: 30.0,
            safe_state_timeout_s: 60.0,
        }
    }
}

/// A monitor as the runtime runs it.
#[derive(Debug, Clone)]
pub struct MonitorSpec {
    pub id: String,
    pub role: String,
    pub read: Vec<String>,
    pub every_s: f64,
    pub limits: Vec<(String, Limits)>,
    pub on_violation: ViolationPolicy,
    /// Step after which sampling starts; `None`: when the run starts.
    pub after: Option<String>,
    /// Step whose start ends sampling; `None`: the run's end.
    pub until: Option<String>,
}

/// Everything a run needs: the plan, monitors, and devices bound to roles.
#[derive(Clone)]
pub struct RunSetup {
    pub plan: Plan,
    pub monitors: Vec<MonitorSpec>,
    /// Role -> device.
    pub bindings: IndexMap<String, DeviceHandle>,
    /// Labware on each liquid handler's deck at the start, by liquid handler role.
    pub decks: IndexMap<String, Vec<DeckLabware>>,
    /// Every labware, for putting it back on a deck after an incubator unload.
    pub labware: HashMap<String, DeckLabware>,
    /// Modules that sit on a liquid handler's deck: module role -> liquid handler role.
    pub modules_on_deck: HashMap<String, String>,
    pub options: RunOptions,
}

/// Why a protocol cannot be bound to a lab.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BindError {
    #[error("role `{role}` needs {kind}, and the lab has none")]
    NoDevice { role: String, kind: String },
    #[error(
        "role `{role}` needs a {kind}, and the lab has several ({devices}); choose one with --bind {role}=<device>"
    )]
    Ambiguous {
        role: String,
        kind: String,
        devices: String,
    },
    #[error("--bind {role}={device}: the lab has no device `{device}`")]
    UnknownDevice { role: String, device: String },
    #[error("--bind {role}={device}: `{device}` is {found}, but `{role}` needs {kind}")]
    WrongKind {
        role: String,
        device: String,
        kind: String,
        found: String,
    },
    #[error("--bind {role}: the protocol has no role `{role}`")]
    UnknownRole { role: String },
    #[error(
        "roles `{first}` and `{second}` would both use device `{device}`; bind them to different devices"
    )]
    Shared {
        first: String,
        second: String,
        device: String,
    },
}

/// Binds roles to device ids: `binds` first (`role=device`), then each
/// remaining role to the only device of its kind. Shared by `run` and
/// `check --lab`, so both bind the same way.
pub fn bind_roles(
    roles: &[(String, DeviceKind)],
    devices: &[(String, DeviceKind)],
    binds: &[(String, String)],
) -> Result<IndexMap<String, String>, BindError> {
    for (role, _) in binds {
        if !roles.iter().any(|(r, _)| r == role) {
            return Err(BindError::UnknownRole { role: role.clone() });
        }
    }
    let mut bindings = IndexMap::new();
    let mut used: HashMap<String, String> = HashMap::new();
    for (role, kind) in roles {
        let kind = *kind;
        let id = match binds.iter().find(|(r, _)| r == role) {
            Some((_, device)) => {
                let (_, found) = devices.iter().find(|(id, _)| id == device).ok_or_else(|| {
                    BindError::UnknownDevice {
                        role: role.clone(),
                        device: device.clone(),
                    }
                })?;
                if *found != kind {
                    return Err(BindError::WrongKind {
                        role: role.clone(),
                        device: device.clone(),
                        kind: kind.with_article(),
                        found: found.with_article(),
                    });
                }
                device.clone()
            }
            None => {
                let fits: Vec<&String> = devices
                    .iter()
                    .filter(|(_, k)| *k == kind)
                    .map(|(id, _)| id)
                    .collect();
                match fits.as_slice() {
                    [one] => (*one).clone(),
                    [] => {
                        return Err(BindError::NoDevice {
                            role: role.clone(),
                            kind: kind.with_article(),
                        });
                    }
                    many => {
                        return Err(BindError::Ambiguous {
                            role: role.clone(),
                            kind: kind.with_article(),
                            devices: many
                                .iter()
                                .map(|d| d.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                        });
                    }
                }
            }
        };
        if let Some(first) = used.insert(id.clone(), role.clone()) {
            return Err(BindError::Shared {
                first,
                second: role.clone(),
                device: id,
            });
        }
        bindings.insert(role.clone(), id);
    }
    Ok(bindings)
}

impl RunSetup {
    /// Binds a checked protocol's roles to a lab's devices (automatically when
    /// exactly one device fits, else by `binds`).
    pub fn new(
        protocol: &Protocol,
        plan: Plan,
        lab: &crate::device::Lab,
        binds: &[(String, String)],
        options: RunOptions,
    ) -> Result<RunSetup, BindError> {
        let devices: Vec<(String, DeviceKind)> = lab
            .devices
            .iter()
            .map(|(id, h)| (id.clone(), h.kind()))
            .collect();
        let roles: Vec<(String, DeviceKind)> = protocol
            .devices
            .iter()
            .map(|(role, d)| (role.clone(), d.kind))
            .collect();
        let mut bindings = IndexMap::new();
        for (role, id) in bind_roles(&roles, &devices, binds)? {
            if let Some(h) = lab.get(&id) {
                bindings.insert(role, h.clone());
            }
        }
        let mut modules_on_deck = HashMap::new();
        for (role, d) in &protocol.devices {
            if let Some(at) = &d.on_deck {
                modules_on_deck.insert(role.clone(), at.role.clone());
            }
        }
        let mut decks: IndexMap<String, Vec<DeckLabware>> = IndexMap::new();
        let mut labware = HashMap::new();
        for lw in protocol.labware.values() {
            let mut contents = Vec::new();
            for c in &lw.contents {
                for w in &c.wells {
                    contents.push((w.clone(), c.volume_ul));
                }
            }
            let deck_labware = DeckLabware {
                name: lw.name.clone(),
                definition: Arc::clone(&lw.definition),
                slot: lw.at.as_ref().map_or(0, |a| a.slot),
                contents,
            };
            if let Some(at) = &lw.at {
                // Labware on a module belongs to the deck the module sits on.
                let lh_role = modules_on_deck.get(&at.role).unwrap_or(&at.role);
                if protocol
                    .devices
                    .get(lh_role)
                    .is_some_and(|d| d.kind == crate::catalogue::DeviceKind::LiquidHandler)
                {
                    decks
                        .entry(lh_role.clone())
                        .or_default()
                        .push(deck_labware.clone());
                }
            }
            labware.insert(lw.name.clone(), deck_labware);
        }
        let monitors = protocol
            .monitors
            .iter()
            .map(|m| MonitorSpec {
                id: m.id.clone(),
                role: m.role.value.clone(),
                read: m.read.iter().map(|r| r.value.clone()).collect(),
                every_s: m.every.value.value,
                limits: m
                    .limits
                    .iter()
                    .map(|(s, l)| (s.value.clone(), *l))
                    .collect(),
                on_violation: m.on_violation,
                after: m.after.as_ref().map(|a| a.value.clone()),
                until: m.until.as_ref().map(|a| a.value.clone()),
            })
            .collect();
        Ok(RunSetup {
            plan,
            monitors,
            bindings,
            decks,
            labware,
            modules_on_deck,
            options,
        })
    }
}

/// How a step spent its time, for the summary and `simulate`'s critical path.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub id: String,
    pub device: Option<String>,
    pub start_s: Option<f64>,
    pub end_s: Option<f64>,
    /// Lab seconds the device was busy with this step.
    pub busy_s: f64,
    /// What the step waited for last before it started: a step id, or
    /// "device <id>" when its device was busy with another step.
    pub waited_for: Option<String>,
    pub outcome: String,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub state: RunState,
    pub duration_s: f64,
    pub steps_total: usize,
    pub steps_done: usize,
    pub steps_skipped: usize,
    pub alarms: Vec<String>,
    pub faults: Vec<String>,
    pub prompts: usize,
    pub steps: Vec<StepTiming>,
    /// Lab seconds each device was busy, by device id.
    pub device_busy_s: IndexMap<String, f64>,
}

enum Control {
    Command {
        command: RunCommand,
        source: String,
        reply: oneshot::Sender<Result<RunState, Rejected>>,
    },
    AnswerPrompt {
        step_id: String,
        response: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Talks to a running run.
#[derive(Clone)]
pub struct RunHandle {
    control: mpsc::UnboundedSender<Control>,
    state: watch::Receiver<RunState>,
}

impl RunHandle {
    /// Sends a command; the reply is the new state or why it was refused.
    pub async fn command(&self, command: RunCommand, source: &str) -> Result<RunState, Rejected> {
        let (reply, answer) = oneshot::channel();
        let ended = Rejected {
            command,
            state: *self.state.borrow(),
            detail: Some("the run has ended".into()),
        };
        if self
            .control
            .send(Control::Command {
                command,
                source: source.to_string(),
                reply,
            })
            .is_err()
        {
            return Err(ended);
        }
        answer.await.unwrap_or(Err(ended))
    }

    /// Answers the prompt of step `step_id`.
    pub async fn answer_prompt(&self, step_id: &str, response: &str) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.control
            .send(Control::AnswerPrompt {
                step_id: step_id.to_string(),
                response: response.to_string(),
                reply,
            })
            .map_err(|_| "the run has ended".to_string())?;
        answer
            .await
            .unwrap_or_else(|_| Err("the run has ended".into()))
    }

    pub fn state(&self) -> RunState {
        *self.state.borrow()
    }

    /// Waits for the next state change.
    pub async fn changed(&mut self) -> Option<RunState> {
        self.state.changed().await.ok()?;
        Some(*self.state.borrow())
    }
}

/// Starts a run: connects its devices, sets up decks, and executes. The run
/// begins in `idle`; send `start` through the handle.
pub fn spawn(setup: RunSetup, clock: Clock, bus: EventBus) -> (RunHandle, JoinHandle<RunReport>) {
    spawn_with(setup, clock, bus, None)
}

/// Takes up a run the controller was executing when it stopped, from what its
/// journal says (see [`super::recovery`]): completed steps stay done, the
/// steps that were running go on where they were, decks, storage and
/// setpoints are given back to the devices. `bus` must go on numbering after
/// `resumption.after_seq`. Begins in `idle`; send `start` to go on.
pub fn spawn_resumed(
    setup: RunSetup,
    resumption: Resumption,
    clock: Clock,
    bus: EventBus,
) -> (RunHandle, JoinHandle<RunReport>) {
    let clock = clock.reading(resumption.resume_at_s);
    spawn_with(setup, clock, bus, Some(resumption))
}

fn spawn_with(
    setup: RunSetup,
    clock: Clock,
    bus: EventBus,
    resumption: Option<Resumption>,
) -> (RunHandle, JoinHandle<RunReport>) {
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (state_tx, state_rx) = watch::channel(RunState::Idle);
    let mut executor = Executor::new(setup, clock, bus, state_tx);
    if let Some(r) = resumption {
        executor.take_up(&r);
        executor.resumption = Some(r);
    }
    let task = tokio::spawn(executor.run(control_rx));
    (
        RunHandle {
            control: control_tx,
            state: state_rx,
        },
        task,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepStatus {
    Waiting,
    Active,
    Done,
    Skipped,
}

impl StepRun {
    /// When the current attempt runs out of time, if the step has a timeout.
    fn deadline_s(&self) -> Option<f64> {
        let from = self.attempt_from_s.or(self.started_s)?;
        self.timeout_s.map(|t| from + t)
    }
}

struct StepRun {
    id: String,
    action: String,
    /// Bound device id, for device steps.
    device: Option<String>,
    role: Option<String>,
    ops: Vec<Operation>,
    next_op: usize,
    status: StepStatus,
    deps: Vec<usize>,
    on_error: ErrorPolicy,
    retries: u32,
    attempts: u32,
    timeout_s: Option<f64>,
    every_s: Option<f64>,
    /// An operation of this step is in flight (a device operation, wait, poll or prompt).
    in_flight: bool,
    /// The current operation is a device operation (counts for quiescence).
    device_op: bool,
    /// The error that holds the run, until retry or skip.
    failed: Option<String>,
    not_before_s: f64,
    /// End of the `wait` in progress, kept across a pause.
    wait_until_s: Option<f64>,
    started_s: Option<f64>,
    /// Start of the current attempt: the step's `timeout` counts from here, so
    /// a retry (by the policy or the operator) gets the whole timeout again.
    attempt_from_s: Option<f64>,
    ended_s: Option<f64>,
    /// When the operation in flight started, for busy time.
    op_started_s: f64,
    busy_s: f64,
    waited_for: Option<String>,
}

enum OpOutput {
    Nothing,
    Samples(Vec<(String, Quantity)>),
}

enum StepError {
    Device(DeviceError),
    TimedOut(f64),
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Device(e) => write!(f, "{e}"),
            StepError::TimedOut(s) => write!(
                f,
                "the step did not finish within its timeout of {}",
                Quantity::seconds(*s)
            ),
        }
    }
}

enum Message {
    OpDone {
        step: usize,
        generation: u64,
        result: Result<OpOutput, StepError>,
    },
    Connected {
        device: String,
        attempt: u32,
        result: Result<(), DeviceError>,
    },
    Reconnected {
        device: String,
    },
    SafeStatesDone {
        errors: Vec<String>,
    },
    MonitorReading {
        monitor: usize,
        values: Vec<(String, Quantity)>,
        error: Option<String>,
    },
}

struct Executor {
    plan_name: String,
    steps: Vec<StepRun>,
    monitors: Vec<MonitorSpec>,
    bindings: IndexMap<String, DeviceHandle>,
    decks: IndexMap<String, Vec<DeckLabware>>,
    labware: HashMap<String, DeckLabware>,
    modules_on_deck: HashMap<String, String>,
    options: RunOptions,
    clock: Clock,
    bus: EventBus,
    machine: RunStateMachine,
    state_tx: watch::Sender<RunState>,
    devices: IndexMap<String, DeviceStateMachine>,
    /// Device id -> step that holds it.
    device_owner: HashMap<String, usize>,
    /// Each in-flight task, to abandon on abort or pause.
    tasks: HashMap<usize, JoinHandle<()>>,
    generation: u64,
    messages_tx: mpsc::UnboundedSender<Message>,
    messages_rx: Option<mpsc::UnboundedReceiver<Message>>,
    monitor_tasks: HashMap<usize, JoinHandle<()>>,
    reconnecting: HashMap<String, JoinHandle<()>>,
    /// Active monitor alarms, by alarm id.
    active_alarms: HashMap<String, bool>,
    alarms: Vec<String>,
    faults: Vec<String>,
    prompts: usize,
    pending_prompts: HashMap<String, usize>,
    safe_states_running: bool,
    finished_steps: usize,
    /// Per step: how many of its `after` steps have not finished yet.
    deps_left: Vec<usize>,
    /// Per step: the steps that wait for it.
    dependents: Vec<Vec<usize>>,
    /// Unfinished steps whose `after` steps have all finished, in file order:
    /// the only steps the scheduler looks at, so that a step costs the same in
    /// a protocol of 100 000 steps as in one of ten.
    eligible: std::collections::BTreeSet<usize>,
    /// Why the run is holding, repeated when it is held.
    hold_reason: Option<String>,
    /// Set when this run was taken up again after the controller stopped.
    resumption: Option<Resumption>,
}

impl Executor {
    fn new(
        setup: RunSetup,
        clock: Clock,
        bus: EventBus,
        state_tx: watch::Sender<RunState>,
    ) -> Self {
        let index: HashMap<&str, usize> = setup
            .plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let steps = setup
            .plan
            .steps
            .iter()
            .map(|s| StepRun {
                id: s.id.clone(),
                action: s.action.clone(),
                device: s
                    .device
                    .as_ref()
                    .and_then(|role| setup.bindings.get(role))
                    .map(|h| h.device().id().to_string()),
                role: s.device.clone(),
                ops: s.operations.clone(),
                next_op: 0,
                status: StepStatus::Waiting,
                deps: {
                    let mut deps: Vec<usize> = s
                        .after
                        .iter()
                        .filter_map(|a| index.get(a.as_str()).copied())
                        .collect();
                    deps.sort_unstable();
                    deps.dedup();
                    deps
                },
                on_error: s.on_error,
                retries: s.retries,
                attempts: 0,
                timeout_s: s.timeout_s,
                every_s: s.repeat.and_then(|r| r.every_s),
                in_flight: false,
                device_op: false,
                failed: None,
                not_before_s: 0.0,
                wait_until_s: None,
                started_s: None,
                attempt_from_s: None,
                ended_s: None,
                op_started_s: 0.0,
                busy_s: 0.0,
                waited_for: None,
            })
            .collect::<Vec<StepRun>>();
        let deps_left: Vec<usize> = steps.iter().map(|s| s.deps.len()).collect();
        let mut dependents = vec![Vec::new(); steps.len()];
        for (i, s) in steps.iter().enumerate() {
            for &d in &s.deps {
                dependents[d].push(i);
            }
        }
        let eligible = (0..steps.len()).filter(|&i| deps_left[i] == 0).collect();
        let mut devices = IndexMap::new();
        for h in setup.bindings.values() {
            devices.insert(h.device().id().to_string(), DeviceStateMachine::default());
        }
        let (messages_tx, messages_rx) = mpsc::unbounded_channel();
        Executor {
            plan_name: setup.plan.protocol.clone(),
            steps,
            monitors: setup.monitors,
            bindings: setup.bindings,
            decks: setup.decks,
            labware: setup.labware,
            modules_on_deck: setup.modules_on_deck,
            options: setup.options,
            clock,
            bus,
            machine: RunStateMachine::new(),
            state_tx,
            devices,
            device_owner: HashMap::new(),
            tasks: HashMap::new(),
            generation: 0,
            messages_tx,
            messages_rx: Some(messages_rx),
            monitor_tasks: HashMap::new(),
            reconnecting: HashMap::new(),
            active_alarms: HashMap::new(),
            alarms: Vec::new(),
            faults: Vec::new(),
            prompts: 0,
            pending_prompts: HashMap::new(),
            safe_states_running: false,
            finished_steps: 0,
            deps_left,
            dependents,
            eligible,
            hold_reason: None,
            resumption: None,
        }
    }

    /// Puts every step where the journal says it was (nothing is emitted: the
    /// journal has it already).
    fn take_up(&mut self, r: &Resumption) {
        let mut finished: Vec<(usize, StepStatus)> = Vec::new();
        for (i, p) in r.steps.iter().enumerate().take(self.steps.len()) {
            match p {
                StepProgress::Completed => finished.push((i, StepStatus::Done)),
                StepProgress::Skipped => finished.push((i, StepStatus::Skipped)),
                StepProgress::NotStarted => {}
                StepProgress::Running {
                    started_s,
                    next_op,
                    wait_until_s,
                    ..
                } => {
                    let s = &mut self.steps[i];
                    s.status = StepStatus::Active;
                    s.started_s = Some(*started_s);
                    s.next_op = (*next_op).min(s.ops.len());
                    s.wait_until_s = *wait_until_s;
                }
            }
        }
        // Dependencies finish before their dependents: a pass per level.
        while !finished.is_empty() {
            let before = finished.len();
            finished.retain(|&(i, status)| {
                if self.eligible.contains(&i) {
                    self.mark_finished(i, status);
                    false
                } else {
                    true
                }
            });
            if finished.len() == before {
                break;
            }
        }
    }

    /// After a resume has connected the devices: decks, storage and
    /// setpoints back, the monitors that were sampling sample again, and the
    /// run holds for what is uncertain.
    async fn restore(&mut self, r: &Resumption) {
        let mut restored = Vec::new();
        let mut problems = Vec::new();
        for (role, deck) in &r.decks {
            if let Some(DeviceHandle::LiquidHandler(lh)) = self.bindings.get(role) {
                match lh.restore_deck(deck.clone()).await {
                    Ok(()) => restored.push(format!("deck of {role}")),
                    Err(e) => problems.push(format!("the deck of {role}: {e}")),
                }
            }
        }
        for (role, stored) in &r.storage {
            if let Some(DeviceHandle::Incubator(inc)) = self.bindings.get(role) {
                match inc.restore_storage(stored.clone()).await {
                    Ok(()) => restored.push(format!("storage of {role}")),
                    Err(e) => problems.push(format!("the storage of {role}: {e}")),
                }
            }
        }
        // Setpoints are safe to write again, and an instrument that lost
        // power has forgotten them.
        let limit = std::time::Duration::from_secs_f64(self.options.connect_timeout_s);
        for (role, setpoints) in &r.setpoints {
            let Some(handle) = self.bindings.get(role).cloned() else {
                continue;
            };
            for sp in setpoints {
                let set = || handle.device().set(&sp.name, sp.value);
                match with_attempts(limit, set).await {
                    Ok(()) => restored.push(format!("{role}.{} = {}", sp.name, sp.value)),
                    Err(e) => problems.push(format!("{role}.{}: {e}", sp.name)),
                }
            }
        }
        // A timed feed is stopped by the controller: it goes on for what is
        // left of it, or its pump stops now if its time ran out meanwhile.
        let now = self.now();
        for feed in &r.timed_feeds {
            let Some(DeviceHandle::Bioreactor(br)) = self.bindings.get(&feed.role).cloned() else {
                continue;
            };
            let left = feed.ends_s - now;
            let (pump, rate) = (feed.pump.as_str(), feed.rate_ml_min);
            let (what, result) = if left > 0.0 {
                let go_on = || br.feed(pump, None, Some(rate), Some(left));
                (
                    format!(
                        "{} {pump} feed at {rate} mL/min for {}",
                        feed.role,
                        Quantity::seconds(left)
                    ),
                    with_attempts(limit, go_on).await,
                )
            } else {
                let stop = || br.stop_feed(pump);
                (
                    format!("{} {pump} feed stopped (its time ran out)", feed.role),
                    with_attempts(limit, stop).await,
                )
            };
            match result {
                Ok(()) => restored.push(what),
                Err(e) => problems.push(format!("{} {pump} feed: {e}", feed.role)),
            }
        }
        let uncertain = r.uncertain();
        self.emit(EventKind::Resumed {
            after_seq: r.after_seq,
            steps_completed: r.completed(),
            continued: self
                .steps
                .iter()
                .zip(&r.steps)
                .filter(|(_, p)| {
                    matches!(
                        p,
                        StepProgress::Running {
                            uncertain: None,
                            ..
                        }
                    )
                })
                .map(|(s, _)| s.id.clone())
                .collect(),
            uncertain: uncertain.clone(),
            restored,
        });
        self.emit_decks();
        self.start_monitors(None);
        let (done, started): (Vec<String>, Vec<String>) = {
            let done = self
                .steps
                .iter()
                .filter(|s| matches!(s.status, StepStatus::Done | StepStatus::Skipped))
                .map(|s| s.id.clone())
                .collect();
            let started = self
                .steps
                .iter()
                .filter(|s| s.status != StepStatus::Waiting)
                .map(|s| s.id.clone())
                .collect();
            (done, started)
        };
        for id in &done {
            self.start_monitors(Some(id));
        }
        for id in &started {
            self.stop_monitors(id);
        }
        let mut failed = Vec::new();
        for (i, p) in r.steps.iter().enumerate().take(self.steps.len()) {
            if let StepProgress::Running {
                uncertain,
                failed: f,
                ..
            } = p
                && let Some(why) = uncertain.as_ref().or(f.as_ref())
            {
                self.steps[i].failed = Some(why.clone());
                if uncertain.is_none() {
                    failed.push(format!("step `{}` failed: {why}", self.steps[i].id));
                }
            }
        }
        let reason = if !problems.is_empty() {
            Some(format!(
                "resumed, but could not restore: {}",
                problems.join("; ")
            ))
        } else if !uncertain.is_empty() {
            Some(format!(
                "resumed after the controller stopped: {}. Check the deck, then `retry` to do it again or `skip` the rest of the step",
                uncertain.join("; ")
            ))
        } else if !failed.is_empty() {
            Some(format!(
                "resumed; held as when the controller stopped: {}. `retry` or `skip` it",
                failed.join("; ")
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            self.input(RunInput::StepFailed, Some(reason));
        } else if matches!(
            r.last_state.as_str(),
            "held" | "holding" | "paused" | "pausing"
        ) {
            // Held or paused by an operator: it stays so until resumed.
            let reason = format!(
                "resumed; the run was {} when the controller stopped{}",
                r.last_state,
                r.last_reason
                    .as_deref()
                    .map(|why| format!(": {why}"))
                    .unwrap_or_default()
            );
            self.input(RunInput::Command(RunCommand::Hold), Some(reason));
        }
    }

    /// The decks as the liquid handlers know them, into the journal.
    fn emit_decks(&mut self) {
        let labware: Vec<_> = self
            .bindings
            .values()
            .filter_map(|h| match h {
                DeviceHandle::LiquidHandler(lh) => Some(lh.deck_state().records(lh.id())),
                _ => None,
            })
            .flatten()
            .collect();
        if self
            .bindings
            .values()
            .any(|h| matches!(h, DeviceHandle::LiquidHandler(_)))
        {
            self.emit(EventKind::Deck { labware });
        }
    }

    fn now(&self) -> f64 {
        self.clock.now_s()
    }

    fn emit(&mut self, kind: EventKind) {
        let t = self.now();
        self.bus.publish(t, kind);
    }

    fn state(&self) -> RunState {
        self.machine.state()
    }

    async fn run(mut self, mut control: mpsc::UnboundedReceiver<Control>) -> RunReport {
        let Some(mut messages) = self.messages_rx.take() else {
            return self.report();
        };
        let started = self.now();
        tracing::info!(protocol = %self.plan_name, steps = self.steps.len(), "run prepared");
        // Idle until `start`; commands other than start/stop/abort are rejected.
        loop {
            if self.state() != RunState::Idle {
                break;
            }
            self.bus.flush();
            match control.recv().await {
                Some(c) => self.control(c),
                None => return self.report(),
            }
        }
        let mut control_open = true;
        if self.state() == RunState::Running {
            if let Some(r) = self.resumption.take_if(|r| r.was_ending().is_some()) {
                // The run was ending when the controller stopped: it ends now,
                // its devices going to their safe states, and no step runs.
                self.finish_ending(&r);
            } else if let Err(e) = self
                .connect_all(&mut messages, &mut control, &mut control_open)
                .await
            {
                self.faults.push(e.clone());
                self.input(RunInput::Failure, Some(e));
            } else if !self.state().is_live() {
                // Stopped or aborted while its devices connected.
            } else if let Some(r) = self.resumption.take() {
                self.restore(&r).await;
            } else {
                self.start_monitors(None);
            }
        }
        while !self.state().is_final() {
            self.schedule();
            if self.state().is_final() {
                break;
            }
            let wake = self.next_wake();
            // Write-ahead point: what happened so far is journaled before the
            // runtime waits and before anything is reported.
            self.bus.flush();
            tokio::select! {
                Some(m) = messages.recv() => self.message(m),
                c = control.recv(), if control_open => match c {
                    Some(c) => self.control(c),
                    // Nobody can command the run any more: it goes on by itself.
                    None => control_open = false,
                },
                _ = sleep_until_opt(self.clock, wake) => {}
            }
        }
        for (_, t) in self.monitor_tasks.drain() {
            t.abort();
        }
        for (_, t) in self.reconnecting.drain() {
            t.abort();
        }
        for (_, t) in self.tasks.drain() {
            t.abort();
        }
        self.emit_decks();
        self.bus.flush();
        let mut report = self.report();
        report.duration_s = self.now() - started;
        report
    }

    fn report(&self) -> RunReport {
        let mut device_busy_s: IndexMap<String, f64> =
            self.devices.keys().map(|d| (d.clone(), 0.0)).collect();
        for s in &self.steps {
            if let Some(d) = &s.device {
                *device_busy_s.entry(d.clone()).or_default() += s.busy_s;
            }
        }
        RunReport {
            state: self.state(),
            duration_s: self.now(),
            steps_total: self.steps.len(),
            steps_done: self
                .steps
                .iter()
                .filter(|s| s.status == StepStatus::Done)
                .count(),
            steps_skipped: self
                .steps
                .iter()
                .filter(|s| s.status == StepStatus::Skipped)
                .count(),
            alarms: self.alarms.clone(),
            faults: self.faults.clone(),
            prompts: self.prompts,
            steps: self
                .steps
                .iter()
                .map(|s| StepTiming {
                    id: s.id.clone(),
                    device: s.device.clone(),
                    start_s: s.started_s,
                    end_s: s.ended_s,
                    busy_s: s.busy_s,
                    waited_for: s.waited_for.clone(),
                    outcome: match s.status {
                        StepStatus::Done => "completed",
                        StepStatus::Skipped => "skipped",
                        StepStatus::Active => "unfinished",
                        StepStatus::Waiting => "not started",
                    }
                    .to_string(),
                })
                .collect(),
            device_busy_s,
        }
    }

    // ---- connecting ----------------------------------------------------------

    /// Connects every device of the run, each up to [`CONNECT_ATTEMPTS`]
    /// times, while commands are answered (a run can be paused, stopped or
    /// aborted while it waits for its instruments). A new run fails if a
    /// device cannot be connected (nothing has moved yet); a run taken up
    /// after a restart keeps trying, backing off up to 30 s, since failing
    /// it would abandon what it has done.
    async fn connect_all(
        &mut self,
        messages: &mut mpsc::UnboundedReceiver<Message>,
        control: &mut mpsc::UnboundedReceiver<Control>,
        control_open: &mut bool,
    ) -> Result<(), String> {
        let keep_trying = self.resumption.is_some();
        let ids: Vec<String> = self.devices.keys().cloned().collect();
        let mut pending: HashSet<String> = HashSet::new();
        for id in &ids {
            self.device_input(id, DeviceInput::Connect, None);
            if self.spawn_connect(id, 1) {
                pending.insert(id.clone());
            }
        }
        while !pending.is_empty() {
            if !self.state().is_live() {
                // Stopped or aborted meanwhile: the main loop ends the run.
                return Ok(());
            }
            self.bus.flush();
            tokio::select! {
                m = messages.recv() => match m {
                    None => break,
                    Some(Message::Connected { device, attempt, result }) => match result {
                        Ok(()) => {
                            pending.remove(&device);
                            self.reconnecting.remove(&device);
                            self.device_input(&device, DeviceInput::Connected, None);
                        }
                        Err(e) if attempt < CONNECT_ATTEMPTS => {
                            tracing::warn!(%device, attempt, error = %e, "device did not connect; trying again");
                            self.spawn_connect(&device, attempt + 1);
                        }
                        Err(e) if keep_trying => {
                            if attempt == CONNECT_ATTEMPTS {
                                self.device_input(
                                    &device,
                                    DeviceInput::ConnectFailed,
                                    Some(format!("{e}; the run waits for it, trying again every 30 s at most (stop or abort to end it)")),
                                );
                            }
                            self.spawn_connect(&device, attempt + 1);
                        }
                        Err(e) => {
                            self.device_input(&device, DeviceInput::ConnectFailed, Some(e.to_string()));
                            return Err(format!(
                                "device {device} could not be connected ({CONNECT_ATTEMPTS} attempts): {e}"
                            ));
                        }
                    },
                    Some(other) => self.message(other),
                },
                c = control.recv(), if *control_open => match c {
                    Some(c) => self.control(c),
                    None => *control_open = false,
                },
            }
        }
        // Tell each liquid handler what is on its deck.
        for (role, deck) in self.decks.clone() {
            if let Some(DeviceHandle::LiquidHandler(lh)) = self.bindings.get(&role)
                && let Err(e) = lh.configure_deck(deck).await
            {
                return Err(format!("the deck of {role} could not be set up: {e}"));
            }
        }
        Ok(())
    }

    /// Starts connect attempt `attempt` (the first at once, then backing off
    /// in real time: talking to an instrument does not speed up with the
    /// clock). False if the run has no such device.
    fn spawn_connect(&mut self, id: &str, attempt: u32) -> bool {
        let Some(handle) = self.handle_by_id(id) else {
            return false;
        };
        let tx = self.messages_tx.clone();
        let limit = std::time::Duration::from_secs_f64(self.options.connect_timeout_s);
        let delay = if attempt <= 1 {
            0.0
        } else {
            2f64.powi(attempt.min(7) as i32 - 2).min(30.0)
        };
        let device = id.to_string();
        let task = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs_f64(delay)).await;
            let result = match tokio::time::timeout(limit, handle.device().connect()).await {
                Ok(r) => r,
                Err(_) => Err(DeviceError::Timeout {
                    device: device.clone(),
                    seconds: limit.as_secs_f64(),
                }),
            };
            let _ = tx.send(Message::Connected {
                device,
                attempt,
                result,
            });
        });
        // Kept with the reconnects, so the run's end stops it.
        if let Some(old) = self.reconnecting.insert(id.to_string(), task) {
            old.abort();
        }
        true
    }

    /// Ends a run that was aborting or stopping when the controller stopped.
    fn finish_ending(&mut self, r: &Resumption) {
        self.emit(EventKind::Resumed {
            after_seq: r.after_seq,
            steps_completed: r.completed(),
            continued: Vec::new(),
            uncertain: Vec::new(),
            restored: Vec::new(),
        });
        // An `abort` command changes the state without a reason; a failure
        // (a step's `abort` policy, a monitor) always gives one.
        let (input, why) = match r.was_ending() {
            Some(RunState::Stopping) => (RunInput::Command(RunCommand::Stop), "stopping"),
            _ if r.last_reason.is_some() => (RunInput::Failure, "aborting after a failure"),
            _ => (RunInput::Command(RunCommand::Abort), "aborting"),
        };
        let reason = match &r.last_reason {
            Some(because) => format!(
                "resumed; the run was {why} when the controller stopped ({because}): it ends now"
            ),
            None => format!("resumed; the run was {why} when the controller stopped: it ends now"),
        };
        self.input(input, Some(reason));
    }

    fn handle_by_id(&self, id: &str) -> Option<DeviceHandle> {
        self.bindings
            .values()
            .find(|h| h.device().id() == id)
            .cloned()
    }

    fn device_input(&mut self, id: &str, input: DeviceInput, reason: Option<String>) {
        let Some(m) = self.devices.get_mut(id) else {
            return;
        };
        if let Some(state) = m.handle(input) {
            self.emit(EventKind::DeviceState {
                device: id.to_string(),
                state,
                reason,
            });
        }
    }

    fn device_state(&self, id: &str) -> DeviceState {
        self.devices
            .get(id)
            .map_or(DeviceState::Ready, DeviceStateMachine::state)
    }

    /// Reconnects a faulted device in the background, backing off up to 30 s.
    fn start_reconnect(&mut self, id: &str) {
        if self.reconnecting.contains_key(id) {
            return;
        }
        let Some(handle) = self.handle_by_id(id) else {
            return;
        };
        let tx = self.messages_tx.clone();
        let clock = self.clock;
        let limit = std::time::Duration::from_secs_f64(self.options.connect_timeout_s);
        let device = id.to_string();
        let task = tokio::spawn(async move {
            let mut delay = 1.0;
            loop {
                clock.sleep(delay).await;
                if let Ok(Ok(())) = tokio::time::timeout(limit, handle.device().connect()).await {
                    let _ = tx.send(Message::Reconnected { device });
                    return;
                }
                delay = (delay * 2.0_f64).min(30.0);
            }
        });
        self.reconnecting.insert(id.to_string(), task);
    }

    // ---- commands and state ----------------------------------------------------

    fn control(&mut self, c: Control) {
        match c {
            Control::Command {
                command,
                source,
                reply,
            } => {
                let result = self.command(command, &source);
                let _ = reply.send(result);
            }
            Control::AnswerPrompt {
                step_id,
                response,
                reply,
            } => {
                let result = self.answer_prompt(&step_id, &response);
                let _ = reply.send(result);
            }
        }
    }

    fn command(&mut self, command: RunCommand, source: &str) -> Result<RunState, Rejected> {
        let before = self.state();
        match self.machine.handle(RunInput::Command(command)) {
            Ok(effects) => {
                self.emit(EventKind::Command {
                    command,
                    source: source.to_string(),
                    rejected: None,
                });
                tracing::info!(%command, %source, "command accepted");
                self.after_transition(before, effects, None);
                Ok(self.state())
            }
            Err(rejected) => {
                self.emit(EventKind::Command {
                    command,
                    source: source.to_string(),
                    rejected: Some(rejected.to_string()),
                });
                tracing::warn!(%command, %source, reason = %rejected, "command rejected");
                Err(rejected)
            }
        }
    }

    /// Feeds an internal observation to the machine.
    fn input(&mut self, input: RunInput, reason: Option<String>) {
        let before = self.state();
        if let Ok(effects) = self.machine.handle(input)
            && (self.state() != before || !effects.is_empty())
        {
            self.after_transition(before, effects, reason);
        }
    }

    fn after_transition(&mut self, before: RunState, effects: Vec<Effect>, reason: Option<String>) {
        let after = self.state();
        // `held` comes after `holding` once operations in flight end; it repeats
        // why, so that whoever sees only `held` (an operator, MES) knows it.
        let reason = match (after, reason) {
            (RunState::Holding, Some(r)) => {
                self.hold_reason = Some(r.clone());
                Some(r)
            }
            (RunState::Held, None) => self.hold_reason.clone(),
            (_, r) => r,
        };
        if after != before {
            self.state_tx.send_replace(after);
            tracing::info!(from = %before, to = %after, "run state");
            self.emit(EventKind::RunState {
                state: after,
                reason,
            });
            if matches!(
                after,
                RunState::Pausing | RunState::Holding | RunState::Stopping
            ) {
                // Waits and polls are not device operations: stop them now.
                self.interrupt_waits();
            }
        }
        for effect in effects {
            match effect {
                Effect::CancelInFlight => self.cancel_in_flight(),
                Effect::RunSafeStates => self.run_safe_states(),
                Effect::RetryFailedStep => {
                    let now = self.now();
                    for s in self.steps.iter_mut().filter(|s| s.failed.is_some()) {
                        s.failed = None;
                        s.attempts = 0;
                        s.attempt_from_s = Some(now);
                    }
                }
                Effect::SkipFailedStep => {
                    let failed: Vec<usize> = (0..self.steps.len())
                        .filter(|&i| self.steps[i].failed.is_some())
                        .collect();
                    for i in failed {
                        self.steps[i].failed = None;
                        self.finish_step(
                            i,
                            StepStatus::Skipped,
                            Some("skipped by the operator".into()),
                        );
                    }
                }
            }
        }
        self.check_quiescent();
    }

    fn check_quiescent(&mut self) {
        // Only started steps can have an operation in flight.
        let device_ops = self
            .eligible
            .iter()
            .any(|&i| self.steps[i].in_flight && self.steps[i].device_op);
        if !device_ops
            && matches!(
                self.state(),
                RunState::Pausing | RunState::Holding | RunState::Stopping
            )
        {
            self.input(RunInput::Quiescent, None);
        }
    }

    fn interrupt_waits(&mut self) {
        let started: Vec<usize> = self.eligible.iter().copied().collect();
        for i in started {
            let s = &self.steps[i];
            if s.in_flight && !s.device_op && !self.pending_prompts.values().any(|&p| p == i) {
                if let Some(t) = self.tasks.remove(&i) {
                    t.abort();
                }
                self.steps[i].in_flight = false;
            }
        }
        self.generation += 1;
    }

    fn cancel_in_flight(&mut self) {
        for (_, t) in self.tasks.drain() {
            t.abort();
        }
        self.generation += 1;
        for s in &mut self.steps {
            s.in_flight = false;
        }
        self.pending_prompts.clear();
    }

    fn run_safe_states(&mut self) {
        if self.safe_states_running {
            return;
        }
        self.safe_states_running = true;
        let handles: Vec<DeviceHandle> = self.bindings.values().cloned().collect();
        let tx = self.messages_tx.clone();
        let limit = std::time::Duration::from_secs_f64(self.options.safe_state_timeout_s);
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for h in handles {
                let d = h.device();
                // A lost reply must not leave a pump feeding or a heater on:
                // try again, reconnecting first, before raising the alarm.
                let mut last = None;
                for attempt in 1..=SAFE_STATE_ATTEMPTS {
                    if attempt > 1 {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        let _ = tokio::time::timeout(limit, d.connect()).await;
                    }
                    match tokio::time::timeout(limit, d.safe_state()).await {
                        Ok(Ok(())) => {
                            last = None;
                            break;
                        }
                        Ok(Err(e)) => last = Some(e.to_string()),
                        Err(_) => {
                            last = Some(format!("{} did not reach its safe state in time", d.id()))
                        }
                    }
                }
                if let Some(e) = last {
                    errors.push(format!("{e} ({SAFE_STATE_ATTEMPTS} attempts)"));
                }
            }
            let _ = tx.send(Message::SafeStatesDone { errors });
        });
    }

    fn answer_prompt(&mut self, step_id: &str, response: &str) -> Result<(), String> {
        let Some(i) = self.pending_prompts.remove(step_id) else {
            return Err(format!("step `{step_id}` is not waiting for an answer"));
        };
        self.emit(EventKind::Prompt {
            step_id: step_id.to_string(),
            message: String::new(),
            response: Some(response.to_string()),
        });
        let generation = self.generation;
        self.op_done(i, generation, Ok(OpOutput::Nothing));
        Ok(())
    }

    // ---- scheduling ----------------------------------------------------------------

    fn next_wake(&self) -> Option<f64> {
        let now = self.now();
        let mut wake: Option<f64> = None;
        let runnable = self.state() == RunState::Running;
        for s in self.eligible.iter().map(|&i| &self.steps[i]) {
            if runnable && !s.in_flight && s.not_before_s > now {
                wake = Some(wake.map_or(s.not_before_s, |w: f64| w.min(s.not_before_s)));
            }
            // Prompts and holds have no task; their timeouts are checked here.
            // A deadline already past is the task's own timeout to report;
            // waking for it would spin without letting that task run.
            if let Some(deadline) = s.deadline_s()
                && s.in_flight
                && !s.device_op
                && deadline > now
            {
                wake = Some(wake.map_or(deadline, |w: f64| w.min(deadline)));
            }
        }
        wake
    }

    /// Starts whatever may start; repeats while steps finish on the spot (logs,
    /// auto-answered prompts), since nothing else would wake the loop for them.
    fn schedule(&mut self) {
        loop {
            let before = self.finished_steps;
            self.schedule_once();
            if self.finished_steps == before || self.state().is_final() {
                return;
            }
        }
    }

    fn schedule_once(&mut self) {
        // Prompt timeouts.
        let now = self.now();
        let overdue: Vec<usize> = self
            .pending_prompts
            .values()
            .copied()
            .filter(|&i| {
                let s = &self.steps[i];
                s.deadline_s().is_some_and(|d| now >= d)
            })
            .collect();
        for i in overdue {
            let id = self.steps[i].id.clone();
            self.pending_prompts.remove(&id);
            let t = self.steps[i].timeout_s.unwrap_or(0.0);
            let generation = self.generation;
            self.op_done(i, generation, Err(StepError::TimedOut(t)));
        }
        if self.state() != RunState::Running {
            return;
        }
        if self.finished_steps == self.steps.len() {
            self.input(RunInput::Finished, None);
            return;
        }
        let eligible: Vec<usize> = self.eligible.iter().copied().collect();
        for i in eligible {
            if self.state() != RunState::Running {
                return;
            }
            self.try_start(i);
        }
    }

    fn try_start(&mut self, i: usize) {
        let now = self.now();
        {
            let s = &self.steps[i];
            if matches!(s.status, StepStatus::Done | StepStatus::Skipped)
                || s.in_flight
                || s.failed.is_some()
                || now < s.not_before_s
            {
                return;
            }
        }
        let deps = self.steps[i].deps.clone();
        if !deps
            .iter()
            .all(|&d| matches!(self.steps[d].status, StepStatus::Done | StepStatus::Skipped))
        {
            return;
        }
        if self.steps[i].next_op >= self.steps[i].ops.len() {
            self.finish_step(i, StepStatus::Done, None);
            return;
        }
        // A repeated step starts repetition r at start + r × every, and leaves
        // its device free in between.
        let op_rep = self.steps[i].ops[self.steps[i].next_op].repetition;
        let first_of_rep = self.steps[i].next_op == 0
            || self.steps[i].ops[self.steps[i].next_op - 1].repetition != op_rep;
        if let (Some(r), Some(every), Some(start), true) = (
            op_rep,
            self.steps[i].every_s,
            self.steps[i].started_s,
            first_of_rep,
        ) && r > 0
        {
            let due = start + f64::from(r) * every;
            if now + 1e-9 < due {
                self.release_device(i);
                self.steps[i].not_before_s = due;
                return;
            }
        }
        if let Some(device) = self.steps[i].device.clone() {
            match self.device_owner.get(&device) {
                Some(&owner) if owner != i => {
                    self.steps[i].waited_for = Some(format!("device {device}"));
                    return;
                }
                _ => {}
            }
            if matches!(
                self.device_state(&device),
                DeviceState::Fault | DeviceState::Disconnected | DeviceState::Connecting
            ) {
                return;
            }
            self.device_owner.insert(device, i);
        }
        if self.steps[i].status == StepStatus::Waiting {
            self.steps[i].status = StepStatus::Active;
            self.steps[i].started_s = Some(now);
            if self.steps[i].waited_for.is_none() {
                // The dependency that finished last is what this step waited for.
                self.steps[i].waited_for = deps
                    .iter()
                    .max_by(|a, b| {
                        let ea = self.steps[**a].ended_s.unwrap_or(0.0);
                        let eb = self.steps[**b].ended_s.unwrap_or(0.0);
                        ea.total_cmp(&eb)
                    })
                    .map(|&d| self.steps[d].id.clone());
            }
            let (id, action) = (self.steps[i].id.clone(), self.steps[i].action.clone());
            self.stop_monitors(&id);
            tracing::info!(step = %id, %action, "step started");
            self.emit(EventKind::Step {
                step_id: id,
                action,
                phase: StepPhase::Started,
                repetition: None,
                detail: None,
            });
        }
        self.start_op(i);
    }

    fn release_device(&mut self, i: usize) {
        if let Some(d) = &self.steps[i].device
            && self.device_owner.get(d) == Some(&i)
        {
            self.device_owner.remove(d);
        }
    }

    fn start_op(&mut self, i: usize) {
        let op = self.steps[i].ops[self.steps[i].next_op].op.clone();
        let now = self.now();
        let generation = self.generation;
        let s = &mut self.steps[i];
        s.in_flight = true;
        s.op_started_s = now;
        s.device_op = !matches!(
            op,
            Op::Wait { .. } | Op::WaitUntil { .. } | Op::Prompt { .. } | Op::Log { .. }
        );
        let remaining = s
            .timeout_s
            .zip(s.deadline_s())
            .map(|(t, deadline)| (t, deadline - now));
        match op {
            Op::Log { message } => {
                let id = s.id.clone();
                self.emit(EventKind::Log {
                    step_id: id,
                    message,
                });
                self.op_done(i, generation, Ok(OpOutput::Nothing));
                return;
            }
            Op::Prompt { message } => {
                let id = s.id.clone();
                self.prompts += 1;
                self.emit(EventKind::Prompt {
                    step_id: id.clone(),
                    message,
                    response: None,
                });
                if self.options.auto_answer_prompts {
                    self.emit(EventKind::Prompt {
                        step_id: id,
                        message: String::new(),
                        response: Some("ok (answered by the simulation)".into()),
                    });
                    self.op_done(i, generation, Ok(OpOutput::Nothing));
                } else {
                    self.pending_prompts.insert(id, i);
                }
                return;
            }
            Op::Wait { duration_s } => {
                // The end of a wait is fixed when it first starts; a pause does not move it.
                let end = *s.wait_until_s.get_or_insert(now + duration_s);
                let clock = self.clock;
                self.spawn_op(i, remaining, async move {
                    clock.sleep_until(end).await;
                    Ok(OpOutput::Nothing)
                });
                return;
            }
            Op::WaitUntil { any, poll_s, .. } => {
                let bindings = self.bindings.clone();
                let clock = self.clock;
                self.spawn_op(i, remaining, async move {
                    loop {
                        if condition_holds(&any, &bindings).await? {
                            return Ok(OpOutput::Nothing);
                        }
                        clock.sleep(poll_s).await;
                    }
                });
                return;
            }
            _ => {}
        }
        if let Some(d) = self.steps[i].device.clone() {
            self.device_input(&d, DeviceInput::OperationStarted, None);
        }
        let context = OpContext {
            device: self.steps[i]
                .role
                .as_ref()
                .and_then(|r| self.bindings.get(r))
                .cloned(),
            bindings: self.bindings.clone(),
            modules_on_deck: self.modules_on_deck.clone(),
            labware: self.labware.clone(),
        };
        self.spawn_op(i, remaining, async move {
            perform(op, context).await.map_err(StepError::Device)
        });
    }

    fn spawn_op<F>(&mut self, i: usize, remaining: Option<(f64, f64)>, work: F)
    where
        F: std::future::Future<Output = Result<OpOutput, StepError>> + Send + 'static,
    {
        let s = &self.steps[i];
        let (step_id, index) = (s.id.clone(), s.next_op);
        let detail = s.ops.get(index).map(|o| crate::plan::describe(&o.op));
        self.emit(EventKind::Operation {
            step_id,
            index: index as u32,
            phase: OperationPhase::Sent,
            detail,
        });
        // Write-ahead point: the journal knows the operation was sent before
        // the device can do it.
        self.bus.flush();
        let tx = self.messages_tx.clone();
        let generation = self.generation;
        let clock = self.clock;
        let task = tokio::spawn(async move {
            let result = match remaining {
                Some((timeout, left)) => {
                    match tokio::time::timeout(clock.real(left.max(0.0)), work).await {
                        Ok(r) => r,
                        Err(_) => Err(StepError::TimedOut(timeout)),
                    }
                }
                None => work.await,
            };
            let _ = tx.send(Message::OpDone {
                step: i,
                generation,
                result,
            });
        });
        if let Some(old) = self.tasks.insert(i, task) {
            old.abort();
        }
    }

    // ---- results -------------------------------------------------------------------

    fn message(&mut self, m: Message) {
        match m {
            Message::OpDone {
                step,
                generation,
                result,
            } => self.op_done(step, generation, result),
            // A connect attempt that ended after the run stopped waiting for it.
            Message::Connected { .. } => {}
            Message::Reconnected { device } => {
                self.reconnecting.remove(&device);
                self.device_input(&device, DeviceInput::Connected, Some("reconnected".into()));
                tracing::info!(%device, "device reconnected");
            }
            Message::SafeStatesDone { errors } => {
                for e in errors {
                    self.faults.push(e.clone());
                    self.raise_alarm("safe-state".into(), "safe state".into(), e);
                }
                self.input(RunInput::SafeStateDone, None);
            }
            Message::MonitorReading {
                monitor,
                values,
                error,
            } => self.monitor_reading(monitor, values, error),
        }
    }

    fn op_done(&mut self, i: usize, generation: u64, result: Result<OpOutput, StepError>) {
        if generation != self.generation && !self.steps[i].device_op {
            // A wait or poll interrupted by a pause; it will be started again.
            return;
        }
        if !self.steps[i].in_flight {
            return;
        }
        self.tasks.remove(&i);
        let now = self.now();
        let was_device_op = self.steps[i].device_op;
        {
            let s = &mut self.steps[i];
            s.in_flight = false;
            s.device_op = false;
            if was_device_op {
                s.busy_s += now - s.op_started_s;
            }
        }
        if was_device_op && let Some(d) = self.steps[i].device.clone() {
            match &result {
                Err(StepError::Device(e)) if e.is_device_fault() => {
                    self.device_input(&d, DeviceInput::Faulted, Some(e.to_string()));
                    self.faults.push(e.to_string());
                    self.start_reconnect(&d);
                }
                _ => self.device_input(&d, DeviceInput::OperationFinished, None),
            }
        }
        match result {
            Ok(output) => {
                let s = &self.steps[i];
                if s.ops
                    .get(s.next_op)
                    .is_some_and(|o| !matches!(o.op, Op::Log { .. } | Op::Prompt { .. }))
                {
                    let (step_id, index) = (s.id.clone(), s.next_op as u32);
                    self.emit(EventKind::Operation {
                        step_id,
                        index,
                        phase: OperationPhase::Done,
                        detail: None,
                    });
                }
                if let OpOutput::Samples(values) = output {
                    let device = self.steps[i].device.clone().unwrap_or_default();
                    let source = self.steps[i].id.clone();
                    self.emit(EventKind::Sample {
                        device,
                        source,
                        values,
                    });
                }
                let s = &mut self.steps[i];
                s.next_op += 1;
                s.attempts = 0;
                s.wait_until_s = None;
                if s.next_op >= s.ops.len() {
                    self.finish_step(i, StepStatus::Done, None);
                }
            }
            Err(error) => self.step_failed(i, error),
        }
        self.check_quiescent();
    }

    fn step_failed(&mut self, i: usize, error: StepError) {
        let message = error.to_string();
        let fault = matches!(&error, StepError::Device(e) if e.is_device_fault());
        let (id, action) = (self.steps[i].id.clone(), self.steps[i].action.clone());
        tracing::warn!(step = %id, error = %message, "step failed");
        let policy = self.steps[i].on_error;
        let attempts = self.steps[i].attempts;
        if policy == ErrorPolicy::Retry && attempts < self.steps[i].retries {
            let delay = (self.options.retry_base_s * 2f64.powi(attempts as i32))
                .min(self.options.retry_max_s);
            self.steps[i].attempts += 1;
            self.steps[i].not_before_s = self.now() + delay;
            self.steps[i].attempt_from_s = Some(self.now() + delay);
            self.emit(EventKind::Step {
                step_id: id,
                action,
                phase: StepPhase::Retrying,
                repetition: None,
                detail: Some(format!(
                    "attempt {} of {} in {}: {message}",
                    attempts + 2,
                    self.steps[i].retries + 1,
                    Quantity::seconds(delay)
                )),
            });
            return;
        }
        self.emit(EventKind::Step {
            step_id: id.clone(),
            action,
            phase: StepPhase::Failed,
            repetition: None,
            detail: Some(message.clone()),
        });
        match policy {
            ErrorPolicy::Abort => {
                self.input(
                    RunInput::Failure,
                    Some(format!("step `{id}` failed: {message}")),
                );
            }
            // A device fault is never stepped over silently: the run holds until
            // the operator decides.
            ErrorPolicy::Skip if !fault => {
                self.finish_step(i, StepStatus::Skipped, Some(message));
            }
            _ => {
                self.steps[i].failed = Some(message.clone());
                self.input(
                    RunInput::StepFailed,
                    Some(format!("step `{id}` failed: {message}")),
                );
            }
        }
    }

    /// Counts a step as finished and frees the steps that waited for it.
    fn mark_finished(&mut self, i: usize, status: StepStatus) -> bool {
        if !self.eligible.remove(&i) {
            return false; // already finished
        }
        self.finished_steps += 1;
        for k in 0..self.dependents[i].len() {
            let d = self.dependents[i][k];
            self.deps_left[d] -= 1;
            if self.deps_left[d] == 0 {
                self.eligible.insert(d);
            }
        }
        self.steps[i].status = status;
        true
    }

    fn finish_step(&mut self, i: usize, status: StepStatus, detail: Option<String>) {
        if !self.mark_finished(i, status) {
            return;
        }
        let now = self.now();
        self.release_device(i);
        let s = &mut self.steps[i];
        s.ended_s = Some(now);
        s.started_s.get_or_insert(now);
        let (id, action) = (s.id.clone(), s.action.clone());
        let phase = if status == StepStatus::Done {
            StepPhase::Completed
        } else {
            StepPhase::Skipped
        };
        self.start_monitors(Some(&id));
        tracing::info!(step = %id, ?phase, "step ended");
        self.emit(EventKind::Step {
            step_id: id,
            action,
            phase,
            repetition: None,
            detail,
        });
    }

    // ---- monitors ------------------------------------------------------------------

    /// Starts the monitors that wait for `after_step` (`None`: the run's start).
    fn start_monitors(&mut self, after_step: Option<&str>) {
        for (index, m) in self.monitors.iter().enumerate() {
            if m.after.as_deref() != after_step {
                continue;
            }
            let Some(handle) = self.bindings.get(&m.role).cloned() else {
                continue;
            };
            let tx = self.messages_tx.clone();
            let clock = self.clock;
            let signals = m.read.clone();
            let every = m.every_s.max(1e-3);
            let task = tokio::spawn(async move {
                let start = clock.now_s();
                let mut k = 0u64;
                loop {
                    let mut values = Vec::with_capacity(signals.len());
                    let mut error = None;
                    for s in &signals {
                        match handle.device().read(s).await {
                            Ok(v) => values.push((s.clone(), v)),
                            Err(e) => error = Some(e.to_string()),
                        }
                    }
                    if tx
                        .send(Message::MonitorReading {
                            monitor: index,
                            values,
                            error,
                        })
                        .is_err()
                    {
                        return;
                    }
                    k += 1;
                    clock.sleep_until(start + k as f64 * every).await;
                }
            });
            self.monitor_tasks.insert(index, task);
        }
    }

    /// Stops the monitors that end when `step` starts.
    fn stop_monitors(&mut self, step: &str) {
        for (index, m) in self.monitors.iter().enumerate() {
            if m.until.as_deref() == Some(step)
                && let Some(task) = self.monitor_tasks.remove(&index)
            {
                task.abort();
            }
        }
    }

    fn monitor_reading(
        &mut self,
        index: usize,
        values: Vec<(String, Quantity)>,
        error: Option<String>,
    ) {
        if !self.monitor_tasks.contains_key(&index) {
            // A reading sent just before its monitor was stopped.
            return;
        }
        let Some(m) = self.monitors.get(index).cloned() else {
            return;
        };
        let device = self
            .bindings
            .get(&m.role)
            .map(|h| h.device().id().to_string())
            .unwrap_or_default();
        if !values.is_empty() {
            self.emit(EventKind::Sample {
                device,
                source: m.id.clone(),
                values: values.clone(),
            });
        }
        if let Some(e) = error {
            self.raise_alarm(
                format!("{}.read", m.id),
                m.id.clone(),
                format!("monitor {} could not read: {e}", m.id),
            );
        }
        for (signal, limits) in &m.limits {
            let Some((_, v)) = values.iter().find(|(s, _)| s == signal) else {
                continue;
            };
            let alarm_id = format!("{}.{signal}", m.id);
            let inside = limits.contains(v.value);
            let active = self.active_alarms.get(&alarm_id).copied().unwrap_or(false);
            if inside && active {
                self.active_alarms.insert(alarm_id.clone(), false);
                self.emit(EventKind::Alarm {
                    alarm_id,
                    state: AlarmState::Cleared,
                    source: m.id.clone(),
                    message: format!("{signal} back within {limits}: {v}"),
                });
            } else if !inside && !active {
                let message = format!("{} {signal} = {v}, outside {limits}", m.role);
                self.raise_alarm(alarm_id, m.id.clone(), message.clone());
                match m.on_violation {
                    ViolationPolicy::Alarm => {}
                    ViolationPolicy::Hold => {
                        if matches!(
                            self.state(),
                            RunState::Running | RunState::Pausing | RunState::Paused
                        ) {
                            let before = self.state();
                            if let Ok(effects) =
                                self.machine.handle(RunInput::Command(RunCommand::Hold))
                            {
                                self.emit(EventKind::Command {
                                    command: RunCommand::Hold,
                                    source: format!("monitor {}", m.id),
                                    rejected: None,
                                });
                                self.after_transition(before, effects, Some(message));
                            }
                        }
                    }
                    ViolationPolicy::Abort => self.input(RunInput::Failure, Some(message)),
                }
            }
        }
    }

    fn raise_alarm(&mut self, alarm_id: String, source: String, message: String) {
        self.active_alarms.insert(alarm_id.clone(), true);
        tracing::warn!(alarm = %alarm_id, %message, "alarm");
        self.alarms.push(message.clone());
        self.emit(EventKind::Alarm {
            alarm_id,
            state: AlarmState::Active,
            source,
            message,
        });
    }
}

/// An idempotent device call, tried up to three times (each within
/// `limit`) before its last error is returned.
async fn with_attempts<'a, F, Fut>(limit: std::time::Duration, call: F) -> Result<(), String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), DeviceError>> + 'a,
{
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        match tokio::time::timeout(limit, call()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer".into(),
        }
    }
    Err(last)
}

async fn sleep_until_opt(clock: Clock, t: Option<f64>) {
    match t {
        Some(t) => clock.sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// What an operation needs to reach its devices.
struct OpContext {
    device: Option<DeviceHandle>,
    bindings: IndexMap<String, DeviceHandle>,
    modules_on_deck: HashMap<String, String>,
    labware: HashMap<String, DeckLabware>,
}

impl OpContext {
    fn device(&self) -> Result<&DeviceHandle, DeviceError> {
        self.device.as_ref().ok_or_else(|| DeviceError::Refused {
            device: "(none)".into(),
            reason: "the step has no device".into(),
        })
    }

    fn liquid_handler_of(&self, role: &str) -> Option<Arc<dyn crate::device::LiquidHandler>> {
        let role = self.modules_on_deck.get(role).map_or(role, String::as_str);
        match self.bindings.get(role) {
            Some(DeviceHandle::LiquidHandler(lh)) => Some(Arc::clone(lh)),
            _ => None,
        }
    }
}

fn refused(device: &DeviceHandle, reason: impl Into<String>) -> DeviceError {
    DeviceError::Refused {
        device: device.device().id().to_string(),
        reason: reason.into(),
    }
}

/// Carries out one planned operation on its device.
async fn perform(op: Op, ctx: OpContext) -> Result<OpOutput, DeviceError> {
    let handle = ctx.device()?.clone();
    let device = handle.device();
    match op {
        Op::PickUpTip { rack, well, .. } => lh(&handle)?.pick_up_tip(&rack, &well).await?,
        Op::Aspirate {
            labware,
            well,
            volume_ul,
        } => lh(&handle)?.aspirate(&labware, &well, volume_ul).await?,
        Op::Dispense {
            labware,
            well,
            volume_ul,
        } => lh(&handle)?.dispense(&labware, &well, volume_ul).await?,
        Op::Mix {
            labware,
            well,
            volume_ul,
            cycles,
        } => lh(&handle)?.mix(&labware, &well, volume_ul, cycles).await?,
        Op::DropTip => lh(&handle)?.drop_tip().await?,
        Op::MoveLabware { labware, from, to } => {
            let DeviceHandle::Incubator(inc) = &handle else {
                return Err(refused(&handle, "only an incubator moves labware"));
            };
            let (from_role, from_slot) = split_place(&from);
            let (to_role, to_slot) = split_place(&to);
            let into_storage = ctx
                .bindings
                .get(to_role)
                .is_some_and(|h| h.device().id() == device.id());
            if into_storage {
                // The plate leaves the deck it was on.
                inc.load(&labware, to_slot).await?;
                if let Some(lh) = ctx.liquid_handler_of(from_role) {
                    lh.remove_labware(&labware).await?;
                }
            } else {
                inc.unload(&labware, from_slot).await?;
                if let Some(lh) = ctx.liquid_handler_of(to_role)
                    && let Some(mut placed) = ctx.labware.get(&labware).cloned()
                {
                    placed.slot = to_slot;
                    lh.place_labware(placed).await?;
                }
            }
        }
        Op::Set { setpoints, wait } => {
            for sp in &setpoints {
                device.set(&sp.name, sp.value).await?;
            }
            if wait {
                for sp in &setpoints {
                    device.wait_until_reached(&sp.name).await?;
                }
            }
        }
        Op::Feed {
            pump,
            volume_ul,
            rate_ml_min,
            duration_s,
        } => {
            let DeviceHandle::Bioreactor(br) = &handle else {
                return Err(refused(&handle, "feed needs a bioreactor"));
            };
            br.feed(&pump, volume_ul, rate_ml_min, duration_s).await?;
        }
        Op::PumpDispense {
            volume_ul,
            rate_ml_min,
        } => {
            let DeviceHandle::Pump(p) = &handle else {
                return Err(refused(&handle, "dispense needs a pump"));
            };
            p.dispense(volume_ul, rate_ml_min).await?;
        }
        Op::Sample { read } => {
            let mut values = Vec::with_capacity(read.len());
            for s in read {
                let v = device.read(&s).await?;
                values.push((s, v));
            }
            return Ok(OpOutput::Samples(values));
        }
        Op::Command { name } => device.command(&name).await?,
        Op::WaitUntil { .. } | Op::Wait { .. } | Op::Prompt { .. } | Op::Log { .. } => {}
    }
    Ok(OpOutput::Nothing)
}

fn lh(handle: &DeviceHandle) -> Result<&Arc<dyn crate::device::LiquidHandler>, DeviceError> {
    match handle {
        DeviceHandle::LiquidHandler(lh) => Ok(lh),
        other => Err(refused(other, "this is not a liquid handler")),
    }
}

/// Reads the signals a condition names and evaluates it.
async fn condition_holds(
    any: &[Vec<ConditionTerm>],
    bindings: &IndexMap<String, DeviceHandle>,
) -> Result<bool, StepError> {
    for group in any {
        let mut all = true;
        for term in group {
            let Some(h) = bindings.get(&term.role) else {
                return Err(StepError::Device(DeviceError::Refused {
                    device: term.role.clone(),
                    reason: "no device is bound to this role".into(),
                }));
            };
            let v = h
                .device()
                .read(&term.signal)
                .await
                .map_err(StepError::Device)?;
            all &= term.holds(v.value);
            if !all {
                break;
            }
        }
        if all {
            return Ok(true);
        }
    }
    Ok(false)
}
