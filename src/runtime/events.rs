//! Events: everything a run does, in order, for the console, the journal and
//! MQTT. The bus numbers each event (`seq`, monotonic per run) and hands it at
//! once to the durable sinks (the journal), which may group their writes. The
//! other sinks (console, MQTT) see an event only after the durable sinks have
//! committed it, at a flush: the runtime flushes before it sends a device an
//! operation and before it waits for anything, so an event is in the journal
//! before it is reported and before its effect can happen.

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
    /// One operation of a step (journal only: what resuming needs to know).
    /// `sent` is committed before the operation goes to the device, `done`
    /// after it answered.
    Operation {
        step_id: String,
        /// Position in the step's planned operations.
        index: u32,
        phase: OperationPhase,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// The decks as the controller knows them (end of a run, after a resume).
    Deck {
        labware: Vec<LabwareRecord>,
    },
    /// A run taken up again after the controller stopped.
    Resumed {
        /// The last journal entry before the stop.
        after_seq: u64,
        steps_completed: usize,
        /// Steps that were running and are taken up where they were.
        continued: Vec<String>,
        /// Operations whose outcome is unknown: the run holds for them.
        uncertain: Vec<String>,
        /// Setpoints, decks and storage given back to the devices.
        restored: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationPhase {
    Sent,
    Done,
}

/// One labware on a liquid handler's deck and what its wells hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabwareRecord {
    pub name: String,
    pub device: String,
    pub slot: u32,
    pub load_name: String,
    pub rows: u32,
    pub columns: u32,
    /// µL per well; wells not listed are empty.
    pub volumes_ul: std::collections::BTreeMap<String, f64>,
    /// Tip racks: the wells whose tip was used.
    pub tips_used: Vec<String>,
}

impl EventKind {
    /// The `type` tag of the event's JSON.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::RunState { .. } => "run_state",
            EventKind::Command { .. } => "command",
            EventKind::Step { .. } => "step",
            EventKind::Operation { .. } => "operation",
            EventKind::DeviceState { .. } => "device_state",
            EventKind::Sample { .. } => "sample",
            EventKind::Alarm { .. } => "alarm",
            EventKind::Prompt { .. } => "prompt",
            EventKind::Log { .. } => "log",
            EventKind::Deck { .. } => "deck",
            EventKind::Resumed { .. } => "resumed",
        }
    }
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

    /// A durable sink keeps events (the journal): it sees each event first
    /// and must have it committed when `flush` returns.
    fn durable(&self) -> bool {
        false
    }

    /// Commits what `publish` buffered.
    fn flush(&mut self) {}
}

/// Most events held back from the reporting sinks between flushes.
const MAX_PENDING: usize = 1024;

/// Numbers events and hands them to the sinks.
#[derive(Default)]
pub struct EventBus {
    seq: u64,
    durable: Vec<Box<dyn EventSink>>,
    reporting: Vec<Box<dyn EventSink>>,
    /// Published, not yet committed by the durable sinks.
    pending: Vec<Event>,
}

impl EventBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// A bus whose next event is `seq + 1` (a resumed run goes on numbering).
    pub fn continuing_after(seq: u64) -> Self {
        let mut bus = Self::default();
        bus.seq = seq;
        bus
    }

    pub fn add_sink(&mut self, sink: Box<dyn EventSink>) {
        if sink.durable() {
            self.durable.push(sink);
        } else {
            self.reporting.push(sink);
        }
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
        for sink in &mut self.durable {
            sink.publish(&event);
        }
        if self.durable.is_empty() {
            for sink in &mut self.reporting {
                sink.publish(&event);
            }
        } else {
            self.pending.push(event);
            if self.pending.len() >= MAX_PENDING {
                self.flush();
            }
        }
        self.seq
    }

    /// Commits the durable sinks, then reports what they committed.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        for sink in &mut self.durable {
            sink.flush();
        }
        for event in self.pending.drain(..) {
            for sink in &mut self.reporting {
                sink.publish(&event);
            }
        }
    }
}

impl Drop for EventBus {
    fn drop(&mut self) {
        self.flush();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what it sees and when it was flushed, in one shared log.
    struct Probe {
        name: &'static str,
        durable: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl EventSink for Probe {
        fn publish(&mut self, event: &Event) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} saw {}", self.name, event.seq));
        }
        fn durable(&self) -> bool {
            self.durable
        }
        fn flush(&mut self) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} flushed", self.name));
        }
    }

    fn log_line(t: &str) -> EventKind {
        EventKind::Log {
            step_id: "s".into(),
            message: t.into(),
        }
    }

    #[test]
    fn reporting_sinks_see_an_event_only_after_the_journal_committed_it() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut bus = EventBus::continuing_after(41);
        bus.add_sink(Box::new(Probe {
            name: "console",
            durable: false,
            log: log.clone(),
        }));
        bus.add_sink(Box::new(Probe {
            name: "journal",
            durable: true,
            log: log.clone(),
        }));
        assert_eq!(bus.publish(0.0, log_line("a")), 42);
        bus.publish(0.0, log_line("b"));
        assert_eq!(
            *log.lock().unwrap(),
            ["journal saw 42", "journal saw 43"],
            "nothing is reported before a flush"
        );
        bus.flush();
        bus.flush(); // nothing pending: no second commit
        assert_eq!(
            *log.lock().unwrap(),
            [
                "journal saw 42",
                "journal saw 43",
                "journal flushed",
                "console saw 42",
                "console saw 43"
            ]
        );
    }

    #[test]
    fn without_a_durable_sink_events_are_reported_at_once_and_a_full_buffer_flushes() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut bus = EventBus::new();
        bus.add_sink(Box::new(Probe {
            name: "console",
            durable: false,
            log: log.clone(),
        }));
        bus.publish(0.0, log_line("a"));
        assert_eq!(*log.lock().unwrap(), ["console saw 1"]);

        let log = Arc::new(Mutex::new(Vec::new()));
        let mut bus = EventBus::new();
        bus.add_sink(Box::new(Probe {
            name: "journal",
            durable: true,
            log: log.clone(),
        }));
        for _ in 0..MAX_PENDING {
            bus.publish(0.0, log_line("x"));
        }
        assert!(log.lock().unwrap().contains(&"journal flushed".to_string()));
    }
}
