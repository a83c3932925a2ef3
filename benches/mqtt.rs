//! MQTT benchmarks: the controller's publish path (Publisher → SQLite outbox →
//! Link → broker) against a bare rumqttc loop, side by side, in one run,
//! against the same broker.
//!
//! - Throughput, QoS 1: 20 000 telemetry-sized messages (~120 bytes of JSON).
//!   Bare: one `AsyncClient` publishing as fast as it can (in-flight window
//!   256, the link's), timed until the last PUBACK. Controller: a fresh outbox
//!   and a `Link`; the messages go in through `Publisher::telemetry` (one per
//!   call) or `Publisher::send` (100 per call: a cycle of a 100-device lab),
//!   timed until the outbox is empty (every message committed and
//!   acknowledged by the broker). A QoS 1 subscriber counts what arrives.
//! - Latency: 1 000 messages/s for 10 s (after 100 warm-up messages, whose
//!   worst delay is reported apart), paced by a tokio interval; the
//!   subscriber maps each message's `seq` to the instant it was handed over
//!   (before `publish` / `Publisher::telemetry`) and records the delay.
//!
//! The broker is mosquitto, a child process on a free 127.0.0.1 port with a
//! temp config (no persistence, `max_queued_messages 1000000` so the
//! subscriber's queue never drops), or the embedded rumqttd when mosquitto is
//! not installed (the output says which). Publishers run on a 2-worker
//! runtime, as `biofoundry serve` does; subscribers on a 1-worker runtime of
//! their own, as MES would be another process.
//!
//! Throughput runs three rounds (every other one in reverse order) and
//! reports the median round; latency runs once per side.
//!
//! `cargo bench --bench mqtt` (about 35 s); prints Markdown tables.

use biofoundry::mqtt::link::{BrokerSettings, Connection, Link};
use biofoundry::mqtt::publisher::{Publisher, now_ms, timestamp};
use biofoundry::mqtt::topics::{PREFIX, Topics};
use biofoundry::units::{Dimension, Quantity};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Messages in each throughput run.
const N: u64 = 20_000;
/// Devices the messages cycle through (and messages per `send` call).
const DEVICES: usize = 100;
/// The in-flight window, the same as the link's.
const INFLIGHT: u16 = 256;
const LATENCY_RATE_HZ: u64 = 1_000;
const LATENCY_SECS: u64 = 10;
/// Messages sent before the timed ones (the first messages of a connection
/// are slower); left out of the percentiles, their max is reported apart.
const WARMUP_MSGS: u64 = 100;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
const E2E_TIMEOUT: Duration = Duration::from_secs(30);
/// Throughput rounds (the median is reported).
const ROUNDS: usize = 3;

// ------------------------------------------------------------------ broker

struct Broker {
    port: u16,
    description: String,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn find_mosquitto() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOSQUITTO") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "mosquitto exited ({status}) before listening on {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            panic!("mosquitto did not listen on 127.0.0.1:{port} within {CONNECT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_broker() -> Broker {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    if let Some(exe) = find_mosquitto() {
        let version = Command::new(&exe)
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "mosquitto".into());
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        let mut text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 1000000\nlog_dest file {}\n",
            log.display()
        );
        if is_root() {
            text.push_str("user root\n");
        }
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let mut child = Command::new(&exe)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        wait_for_port(port, &mut child, &log);
        return Broker {
            port,
            description: format!("{version}, child process on 127.0.0.1:{port}"),
            child: Some(child),
            _dir: dir,
        };
    }
    embedded(port, dir)
}

#[cfg(feature = "embedded-broker")]
fn embedded(port: u16, dir: tempfile::TempDir) -> Broker {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    biofoundry::mqtt::broker::start_embedded(addr)
        .unwrap_or_else(|e| panic!("embedded broker: {e}"));
    Broker {
        port,
        description: format!(
            "mosquitto NOT FOUND: embedded rumqttd (biofoundry::mqtt::broker) on {addr}"
        ),
        child: None,
        _dir: dir,
    }
}

#[cfg(not(feature = "embedded-broker"))]
fn embedded(_port: u16, _dir: tempfile::TempDir) -> Broker {
    panic!("mosquitto is not installed and this build has no embedded-broker feature");
}

// ------------------------------------------------------------- helpers

