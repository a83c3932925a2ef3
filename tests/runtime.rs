//! The runtime against the simulated lab, on tokio's paused clock (so hours of
//! lab time take milliseconds): scheduling, error policies, monitors, prompts,
//! pause/resume, abort, device faults.

use biofoundry::check::check_source;
use biofoundry::clock::Clock;
use biofoundry::device::{DeviceHandle, DeviceState, Lab};
use biofoundry::protocol::Protocol;
use biofoundry::runtime::events::{AlarmState, Event, EventBus, EventKind, MemorySink, StepPhase};
use biofoundry::runtime::executor::{
    RunHandle, RunOptions, RunReport, RunSetup, spawn, spawn_resumed,
};
use biofoundry::runtime::machine::{RunCommand, RunState};
use biofoundry::runtime::recovery::recover;
use biofoundry::sim::{
    FaultKind, Injectable, InjectedFault, SimBioreactor, SimIncubator, SimLiquidHandler,
    SimOptions, SimTiming,
};
use biofoundry::source::SourceFile;
use biofoundry::validate::SimulatedLab;
use std::sync::Arc;
use std::time::Duration;

const DECK: &str = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "runtime test"
[devices]
lh = "liquid_handler"
inc = "incubator"
[labware.tips]
type = "opentrons_96_tiprack_300ul"
at = "lh:1"
[labware.plate]
type = "corning_96_wellplate_360ul_flat"
at = "lh:2"
contents = { "A1:H1" = "200 uL sample" }
"#;

struct World {
    clock: Clock,
    lh: Arc<SimLiquidHandler>,
    inc: Arc<SimIncubator>,
    br: Arc<SimBioreactor>,
    lab: Lab,
}

fn world() -> World {
    let clock = Clock::new(1.0);
    let options = SimOptions {
        seed: 7,
        timing: SimTiming::Realistic,
    };
    let lh = Arc::new(SimLiquidHandler::new(
        "liquid_handler",
        clock,
        options.clone(),
    ));
    let inc = Arc::new(SimIncubator::new("incubator", clock, options.clone()));
    let br = Arc::new(SimBioreactor::new("bioreactor", clock, options));
    let mut lab = Lab::default();
    lab.add(DeviceHandle::LiquidHandler(lh.clone()));
    lab.add(DeviceHandle::Incubator(inc.clone()));
    lab.add(DeviceHandle::Bioreactor(br.clone()));
    World {
        clock,
        lh,
        inc,
        br,
        lab,
    }
}

fn checked(text: &str) -> (Protocol, biofoundry::plan::Plan) {
    let report = check_source(SourceFile::new("t.toml", text), &[], &SimulatedLab);
    assert!(!report.has_errors(), "{:#?}", report.diagnostics);
    (report.protocol.unwrap(), report.plan.unwrap())
}

struct Running {
    handle: RunHandle,
    task: tokio::task::JoinHandle<RunReport>,
    events: MemorySink,
}

async fn start(w: &World, text: &str) -> Running {
    let (protocol, plan) = checked(text);
    let setup = RunSetup::new(&protocol, plan, &w.lab, &[], RunOptions::default()).unwrap();
    let events = MemorySink::default();
    let mut bus = EventBus::new();
    bus.add_sink(Box::new(events.clone()));
    let (handle, task) = spawn(setup, w.clock, bus);
    handle.command(RunCommand::Start, "test").await.unwrap();
    Running {
        handle,
        task,
        events,
    }
}

/// Waits (bounded, in lab time) until the run reaches `state`.
async fn until_state(r: &mut Running, state: RunState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(48 * 3600);
    while r.handle.state() != state {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached {state}; now {}",
            r.handle.state()
        );
        let _ = tokio::time::timeout(Duration::from_secs(60), r.handle.changed()).await;
    }
}

