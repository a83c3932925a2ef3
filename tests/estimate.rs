//! `simulate` predicts a real-time run: the same executor and simulated devices,
//! once on a virtual clock and once in real time.

use biofoundry::check::check_source;
use biofoundry::clock::Clock;
use biofoundry::runtime::events::EventBus;
use biofoundry::runtime::executor::{RunOptions, RunSetup, spawn};
use biofoundry::runtime::machine::{RunCommand, RunState};
use biofoundry::runtime::simulate::simulate;
use biofoundry::sim::{SimOptions, SimTiming, simulated_lab};
use biofoundry::source::SourceFile;
use biofoundry::validate::SimulatedLab;
use std::time::Duration;

/// About 10 s: pipetting on the liquid handler while the incubator door opens
/// and a wait runs, then a transfer after both.
const TEN_SECONDS: &str = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "ten seconds"
[devices]
lh = "liquid_handler"
inc = "incubator"
[labware.tips]
type = "opentrons_96_tiprack_300ul"
at = "lh:1"
[labware.plate]
type = "corning_96_wellplate_360ul_flat"
at = "lh:2"
contents = { A1 = "100 uL dye" }
[[step]]
id = "door"
do = "inc.open_door"
[[step]]
id = "settle"
do = "wait"
duration = "2 s"
[[step]]
id = "tip"
do = "lh.pick_up_tip"
after = []
[[step]]
id = "move"
do = "lh.aspirate"
from = "plate:A1"
volume = "20 uL"
after = ["tip", "settle"]
[[step]]
do = "lh.dispense"
to = "plate:A2"
volume = "20 uL"
[[step]]
do = "lh.drop_tip"
"#;

#[test]
fn the_estimate_is_within_two_percent_of_a_real_run() {
    let report = check_source(SourceFile::new("ten.toml", TEN_SECONDS), &[], &SimulatedLab);
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    let (protocol, plan) = (report.protocol.unwrap(), report.plan.unwrap());
    let estimate = simulate(&protocol, &plan, 3, &[]).unwrap();
    assert_eq!(estimate.state, RunState::Completed);
    assert!(
        (8.0..14.0).contains(&estimate.duration_s),
        "{}",
        estimate.duration_s
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let real = runtime.block_on(async {
        let clock = Clock::new(1.0);
        let lab = simulated_lab(
            clock,
            SimOptions {
                seed: 3,
                timing: SimTiming::Realistic,
            },
        );
        let setup =
            RunSetup::new(&protocol, plan.clone(), &lab, &[], RunOptions::default()).unwrap();
        let (handle, task) = spawn(setup, clock, EventBus::new());
        handle.command(RunCommand::Start, "test").await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the run ends")
            .unwrap()
    });
    assert_eq!(real.state, RunState::Completed);
    let error = (real.duration_s - estimate.duration_s).abs() / estimate.duration_s;
    assert!(
        error < 0.02,
        "estimate {} s, real {} s",
        estimate.duration_s,
        real.duration_s
    );
    assert_eq!(
        estimate.critical_path.first().map(String::as_str),
        Some("door")
    );
}
