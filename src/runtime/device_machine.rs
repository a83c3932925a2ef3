//! The device state machine (statig): disconnected, connecting, ready, busy,
//! fault. The executor feeds it what happened; a faulted device is reconnected
//! in the background and becomes ready again by itself.

use crate::device::DeviceState;
use statig::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceInput {
    Connect,
    Connected,
    ConnectFailed,
    OperationStarted,
    OperationFinished,
    /// The device timed out, reported an error, or the link dropped.
    Faulted,
}

#[derive(Debug, Default)]
pub struct DeviceLogic;

#[state_machine(
    initial = "State::disconnected()",
    state(derive(Debug, Clone, PartialEq, Eq))
)]
impl DeviceLogic {
    #[state]
    fn disconnected(event: &DeviceInput) -> Outcome<State> {
        match event {
            DeviceInput::Connect => Transition(State::connecting()),
            _ => Handled,
        }
    }

    #[state]
    fn connecting(event: &DeviceInput) -> Outcome<State> {
        match event {
            DeviceInput::Connected => Transition(State::ready()),
            DeviceInput::ConnectFailed | DeviceInput::Faulted => Transition(State::fault()),
            _ => Handled,
        }
    }

    #[state]
    fn ready(event: &DeviceInput) -> Outcome<State> {
        match event {
            DeviceInput::OperationStarted => Transition(State::busy()),
            DeviceInput::Faulted => Transition(State::fault()),
            _ => Handled,
        }
    }

    #[state]
    fn busy(event: &DeviceInput) -> Outcome<State> {
        match event {
            DeviceInput::OperationFinished => Transition(State::ready()),
            DeviceInput::Faulted => Transition(State::fault()),
            _ => Handled,
        }
    }

    /// Reconnect attempts run in the background; a successful one makes the
    /// device ready again.
    #[state]
    fn fault(event: &DeviceInput) -> Outcome<State> {
        match event {
            DeviceInput::Connect => Transition(State::connecting()),
            DeviceInput::Connected => Transition(State::ready()),
            _ => Handled,
        }
    }
}

pub struct DeviceStateMachine {
    machine: statig::blocking::StateMachine<DeviceLogic>,
}

impl Default for DeviceStateMachine {
    fn default() -> Self {
        DeviceStateMachine {
            machine: DeviceLogic.state_machine(),
        }
    }
}

impl DeviceStateMachine {
    pub fn state(&self) -> DeviceState {
        match self.machine.state() {
            State::Disconnected {} => DeviceState::Disconnected,
            State::Connecting {} => DeviceState::Connecting,
            State::Ready {} => DeviceState::Ready,
            State::Busy {} => DeviceState::Busy,
            State::Fault {} => DeviceState::Fault,
        }
    }

    /// Feeds an input; returns the new state if it changed.
    pub fn handle(&mut self, input: DeviceInput) -> Option<DeviceState> {
        let before = self.state();
        self.machine.handle(&input);
        let after = self.state();
        (after != before).then_some(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_work_fault_and_come_back() {
        let mut m = DeviceStateMachine::default();
        assert_eq!(m.state(), DeviceState::Disconnected);
        assert_eq!(
            m.handle(DeviceInput::OperationStarted),
            None,
            "not before connecting"
        );
        assert_eq!(
            m.handle(DeviceInput::Connect),
            Some(DeviceState::Connecting)
        );
        assert_eq!(m.handle(DeviceInput::Connected), Some(DeviceState::Ready));
        assert_eq!(
            m.handle(DeviceInput::OperationStarted),
            Some(DeviceState::Busy)
        );
        assert_eq!(
            m.handle(DeviceInput::OperationFinished),
            Some(DeviceState::Ready)
        );
        assert_eq!(
            m.handle(DeviceInput::OperationStarted),
            Some(DeviceState::Busy)
        );
        assert_eq!(m.handle(DeviceInput::Faulted), Some(DeviceState::Fault));
        assert_eq!(m.handle(DeviceInput::OperationFinished), None);
        assert_eq!(
            m.handle(DeviceInput::Connect),
            Some(DeviceState::Connecting)
        );
        assert_eq!(
            m.handle(DeviceInput::ConnectFailed),
            Some(DeviceState::Fault)
        );
        assert_eq!(m.handle(DeviceInput::Connected), Some(DeviceState::Ready));
    }
}
