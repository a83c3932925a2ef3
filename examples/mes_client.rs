//! A small MES client: starts one run on a `biofoundry serve` controller over
//! MQTT and follows it to the end.
//!
//! What it does, in order:
//! - subscribes to `R/#` (QoS 1) on every CONNACK, so a reconnect loses nothing
//!   it could still get;
//! - publishes `R/cmd/start_run` with a fresh `cmd_id` (`mes-<unix ms>-<n>`)
//!   and an `expires_at` 60 s ahead, signed when `--key-file` is given;
//! - prints every `cmd_result` of its commands, the run's `$state` and events
//!   (one line each: seq, step, phase), and telemetry compactly;
//! - answers every operator prompt (an event with action `prompt`, phase
//!   `started`) with `answer_prompt`, response `--answer` (default `done`);
//! - checks the controller's `seq` for gaps and duplicates and reports them
//!   (retained state the controller re-publishes on reconnecting repeats its
//!   old `seq`: counted apart); messages replayed after an outage are marked.
//!
//! Exit status: 0 when the run completes, 1 when it ends failed, aborted or
//! stopped, 2 when the start is rejected or nothing ends within `--timeout`.
//!
//! Against a local `serve` (the lab's clock runs 60 times faster, so
//! heat_shock_transformation takes about 2 minutes):
//!
//! ```text
//! mosquitto -p 1883 &
//! cargo run -- serve --lab examples/mqtt-lab.toml &
//! cargo run --example mes_client -- --host 127.0.0.1 --port 1883 \
//!     --root bf/v1/demo/mqtt-cell/sim-1 --protocol heat_shock_transformation
//! ```
//!
//! Parameters override the protocol's (`--param volume="20 uL"`, repeatable);
//! `--operator` names who starts the run; `--timeout` (600 s) bounds the wait.
//! When the lab sets `[mqtt] command_key_file`, pass the same file with
//! `--key-file`: commands are then sent as HMAC-signed envelopes.

use biofoundry::mqtt::command::{load_command_key, sign};
use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Map, Value, json};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(about = "Start a run on a biofoundry controller over MQTT and follow it")]
struct Args {
    /// The broker's host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The broker's port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// The controller's topic root: bf/v1/<site>/<cell>/<controller_id>.
    #[arg(long, default_value = "bf/v1/demo/mqtt-cell/sim-1")]
    root: String,
    /// A protocol from the controller's library, by name.
    #[arg(long)]
    protocol: String,
    /// A parameter override, `name=value` (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = name_value)]
    params: Vec<(String, String)>,
    /// The lab's command key: commands are signed with it.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The response to every operator prompt.
    #[arg(long, default_value = "done")]
    answer: String,
    /// Who starts the run (`operator` in start_run).
    #[arg(long)]
    operator: Option<String>,
    /// Give up (exit 2) when the run has not ended after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

fn name_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("`{s}` is not name=value")),
    }
}

/// What the event-loop task reports.
enum Net {
    Connected,
    Message {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    Disconnected,
}

/// Polls rumqttc for ever (it reconnects on the next poll after an error).
async fn poll(mut eventloop: rumqttc::EventLoop, tx: mpsc::UnboundedSender<Net>) {
    loop {
        let net = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => Net::Connected,
            Ok(Event::Incoming(Packet::Publish(p))) => Net::Message {
                topic: p.topic,
                payload: p.payload.to_vec(),
                retain: p.retain,
            },
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let _ = tx.send(Net::Disconnected);
                return;
            }
            Ok(_) => continue,
            Err(e) => {
                eprintln!("mqtt: {e}; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if tx.send(net).is_err() {
            return;
        }
    }
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Tracks the controller's `seq`: one more per message, no gaps, no repeats.
///
/// On every reconnect the controller re-publishes its retained state (run
/// `$state`, alarms) as it was first sent, `seq` included: a repeat on such a
/// topic is counted as re-published state, not as a duplicate.
#[derive(Default)]
struct SeqCheck {
    first: Option<u64>,
    last: Option<u64>,
    seen: HashSet<u64>,
    gaps: u64,
    late: u64,
    duplicates: u64,
    republished: u64,
}

impl SeqCheck {
    fn check(&mut self, seq: u64, topic: &str, replayed: bool, state_topic: bool) {
        let tag = if replayed { " (replayed)" } else { "" };
        let first = *self.first.get_or_insert(seq);
        let last = self.last.unwrap_or(seq);
        let repeat = !self.seen.insert(seq);
        if state_topic && (repeat || seq < first) {
            self.republished += 1;
            println!("   seq {seq}: re-published retained state on {topic}");
        } else if repeat {
            self.duplicates += 1;
            println!("!! seq {seq} seen again{tag} on {topic}");
        } else if seq > last + 1 {
            self.gaps += 1;
            println!(
                "!! seq gap: {} missing before {seq} on {topic}",
                seq - last - 1
            );
        } else if seq < last {
            self.late += 1;
            println!("!! seq {seq} arrived late{tag} (after {last}) on {topic}");
        }
        self.last = Some(last.max(seq));
    }

    fn summary(&self) -> String {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return "no message with a seq".to_string();
        };
        let got = self
            .seen
            .iter()
            .filter(|s| (first..=last).contains(*s))
            .count() as u64;
        format!(
            "seq {first}..{last}: {} missing, {} gap(s), {} late, {} duplicate(s), \
             {} re-published retained state",
            last - first + 1 - got,
            self.gaps,
            self.late,
            self.duplicates,
            self.republished
        )
    }
}

struct Client {
    mqtt: AsyncClient,
    root: String,
    key: Option<Vec<u8>>,
    /// cmd_ids this client sent.
    sent: HashSet<String>,
    /// Those without a final result (done, rejected, failed) yet.
    pending: HashSet<String>,
}

impl Client {
    /// Publishes a command (QoS 1, not retained); returns its cmd_id.
    async fn command(&mut self, verb: &str, mut body: Map<String, Value>) -> String {
        let cmd_id = format!("mes-{}-{}", unix_ms(), self.sent.len());
        let expires = SystemTime::now() + Duration::from_secs(60);
        body.insert("cmd_id".into(), cmd_id.clone().into());
        body.insert(
            "expires_at".into(),
            humantime::format_rfc3339_millis(expires).to_string().into(),
        );
        let text = Value::Object(body).to_string();
        let payload = match &self.key {
            Some(key) => sign(verb, &text, key),
            None => text,
        };
        let topic = format!("{}/cmd/{verb}", self.root);
        if let Err(e) = self
            .mqtt
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            eprintln!("cannot queue {verb}: {e}");
        }
        self.sent.insert(cmd_id.clone());
        self.pending.insert(cmd_id.clone());
        cmd_id
    }

