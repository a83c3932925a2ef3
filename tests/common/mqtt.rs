//! MQTT brokers and clients for integration tests.
//!
//! - [`TestBroker`]: a broker in a child process on a free 127.0.0.1 port —
//!   mosquitto (persistence, TLS, users as [`BrokerOptions`] say) or the
//!   embedded rumqttd through `biofoundry broker`. It owns a temp dir
//!   (config, persistence db, certificates, password file, logs); dropping it
//!   kills the process (SIGKILL) and removes the dir.
//! - [`Subscriber`]: a persistent-session client in a background task that
//!   records every message it receives.
//! - [`publish`] / [`publish_with`]: a one-shot QoS 1 publish.
//!
//! Every wait is bounded. `TestBroker`'s methods block the calling thread
//! (for at most a few seconds), so async tests should use a multi-thread
//! runtime (`#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`)
//! and call them in `tokio::task::block_in_place`, or the subscriber tasks
//! stall meanwhile.

use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};

/// How long a broker gets to accept TCP connections after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `restart` keeps retrying when the new process cannot bind.
const RESTART_RETRY: Duration = Duration::from_secs(5);
/// Max MQTT packet size of the harness's clients, both ways.
pub const MAX_PACKET_SIZE: usize = 4 << 20;

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}

fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------- brokers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// mosquitto (must be installed; see [`require_mosquitto`]).
    Mosquitto,
    /// The embedded rumqttd, as the `biofoundry broker` process.
    Embedded,
}

/// How [`TestBroker::mosquitto`] configures mosquitto.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// `persistence true` in the temp dir, saved every second and on SIGTERM.
    pub persistence: bool,
    /// A TLS-only listener with a certificate for `localhost` and 127.0.0.1,
    /// signed by a test CA ([`TestBroker::ca_file`]).
    pub tls: bool,
    /// Non-empty: anonymous clients are refused; these (user, password)
    /// pairs are the only accounts.
    pub users: Vec<(String, String)>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            persistence: true,
            tls: false,
            users: Vec::new(),
        }
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn mosquitto_program() -> Option<PathBuf> {
    let sbin = PathBuf::from("/usr/sbin/mosquitto");
    if sbin.is_file() {
        Some(sbin)
    } else {
        find_program("mosquitto")
    }
}

/// Is mosquitto installed (/usr/sbin/mosquitto or `mosquitto` in PATH)?
pub fn mosquitto_available() -> bool {
    mosquitto_program().is_some()
}

