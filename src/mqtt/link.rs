//! The link to the broker: sends the outbox in order and deletes what the
//! broker acknowledged; re-declares subscriptions and re-publishes retained
//! state on every connect; hands commands from MES to the controller.
//!
//! rumqttc's event loop runs in its own task and is never cancelled (dropping
//! `poll()` mid-write could lose bytes). The link task owns every request, so it
//! knows which PUBACK belongs to which outbox row: rumqttc reports an outgoing
//! publish's packet id in request order. After a disconnect the link stops, the
//! event loop discards whatever was still queued (a clean session never resends),
//! and on the next CONNACK the link starts again from the oldest unacknowledged
//! row. At-least-once delivery comes from the outbox, not from broker sessions.

use super::outbox::{OutboxReader, Stored, mark_replayed};
use super::topics::Topics;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How many messages may wait for a PUBACK at once.
const WINDOW: usize = 256;
/// Rows read from the outbox per query.
const BATCH: usize = 256;
/// Packets larger than this are refused both ways (a `$description` of a big
/// lab, a protocol's text in `start_run`).
pub const MAX_PACKET: usize = 4 << 20;

/// Room left in a packet for its fixed header, the topic's length and packet
/// id, and the `"replayed":true` a re-sent message gains.
const PACKET_OVERHEAD: usize = 64;

/// Whether the broker can be sent this message at all. rumqttc refuses a topic
/// with a wildcard (`+`, `#`) at once, and a packet over [`MAX_PACKET`], an empty
/// or over-long topic or one with U+0000 ends the connection; sent again after
/// every reconnect, such a message would stop the link for good. Topic levels
/// come from ids a protocol or lab file chose (a monitor's id in an alarm topic).
fn publishable(topic: &str, payload_len: usize) -> bool {
    !topic.is_empty()
        && topic.len() <= usize::from(u16::MAX)
        && !topic.contains('\0')
        && rumqttc::valid_topic(topic)
        && topic.len() + payload_len + PACKET_OVERHEAD <= MAX_PACKET
}

/// Where and how to connect. `Debug` never shows the password.
#[derive(Clone)]
pub struct BrokerSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub keep_alive: Duration,
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls.is_some())
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

/// A rustls client configuration trusting the CA certificates in a PEM file,
/// or the system's roots when no file is given.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("CA file {} holds no certificate", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no CA file given and no system certificates found".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A command as it arrived: topic, payload, and whether the broker retained it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// What the link reports about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    Connecting,
    Connected,
    /// The last error (never includes credentials).
    Down(String),
}

enum Control {
    Republish,
    Shutdown {
        final_state: Vec<u8>,
        flush: Duration,
        done: oneshot::Sender<ShutdownReport>,
    },
}

/// What a clean shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The outbox was empty when the link closed.
    pub flushed: bool,
    /// `disconnected` reached the broker (so the last will was not fired).
    pub announced: bool,
}

/// The running link.
pub struct Link {
    control: mpsc::UnboundedSender<Control>,
    state: watch::Receiver<Connection>,
    task: JoinHandle<()>,
}

enum PollEvent {
    Up,
    Down(String, oneshot::Sender<()>),
    Sent(u16),
    SentOther,
    Acked(u16),
    Command(Incoming),
}

#[derive(Debug, Clone, Copy)]
enum Tag {
    Outbox(i64),
    /// `$state` at shutdown: its PUBACK ends the link.
    Final,
    Other,
}

