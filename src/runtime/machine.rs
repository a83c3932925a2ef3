//! The run state machine (statig, synchronous).
//!
//! The machine decides; it does no I/O. Handlers record what the executor must
//! do in [`Effects`] (cancel operations, run safe states, retry or skip the
//! failed step), and a command that is not valid in the current state is
//! rejected with a reason naming that state. A synchronous machine keeps the
//! executor an ordinary `Send` tokio task (statig's async machines are not).
//! The transition table is in docs/run-states.md.

use serde::{Deserialize, Serialize};
use statig::prelude::*;
use std::fmt;

/// Run states, spelled as in the CLI, the journal and on MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Idle,
    Running,
    Pausing,
    Paused,
    Holding,
    Held,
    Stopping,
    Stopped,
    Aborting,
    Aborted,
    Completed,
    Failed,
}

impl RunState {
    pub const ALL: [RunState; 12] = [
        RunState::Idle,
        RunState::Running,
        RunState::Pausing,
        RunState::Paused,
        RunState::Holding,
        RunState::Held,
        RunState::Stopping,
        RunState::Stopped,
        RunState::Aborting,
        RunState::Aborted,
        RunState::Completed,
        RunState::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RunState::Idle => "idle",
            RunState::Running => "running",
            RunState::Pausing => "pausing",
            RunState::Paused => "paused",
            RunState::Holding => "holding",
            RunState::Held => "held",
            RunState::Stopping => "stopping",
            RunState::Stopped => "stopped",
            RunState::Aborting => "aborting",
            RunState::Aborted => "aborted",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
        }
    }

    pub fn from_name(name: &str) -> Option<RunState> {
        RunState::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Steps may still run (now or after a resume, retry or skip).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            RunState::Running
                | RunState::Pausing
                | RunState::Paused
                | RunState::Holding
                | RunState::Held
        )
    }

    /// A run in this state will never change again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Stopped | RunState::Aborted | RunState::Completed | RunState::Failed
        )
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an operator or MES may ask of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunCommand {
    Start,
    Pause,
    Resume,
    Hold,
    Abort,
    Stop,
    /// From held: run the failed step again, from the operation that failed.
    Retry,
    /// From held: give up the failed step and go on.
    Skip,
}

impl RunCommand {
    pub const ALL: [RunCommand; 8] = [
        RunCommand::Start,
        RunCommand::Pause,
        RunCommand::Resume,
        RunCommand::Hold,
        RunCommand::Abort,
        RunCommand::Stop,
        RunCommand::Retry,
        RunCommand::Skip,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RunCommand::Start => "start",
            RunCommand::Pause => "pause",
            RunCommand::Resume => "resume",
            RunCommand::Hold => "hold",
            RunCommand::Abort => "abort",
            RunCommand::Stop => "stop",
            RunCommand::Retry => "retry",
            RunCommand::Skip => "skip",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        RunCommand::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for RunCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A command refused in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command}: the run is {state}{}", .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct Rejected {
    pub command: RunCommand,
    pub state: RunState,
    pub detail: Option<String>,
}

/// What drives the machine: commands, and what the executor observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunInput {
    Command(RunCommand),
    /// No operation is in flight any more.
    Quiescent,
    /// Every step is done.
    Finished,
    /// A step failed and its policy (or a device fault) holds the run.
    StepFailed,
    /// A step failed with `on_error = "abort"`, or a monitor aborts.
    Failure,
    /// The safe states of the run's devices have been applied.
    SafeStateDone,
}

/// What the executor must do after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Abandon the operations in flight.
    CancelInFlight,
    /// Put every device the run uses in its safe state, then report SafeStateDone.
    RunSafeStates,
    /// Run the failed step again from the operation that failed.
    RetryFailedStep,
    /// Give up the failed step and go on with the rest.
    SkipFailedStep,
}

#[derive(Debug, Default)]
pub struct Effects {
    pub actions: Vec<Effect>,
    pub rejected: Option<Rejected>,
}

/// The run's state machine; [`RunStateMachine`] wraps it for use.
#[derive(Debug, Default)]
pub struct RunLogic;

fn reject(
    context: &mut Effects,
    input: &RunInput,
    state: RunState,
    detail: Option<&str>,
) -> Outcome<State> {
    // Internal observations that do not apply are simply ignored; only commands
    // are answered with a reason.
    if let RunInput::Command(command) = input {
        context.rejected = Some(Rejected {
            command: *command,
            state,
            detail: detail.map(str::to_string),
        });
    }
    Handled
}

