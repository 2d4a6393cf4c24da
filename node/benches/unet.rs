//! One training step and one 1024 x 1024 inference, the reference U-Net on the CPU.
//!
//! `cargo bench -p cellswarm-node --bench unet` (RAYON_NUM_THREADS sets the threads).
//! The network is 16-32-64 with a 128-channel bottleneck (depth 3, width 16), batch 8 of
//! 1 x 128 x 128 patches, Adam, the class-weighted cross-entropy plus the cell-state loss.
//! `benches/unet_torch.py` runs the same network, loss, batch, tiling and thread count in
//! PyTorch for comparison (by hand, not in CI); see docs/benchmarks.md.

use std::time::Duration;

use cellswarm_node::bench_train::{reference_config, reference_planes};
use cellswarm_node::data::patches::SamplerConfig;
use cellswarm_node::infer::{InferOptions, instances, predict_plane};
use cellswarm_node::model::default_device;
use cellswarm_node::train::{TrainOptions, Trainer};
use criterion::{Criterion, criterion_group, criterion_main};

fn train_step(c: &mut Criterion) {
    let cfg = reference_config();
    let device = default_device();
    let opts = TrainOptions {
        batch: 8,
        sampler: SamplerConfig {
            patch: 128,
            ..SamplerConfig::default()
        },
        ..TrainOptions::default()
    };
    let mut t = Trainer::new(&cfg, &device, reference_planes(), opts, None)
        .expect("valid benchmark set-up");
    for _ in 0..3 {
        t.step();
    }
    c.bench_function("unet/train_step/b8x128x128", |b| b.iter(|| t.step()));
}

fn infer_frame(c: &mut Criterion) {
    let cfg = reference_config();
    let device = default_device();
    device.seed(1);
    let model = cfg.init(&device);
    let n = 1024;
    let plane: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let opts = InferOptions::default();
    c.bench_function("unet/infer/1024x1024", |b| {
        b.iter(|| {
            let p = predict_plane(&model, &cfg, &device, &plane, n, n, &opts);
            instances(&p, opts.min_size, opts.seed_threshold, opts.split_depth)
        });
    });
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20))
}

criterion_group! {
    name = benches;
    config = config();
    targets = train_step, infer_frame
}
criterion_main!(benches);