impl Link {
    /// Starts the link. `wake` is notified by the outbox's writer after each append;
    /// commands go to `commands` (dropped with a warning when it is full).
    pub fn start(
        settings: &BrokerSettings,
        topics: Topics,
        reader: OutboxReader,
        wake: Arc<Notify>,
        commands: mpsc::Sender<Incoming>,
    ) -> Link {
        let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
        options
            .set_keep_alive(settings.keep_alive.max(Duration::from_secs(1)))
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_inflight(WINDOW as u16)
            .set_last_will(LastWill::new(
                topics.state(),
                b"lost".to_vec(),
                QoS::AtLeastOnce,
                true,
            ));
        if let Some((user, password)) = &settings.credentials {
            options.set_credentials(user, password);
        }
        if let Some(tls) = &settings.tls {
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, eventloop) = AsyncClient::new(options, WINDOW + 16);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let poller = tokio::spawn(poll_loop(eventloop, events_tx));
        let (control, control_rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(Connection::Connecting);
        let link = LinkTask {
            client,
            topics,
            reader,
            wake,
            commands,
            state: state_tx,
            connected: false,
            tags: VecDeque::new(),
            inflight: HashMap::new(),
            cursor: 0,
            live_from: 0,
            buffer: VecDeque::new(),
            retained: VecDeque::new(),
            republished: false,
            acked: Vec::new(),
        };
        let task = tokio::spawn(async move {
            link.run(events_rx, control_rx).await;
            poller.abort();
        });
        Link {
            control,
            state,
            task,
        }
    }

    /// Re-sends every retained topic (the `republish` command).
    pub fn republish(&self) {
        let _ = self.control.send(Control::Republish);
    }

    pub fn connection(&self) -> watch::Receiver<Connection> {
        self.state.clone()
    }

    /// Waits (at most `flush`) for the outbox to empty, publishes `final_state`
    /// on `$state` and disconnects, so the broker does not fire the last will.
    pub async fn shutdown(self, final_state: &[u8], flush: Duration) -> ShutdownReport {
        let (done, report) = oneshot::channel();
        let sent = self.control.send(Control::Shutdown {
            final_state: final_state.to_vec(),
            flush,
            done,
        });
        let report = match sent {
            Ok(()) => tokio::time::timeout(flush + Duration::from_secs(5), report)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        self.task.abort();
        report.unwrap_or(ShutdownReport {
            flushed: false,
            announced: false,
        })
    }
}

/// Polls rumqttc for ever; reconnects with a growing delay (rumqttc has none).
async fn poll_loop(mut eventloop: rumqttc::EventLoop, events: mpsc::UnboundedSender<PollEvent>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                PollEvent::Up
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => PollEvent::Acked(ack.pkid),
            Ok(Event::Incoming(Packet::Publish(p))) => PollEvent::Command(Incoming {
                topic: p.topic,
                payload: p.payload.to_vec(),
                retain: p.retain,
            }),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => PollEvent::Sent(pkid),
            Ok(Event::Outgoing(Outgoing::Subscribe(_))) => PollEvent::SentOther,
            Ok(_) => continue,
            Err(e) => {
                let (stopped, wait) = oneshot::channel();
                if events.send(PollEvent::Down(describe(&e), stopped)).is_err() {
                    return;
                }
                // The link has stopped sending: drop anything it queued before
                // it heard of the outage, so the packet ids it tracks stay true.
                let _ = wait.await;
                eventloop.clean();
                eventloop.pending.clear();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

/// An error for logs and the connection state; rumqttc's errors never carry
/// the password, and the connect options are not printed.
fn describe(e: &rumqttc::ConnectionError) -> String {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection ({code:?})")
        }
        other => other.to_string(),
    }
}

struct LinkTask {
    client: AsyncClient,
    topics: Topics,
    reader: OutboxReader,
    wake: Arc<Notify>,
    commands: mpsc::Sender<Incoming>,
    state: watch::Sender<Connection>,
    connected: bool,
    /// Requests handed to rumqttc, waiting for their packet id.
    tags: VecDeque<Tag>,
    /// Packet id → what it carries, waiting for the PUBACK.
    inflight: HashMap<u16, Tag>,
    /// The last outbox row handed to rumqttc in this connection.
    cursor: i64,
    /// Rows up to this id were written before this connection: replayed.
    live_from: i64,
    buffer: VecDeque<Stored>,
    retained: VecDeque<(String, Vec<u8>)>,
    republished: bool,
    acked: Vec<i64>,
}

impl LinkTask {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<PollEvent>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut shutdown: Option<(
            Vec<u8>,
            tokio::time::Instant,
            oneshot::Sender<ShutdownReport>,
        )> = None;
        loop {
            if self.connected {
                self.fill();
            }
            self.flush_acks();
            if let Some((final_state, deadline, done)) = shutdown.take() {
                let drained = self.outstanding() == 0
                    && self.reader.next(0, 1).map(|r| r.is_empty()).unwrap_or(true);
                if drained || tokio::time::Instant::now() >= deadline || !self.connected {
                    let report = self.close(&mut events, &final_state, drained).await;
                    let _ = done.send(report);
                    return;
                }
                shutdown = Some((final_state, deadline, done));
            }
            let deadline = shutdown
                .as_ref()
                .map(|(_, d, _)| *d)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { return };
                    self.handle(event);
                    // Take what is already queued before writing deletions.
                    for _ in 0..1024 {
                        match events.try_recv() {
                            Ok(event) => self.handle(event),
                            Err(_) => break,
                        }
                    }
                }
                _ = self.wake.notified() => {}
                c = control.recv() => match c {
                    Some(Control::Republish) => {
                        if self.connected {
                            self.queue_retained();
                        }
                    }
                    Some(Control::Shutdown { final_state, flush, done }) => {
                        shutdown = Some((final_state, tokio::time::Instant::now() + flush, done));
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    fn outstanding(&self) -> usize {
        self.tags.len() + self.inflight.len()
    }

    fn handle(&mut self, event: PollEvent) {
        match event {
            PollEvent::Up => {
                tracing::info!(target: "mqtt", "connected to the broker");
                self.connected = true;
                let _ = self.state.send(Connection::Connected);
                self.tags.clear();
                self.inflight.clear();
                self.buffer.clear();
                self.cursor = 0;
                self.live_from = self.reader.high_water().unwrap_or(0);
                // Subscriptions first (a clean session has none), then retained state.
                // Commands, and our own `$state`: a stale last will (`lost`)
                // delivered after we are back is corrected at once.
                for filter in [self.topics.commands(), self.topics.state()] {
                    if self.client.try_subscribe(filter, QoS::AtLeastOnce).is_ok() {
                        self.tags.push_back(Tag::Other);
                    }
                }
                self.queue_retained();
            }
            PollEvent::Down(reason, stopped) => {
                let repeated = matches!(&*self.state.borrow(), Connection::Down(r) if *r == reason);
                if self.connected {
                    tracing::warn!(target: "mqtt", "broker connection lost: {reason}");
                } else if !repeated {
                    tracing::warn!(target: "mqtt", "cannot reach the broker: {reason} (retrying)");
                }
                self.connected = false;
                let _ = self.state.send(Connection::Down(reason));
                self.tags.clear();
                self.inflight.clear();
                self.buffer.clear();
                self.retained.clear();
                let _ = stopped.send(());
            }
            PollEvent::Sent(pkid) => {
                if let Some(tag) = self.tags.pop_front() {
                    self.inflight.insert(pkid, tag);
                }
            }
            PollEvent::SentOther => {
                self.tags.pop_front();
            }
            PollEvent::Acked(pkid) => {
                if let Some(Tag::Outbox(id)) = self.inflight.remove(&pkid) {
                    self.acked.push(id);
                }
            }
            PollEvent::Command(incoming) if incoming.topic == self.topics.state() => {
                if incoming.payload == b"lost" && self.connected {
                    tracing::warn!(target: "mqtt", "the broker says this controller is lost; publishing its state again");
                    if let Ok(retained) = self.reader.retained_to_republish() {
                        let state = self.topics.state();
                        self.retained
                            .extend(retained.into_iter().filter(|(t, _)| *t == state));
                    }
                }
            }
            PollEvent::Command(incoming) => {
                if self.commands.try_send(incoming).is_err() {
                    tracing::warn!(target: "mqtt", "command dropped: the controller's command queue is full");
                }
            }
        }
    }

    fn queue_retained(&mut self) {
        match self.reader.retained_to_republish() {
            Ok(r) => self.retained = r.into(),
            Err(e) => tracing::error!(target: "mqtt", "{e}"),
        }
        self.republished = false;
    }

    /// Hands rumqttc as much as the window allows: retained state, then the outbox.
    fn fill(&mut self) {
        while self.outstanding() < WINDOW {
            if let Some((topic, payload)) = self.retained.pop_front() {
                if !publishable(&topic, payload.len()) {
                    tracing::error!(target: "mqtt", "retained message on `{}` ({} bytes) cannot be published: skipped", topic.escape_debug(), payload.len());
                    continue;
                }
                // A copy of a message sent before: its seq is old, so it says so.
                if self
                    .client
                    .try_publish(
                        topic.clone(),
                        QoS::AtLeastOnce,
                        true,
                        mark_replayed(&payload),
                    )
                    .is_err()
                {
                    self.retained.push_front((topic, payload));
                    return;
                }
                self.tags.push_back(Tag::Other);
                continue;
            }
            if !self.republished {
                self.republished = true;
                if let Err(e) = self.reader.forget_cleared() {
                    tracing::error!(target: "mqtt", "{e}");
                }
            }
            if self.buffer.is_empty() {
                match self.reader.next(self.cursor, BATCH) {
                    Ok(rows) if rows.is_empty() => return,
                    Ok(rows) => self.buffer = rows.into(),
                    Err(e) => {
                        tracing::error!(target: "mqtt", "{e}");
                        return;
                    }
                }
            }
            let Some(row) = self.buffer.pop_front() else {
                return;
            };
            if !publishable(&row.topic, row.payload.len()) {
                // Never sendable: deleted as if acknowledged, so it cannot hold
                // up every message behind it.
                tracing::error!(target: "mqtt", "message {} on `{}` ({} bytes) cannot be published: dropped", row.id, row.topic.escape_debug(), row.payload.len());
                self.cursor = row.id;
                self.acked.push(row.id);
                continue;
            }
            let payload = if row.id <= self.live_from {
                row.replayed_payload()
            } else {
                row.payload.clone()
            };
            if self
                .client
                .try_publish(row.topic.clone(), QoS::AtLeastOnce, row.retain, payload)
                .is_err()
            {
                self.buffer.push_front(row);
                return;
            }
            self.cursor = row.id;
            self.tags.push_back(Tag::Outbox(row.id));
        }
    }

    fn flush_acks(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        let acked = std::mem::take(&mut self.acked);
        if let Err(e) = self.reader.acknowledge(&acked) {
            // Kept in the outbox: sent again later (at least once).
            tracing::error!(target: "mqtt", "{e}");
        }
    }

    /// Announces the final state and disconnects; waits briefly for the PUBACK
    /// so the broker has it before the connection closes.
    async fn close(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<PollEvent>,
        final_state: &[u8],
        flushed: bool,
    ) -> ShutdownReport {
        let mut announced = false;
        if self.connected
            && self
                .client
                .try_publish(
                    self.topics.state(),
                    QoS::AtLeastOnce,
                    true,
                    final_state.to_vec(),
                )
                .is_ok()
        {
            self.tags.push_back(Tag::Final);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
                let done = match &event {
                    PollEvent::Acked(pkid) => {
                        matches!(self.inflight.get(pkid), Some(Tag::Final))
                    }
                    PollEvent::Down(..) => true,
                    _ => false,
                };
                self.handle(event);
                if done {
                    announced = self.connected;
                    break;
                }
            }
            self.flush_acks();
            let _ = self.client.try_disconnect();
            // Let the event loop write the DISCONNECT before the task ends.
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Some(event) = events.recv().await {
                    if let PollEvent::Down(_, stopped) = event {
                        let _ = stopped.send(());
                        break;
                    }
                }
            })
            .await;
        }
        ShutdownReport { flushed, announced }
    }
}

/// Where a lab's outbox lives.
pub fn outbox_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("mqtt-outbox.sqlite")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = tls_config(Some(&missing)).unwrap_err();
        assert!(e.contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = tls_config(Some(&empty)).unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
    }

    #[test]
    fn messages_the_broker_would_refuse_are_recognised() {
        assert!(publishable("bf/v1/s/c/x/alarm/watch.ph", 100));
        assert!(publishable("bf/v1/s/c/x/alarm/wätch.ph", 100));
        for topic in ["", "bf/v1/a+b", "bf/v1/alarm/#.ph", "bf/v1/\0"] {
            assert!(!publishable(topic, 10), "{topic:?}");
        }
        assert!(!publishable(&"a".repeat(70_000), 0));
        assert!(publishable("t", MAX_PACKET - 100));
        assert!(!publishable("t", MAX_PACKET));
    }

    #[test]
    fn settings_never_show_the_password() {
        let s = BrokerSettings {
            host: "h".into(),
            port: 1,
            client_id: "c".into(),
            credentials: Some(("user".into(), "hunter2-secret".into())),
            tls: None,
            keep_alive: Duration::from_secs(5),
        };
        let shown = format!("{s:?}");
        assert!(
            shown.contains("user") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
