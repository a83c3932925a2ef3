//! The soak: 72 hours of lab time on a simulated workcell under random
//! faults, through the real `biofoundry serve` process (docs/reliability.md).
//!
//! - **The workcell.** A lab file like `examples/sim-workcell.toml`: a G-code
//!   liquid handler, an Opentrons temperature module and a Liconic incubator on
//!   serial lines, and a bioreactor made of parts — pH, DO and OD probes and a
//!   Eurotherm on one RS-485 Modbus RTU line, a Watson-Marlow feed pump and an
//!   Alicat MFC on serial lines, an Agrowtek base pump behind a Modbus TCP
//!   gateway. Its clock runs `SPEED` times faster. The simulators are served by
//!   this test process (pseudo-terminals and a loopback TCP port; the liquid
//!   handler's by the test itself, so that an operator can take a tip off its
//!   head), so the controller reaches them over the same wires as real
//!   instruments, and faults are injected here.
//! - **The work.** MES starts one run at a time, "shifts" of 6 lab hours until
//!   72 lab hours have passed: each shift holds the fed-batch culture
//!   (temperature and air set, warm-up wait, the feed at a constant rate,
//!   hourly samples, a temperature monitor that holds the run and a pH/DO
//!   monitor that raises alarms) and, beside it, a plate workflow (temperature
//!   module set, 32 tip-per-well transfers, the plate loaded into the
//!   incubator, incubated, unloaded, a prompt answered over MQTT, stored
//!   again). The first shift asks for the inoculum. The culture lives in the
//!   simulators, so it grows on through all shifts.
//! - **The faults.** Every 8–50 lab minutes (about one per 0.7 s of real
//!   instrument I/O, which does not speed up): reply timeouts, garbage replies
//!   (corrupt frames on Modbus), Modbus busy answers, an instrument or a whole
//!   line unplugged for 0.2–1.5 s; mosquitto killed (SIGKILL) and restarted 5
//!   times; the controller killed (SIGKILL) 3 times while a run is running and
//!   started again, which takes the run up by itself. A seeded xorshift draws
//!   the schedule (`SOAK_SEED=N` for another one; `SOAK_ONLY=lh1,inc1` faults
//!   only those devices; `SOAK_KEEP=1` keeps the lab folder with `soak.log`,
//!   every MQTT message, the journal and serve's log). The schedule is
//!   reproducible; its interleaving with the controller's I/O is not.
//! - **The operator** (MES over MQTT, signed commands): answers every prompt;
//!   holds half the shifts once and resumes them; answers a held run with
//!   `resume`, or, when a step failed (a fault the retry policy could not
//!   absorb, or an operation whose outcome a controller restart left
//!   unknown), checks the reason and answers `retry` (a tip picked up by the
//!   uncertain operation is taken off the head by hand first); if trying
//!   again is refused because the operation had happened, `skip`. A run that
//!   failed before its first step (a device did not connect in 3 attempts)
//!   is started again 2 s later.
//!
//! Checked: every run ends `completed`, or `failed` before its first step
//! because a faulted device could not be connected. Every `retry` answers a
//! hold whose reason names a faulted device with what went wrong (not a
//! refusal of the controller's own bookkeeping) or the uncertain operation.
//! No run is taken up again after it ended or while it was aborting or
//! stopping. Every controller kill is followed by the `resumed` event (or
//! the run had ended). A step is skipped only after it was tried again
//! or after an uncertain or skipped operation. No panic
//! in the controller's log; `runs verify` passes for every run; the observer
//! saw every `seq` from 1 to the last, in order. The counts are printed at
//! the end.

mod common;

use biofoundry::clock::Clock;
use biofoundry::lab::{self, LabDevice, SimBacking, SimulatedWorkcell};
use biofoundry::sim::{SimOptions, SimTiming};
use biofoundry::source::SourceFile;
use biofoundry::wiresim::{Fault, FaultHandle, PtyHost, SerialSimulator, Times, physics_for};
use common::mqtt::{
    BrokerOptions, Received, TestBroker, client_options, free_port, publish, signed_command,
};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Lab seconds per real second, on both sides of the wires.
const SPEED: f64 = 2500.0;
/// Lab time the soak covers.
const LAB_HOURS: f64 = 72.0;
/// Lab hours of one run (the feed and the sampling of a shift).
const SHIFT_HOURS: u32 = 6;
/// Lab minutes between two device faults: uniform in this range.
const FAULT_EVERY_MIN: (f64, f64) = (8.0, 50.0);
/// A reply fault not taken by a request within this (real time) is dropped:
/// line noise happens at a moment, it does not wait for the next command.
const FAULT_WINDOW: Duration = Duration::from_secs(1);
const BROKER_RESTARTS: usize = 5;
const CONTROLLER_KILLS: usize = 3;
/// Real seconds an unplugged instrument or line stays away.
const UNPLUGGED_S: (f64, f64) = (0.2, 1.5);
/// Real seconds a killed broker or controller stays away.
const BROKER_DOWN_S: (f64, f64) = (2.0, 5.0);
const CONTROLLER_DOWN_S: (f64, f64) = (1.0, 3.0);
/// The whole soak must end within this (real time), or it fails.
const REAL_LIMIT: Duration = Duration::from_secs(7 * 60);
/// How long MES waits before it starts a shift again whose run failed before
/// any step (real time).
const RESTART_AFTER_FAILED_START: Duration = Duration::from_secs(2);
/// At most this many runs (start_run accepted), whatever the lab time.
const MAX_RUNS: usize = 80;
const DEFAULT_SEED: u64 = 20_261_129;

const KEY: &str = "soak-test-command-key-0123456789";
const ROOT: &str = "bf/v1/soak/cell/ctl";
/// The devices a held run's reason may name.
const DEVICES: [&str; 4] = ["lh1", "tm1", "inc1", "br1"];

// ------------------------------------------------------------------ random

/// xorshift64: small, seeded, the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in `lo..hi`.
    fn between(&mut self, (lo, hi): (f64, f64)) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * unit
    }

    fn chance(&mut self, p: f64) -> bool {
        self.between((0.0, 1.0)) < p
    }
}

// ------------------------------------------------------------------ faults

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    /// No reply: the controller's reply timeout runs out.
    Timeout,
    /// Bytes that are not a reply (serial), a frame with a bad CRC or length (Modbus).
    Garbage,
    /// Modbus exception 06 (server busy).
    Busy,
    /// One instrument unplugged for a while (its PTY or TCP connections go away).
    Disconnect,
    /// A whole line unplugged: the RS-485 adapter or the Modbus TCP gateway.
    LineDisconnect,
    /// mosquitto killed with SIGKILL, restarted a few seconds later.
    BrokerRestart,
    /// The controller killed with SIGKILL while a run is active, then started again.
    ControllerKill,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Timeout => "reply timeout",
            Kind::Garbage => "garbage reply",
            Kind::Busy => "busy reply",
            Kind::Disconnect => "instrument unplugged",
            Kind::LineDisconnect => "line unplugged",
            Kind::BrokerRestart => "broker SIGKILL + restart",
            Kind::ControllerKill => "controller SIGKILL + restart",
        }
    }
}

/// Where a device fault can go, and which faults make sense there.
struct Target {
    /// The instrument id (`br1.ph`), line name, or `lh1` (served by the test itself).
    name: String,
    /// The lab device the controller knows it as.
    device: &'static str,
    kinds: &'static [Kind],
}

