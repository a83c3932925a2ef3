//! `biofoundry report` of a 48-hour run (results in BENCHMARKS.md): a journal
//! with four signals sampled every 10 s (17 280 samples of 4 values), 300
//! steps on three devices and the controller, pH alarms raised and cleared,
//! and a deck entry with a 96-well plate, a 384-well plate and a tip rack.
//! Measured: `report::render` from the journal file (read, verify the hash
//! chain, check the protocol again, draw, write the HTML into memory).
//! Target: under 2 s, and a file under 2 MB.

use biofoundry::journal::{Journal, RunHeader};
use biofoundry::runtime::events::{AlarmState, Event, EventKind, EventSink, StepPhase};
use biofoundry::runtime::machine::RunState;
use biofoundry::units::{Dimension, Quantity};
use criterion::{Criterion, criterion_group, criterion_main};
use sha2::{Digest, Sha256};
use std::path::Path;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUN: &str = "bench-48h";
const HOURS: f64 = 48.0;
const EVERY_S: f64 = 10.0;
const STEPS: usize = 300;
const START_MS: u64 = 1_800_000_000_000;

const PROTOCOL: &str = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "48 h culture (report benchmark)"
version = "1.0.0"
[devices]
br = "bioreactor"
lh = "liquid_handler"
inc = "incubator"
[labware.tips]
type = "opentrons_96_tiprack_300ul"
at = "lh:1"
[labware.plate]
type = "corning_96_wellplate_360ul_flat"
at = "lh:2"
contents = { "A1:H12" = "100 uL medium" }
[[step]]
id = "conditions"
do = "br.set"
temperature = "37 C"
[[step]]
id = "od_reached"
do = "wait_until"
condition = "br.od600 >= 8"
timeout = "16 h"
[[monitor]]
id = "process"
device = "br"
read = ["temperature", "ph", "dissolved_oxygen", "od600"]
every = "10 s"
limits = { temperature = "36..38 C", ph = "6.8..7.2", dissolved_oxygen = "20..100" }
on_violation = "alarm"
"#;

fn event(seq: &mut u64, t_s: f64, kind: EventKind) -> Event {
    *seq += 1;
    Event {
        seq: *seq,
        t_s,
        unix_ms: START_MS + (t_s * 1000.0) as u64,
        kind,
    }
}

fn step(seq: &mut u64, t: f64, id: &str, action: &str, phase: StepPhase) -> Event {
    event(
        seq,
        t,
        EventKind::Step {
            step_id: id.into(),
            action: action.into(),
            phase,
            repetition: None,
            detail: None,
        },
    )
}