    /// Prints a result of one of this client's commands; returns its status.
    fn result<'a>(&mut self, n: &str, cmd: &str, body: &'a Value) -> &'a str {
        let status = text(body, "status");
        let reason = body.get("reason").and_then(Value::as_str);
        println!(
            "[{n}] cmd_result {cmd}: {status}{}",
            reason.map_or(String::new(), |r| format!(" ({r})"))
        );
        if status != "accepted" {
            self.pending.remove(cmd);
        }
        status
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `ph=7.01 pH, temperature=37.0 C`
fn compact_values(values: &Value) -> String {
    let Some(map) = values.as_object() else {
        return String::new();
    };
    map.iter()
        .map(|(name, q)| {
            let v = q.get("v").and_then(Value::as_f64).unwrap_or(f64::NAN);
            let unit = text(q, "unit");
            if unit.is_empty() {
                format!("{name}={v:.3}")
            } else {
                format!("{name}={v:.3} {unit}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let key = match &args.key_file {
        Some(path) => match load_command_key(path) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let root = args.root.trim_end_matches('/').to_string();
    let mut options = MqttOptions::new(
        format!("mes-client-{}-{}", std::process::id(), unix_ms()),
        &args.host,
        args.port,
    );
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true)
        // `$description` of a large lab is bigger than rumqttc's 10 kB default.
        .set_max_packet_size(4 << 20, 4 << 20);
    let (mqtt, eventloop) = AsyncClient::new(options, 64);
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(poll(eventloop, tx));

    let mut client = Client {
        mqtt,
        root: root.clone(),
        key,
        sent: HashSet::new(),
        pending: HashSet::new(),
    };
    let prefix = format!("{root}/");
    let mut start_cmd: Option<String> = None;
    let mut run_id: Option<String> = None;
    let mut prompts_open: HashSet<String> = HashSet::new();
    let mut seq = SeqCheck::default();
    let deadline = tokio::time::sleep(Duration::from_secs(args.timeout));
    tokio::pin!(deadline);

    let code: u8 = 'run: loop {
        let net = tokio::select! {
            net = rx.recv() => match net {
                Some(n) => n,
                None => break 'run 2,
            },
            _ = &mut deadline => {
                println!("timeout: the run did not end within {} s", args.timeout);
                break 'run 2;
            }
        };
        let (topic, payload, retain) = match net {
            Net::Connected => {
                println!(
                    "connected to {}:{}; subscribing to {root}/#",
                    args.host, args.port
                );
                if let Err(e) = client
                    .mqtt
                    .subscribe(format!("{root}/#"), QoS::AtLeastOnce)
                    .await
                {
                    eprintln!("cannot subscribe: {e}");
                }
                if start_cmd.is_none() {
                    let mut body = Map::new();
                    body.insert("protocol".into(), args.protocol.clone().into());
                    if !args.params.is_empty() {
                        let params: Map<String, Value> = args
                            .params
                            .iter()
                            .map(|(n, v)| (n.clone(), Value::String(v.clone())))
                            .collect();
                        body.insert("params".into(), Value::Object(params));
                    }
                    if let Some(op) = &args.operator {
                        body.insert("operator".into(), op.clone().into());
                    }
                    let id = client.command("start_run", body).await;
                    println!("start_run {} sent as {id}", args.protocol);
                    start_cmd = Some(id);
                }
                continue;
            }
            Net::Disconnected => continue,
            Net::Message {
                topic,
                payload,
                retain,
            } => (topic, payload, retain),
        };
        let Some(rest) = topic.strip_prefix(&prefix) else {
            continue;
        };
        let levels: Vec<&str> = rest.split('/').collect();
        let body: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
        // Retained messages are the last value, not news: no seq check.
        let number = body.get("seq").and_then(Value::as_u64);
        let replayed = body
            .get("replayed")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let (Some(n), false) = (number, retain) {
            let state_topic = topic.ends_with("/$state") || levels.first() == Some(&"alarm");
            seq.check(n, &topic, replayed, state_topic);
        }
        let n = number.map_or("-".to_string(), |n| n.to_string());
        let old = match (retain, replayed) {
            (true, _) => " (retained)",
            (false, true) => " (replayed)",
            (false, false) => "",
        };
        match levels.as_slice() {
            ["$state"] => println!("controller: {}{old}", String::from_utf8_lossy(&payload)),
            ["$description"] => println!(
                "description: {} devices, protocols {}{old}",
                body["devices"].as_array().map_or(0, Vec::len),
                body["protocols"]
            ),
            // The busy/ready churn of a run is left out; faults and the state on
            // connecting are not.
            ["device", device, "$state"]
                if retain || !matches!(&payload[..], b"busy" | b"ready") =>
            {
                println!(
                    "device {device}: {}{old}",
                    String::from_utf8_lossy(&payload)
                )
            }
            ["device", device, "telemetry"] => {
                println!("[{n}] {device}: {}{old}", compact_values(&body["values"]))
            }
            ["alarm", alarm] if !payload.is_empty() => println!(
                "[{n}] alarm {alarm}: {} {} {}{old}",
                text(&body, "state"),
                text(&body, "severity"),
                text(&body, "message")
            ),
            ["cmd_result", cmd] if client.sent.contains(*cmd) => {
                let status = client.result(&n, cmd, &body);
                if Some(*cmd) == start_cmd.as_deref() {
                    match status {
                        "accepted" | "done" if run_id.is_none() => {
                            run_id = body
                                .get("run_id")
                                .and_then(Value::as_str)
                                .map(str::to_string);
                            if let Some(r) = &run_id {
                                println!("run {r} started");
                            }
                        }
                        // A start that was accepted stays accepted (a resent
                        // command is rejected as a duplicate).
                        "rejected" | "failed" if run_id.is_none() => break 'run 2,
                        _ => {}
                    }
                }
            }
            ["run", r, "$state"] if Some(*r) == run_id.as_deref() => {
                let state = text(&body, "state");
                let step = body.get("step").and_then(Value::as_str).unwrap_or("-");
                let reason = body.get("reason").and_then(Value::as_str);
                println!(
                    "[{n}] run {state} (step {step}){}{old}",
                    reason.map_or(String::new(), |r| format!(": {r}"))
                );
                match state {
                    "completed" => break 'run 0,
                    "failed" | "aborted" | "stopped" => break 'run 1,
                    _ => {}
                }
            }
            ["run", r, "event"] if Some(*r) == run_id.as_deref() => {
                let step = text(&body, "step_id");
                let action = text(&body, "action");
                let phase = text(&body, "phase");
                let detail = body.get("detail").and_then(Value::as_str);
                println!(
                    "[{n}] step {step} {action} {phase}{}{old}",
                    detail.map_or(String::new(), |d| format!(": {d}"))
                );
                if action == "prompt" && phase == "started" && prompts_open.insert(step.to_string())
                {
                    let answer = object(json!({
                        "run_id": r,
                        "step_id": step,
                        "response": args.answer,
                    }));
                    let id = client.command("answer_prompt", answer).await;
                    println!("     answered `{}` as {id}", args.answer);
                } else if action == "prompt" && phase != "started" {
                    prompts_open.remove(step);
                }
            }
            _ => {}
        }
    };

    // The answer to the last prompt may come after the run's end: wait briefly.
    let linger = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(linger);
    while !client.pending.is_empty() {
        let net = tokio::select! {
            net = rx.recv() => net,
            _ = &mut linger => break,
        };
        match net {
            Some(Net::Message {
                topic,
                payload,
                retain: false,
            }) => {
                let cmd = topic.strip_prefix(&format!("{prefix}cmd_result/"));
                let body: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                if let Some(n) = body.get("seq").and_then(Value::as_u64) {
                    seq.check(n, &topic, false, topic.ends_with("/$state"));
                    if let Some(cmd) = cmd.filter(|c| client.sent.contains(*c)) {
                        client.result(&n.to_string(), cmd, &body);
                    }
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    println!("seq check: {}", seq.summary());
    // Say goodbye so the broker does not wait for the keep-alive; bounded.
    if client.mqtt.disconnect().await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(net) = rx.recv().await {
                if matches!(net, Net::Disconnected) {
                    break;
                }
            }
        })
        .await;
    }
    ExitCode::from(code)
}