async fn finish(r: Running) -> (RunReport, Vec<Event>) {
    let report = tokio::time::timeout(Duration::from_secs(7 * 24 * 3600), r.task)
        .await
        .expect("run ends")
        .unwrap();
    (report, r.events.snapshot())
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

fn time_of(events: &[Event], step: &str, phase: StepPhase) -> f64 {
    events
        .iter()
        .find(|e| matches!(&e.kind, EventKind::Step { step_id, phase: p, .. } if step_id == step && *p == phase))
        .map(|e| e.t_s)
        .unwrap_or_else(|| panic!("{step} never {phase:?}"))
}

#[tokio::test(start_paused = true)]
async fn after_orders_steps_and_different_devices_run_in_parallel() {
    let w = world();
    let text = format!(
        r#"{DECK}
[[step]]
id = "warm"
do = "inc.set_temperature"
temperature = "37 C"

[[step]]
id = "fill"
do = "lh.transfer"
from = "plate:A1"
to = "plate:A2:H2"
volume = "10 uL"
after = []

[[step]]
id = "load"
do = "inc.load"
labware = "plate"
after = ["warm", "fill"]
"#
    );
    let r = start(&w, &text).await;
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Completed);
    // The incubator warms (minutes) while the liquid handler pipettes.
    assert!(
        time_of(&events, "fill", StepPhase::Started)
            < time_of(&events, "warm", StepPhase::Completed)
    );
    let warm_done = time_of(&events, "warm", StepPhase::Completed);
    let fill_done = time_of(&events, "fill", StepPhase::Completed);
    assert!(time_of(&events, "load", StepPhase::Started) >= warm_done.max(fill_done));
    assert!(
        warm_done > 60.0,
        "an incubator takes minutes to warm: {warm_done}"
    );
    assert!(w.inc.operations() > 0);
}

#[tokio::test(start_paused = true)]
async fn hold_policy_then_retry_completes() {
    let w = world();
    w.lh.inject(InjectedFault::FailNext {
        count: 1,
        error: FaultKind::Refused,
    });
    let mut r = start(&w, &format!("{DECK}\n[[step]]\nid = \"t\"\ndo = \"lh.transfer\"\nfrom = \"plate:A1\"\nto = \"plate:A2\"\nvolume = \"10 uL\"\n")).await;
    until_state(&mut r, RunState::Held).await;
    assert!(
        r.handle.command(RunCommand::Resume, "test").await.is_err(),
        "a failed step needs retry or skip"
    );
    r.handle.command(RunCommand::Retry, "test").await.unwrap();
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Completed);
    assert_eq!(
        step_phases(&events, "t"),
        [StepPhase::Started, StepPhase::Failed, StepPhase::Completed]
    );
}

#[tokio::test(start_paused = true)]
async fn skip_policy_records_and_goes_on() {
    let w = world();
    w.inc.inject(InjectedFault::FailNext {
        count: 1,
        error: FaultKind::Refused,
    });
    let text = format!(
        "{DECK}\n[[step]]\nid = \"door\"\ndo = \"inc.open_door\"\non_error = \"skip\"\n[[step]]\nid = \"next\"\ndo = \"inc.close_door\"\n"
    );
    let (report, events) = finish(start(&w, &text).await).await;
    assert_eq!(report.state, RunState::Completed);
    assert_eq!(report.steps_skipped, 1);
    assert!(step_phases(&events, "door").contains(&StepPhase::Skipped));
    assert!(step_phases(&events, "next").contains(&StepPhase::Completed));
}

