//! Whole runs against the simulated workcell of `examples/sim-workcell.toml`,
//! over real wires: serial instruments and an RS-485 Modbus RTU line on
//! pseudo-terminals, a Modbus TCP pump controller on a loopback port. The
//! controller side is the real lab file, profile drivers, transports and
//! runtime; the simulators are `biofoundry sim`'s. Faults are injected into the
//! simulators in the middle of runs.

use biofoundry::check::CheckReport;
use biofoundry::clock::Clock;
use biofoundry::lab::{self, LabFile, LabRuntime, SimBacking, SimulatedWorkcell};
use biofoundry::runtime::events::{ChannelSink, Event, EventBus, EventKind, MemorySink, StepPhase};
use biofoundry::runtime::executor::{RunHandle, RunOptions, RunReport, RunSetup, spawn};
use biofoundry::runtime::machine::{RunCommand, RunState};
use biofoundry::sim::{SimOptions, SimTiming};
use biofoundry::source::SourceFile;
use biofoundry::wiresim::{Fault, Times};
use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A fresh folder for one test's pseudo-terminal links.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bf-workcell-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// examples/sim-workcell.toml with its links in `dir` and its TCP port free.
fn workcell_lab(dir: &Path) -> LabFile {
    let text = std::fs::read_to_string(Path::new(ROOT).join("examples/sim-workcell.toml"))
        .unwrap()
        .replace("/tmp/biofoundry-sim", &dir.display().to_string())
        .replace("15020", &free_port().to_string());
    let path = Path::new(ROOT).join("examples/sim-workcell.toml");
    let (lab, diagnostics) = lab::parse(SourceFile::new(path, text));
    assert!(diagnostics.iter().all(|d| !d.is_error()), "{diagnostics:?}");
    lab.unwrap()
}

struct Bench {
    clock: Clock,
    workcell: SimulatedWorkcell,
    live: LabRuntime,
    lab: LabFile,
    _dir: PathBuf,
}

async fn bench(name: &str, speed: f64) -> Bench {
    let dir = scratch(name);
    let lab = workcell_lab(&dir);
    let backing = SimBacking {
        clock: Clock::new(speed),
        options: SimOptions {
            seed: 3,
            timing: SimTiming::Realistic,
        },
    };
    let workcell = lab::serve_lab(&lab, &backing).await.unwrap();
    let live = lab::connect_lab(&lab, &backing).unwrap();
    Bench {
        clock: backing.clock,
        workcell,
        live,
        lab,
        _dir: dir,
    }
}

fn checked(bench: &Bench, text: &str) -> CheckReport {
    let report = biofoundry::check::check_source(
        SourceFile::new(Path::new(ROOT).join("protocols/test.toml"), text),
        &[],
        &lab::LabLimits {
            lab: &bench.lab,
            bindings: Default::default(),
        },
    );
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    report
}

/// Starts a run; prompts are answered as they come.
fn start(bench: &Bench, report: CheckReport, options: RunOptions) -> Run {
    let protocol = report.protocol.unwrap();
    let plan = report.plan.unwrap();
    let setup = RunSetup::new(&protocol, plan, &bench.live.lab, &[], options).unwrap();
    let memory = MemorySink::default();
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let mut bus = EventBus::new();
    bus.add_sink(Box::new(memory.clone()));
    bus.add_sink(Box::new(ChannelSink(tx)));
    let (handle, task) = spawn(setup, bench.clock, bus);
    Run {
        handle,
        task,
        memory,
        events,
    }
}

struct Run {
    handle: RunHandle,
    task: tokio::task::JoinHandle<RunReport>,
    memory: MemorySink,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
}

impl Run {
    /// Follows events until `stop` says so (answering prompts), within `limit`.
    async fn until(&mut self, limit: Duration, mut stop: impl FnMut(&Event) -> bool) -> Event {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("the awaited event did not come in time")
                .expect("the run's events ended");
            if let EventKind::Prompt {
                step_id,
                response: None,
                ..
            } = &event.kind
            {
                let _ = self.handle.answer_prompt(step_id, "ok").await;
            }
            if stop(&event) {
                return event;
            }
        }
    }

    /// Waits for the run to be held and gives the reason it carries.
    async fn held_reason(&mut self) -> String {
        let held = self
            .until(Duration::from_secs(60), |e| {
                matches!(
                    &e.kind,
                    EventKind::RunState {
                        state: RunState::Held,
                        ..
                    }
                )
            })
            .await;
        match held.kind {
            EventKind::RunState { reason, .. } => reason.unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// Follows the run until step `step` has recorded its `n`th sample.
    async fn until_samples(&mut self, step: &str, n: usize) {
        let mut seen = 0;
        self.until(Duration::from_secs(60), |e| {
            if matches!(&e.kind, EventKind::Sample { source, .. } if source == step) {
                seen += 1;
            }
            seen == n
        })
        .await;
    }

    async fn finish(mut self, limit: Duration) -> (RunReport, Vec<Event>) {
        self.until(
            limit,
            |e| matches!(&e.kind, EventKind::RunState { state, .. } if state.is_final()),
        )
        .await;
        let report = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the run task did not end")
            .unwrap();
        (report, self.memory.snapshot())
    }
}

fn protocol(name: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join("protocols").join(name)).unwrap()
}