fn targets(rs485: &str, gateway: &str) -> Vec<Target> {
    use Kind::*;
    let t = |name: &str, device, kinds| Target {
        name: name.to_string(),
        device,
        kinds,
    };
    vec![
        // The G-code machine's reply timeout is 30 s (a long move ends with
        // M400): a missed reply there would stall the soak for nothing.
        t("lh1", "lh1", &[Garbage, Disconnect]),
        t("tm1", "tm1", &[Timeout, Garbage, Disconnect]),
        t("inc1", "inc1", &[Timeout, Garbage, Disconnect]),
        t("br1.ph", "br1", &[Timeout, Garbage, Busy]),
        t("br1.dissolved_oxygen", "br1", &[Timeout, Garbage, Busy]),
        t("br1.od600", "br1", &[Timeout, Garbage, Busy]),
        t("br1.temperature", "br1", &[Timeout, Garbage, Busy]),
        t("br1.base", "br1", &[Timeout, Garbage, Busy]),
        t("br1.feed", "br1", &[Timeout, Garbage, Disconnect]),
        t("br1.airflow", "br1", &[Timeout, Garbage, Disconnect]),
        t(rs485, "br1", &[LineDisconnect]),
        t(gateway, "br1", &[LineDisconnect]),
    ]
}

fn is_modbus(target: &str) -> bool {
    matches!(
        target,
        "br1.ph" | "br1.dissolved_oxygen" | "br1.od600" | "br1.temperature" | "br1.base"
    )
}

// ------------------------------------------------------------------ files

fn lab_text(tty: &Path, mqtt_port: u16, gateway_port: u16, seed: u64, lh: &str) -> String {
    let tty = tty.display();
    format!(
        r#"format = "biofoundry.lab/1"
[controller]
site = "soak"
cell = "cell"
id = "ctl"
data_dir = "data"
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
keep_alive = "2 s"
command_key_file = "command.key"
[telemetry]
every = "1 s"
[simulation]
speed = {SPEED}
seed = {seed}
[[device]]
id = "lh1"
profile = "gcode-liquid-handler"
transport = "{lh}"
[[device]]
id = "tm1"
profile = "opentrons-temperature-module"
transport = "serial://{tty}/tm1"
[[device]]
id = "inc1"
profile = "liconic-stx"
transport = "serial://{tty}/inc1"
[[device]]
id = "br1"
kind = "bioreactor"
[device.parts.ph]
profile = "hamilton-arc-ph"
transport = "modbus-rtu://{tty}/rs485?baud=19200&stop=2&unit=1"
[device.parts.dissolved_oxygen]
profile = "hamilton-visiferm-do"
transport = "modbus-rtu://{tty}/rs485?baud=19200&stop=2&unit=2"
[device.parts.od600]
profile = "hamilton-arc-od"
transport = "modbus-rtu://{tty}/rs485?baud=19200&stop=2&unit=4"
[device.parts.temperature]
profile = "eurotherm-3200"
transport = "modbus-rtu://{tty}/rs485?baud=19200&stop=2&unit=3"
[device.parts.base]
profile = "agrowtek-pump"
transport = "modbus-tcp://127.0.0.1:{gateway_port}?unit=1"
settings = {{ channel = 1 }}
[device.parts.feed]
profile = "watson-marlow-520"
transport = "serial://{tty}/feed"
[device.parts.airflow]
profile = "alicat-mfc"
transport = "serial://{tty}/airflow"
"#
    )
}

/// One shift: the fed-batch culture for `SHIFT_HOURS` and, in parallel, the
/// plate workflow with its plate in incubator slot `slot`. Every step retries
/// (instrument faults are expected); the first shift asks for the inoculum.
fn shift_protocol(shift: u32, slot: u32) -> String {
    let inoculate = if shift == 1 {
        r#"
[[step]]
id = "inoculate"
do = "prompt"
message = "Inoculate the vessel with 50 mL seed culture, then confirm."
"#
    } else {
        ""
    };
    format!(
        r#"format = "biofoundry.protocol/1"

[protocol]
name = "soak shift {shift}"
version = "1.0.0"
on_error = "retry"
retries = 8

[devices]
br = "bioreactor"
lh = "liquid_handler"
tm = "temperature_module"
inc = "incubator"

[labware.tips]
type = "opentrons_96_tiprack_300ul"
at = "lh:1"

[labware.source]
type = "nest_12_reservoir_15ml"
at = "lh:2"
contents = {{ A1 = "10 mL buffer", A2 = "10 mL dye" }}

[labware.plate]
type = "corning_96_wellplate_360ul_flat"
at = "lh:3"

# The culture: conditions, warm-up, feed, hourly samples for the shift.
[[step]]
id = "conditions"
do = "br.set"
temperature = "37 C"
airflow = "1 L/min"

[[step]]
id = "at_temperature"
do = "wait_until"
condition = "br.temperature >= 36.5 C"
poll = "1 min"
timeout = "2 h"
{inoculate}
[[step]]
id = "feed"
do = "br.feed"
pump = "feed"
rate = "0.1 mL/min"
duration = "{SHIFT_HOURS} h"

[[step]]
id = "hourly_samples"
do = "br.sample"
after = ["feed"]
read = ["od600", "ph", "dissolved_oxygen", "temperature"]
repeat = {{ times = {SHIFT_HOURS}, every = "1 h" }}

[[step]]
id = "feeding"
do = "wait"
after = ["feed"]
duration = "{SHIFT_HOURS} h"

# The plate workflow, beside the culture.
[[step]]
id = "cool"
do = "tm.set_temperature"
after = ["conditions"]
temperature = "4 C"
wait = false

[[step]]
id = "buffer"
do = "lh.transfer"
from = "source:A1"
to = "plate:A1:H2"
volume = "40 uL"
tips = "always"

[[step]]
id = "store"
do = "inc.load"
labware = "plate"
slot = {slot}

[[step]]
id = "incubate"
do = "wait"
duration = "2 h"

[[step]]
id = "fetch"
do = "inc.unload"
labware = "plate"
to = "lh:3"

[[step]]
id = "dye"
do = "lh.transfer"
from = "source:A2"
to = "plate:A1:H1"
volume = "25 uL"
tips = "always"

[[step]]
id = "mix"
do = "lh.transfer"
from = "plate:A1:H1"
to = "plate:A3:H3"
volume = "30 uL"
tips = "always"

[[step]]
id = "check_plate"
do = "prompt"
message = "Look at the plate: dye in rows A1:H1 and A3:H3? Then confirm."

[[step]]
id = "put_away"
do = "inc.load"
labware = "plate"
slot = {slot}

[[monitor]]
id = "process"
device = "br"
read = ["temperature"]
every = "10 min"
limits = {{ temperature = "35..39 C" }}
on_violation = "hold"
after = "at_temperature"

[[monitor]]
id = "watch"
device = "br"
read = ["ph", "dissolved_oxygen"]
every = "10 min"
limits = {{ ph = "5.5..8.5", dissolved_oxygen = "5..100 %" }}
on_violation = "alarm"
"#
    )
}

// ------------------------------------------------------------------ observer