#[tokio::test(start_paused = true)]
async fn retry_backs_off_then_succeeds_or_holds_when_exhausted() {
    let w = world();
    w.inc.inject(InjectedFault::FailNext {
        count: 2,
        error: FaultKind::Refused,
    });
    let text = format!(
        "{DECK}\n[[step]]\nid = \"door\"\ndo = \"inc.open_door\"\non_error = \"retry\"\nretries = 3\n"
    );
    let (report, events) = finish(start(&w, &text).await).await;
    assert_eq!(report.state, RunState::Completed);
    let retrying: Vec<f64> = events
        .iter()
        .filter(|e| {
            matches!(
                &e.kind,
                EventKind::Step {
                    phase: StepPhase::Retrying,
                    ..
                }
            )
        })
        .map(|e| e.t_s)
        .collect();
    assert_eq!(retrying.len(), 2);

    // Exhausted: 1 attempt + 2 retries all fail -> held.
    let w = world();
    w.inc.inject(InjectedFault::FailNext {
        count: 5,
        error: FaultKind::Refused,
    });
    let text = format!(
        "{DECK}\n[[step]]\nid = \"door\"\ndo = \"inc.open_door\"\non_error = \"retry\"\nretries = 2\n"
    );
    let mut r = start(&w, &text).await;
    until_state(&mut r, RunState::Held).await;
    let phases = step_phases(&r.events.snapshot(), "door");
    assert_eq!(
        phases.iter().filter(|p| **p == StepPhase::Retrying).count(),
        2
    );
    assert_eq!(phases.last(), Some(&StepPhase::Failed));
    r.handle.command(RunCommand::Abort, "test").await.unwrap();
    let (report, _) = finish(r).await;
    assert_eq!(report.state, RunState::Aborted);
}

#[tokio::test(start_paused = true)]
async fn abort_policy_fails_the_run_and_applies_safe_states() {
    let w = world();
    w.inc.inject(InjectedFault::FailNext {
        count: 1,
        error: FaultKind::Refused,
    });
    let text = format!(
        "{DECK}\n[[step]]\nid = \"door\"\ndo = \"inc.open_door\"\non_error = \"abort\"\n[[step]]\ndo = \"inc.close_door\"\n"
    );
    let (report, _) = finish(start(&w, &text).await).await;
    assert_eq!(report.state, RunState::Failed);
    assert!(
        w.inc.log().iter().any(|l| l.contains("safe")),
        "{:?}",
        w.inc.log()
    );
}

#[tokio::test(start_paused = true)]
async fn step_timeout_counts_as_an_error() {
    let w = world();
    let text = format!(
        "{DECK}\n[[step]]\nid = \"warm\"\ndo = \"inc.set_temperature\"\ntemperature = \"45 C\"\ntimeout = \"1 min\"\n"
    );
    let mut r = start(&w, &text).await;
    until_state(&mut r, RunState::Held).await;
    let events = r.events.snapshot();
    let failed = events.iter().find_map(|e| match &e.kind {
        EventKind::Step {
            phase: StepPhase::Failed,
            detail,
            ..
        } => detail.clone(),
        _ => None,
    });
    assert!(failed.unwrap().contains("timeout"));
    r.handle.command(RunCommand::Skip, "test").await.unwrap();
    assert_eq!(finish(r).await.0.state, RunState::Completed);
}

#[tokio::test(start_paused = true)]
async fn a_retried_wait_until_gets_its_whole_timeout_again() {
    // A condition that never holds, retried twice by the policy, then by the
    // operator (which gives the policy its retries back): every attempt
    // waits its full 10 minutes.
    let w = world();
    let text = format!(
        "{DECK}\n[[step]]\nid = \"warm\"\ndo = \"wait_until\"\ncondition = \"inc.temperature >= 90 C\"\npoll = \"30 s\"\ntimeout = \"10 min\"\non_error = \"retry\"\nretries = 2\n"
    );
    let mut r = start(&w, &text).await;
    until_state(&mut r, RunState::Held).await;
    let events = r.events.snapshot();
    let failed_at = time_of(&events, "warm", StepPhase::Failed);
    // 10 min, 1 s back-off, 10 min, 2 s back-off, 10 min.
    assert!(
        (failed_at - 1803.0).abs() < 35.0,
        "held after {failed_at} s"
    );
    assert_eq!(
        step_phases(&events, "warm")
            .iter()
            .filter(|p| **p == StepPhase::Retrying)
            .count(),
        2
    );
    r.handle.command(RunCommand::Retry, "test").await.unwrap();
    let retried_at = w.clock.now_s();
    until_state(&mut r, RunState::Held).await;
    let held_again = w.clock.now_s() - retried_at;
    assert!(
        (held_again - 1803.0).abs() < 35.0,
        "held again after {held_again} s"
    );
    r.handle.command(RunCommand::Abort, "test").await.unwrap();
    assert_eq!(finish(r).await.0.state, RunState::Aborted);
}

