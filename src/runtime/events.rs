//! Events: everything a run does, in order, for the console, the journal and
//! MQTT. The bus numbers each event (`seq`, monotonic per run) and hands it to
//! every sink synchronously, so a sink that persists (journal, MQTT outbox)
//! has written it before the runtime goes on.

use super::machine::{RunCommand, RunState};
use crate::device::DeviceState;
use crate::units::Quantity;
use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepPhase {
    Started,
    Completed,
    Failed,
    Skipped,
    Retrying,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmState {
    Active,
    Cleared,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    RunState {
        state: RunState,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A command from the operator or MES, accepted or not.
    Command {
        command: RunCommand,
        source: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        rejected: Option<String>,
    },
    Step {
        step_id: String,
        action: String,
        phase: StepPhase,
        #[serde(skip_serializing_if = "Option::is_none")]
        repetition: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    DeviceState {
        device: String,
        state: DeviceState,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Sample {
        device: String,
        /// The monitor or step that took it.
        source: String,
        values: Vec<(String, Quantity)>,
    },
    Alarm {
        alarm_id: String,
        state: AlarmState,
        source: String,
        message: String,
    },
    Prompt {
        step_id: String,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        response: Option<String>,
    },
    Log {
        step_id: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub seq: u64,
    /// Lab time since the run started, in seconds.
    pub t_s: f64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Receives every event, in order.
pub trait EventSink: Send {
    fn publish(&mut self, event: &Event);
}

/// Numbers events and hands them to the sinks.
#[derive(Default)]
pub struct EventBus {
    seq: u64,
    sinks: Vec<Box<dyn EventSink>>,
}

impl EventBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_sink(&mut self, sink: Box<dyn EventSink>) {
        self.sinks.push(sink);
    }

    pub fn publish(&mut self, t_s: f64, kind: EventKind) -> u64 {
        self.seq += 1;
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let event = Event {
            seq: self.seq,
            t_s,
            unix_ms,
            kind,
        };
        for sink in &mut self.sinks {
            sink.publish(&event);
        }
        self.seq
    }
}

/// Keeps every event in memory (tests, `simulate`'s report).
#[derive(Clone, Default)]
pub struct MemorySink {
    pub events: std::sync::Arc<std::sync::Mutex<Vec<Event>>>,
}

impl MemorySink {
    pub fn snapshot(&self) -> Vec<Event> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl EventSink for MemorySink {
    fn publish(&mut self, event: &Event) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event.clone());
        }
    }
}

/// Forwards events to a channel (the CLI's display task).
pub struct ChannelSink(pub tokio::sync::mpsc::UnboundedSender<Event>);

impl EventSink for ChannelSink {
    fn publish(&mut self, event: &Event) {
        // A closed display is not a reason to stop a run.
        let _ = self.0.send(event.clone());
    }
}