fn step_phases(events: &[Event], step: &str) -> Vec<StepPhase> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Step { step_id, phase, .. } if step_id == step => Some(*phase),
            _ => None,
        })
        .collect()
}

fn samples(events: &[Event], source: &str) -> Vec<(String, f64)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Sample {
                source: s, values, ..
            } if s == source => Some(values.clone()),
            _ => None,
        })
        .flatten()
        .map(|(n, q)| (n, q.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_conditioning_runs_over_rtu_tcp_and_serial() {
    let b = bench("media", 200.0).await;
    let report = checked(&b, &protocol("media_conditioning.toml"));
    let run = start(&b, report, RunOptions::default());
    run.handle.command(RunCommand::Start, "test").await.unwrap();
    let (report, events) = run.finish(Duration::from_secs(120)).await;
    assert_eq!(report.state, RunState::Completed, "{:?}", report.faults);
    let start = samples(&events, "sample_start");
    let value = |name: &str| start.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    // Read over Modbus RTU from the Eurotherm after it heated the culture.
    assert!(value("temperature").unwrap() >= 29.5, "{start:?}");
    let ph = value("ph").unwrap();
    assert!((6.0..8.0).contains(&ph), "{ph}");
    assert!(value("od600").unwrap() > 0.0);
    // The monitor sampled pH and DO throughout.
    let monitored = events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::Sample { source, .. } if source.starts_with("monitor")))
        .count();
    assert!(monitored >= 10, "{monitored} monitor samples");
    b.workcell.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dye_check_runs_a_gcode_liquid_handler_and_an_incubator_over_ptys() {
    let b = bench("dye", 50.0).await;
    let report = checked(&b, &protocol("dye_check.toml"));
    let run = start(&b, report, RunOptions::default());
    run.handle.command(RunCommand::Start, "test").await.unwrap();
    let (report, events) = run.finish(Duration::from_secs(150)).await;
    assert_eq!(report.state, RunState::Completed, "{:?}", report.faults);
    assert!(report.steps_done >= 3, "{report:?}");
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        EventKind::Step {
            phase: StepPhase::Completed,
            ..
        }
    )));
    b.workcell.shutdown().await;
}

const SAMPLING: &str = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "sampling under faults"
[devices]
tm = "temperature_module"
br = "bioreactor"
[[step]]
id = "warm"
do = "tm.set_temperature"
temperature = "30 C"
wait = false
[[step]]
id = "tm_samples"
do = "tm.sample"
read = ["temperature"]
repeat = { times = 6, every = "20 s" }
on_error = "retry"
retries = 4
[[step]]
id = "br_samples"
do = "br.sample"
after = ["warm"]
read = ["ph", "dissolved_oxygen", "temperature"]
repeat = { times = 6, every = "20 s" }
on_error = "retry"
retries = 4
"#;

/// Short retry back-off, so that tests see the retries within seconds.
fn quick_retries() -> RunOptions {
    RunOptions {
        retry_base_s: 0.5,
        retry_max_s: 2.0,
        ..RunOptions::default()
    }
}