#[tokio::test(start_paused = true)]
async fn monitors_hold_or_alarm() {
    // The culture sits at about 22 C: a 36..38 C limit is violated at once.
    let text = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "monitor"
[devices]
br = "bioreactor"
[[step]]
do = "wait"
duration = "5 min"
[[monitor]]
id = "temp"
device = "br"
read = ["temperature"]
every = "10 s"
limits = { temperature = "36..38 C" }
on_violation = "POLICY"
"#;
    let w = world();
    let mut r = start(&w, &text.replace("POLICY", "hold")).await;
    until_state(&mut r, RunState::Held).await;
    r.handle.command(RunCommand::Abort, "test").await.unwrap();
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Aborted);
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        EventKind::Alarm {
            state: AlarmState::Active,
            ..
        }
    )));

    let w = world();
    let (report, events) = finish(start(&w, &text.replace("POLICY", "alarm")).await).await;
    assert_eq!(
        report.state,
        RunState::Completed,
        "an alarm does not stop the run"
    );
    assert_eq!(
        report.alarms.len(),
        1,
        "one alarm per excursion: {:?}",
        report.alarms
    );
    let samples = events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::Sample { .. }))
        .count();
    assert!(
        (30..=32).contains(&samples),
        "a sample every 10 s for 5 min: {samples}"
    );
    let _ = &w.br;
}

#[tokio::test(start_paused = true)]
async fn prompts_wait_for_the_answer() {
    let w = world();
    let text = format!(
        "{DECK}\n[[step]]\nid = \"ask\"\ndo = \"prompt\"\nmessage = \"Put the lid on\"\n[[step]]\ndo = \"inc.close_door\"\n"
    );
    let r = start(&w, &text).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        r.handle.state(),
        RunState::Running,
        "still waiting for the operator"
    );
    assert!(r.handle.answer_prompt("nope", "x").await.is_err());
    r.handle.answer_prompt("ask", "done").await.unwrap();
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Completed);
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::Prompt { response: Some(x), .. } if x == "done"))
    );
}

#[tokio::test(start_paused = true)]
async fn pause_takes_effect_between_operations_and_nothing_is_sent_twice() {
    let w = world();
    let text = format!(
        "{DECK}\n[[step]]\nid = \"t\"\ndo = \"lh.transfer\"\nfrom = \"plate:A1:H1\"\nto = \"plate:A2:H2\"\nvolume = \"50 uL\"\ntips = \"always\"\n"
    );
    let mut r = start(&w, &text).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    r.handle.command(RunCommand::Pause, "test").await.unwrap();
    until_state(&mut r, RunState::Paused).await;
    let at_pause = w.lh.operations();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(w.lh.operations(), at_pause, "nothing moves while paused");
    r.handle.command(RunCommand::Resume, "test").await.unwrap();
    let (report, _) = finish(r).await;
    assert_eq!(report.state, RunState::Completed);
    let log = w.lh.log();
    let aspirates: Vec<&String> = log.iter().filter(|l| l.starts_with("aspirate")).collect();
    assert_eq!(aspirates.len(), 8, "{log:?}");
    let mut unique = aspirates.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 8, "an operation was sent twice: {log:?}");
}

#[tokio::test(start_paused = true)]
async fn a_wait_keeps_its_end_time_across_a_pause() {
    let w = world();
    let text = format!("{DECK}\n[[step]]\nid = \"w\"\ndo = \"wait\"\nduration = \"10 min\"\n");
    let mut r = start(&w, &text).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    r.handle.command(RunCommand::Pause, "test").await.unwrap();
    until_state(&mut r, RunState::Paused).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    r.handle.command(RunCommand::Resume, "test").await.unwrap();
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Completed);
    let done = time_of(&events, "w", StepPhase::Completed);
    assert!(
        (done - 600.0).abs() < 1.0,
        "the incubation ends 10 min after it began: {done}"
    );
}