/// Polls `cond` every millisecond; panics with `what` after `timeout`.
async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits for a oneshot, panicking with `what` after `timeout`.
async fn within<T>(what: &str, timeout: Duration, rx: oneshot::Receiver<T>) -> T {
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("{what}: the task ended early"),
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true)
        .set_inflight(INFLIGHT)
        .set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// The values of one telemetry message: a pH probe with its temperature.
fn values(i: u64) -> Vec<(String, Quantity)> {
    vec![
        (
            "ph".into(),
            Quantity::new(7.0 + (i % 100) as f64 / 1000.0, Dimension::Unitless),
        ),
        (
            "temperature".into(),
            Quantity::new(37.0 + (i % 10) as f64 / 100.0, Dimension::Temperature),
        ),
    ]
}

/// The bare loop's payload: the same JSON the controller publishes.
fn bare_payload(seq: u64) -> Vec<u8> {
    let mut values = serde_json::Map::new();
    for (name, q) in self::values(seq) {
        values.insert(
            name,
            json!({ "v": q.value, "unit": q.dimension.canonical_unit() }),
        );
    }
    json!({ "ts": timestamp(now_ms()), "values": values, "seq": seq })
        .to_string()
        .into_bytes()
}

fn device(i: u64) -> String {
    format!("d{:03}", i % DEVICES as u64)
}

// ---------------------------------------------------------- subscriber

/// A QoS 1 subscriber on its own runtime: counts messages and records
/// (seq, receive instant) for the latency runs.
struct Subscriber {
    count: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    received: Arc<Mutex<Vec<(u64, u64)>>>,
    client: AsyncClient,
}

impl Subscriber {
    fn start(rt: &Runtime, port: u16, filter: &str, base: Instant) -> Subscriber {
        static SUBSCRIBERS: AtomicU64 = AtomicU64::new(0);
        let id = format!(
            "bench-sub-{}-{}",
            std::process::id(),
            SUBSCRIBERS.fetch_add(1, Ordering::Relaxed)
        );
        let (client, mut eventloop) = AsyncClient::new(options(&id, port), 64);
        let count = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let received = Arc::new(Mutex::new(Vec::with_capacity(N as usize)));
        let (subscribed_tx, subscribed) = oneshot::channel();
        let (c, b, r) = (count.clone(), bytes.clone(), received.clone());
        let (f, cl) = (filter.to_string(), client.clone());
        rt.spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at = base.elapsed().as_nanos() as u64;
                        if let Some(seq) = serde_json::from_slice::<Value>(&p.payload)
                            .ok()
                            .and_then(|v| v.get("seq").and_then(Value::as_u64))
                        {
                            r.lock().unwrap().push((seq, at));
                        }
                        b.fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = cl.try_subscribe(f.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("subscriber: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        rt.block_on(within(
            "the subscriber's SUBACK",
            CONNECT_TIMEOUT,
            subscribed,
        ));
        Subscriber {
            count,
            bytes,
            received,
            client,
        }
    }

