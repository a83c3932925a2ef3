//! The payloads of docs/mqtt.md, written to the outbox (which numbers them
//! with `seq`) and handed to the link. Everything a sink or `serve` publishes
//! goes through here, so the outbox's bound and its alarm apply to all of it.

use super::outbox::{Appended, Body, Class, NewMessage, Outbox, OutboxError, OutboxReader};
use super::topics::Topics;
use crate::device::DeviceState;
use crate::runtime::events::StepPhase;
use crate::units::Quantity;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// How many runs keep a retained `run/<run_id>/$state` on the broker.
pub const RETAINED_RUNS: usize = 50;

/// The alarm raised while the outbox is at its bound.
pub const OUTBOX_FULL_ALARM: &str = "outbox-full";

/// RFC 3339, UTC, milliseconds: the `ts` of every payload.
pub fn timestamp(unix_ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

pub use crate::store::now_ms;

/// Device states as MES sees them: `ready`, `busy`, `fault`, `offline`.
pub fn device_state_name(state: DeviceState) -> &'static str {
    match state {
        DeviceState::Ready => "ready",
        DeviceState::Busy => "busy",
        DeviceState::Fault => "fault",
        DeviceState::Disconnected | DeviceState::Connecting => "offline",
    }
}

/// A command's outcome on `cmd_result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdStatus {
    Accepted,
    Rejected,
    Done,
    Failed,
}