#[tokio::test(start_paused = true)]
async fn abort_stops_at_once_and_runs_safe_states() {
    let w = world();
    let text = format!("{DECK}\n[[step]]\ndo = \"inc.set_temperature\"\ntemperature = \"40 C\"\n");
    let mut r = start(&w, &text).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    r.handle.command(RunCommand::Abort, "test").await.unwrap();
    until_state(&mut r, RunState::Aborted).await;
    let (report, _) = finish(r).await;
    assert_eq!(report.state, RunState::Aborted);
    assert!(report.duration_s < 60.0);
    assert!(
        w.inc.log().iter().any(|l| l.contains("safe")),
        "{:?}",
        w.inc.log()
    );
}

#[tokio::test(start_paused = true)]
async fn a_device_fault_holds_the_run_and_the_device_comes_back() {
    let w = world();
    w.lh.inject(InjectedFault::FailNext {
        count: 1,
        error: FaultKind::Timeout,
    });
    // Even with skip, a faulted device is not stepped over.
    let text = format!(
        "{DECK}\n[[step]]\nid = \"t\"\ndo = \"lh.transfer\"\nfrom = \"plate:A1\"\nto = \"plate:A2\"\nvolume = \"10 uL\"\non_error = \"skip\"\n"
    );
    let mut r = start(&w, &text).await;
    until_state(&mut r, RunState::Held).await;
    // The reconnect loop brings the device back by itself.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let states: Vec<DeviceState> = r
        .events
        .snapshot()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::DeviceState { device, state, .. } if device == "liquid_handler" => {
                Some(*state)
            }
            _ => None,
        })
        .collect();
    assert!(states.contains(&DeviceState::Fault), "{states:?}");
    assert_eq!(states.last(), Some(&DeviceState::Ready), "{states:?}");
    r.handle.command(RunCommand::Retry, "test").await.unwrap();
    assert_eq!(finish(r).await.0.state, RunState::Completed);
}

#[tokio::test(start_paused = true)]
async fn stop_lets_operations_finish() {
    let w = world();
    let text = format!(
        "{DECK}\n[[step]]\nid = \"t\"\ndo = \"lh.transfer\"\nfrom = \"plate:A1:H1\"\nto = \"plate:A2:H2\"\nvolume = \"50 uL\"\n"
    );
    let mut r = start(&w, &text).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    r.handle.command(RunCommand::Stop, "test").await.unwrap();
    until_state(&mut r, RunState::Stopped).await;
    let (report, _) = finish(r).await;
    assert_eq!(report.state, RunState::Stopped);
    assert!(report.steps_done < report.steps_total);
}

#[test]
fn binding_errors_name_the_role_and_the_device() {
    let w = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { world() })
    };
    let bind = |text: &str, binds: &[(&str, &str)]| {
        let (protocol, plan) = checked(text);
        let binds: Vec<(String, String)> = binds
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        RunSetup::new(&protocol, plan, &w.lab, &binds, RunOptions::default())
            .err()
            .map(|e| e.to_string())
    };
    let pump = "format = \"biofoundry.protocol/1\"\n[protocol]\nname = \"p\"\n[devices]\np = \"pump\"\n[[step]]\ndo = \"p.stop\"\n";
    assert_eq!(
        bind(pump, &[]).as_deref(),
        Some("role `p` needs a pump, and the lab has none")
    );
    let two = "format = \"biofoundry.protocol/1\"\n[protocol]\nname = \"p\"\n[devices]\na = \"incubator\"\nb = \"incubator\"\n[[step]]\ndo = \"a.open_door\"\n[[step]]\ndo = \"b.open_door\"\n";
    assert_eq!(
        bind(two, &[]).as_deref(),
        Some("roles `a` and `b` would both use device `incubator`; bind them to different devices")
    );
    assert_eq!(
        bind(two, &[("x", "incubator")]).as_deref(),
        Some("--bind x: the protocol has no role `x`")
    );
    assert_eq!(
        bind(two, &[("a", "freezer")]).as_deref(),
        Some("--bind a=freezer: the lab has no device `freezer`")
    );
}