/// Call first in a test that needs mosquitto: `if !require_mosquitto("x") { return; }`.
/// Without mosquitto the test is skipped (with a note on stderr), except on
/// CI (`CI` set), where a missing mosquitto is a setup error and panics.
pub fn require_mosquitto(test: &str) -> bool {
    if mosquitto_available() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test} needs mosquitto, which is not installed: .ci/run must install it \
             (apt-get install -y mosquitto mosquitto-clients)"
        );
    }
    eprintln!("skipping {test}: mosquitto is not installed");
    false
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A broker in a child process on 127.0.0.1, with its own temp dir.
pub struct TestBroker {
    kind: BrokerKind,
    options: BrokerOptions,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TestBroker {
    /// `Mosquitto` with default options (persistence, no TLS, anonymous) or `Embedded`.
    pub fn start(kind: BrokerKind) -> TestBroker {
        match kind {
            BrokerKind::Mosquitto => TestBroker::mosquitto(&BrokerOptions::default()),
            BrokerKind::Embedded => TestBroker::embedded(),
        }
    }

    /// Starts mosquitto and waits until its port accepts TCP connections
    /// (bounded). Panics (with the tail of its log) if it does not start.
    pub fn mosquitto(options: &BrokerOptions) -> TestBroker {
        assert!(
            mosquitto_available(),
            "mosquitto is not installed (use require_mosquitto first)"
        );
        let mut broker = TestBroker::new(BrokerKind::Mosquitto, options.clone());
        if options.tls {
            write_certificates(broker.dir());
        }
        if !options.users.is_empty() {
            write_password_file(&broker.dir().join("passwd"), &options.users);
        }
        broker.launch_fresh();
        broker
    }

    /// Starts `biofoundry broker --port <port>` (the embedded rumqttd) and
    /// waits until its port accepts TCP connections (bounded).
    pub fn embedded() -> TestBroker {
        let mut broker = TestBroker::new(BrokerKind::Embedded, BrokerOptions::default());
        broker.launch_fresh();
        broker
    }

    fn new(kind: BrokerKind, options: BrokerOptions) -> TestBroker {
        let dir = tempfile::Builder::new()
            .prefix("bf-test-broker-")
            .tempdir()
            .expect("cannot create a temp dir");
        TestBroker {
            kind,
            options,
            port: free_port(),
            dir,
            child: None,
        }
    }

    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's temp dir (config, persistence, certificates, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The test CA's certificate (PEM) that signed the TLS listener's certificate.
    pub fn ca_file(&self) -> PathBuf {
        assert!(self.options.tls, "ca_file: the broker has no TLS listener");
        self.dir().join("ca.pem")
    }

    /// The last `lines` lines of the broker's log and stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in ["mosquitto.log", "stderr.log", "stdout.log"] {
            let Ok(text) = fs::read_to_string(self.dir().join(name)) else {
                continue;
            };
            let all: Vec<&str> = text.lines().collect();
            if all.is_empty() {
                continue;
            }
            out.push_str(&format!("--- {name} ---\n"));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Is the broker process still running?
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL and wait: nothing is saved (mosquitto keeps what its last
    /// autosave, at most a second old, wrote).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (mosquitto saves its persistence db), wait up to 5 s, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the same broker again: same config, port and persistence dir.
    /// A broker still running is killed (SIGKILL) first; call [`stop`](Self::stop)
    /// before for a clean shutdown. Retries for up to 5 s if the port
    /// cannot be bound yet.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + RESTART_RETRY;
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(Failure::Exited(message)) if Instant::now() < deadline => {
                    eprintln!("restart on port {} failed, retrying: {message}", self.port);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(Failure::Exited(message) | Failure::Timeout(message)) => {
                    panic!("cannot restart the {:?} broker: {message}", self.kind)
                }
            }
        }
    }

