//! Planning through the public API: tip choice, quadrant stamping, execution
//! order, repeats and final volumes.

use biofoundry::check::check_source;
use biofoundry::plan::{Op, Plan};
use biofoundry::source::SourceFile;
use biofoundry::validate::SimulatedLab;

const HEADER: &str = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "plan test"
[devices]
lh = "liquid_handler"
[labware.small]
type = "opentrons_96_tiprack_20ul"
at = "lh:1"
[labware.large]
type = "opentrons_96_tiprack_300ul"
at = "lh:2"
[labware.src]
type = "nest_96_wellplate_2ml_deep"
at = "lh:3"
contents = { "A1:H12" = "1 mL sample" }
[labware.dest]
type = "corning_384_wellplate_112ul_flat"
at = "lh:4"
"#;

fn plan(steps: &str) -> Plan {
    let report = check_source(
        SourceFile::new("t.toml", format!("{HEADER}{steps}")),
        &[],
        &SimulatedLab,
    );
    assert!(!report.has_errors(), "{:#?}", report.diagnostics);
    report.plan.unwrap()
}

fn racks(plan: &Plan) -> Vec<String> {
    plan.steps
        .iter()
        .flat_map(|s| &s.operations)
        .filter_map(|o| match &o.op {
            Op::PickUpTip { rack, .. } => Some(rack.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_smallest_tip_that_holds_the_volume_is_used() {
    let p = plan(
        r#"
[[step]]
do = "lh.transfer"
from = "src:A1"
to = "dest:A1"
volume = "15 uL"
[[step]]
do = "lh.transfer"
from = "src:A1"
to = "dest:A2"
volume = "25 uL"
[[step]]
do = "lh.transfer"
from = "src:A1"
to = "dest:A3"
volume = "10 uL"
mix_before = { cycles = 2, volume = "30 uL" }
[[step]]
do = "lh.transfer"
from = "src:A1"
to = "dest:A4"
volume = "5 uL"
tip_rack = "large"
"#,
    );
    // 15 uL fits 20 uL tips; 25 uL and a 30 uL mix need 300 uL tips; tip_rack overrides.
    assert_eq!(racks(&p), ["small", "large", "large", "large"]);
}

#[test]
fn quadrant_stamping_maps_96_onto_interleaved_384_wells() {
    let p = plan(
        r#"
[[step]]
do = "lh.transfer"
from = "src:A1:H12"
to = "dest:quadrant(4)"
volume = "1 uL"
tips = "always"
"#,
    );
    let pairs: Vec<(String, String)> = p.steps[0]
        .operations
        .windows(2)
        .filter_map(|w| match (&w[0].op, &w[1].op) {
            (Op::Aspirate { well: a, .. }, Op::Dispense { well: b, .. }) => {
                Some((a.clone(), b.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(pairs.len(), 96);
    assert_eq!(pairs[0], ("A1".to_string(), "B2".to_string()));
    assert_eq!(pairs[1], ("B1".to_string(), "D2".to_string()));
    assert_eq!(pairs[8], ("A2".to_string(), "B4".to_string()));
    assert_eq!(pairs[95], ("H12".to_string(), "P24".to_string()));
    assert_eq!(racks(&p).len(), 96);
}

#[test]
fn after_orders_steps_and_repeats_expand() {
    let p = plan(
        r#"
[[step]]
id = "a"
do = "wait"
duration = "1 min"
[[step]]
id = "b"
do = "log"
message = "b"
after = ["c"]
[[step]]
id = "c"
do = "log"
message = "c"
after = ["a"]
[[step]]
id = "d"
do = "lh.transfer"
from = "src:A1"
to = "dest:A1"
volume = "1 uL"
repeat = { times = 3, every = "10 min" }
after = ["a"]
"#,
    );
    let order: Vec<&str> = p.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(order, ["a", "c", "b", "d"]);
    assert_eq!(p.steps[1].after, ["a"]);
    let d = &p.steps[3];
    assert_eq!(d.operations.len(), 3 * 4);
    assert_eq!(d.operations.last().unwrap().repetition, Some(2));
    let a1 = p
        .wells
        .iter()
        .find(|w| w.labware == "dest" && w.well == "A1")
        .unwrap();
    assert_eq!(a1.volume_ul, 3.0);
    let src = p
        .wells
        .iter()
        .find(|w| w.labware == "src" && w.well == "A1")
        .unwrap();
    assert_eq!(src.volume_ul, 997.0);
    assert_eq!(src.liquids, ["sample"]);
}