/// Takes a run up from journal `events` (entry bodies as the journal has
/// them) on the world's simulated lab.
async fn take_up(w: &World, text: &str, events: Vec<serde_json::Value>) -> Running {
    let (protocol, plan) = checked(text);
    let setup = RunSetup::new(&protocol, plan, &w.lab, &[], RunOptions::default()).unwrap();
    let events: Vec<(u64, serde_json::Value)> = events
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            let seq = i as u64 + 1;
            e["seq"] = seq.into();
            e["t_s"] = (seq as f64).into();
            e["unix_ms"] = (1_000 + seq).into();
            (seq, e)
        })
        .collect();
    let resumption = recover(&events, &setup, 1_000 + events.len() as u64, 1.0).unwrap();
    let sink = MemorySink::default();
    let mut bus = EventBus::continuing_after(resumption.after_seq);
    bus.add_sink(Box::new(sink.clone()));
    let (handle, task) = spawn_resumed(setup, resumption, w.clock, bus);
    handle.command(RunCommand::Start, "test").await.unwrap();
    Running {
        handle,
        task,
        events: sink,
    }
}

fn state(state: &str, reason: Option<&str>) -> serde_json::Value {
    serde_json::json!({"type": "run_state", "state": state, "reason": reason})
}

#[tokio::test(start_paused = true)]
async fn a_run_ending_when_the_controller_stopped_is_ended_not_taken_up() {
    let text = format!(
        "{DECK}\n[[step]]\nid = \"warm\"\ndo = \"inc.set_temperature\"\ntemperature = \"30 C\"\n[[step]]\nid = \"later\"\ndo = \"wait\"\nduration = \"1 h\"\nafter = [\"warm\"]\n"
    );
    let started = serde_json::json!({"type": "step", "step_id": "warm", "action": "inc.set_temperature", "phase": "started"});
    for (ending, reason, ends) in [
        ("aborting", None, RunState::Aborted),
        (
            "aborting",
            Some("step `warm` failed: no answer"),
            RunState::Failed,
        ),
        ("stopping", None, RunState::Stopped),
    ] {
        let w = world();
        let r = take_up(
            &w,
            &text,
            vec![
                state("running", None),
                started.clone(),
                state(ending, reason),
            ],
        )
        .await;
        let (report, events) = finish(r).await;
        assert_eq!(report.state, ends, "{ending} {reason:?}");
        assert!(
            step_phases(&events, "warm").is_empty() && step_phases(&events, "later").is_empty(),
            "no step runs: {events:?}"
        );
        // Nothing but the safe state reached the incubator.
        let log = w.inc.log();
        assert!(
            !log.is_empty() && log.iter().all(|l| l.contains("safe")),
            "{log:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e.kind, EventKind::Resumed { .. })),
            "{events:?}"
        );
        let why = events.iter().find_map(|e| match &e.kind {
            EventKind::RunState {
                state: RunState::Aborting | RunState::Stopping,
                reason: Some(r),
            } => Some(r.clone()),
            _ => None,
        });
        let why = why.unwrap_or_default();
        assert!(
            why.contains(&format!("was {}", ending)) && why.contains("it ends now"),
            "{why}"
        );
        if let Some(because) = reason {
            assert!(why.contains(because), "{why}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_paused_run_comes_back_held_and_a_failed_step_still_failed() {
    let text = format!(
        "{DECK}\n[[step]]\nid = \"warm\"\ndo = \"inc.set_temperature\"\ntemperature = \"30 C\"\n[[step]]\nid = \"later\"\ndo = \"wait\"\nduration = \"1 h\"\nafter = [\"warm\"]\n"
    );
    let started = serde_json::json!({"type": "step", "step_id": "warm", "action": "inc.set_temperature", "phase": "started"});
    let done = |phase: &str| serde_json::json!({"type": "operation", "step_id": "warm", "index": 0, "phase": phase});
    let completed = serde_json::json!({"type": "step", "step_id": "warm", "action": "inc.set_temperature", "phase": "completed"});

    // Paused by the operator: held, and `resume` goes on.
    let w = world();
    let mut r = take_up(
        &w,
        &text,
        vec![
            state("running", None),
            started.clone(),
            done("sent"),
            done("done"),
            completed,
            state("pausing", None),
            state("paused", None),
        ],
    )
    .await;
    until_state(&mut r, RunState::Held).await;
    tokio::time::sleep(Duration::from_secs(7200)).await;
    assert_eq!(
        r.handle.state(),
        RunState::Held,
        "it waits for the operator"
    );
    r.handle.command(RunCommand::Resume, "test").await.unwrap();
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Completed);
    assert_eq!(step_phases(&events, "warm"), Vec::<StepPhase>::new());

    // A step that had failed: `resume` is refused, `skip` skips that step.
    let w = world();
    let failed = serde_json::json!({"type": "step", "step_id": "warm", "action": "inc.set_temperature", "phase": "failed", "detail": "incubator did not answer"});
    let mut r = take_up(
        &w,
        &text,
        vec![
            state("running", None),
            started,
            done("sent"),
            failed,
            state("holding", Some("step `warm` failed")),
            state("held", Some("step `warm` failed")),
        ],
    )
    .await;
    until_state(&mut r, RunState::Held).await;
    let refused = r.handle.command(RunCommand::Resume, "test").await;
    assert!(refused.is_err(), "{refused:?}");
    r.handle.command(RunCommand::Skip, "test").await.unwrap();
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Completed);
    assert_eq!(step_phases(&events, "warm"), vec![StepPhase::Skipped]);
    assert_eq!(w.inc.operations(), 0, "the failed step was not done again");
}

#[tokio::test(start_paused = true)]
async fn devices_are_connected_with_retries_while_commands_are_answered() {
    let text = format!(
        "{DECK}\n[[step]]\nid = \"warm\"\ndo = \"inc.set_temperature\"\ntemperature = \"30 C\"\n"
    );
    // Back within the retries: the run goes on.
    let w = world();
    w.inc.inject(InjectedFault::Offline);
    let r = start(&w, &text).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.inc.inject(InjectedFault::Clear);
    let (report, _) = finish(r).await;
    assert_eq!(report.state, RunState::Completed, "{:?}", report.faults);

    // Not back: a new run fails before any step, naming the device.
    let w = world();
    w.inc.inject(InjectedFault::Offline);
    let r = start(&w, &text).await;
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Failed);
    assert!(
        report
            .faults
            .iter()
            .any(|f| f.contains("incubator") && f.contains("3 attempts")),
        "{:?}",
        report.faults
    );
    assert!(step_phases(&events, "warm").is_empty());

    // Commands are answered while the run waits for its devices.
    let w = world();
    w.inc.inject(InjectedFault::Offline);
    let r = start(&w, &text).await;
    let answered = tokio::time::timeout(
        Duration::from_millis(100),
        r.handle.command(RunCommand::Abort, "test"),
    )
    .await;
    assert!(matches!(answered, Ok(Ok(_))), "{answered:?}");
    assert_eq!(finish(r).await.0.state, RunState::Aborted);
}

