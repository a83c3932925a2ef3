//! The console: a live progress display on a terminal, plain lines otherwise.

use crate::runtime::events::{AlarmState, Event, EventKind, EventSink, StepPhase};
use crate::units::Quantity;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

/// Shows a run as it goes. On a terminal: a progress bar (steps done of total,
/// the steps running, elapsed time, time left from the simulated estimate)
/// with important events printed above it. Elsewhere: one plain line per event.
pub struct ConsoleSink {
    bar: Option<ProgressBar>,
    done: usize,
    running: BTreeSet<String>,
    /// Estimated run duration in lab seconds, and lab seconds per real second.
    estimate_s: Option<f64>,
    speed: f64,
}

impl ConsoleSink {
    pub fn new(interactive: bool, total_steps: usize, estimate_s: Option<f64>, speed: f64) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::new(total_steps as u64);
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        ConsoleSink {
            bar,
            done: 0,
            running: BTreeSet::new(),
            estimate_s,
            speed,
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
            }
        }
    }

    fn refresh(&self, t_s: f64) {
        let Some(bar) = &self.bar else { return };
        bar.set_position(self.done as u64);
        let running: Vec<&str> = self.running.iter().map(String::as_str).collect();
        let eta = self
            .estimate_s
            .map(|e| {
                format!(
                    "  ETA {}",
                    Quantity::seconds(((e - t_s) / self.speed).max(0.0).round())
                )
            })
            .unwrap_or_default();
        bar.set_message(format!("{}{eta}", running.join(", ")));
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn stamp(t_s: f64) -> String {
    format!("[{:>9}]", Quantity::seconds(t_s.round()).to_string())
}

impl EventSink for ConsoleSink {
    fn publish(&mut self, event: &Event) {
        let t = stamp(event.t_s);
        match &event.kind {
            EventKind::RunState { state, reason } => {
                let why = reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                self.line(format!("{t} run {state}{why}"));
            }
            EventKind::Command {
                command,
                source,
                rejected,
            } => {
                if let Some(reason) = rejected {
                    self.line(format!("{t} {command} from {source} refused: {reason}"));
                }
            }
            EventKind::Step {
                step_id,
                action,
                phase,
                detail,
                ..
            } => {
                match phase {
                    StepPhase::Started => {
                        self.running.insert(step_id.clone());
                    }
                    StepPhase::Completed | StepPhase::Skipped => {
                        self.running.remove(step_id);
                        self.done += 1;
                    }
                    StepPhase::Failed | StepPhase::Retrying => {}
                }
                let phase = match phase {
                    StepPhase::Started => "started",
                    StepPhase::Completed => "completed",
                    StepPhase::Failed => "FAILED",
                    StepPhase::Skipped => "skipped",
                    StepPhase::Retrying => "retrying",
                };
                let detail = detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default();
                // On a terminal the bar shows starts and completions; print the rest.
                if self.bar.is_none() || !matches!(phase, "started" | "completed") {
                    self.line(format!("{t} step {step_id} ({action}) {phase}{detail}"));
                }
            }
            EventKind::DeviceState {
                device,
                state,
                reason,
            } => {
                let why = reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                // Busy and ready alternate with every operation; the steps say more.
                if reason.is_some()
                    || !matches!(
                        state,
                        crate::device::DeviceState::Busy | crate::device::DeviceState::Ready
                    )
                {
                    self.line(format!("{t} device {device} {}{why}", state.name()));
                }
            }
            EventKind::Sample { .. } => {}
            EventKind::Alarm {
                alarm_id,
                state,
                message,
                ..
            } => {
                let state = match state {
                    AlarmState::Active => "ALARM",
                    AlarmState::Cleared => "alarm cleared",
                };
                self.line(format!("{t} {state} {alarm_id}: {message}"));
            }
            EventKind::Prompt {
                step_id,
                message,
                response,
            } => match response {
                None => self.line(format!("{t} step {step_id} asks: {message}")),
                Some(r) => self.line(format!("{t} step {step_id} answered: {r}")),
            },
            EventKind::Log { step_id, message } => self.line(format!("{t} {step_id}: {message}")),
            EventKind::Resumed { .. } => self.line(format!(
                "{t} {}",
                crate::mqtt::sink::resumed_text(&event.kind)
            )),
            EventKind::Operation { .. } | EventKind::Deck { .. } => {}
        }
        self.refresh(event.t_s);
    }
}
