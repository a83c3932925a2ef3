//! Interlocks of the shipped profiles (the Heater-Shaker's latch, the Liconic
//! incubator's door) where a protocol meets them: `check --lab` before
//! anything moves, and the runtime for a run that was not checked against the
//! lab (the driver refuses, the run holds). The driver's refusal itself, over
//! real pseudo-terminals, is in tests/drivers.rs; MQTT setpoint commands in
//! tests/mqtt.rs.

use biofoundry::check::check_source;
use biofoundry::clock::Clock;
use biofoundry::lab::{self, SimBacking};
use biofoundry::runtime::events::{EventBus, EventKind, MemorySink};
use biofoundry::runtime::executor::{RunOptions, RunSetup, spawn};
use biofoundry::runtime::machine::{RunCommand, RunState};
use biofoundry::sim::{SimOptions, SimTiming};
use biofoundry::source::SourceFile;
use biofoundry::validate::SimulatedLab;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sim-lab.toml");

/// Shakes without closing the latch (line 10), then opens the incubator door
/// and stores the plate (line 18); `fixed` closes the latch and the door first.
fn protocol(fixed: bool) -> String {
    let (latch, door) = if fixed {
        (
            "[[step]]\ndo = \"hs.close_latch\"\n",
            "[[step]]\ndo = \"inc.close_door\"\n",
        )
    } else {
        ("", "")
    };
    format!(
        r#"format = "biofoundry.protocol/1"
[protocol]
name = "interlocks"
[devices]
hs = "heater_shaker"
inc = "incubator"
[labware.plate]
type = "corning_96_wellplate_360ul_flat"
at = "hs:1"
{latch}[[step]]
id = "shake"
do = "hs.shake"
speed = "500 rpm"
[[step]]
do = "hs.stop_shaking"
[[step]]
do = "inc.open_door"
{door}[[step]]
id = "store"
do = "inc.load"
labware = "plate"
"#
    )
}

fn check(dir: &Path, text: &str) -> (Option<i32>, String) {
    let file = dir.join("p.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_biofoundry"))
        .args(["check"])
        .arg(&file)
        .args(["--lab", LAB])
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_finds_each_interlock_at_its_step_with_a_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = check(dir.path(), &protocol(false));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "error[interlock]: step `shake` would be refused: interlock `latch_closed_to_shake`"
        ),
        "{text}"
    );
    assert!(text.contains("p.toml:10:1"), "{text}");
    assert!(
        text.contains(r#"add a step `do = "hs.close_latch"` before it"#),
        "{text}"
    );
    assert!(
        text.contains(
            "error[interlock]: step `store` would be refused: interlock `door_closed_to_load`"
        ),
        "{text}"
    );
    assert!(text.contains("p.toml:18:1"), "{text}");
    assert!(
        text.contains(r#"add a step `do = "inc.close_door"` before it"#),
        "{text}"
    );

    let (code, text) = check(dir.path(), &protocol(true));
    assert_eq!(code, Some(0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchecked_run_holds_where_the_driver_refuses() {
    // Checked without the lab, the protocol knows no interlocks.
    let report = check_source(
        SourceFile::new("p.toml", protocol(false)),
        &[],
        &SimulatedLab,
    );
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    let (protocol, plan) = (report.protocol.unwrap(), report.plan.unwrap());
    let lab_file = lab::load(Path::new(LAB)).map_err(|(_, d)| d).unwrap();
    let clock = Clock::new(100.0);
    let backing = SimBacking {
        clock,
        options: SimOptions {
            seed: 1,
            timing: SimTiming::Realistic,
        },
    };
    let runtime = lab::connect_lab(&lab_file, &backing).unwrap();
    let setup = RunSetup::new(&protocol, plan, &runtime.lab, &[], RunOptions::default()).unwrap();
    let mut bus = EventBus::new();
    let events = MemorySink::default();
    bus.add_sink(Box::new(events.clone()));
    let (mut handle, task) = spawn(setup, clock, bus);
    handle.command(RunCommand::Start, "test").await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(60), async {
        while handle.state() != RunState::Held {
            if handle.changed().await.is_none() {
                break;
            }
        }
        handle.state()
    })
    .await
    .expect("the run holds within 60 s");
    assert_eq!(held, RunState::Held);
    let reason = events
        .snapshot()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::RunState {
                state: RunState::Held,
                reason,
            } => reason,
            _ => None,
        })
        .unwrap_or_default();
    assert!(
        reason.contains("step `shake` failed")
            && reason.contains("interlock `latch_closed_to_shake`"),
        "{reason}"
    );
    handle.command(RunCommand::Abort, "test").await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!(report.state, RunState::Aborted);
}