#[tokio::test(start_paused = true)]
async fn a_run_taken_up_waits_for_a_device_that_is_not_back() {
    let text = format!(
        "{DECK}\n[[step]]\nid = \"warm\"\ndo = \"inc.set_temperature\"\ntemperature = \"30 C\"\n[[step]]\nid = \"later\"\ndo = \"wait\"\nduration = \"1 h\"\nafter = [\"warm\"]\n"
    );
    let w = world();
    w.inc.inject(InjectedFault::Offline);
    let started = serde_json::json!({"type": "step", "step_id": "warm", "action": "inc.set_temperature", "phase": "started"});
    let r = take_up(&w, &text, vec![state("running", None), started]).await;
    // Far beyond the three attempts a new run gets.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(r.handle.state(), RunState::Running);
    let waiting = r.events.snapshot().iter().any(|e| {
        matches!(&e.kind, EventKind::DeviceState { device, state: DeviceState::Fault, reason: Some(why) }
            if device == "incubator" && why.contains("the run waits for it"))
    });
    assert!(waiting, "{:?}", r.events.snapshot());
    w.inc.inject(InjectedFault::Clear);
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Completed);
    assert_eq!(
        step_phases(&events, "later"),
        vec![StepPhase::Started, StepPhase::Completed]
    );
}

