//! Runtime benchmarks (results and commands in BENCHMARKS.md):
//! - the executor's own cost per step: 100k generated steps on simulated devices
//!   whose operations take no time, on a virtual clock;
//! - `simulate` of a 48-hour fed-batch with four signals monitored every 10 s.

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
        let (handle, task) = spawn(setup, clock, EventBus::new());
        handle.command(RunCommand::Start, "bench").await.unwrap();
        let report = task.await.unwrap();
        assert_eq!(report.state, RunState::Completed);
    });
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
}

criterion_group!(benches, bench_runtime);
criterion_main!(benches);
