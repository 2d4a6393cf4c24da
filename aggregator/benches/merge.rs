//! Merge throughput, next to a plain parallel copy of the same bytes and a naive
//! "weighted copy per update, then sum" FedAvg, all in the same run and thread pool.
//!
//! `cargo bench -p cellswarm-aggregator` (optionally `-- merge/8x8M` to filter).
//! Throughput is reported as input bytes (K x P x 4) per second.

use std::time::Duration;

use cellswarm_aggregator::bench::{
    Inputs, merge_and_commit, naive_fedavg, parallel_copy, random_inputs,
};
use cellswarm_aggregator::{Merger, Update};
use cellswarm_common::config::{AggregationConfig, StrategyKind};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const M: usize = 1 << 20;

fn merger(kind: StrategyKind) -> Merger {
    let cfg = AggregationConfig {
        strategy: kind,
        byzantine: 1,
        ..AggregationConfig::default()
    };
    Merger::from_config(&cfg).expect("valid benchmark configuration")
}

fn bench_merge(c: &mut Criterion, inputs: &Inputs, kind: StrategyKind, group: &str, id: &str) {
    let k = inputs.updates.len();
    let p = inputs.base.values().len();
    let mut m = merger(kind);
    let mut out = Vec::with_capacity(p);
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes((k * p * 4) as u64));
    g.bench_function(BenchmarkId::new(kind_name(kind), id), |b| {
        b.iter(|| merge_and_commit(&mut m, inputs, &mut out).expect("benchmark inputs merge"));
    });
    g.finish();
}

fn kind_name(kind: StrategyKind) -> &'static str {
    kind.name()
}

fn merge_vs_copy(c: &mut Criterion) {
    for p_m in [1usize, 8, 32] {
        for k in [3usize, 8, 16] {
            let p = p_m * M;
            let inputs = random_inputs(k, p, 7);
            let id = format!("{k}x{p_m}M");
            bench_merge(c, &inputs, StrategyKind::FedAvg, "merge", &id);

            let src: Vec<&[f32]> = inputs.updates.iter().map(Update::values).collect();
            let mut dst: Vec<Vec<f32>> = (0..k).map(|_| vec![1f32; p]).collect();
            let mut g = c.benchmark_group("merge");
            g.throughput(Throughput::Bytes((k * p * 4) as u64));
            g.bench_function(BenchmarkId::new("copy", &id), |b| {
                b.iter(|| parallel_copy(&src, &mut dst));
            });
            g.bench_function(BenchmarkId::new("naive", &id), |b| {
                b.iter(|| naive_fedavg(&inputs));
            });
            g.finish();
        }
    }
}

fn robust_cost(c: &mut Criterion) {
    let inputs = random_inputs(8, 8 * M, 11);
    for kind in [
        StrategyKind::FedAvg,
        StrategyKind::FedAdam,
        StrategyKind::Median,
        StrategyKind::TrimmedMean,
        StrategyKind::Krum,
        StrategyKind::MultiKrum,
    ] {
        bench_merge(c, &inputs, kind, "strategy", "8x8M");
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = merge_vs_copy, robust_cost
}
criterion_main!(benches);
