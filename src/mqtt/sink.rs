//! A run's events on MQTT: each event is written to the outbox before the
//! runtime goes on (the bus calls sinks synchronously).

use super::publisher::{Publisher, RunInfo};
use crate::device::DeviceState;
use crate::runtime::events::{AlarmState, Event, EventKind, EventSink, StepPhase};

pub struct MqttRunSink {
    publisher: Publisher,
    info: RunInfo,
    /// The step started last (`step` in the run's `$state`).
    step: Option<String>,
    /// Alarms this run raised and did not clear.
    alarms: Vec<(String, String, String)>,
}

impl MqttRunSink {
    pub fn new(publisher: Publisher, info: RunInfo) -> MqttRunSink {
        MqttRunSink {
            publisher,
            info,
            step: None,
            alarms: Vec::new(),
        }
    }
}

impl EventSink for MqttRunSink {
    fn publish(&mut self, event: &Event) {
        let p = &self.publisher;
        let run = self.info.run_id.as_str();
        let ms = event.unix_ms;
        let result = match &event.kind {
            EventKind::RunState { state, reason } => p.run_state(
                &self.info,
                ms,
                state.name(),
                self.step.as_deref(),
                reason.as_deref(),
                state.is_final(),
            ),
            // The prompt events below carry the question and the answer.
            EventKind::Step { action, .. } if action == "prompt" => Ok(()),
            EventKind::Step {
                step_id,
                action,
                phase,
                detail,
                ..
            } => {
                if *phase == StepPhase::Started {
                    self.step = Some(step_id.clone());
                }
                p.run_event(run, ms, step_id, action, *phase, detail.as_deref())
            }
            // A run connects its devices again (serve connected them already):
            // only a loss with a reason is news.
            EventKind::DeviceState {
                state: DeviceState::Disconnected | DeviceState::Connecting,
                reason: None,
                ..
            } => Ok(()),
            EventKind::DeviceState {
                device,
                state,
                reason,
            } => p.device_state(device, *state, reason.as_deref()),
            // Committed before the runtime goes on, like every run event.
            EventKind::Sample { device, values, .. } => p
                .send(vec![p.telemetry_message(device, Some(run), ms, values)])
                .map(|_| ()),
            EventKind::Alarm {
                alarm_id,
                state,
                source,
                message,
            } => {
                self.alarms.retain(|(id, _, _)| id != alarm_id);
                if *state == AlarmState::Active {
                    self.alarms
                        .push((alarm_id.clone(), source.clone(), message.clone()));
                }
                p.alarm(
                    alarm_id,
                    "warning",
                    match state {
                        AlarmState::Active => "active",
                        AlarmState::Cleared => "cleared",
                    },
                    source,
                    message,
                )
            }
            // A prompt is a step waiting for an answer: `started` carries the
            // question, `completed` the answer (answer_prompt needs the step id).
            EventKind::Prompt {
                step_id,
                message,
                response,
            } => match response {
                None => {
                    self.step = Some(step_id.clone());
                    p.run_event(
                        run,
                        ms,
                        step_id,
                        "prompt",
                        StepPhase::Started,
                        Some(message),
                    )
                }
                Some(r) => p.run_event(run, ms, step_id, "prompt", StepPhase::Completed, Some(r)),
            },
            EventKind::Log { step_id, message } => {
                p.run_event(run, ms, step_id, "log", StepPhase::Completed, Some(message))
            }
            // Commands are answered on cmd_result; the journal keeps them all,
            // and operations and decks, which only resuming and reports need.
            EventKind::Command { .. } | EventKind::Operation { .. } | EventKind::Deck { .. } => {
                Ok(())
            }
            EventKind::Resumed { .. } => p.run_event(
                run,
                ms,
                "",
                "resumed",
                StepPhase::Completed,
                Some(&resumed_text(&event.kind)),
            ),
        };
        if let Err(e) = result {
            // The run goes on; the outbox's failure is an error in the log.
            tracing::error!(target: "mqtt", "run {run}: {e}");
        }
    }
}

/// One line saying what a resume found: for MQTT and the console.
pub fn resumed_text(kind: &EventKind) -> String {
    let EventKind::Resumed {
        after_seq,
        steps_completed,
        continued,
        uncertain,
        restored,
    } = kind
    else {
        return String::new();
    };
    let mut text = format!(
        "resumed after journal entry {after_seq}: {steps_completed} steps already completed"
    );
    if !continued.is_empty() {
        text.push_str(&format!("; continuing {}", continued.join(", ")));
    }
    if !restored.is_empty() {
        text.push_str(&format!("; restored {}", restored.join(", ")));
    }
    if !uncertain.is_empty() {
        text.push_str(&format!("; UNCERTAIN: {}", uncertain.join("; ")));
    }
    text
}
