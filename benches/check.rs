//! `check` on generated protocols: 1k, 10k and 100k steps, and 10k transfers
//! packed into 96-well range steps. Results and the command: BENCHMARKS.md.

use biofoundry::check::check_source;
use biofoundry::source::SourceFile;
use biofoundry::validate::SimulatedLab;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

mod protocol_gen;

// The same allocator as the `biofoundry` binary, so the figures are what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn check(text: &str) {
    let report = check_source(SourceFile::new("generated.toml", text), &[], &SimulatedLab);
    assert!(!report.has_errors(), "{:?}", report.diagnostics.first());
}

fn bench_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("check");
    group.sample_size(10);
    for steps in [1_000, 10_000, 100_000] {
        let text = protocol_gen::mixed_steps(steps);
        group.throughput(Throughput::Elements(steps as u64));
        group.bench_with_input(BenchmarkId::new("steps", steps), &text, |b, t| {
            b.iter(|| check(t))
        });
    }
    let text = protocol_gen::packed_transfers(10_000);
    group.throughput(Throughput::Elements(10_000));
    group.bench_with_input(
        BenchmarkId::new("packed_transfers", 10_000),
        &text,
        |b, t| b.iter(|| check(t)),
    );
    group.finish();
}

criterion_group!(benches, bench_check);
criterion_main!(benches);