#[state_machine(initial = "State::idle()", state(derive(Debug, Clone, PartialEq, Eq)))]
impl RunLogic {
    #[state]
    fn idle(context: &mut Effects, event: &RunInput) -> Outcome<State> {
        match event {
            RunInput::Command(RunCommand::Start) => Transition(State::running()),
            RunInput::Command(RunCommand::Stop) => Transition(State::stopped()),
            RunInput::Command(RunCommand::Abort) => Transition(State::aborted()),
            other => reject(context, other, RunState::Idle, None),
        }
    }

    #[state(superstate = "live")]
    fn running(context: &mut Effects, event: &RunInput) -> Outcome<State> {
        match event {
            RunInput::Command(RunCommand::Pause) => Transition(State::pausing()),
            RunInput::Command(RunCommand::Hold) => Transition(State::holding(false)),
            RunInput::StepFailed => Transition(State::holding(true)),
            RunInput::Finished => Transition(State::completed()),
            RunInput::Command(RunCommand::Resume) => reject(
                context,
                event,
                RunState::Running,
                Some("it is not paused or held"),
            ),
            _ => Super,
        }
    }

    #[state(superstate = "live")]
    fn pausing(context: &mut Effects, event: &RunInput) -> Outcome<State> {
        match event {
            RunInput::Quiescent => Transition(State::paused()),
            // Changed one's mind before the safe point: carry on.
            RunInput::Command(RunCommand::Resume) => Transition(State::running()),
            RunInput::Command(RunCommand::Hold) => Transition(State::holding(false)),
            RunInput::StepFailed => Transition(State::holding(true)),
            RunInput::Command(RunCommand::Pause) => {
                reject(context, event, RunState::Pausing, Some("already pausing"))
            }
            _ => Super,
        }
    }

    #[state(superstate = "live")]
    fn paused(context: &mut Effects, event: &RunInput) -> Outcome<State> {
        match event {
            RunInput::Command(RunCommand::Resume) => Transition(State::running()),
            RunInput::Command(RunCommand::Hold) => Transition(State::held(false)),
            RunInput::Command(RunCommand::Pause) => {
                reject(context, event, RunState::Paused, Some("already paused"))
            }
            _ => Super,
        }
    }

    #[state(superstate = "live")]
    fn holding(failed: &mut bool, context: &mut Effects, event: &RunInput) -> Outcome<State> {
        match event {
            RunInput::Quiescent => Transition(State::held(*failed)),
            RunInput::StepFailed => {
                *failed = true;
                Handled
            }
            RunInput::Command(RunCommand::Hold) => {
                reject(context, event, RunState::Holding, Some("already holding"))
            }
            _ => Super,
        }
    }

    #[state(superstate = "live")]
    fn held(failed: &mut bool, context: &mut Effects, event: &RunInput) -> Outcome<State> {
        match (event, *failed) {
            (RunInput::Command(RunCommand::Resume), false) => Transition(State::running()),
            (RunInput::Command(RunCommand::Resume), true) => reject(
                context,
                event,
                RunState::Held,
                Some("a step failed: retry it, skip it or abort"),
            ),
            (RunInput::Command(RunCommand::Retry), true) => {
                context.actions.push(Effect::RetryFailedStep);
                Transition(State::running())
            }
            (RunInput::Command(RunCommand::Skip), true) => {
                context.actions.push(Effect::SkipFailedStep);
                Transition(State::running())
            }
            (RunInput::Command(RunCommand::Retry | RunCommand::Skip), false) => reject(
                context,
                event,
                RunState::Held,
                Some("no step failed; resume the run"),
            ),
            (RunInput::Command(RunCommand::Hold), _) => {
                reject(context, event, RunState::Held, Some("already held"))
            }
            _ => Super,
        }
    }

    /// States in which the run can still be stopped or aborted.
    #[superstate]
    fn live(context: &mut Effects, event: &RunInput) -> Outcome<State> {
        match event {
            RunInput::Command(RunCommand::Abort) => {
                context.actions.push(Effect::CancelInFlight);
                context.actions.push(Effect::RunSafeStates);
                Transition(State::aborting(false))
            }
            RunInput::Failure => {
                context.actions.push(Effect::CancelInFlight);
                context.actions.push(Effect::RunSafeStates);
                Transition(State::aborting(true))
            }
            RunInput::Command(RunCommand::Stop) => Transition(State::stopping(false)),
            // Anything else is left unhandled; `RunStateMachine::handle` answers a
            // command that changed nothing with a rejection naming the state.
            _ => Handled,
        }
    }

