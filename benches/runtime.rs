//! Runtime benchmarks (results and commands in BENCHMARKS.md):
//! - the executor's own cost per step: 100k generated steps on simulated devices
//!   whose operations take no time, on a virtual clock;
//! - `simulate` of a 48-hour fed-batch with four signals monitored every 10 s;
//! - the journal's cost: 10k steps with and without the run journal on the bus.

use biofoundry::check::check_source;
use biofoundry::clock::Clock;
use biofoundry::runtime::events::EventBus;
use biofoundry::runtime::executor::{RunOptions, RunSetup, spawn};
use biofoundry::runtime::machine::{RunCommand, RunState};
use biofoundry::runtime::simulate::simulate;
use biofoundry::sim::{SimOptions, SimTiming, simulated_lab};
use biofoundry::source::SourceFile;
use biofoundry::validate::SimulatedLab;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

mod protocol_gen;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn checked(text: &str) -> (biofoundry::protocol::Protocol, biofoundry::plan::Plan) {
    let report = check_source(SourceFile::new("bench.toml", text), &[], &SimulatedLab);
    assert!(!report.has_errors(), "{:?}", report.diagnostics.first());
    (report.protocol.unwrap(), report.plan.unwrap())
}

fn run_instant(protocol: &biofoundry::protocol::Protocol, plan: &biofoundry::plan::Plan) {
    run_instant_with(protocol, plan, None);
}

/// Events: how many the run produced (for the journal's cost per entry).
fn run_instant_with(
    protocol: &biofoundry::protocol::Protocol,
    plan: &biofoundry::plan::Plan,
    journal: Option<&std::path::Path>,
) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let clock = Clock::new(1.0);
        let lab = simulated_lab(
            clock,
            SimOptions {
                seed: 1,
                timing: SimTiming::Instant,
            },
        );
        let setup =
            RunSetup::new(protocol, plan.clone(), &lab, &[], RunOptions::default()).unwrap();
        let mut bus = EventBus::new();
        let counter = biofoundry::runtime::events::MemorySink::default();
        if let Some(path) = journal {
            let header = biofoundry::journal::RunHeader {
                run_id: format!("bench-{}", biofoundry::mqtt::publisher::now_ms()),
                protocol: protocol.name.clone(),
                version: None,
                sha256: String::new(),
                text: String::new(),
                params: serde_json::Value::Null,
                bindings: serde_json::Value::Null,
                lab: None,
                controller_version: String::new(),
                operator: None,
                source: "bench".into(),
                started_ms: biofoundry::mqtt::publisher::now_ms(),
                file: None,
            };
            let sink = biofoundry::journal::Journal::open(path)
                .unwrap()
                .begin(&header)
                .unwrap();
            bus.add_sink(Box::new(sink));
        }
        bus.add_sink(Box::new(counter.clone()));
        let (handle, task) = spawn(setup, clock, bus);
        handle.command(RunCommand::Start, "bench").await.unwrap();
        let report = task.await.unwrap();
        assert_eq!(report.state, RunState::Completed);
        counter.snapshot().len() as u64
    })
}

pub const FED_BATCH_48H: &str = r#"
format = "biofoundry.protocol/1"
[protocol]
name = "48-hour fed-batch"
[devices]
br = "bioreactor"
[[step]]
do = "br.set"
temperature = "37 C"
ph = 7.0
dissolved_oxygen = 40
stirrer = "600 rpm"
airflow = "1 L/min"
[[step]]
id = "grow"
do = "wait_until"
condition = "br.od600 >= 2"
poll = "5 min"
timeout = "12 h"
[[step]]
id = "feed"
do = "br.feed"
pump = "feed"
rate = "0.2 mL/min"
duration = "40 h"
[[step]]
id = "sample"
do = "br.sample"
read = ["od600", "ph", "volume"]
repeat = { times = 40, every = "1 h" }
[[step]]
do = "wait"
duration = "2 h"
[[monitor]]
device = "br"
read = ["ph", "dissolved_oxygen", "temperature", "od600"]
every = "10 s"
limits = { ph = "6.5..7.5" }
on_violation = "alarm"
"#;

fn bench_runtime(c: &mut Criterion) {
    let mut group = c.benchmark_group("runtime");
    group.sample_size(10);
    for steps in [1_000, 10_000, 100_000] {
        let (protocol, plan) = checked(&protocol_gen::mixed_steps(steps));
        group.throughput(Throughput::Elements(steps as u64));
        group.bench_with_input(
            BenchmarkId::new("instant_steps", steps),
            &(protocol, plan),
            |b, (p, plan)| b.iter(|| run_instant(p, plan)),
        );
    }
    group.throughput(Throughput::Elements(1));
    let (protocol, plan) = checked(FED_BATCH_48H);
    group.bench_function("simulate_fed_batch_48h", |b| {
        b.iter(|| {
            let sim = simulate(&protocol, &plan, 1, &[]).unwrap();
            assert_eq!(sim.state, RunState::Completed);
            assert!(sim.duration_s > 40.0 * 3600.0);
        })
    });
    group.finish();

    // The journal: the same 10k steps with and without it (a commit at each
    // write-ahead point: before each device operation and each wait).
    let mut group = c.benchmark_group("journal");
    group.sample_size(10);
    let (protocol, plan) = checked(&protocol_gen::mixed_steps(10_000));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.sqlite");
    let events = run_instant_with(&protocol, &plan, None);
    println!("journal bench: 10000 steps produce {events} events");
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("10k_steps_without_journal", |b| {
        b.iter(|| run_instant_with(&protocol, &plan, None))
    });
    group.bench_function("10k_steps_with_journal", |b| {
        b.iter(|| run_instant_with(&protocol, &plan, Some(&path)))
    });
    // Per sample: 48 h of a bioreactor monitored every 10 s (about 17 000
    // samples of four signals) on the virtual clock, with and without it.
    let (protocol, plan) = checked(FED_BATCH_48H);
    let events = run_instant_with(&protocol, &plan, None);
    println!("journal bench: the 48 h fed-batch produces {events} events");
    group.throughput(Throughput::Elements(events));
    group.bench_function("fed_batch_48h_without_journal", |b| {
        b.iter(|| run_instant_with(&protocol, &plan, None))
    });
    group.bench_function("fed_batch_48h_with_journal", |b| {
        b.iter(|| run_instant_with(&protocol, &plan, Some(&path)))
    });
    group.finish();
}

criterion_group!(benches, bench_runtime);
criterion_main!(benches);
