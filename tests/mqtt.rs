//! The MQTT contract through real brokers: `biofoundry serve` in its own
//! process, MES as a test client. Every test runs against the embedded broker
//! (`biofoundry broker`), and against mosquitto with persistence when it is
//! installed (required when `CI` is set). The outage tests need mosquitto.

mod common;

use biofoundry::mqtt::command::sign;
use common::mqtt::{
    BrokerKind, BrokerOptions, Received, Subscriber, TestBroker, publish, signed_command,
};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ROOT: &str = "bf/v1/test/cell/ctl";
const KEY: &str = "0123456789abcdef-test-key";

/// A protocol for MES to send as text: a setpoint, a prompt, a wait long
/// enough to pause and to survive an outage, and a monitor whose limits the
/// simulated pH always violates (so an alarm is raised).
fn protocol(wait: &str) -> String {
    format!(
        r#"format = "biofoundry.protocol/1"
[protocol]
name = "mqtt contract"
version = "1.0.0"
[devices]
br = "bioreactor"
[[step]]
id = "warm"
do = "br.set"
temperature = "37 C"
[[step]]
id = "ask"
do = "prompt"
message = "Add the inoculum, then confirm."
[[step]]
id = "grow"
do = "wait"
duration = "{wait}"
[[monitor]]
id = "watch"
device = "br"
read = ["ph"]
every = "1 min"
limits = {{ ph = "0..1" }}
on_violation = "alarm"
"#
    )
}

struct Workcell {
    dir: tempfile::TempDir,
    lab: PathBuf,
    serve: Option<Child>,
}