/// Injects `fault` into `target` once the run is under way, and checks the
/// run retries and completes with every sample taken.
async fn transient(name: &str, target: &str, fault: Fault, times: Times, step: &str) {
    let b = bench(name, 20.0).await;
    let report = checked(&b, SAMPLING);
    let mut run = start(&b, report, quick_retries());
    run.handle.command(RunCommand::Start, "test").await.unwrap();
    // In the middle of the run: after the second sample of the step.
    run.until_samples(step, 2).await;
    b.workcell.inject(target, fault, times).unwrap();
    let (report, events) = run.finish(Duration::from_secs(120)).await;
    assert_eq!(
        report.state,
        RunState::Completed,
        "{name}: {:?}",
        report.faults
    );
    let phases = step_phases(&events, step);
    assert!(
        phases.contains(&StepPhase::Retrying),
        "{name}: the fault was not seen: {phases:?}"
    );
    let taken = samples(&events, step).len();
    let per_sample = if step == "tm_samples" { 1 } else { 3 };
    assert_eq!(taken, 6 * per_sample, "{name}: every sample is taken once");
    b.workcell.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_instrument_that_misses_one_reply_is_retried() {
    transient(
        "noreply",
        "tm1",
        Fault::NoReply,
        Times::Next(1),
        "tm_samples",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_serial_line_is_retried() {
    transient(
        "garbage",
        "tm1",
        Fault::Garbage,
        Times::Next(1),
        "tm_samples",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reply_past_the_timeout_is_never_taken_for_the_next_one() {
    transient(
        "slow",
        "tm1",
        Fault::Slow(Duration::from_millis(1500)),
        Times::Next(1),
        "tm_samples",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_modbus_unit_is_retried() {
    transient(
        "rtu-silent",
        "br1.ph",
        Fault::NoReply,
        Times::Next(1),
        "br_samples",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_rtu_frame_is_retried() {
    transient(
        "rtu-crc",
        "br1.dissolved_oxygen",
        Fault::Corrupt,
        Times::Next(1),
        "br_samples",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rs485_adapter_unplugged_for_two_seconds_comes_back() {
    let b = bench("unplug", 20.0).await;
    let line = b
        .workcell
        .line_faults
        .keys()
        .find(|k| k.ends_with("rs485-1"))
        .cloned()
        .unwrap();
    let report = checked(&b, SAMPLING);
    let mut run = start(&b, report, quick_retries());
    run.handle.command(RunCommand::Start, "test").await.unwrap();
    run.until_samples("br_samples", 2).await;
    b.workcell
        .inject(
            &line,
            Fault::Disconnect(Duration::from_secs(2)),
            Times::Next(1),
        )
        .unwrap();
    let (report, events) = run.finish(Duration::from_secs(120)).await;
    assert_eq!(report.state, RunState::Completed, "{:?}", report.faults);
    assert_eq!(samples(&events, "br_samples").len(), 18);
    b.workcell.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_modbus_unit_is_retried_by_the_bus_without_failing_the_step() {
    let b = bench("busy", 20.0).await;
    let report = checked(&b, SAMPLING);
    let mut run = start(&b, report, quick_retries());
    run.handle.command(RunCommand::Start, "test").await.unwrap();
    run.until(
        Duration::from_secs(60),
        |e| matches!(&e.kind, EventKind::Sample { source, .. } if source == "br_samples"),
    )
    .await;
    // Two busy answers: within the profile's busy_retries, invisible to the run.
    b.workcell
        .inject("br1.ph", Fault::Busy, Times::Next(2))
        .unwrap();
    let (report, events) = run.finish(Duration::from_secs(120)).await;
    assert_eq!(report.state, RunState::Completed, "{:?}", report.faults);
    assert!(!step_phases(&events, "br_samples").contains(&StepPhase::Retrying));
    b.workcell.shutdown().await;
}

const LOADING: &str = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "incubator under faults"
[devices]
lh = "liquid_handler"
inc = "incubator"
[labware.plate]
type = "corning_96_wellplate_360ul_flat"
at = "lh:2"
[[step]]
id = "store"
do = "inc.load"
labware = "plate"
slot = 3
[[step]]
id = "fetch"
do = "inc.unload"
labware = "plate"
to = "lh:2"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instrument_that_stops_answering_holds_the_run_with_the_reason_until_retried() {
    let b = bench("hold", 20.0).await;
    // Unplugged before the run: the first move cannot happen.
    let report = checked(&b, LOADING);
    let mut run = start(&b, report, quick_retries());
    run.handle.command(RunCommand::Start, "test").await.unwrap();
    run.until(Duration::from_secs(30), |e| {
        matches!(&e.kind, EventKind::Step { step_id, phase: StepPhase::Started, .. } if step_id == "store")
    })
    .await;
    b.workcell
        .inject("inc1", Fault::NoReply, Times::UntilCleared)
        .unwrap();
    let reason = run.held_reason().await;
    assert!(
        reason.contains("inc1") && reason.contains("did not answer"),
        "the held reason names the device and the fault: {reason}"
    );
    // The operator fixes the cable and retries.
    b.workcell.clear("inc1").unwrap();
    // The device must be reconnected (background) before the retry can start.
    tokio::time::sleep(Duration::from_secs(3)).await;
    run.handle
        .command(RunCommand::Retry, "operator")
        .await
        .unwrap();
    let (report, _) = run.finish(Duration::from_secs(120)).await;
    assert_eq!(report.state, RunState::Completed, "{:?}", report.faults);
    b.workcell.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_exception_holds_the_run_naming_it() {
    let b = bench("exception", 20.0).await;
    let text = SAMPLING.replace(
        "on_error = \"retry\"\nretries = 4\n",
        "on_error = \"hold\"\n",
    );
    let report = checked(&b, &text);
    let mut run = start(&b, report, quick_retries());
    run.handle.command(RunCommand::Start, "test").await.unwrap();
    run.until(
        Duration::from_secs(60),
        |e| matches!(&e.kind, EventKind::Sample { source, .. } if source == "br_samples"),
    )
    .await;
    b.workcell
        .inject("br1.ph", Fault::Exception(4), Times::UntilCleared)
        .unwrap();
    let reason = run.held_reason().await;
    assert!(reason.contains("exception 04"), "{reason}");
    b.workcell.clear("br1.ph").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    run.handle
        .command(RunCommand::Retry, "operator")
        .await
        .unwrap();
    let (report, _) = run.finish(Duration::from_secs(120)).await;
    assert_eq!(report.state, RunState::Completed, "{:?}", report.faults);
    b.workcell.shutdown().await;
}

#[test]
fn check_with_a_lab_uses_the_profiles_limits_and_abilities() {
    let dir = scratch("limits");
    let path = dir.join("lab.toml");
    let lab_text = r#"
format = "biofoundry.lab/1"
[controller]
site = "t"
cell = "t"
id = "t"
[[device]]
id = "p1"
profile = "watson-marlow-520"
transport = "sim://"
[[device]]
id = "inc1"
profile = "liconic-stx"
transport = "sim://"
"#;
    let (lab, d) = lab::parse(SourceFile::new(&path, lab_text));
    assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
    let lab = lab.unwrap();
    // 60 mL/min is within the pump kind's 0..100 mL/min, not the 520's 0..48.
    let text = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "limits"
[devices]
pump = "pump"
inc = "incubator"
[[step]]
do = "pump.run"
rate = "60 mL/min"
duration = "1 min"
[[step]]
do = "inc.shake"
speed = "300 rpm"
"#;
    let report = biofoundry::check::check_source(
        SourceFile::new("limits.toml", text),
        &[],
        &lab::LabLimits {
            lab: &lab,
            bindings: [
                ("pump".to_string(), "p1".to_string()),
                ("inc".to_string(), "inc1".to_string()),
            ]
            .into_iter()
            .collect(),
        },
    );
    let codes: Vec<(&str, &str)> = report
        .diagnostics
        .iter()
        .map(|d| (d.code, d.message.as_str()))
        .collect();
    assert!(
        codes
            .iter()
            .any(|(c, m)| *c == "out-of-limits" && m.contains("0..48 mL/min")),
        "{codes:?}"
    );
    // The Liconic profile has no shaker setpoint.
    assert!(
        codes
            .iter()
            .any(|(c, m)| *c == "not-on-device" && m.contains("shaking")),
        "{codes:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usb_serial_instrument_unplugged_mid_run_comes_back_and_the_run_goes_on() {
    let b = bench("usb", 20.0).await;
    let report = checked(&b, SAMPLING);
    let mut run = start(&b, report, quick_retries());
    run.handle.command(RunCommand::Start, "test").await.unwrap();
    run.until_samples("tm_samples", 2).await;
    // The module's pseudo-terminal disappears and comes back at the same path
    // after 2 s, as a re-enumerated USB device does.
    b.workcell
        .inject(
            "tm1",
            Fault::Disconnect(Duration::from_secs(2)),
            Times::Next(1),
        )
        .unwrap();
    let (report, events) = run.finish(Duration::from_secs(120)).await;
    assert_eq!(report.state, RunState::Completed, "{:?}", report.faults);
    assert_eq!(samples(&events, "tm_samples").len(), 6);
    let tm_states: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::DeviceState { device, state, .. } if device == "tm1" => {
                Some(format!("{state:?}"))
            }
            _ => None,
        })
        .collect();
    assert!(
        tm_states.iter().any(|s| s.contains("Fault"))
            && tm_states.last().is_some_and(|s| s.contains("Ready")),
        "the device went to fault and came back by itself: {tm_states:?}"
    );
    b.workcell.shutdown().await;
}