    /// Waits (bounded, no panic) until `n` messages arrived; returns the count.
    fn settle(&self, rt: &Runtime, n: u64) -> u64 {
        rt.block_on(async {
            let deadline = Instant::now() + E2E_TIMEOUT;
            while self.count.load(Ordering::Relaxed) < n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Anything beyond n (duplicates) shows up in a short grace period.
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        self.count.load(Ordering::Relaxed)
    }

    fn mean_size(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed) / self.count.load(Ordering::Relaxed).max(1)
    }

    fn stop(self, rt: &Runtime) {
        let _ = rt.block_on(self.client.disconnect());
    }
}

// ------------------------------------------------------------ bare path

/// A bare publisher: the client and the PUBACK count, polled in its own task.
async fn bare_client(port: u16, name: &str) -> (AsyncClient, Arc<AtomicU64>) {
    let id = format!("bench-{name}-{}", std::process::id());
    let (client, mut eventloop) = AsyncClient::new(options(&id, port), 2 * INFLIGHT as usize);
    let acks = Arc::new(AtomicU64::new(0));
    let (up_tx, up) = oneshot::channel();
    let a = acks.clone();
    tokio::spawn(async move {
        let mut up_tx = Some(up_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = up_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bare client: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    within("the bare client's CONNACK", CONNECT_TIMEOUT, up).await;
    (client, acks)
}

async fn bare_throughput(port: u16) -> Duration {
    let (client, acks) = bare_client(port, "bare-tp").await;
    let payloads: Vec<Vec<u8>> = (1..=N).map(bare_payload).collect();
    let start = Instant::now();
    for (i, payload) in payloads.into_iter().enumerate() {
        let topic = format!("bench/bare/device/{}/telemetry", device(i as u64));
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("bare publish");
    }
    wait_until("the bare loop's PUBACKs", ACK_TIMEOUT, || {
        acks.load(Ordering::Relaxed) >= N
    })
    .await;
    let elapsed = start.elapsed();
    let _ = client.disconnect().await;
    elapsed
}

/// Publishes `count` messages at `rate` Hz; returns each one's send instant
/// (nanoseconds since `base`), indexed by seq - 1.
async fn bare_paced(port: u16, base: Instant, count: u64) -> Vec<u64> {
    let (client, acks) = bare_client(port, "bare-lat").await;
    let mut sent = Vec::with_capacity(count as usize);
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / LATENCY_RATE_HZ));
    for seq in 1..=count {
        tick.tick().await;
        let topic = format!("bench/bare-lat/device/{}/telemetry", device(seq));
        let payload = bare_payload(seq);
        sent.push(base.elapsed().as_nanos() as u64);
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("bare publish");
    }
    wait_until("the paced bare loop's PUBACKs", ACK_TIMEOUT, || {
        acks.load(Ordering::Relaxed) >= count
    })
    .await;
    let _ = client.disconnect().await;
    sent
}

// ------------------------------------------------------ controller path

struct Controller {
    publisher: Publisher,
    link: Link,
    topics: Topics,
    outbox: PathBuf,
    _commands: mpsc::Receiver<biofoundry::mqtt::link::Incoming>,
    _dir: tempfile::TempDir,
}

async fn controller(port: u16, name: &str) -> Controller {
    let dir = tempfile::tempdir().expect("temp dir");
    let topics = Topics::new(PREFIX, "bench", "cell", name);
    let outbox = dir.path().join("mqtt-outbox.sqlite");
    let (publisher, reader, wake) =
        Publisher::open(&outbox, 10_000_000, topics.clone()).expect("open the outbox");
    let settings = BrokerSettings {
        host: "127.0.0.1".into(),
        port,
        client_id: format!("bench-{name}-{}", std::process::id()),
        credentials: None,
        tls: None,
        keep_alive: Duration::from_secs(5),
    };
    let (commands_tx, commands) = mpsc::channel(16);
    let link = Link::start(&settings, topics.clone(), reader, wake, commands_tx);
    let mut state = link.connection();
    let connected = matches!(
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            state.wait_for(|c| *c == Connection::Connected),
        )
        .await,
        Ok(Ok(_))
    );
    assert!(
        connected,
        "the link did not connect within {CONNECT_TIMEOUT:?}: {:?}",
        *state.borrow()
    );
    Controller {
        publisher,
        link,
        topics,
        outbox,
        _commands: commands,
        _dir: dir,
    }
}

impl Controller {
    /// Waits until every message is acknowledged: `Publisher::unsent() == 0`,
    /// or the outbox table is empty while `unsent()` still counts some.
    /// Returns the drift: what `unsent()` still says 0.5 s after the table
    /// emptied (not counted in the time).
    async fn drained(&self, what: &str) -> (Instant, u64) {
        let p = self.publisher.clone();
        let db = rusqlite::Connection::open_with_flags(
            &self.outbox,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the outbox read-only");
        let rows = || -> u64 {
            db.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
                .map_or(u64::MAX, |n| n as u64)
        };
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut polls = 0u64;
        loop {
            let unsent = p.unsent();
            if unsent == 0 {
                return (Instant::now(), 0);
            }
            polls += 1;
            // The table every 2 ms: it costs a read transaction.
            if polls.is_multiple_of(2) && rows() == 0 {
                let empty = Instant::now();
                // The link decrements the counter just after its delete
                // commits: only a count that stays is a drift.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return (empty, p.unsent());
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {ACK_TIMEOUT:?} waiting for {what}: unsent() = {unsent}, \
                     rows in the outbox = {}",
                    rows()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn close(self) {
        let _ = self
            .link
            .shutdown(b"disconnected", Duration::from_secs(2))
            .await;
    }
}

/// Controller throughput: `per_call` telemetry messages per outbox write.
async fn controller_throughput(c: &Controller, per_call: usize) -> (Duration, u64) {
    let publisher = c.publisher.clone();
    let start = Instant::now();
    // The writer blocks on SQLite commits: a blocking thread, so it does
    // not hold a runtime worker the link needs.
    tokio::task::spawn_blocking(move || {
        let mut i = 0u64;
        while i < N {
            if per_call == 1 {
                publisher
                    .telemetry(&device(i), None, now_ms(), &values(i))
                    .expect("telemetry");
                i += 1;
            } else {
                let n = (per_call as u64).min(N - i);
                let batch = (i..i + n)
                    .map(|j| publisher.telemetry_message(&device(j), None, now_ms(), &values(j)))
                    .collect();
                publisher.send(batch).expect("send");
                i += n;
            }
        }
    })
    .await
    .expect("writer");
    let (empty, drift) = c.drained("the outbox to empty").await;
    (empty - start, drift)
}

/// The controller at `rate` Hz, one `Publisher::telemetry` per tick, called
/// in the task as `serve`'s device pollers do.
async fn controller_paced(c: &Controller, base: Instant, count: u64) -> (Vec<u64>, u64) {
    let mut sent = Vec::with_capacity(count as usize);
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / LATENCY_RATE_HZ));
    for i in 0..count {
        tick.tick().await;
        let v = values(i);
        sent.push(base.elapsed().as_nanos() as u64);
        c.publisher
            .telemetry(&device(i), None, now_ms(), &v)
            .expect("telemetry");
    }
    let (_, drift) = c.drained("the paced outbox to empty").await;
    (sent, drift)
}

// --------------------------------------------------------------- report

/// The first three fields of /proc/loadavg (other work on the machine skews
/// every figure here).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

struct Latency {
    received: usize,
    p50: f64,
    p99: f64,
    max: f64,
    /// The seq of the slowest message.
    max_seq: u64,
    over_5ms: usize,
    /// The slowest of the warm-up messages, and its seq.
    warmup_max: (f64, u64),
}

/// Delays in ms of the messages the subscriber got (seq n ↔ sent[n - 1]).
/// Delays in ms of the messages the subscriber got (seq n ↔ sent[n - 1]);
/// the first WARMUP_MSGS are kept apart.
fn latency(sent: &[u64], received: &[(u64, u64)]) -> Latency {
    type Delays = Vec<(f64, u64)>;
    let (mut ms, warmup): (Delays, Delays) = received
        .iter()
        .filter_map(|&(seq, at)| {
            let t = *sent.get(seq.checked_sub(1)? as usize)?;
            Some((at.saturating_sub(t) as f64 / 1e6, seq))
        })
        .partition(|&(_, seq)| seq > WARMUP_MSGS);
    assert!(!ms.is_empty(), "the subscriber received no message to time");
    ms.sort_by(|a, b| a.0.total_cmp(&b.0));
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)].0;
    let (max, max_seq) = ms[ms.len() - 1];
    Latency {
        received: ms.len(),
        p50: at(0.50),
        p99: at(0.99),
        max,
        max_seq,
        over_5ms: ms.iter().filter(|m| m.0 > 5.0).count(),
        warmup_max: warmup
            .into_iter()
            .fold((0.0, 0), |m, x| if x.0 > m.0 { x } else { m }),
    }
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let wall = Instant::now();
    let broker = start_broker();
    let port = broker.port;
    let publishers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let subscribers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let base = Instant::now();
    println!("# MQTT: controller path vs bare rumqttc\n");
    println!("command: cargo bench --bench mqtt");
    println!("broker: {}", broker.description);
    println!("load average at start: {}", loadavg());
    println!(
        "QoS 1; payload: telemetry JSON (ts, seq, a pH and a temperature value; mean size in \
         the tables); {DEVICES} device topics; in-flight window {INFLIGHT}\n"
    );