impl CmdStatus {
    pub fn name(self) -> &'static str {
        match self {
            CmdStatus::Accepted => "accepted",
            CmdStatus::Rejected => "rejected",
            CmdStatus::Done => "done",
            CmdStatus::Failed => "failed",
        }
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

struct Inner {
    topics: Topics,
    outbox: Mutex<Outbox>,
    wake: Arc<Notify>,
    outbox_alarm: Mutex<bool>,
    /// Alarms not cleared, by id: (severity, source, message, state).
    alarms: Mutex<HashMap<String, AlarmRecord>>,
    /// The device states last published (a state is published when it changes).
    devices: Mutex<HashMap<String, (&'static str, String)>>,
    /// Device telemetry on its way to the outbox writer thread.
    telemetry: std::sync::mpsc::SyncSender<NewMessage>,
    /// Telemetry messages queued and not yet committed.
    queued: AtomicU64,
}

/// The writer commits queued telemetry in batches of at most this many.
const TELEMETRY_BATCH: usize = 1000;
/// Telemetry waiting for the writer; a full queue makes pollers wait.
const TELEMETRY_QUEUE: usize = 10_000;

/// Commits queued telemetry in batches: one commit for everything that
/// arrived meanwhile, so many devices cost one commit, not one each.
fn telemetry_writer(inner: Weak<Inner>, queue: std::sync::mpsc::Receiver<NewMessage>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < TELEMETRY_BATCH {
            match queue.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let count = batch.len() as u64;
        let publisher = Publisher { inner };
        if let Err(e) = publisher.send(batch) {
            tracing::error!(target: "mqtt", "telemetry not stored: {e}");
        }
        publisher.inner.queued.fetch_sub(count, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
struct AlarmRecord {
    severity: String,
    source: String,
    message: String,
}

/// Cheap to clone; every clone writes to the same outbox.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl Publisher {
    /// Opens the outbox at `path`; returns the publisher, the reader for the
    /// link, and the notifier the link waits on.
    pub fn open(
        path: &Path,
        limit: u64,
        topics: Topics,
    ) -> Result<(Publisher, OutboxReader, Arc<Notify>), OutboxError> {
        let outbox = Outbox::open(path, limit)?;
        let reader = OutboxReader::open(&outbox)?;
        // Alarms still active when the controller stopped stay active.
        let prefix = topics.alarm("");
        let alarms = outbox
            .retained()?
            .into_iter()
            .filter_map(|(topic, payload)| {
                let id = topic.strip_prefix(&prefix)?.to_string();
                let v: Value = serde_json::from_slice(&payload).ok()?;
                let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                Some((
                    id,
                    AlarmRecord {
                        severity: field("severity"),
                        source: field("source"),
                        message: field("message"),
                    },
                ))
            })
            .collect();
        let wake = Arc::new(Notify::new());
        let (telemetry, queue) = std::sync::mpsc::sync_channel(TELEMETRY_QUEUE);
        let publisher = Publisher {
            inner: Arc::new(Inner {
                topics,
                outbox: Mutex::new(outbox),
                wake: wake.clone(),
                outbox_alarm: Mutex::new(false),
                alarms: Mutex::new(alarms),
                devices: Mutex::new(HashMap::new()),
                telemetry,
                queued: AtomicU64::new(0),
            }),
        };
        let weak = Arc::downgrade(&publisher.inner);
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || telemetry_writer(weak, queue))
            .map_err(|e| OutboxError::Folder {
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok((publisher, reader, wake))
    }

    pub fn topics(&self) -> &Topics {
        &self.inner.topics
    }

    fn with_outbox<T>(
        &self,
        f: impl FnOnce(&mut Outbox) -> Result<T, OutboxError>,
    ) -> Result<T, OutboxError> {
        let mut outbox = self
            .inner
            .outbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut outbox)
    }

    /// Messages waiting for the broker's acknowledgement (queued telemetry included).
    pub fn unsent(&self) -> u64 {
        self.with_outbox(|o| Ok(o.counts().unsent())).unwrap_or(0)
            + self.inner.queued.load(Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until queued telemetry is in the outbox.
    pub fn wait_telemetry_stored(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.inner.queued.load(Ordering::Relaxed) > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Writes messages to the outbox (committed when this returns) and wakes the link.
    pub fn send(&self, messages: Vec<NewMessage>) -> Result<Appended, OutboxError> {
        let (appended, unsent, limit) = self.with_outbox(|o| {
            let a = o.append(messages)?;
            Ok((a, o.counts().unsent(), o.limit()))
        })?;
        self.inner.wake.notify_one();
        self.watch_bound(appended.dropped, unsent, limit);
        Ok(appended)
    }

    /// Raises the outbox alarm when telemetry is dropped at the bound, and
    /// clears it when the backlog is back under half the bound.
    fn watch_bound(&self, dropped: u64, unsent: u64, limit: u64) {
        let change = {
            let mut active = self
                .inner
                .outbox_alarm
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if dropped > 0 && !*active {
                *active = true;
                Some(true)
            } else if *active && unsent < limit / 2 {
                *active = false;
                Some(false)
            } else {
                None
            }
        };
        let result = match change {
            Some(true) => self.alarm(
                OUTBOX_FULL_ALARM,
                "warning",
                "active",
                "controller",
                &format!(
                    "the MQTT outbox is full ({limit} messages): the oldest telemetry is being dropped until the broker is reachable"
                ),
            ),
            Some(false) => self.alarm(
                OUTBOX_FULL_ALARM,
                "warning",
                "cleared",
                "controller",
                "the MQTT outbox is below half its bound again",
            ),
            None => Ok(()),
        };
        if let Err(e) = result {
            tracing::error!(target: "mqtt", "{e}");
        }
    }

    fn json(topic: String, retain: bool, class: Class, body: Value) -> NewMessage {
        NewMessage {
            topic,
            retain,
            class,
            body: Body::Json(object(body)),
        }
    }

    fn raw(topic: String, payload: &[u8]) -> NewMessage {
        NewMessage {
            topic,
            retain: true,
            class: Class::State,
            body: Body::Raw(payload.to_vec()),
        }
    }

    /// The controller's `$state`: init, ready, busy (disconnected and lost come
    /// from the link and the broker).
    pub fn controller_state(&self, state: &str) -> Result<(), OutboxError> {
        self.send(vec![Self::raw(self.topics().state(), state.as_bytes())])
            .map(|_| ())
    }

    /// `$description`: retained, re-published on every connect.
    pub fn description(&self, description: &Value) -> Result<(), OutboxError> {
        let payload = serde_json::to_vec(description).unwrap_or_default();
        let topic = self.topics().description();
        self.with_outbox(|o| o.set_retained(&topic, &payload))?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// A device's `$state`, and its `$fault` reason (cleared when it is ready).
    pub fn device_state(
        &self,
        device: &str,
        state: DeviceState,
        reason: Option<&str>,
    ) -> Result<(), OutboxError> {
        let t = self.topics();
        let name = device_state_name(state);
        let fault = match (state, reason) {
            (DeviceState::Ready | DeviceState::Busy, _) => String::new(),
            (_, Some(r)) => r.to_string(),
            (_, None) => name.to_string(),
        };
        let previous = {
            let mut devices = self.inner.devices.lock().unwrap_or_else(|p| p.into_inner());
            devices.insert(device.to_string(), (name, fault.clone()))
        };
        let mut messages = Vec::new();
        match &previous {
            Some((n, f)) if *n == name && *f == fault => return Ok(()),
            // `$fault` is written when there is a reason, and emptied once after it.
            Some((_, f)) if *f == fault => {}
            _ => messages.push(Self::raw(t.device_fault(device), fault.as_bytes())),
        }
        if previous.as_ref().is_none_or(|(n, _)| *n != name) {
            messages.push(Self::raw(t.device_state(device), name.as_bytes()));
        }
        self.send(messages).map(|_| ())
    }

    /// One sample cycle of a device, queued for the outbox's writer thread,
    /// which commits everything queued in one transaction; it is in the outbox
    /// before it is sent. Run events (and a run's samples) use `send`, which
    /// returns after the commit.
    pub fn telemetry(
        &self,
        device: &str,
        run_id: Option<&str>,
        unix_ms: u64,
        values: &[(String, Quantity)],
    ) -> Result<(), OutboxError> {
        let message = self.telemetry_message(device, run_id, unix_ms, values);
        self.inner.queued.fetch_add(1, Ordering::Relaxed);
        match self.inner.telemetry.send(message) {
            Ok(()) => Ok(()),
            // The writer is gone (never while the publisher lives): store it here.
            Err(std::sync::mpsc::SendError(message)) => {
                self.inner.queued.fetch_sub(1, Ordering::Relaxed);
                self.send(vec![message]).map(|_| ())
            }
        }
    }

    pub fn telemetry_message(
        &self,
        device: &str,
        run_id: Option<&str>,
        unix_ms: u64,
        values: &[(String, Quantity)],
    ) -> NewMessage {
        let mut map = Map::new();
        for (name, q) in values {
            map.insert(
                name.clone(),
                json!({ "v": q.value, "unit": q.dimension.canonical_unit() }),
            );
        }
        let mut body = json!({ "ts": timestamp(unix_ms), "values": map });
        if let Some(run) = run_id {
            body["run_id"] = run.into();
        }
        Self::json(
            self.topics().telemetry(device),
            false,
            Class::Telemetry,
            body,
        )
    }

    /// `run/<run_id>/$state`, with `run/current` and the controller's `$state`
    /// when the run starts or ends.
    pub fn run_state(
        &self,
        info: &RunInfo,
        unix_ms: u64,
        state: &str,
        step: Option<&str>,
        reason: Option<&str>,
        is_final: bool,
    ) -> Result<(), OutboxError> {
        let t = self.topics();
        let mut body = json!({
            "ts": timestamp(unix_ms),
            "state": state,
            "protocol": { "name": info.protocol, "version": info.version, "sha256": info.sha256 },
            "params": info.params,
            "started_at": info.started_at,
        });
        if let Some(op) = &info.operator {
            body["operator"] = op.as_str().into();
        }
        if let Some(s) = step {
            body["step"] = s.into();
        }
        if let Some(r) = reason {
            body["reason"] = r.into();
        }
        let mut messages = vec![Self::json(
            t.run_state(&info.run_id),
            true,
            Class::Event,
            body,
        )];
        if is_final {
            messages.push(Self::raw(t.run_current(), b""));
            messages.push(Self::raw(t.state(), b"ready"));
            // The broker keeps the final state of the last runs only.
            let old = self.with_outbox(|o| o.old_run_states(RETAINED_RUNS))?;
            messages.extend(old.into_iter().map(|topic| Self::raw(topic, b"")));
        } else {
            let current = serde_json::to_vec(&json!({ "run_id": info.run_id })).unwrap_or_default();
            messages.push(Self::raw(t.run_current(), &current));
            messages.push(Self::raw(t.state(), b"busy"));
        }
        self.send(messages).map(|_| ())
    }

    /// A step's (or a prompt's) progress on `run/<run_id>/event`.
    /// Longest `detail` of a run event on MQTT.
    pub const MAX_DETAIL_CHARS: usize = 4096;

    pub fn run_event(
        &self,
        run_id: &str,
        unix_ms: u64,
        step_id: &str,
        action: &str,
        phase: StepPhase,
        detail: Option<&str>,
    ) -> Result<(), OutboxError> {
        // Log and prompt texts are the protocol's: bounded on MQTT (the
        // journal keeps them whole).
        let detail = detail.map(|d| match d.char_indices().nth(Self::MAX_DETAIL_CHARS) {
            Some((at, _)) => format!("{}…", &d[..at]),
            None => d.to_string(),
        });
        let body = json!({
            "ts": timestamp(unix_ms),
            "step_id": step_id,
            "action": action,
            "phase": phase,
            "detail": detail,
        });
        self.send(vec![Self::json(
            self.topics().run_event(run_id),
            false,
            Class::Event,
            body,
        )])
        .map(|_| ())
    }

    /// `alarm/<alarm_id>`: retained while active or acknowledged; a clear is
    /// published, then the retained message is removed (empty payload).
    pub fn alarm(
        &self,
        alarm_id: &str,
        severity: &str,
        state: &str,
        source: &str,
        message: &str,
    ) -> Result<(), OutboxError> {
        let topic = self.topics().alarm(alarm_id);
        let body = json!({
            "ts": timestamp(now_ms()),
            "severity": severity,
            "state": state,
            "source": source,
            "message": message,
        });
        let cleared = state == "cleared";
        {
            let mut alarms = self.inner.alarms.lock().unwrap_or_else(|p| p.into_inner());
            if cleared {
                alarms.remove(alarm_id);
            } else {
                alarms.insert(
                    alarm_id.to_string(),
                    AlarmRecord {
                        severity: severity.to_string(),
                        source: source.to_string(),
                        message: message.to_string(),
                    },
                );
            }
        }
        let mut messages = vec![Self::json(topic.clone(), !cleared, Class::Event, body)];
        if cleared {
            messages.push(Self::raw(topic, b""));
        }
        // Not `send`: the outbox's own alarm must not recurse into the bound check.
        self.with_outbox(|o| o.append(messages))?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Marks an alarm acknowledged (it stays retained until cleared); false
    /// when no alarm with this id is active.
    pub fn acknowledge_alarm(&self, alarm_id: &str) -> Result<bool, OutboxError> {
        let record = self
            .inner
            .alarms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(alarm_id)
            .cloned();
        match record {
            Some(r) => self
                .alarm(alarm_id, &r.severity, "acknowledged", &r.source, &r.message)
                .map(|_| true),
            None => Ok(false),
        }
    }

    /// The answer to a command on `cmd_result/<cmd_id>`.
    pub fn cmd_result(
        &self,
        cmd_id: &str,
        status: CmdStatus,
        reason: Option<&str>,
        run_id: Option<&str>,
    ) -> Result<(), OutboxError> {
        let mut body = json!({
            "ts": timestamp(now_ms()),
            "cmd_id": cmd_id,
            "status": status.name(),
        });
        if let Some(r) = reason {
            body["reason"] = r.into();
        }
        if let Some(r) = run_id {
            body["run_id"] = r.into();
        }
        self.send(vec![Self::json(
            self.topics().cmd_result(cmd_id),
            false,
            Class::Event,
            body,
        )])
        .map(|_| ())
    }

    /// Remembers a command id; false when it was seen before.
    pub fn record_command(&self, cmd_id: &str, verb: &str) -> Result<bool, OutboxError> {
        self.with_outbox(|o| o.record_command(cmd_id, verb))
    }

    /// Forgets retained topics the current lab no longer has (old devices).
    pub fn forget_retained(&self, keep: impl Fn(&str) -> bool) -> Result<(), OutboxError> {
        self.with_outbox(|o| o.forget_retained(keep))
    }
}

/// What `run/<run_id>/$state` says about a run besides its state.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub run_id: String,
    pub protocol: String,
    pub version: Option<String>,
    /// Of the protocol file's text.
    pub sha256: String,
    pub params: Value,
    pub operator: Option<String>,
    pub started_at: String,
}

impl RunInfo {
    pub fn new(
        run_id: &str,
        protocol: &str,
        version: Option<&str>,
        text: &str,
        params: Value,
        operator: Option<&str>,
    ) -> RunInfo {
        use sha2::Digest;
        RunInfo {
            run_id: run_id.to_string(),
            protocol: protocol.to_string(),
            version: version.map(str::to_string),
            sha256: hex::encode(sha2::Sha256::digest(text.as_bytes())),
            params,
            operator: operator.map(str::to_string),
            started_at: timestamp(now_ms()),
        }
    }
}

/// A run id: UTC start time plus bits of the clock's nanoseconds and the
/// process id, usable as a topic level (`20261129T120000Z-3f2a`).
pub fn new_run_id() -> String {
    let now = SystemTime::now();
    let stamp: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let nanos = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let bits = (nanos ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{stamp}-{bits:04x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn a_full_outbox_drops_old_telemetry_and_raises_an_alarm_until_it_drains() {
        let dir = tempfile::tempdir().unwrap();
        let topics = Topics::new("bf/v1", "s", "c", "x");
        let (p, mut reader, _) = Publisher::open(&dir.path().join("o.sqlite"), 10, topics).unwrap();
        let q = [(
            "ph".to_string(),
            Quantity::new(37.0, crate::units::Dimension::Temperature),
        )];
        for _ in 0..15 {
            p.telemetry("br1", None, 0, &q).unwrap();
            assert!(p.wait_telemetry_stored(Duration::from_secs(5)));
        }
        let rows = reader.next(0, 100).unwrap();
        let alarm: Vec<_> = rows
            .iter()
            .filter(|m| m.topic.ends_with("/alarm/outbox-full"))
            .collect();
        assert_eq!(alarm.len(), 1, "one alarm while full");
        let v: Value = serde_json::from_slice(&alarm[0].payload).unwrap();
        assert_eq!(v["state"], "active");
        assert!(rows.len() <= 12, "bounded: {} rows", rows.len());
        // The broker takes everything; the next message clears the alarm.
        let ids: Vec<i64> = rows.iter().map(|m| m.id).collect();
        reader.acknowledge(&ids).unwrap();
        p.telemetry("br1", None, 0, &q).unwrap();
        assert!(p.wait_telemetry_stored(Duration::from_secs(5)));
        let rows = reader.next(0, 100).unwrap();
        let cleared = rows
            .iter()
            .filter(|m| m.topic.ends_with("/alarm/outbox-full"))
            .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok())
            .any(|v| v["state"] == "cleared");
        assert!(cleared, "{rows:?}");
    }

    #[test]
    fn device_states_are_published_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let topics = Topics::new("bf/v1", "s", "c", "x");
        let (p, reader, _) = Publisher::open(&dir.path().join("o.sqlite"), 100, topics).unwrap();
        p.device_state("d", DeviceState::Ready, None).unwrap();
        p.device_state("d", DeviceState::Ready, None).unwrap();
        p.device_state("d", DeviceState::Fault, Some("no reply"))
            .unwrap();
        p.device_state("d", DeviceState::Ready, None).unwrap();
        let sent: Vec<(String, String)> = reader
            .next(0, 100)
            .unwrap()
            .into_iter()
            .map(|m| {
                let t = m.topic.rsplit('/').next().unwrap_or("").to_string();
                (t, String::from_utf8_lossy(&m.payload).to_string())
            })
            .collect();
        let expected: Vec<(String, String)> = [
            ("$fault", ""),
            ("$state", "ready"),
            ("$fault", "no reply"),
            ("$state", "fault"),
            ("$fault", ""),
            ("$state", "ready"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(sent, expected);
    }

    #[test]
    fn only_the_last_runs_keep_a_retained_state() {
        let dir = tempfile::tempdir().unwrap();
        let topics = Topics::new("bf/v1", "s", "c", "x");
        let (p, mut reader, _) =
            Publisher::open(&dir.path().join("o.sqlite"), 10_000, topics).unwrap();
        for i in 0..RETAINED_RUNS + 3 {
            let info = RunInfo::new(&format!("r{i}"), "p", None, "", Value::Null, None);
            p.run_state(&info, 0, "running", None, None, false).unwrap();
            p.run_state(&info, 0, "completed", None, None, true)
                .unwrap();
        }
        let rows = reader.next(0, 100_000).unwrap();
        let ids: Vec<i64> = rows.iter().map(|m| m.id).collect();
        reader.acknowledge(&ids).unwrap();
        reader.forget_cleared().unwrap();
        let kept = reader
            .retained_to_republish()
            .unwrap()
            .into_iter()
            .filter(|(t, _)| t.ends_with("/$state") && t.contains("/run/"))
            .count();
        assert_eq!(kept, RETAINED_RUNS);
        // The oldest runs were cleared on the broker with an empty payload.
        assert!(
            rows.iter()
                .any(|m| m.topic == "bf/v1/s/c/x/run/r0/$state" && m.payload.is_empty())
        );
    }

    #[test]
    fn run_ids_are_topic_levels() {
        let id = new_run_id();
        assert!(super::super::topics::is_topic_level(&id), "{id}");
        assert_eq!(id.len(), "20261129T120000Z-abcd".len());
    }
}