#[tokio::test(start_paused = true)]
async fn a_safe_state_is_tried_again_after_a_lost_reply() {
    let text = format!("{DECK}\n[[step]]\nid = \"w\"\ndo = \"wait\"\nduration = \"1 h\"\n");
    let w = world();
    let r = start(&w, &text).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    w.inc.inject(InjectedFault::Offline);
    r.handle.command(RunCommand::Abort, "test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.inc.inject(InjectedFault::Clear);
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Aborted);
    let safe_state_alarms = events
        .iter()
        .filter(
            |e| matches!(&e.kind, EventKind::Alarm { alarm_id, .. } if alarm_id == "safe-state"),
        )
        .count();
    assert_eq!(safe_state_alarms, 0, "{:?}", report.faults);
    assert!(w.inc.log().iter().any(|l| l.contains("safe")));

    // Never back: the alarm says how often it was tried.
    let w = world();
    let r = start(&w, &text).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    w.inc.inject(InjectedFault::Offline);
    r.handle.command(RunCommand::Abort, "test").await.unwrap();
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Aborted);
    let alarm = events.iter().find_map(|e| match &e.kind {
        EventKind::Alarm {
            alarm_id, message, ..
        } if alarm_id == "safe-state" => Some(message.clone()),
        _ => None,
    });
    let alarm = alarm.unwrap_or_default();
    assert!(
        alarm.contains("incubator") && alarm.contains("(3 attempts)"),
        "{alarm}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_timed_feed_goes_on_for_what_is_left_or_stops_when_taken_up() {
    let text = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "feeds"
[devices]
br = "bioreactor"
[[step]]
id = "feed"
do = "br.feed"
pump = "feed"
rate = "0.5 mL/min"
duration = "1 h"
[[step]]
id = "base"
do = "br.feed"
pump = "base"
rate = "0.2 mL/min"
duration = "1 s"
[[step]]
id = "later"
do = "wait"
duration = "10 min"
after = ["feed", "base"]
"#;
    let op = |step: &str, phase: &str| serde_json::json!({"type": "operation", "step_id": step, "index": 0, "phase": phase});
    let completed = |step: &str| serde_json::json!({"type": "step", "step_id": step, "action": "br.feed", "phase": "completed"});
    let w = world();
    let r = take_up(
        &w,
        text,
        vec![
            state("running", None),
            op("feed", "sent"),
            op("feed", "done"),
            completed("feed"),
            op("base", "sent"),
            op("base", "done"),
            completed("base"),
        ],
    )
    .await;
    let (report, events) = finish(r).await;
    assert_eq!(report.state, RunState::Completed);
    let log = w.br.log();
    // Done at lab second 3, taken up at second 7: 3 596 s of feed are left;
    // the base feed ended at second 7.
    assert!(
        log.iter()
            .any(|l| l.starts_with("feed feed 0.5 mL/min 3596")),
        "{log:?}"
    );
    assert!(log.iter().any(|l| l == "stop base"), "{log:?}");
    let restored = events.iter().find_map(|e| match &e.kind {
        EventKind::Resumed { restored, .. } => Some(restored.clone()),
        _ => None,
    });
    let restored = restored.unwrap().join("; ");
    assert!(
        restored.contains("br feed feed at 0.5 mL/min")
            && restored.contains("br base feed stopped"),
        "{restored}"
    );
}