    /// First start: if the port was taken in the meantime (free_port races
    /// with other tests), try again on another port.
    fn launch_fresh(&mut self) {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.launch() {
                Ok(()) => return,
                Err(Failure::Exited(message)) if attempts < 3 && message.contains("in use") => {
                    self.port = free_port();
                }
                Err(Failure::Exited(message) | Failure::Timeout(message)) => {
                    panic!("cannot start the {:?} broker: {message}", self.kind)
                }
            }
        }
    }

    fn launch(&mut self) -> Result<(), Failure> {
        let mut command = match self.kind {
            BrokerKind::Mosquitto => {
                let config = self.dir().join("mosquitto.conf");
                fs::write(&config, self.mosquitto_config()).expect("cannot write mosquitto.conf");
                let mut c = Command::new(mosquitto_program().expect("mosquitto is not installed"));
                c.arg("-c").arg(config);
                c
            }
            BrokerKind::Embedded => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_biofoundry"));
                c.args(["broker", "--port", &self.port.to_string()]);
                c
            }
        };
        command
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(self.log_file("stdout.log"))
            .stderr(self.log_file("stderr.log"));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn the {:?} broker: {e}", self.kind));
        self.child = Some(child);
        self.wait_until_ready()
    }

    fn log_file(&self, name: &str) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join(name))
            .unwrap_or_else(|e| panic!("cannot open {name}: {e}"))
    }

    fn wait_until_ready(&mut self) -> Result<(), Failure> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = match &mut self.child {
                Some(child) => child.try_wait().ok().flatten(),
                None => unreachable!("wait_until_ready without a child"),
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(Failure::Exited(format!(
                    "it exited early ({status}) on port {}\n{}",
                    self.port,
                    self.log_tail(30)
                )));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(Failure::Timeout(format!(
                    "port {} did not accept connections within {START_TIMEOUT:?}\n{}",
                    self.port,
                    self.log_tail(30)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn mosquitto_config(&self) -> String {
        let dir = self.dir().display().to_string();
        let o = &self.options;
        let mut c = String::new();
        c.push_str(&format!("listener {} 127.0.0.1\n", self.port));
        if o.tls {
            c.push_str(&format!(
                "cafile {dir}/ca.pem\ncertfile {dir}/server.pem\nkeyfile {dir}/server.key\n"
            ));
        }
        if o.users.is_empty() {
            c.push_str("allow_anonymous true\n");
        } else {
            c.push_str(&format!(
                "allow_anonymous false\npassword_file {dir}/passwd\n"
            ));
        }
        if o.persistence {
            c.push_str(&format!(
                "persistence true\npersistence_location {dir}/\nautosave_interval 1\n"
            ));
        } else {
            c.push_str("persistence false\n");
        }
        c.push_str("max_queued_messages 100000\n");
        c.push_str(&format!("log_dest file {dir}/mosquitto.log\n"));
        for t in ["error", "warning", "notice", "information"] {
            c.push_str(&format!("log_type {t}\n"));
        }
        c.push_str("log_timestamp_format %H:%M:%S\n");
        // Started as root, mosquitto drops to user "mosquitto", which cannot
        // write this dir.
        if running_as_root() {
            c.push_str("user root\n");
        }
        c
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

enum Failure {
    /// The process exited (e.g. the port was in use).
    Exited(String),
    /// It ran but did not accept connections in time (it was killed).
    Timeout(String),
}

fn write_password_file(path: &Path, users: &[(String, String)]) {
    let program = find_program("mosquitto_passwd").expect("mosquitto_passwd is not installed");
    for (i, (user, password)) in users.iter().enumerate() {
        let mut c = Command::new(&program);
        if i == 0 {
            c.arg("-c");
        }
        let out = c
            .arg("-b")
            .arg(path)
            .args([user, password])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run mosquitto_passwd");
        assert!(
            out.status.success(),
            "mosquitto_passwd failed for {user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A test CA (ca.pem) and a certificate for `localhost` and 127.0.0.1 signed
/// by it (server.pem, server.key).
fn write_certificates(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "biofoundry test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let server = params.signed_by(&server_key, &ca).unwrap();

    fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    fs::write(dir.join("server.pem"), server.pem()).unwrap();
    fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
}

/// A TLS transport that trusts only the CA in `ca_file` (PEM), for
/// `MqttOptions::set_transport`. Connect to "127.0.0.1" or "localhost".
pub fn tls_transport(ca_file: &Path) -> Transport {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("cannot read the CA file") {
        roots
            .add(cert.expect("bad certificate in the CA file"))
            .expect("cannot add the CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("no TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config)))
}

// ---------------------------------------------------------------- clients

/// Options of the harness's subscriber clients: 127.0.0.1, persistent
/// session (`clean_session=false`), keep-alive 5 s, packets up to 4 MiB.
pub fn client_options(port: u16, client_id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(false)
        .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE);
    o
}

/// A message a [`Subscriber`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Received {
    pub fn json(&self) -> Option<serde_json::Value> {
        json(self)
    }
}

/// The payload as JSON, if it is JSON.
pub fn json(r: &Received) -> Option<serde_json::Value> {
    serde_json::from_slice(&r.payload).ok()
}

#[derive(Default)]
struct SubscriberState {
    subacks: AtomicUsize,
    /// `session_present` of every ConnAck, in order.
    connacks: Mutex<Vec<bool>>,
    last_error: Mutex<Option<String>>,
    paused: AtomicBool,
}

/// An MQTT client in a background tokio task, subscribed at QoS 1 to one
/// filter, recording every message. It resubscribes on every ConnAck and
/// reconnects 50 ms after each error. Dropping it aborts the task.
pub struct Subscriber {
    client: AsyncClient,
    received: Arc<Mutex<Vec<Received>>>,
    state: Arc<SubscriberState>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects to 127.0.0.1:`port` as `client_id` ([`client_options`]) and
    /// returns after the first SubAck (panics after 10 s).
    pub async fn start(port: u16, filter: &str, client_id: &str) -> Subscriber {
        Subscriber::start_with(client_options(port, client_id), filter).await
    }

    /// Same with any options (TLS transport, credentials, ...).
    pub async fn start_with(options: MqttOptions, filter: &str) -> Subscriber {
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(SubscriberState::default());
        let task = {
            let client = client.clone();
            let received = received.clone();
            let state = state.clone();
            let filter = filter.to_string();
            tokio::spawn(async move {
                loop {
                    while state.paused.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            state.connacks.lock().unwrap().push(ack.session_present);
                            // rumqttc does not restore subscriptions itself.
                            if let Err(e) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce)
                            {
                                *state.last_error.lock().unwrap() = Some(format!("subscribe: {e}"));
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            if ack
                                .return_codes
                                .iter()
                                .all(|c| !matches!(c, SubscribeReasonCode::Failure))
                            {
                                state.subacks.fetch_add(1, Ordering::SeqCst);
                            } else {
                                *state.last_error.lock().unwrap() =
                                    Some(format!("subscription refused: {ack:?}"));
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            received.lock().unwrap().push(Received {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                            });
                        }
                        Ok(_) => {}
                        Err(e) => {
                            *state.last_error.lock().unwrap() = Some(e.to_string());
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        };
        let subscriber = Subscriber {
            client,
            received,
            state,
            task,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while subscriber.suback_count() == 0 {
            if Instant::now() >= deadline {
                panic!(
                    "subscriber to {filter:?} got no SubAck within 10 s (last error: {:?})",
                    subscriber.last_error()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        subscriber
    }

    /// Everything received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Forgets what was received so far.
    pub fn clear(&self) {
        self.received.lock().unwrap().clear();
    }

    /// Polls every 20 ms until `pred(received)` holds and returns what was
    /// received; after `timeout` panics with `what` and the last 20 topics.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if pred(&received) {
                return received;
            }
            if Instant::now() >= deadline {
                let topics: Vec<&str> = received
                    .iter()
                    .rev()
                    .take(20)
                    .rev()
                    .map(|r| r.topic.as_str())
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; {} messages received, \
                     the last topics: {topics:?} (last client error: {:?})",
                    received.len(),
                    self.last_error()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Successful SubAcks so far (one per (re)connection).
    pub fn suback_count(&self) -> usize {
        self.state.subacks.load(Ordering::SeqCst)
    }

    /// `session_present` of every ConnAck so far.
    pub fn connacks(&self) -> Vec<bool> {
        self.state.connacks.lock().unwrap().clone()
    }

    /// The last connection error (or refused subscription).
    pub fn last_error(&self) -> Option<String> {
        self.state.last_error.lock().unwrap().clone()
    }

    /// While paused, the task does not poll: it neither receives nor
    /// reconnects (a pause takes effect when the current poll returns, e.g.
    /// on the connection error when the broker goes away).
    pub fn set_paused(&self, paused: bool) {
        self.state.paused.store(paused, Ordering::SeqCst);
    }

    /// The client, e.g. to publish from the subscriber's own connection.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A one-shot QoS 1 publish to 127.0.0.1:`port` (clean session, a unique
/// client id): polls until the PubAck (panics after 5 s), then disconnects.
pub async fn publish(port: u16, topic: &str, payload: &[u8], retain: bool) {
    let mut o = client_options(port, &unique_id("bf-test-pub"));
    o.set_clean_session(true);
    publish_with(o, topic, payload, retain).await;
}

/// Same with any options (TLS transport, credentials, ...).
pub async fn publish_with(options: MqttOptions, topic: &str, payload: &[u8], retain: bool) {
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
        .await
        .expect("cannot queue the publish");
    let acked = tokio::time::timeout(Duration::from_secs(5), async {
        let mut last_error = None;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(format!("connection refused: {code:?}"));
                }
                Err(e) => {
                    if last_error.is_none() {
                        eprintln!("publish to {topic}: {e} (retrying)");
                    }
                    last_error = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
    match acked {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("publish to {topic} failed: {e}"),
        Err(_) => panic!("publish to {topic}: no PubAck within 5 s"),
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A signed command as MES sends it: `body` (a JSON object with its
/// `cmd_id`) with an `expires_at`, which a signed command must carry (an
/// hour ahead unless the body has one).
#[allow(dead_code)]
pub fn signed_command(verb: &str, body: &serde_json::Value, key: &[u8]) -> String {
    let mut body = body.clone();
    if body.get("expires_at").is_none() {
        let expires = std::time::SystemTime::now() + Duration::from_secs(3600);
        body["expires_at"] = humantime::format_rfc3339_millis(expires).to_string().into();
    }
    biofoundry::mqtt::command::sign(verb, &body.to_string(), key)
}