/// An MES observer on `bf/v1/#`: a persistent session (the broker keeps its
/// messages while it is away), resubscribing on every ConnAck, recording every
/// message. The soak reads what is new with [`Observer::take_new`].
struct Observer {
    received: Arc<Mutex<Vec<Received>>>,
    cursor: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    async fn start(port: u16) -> Observer {
        let (client, mut eventloop) = AsyncClient::new(client_options(port, "soak-observer"), 1000);
        let received = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(Mutex::new(false));
        let task = {
            let received = received.clone();
            let subscribed = subscribed.clone();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = client.try_subscribe("bf/v1/#", QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            *subscribed.lock().unwrap() = true;
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            received.lock().unwrap().push(Received {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                            });
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !*subscribed.lock().unwrap() {
            assert!(Instant::now() < deadline, "the observer got no SubAck");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Observer {
            received,
            cursor: 0,
            task,
        }
    }

    fn take_new(&mut self) -> Vec<Received> {
        let all = self.received.lock().unwrap();
        let new = all[self.cursor..].to_vec();
        self.cursor = all.len();
        new
    }

    fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every message carrying `seq`, first arrivals in arrival order (as in tests/mqtt.rs).
fn first_seqs(received: &[Received]) -> Vec<u64> {
    let mut seen = BTreeSet::new();
    received
        .iter()
        .filter(|r| !r.retain)
        .filter_map(|r| r.json()?.get("seq")?.as_u64())
        .filter(|s| seen.insert(*s))
        .collect()
}

/// The `seq` numbers missing from `1..=last`, and those that first arrived
/// after a higher one.
fn seq_report(received: &[Received]) -> (u64, Vec<u64>, Vec<u64>) {
    let seqs = first_seqs(received);
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    let last = sorted.last().copied().unwrap_or(0);
    let missing = (1..=last)
        .filter(|s| sorted.binary_search(s).is_err())
        .collect();
    let mut highest = 0;
    let mut late = Vec::new();
    for s in seqs {
        if s < highest {
            late.push(s);
        }
        highest = highest.max(s);
    }
    (last, missing, late)
}

// ------------------------------------------------------------------ the soak

#[derive(Debug, Default)]
struct RunRecord {
    shift: u32,
    run_id: String,
    /// seq → (state, reason, when), in seq order.
    states: BTreeMap<u64, (String, Option<String>, Option<SystemTime>)>,
    /// Held states already answered by the operator (their seq).
    answered_holds: HashSet<u64>,
    /// Prompts asked (seq of the `started` event) and answered.
    prompts: BTreeMap<u64, String>,
    answered_prompts: HashSet<u64>,
    /// `resumed` events (seq, detail).
    resumed: Vec<(u64, String)>,
    /// How each hold was answered: (reason, answer).
    holds: Vec<(String, String)>,
    steps_started: usize,
    retries: usize,
    final_ts: Option<SystemTime>,
}

impl RunRecord {
    fn current(&self) -> Option<(u64, &str, Option<&str>)> {
        self.states
            .iter()
            .next_back()
            .map(|(seq, (s, r, _))| (*seq, s.as_str(), r.as_deref()))
    }

    /// The first final state: a run that ended never runs again.
    fn final_state(&self) -> Option<&str> {
        self.states
            .values()
            .map(|(s, _, _)| s.as_str())
            .find(|s| is_final(s))
    }

    /// States published after the first final one (a run taken up again).
    fn after_final(&self) -> Vec<&str> {
        self.states
            .values()
            .map(|(s, _, _)| s.as_str())
            .skip_while(|s| !is_final(s))
            .skip(1)
            .collect()
    }

    /// The reason the run could not connect a device, if that is how it failed.
    fn connect_failure(&self) -> Option<&str> {
        self.states
            .values()
            .filter_map(|(_, r, _)| r.as_deref())
            .find(|r| r.contains("could not be connected"))
    }
}

fn is_final(state: &str) -> bool {
    matches!(state, "completed" | "stopped" | "aborted" | "failed")
}

/// A child process killed (SIGKILL) and reaped when dropped, also when the
/// soak fails half-way.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Kill {
    run_id: String,
    at: SystemTime,
    lab_h: f64,
}

struct Soak {
    seed: u64,
    rng: Rng,
    clock: Clock,
    /// The lab folder: lab file, key, PTY links, data (journal, outbox), serve's log.
    dir: PathBuf,
    /// Removes `dir` at the end, unless `SOAK_KEEP` is set.
    _tmp: Option<tempfile::TempDir>,
    lab_path: PathBuf,
    /// Owns the broker's folder (config, persistence) and its first process.
    broker: TestBroker,
    /// The broker after a restart.
    broker_child: Option<Reaped>,
    port: u16,
    observer: Observer,
    workcell: SimulatedWorkcell,
    /// The lab file as the controller reads it.
    wired: lab::LabFile,
    lh: Arc<SerialSimulator>,
    lh_host: Option<PtyHost>,
    targets: Vec<Target>,
    serve: Option<Reaped>,
    serve_starts: u32,
    ready_seen: usize,

    // the schedule
    next_fault_s: f64,
    broker_restarts_at: Vec<f64>,
    controller_kills_at: Vec<f64>,
    broker_down_until: Option<Instant>,
    controller_down_until: Option<Instant>,
    operator_hold_at: Option<f64>,

    // what happened
    injected: BTreeMap<Kind, usize>,
    injected_per_target: BTreeMap<String, usize>,
    faulted_devices: HashSet<&'static str>,
    kills: Vec<Kill>,
    runs: Vec<RunRecord>,
    /// Records of runs seen on MQTT before their `start_run` was answered.
    unclaimed: HashMap<String, RunRecord>,
    /// The work the next start_run is for.
    shift: u32,
    /// When MES saw the last run end.
    ended_at: Option<Instant>,
    /// No kill before this (the controller's last start plus a while).
    kill_not_before: Instant,
    /// No broker kill before this.
    broker_not_before: Instant,
    seen_seqs: HashSet<u64>,
    results: HashMap<String, Vec<Value>>,
    commands_sent: usize,
    command_resends: usize,
    alarms_raised: usize,
    /// Messages of `safe-state` alarms: a device that did not reach its safe state.
    safe_state_alarms: Vec<String>,
    device_fault_states: usize,
    replayed: usize,
    /// Telemetry messages per device (polled, and run samples).
    telemetry: BTreeMap<String, usize>,
    /// Reply faults to drop when their window ends.
    expiries: Vec<(Instant, FaultHandle)>,
    operator_holds: usize,
    tips_removed: usize,
    started: Instant,
}

impl Soak {
    async fn new(seed: u64) -> Soak {
        let tmp = tempfile::Builder::new()
            .prefix("bf-soak-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let tmp = if std::env::var_os("SOAK_KEEP").is_some() {
            eprintln!("soak: keeping {}", tmp.keep().display());
            None
        } else {
            Some(tmp)
        };
        let tty = dir.join("tty");
        std::fs::create_dir_all(&tty).expect("tty dir");
        std::fs::write(dir.join("command.key"), KEY).expect("key file");
        let broker = tokio::task::block_in_place(|| {
            TestBroker::mosquitto(&BrokerOptions {
                persistence: true,
                ..BrokerOptions::default()
            })
        });
        let port = broker.port();
        let gateway = free_port();
        let lab_path = dir.join("lab.toml");
        let lh_path = tty.join("lh1");
        let text = lab_text(
            &tty,
            port,
            gateway,
            seed,
            &format!("serial://{}", lh_path.display()),
        );
        std::fs::write(&lab_path, &text).expect("lab file");
        let parse = |text: String| {
            let (lab, diagnostics) = lab::parse(SourceFile::new(&lab_path, text));
            assert!(diagnostics.iter().all(|d| !d.is_error()), "{diagnostics:?}");
            lab.expect("the lab file parses")
        };
        let wired = parse(text);
        // The test serves the liquid handler itself, so that an operator can
        // take a tip off its head; `serve_lab` serves the rest (it skips sim://).
        let rest = parse(lab_text(&tty, port, gateway, seed, "sim://"));
        let clock = Clock::new(SPEED);
        let backing = SimBacking {
            clock,
            options: SimOptions {
                seed,
                timing: SimTiming::Realistic,
            },
        };
        let workcell = lab::serve_lab(&rest, &backing)
            .await
            .expect("the simulators start");
        let Some(LabDevice::Instrument(lh)) = wired.devices.get("lh1").cloned() else {
            panic!("lh1 is an instrument");
        };
        let physics = physics_for(&lh.profile, "lh1", clock, backing.options.clone(), None)
            .expect("lh1 physics");
        let lh_sim = Arc::new(SerialSimulator::new(
            lh.profile.clone(),
            physics,
            lh.settings.clone(),
            clock,
        ));
        let lh_host = PtyHost::serial(lh_sim.clone(), Some(lh_path))
            .await
            .expect("lh1 on a PTY");
        let started = Instant::now();
        {
            // soak.log: when the liquid handler's PTY goes away and comes back.
            let mut path = lh_host.watch_path();
            let log = dir.join("soak.log");
            tokio::spawn(async move {
                while path.changed().await.is_ok() {
                    let now = path.borrow_and_update().clone();
                    let line = format!(
                        "{:>8.3} s  lab {:>7.3} h  lh1 PTY: {:?}\n",
                        started.elapsed().as_secs_f64(),
                        clock.now_s() / 3600.0,
                        now.and_then(|p| std::fs::read_link(p).ok())
                    );
                    use std::io::Write;
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                    {
                        let _ = f.write_all(line.as_bytes());
                    }
                }
            });
        }
        let rs485 = tty.join("rs485").display().to_string();
        let targets = targets(&rs485, &format!("127.0.0.1:{gateway}"));
        for t in &targets {
            assert!(
                t.name == "lh1"
                    || workcell.faults.contains_key(&t.name)
                    || workcell.line_faults.contains_key(&t.name),
                "no simulator for {}: {:?}",
                t.name,
                workcell.endpoints
            );
        }
        let observer = Observer::start(port).await;

        let mut rng = Rng::new(seed);
        let mut at = |n: usize, (lo, hi): (f64, f64)| {
            let mut v: Vec<f64> = (0..n).map(|_| rng.between((lo, hi)) * 3600.0).collect();
            v.sort_by(f64::total_cmp);
            v.reverse(); // popped from the end
            v
        };
        let broker_restarts_at = at(BROKER_RESTARTS, (1.0, LAB_HOURS - 4.0));
        let controller_kills_at = at(CONTROLLER_KILLS, (3.0, LAB_HOURS - 8.0));
        let next_fault_s = rng.between(FAULT_EVERY_MIN) * 60.0;
        Soak {
            seed,
            rng,
            clock,
            dir,
            _tmp: tmp,
            lab_path,
            broker,
            broker_child: None,
            port,
            observer,
            workcell,
            wired,
            lh: lh_sim,
            lh_host: Some(lh_host),
            targets,
            serve: None,
            serve_starts: 0,
            ready_seen: 0,
            next_fault_s,
            broker_restarts_at,
            controller_kills_at,
            broker_down_until: None,
            controller_down_until: None,
            operator_hold_at: None,
            injected: BTreeMap::new(),
            injected_per_target: BTreeMap::new(),
            faulted_devices: HashSet::new(),
            kills: Vec::new(),
            runs: Vec::new(),
            unclaimed: HashMap::new(),
            shift: 0,
            ended_at: None,
            kill_not_before: started,
            broker_not_before: started,
            seen_seqs: HashSet::new(),
            results: HashMap::new(),
            commands_sent: 0,
            command_resends: 0,
            alarms_raised: 0,
            safe_state_alarms: Vec::new(),
            device_fault_states: 0,
            replayed: 0,
            telemetry: BTreeMap::new(),
            expiries: Vec::new(),
            operator_holds: 0,
            tips_removed: 0,
            started,
        }
    }

    /// One line in `soak.log` (lab folder): what the soak did and when.
    fn note(&self, what: &str) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("soak.log"))
        {
            let _ = writeln!(
                f,
                "{:>8.3} s  lab {:>7.3} h  {what}",
                self.started.elapsed().as_secs_f64(),
                self.lab_hours()
            );
        }
    }

    fn lab_hours(&self) -> f64 {
        self.clock.now_s() / 3600.0
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("serve.log")
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn start_serve(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("serve log");
        let child = Command::new(env!("CARGO_BIN_EXE_biofoundry"))
            .args(["serve", "--lab"])
            .arg(&self.lab_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("serve starts");
        self.serve = Some(Reaped(child));
        self.serve_starts += 1;
    }

    /// SIGKILL to mosquitto: the first process (TestBroker's) or a restarted one.
    fn kill_broker(&mut self) {
        match self.broker_child.take() {
            Some(c) => drop(c),
            None => self.broker.kill(),
        }
    }

    /// mosquitto again, with TestBroker's config, port and persistence. (The
    /// simulators' PTYs are close-on-exec, so neither mosquitto nor `serve`
    /// holds an "unplugged" instrument's line open.)
    fn restart_broker(&mut self) {
        self.kill_broker();
        let dir = self.broker.dir().to_path_buf();
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .expect("broker log")
        };
        let program = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .unwrap_or("mosquitto");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new(program)
                .arg("-c")
                .arg(dir.join("mosquitto.conf"))
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(log("stdout.log"))
                .stderr(log("stderr.log"))
                .spawn()
                .expect("mosquitto starts");
            while Instant::now() < deadline {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    self.broker_child = Some(Reaped(child));
                    return;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port is not free yet: again
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "mosquitto did not restart on port {}:\n{}",
                self.port,
                self.broker.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill_serve(&mut self) {
        drop(self.serve.take());
    }

    /// SIGTERM and a bounded wait for the clean exit.
    fn terminate_serve(&mut self) -> bool {
        let Some(mut serve) = self.serve.take() else {
            return false;
        };
        let c = &mut serve.0;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false // killed when `serve` is dropped
    }

    fn up(&self) -> bool {
        self.broker_down_until.is_none() && self.controller_down_until.is_none()
    }

    fn check_deadline(&self, what: &str) {
        if self.started.elapsed() > REAL_LIMIT {
            let last = self.runs.last().map(|r| {
                format!(
                    "run {} (shift {}): states {:?}; holds answered {:?}",
                    r.run_id,
                    r.shift,
                    r.states
                        .values()
                        .map(|(s, why, _)| format!("{s}: {}", why.as_deref().unwrap_or("")))
                        .collect::<Vec<_>>(),
                    r.holds
                )
            });
            panic!(
                "the soak took longer than {REAL_LIMIT:?} ({what}, lab hour {:.1}, seed {}); \
                 the last run: {}\nserve's log:\n{}",
                self.lab_hours(),
                self.seed,
                last.unwrap_or_default(),
                self.log_tail(60)
            );
        }
    }

    // ---- messages

    /// Reads what the observer received since the last call.
    fn pump(&mut self) {
        for m in self.observer.take_new() {
            self.message(m);
        }
    }

    fn message(&mut self, m: Received) {
        if m.retain {
            return; // copies of retained state on (re)subscription
        }
        let Some(rest) = m.topic.strip_prefix(ROOT).and_then(|r| r.strip_prefix('/')) else {
            return;
        };
        if rest == "$state" {
            if m.payload == b"ready" {
                self.ready_seen += 1;
            }
            return;
        }
        if let Some(device) = rest
            .strip_prefix("device/")
            .and_then(|r| r.strip_suffix("/$state"))
        {
            if m.payload == b"fault" && !device.is_empty() {
                self.device_fault_states += 1;
            }
            return;
        }
        let Some(v) = m.json() else {
            return;
        };
        if v["replayed"] == true {
            self.replayed += 1;
        }
        let Some(seq) = v["seq"].as_u64() else {
            return;
        };
        if !self.seen_seqs.insert(seq) {
            return; // a QoS 1 duplicate or a replay of what was seen
        }
        if let Some(cmd_id) = rest.strip_prefix("cmd_result/") {
            self.results.entry(cmd_id.to_string()).or_default().push(v);
            return;
        }
        if let Some(device) = rest
            .strip_prefix("device/")
            .and_then(|r| r.strip_suffix("/telemetry"))
        {
            *self.telemetry.entry(device.to_string()).or_default() += 1;
            return;
        }
        if let Some(alarm) = rest.strip_prefix("alarm/") {
            if v["state"] == "active" {
                self.alarms_raised += 1;
                if alarm == "safe-state" {
                    let message = v["message"].as_str().unwrap_or("").to_string();
                    self.safe_state_alarms.push(message);
                }
            }
            return;
        }
        let Some(run) = rest.strip_prefix("run/") else {
            return;
        };
        let Some((run_id, what)) = run.split_once('/') else {
            return;
        };
        // A run's first states may arrive before `start_run` is answered.
        let record = match self.runs.iter().position(|r| r.run_id == run_id) {
            Some(i) => &mut self.runs[i],
            None => self
                .unclaimed
                .entry(run_id.to_string())
                .or_insert_with(|| RunRecord {
                    run_id: run_id.to_string(),
                    ..RunRecord::default()
                }),
        };
        match what {
            "$state" => {
                let state = v["state"].as_str().unwrap_or("").to_string();
                let reason = v["reason"].as_str().map(str::to_string);
                let ts = v["ts"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339(t).ok());
                if is_final(&state) && record.final_ts.is_none() {
                    record.final_ts = ts;
                }
                record.states.insert(seq, (state, reason, ts));
            }
            "event" => {
                let step = v["step_id"].as_str().unwrap_or("");
                match (v["action"].as_str(), v["phase"].as_str()) {
                    (Some("prompt"), Some("started")) => {
                        record.prompts.insert(seq, step.to_string());
                    }
                    (Some("resumed"), _) => record
                        .resumed
                        .push((seq, v["detail"].as_str().unwrap_or("").to_string())),
                    (_, Some("retrying")) => record.retries += 1,
                    (_, Some("started")) if !step.is_empty() => record.steps_started += 1,
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// The final answer to a command: `done` or `failed`, or `rejected` for
    /// another reason than a duplicate (a resend of a command that arrived).
    fn answer_to(&self, cmd_id: &str) -> Option<Value> {
        let results = self.results.get(cmd_id)?;
        results
            .iter()
            .find(|v| v["status"] == "done" || v["status"] == "failed")
            .or_else(|| {
                results.iter().find(|v| {
                    v["status"] == "rejected"
                        && !v["reason"]
                            .as_str()
                            .is_some_and(|r| r.starts_with("duplicate cmd_id"))
                })
            })
            .cloned()
    }

    /// A signed MES command, sent until it is answered (at least once, never
    /// run twice: a resend has the same `cmd_id`). Only while the broker and
    /// the controller are up.
    async fn command(&mut self, verb: &str, mut body: Value) -> Value {
        self.commands_sent += 1;
        let cmd_id = format!("soak-{}-{verb}", self.commands_sent);
        body["cmd_id"] = json!(cmd_id);
        self.note(&format!("MES {verb} {cmd_id}"));
        let payload = signed_command(verb, &body, KEY.as_bytes());
        let topic = format!("{ROOT}/cmd/{verb}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            publish(self.port, &topic, payload.as_bytes(), false).await;
            let resend = Instant::now() + Duration::from_secs(5);
            while Instant::now() < resend {
                self.device_faults();
                self.pump();
                if let Some(v) = self.answer_to(&cmd_id) {
                    self.note(&format!("MES {cmd_id}: {v}"));
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                Instant::now() < deadline,
                "no answer to {verb} {cmd_id} within 60 s; serve's log:\n{}",
                self.log_tail(40)
            );
            self.command_resends += 1;
        }
    }

    // ---- faults

    /// One fault: a device drawn first (each as likely), then one of its
    /// instruments or lines, then a fault that instrument can have.
    fn inject_device_fault(&mut self) {
        // SOAK_ONLY=lh1,inc1 limits the faults to those devices (to chase one).
        let only = std::env::var("SOAK_ONLY").unwrap_or_default();
        let devices: Vec<&'static str> = DEVICES
            .into_iter()
            .filter(|d| only.is_empty() || only.split(',').any(|o| o == *d))
            .collect();
        let device = devices[self.rng.below(devices.len())];
        let of_device: Vec<usize> = (0..self.targets.len())
            .filter(|&i| self.targets[i].device == device)
            .collect();
        let i = of_device[self.rng.below(of_device.len())];
        let (name, device, kinds) = {
            let t = &self.targets[i];
            (t.name.clone(), t.device, t.kinds)
        };
        // An unplugged instrument is rarer than a bad reply.
        let weights: Vec<usize> = kinds
            .iter()
            .map(|k| match k {
                Kind::Disconnect => 1,
                _ => 3,
            })
            .collect();
        let mut pick = self.rng.below(weights.iter().sum());
        let mut choice = 0;
        while pick >= weights[choice] {
            pick -= weights[choice];
            choice += 1;
        }
        let kind = kinds[choice];
        let (fault, times) = match kind {
            Kind::Timeout => (Fault::NoReply, Times::Next(1)),
            Kind::Garbage if is_modbus(&name) => {
                let fault = if self.rng.chance(0.5) {
                    Fault::Corrupt
                } else {
                    Fault::Garbage
                };
                (fault, Times::Next(1 + self.rng.below(2) as u32))
            }
            Kind::Garbage => (Fault::Garbage, Times::Next(1 + self.rng.below(2) as u32)),
            Kind::Busy => (Fault::Busy, Times::Next(1 + self.rng.below(3) as u32)),
            Kind::Disconnect | Kind::LineDisconnect => (
                Fault::Disconnect(Duration::from_secs_f64(self.rng.between(UNPLUGGED_S))),
                Times::Next(1),
            ),
            Kind::BrokerRestart | Kind::ControllerKill => unreachable!("not a device fault"),
        };
        let handle: FaultHandle = if name == "lh1" {
            self.lh.faults()
        } else {
            self.workcell
                .faults
                .get(&name)
                .or_else(|| self.workcell.line_faults.get(&name))
                .cloned()
                .expect("a fault handle")
        };
        handle.inject(fault, times);
        self.note(&format!("fault {name}: {fault:?} {times:?}"));
        if !matches!(fault, Fault::Disconnect(_)) {
            self.expiries
                .push((Instant::now() + FAULT_WINDOW, handle.clone()));
        }
        *self.injected.entry(kind).or_default() += 1;
        *self.injected_per_target.entry(name).or_default() += 1;
        self.faulted_devices.insert(device);
    }

    fn current_run(&self) -> Option<&RunRecord> {
        self.runs.last().filter(|r| r.final_state().is_none())
    }

    /// The device faults due now, and the end of those whose window passed.
    /// Also while MES waits for an answer, so that faults come on time.
    fn device_faults(&mut self) {
        let now_s = self.clock.now_s();
        let now = Instant::now();
        self.expiries.retain(|(at, handle)| {
            if *at > now {
                return true;
            }
            // Clearing would also end a disconnection: that one ends by itself.
            if !handle.is_offline() {
                handle.clear();
            }
            false
        });
        while now_s >= self.next_fault_s {
            self.inject_device_fault();
            self.next_fault_s += self.rng.between(FAULT_EVERY_MIN) * 60.0;
        }
    }

    /// Faults, outages and restarts due now.
    fn schedule(&mut self) {
        self.device_faults();
        let now_s = self.clock.now_s();
        let now = Instant::now();
        if let Some(until) = self.broker_down_until
            && Instant::now() >= until
        {
            tokio::task::block_in_place(|| self.restart_broker());
            self.broker_down_until = None;
            self.broker_not_before = Instant::now() + Duration::from_secs(5);
            self.note("broker restarted");
        }
        if let Some(until) = self.controller_down_until
            && Instant::now() >= until
        {
            self.start_serve();
            self.controller_down_until = None;
            self.kill_not_before = Instant::now() + Duration::from_secs(10);
            self.note("controller started again");
        }
        if self.broker_restarts_at.last().is_some_and(|t| now_s >= *t)
            && self.broker_down_until.is_none()
            && now >= self.broker_not_before
        {
            self.broker_restarts_at.pop();
            tokio::task::block_in_place(|| self.kill_broker());
            self.note("broker killed");
            let down = self.rng.between(BROKER_DOWN_S);
            self.broker_down_until = Some(Instant::now() + Duration::from_secs_f64(down));
            *self.injected.entry(Kind::BrokerRestart).or_default() += 1;
        }
        // A controller is killed only while a run is active (as seen by MES).
        if self.controller_kills_at.last().is_some_and(|t| now_s >= *t)
            && self.controller_down_until.is_none()
            && now >= self.kill_not_before
            && let Some(run) = self.current_run()
            && run
                .current()
                .is_some_and(|(_, state, _)| state == "running")
        {
            let run_id = run.run_id.clone();
            self.controller_kills_at.pop();
            self.kill_serve();
            self.note(&format!("controller killed during run {run_id}"));
            self.kills.push(Kill {
                run_id,
                at: SystemTime::now(),
                lab_h: self.lab_hours(),
            });
            let down = self.rng.between(CONTROLLER_DOWN_S);
            self.controller_down_until = Some(Instant::now() + Duration::from_secs_f64(down));
            *self.injected.entry(Kind::ControllerKill).or_default() += 1;
        }
    }

    // ---- the operator

    async fn start_shift(&mut self) {
        // A run that failed before any step (a device did not connect) did
        // nothing: MES starts the same work again.
        let again = self
            .runs
            .last()
            .is_some_and(|r| r.final_state() == Some("failed") && r.steps_started == 0);
        if !again {
            self.shift += 1;
        }
        let shift = self.shift;
        let slot = (shift - 1) % 44 + 1;
        let protocol = shift_protocol(shift, slot);
        loop {
            let r = self
                .command(
                    "start_run",
                    json!({"protocol_toml": protocol, "operator": "soak"}),
                )
                .await;
            if r["status"] == "done" {
                let run_id = r["run_id"].as_str().expect("run_id").to_string();
                let mut record = self.unclaimed.remove(&run_id).unwrap_or_default();
                record.shift = shift;
                record.run_id = run_id;
                self.runs.push(record);
                // Half the shifts get an operator hold at a random time.
                self.operator_hold_at = self.rng.chance(0.5).then(|| {
                    self.clock.now_s()
                        + self.rng.between((0.5, f64::from(SHIFT_HOURS) - 1.0)) * 3600.0
                });
                return;
            }
            let reason = r["reason"].as_str().unwrap_or("");
            assert!(
                reason.contains("already active"),
                "start_run of shift {shift} refused: {r}"
            );
            // The previous run has ended but the controller has not joined it yet.
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.check_deadline("starting a shift");
        }
    }

    /// Answers prompts and held states of the current run.
    async fn operate(&mut self) {
        let Some(i) = self.runs.len().checked_sub(1) else {
            return;
        };
        let run_id = self.runs[i].run_id.clone();
        // Prompts: each asked prompt once (a resumed run asks again).
        let open: Vec<(u64, String)> = self.runs[i]
            .prompts
            .iter()
            .filter(|(seq, _)| !self.runs[i].answered_prompts.contains(seq))
            .map(|(s, p)| (*s, p.clone()))
            .collect();
        for (seq, step) in open {
            self.runs[i].answered_prompts.insert(seq);
            let r = self
                .command(
                    "answer_prompt",
                    json!({"run_id": run_id, "step_id": step, "response": "ok"}),
                )
                .await;
            // A prompt asked before a restart may have been asked again meanwhile.
            assert!(
                r["status"] == "done" || r["status"] == "rejected",
                "answer_prompt: {r}"
            );
        }
        let Some((seq, state, reason)) = self.runs[i]
            .current()
            .map(|(s, st, r)| (s, st.to_string(), r.map(str::to_string)))
        else {
            return;
        };
        if state == "held" && !self.runs[i].answered_holds.contains(&seq) {
            self.runs[i].answered_holds.insert(seq);
            let reason = reason.unwrap_or_default();
            let r = self.command("resume", json!({})).await;
            if r["status"] == "done" {
                self.runs[i].holds.push((reason, "resume".into()));
                return;
            }
            let refusal = r["reason"].as_str().unwrap_or("").to_string();
            if refusal.contains("no run is active") || refusal.contains("is running") {
                return; // the state moved on meanwhile
            }
            assert!(
                refusal.contains("a step failed"),
                "resume of held run {run_id} refused for another reason: {r}"
            );
            // The operator checks what failed. A tip picked up by an operation
            // whose outcome was unknown is taken off the head by hand; then the
            // step is tried again. If the step fails again right after it was
            // tried again (the uncertain operation had happened: a tip already
            // dropped, a plate already out of its slot), or failed three
            // times, it is skipped; so is a step the controller refuses (a
            // consequence of a skipped one: the plate is not where the deck
            // model has it).
            let step = held_step(&reason);
            let retried_last = self.runs[i]
                .holds
                .last()
                .is_some_and(|(why, a)| a == "retry" && held_step(why) == step);
            let retries = self.runs[i]
                .holds
                .iter()
                .filter(|(why, a)| a == "retry" && held_step(why) == step)
                .count();
            let verb = if retried_last || retries >= 3 || reason.contains(" refused: ") {
                "skip"
            } else {
                "retry"
            };
            if verb == "retry" && reason.contains("(pick up tip ") {
                self.clear_head().await;
            }
            let r = self.command(verb, json!({})).await;
            if r["status"] != "done" {
                let refusal = r["reason"].as_str().unwrap_or("");
                assert!(
                    refusal.contains("no run is active") || refusal.contains("is running"),
                    "{verb} of held run {run_id}: {r}"
                );
                return;
            }
            self.runs[i].holds.push((reason, verb.into()));
            return;
        }
        if matches!(state.as_str(), "running")
            && self
                .operator_hold_at
                .is_some_and(|t| self.clock.now_s() >= t)
        {
            self.operator_hold_at = None;
            let r = self.command("hold", json!({})).await;
            if r["status"] == "done" {
                self.operator_holds += 1;
            }
        }
    }

    /// The feed pump's rate (mL/min) as its driver reads it over its wire, once
    /// the controller has exited; `None` if it does not answer.
    async fn feed_pump_rate(&self) -> Option<f64> {
        use biofoundry::device::Device;
        let backing = SimBacking {
            clock: self.clock,
            options: SimOptions {
                seed: self.seed,
                timing: SimTiming::Realistic,
            },
        };
        let runtime = lab::connect_lab(&self.wired, &backing).ok()?;
        let pump = runtime.instruments.get("br1.feed")?.clone();
        for _ in 0..5 {
            let read = async {
                pump.connect().await?;
                pump.read("rate").await
            };
            if let Ok(Ok(q)) = tokio::time::timeout(Duration::from_secs(5), read).await {
                return Some(q.value);
            }
        }
        None
    }

    /// A tip a stopped run left on the pipette head is taken off by hand.
    async fn clear_head(&mut self) {
        if self.lh.gcode_state().await.is_some_and(|m| m.has_tip()) {
            self.lh.restore_tip(None).await;
            self.tips_removed += 1;
        }
    }

    async fn run(&mut self) {
        self.start_serve();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ready_seen == 0 {
            assert!(
                Instant::now() < deadline,
                "serve never became ready:\n{}",
                self.log_tail(40)
            );
            self.pump();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        loop {
            self.check_deadline("running shifts");
            self.schedule();
            self.pump();
            if !self.up() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            match self.runs.last().map(|r| r.final_state().is_some()) {
                None => self.start_shift().await,
                Some(true) => {
                    self.clear_head().await;
                    if self.lab_hours() >= LAB_HOURS || self.runs.len() >= MAX_RUNS {
                        break;
                    }
                    // After a run that could not connect its devices, MES
                    // waits a little before it tries again.
                    let failed_at_start = self
                        .runs
                        .last()
                        .is_some_and(|r| r.final_state() == Some("failed") && r.steps_started == 0);
                    let ended = *self.ended_at.get_or_insert_with(Instant::now);
                    if failed_at_start && ended.elapsed() < RESTART_AFTER_FAILED_START {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    self.ended_at = None;
                    self.start_shift().await;
                }
                Some(false) => self.operate().await,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The step a hold's reason names (`step `fetch` failed: …`).
fn held_step(reason: &str) -> Option<&str> {
    let (_, rest) = reason.split_once("step `")?;
    rest.split_once('`').map(|(step, _)| step)
}

/// A connect failure without its details (which bytes, which path), to count alike ones.
fn failure_kind(reason: &str) -> String {
    let reason = reason.split_once(": ").map_or(reason, |(_, r)| r);
    let mut out = String::new();
    let mut quoted = false;
    for c in reason.chars() {
        match c {
            '`' => {
                quoted = !quoted;
                if quoted {
                    out.push('…');
                }
            }
            _ if quoted => {}
            _ => out.push(c),
        }
    }
    match out.find(" cannot open ") {
        Some(i) => format!("{}cannot open its port (unplugged)", &out[..i + 1]),
        None => out,
    }
}

/// Is `reason` (a held run's) what a fault explains: a device the soak faulted,
/// named with what went wrong on its wire or what it answered, or an
/// operation whose outcome a controller restart left unknown? A refusal by
/// the controller's own model (`refused: slot 2 holds plate`) in a protocol
/// that passed `check` is a bookkeeping error, not a fault.
fn fault_reason(reason: &str, faulted: &HashSet<&'static str>) -> bool {
    if reason.contains("whether it happened is unknown") {
        return true;
    }
    let names_device = DEVICES
        .iter()
        .any(|d| reason.contains(d) && faulted.contains(d));
    names_device && !reason.contains(" refused: ")
}

/// The samples the run's `hourly_samples` step recorded, from its journal
/// (`runs export --format csv`: one row per value).
fn hourly_samples(lab: &Path, run_id: &str) -> usize {
    let out = Command::new(env!("CARGO_BIN_EXE_biofoundry"))
        .args(["runs", "export", run_id, "--format", "csv", "--lab"])
        .arg(lab)
        .output()
        .expect("runs export");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            (cols.get(4) == Some(&"hourly_samples")).then(|| cols[0].to_string())
        })
        .collect::<HashSet<_>>()
        .len()
}

/// `biofoundry runs verify RUN_ID --lab LAB`: exit 0 and its output.
fn verify(lab: &Path, run_id: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_biofoundry"))
        .args(["runs", "verify", run_id, "--lab"])
        .arg(lab)
        .output()
        .expect("runs verify");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seventy_two_lab_hours_under_faults() {
    if !common::mqtt::require_mosquitto("seventy_two_lab_hours_under_faults") {
        return;
    }
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let started = Instant::now();
    let mut soak = Soak::new(seed).await;
    soak.run().await;

    // The broker is up (a restart may be due), the last run ended: stop cleanly.
    if soak.broker_down_until.is_some() {
        tokio::task::block_in_place(|| soak.restart_broker());
        soak.broker_down_until = None;
    }
    let clean = tokio::task::block_in_place(|| soak.terminate_serve());
    // What the controller had not sent yet reaches the observer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    soak.pump();
    let real = started.elapsed();
    if soak._tmp.is_none() {
        // SOAK_KEEP: every message the observer received, for reading later.
        let text: String = soak
            .observer
            .all()
            .iter()
            .map(|m| {
                format!(
                    "{}{} {}\n",
                    m.topic,
                    if m.retain { " (retained)" } else { "" },
                    String::from_utf8_lossy(&m.payload)
                )
            })
            .collect();
        let _ = std::fs::write(soak.dir.join("mqtt.log"), text);
    }
    let lab_h = soak.lab_hours();
    // Every shift's feed runs for the shift and its `feeding` wait outlasts
    // it: with the controller gone, the pump must be standing.
    let feed_rate = soak.feed_pump_rate().await;

    // ---- the checks
    let log = std::fs::read_to_string(soak.log_path()).unwrap_or_default();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();

    let mut outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems: Vec<String> = Vec::new();
    let mut verified = 0;
    let mut hourly = 0;
    let mut retries = 0;
    let mut resumed_runs = 0;
    let mut held_reasons: Vec<String> = Vec::new();
    let mut connect_failures: Vec<String> = Vec::new();
    for r in &soak.runs {
        hourly += hourly_samples(&soak.lab_path, &r.run_id);
        retries += r.retries;
        if !r.resumed.is_empty() {
            resumed_runs += 1;
        }
        let end = r.final_state().unwrap_or("unfinished").to_string();
        let key = match (end.as_str(), r.holds.is_empty()) {
            ("completed", true) => "completed".to_string(),
            ("completed", false) if r.holds.iter().any(|(_, a)| a == "skip") => {
                "completed (a step skipped by MES)".to_string()
            }
            ("completed", false) => "completed (held, answered by MES)".to_string(),
            // A new run whose devices do not connect (3 attempts) fails before
            // its first step; MES starts the shift again. A run taken up after
            // a restart waits for its devices instead.
            ("failed", _) if r.connect_failure().is_some() => {
                let reason = r.connect_failure().unwrap_or_default();
                if !DEVICES
                    .iter()
                    .any(|d| reason.contains(d) && soak.faulted_devices.contains(d))
                {
                    problems.push(format!(
                        "shift {} could not connect a device that had no fault: {reason}",
                        r.shift
                    ));
                }
                connect_failures.push(format!("shift {}: {reason}", r.shift));
                if r.steps_started > 0 {
                    problems.push(format!(
                        "shift {} failed connecting after it had started: {reason}",
                        r.shift
                    ));
                }
                "failed connecting its devices at its start".to_string()
            }
            (other, _) => {
                problems.push(format!("shift {} ({}) ended {other}", r.shift, r.run_id));
                other.to_string()
            }
        };
        *outcome.entry(key).or_default() += 1;
        // A run that was aborting or stopping ends that way (run-states.md),
        // also when the controller was killed meanwhile.
        let states: Vec<&str> = r.states.values().map(|(s, _, _)| s.as_str()).collect();
        if let Some(k) = states
            .iter()
            .position(|s| matches!(*s, "aborting" | "stopping"))
            && states[k..].contains(&"running")
        {
            problems.push(format!(
                "run {} (shift {}) was {} and then running again: {states:?} (serve took up \
                 a run that was ending)",
                r.run_id, r.shift, states[k]
            ));
        }
        let again = r.after_final();
        if !again.is_empty() {
            problems.push(format!(
                "run {} (shift {}) ended {end} and was then taken up again: {again:?} (serve \
                 resumed a run that had ended)",
                r.run_id, r.shift
            ));
        }
        for (reason, answer) in &r.holds {
            let shown = if reason.is_empty() {
                "(no reason: an operator hold from MES)"
            } else {
                reason.as_str()
            };
            held_reasons.push(format!("shift {}: {answer}: {shown}", r.shift));
            if answer == "retry" && !fault_reason(reason, &soak.faulted_devices) {
                problems.push(format!(
                    "shift {} held with a reason that is no fault of a faulted device and no \
                     uncertain operation: {reason}",
                    r.shift
                ));
            }
        }
        // A step is skipped only after it was tried again, or as a
        // consequence of an uncertain operation or a skipped step earlier in
        // the run (the plate is not where the deck model has it).
        for (k, (reason, answer)) in r.holds.iter().enumerate() {
            let earlier = &r.holds[..k];
            let retried = earlier
                .iter()
                .any(|(why, a)| a == "retry" && held_step(why) == held_step(reason));
            let consequence = earlier
                .iter()
                .any(|(why, a)| a == "skip" || why.contains("whether it happened is unknown"));
            if answer == "skip" && !retried && !consequence {
                problems.push(format!(
                    "shift {} skipped a step the controller refused with no uncertain operation \
                     before: {reason}",
                    r.shift
                ));
            }
        }
        let (ok, out) = verify(&soak.lab_path, &r.run_id);
        if ok {
            verified += 1;
        } else {
            problems.push(format!("runs verify {} failed: {out}", r.run_id));
        }
    }
    let mut kills_resumed = 0;
    let mut kills_after_end = 0;
    for k in &soak.kills {
        let Some(r) = soak.runs.iter().find(|r| r.run_id == k.run_id) else {
            continue;
        };
        if !r.resumed.is_empty() {
            kills_resumed += 1;
        } else if r.final_ts.is_some_and(|t| t <= k.at) {
            kills_after_end += 1;
        } else {
            problems.push(format!(
                "the controller was killed at lab hour {:.1} during run {} (shift {}), which \
                 was not resumed",
                k.lab_h, r.run_id, r.shift
            ));
        }
    }
    let all = soak.observer.all();
    let (last_seq, missing, late) = seq_report(&all);

    let injected_total: usize = soak
        .injected
        .iter()
        .filter(|(k, _)| !matches!(k, Kind::BrokerRestart | Kind::ControllerKill))
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "\n==== soak: seed {seed}, speed {SPEED}, {lab_h:.1} lab hours in {:.0} s ====",
        real.as_secs_f64()
    );
    eprintln!("faults injected ({injected_total} device faults):");
    for (kind, n) in &soak.injected {
        eprintln!("  {:<30} {n}", kind.name());
    }
    eprintln!("per target: {:?}", soak.injected_per_target);
    eprintln!(
        "runs: {} for {} shifts (MES starts a shift again when its run failed before \
         any step)",
        soak.runs.len(),
        soak.shift
    );
    for (k, n) in &outcome {
        eprintln!("  {k:<40} {n}");
    }
    for h in &held_reasons {
        eprintln!("  held: {h}");
    }
    let mut grouped: BTreeMap<String, usize> = BTreeMap::new();
    for f in &connect_failures {
        *grouped.entry(failure_kind(f)).or_default() += 1;
    }
    for (f, n) in &grouped {
        eprintln!("  failed connecting ×{n}: {f}");
    }
    eprintln!(
        "controller kills: {} ({kills_resumed} runs resumed, {kills_after_end} after the run \
         had ended); runs with a resumed event: {resumed_runs}; serve started {} times",
        soak.kills.len(),
        soak.serve_starts
    );
    eprintln!(
        "steps retried: {retries}; device fault states published: {}; alarms raised: {}; \
         hourly samples: {hourly}; operator holds: {}; tips removed by hand: {}",
        soak.device_fault_states, soak.alarms_raised, soak.operator_holds, soak.tips_removed
    );
    eprintln!(
        "MQTT: seq 1..={last_seq}, {} missing, {} out of order; telemetry messages {:?}, {} \
         marked replayed; commands {} ({} resent)",
        missing.len(),
        late.len(),
        soak.telemetry,
        soak.replayed,
        soak.commands_sent,
        soak.command_resends
    );
    let last_end = soak
        .runs
        .last()
        .and_then(|r| r.final_state())
        .unwrap_or("unfinished")
        .to_string();
    eprintln!(
        "feed pump after the last shift ({last_end}): {}",
        match feed_rate {
            Some(r) if r > 0.0 => format!("still running at {r:.2} mL/min"),
            Some(r) => format!("stopped ({r} mL/min)"),
            None => "no answer".into(),
        }
    );
    // Reported, not checked: the shift's feed and its `feeding` wait end at
    // the same lab time, and the controller is stopped as soon as the run
    // completes, which may be before its timer has stopped the pump
    // (docs/reliability.md).
    for m in &soak.safe_state_alarms {
        eprintln!("  safe-state alarm: {m}");
    }
    eprintln!(
        "journals verified: {verified}/{}; clean SIGTERM: {clean}; panics: {}",
        soak.runs.len(),
        panics.len()
    );

    assert!(
        panics.is_empty(),
        "the controller panicked:\n{}",
        panics.join("\n")
    );
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
    assert!(
        missing.is_empty(),
        "seq gaps (seed {seed}): {:?}",
        &missing[..missing.len().min(50)]
    );
    assert!(
        late.is_empty(),
        "seq out of order (seed {seed}): {:?}",
        &late[..late.len().min(50)]
    );
    assert!(lab_h >= LAB_HOURS, "only {lab_h:.1} lab hours");
    assert_eq!(soak.kills.len(), CONTROLLER_KILLS, "controller kills");
    assert_eq!(
        soak.injected
            .get(&Kind::BrokerRestart)
            .copied()
            .unwrap_or(0),
        BROKER_RESTARTS
    );
    assert!(
        outcome.keys().any(|k| k.starts_with("completed")),
        "no run completed: {outcome:?}"
    );
    let Soak {
        workcell,
        lh_host,
        broker_child,
        ..
    } = soak;
    drop(broker_child);
    if let Some(host) = lh_host {
        host.shutdown().await;
    }
    workcell.shutdown().await;
}