    // (a) Throughput: ROUNDS rounds of the three sides, every other round
    // backwards; each figure is the median round.
    const SIDES: [(&str, &str, usize); 3] = [
        ("bare rumqttc", "1 publish per message", 0),
        (
            "controller (outbox + link)",
            "`telemetry()`, 1 message per call",
            1,
        ),
        (
            "controller (outbox + link)",
            "`send()`, 100 messages per call",
            DEVICES,
        ),
    ];
    // Per side: (seconds, received by the subscriber, mean payload bytes) per round.
    let mut runs: Vec<Vec<(f64, u64, u64)>> = vec![Vec::new(); SIDES.len()];
    // (run, unsent() left when the outbox table was already empty)
    let mut drifts: Vec<(String, u64)> = Vec::new();
    for round in 0..ROUNDS {
        let mut order: Vec<usize> = (0..SIDES.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for side in order {
            let (_, shape, per_call) = SIDES[side];
            let (t, sub) = if per_call == 0 {
                let sub =
                    Subscriber::start(&subscribers, port, "bench/bare/device/+/telemetry", base);
                (publishers.block_on(bare_throughput(port)), sub)
            } else {
                let c = publishers.block_on(controller(port, &format!("ctl-{side}-{round}")));
                let sub = Subscriber::start(&subscribers, port, &c.topics.telemetry("+"), base);
                let (t, drift) = publishers.block_on(controller_throughput(&c, per_call));
                drifts.push((format!("throughput round {}, {shape}", round + 1), drift));
                publishers.block_on(c.close());
                (t, sub)
            };
            let got = sub.settle(&subscribers, N);
            runs[side].push((t.as_secs_f64(), got, sub.mean_size()));
            sub.stop(&subscribers);
        }
    }
    let median = |side: usize| -> f64 {
        let mut t: Vec<f64> = runs[side].iter().map(|r| r.0).collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let bare_rate = N as f64 / median(0);
    println!("## Throughput, QoS 1, N = {N} (median of {ROUNDS} rounds)\n");
    println!(
        "| path | shape | payload (B) | time (s) | msgs/s | vs bare | msgs/s, all rounds | received by subscriber |"
    );
    println!("|---|---|---:|---:|---:|---:|---|---|");
    for (side, (path, shape, _)) in SIDES.iter().enumerate() {
        let t = median(side);
        let rate = N as f64 / t;
        let all: Vec<String> = runs[side]
            .iter()
            .map(|r| format!("{:.0}", N as f64 / r.0))
            .collect();
        let got: Vec<String> = runs[side]
            .iter()
            .map(|r| {
                let mark = if r.1 == N { "" } else { " ≠ N!" };
                format!("{}{mark}", r.1)
            })
            .collect();
        println!(
            "| {path} | {shape} | {} | {t:.3} | {rate:.0} | {:.0} % | {} | {} of {N} |",
            runs[side][0].2,
            100.0 * rate / bare_rate,
            all.join(", "),
            got.join(", ")
        );
    }
    println!();

    // (b) Latency at 1 kHz.
    let timed = LATENCY_RATE_HZ * LATENCY_SECS;
    let count = WARMUP_MSGS + timed;
    let mut lat_rows = Vec::new();
    {
        let sub = Subscriber::start(
            &subscribers,
            port,
            "bench/bare-lat/device/+/telemetry",
            base,
        );
        let sent = publishers.block_on(bare_paced(port, base, count));
        sub.settle(&subscribers, count);
        let l = latency(&sent, &sub.received.lock().unwrap());
        sub.stop(&subscribers);
        lat_rows.push(("bare rumqttc QoS 1", l));
    }
    {
        let c = publishers.block_on(controller(port, "ctl-lat"));
        let sub = Subscriber::start(&subscribers, port, &c.topics.telemetry("+"), base);
        let (sent, drift) = publishers.block_on(controller_paced(&c, base, count));
        drifts.push(("latency".to_string(), drift));
        sub.settle(&subscribers, count);
        let l = latency(&sent, &sub.received.lock().unwrap());
        sub.stop(&subscribers);
        publishers.block_on(c.close());
        lat_rows.push(("controller: telemetry() → outbox → link", l));
    }
    println!(
        "## Latency, {LATENCY_RATE_HZ} msgs/s for {LATENCY_SECS} s ({timed} messages after {WARMUP_MSGS} warm-up ones), send → subscriber\n"
    );
    println!(
        "| path | received | p50 (ms) | p99 (ms) | max (ms) | max at seq | over 5 ms | warm-up max (ms, seq) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (path, l) in &lat_rows {
        println!(
            "| {path} | {} / {timed} | {:.3} | {:.3} | {:.3} | {} | {} | {:.3} (seq {}) |",
            l.received, l.p50, l.p99, l.max, l.max_seq, l.over_5ms, l.warmup_max.0, l.warmup_max.1
        );
    }
    println!();
    for (run, drift) in drifts.iter().filter(|(_, d)| *d > 0) {
        println!(
            "note ({run}): `Publisher::unsent()` still said {drift} 0.5 s after the outbox \
             table was empty: its counter drifted (likely: Outbox::append adds to it after \
             its commit, so an acknowledge that comes first saturates at 0); the run was \
             timed to the empty table"
        );
    }
    println!("load average at end: {}", loadavg());
    println!("total run time: {:.1} s", wall.elapsed().as_secs_f64());
    drop(broker);
}