impl Workcell {
    /// A simulated workcell (a bioreactor of sim:// parts, a temperature
    /// module and a heater-shaker) with MQTT at `port`; `extra` goes into the [mqtt] table.
    fn new(port: u16, extra: &str) -> Workcell {
        let dir = tempfile::tempdir().expect("temp dir");
        let lab = dir.path().join("lab.toml");
        std::fs::write(dir.path().join("command.key"), KEY).expect("key file");
        let library = dir.path().join("library");
        std::fs::create_dir_all(&library).expect("library");
        std::fs::write(library.join("short.toml"), protocol("1 min")).expect("protocol");
        let text = format!(
            r#"format = "biofoundry.lab/1"
[controller]
site = "test"
cell = "cell"
id = "ctl"
data_dir = "data"
protocols = "library"
[mqtt]
host = "127.0.0.1"
port = {port}
keep_alive = "2 s"
{extra}
[telemetry]
every = "0.5 s"
[simulation]
speed = 60
[[device]]
id = "tm1"
profile = "opentrons-temperature-module"
transport = "sim://"
[[device]]
id = "hs1"
profile = "opentrons-heater-shaker"
transport = "sim://"
[[device]]
id = "br1"
kind = "bioreactor"
[device.parts.ph]
profile = "hamilton-arc-ph"
transport = "sim://"
[device.parts.temperature]
profile = "eurotherm-3200"
transport = "sim://"
"#
        );
        std::fs::write(&lab, text).expect("lab file");
        Workcell {
            dir,
            lab,
            serve: None,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_biofoundry"))
            .args(["serve", "--lab"])
            .arg(&self.lab)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start serve");
        self.serve = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("serve.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.serve.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    fn data(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Workcell {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- serve's log (last lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Broker and process control blocks briefly; the subscribers' tasks go on.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn topic(rest: &str) -> String {
    format!("{ROOT}/{rest}")
}

async fn command(port: u16, verb: &str, body: Value) {
    let payload = signed_command(verb, &body, KEY.as_bytes());
    publish(
        port,
        &topic(&format!("cmd/{verb}")),
        payload.as_bytes(),
        false,
    )
    .await;
}

/// The answers on cmd_result for one command id, in order.
fn results(received: &[Received], cmd_id: &str) -> Vec<Value> {
    let t = topic(&format!("cmd_result/{cmd_id}"));
    received
        .iter()
        .filter(|r| r.topic == t)
        .filter_map(|r| r.json())
        .collect()
}

fn statuses(received: &[Received], cmd_id: &str) -> Vec<String> {
    results(received, cmd_id)
        .iter()
        .map(|v| v["status"].as_str().unwrap_or("").to_string())
        .collect()
}

async fn wait_result(sub: &Subscriber, cmd_id: &str, status: &str) -> Value {
    let id = cmd_id.to_string();
    let status = status.to_string();
    let what = format!("cmd_result {cmd_id} {status}");
    let received = sub
        .wait_for(&what, Duration::from_secs(30), move |r| {
            statuses(r, &id).contains(&status)
        })
        .await;
    results(&received, cmd_id)
        .into_iter()
        .find(|v| v["status"] == json!(status_of(&what)))
        .unwrap_or(Value::Null)
}

fn status_of(what: &str) -> String {
    what.rsplit(' ').next().unwrap_or("").to_string()
}

/// The run id of the last `start_run` accepted.
fn run_id_of(v: &Value) -> String {
    v["run_id"]
        .as_str()
        .expect("run_id in cmd_result")
        .to_string()
}

fn run_states(received: &[Received], run_id: &str) -> Vec<String> {
    let t = topic(&format!("run/{run_id}/$state"));
    let mut seen = BTreeSet::new();
    received
        .iter()
        .filter(|r| r.topic == t)
        .filter_map(|r| r.json())
        .filter(|v| seen.insert(v["seq"].as_u64()))
        .map(|v| v["state"].as_str().unwrap_or("").to_string())
        .collect()
}

async fn wait_run_state(sub: &Subscriber, run_id: &str, state: &str, secs: u64) -> Vec<Received> {
    let id = run_id.to_string();
    let s = state.to_string();
    sub.wait_for(
        &format!("run {run_id} {state}"),
        Duration::from_secs(secs),
        move |r| run_states(r, &id).contains(&s),
    )
    .await
}

/// A workcell that requires signed commands, served and ready, and its observer.
async fn signed_workcell(port: u16, filter: &str, observer: &str) -> (Subscriber, Workcell) {
    let sub = Subscriber::start(port, filter, observer).await;
    let mut cell = Workcell::new(port, r#"command_key_file = "command.key""#);
    cell.start();
    wait_ready(&sub).await;
    (sub, cell)
}

/// Starts the test protocol from its text; returns the run id once it asks
/// its operator something.
async fn start_to_prompt(port: u16, sub: &Subscriber, cmd_id: &str, wait: &str) -> String {
    command(
        port,
        "start_run",
        json!({"cmd_id": cmd_id, "protocol_toml": protocol(wait)}),
    )
    .await;
    let run_id = run_id_of(&wait_result(sub, cmd_id, "done").await);
    wait_prompt(sub, &run_id).await;
    run_id
}

async fn wait_ready(sub: &Subscriber) {
    sub.wait_for("$state ready", Duration::from_secs(30), |r| {
        r.iter()
            .any(|m| m.topic == topic("$state") && m.payload == b"ready")
    })
    .await;
}

/// Waits until the run asks its operator something.
async fn wait_prompt(sub: &Subscriber, run_id: &str) {
    let t = topic(&format!("run/{run_id}/event"));
    sub.wait_for("prompt", Duration::from_secs(30), move |r| {
        r.iter().any(|m| {
            m.topic == t
                && m.json()
                    .is_some_and(|v| v["action"] == "prompt" && v["phase"] == "started")
        })
    })
    .await;
}

/// Every message carrying `seq`, first arrivals in arrival order.
fn first_seqs(received: &[Received]) -> Vec<u64> {
    let mut seen = BTreeSet::new();
    received
        .iter()
        .filter(|r| !r.retain)
        .filter_map(|r| r.json()?.get("seq")?.as_u64())
        .filter(|s| seen.insert(*s))
        .collect()
}

/// Asserts the first arrivals are exactly `from..=to` in increasing order.
fn assert_seq_complete(received: &[Received], from: u64) -> u64 {
    let seqs = first_seqs(received);
    let seqs: Vec<u64> = seqs.into_iter().filter(|s| *s >= from).collect();
    assert!(!seqs.is_empty(), "no seq received");
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    let last = *sorted.last().unwrap_or(&from);
    let missing: Vec<u64> = (from..=last)
        .filter(|s| sorted.binary_search(s).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "seq gaps: {missing:?} (of {from}..={last})"
    );
    assert_eq!(seqs, sorted, "seq out of order");
    last
}

fn brokers() -> Vec<BrokerKind> {
    let mut kinds = vec![BrokerKind::Embedded];
    if common::mqtt::require_mosquitto("mqtt tests on mosquitto") {
        kinds.push(BrokerKind::Mosquitto);
    }
    kinds
}

/// Starts a run of `protocol_toml`, answers its prompt, waits for completion,
/// and checks the whole story arrived: states, step events, samples, seq.
async fn whole_run(kind: BrokerKind) {
    let broker = blocking(|| TestBroker::start(kind));
    let port = broker.port();
    let (sub, mut cell) = signed_workcell(port, "bf/v1/#", &format!("observer-{kind:?}")).await;
    command(
        port,
        "start_run",
        json!({"cmd_id": "run-1", "protocol_toml": protocol("20 min"), "operator": "ada"}),
    )
    .await;
    let done = wait_result(&sub, "run-1", "done").await;
    let run_id = run_id_of(&done);
    // The prompt: answered by MES with the step id from the event.
    wait_prompt(&sub, &run_id).await;
    command(
        port,
        "answer_prompt",
        json!({"cmd_id": "answer-1", "run_id": run_id, "step_id": "ask", "response": "inoculated"}),
    )
    .await;
    wait_result(&sub, "answer-1", "done").await;
    wait_run_state(&sub, &run_id, "completed", 90).await;
    // run/current is emptied right after the final state.
    let received = sub
        .wait_for("run/current emptied", Duration::from_secs(10), |r| {
            r.iter()
                .any(|m| m.topic == topic("run/current") && m.payload.is_empty())
        })
        .await;

    let states = run_states(&received, &run_id);
    assert_eq!(
        states.first().map(String::as_str),
        Some("running"),
        "{states:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("completed"),
        "{states:?}"
    );
    let events: Vec<Value> = received
        .iter()
        .filter(|m| m.topic == topic(&format!("run/{run_id}/event")))
        .filter_map(|m| m.json())
        .collect();
    for step in ["warm", "ask", "grow"] {
        for phase in ["started", "completed"] {
            assert!(
                events
                    .iter()
                    .any(|e| e["step_id"] == step && e["phase"] == phase),
                "no {phase} event for {step}: {events:?}"
            );
        }
    }
    let prompt_answer = events
        .iter()
        .find(|e| e["action"] == "prompt" && e["phase"] == "completed");
    assert_eq!(
        prompt_answer.map(|e| e["detail"].clone()),
        Some(json!("inoculated"))
    );
    // Monitor samples and device telemetry, the run's samples tagged with it.
    let run_samples = received
        .iter()
        .filter(|m| m.topic == topic("device/br1/telemetry"))
        .filter_map(|m| m.json())
        .filter(|v| v["run_id"] == json!(run_id))
        .count();
    assert!(run_samples >= 10, "monitor samples: {run_samples}");
    assert!(
        received
            .iter()
            .any(|m| m.topic == topic("device/tm1/telemetry"))
    );
    // The monitor's alarm, retained on its own topic.
    assert!(
        received
            .iter()
            .any(|m| m.topic.starts_with(&topic("alarm/"))
                && m.json().is_some_and(|v| v["state"] == "active")),
        "no alarm"
    );
    // run/current names the run, then empties; the controller is ready again.
    assert!(
        received
            .iter()
            .any(|m| m.topic == topic("run/current") && m.payload.is_empty())
    );
    let last_state = received.iter().rev().find(|m| m.topic == topic("$state"));
    assert_eq!(
        last_state.map(|m| m.payload.clone()),
        Some(b"ready".to_vec())
    );
    assert_seq_complete(&received, 1);
    // A clean stop says `disconnected` (not the will's `lost`).
    let status = blocking(|| cell.terminate());
    assert!(
        status.is_some_and(|s| s.success()),
        "serve did not stop cleanly: {}",
        cell.log()
    );
    sub.wait_for("disconnected", Duration::from_secs(10), |r| {
        r.iter()
            .any(|m| m.topic == topic("$state") && m.payload == b"disconnected")
    })
    .await;
    blocking(|| drop(broker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_run_is_observed_by_a_subscriber() {
    for kind in brokers() {
        whole_run(kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_is_answered_and_none_runs_twice() {
    for kind in brokers() {
        commands(kind).await;
    }
}

async fn commands(kind: BrokerKind) {
    let broker = blocking(|| TestBroker::start(kind));
    let port = broker.port();
    let (sub, mut cell) = signed_workcell(port, &topic("#"), &format!("mes-{kind:?}")).await;

    // No run yet: run commands are rejected with a reason.
    command(port, "pause", json!({"cmd_id": "p0"})).await;
    let r = wait_result(&sub, "p0", "rejected").await;
    assert_eq!(r["reason"], "no run is active");
    // A library name that is not there.
    command(
        port,
        "start_run",
        json!({"cmd_id": "s5", "protocol": "nope"}),
    )
    .await;
    let r = wait_result(&sub, "s5", "rejected").await;
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no protocol `nope` in the library"),
        "{r}"
    );

    // start_run by library name, then every run verb.
    command(
        port,
        "start_run",
        json!({"cmd_id": "s1", "protocol": "short", "params": {}}),
    )
    .await;
    let run_id = run_id_of(&wait_result(&sub, "s1", "done").await);
    command(
        port,
        "start_run",
        json!({"cmd_id": "s2", "protocol": "short"}),
    )
    .await;
    let r = wait_result(&sub, "s2", "rejected").await;
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("already active"),
        "{r}"
    );
    command(port, "pause", json!({"cmd_id": "p1"})).await;
    wait_result(&sub, "p1", "done").await;
    // The same cmd_id again (as a QoS 1 redelivery would be): not run twice.
    command(port, "pause", json!({"cmd_id": "p1"})).await;
    let r = wait_result(&sub, "p1", "rejected").await;
    assert!(
        r["reason"].as_str().unwrap_or("").starts_with("duplicate"),
        "{r}"
    );
    command(port, "resume", json!({"cmd_id": "r1"})).await;
    wait_result(&sub, "r1", "done").await;
    command(port, "hold", json!({"cmd_id": "h1"})).await;
    wait_result(&sub, "h1", "done").await;
    command(port, "resume", json!({"cmd_id": "r2"})).await;
    wait_result(&sub, "r2", "done").await;
    // The prompt waits; answering a step that is not asking is refused.
    command(
        port,
        "answer_prompt",
        json!({"cmd_id": "a0", "run_id": run_id, "step_id": "warm", "response": "x"}),
    )
    .await;
    wait_result(&sub, "a0", "rejected").await;
    command(
        port,
        "answer_prompt",
        json!({"cmd_id": "a1", "run_id": "nope", "step_id": "ask", "response": "x"}),
    )
    .await;
    wait_result(&sub, "a1", "rejected").await;
    wait_prompt(&sub, &run_id).await;
    command(
        port,
        "answer_prompt",
        json!({"cmd_id": "a2", "run_id": run_id, "step_id": "ask", "response": "ok"}),
    )
    .await;
    wait_result(&sub, "a2", "done").await;
    // The monitor's alarm: acknowledged by MES.
    let received = sub
        .wait_for("alarm", Duration::from_secs(60), |r| {
            r.iter()
                .any(|m| m.topic.starts_with(&topic("alarm/")) && !m.payload.is_empty())
        })
        .await;
    let alarm_topic = received
        .iter()
        .find(|m| m.topic.starts_with(&topic("alarm/")) && !m.payload.is_empty())
        .map(|m| m.topic.clone())
        .unwrap_or_default();
    let alarm_id = alarm_topic.rsplit('/').next().unwrap_or("").to_string();
    command(
        port,
        "ack_alarm",
        json!({"cmd_id": "k1", "alarm_id": alarm_id}),
    )
    .await;
    wait_result(&sub, "k1", "done").await;
    let t = alarm_topic.clone();
    sub.wait_for("acknowledged", Duration::from_secs(10), move |r| {
        r.iter()
            .any(|m| m.topic == t && m.json().is_some_and(|v| v["state"] == "acknowledged"))
    })
    .await;
    command(
        port,
        "ack_alarm",
        json!({"cmd_id": "k2", "alarm_id": "no-such-alarm"}),
    )
    .await;
    wait_result(&sub, "k2", "rejected").await;
    command(
        port,
        "abort",
        json!({"cmd_id": "x1", "reason": "test over"}),
    )
    .await;
    wait_result(&sub, "x1", "done").await;
    wait_run_state(&sub, &run_id, "aborted", 30).await;

    // stop, on a second run.
    command(
        port,
        "start_run",
        json!({"cmd_id": "s3", "protocol_toml": protocol("30 min")}),
    )
    .await;
    let run2 = run_id_of(&wait_result(&sub, "s3", "done").await);
    command(port, "stop", json!({"cmd_id": "t1"})).await;
    wait_result(&sub, "t1", "done").await;
    wait_run_state(&sub, &run2, "stopped", 60).await;

    // A protocol that fails check is rejected with the place of the mistake.
    let bad = protocol("1 min").replace("37 C", "370 C");
    command(
        port,
        "start_run",
        json!({"cmd_id": "s4", "protocol_toml": bad}),
    )
    .await;
    let r = wait_result(&sub, "s4", "rejected").await;
    assert!(r["reason"].as_str().unwrap_or("").contains(":10:15"), "{r}");

    // Expired, unsigned, badly signed.
    command(
        port,
        "republish",
        json!({"cmd_id": "e1", "expires_at": "2020-01-01T00:00:00Z"}),
    )
    .await;
    let r = wait_result(&sub, "e1", "rejected").await;
    assert!(
        r["reason"].as_str().unwrap_or("").starts_with("expired"),
        "{r}"
    );
    publish(port, &topic("cmd/pause"), br#"{"cmd_id":"u1"}"#, false).await;
    let r = wait_result(&sub, "u1", "rejected").await;
    assert!(
        r["reason"].as_str().unwrap_or("").contains("unsigned"),
        "{r}"
    );
    let forged = json!({"signed": r#"{"cmd_id":"f1"}"#, "sig": "00".repeat(32)}).to_string();
    publish(port, &topic("cmd/pause"), forged.as_bytes(), false).await;
    let r = wait_result(&sub, "f1", "rejected").await;
    assert_eq!(r["reason"], "bad signature");

    // 20 malformed payloads: each answered `rejected`, none crashes or stalls.
    // Over the controller's 1 MiB command limit, under the brokers' packet limits.
    let huge = vec![b'x'; (1 << 20) + 1000];
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("pause", b"{".to_vec()),
        ("pause", b"not json".to_vec()),
        ("pause", b"[]".to_vec()),
        ("pause", b"null".to_vec()),
        ("pause", b"42".to_vec()),
        ("pause", vec![0xff, 0xfe, 0x00]),
        ("pause", Vec::new()),
        ("pause", huge),
        ("pause", "[".repeat(10_000).into_bytes()),
        (
            "launch_rockets",
            sign("launch_rockets", r#"{"cmd_id":"m10"}"#, KEY.as_bytes()).into_bytes(),
        ),
        (
            "pause",
            sign("pause", r#"{"cmd_id": 7}"#, KEY.as_bytes()).into_bytes(),
        ),
        (
            "pause",
            sign("pause", r#"{"cmd_id":"a/b"}"#, KEY.as_bytes()).into_bytes(),
        ),
        (
            "pause",
            sign("pause", r#"{"cmd_id":"m13","extra":1}"#, KEY.as_bytes()).into_bytes(),
        ),
        (
            "start_run",
            sign("start_run", r#"{"cmd_id":"m14"}"#, KEY.as_bytes()).into_bytes(),
        ),
        (
            "start_run",
            sign(
                "start_run",
                r#"{"cmd_id":"m15","protocol":"../etc/passwd"}"#,
                KEY.as_bytes(),
            )
            .into_bytes(),
        ),
        (
            "start_run",
            sign(
                "start_run",
                r#"{"cmd_id":"m16","protocol":"short","params":[1]}"#,
                KEY.as_bytes(),
            )
            .into_bytes(),
        ),
        (
            "abort",
            sign("abort", r#"{"cmd_id":"m17"}"#, KEY.as_bytes()).into_bytes(),
        ),
        (
            "answer_prompt",
            sign(
                "answer_prompt",
                r#"{"cmd_id":"m18","run_id":"r"}"#,
                KEY.as_bytes(),
            )
            .into_bytes(),
        ),
        (
            "pause",
            sign(
                "pause",
                r#"{"cmd_id":"m19","expires_at":"tomorrow"}"#,
                KEY.as_bytes(),
            )
            .into_bytes(),
        ),
        (
            "pause",
            sign("abort", r#"{"cmd_id":"m20"}"#, KEY.as_bytes()).into_bytes(),
        ),
    ];
    assert_eq!(malformed.len(), 20);
    sub.clear();
    for (verb, payload) in &malformed {
        publish(port, &topic(&format!("cmd/{verb}")), payload, false).await;
    }
    let received = sub
        .wait_for("20 rejections", Duration::from_secs(30), |r| {
            r.iter()
                .filter(|m| m.topic.starts_with(&topic("cmd_result/")))
                .filter(|m| m.json().is_some_and(|v| v["status"] == "rejected"))
                .count()
                >= 20
        })
        .await;
    let rejected = received
        .iter()
        .filter(|m| m.topic.starts_with(&topic("cmd_result/")))
        .filter(|m| m.json().is_some_and(|v| v["status"] == "rejected"))
        .count();
    assert_eq!(rejected, 20, "{rejected} rejections");
    // Still alive and answering.
    command(port, "republish", json!({"cmd_id": "alive"})).await;
    wait_result(&sub, "alive", "done").await;
    blocking(|| cell.terminate());
    blocking(|| drop(broker));
}

/// The broker is killed (SIGKILL) for 10 s mid-run and comes back: the subscriber ends
/// with every seq, in order; what was written during the outage is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_run_loses_nothing() {
    if !common::mqtt::require_mosquitto("a_broker_outage_mid_run_loses_nothing") {
        return;
    }
    let mut broker = blocking(|| TestBroker::mosquitto(&BrokerOptions::default()));
    let port = broker.port();
    let (sub, mut cell) = signed_workcell(port, "bf/v1/#", "outage-observer").await;
    let run_id = start_to_prompt(port, &sub, "o1", "40 min").await;
    command(
        port,
        "answer_prompt",
        json!({"cmd_id": "o2", "run_id": run_id, "step_id": "ask", "response": "ok"}),
    )
    .await;
    let id = run_id.clone();
    sub.wait_for("the wait step", Duration::from_secs(30), move |r| {
        r.iter().any(|m| {
            m.topic == topic(&format!("run/{id}/event"))
                && m.json()
                    .is_some_and(|v| v["step_id"] == "grow" && v["phase"] == "started")
        })
    })
    .await;
    let before = first_seqs(&sub.received()).len();
    blocking(|| broker.kill());
    tokio::time::sleep(Duration::from_secs(10)).await;
    blocking(|| broker.restart());
    let received = wait_run_state(&sub, &run_id, "completed", 120).await;
    let last = assert_seq_complete(&received, 1);
    assert!(
        last as usize > before + 20,
        "too little was written during the outage"
    );
    assert!(
        received
            .iter()
            .any(|m| m.json().is_some_and(|v| v["replayed"] == true)),
        "nothing was marked replayed"
    );
    blocking(|| cell.terminate());
}

/// The controller is killed (SIGKILL) with messages still in its outbox; when
/// it starts again they are delivered, marked replayed, and seq goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_delivers_its_outbox_when_started_again() {
    if !common::mqtt::require_mosquitto(
        "a_killed_controller_delivers_its_outbox_when_started_again",
    ) {
        return;
    }
    let mut broker = blocking(|| TestBroker::mosquitto(&BrokerOptions::default()));
    let port = broker.port();
    let sub = Subscriber::start(port, "bf/v1/#", "restart-observer").await;
    let mut cell = Workcell::new(port, "");
    cell.start();
    sub.wait_for("telemetry", Duration::from_secs(30), |r| {
        r.iter().any(|m| m.topic == topic("device/br1/telemetry"))
    })
    .await;
    // The broker goes away; telemetry piles up in the outbox; then SIGKILL.
    blocking(|| broker.stop());
    tokio::time::sleep(Duration::from_secs(3)).await;
    blocking(|| cell.kill());
    let outbox = cell.data().join("data").join("mqtt-outbox.sqlite");
    let conn = rusqlite::Connection::open(&outbox).expect("outbox");
    let unsent: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM outbox WHERE seq IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .expect("count");
    drop(conn);
    assert!(unsent >= 5, "only {unsent} messages were left unsent");
    blocking(|| broker.restart());
    cell.start();
    let received = sub
        .wait_for(
            "replayed telemetry and new telemetry",
            Duration::from_secs(60),
            move |r| {
                let replayed = r
                    .iter()
                    .filter(|m| m.json().is_some_and(|v| v["replayed"] == true))
                    .count();
                replayed as i64 >= unsent && first_seqs(r).len() as i64 > unsent + 10
            },
        )
        .await;
    assert_seq_complete(&received, 1);
    blocking(|| cell.terminate());
}

/// TLS with a CA made for the test, and a username and password: the
/// controller connects; the password appears neither in its log nor on MQTT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_password_connect_and_the_password_stays_secret() {
    if !common::mqtt::require_mosquitto("tls_and_a_password") {
        return;
    }
    let password = "s3cret-Pa55word-for-the-test";
    let broker = blocking(|| {
        TestBroker::mosquitto(&BrokerOptions {
            tls: true,
            users: vec![
                ("ctl".into(), password.into()),
                ("mes".into(), "mes-pw".into()),
            ],
            ..BrokerOptions::default()
        })
    });
    let port = broker.port();
    let ca = broker.ca_file();
    let mut options = common::mqtt::client_options(port, "tls-observer");
    options.set_credentials("mes", "mes-pw");
    options.set_transport(common::mqtt::tls_transport(&ca));
    let sub = Subscriber::start_with(options, "bf/v1/#").await;
    let mut cell = Workcell::new(
        port,
        &format!(
            "username = \"ctl\"\npassword_file = \"password\"\ntls = true\nca_file = \"{}\"",
            ca.display()
        ),
    );
    std::fs::write(cell.data().join("password"), format!("{password}\n")).expect("password");
    cell.start();
    let received = sub
        .wait_for("telemetry over TLS", Duration::from_secs(30), |r| {
            r.iter().any(|m| m.topic == topic("device/br1/telemetry"))
        })
        .await;
    blocking(|| cell.terminate());
    assert!(!cell.log().contains(password), "the password is in the log");
    for m in &received {
        assert!(
            !String::from_utf8_lossy(&m.payload).contains(password),
            "the password is on {}",
            m.topic
        );
    }
    // A wrong password is refused: the controller keeps trying, says why, and never says the password.
    let mut wrong = Workcell::new(
        port,
        &format!(
            "username = \"ctl\"\npassword_file = \"password\"\ntls = true\nca_file = \"{}\"",
            ca.display()
        ),
    );
    std::fs::write(wrong.data().join("password"), "not-the-password").expect("password");
    wrong.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    blocking(|| wrong.terminate());
    let log = wrong.log();
    assert!(
        log.contains("refused") || log.contains("cannot reach") || log.contains("broker"),
        "{log}"
    );
    assert!(!log.contains("not-the-password"), "{log}");
}

/// The broker restarts empty (the embedded broker keeps nothing): the
/// controller re-publishes its retained state, so a new subscriber sees the
/// controller, its description and its devices. A killed controller is `lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_is_published_again_after_a_reconnect_and_the_will_says_lost() {
    let mut broker = blocking(TestBroker::embedded);
    let port = broker.port();
    let mut cell = Workcell::new(port, "");
    cell.start();
    let first = Subscriber::start(port, "bf/v1/#", "first-look").await;
    wait_ready(&first).await;
    drop(first);
    blocking(|| broker.kill());
    tokio::time::sleep(Duration::from_secs(1)).await;
    blocking(|| broker.restart());
    // Connects after the controller is back; only retained messages tell it the state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = Subscriber::start(port, "bf/v1/#", "late-joiner").await;
    let received = late
        .wait_for("retained state", Duration::from_secs(30), |r| {
            let retained = |t: &str| r.iter().any(|m| m.retain && m.topic == topic(t));
            retained("$state") && retained("$description") && retained("device/br1/$state")
        })
        .await;
    let description = received
        .iter()
        .find(|m| m.topic == topic("$description"))
        .and_then(|m| m.json())
        .unwrap_or(Value::Null);
    let devices = description["devices"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(devices.len(), 3, "{description}");
    assert!(
        description["commands"]
            .as_array()
            .is_some_and(|c| c.len() == 12 && c.contains(&json!("set_setpoint")))
    );
    // SIGKILL: no `disconnected`; the broker publishes the will.
    blocking(|| cell.kill());
    late.wait_for("$state lost", Duration::from_secs(30), |r| {
        r.iter()
            .any(|m| m.topic == topic("$state") && m.payload == b"lost")
    })
    .await;
}

/// `embedded = true`: the controller is its own broker; MES connects to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workcell_without_a_broker_runs_its_own() {
    let port = common::mqtt::free_port();
    let mut cell = Workcell::new(port, "embedded = true");
    cell.start();
    // Bounded: the subscriber retries until the controller's broker listens.
    let sub = Subscriber::start(port, "bf/v1/#", "mes-on-embedded").await;
    sub.wait_for(
        "telemetry from the embedded broker",
        Duration::from_secs(30),
        |r| r.iter().any(|m| m.topic == topic("device/tm1/telemetry")),
    )
    .await;
    let status = blocking(|| cell.terminate());
    assert!(status.is_some_and(|s| s.success()), "{}", cell.log());
}

/// `biofoundry run --lab` with `[mqtt]` publishes the run like `serve` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_publishes_when_the_lab_has_mqtt() {
    let broker = blocking(|| TestBroker::start(BrokerKind::Embedded));
    let port = broker.port();
    let sub = Subscriber::start(port, "bf/v1/#", "run-observer").await;
    let cell = Workcell::new(port, "");
    let protocol_file = cell.data().join("no_prompt.toml");
    let text = protocol("5 min").replace(
        "[[step]]\nid = \"ask\"\ndo = \"prompt\"\nmessage = \"Add the inoculum, then confirm.\"\n",
        "",
    );
    std::fs::write(&protocol_file, text).expect("protocol");
    let lab = cell.lab.clone();
    let out = blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_biofoundry"))
            .args(["run", "--lab"])
            .arg(&lab)
            .arg(&protocol_file)
            .stdin(Stdio::null())
            .output()
            .expect("run")
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let received = sub
        .wait_for("completed run", Duration::from_secs(30), |r| {
            r.iter().any(|m| {
                m.topic.contains("/run/")
                    && m.topic.ends_with("/$state")
                    && m.json().is_some_and(|v| v["state"] == "completed")
            })
        })
        .await;
    assert!(received.iter().any(|m| m.topic.ends_with("/event")));
    assert_seq_complete(&received, 1);
    blocking(|| drop(broker));
}

/// SIGTERM with a run in progress: the run is aborted (its devices go to their
/// safe states), the outbox is flushed, and the controller says `disconnected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_aborts_the_active_run_and_says_disconnected() {
    let broker = blocking(TestBroker::embedded);
    let port = broker.port();
    let (sub, mut cell) = signed_workcell(port, "bf/v1/#", "sigterm-observer").await;
    let run_id = start_to_prompt(port, &sub, "t1", "8 h").await;
    let status = blocking(|| cell.terminate());
    assert!(status.is_some_and(|s| s.success()), "{}", cell.log());
    let received = wait_run_state(&sub, &run_id, "aborted", 10).await;
    let states = run_states(&received, &run_id);
    assert_eq!(
        states.last().map(String::as_str),
        Some("aborted"),
        "{states:?}"
    );
    sub.wait_for("disconnected", Duration::from_secs(10), |r| {
        r.iter()
            .any(|m| m.topic == topic("$state") && m.payload == b"disconnected")
    })
    .await;
    assert_seq_complete(&sub.received(), 1);
    blocking(|| drop(broker));
}

/// A command the broker kept (published with retain) would run again at every
/// reconnect: the controller refuses it when the broker delivers it from its store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_command_is_refused() {
    let broker = blocking(TestBroker::embedded);
    let port = broker.port();
    let retained = signed_command("republish", &json!({"cmd_id": "ret1"}), KEY.as_bytes());
    publish(port, &topic("cmd/republish"), retained.as_bytes(), true).await;
    let (sub, mut cell) = signed_workcell(port, "bf/v1/#", "retained-observer").await;
    let r = wait_result(&sub, "ret1", "rejected").await;
    assert!(
        r["reason"].as_str().unwrap_or("").contains("retained"),
        "{r}"
    );
    blocking(|| cell.terminate());
    blocking(|| drop(broker));
}

/// A controller killed with SIGKILL while its run waits for the operator is
/// started again: it takes the run up by itself, says so on the run's event
/// topic, asks the question again, and the run completes without repeating
/// the step that had completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_resumes_its_run_at_start_up() {
    if !common::mqtt::require_mosquitto("a_killed_controller_resumes_its_run_at_start_up") {
        return;
    }
    let broker = blocking(|| TestBroker::mosquitto(&BrokerOptions::default()));
    let port = broker.port();
    let (sub, mut cell) = signed_workcell(port, "bf/v1/#", "resume-observer").await;
    let run_id = start_to_prompt(port, &sub, "resume-1", "2 min").await;
    blocking(|| cell.kill());

    cell.start();
    let events = topic(&format!("run/{run_id}/event"));
    let t = events.clone();
    let received = sub
        .wait_for("resumed", Duration::from_secs(60), move |r| {
            r.iter()
                .any(|m| m.topic == t && m.json().is_some_and(|v| v["action"] == "resumed"))
        })
        .await;
    let resumed = received
        .iter()
        .rev()
        .find_map(|m| {
            (m.topic == events)
                .then(|| m.json())
                .flatten()
                .filter(|v| v["action"] == "resumed")
        })
        .expect("resumed event");
    assert!(
        resumed["detail"]
            .as_str()
            .is_some_and(|d| d.contains("1 steps already completed")),
        "{resumed}"
    );
    // The question is asked again; answered, the run completes.
    let t = events.clone();
    sub.wait_for("the prompt again", Duration::from_secs(30), move |r| {
        r.iter()
            .filter(|m| {
                m.topic == t
                    && m.json()
                        .is_some_and(|v| v["action"] == "prompt" && v["phase"] == "started")
            })
            .count()
            >= 2
    })
    .await;
    command(
        port,
        "answer_prompt",
        json!({"cmd_id": "resume-2", "run_id": run_id, "step_id": "ask", "response": "ok"}),
    )
    .await;
    let received = wait_run_state(&sub, &run_id, "completed", 60).await;
    let warm_completed = received
        .iter()
        .filter(|m| {
            m.topic == topic(&format!("run/{run_id}/event"))
                && m.json().is_some_and(|v| {
                    v["step_id"] == "warm" && v["phase"] == "completed" && v["replayed"] != true
                })
        })
        .count();
    assert_eq!(warm_completed, 1, "the completed step ran once");
    blocking(|| cell.terminate());
}

/// `set_setpoint` from MES goes through the same driver as a run: limits and
/// the profile's interlocks refuse before anything is sent; no setpoint is
/// written while a run is active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setpoint_commands_respect_limits_interlocks_and_runs() {
    let broker = blocking(TestBroker::embedded);
    let port = broker.port();
    let (sub, mut cell) = signed_workcell(port, "bf/v1/#", "setpoint-observer").await;
    let set = |cmd_id: &'static str, device: &'static str, setpoint: &'static str, value: Value| {
        command(
            port,
            "set_setpoint",
            json!({"cmd_id": cmd_id, "device": device, "setpoint": setpoint, "value": value}),
        )
    };
    set("sp-latch", "hs1", "speed", json!("500 rpm")).await;
    let r = wait_result(&sub, "sp-latch", "rejected").await;
    let reason = r["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("interlock `latch_closed_to_shake`")
            && reason.contains("latch is `unknown`"),
        "{r}"
    );
    set("sp-limit", "tm1", "temperature", json!("120 C")).await;
    let r = wait_result(&sub, "sp-limit", "rejected").await;
    assert!(
        r["reason"].as_str().is_some_and(|m| m.contains("limits")),
        "{r}"
    );
    set("sp-unknown", "tm9", "temperature", json!("20 C")).await;
    wait_result(&sub, "sp-unknown", "rejected").await;
    set("sp-ok", "tm1", "temperature", json!("37 C")).await;
    let r = wait_result(&sub, "sp-ok", "done").await;
    assert_eq!(r["reason"], "tm1.temperature = 37 C", "{r}");
    assert_eq!(statuses(&sub.received(), "sp-latch"), ["rejected"]);
    // $description tells MES the interlocks.
    let description = sub
        .received()
        .iter()
        .rev()
        .find(|m| m.topic == topic("$description"))
        .and_then(|m| m.json())
        .unwrap_or(Value::Null);
    let hs = description["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == "hs1"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(hs["interlocks"][0]["id"], "latch_closed_to_shake", "{hs}");
    assert_eq!(hs["interlocks"][0]["requires"]["latch"], "closed", "{hs}");
    assert_eq!(hs["interlocks"][0]["guards"]["setpoint"], "speed", "{hs}");

    // While a run is active its protocol owns the setpoints.
    let run_id = start_to_prompt(port, &sub, "sp-run", "1 min").await;
    set("sp-busy", "tm1", "temperature", json!("30 C")).await;
    let r = wait_result(&sub, "sp-busy", "rejected").await;
    assert!(
        r["reason"].as_str().is_some_and(|m| m.contains(&run_id)),
        "{r}"
    );
    // `retry` and `skip` are for a run held for a failed step, not a running one.
    command(port, "retry", json!({"cmd_id": "sp-retry"})).await;
    let r = wait_result(&sub, "sp-retry", "rejected").await;
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|m| m.contains("cannot retry")),
        "{r}"
    );
    command(port, "skip", json!({"cmd_id": "sp-skip"})).await;
    wait_result(&sub, "sp-skip", "rejected").await;
    blocking(|| cell.terminate());
}
