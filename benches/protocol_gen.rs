//! Generated protocols for the benchmarks (also used by
//! `examples/generate_protocol.rs`, which writes them to files).

use std::fmt::Write;

/// A protocol of `steps` steps of every common sort: single-well transfers (most
/// steps), incubator setpoints, waits, logs, and `after` dependencies.
pub fn mixed_steps(steps: usize) -> String {
    let mut s = String::with_capacity(steps * 120);
    s.push_str(
        r#"format = "biofoundry.protocol/1"

[protocol]
name = "generated"

[params]
volume = "1 uL"

[devices]
lh = "liquid_handler"
inc = "incubator"

[labware.tips]
type = "opentrons_96_tiprack_20ul"
at = "lh:1"
[labware.source]
type = "nest_1_reservoir_195ml"
at = "lh:2"
contents = { A1 = "190 mL buffer" }
"#,
    );
    for p in 0..4 {
        let _ = writeln!(
            s,
            "[labware.plate{p}]\ntype = \"corning_96_wellplate_360ul_flat\"\nat = \"lh:{}\"",
            p + 3
        );
    }
    s.push_str("\n[[step]]\nid = \"s0\"\ndo = \"lh.pick_up_tip\"\n");
    let rows = ["A", "B", "C", "D", "E", "F", "G", "H"];
    for i in 1..steps {
        let _ = write!(s, "\n[[step]]\nid = \"s{i}\"\n");
        match i % 20 {
            5 => {
                let _ = writeln!(
                    s,
                    "do = \"inc.set_temperature\"\ntemperature = \"{} C\"\nwait = false",
                    30 + i % 8
                );
            }
            10 => s.push_str("do = \"wait\"\nduration = \"1 s\"\n"),
            15 => {
                let _ = writeln!(s, "do = \"log\"\nmessage = \"checkpoint {i}\"");
            }
            _ => {
                let well = i % 384;
                let _ = writeln!(
                    s,
                    "do = \"lh.transfer\"\nfrom = \"source:A1\"\nto = \"plate{}:{}{}\"\nvolume = \"${{volume}}\"\ntips = \"never\"",
                    well / 96,
                    rows[well % 8],
                    (well % 96) / 8 + 1
                );
            }
        }
        if i % 50 == 0 && i >= 2 {
            let _ = writeln!(s, "after = [\"s{}\", \"s{}\"]", i - 1, i / 2);
        }
    }
    s.push_str("\n[[step]]\ndo = \"lh.drop_tip\"\n");
    s
}

/// About `transfers` single-well transfers packed into 96-well range steps.
#[allow(dead_code)] // used by the `check` benchmark and the generator example, not the runtime one
pub fn packed_transfers(transfers: usize) -> String {
    let mut s = String::from(
        r#"format = "biofoundry.protocol/1"

[protocol]
name = "generated, packed"

[devices]
lh = "liquid_handler"

[labware.tips]
type = "opentrons_96_tiprack_20ul"
at = "lh:1"
[labware.source]
type = "nest_96_wellplate_2ml_deep"
at = "lh:2"
contents = { "A1:H12" = "1.9 mL sample" }
[labware.dest]
type = "nest_96_wellplate_2ml_deep"
at = "lh:3"

[[step]]
do = "lh.pick_up_tip"
"#,
    );
    for _ in 0..transfers.div_ceil(96) {
        s.push_str("\n[[step]]\ndo = \"lh.transfer\"\nfrom = \"source:A1:H12\"\nto = \"dest:A1:H12\"\nvolume = \"1 uL\"\ntips = \"never\"\n");
    }
    s.push_str("\n[[step]]\ndo = \"lh.drop_tip\"\n");
    s
}