    /// Lets the operations in flight finish, then applies the safe states.
    #[state]
    fn stopping(
        safe_states_started: &mut bool,
        context: &mut Effects,
        event: &RunInput,
    ) -> Outcome<State> {
        match event {
            RunInput::Quiescent if !*safe_states_started => {
                *safe_states_started = true;
                context.actions.push(Effect::RunSafeStates);
                Handled
            }
            RunInput::SafeStateDone => Transition(State::stopped()),
            RunInput::Command(RunCommand::Abort) => {
                context.actions.push(Effect::CancelInFlight);
                if !*safe_states_started {
                    context.actions.push(Effect::RunSafeStates);
                }
                Transition(State::aborting(false))
            }
            other => reject(context, other, RunState::Stopping, None),
        }
    }

    /// Operations abandoned, safe states being applied. `failure`: the run ends
    /// `failed` (a step's abort policy or a monitor) rather than `aborted`.
    #[state]
    fn aborting(failure: &mut bool, context: &mut Effects, event: &RunInput) -> Outcome<State> {
        match event {
            RunInput::SafeStateDone if *failure => Transition(State::failed()),
            RunInput::SafeStateDone => Transition(State::aborted()),
            other => reject(context, other, RunState::Aborting, None),
        }
    }

    #[state]
    fn stopped(context: &mut Effects, event: &RunInput) -> Outcome<State> {
        reject(context, event, RunState::Stopped, Some("the run has ended"))
    }

    #[state]
    fn aborted(context: &mut Effects, event: &RunInput) -> Outcome<State> {
        reject(context, event, RunState::Aborted, Some("the run has ended"))
    }

    #[state]
    fn completed(context: &mut Effects, event: &RunInput) -> Outcome<State> {
        reject(
            context,
            event,
            RunState::Completed,
            Some("the run has ended"),
        )
    }

    #[state]
    fn failed(context: &mut Effects, event: &RunInput) -> Outcome<State> {
        reject(context, event, RunState::Failed, Some("the run has ended"))
    }
}

impl State {
    pub fn run_state(&self) -> RunState {
        match self {
            State::Idle {} => RunState::Idle,
            State::Running {} => RunState::Running,
            State::Pausing {} => RunState::Pausing,
            State::Paused {} => RunState::Paused,
            State::Holding { .. } => RunState::Holding,
            State::Held { .. } => RunState::Held,
            State::Stopping { .. } => RunState::Stopping,
            State::Stopped {} => RunState::Stopped,
            State::Aborting { .. } => RunState::Aborting,
            State::Aborted {} => RunState::Aborted,
            State::Completed {} => RunState::Completed,
            State::Failed {} => RunState::Failed,
        }
    }
}

/// The run state machine as the executor uses it.
pub struct RunStateMachine {
    machine: statig::blocking::StateMachine<RunLogic>,
}

impl Default for RunStateMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RunStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunStateMachine({})", self.state())
    }
}

impl RunStateMachine {
    pub fn new() -> Self {
        RunStateMachine {
            machine: RunLogic.state_machine(),
        }
    }

    pub fn state(&self) -> RunState {
        self.machine.state().run_state()
    }