/// Writes the run through the journal's public API; the deck entry (a JSON
/// shape, not a Rust type this benchmark depends on) is appended to the
/// chain by hand.
fn build(path: &Path) {
    let journal = Journal::open(path).unwrap();
    let header = RunHeader {
        run_id: RUN.into(),
        protocol: "48 h culture (report benchmark)".into(),
        version: Some("1.0.0".into()),
        sha256: hex::encode(Sha256::digest(PROTOCOL.as_bytes())),
        text: PROTOCOL.into(),
        params: serde_json::json!({}),
        bindings: serde_json::json!({"br": "br1", "lh": "ot2", "inc": "cytomat"}),
        lab: None,
        controller_version: "bench".into(),
        operator: Some("bench".into()),
        source: "operator (CLI)".into(),
        started_ms: START_MS,
        file: None,
    };
    let mut sink = journal.begin(&header).unwrap();
    let mut events = Vec::new();
    let mut seq = 0u64;
    events.push(event(
        &mut seq,
        0.0,
        EventKind::RunState {
            state: RunState::Running,
            reason: None,
        },
    ));
    let end = HOURS * 3600.0;
    let samples = (end / EVERY_S) as usize;
    // Steps: evenly over the run, on the three devices and the controller.
    let devices = [
        ("br.sample", "sample"),
        ("lh.transfer", "feed"),
        ("inc.load", "park"),
        ("wait", "wait"),
    ];
    let step_every = end / STEPS as f64;
    let mut next_step = 0usize;
    let mut alarm_on = false;
    for i in 0..samples {
        let t = i as f64 * EVERY_S;
        while next_step < STEPS && next_step as f64 * step_every <= t {
            let (action, name) = devices[next_step % devices.len()];
            let id = format!("{name}-{next_step}");
            let t0 = next_step as f64 * step_every;
            events.push(step(&mut seq, t0, &id, action, StepPhase::Started));
            let phase = if next_step % 37 == 5 {
                StepPhase::Failed
            } else {
                StepPhase::Completed
            };
            if next_step + 1 < STEPS {
                events.push(step(&mut seq, t0 + step_every * 0.7, &id, action, phase));
            }
            next_step += 1;
        }
        let h = t / 3600.0;
        let ph = 7.0 + 0.25 * (h * 1.5).sin() + 0.01 * ((i * 7919) % 13) as f64 / 13.0;
        events.push(event(
            &mut seq,
            t,
            EventKind::Sample {
                device: "br1".into(),
                source: "process".into(),
                values: vec![
                    (
                        "temperature".into(),
                        Quantity::new(37.0 + 0.3 * (h * 2.0).sin(), Dimension::Temperature),
                    ),
                    ("ph".into(), Quantity::new(ph, Dimension::Unitless)),
                    (
                        "dissolved_oxygen".into(),
                        Quantity::new(60.0 - 30.0 * (h / 48.0), Dimension::Percent),
                    ),
                    (
                        "od600".into(),
                        Quantity::new(0.1 * (h / 4.0).exp().min(200.0), Dimension::Unitless),
                    ),
                ],
            },
        ));
        let outside = !(6.8..=7.2).contains(&ph);
        if outside != alarm_on {
            alarm_on = outside;
            events.push(event(
                &mut seq,
                t,
                EventKind::Alarm {
                    alarm_id: "process.ph".into(),
                    state: if outside {
                        AlarmState::Active
                    } else {
                        AlarmState::Cleared
                    },
                    source: "process".into(),
                    message: format!("br ph = {ph}, outside 6.8..7.2"),
                },
            ));
        }
    }
    events.push(event(
        &mut seq,
        end,
        EventKind::RunState {
            state: RunState::Completed,
            reason: None,
        },
    ));
    for e in &events {
        sink.publish(e);
    }
    // Dropping the sink commits what it buffered.
    drop(sink);

    // The deck at the end: the JSON the runtime writes.
    let mut volumes = serde_json::Map::new();
    for r in 0..8u8 {
        for c in 1..=12 {
            volumes.insert(
                format!("{}{c}", char::from(b'A' + r)),
                serde_json::json!(f64::from(r) * 10.0 + f64::from(c)),
            );
        }
    }
    let mut volumes_384 = serde_json::Map::new();
    for r in 0..16u8 {
        for c in 1..=24 {
            volumes_384.insert(
                format!("{}{c}", char::from(b'A' + r)),
                serde_json::json!(f64::from(c) * 2.0),
            );
        }
    }
    let deck = serde_json::json!({
        "seq": seq + 1, "t_s": end, "unix_ms": START_MS + (end * 1000.0) as u64, "type": "deck",
        "labware": [
            {"name": "tips", "device": "ot2", "slot": 1, "load_name": "opentrons_96_tiprack_300ul",
             "rows": 8, "columns": 12, "volumes_ul": {}, "tips_used": ["A1", "B1", "C1"]},
            {"name": "plate", "device": "ot2", "slot": 2, "load_name": "corning_96_wellplate_360ul_flat",
             "rows": 8, "columns": 12, "volumes_ul": volumes},
            {"name": "plate384", "device": "ot2", "slot": 3, "load_name": "corning_384_wellplate_112ul_flat",
             "rows": 16, "columns": 24, "volumes_ul": volumes_384},
        ]
    })
    .to_string();
    let conn = rusqlite::Connection::open(path).unwrap();
    let prev: String = conn
        .query_row(
            "SELECT hash FROM entries WHERE run_id = ?1 ORDER BY seq DESC LIMIT 1",
            [RUN],
            |r| r.get(0),
        )
        .unwrap();
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(deck.as_bytes());
    let hash = hex::encode(h.finalize());
    conn.execute(
        "INSERT INTO entries (run_id, seq, kind, body, prev, hash) VALUES (?1, ?2, 'deck', ?3, ?4, ?5)",
        rusqlite::params![RUN, (seq + 1) as i64, deck, prev, hash],
    )
    .unwrap();
}

fn bench_report(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.sqlite");
    build(&path);
    let journal = Journal::open(&path).unwrap();
    let html = biofoundry::report::render(&journal, RUN).unwrap();
    let entries = journal.entries(RUN).unwrap().len();
    assert!(html.contains("intact"), "the chain verifies");
    eprintln!(
        "report of a 48 h run: {entries} entries, {} plots, {} bytes of HTML",
        html.matches("class=\"plot\"").count(),
        html.len()
    );
    assert!(html.len() < 2 << 20, "{} bytes", html.len());
    if let Some(out) = std::env::var_os("BIOFOUNDRY_BENCH_REPORT") {
        std::fs::write(out, &html).unwrap();
    }

    let mut group = c.benchmark_group("report");
    group.sample_size(10);
    group.bench_function("render_48h_4_signals_10s", |b| {
        b.iter(|| {
            let journal = Journal::open(&path).unwrap();
            biofoundry::report::render(&journal, RUN).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_report);
criterion_main!(benches);