    /// Feeds one input; returns the effects to carry out, or why a command was refused.
    pub fn handle(&mut self, input: RunInput) -> Result<Vec<Effect>, Rejected> {
        let before = self.state();
        let mut effects = Effects::default();
        self.machine.handle_with_context(&input, &mut effects);
        if let Some(rejected) = effects.rejected {
            return Err(rejected);
        }
        // A command the `live` superstate fell through on (e.g. `start` while
        // running) leaves the state unchanged without a rejection: name it here.
        if let RunInput::Command(command) = input
            && self.state() == before
            && effects.actions.is_empty()
        {
            return Err(Rejected {
                command,
                state: before,
                detail: None,
            });
        }
        Ok(effects.actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs that bring a new machine into each row of the docs' table.
    fn path_to(row: &str) -> Vec<RunInput> {
        use RunCommand::*;
        use RunInput::*;
        match row {
            "idle" => vec![],
            "running" => vec![Command(Start)],
            "pausing" => vec![Command(Start), Command(Pause)],
            "paused" => vec![Command(Start), Command(Pause), Quiescent],
            "holding" => vec![Command(Start), Command(Hold)],
            "held (operator hold)" => vec![Command(Start), Command(Hold), Quiescent],
            "held (step failed)" => vec![Command(Start), StepFailed, Quiescent],
            "stopping" => vec![Command(Start), Command(Stop)],
            "stopped" => vec![Command(Start), Command(Stop), Quiescent, SafeStateDone],
            "aborting" => vec![Command(Start), Command(Abort)],
            "aborted" => vec![Command(Start), Command(Abort), SafeStateDone],
            "completed" => vec![Command(Start), Finished],
            "failed" => vec![Command(Start), Failure, SafeStateDone],
            other => panic!("no path to {other}"),
        }
    }

    fn machine_at(row: &str) -> RunStateMachine {
        let mut m = RunStateMachine::new();
        for input in path_to(row) {
            m.handle(input).unwrap_or_else(|e| panic!("{row}: {e}"));
        }
        m
    }

    #[test]
    fn transition_table_matches_the_docs() {
        let doc = include_str!("../../docs/run-states.md");
        let mut rows = 0;
        let mut header: Vec<RunCommand> = Vec::new();
        for line in doc.lines().filter(|l| l.starts_with('|')) {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if cells[0] == "state \\ command" {
                header = cells[1..]
                    .iter()
                    .map(|c| RunCommand::from_name(c).unwrap())
                    .collect();
                continue;
            }
            if header.is_empty() || cells[0].starts_with("---") {
                continue;
            }
            if cells.len() != 9 {
                break; // the next table
            }
            rows += 1;
            let row = cells[0];
            let state_before = machine_at(row).state();
            assert_eq!(
                state_before.name(),
                row.split(' ').next().unwrap(),
                "path to {row}"
            );
            for (command, expected) in header.iter().zip(&cells[1..]) {
                let mut m = machine_at(row);
                let result = m.handle(RunInput::Command(*command));
                if *expected == "—" {
                    let rejected =
                        result.expect_err(&format!("{row} × {command} should be rejected"));
                    assert_eq!(rejected.state, state_before);
                    assert_eq!(rejected.command, *command);
                    assert!(rejected.to_string().contains(state_before.name()));
                    assert_eq!(m.state(), state_before, "a rejection changes nothing");
                } else {
                    result.unwrap_or_else(|e| panic!("{row} × {command}: {e}"));
                    assert_eq!(m.state().name(), *expected, "{row} × {command}");
                }
            }
        }
        assert_eq!(rows, 13, "every state is a row (held twice)");
    }

    #[test]
    fn effects_tell_the_executor_what_to_do() {
        let mut m = machine_at("running");
        assert_eq!(
            m.handle(RunInput::Command(RunCommand::Abort)),
            Ok(vec![Effect::CancelInFlight, Effect::RunSafeStates])
        );
        let mut m = machine_at("stopping");
        assert_eq!(
            m.handle(RunInput::Quiescent),
            Ok(vec![Effect::RunSafeStates])
        );
        assert_eq!(
            m.handle(RunInput::Quiescent),
            Ok(vec![]),
            "safe states start once"
        );
        let mut m = machine_at("held (step failed)");
        assert_eq!(
            m.handle(RunInput::Command(RunCommand::Retry)),
            Ok(vec![Effect::RetryFailedStep])
        );
        let mut m = machine_at("held (step failed)");
        assert_eq!(
            m.handle(RunInput::Command(RunCommand::Skip)),
            Ok(vec![Effect::SkipFailedStep])
        );
        // A failure while holding for an operator still requires retry or skip.
        let mut m = machine_at("holding");
        m.handle(RunInput::StepFailed).unwrap();
        m.handle(RunInput::Quiescent).unwrap();
        assert!(m.handle(RunInput::Command(RunCommand::Resume)).is_err());
        assert!(m.handle(RunInput::Command(RunCommand::Retry)).is_ok());
    }

    #[test]
    fn rejections_name_the_state() {
        let mut m = machine_at("running");
        let e = m.handle(RunInput::Command(RunCommand::Resume)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot resume: the run is running (it is not paused or held)"
        );
        let e = m.handle(RunInput::Command(RunCommand::Start)).unwrap_err();
        assert_eq!(e.to_string(), "cannot start: the run is running");
    }
}
