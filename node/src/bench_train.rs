//! `cellswarm bench train`: the speed of one site's training and inference on this
//! machine, with the reference U-Net that docs/benchmarks.md compares against PyTorch.
//!
//! The network is 16-32-64 with a 128-channel bottleneck (depth 3, width 16); a step is
//! one Adam update on a batch of 8 patches of 1 x 128 x 128 with the node's real loss
//! (pixel classes, cell states and the distance head). Inference is the forward pass of a
//! batch of the same shape, read back to the host. `../shared/anchors/burn/bench.py` runs
//! the same network and shapes in PyTorch; run the two interleaved and compare medians.

use std::time::{Duration, Instant};

use burn::prelude::*;

use crate::bench_round::peak_rss;
use crate::data::patches::{SamplerConfig, TrainPlane};
use crate::model::UNetConfig;
use crate::train::{TrainError, TrainOptions, Trainer};

/// Batch of the reference benchmark.
pub const BATCH: usize = 8;
/// Patch side of the reference benchmark.
pub const PATCH: usize = 128;

/// What one `bench train` run measured.
#[derive(Debug, Clone)]
pub struct TrainBench {
    /// Wall time of each timed training step.
    pub steps: Vec<Duration>,
    /// Wall time of each timed inference batch.
    pub infers: Vec<Duration>,
    /// Peak resident memory of this process in bytes, if the system says.
    pub peak_rss: Option<u64>,
    /// Loss of the last timed step (a sanity check that training ran).
    pub last_loss: f32,
}

/// The reference network's configuration.
#[must_use]
pub fn reference_config() -> UNetConfig {
    UNetConfig::new().with_depth(3).with_base_channels(16)
}

/// A 256 x 256 training plane with stripes of interior, boundary and background, and a
/// cell state on every cell pixel: content does not change the speed of a dense network.
#[must_use]
pub fn reference_planes() -> Vec<TrainPlane> {
    let (h, w) = (256, 256);
    let image: Vec<f32> = (0..h * w)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let classes: Vec<u8> = (0..h * w)
        .map(|i| match (i / w) % 16 {
            0..=3 => 0,
            4 | 15 => 2,
            _ => 1,
        })
        .collect();
    let states: Vec<u8> = classes
        .iter()
        .map(|&c| if c == 0 { u8::MAX } else { (c - 1) % 3 })
        .collect();
    vec![TrainPlane::new(h, w, image, classes, Some(states))]
}

/// Times `warmup` untimed and `steps` timed training steps of the reference network on
/// `device`, then `infers` timed inference batches.
///
/// # Errors
/// A trainer that cannot be set up (never for the reference shapes).
pub fn run(
    device: &Device,
    warmup: usize,
    steps: usize,
    infers: usize,
) -> Result<TrainBench, TrainError> {
    let cfg = reference_config();
    let opts = TrainOptions {
        batch: BATCH,
        sampler: SamplerConfig {
            patch: PATCH,
            ..SamplerConfig::default()
        },
        seed: 1,
        ..TrainOptions::default()
    };
    let mut trainer = Trainer::new(&cfg, device, reference_planes(), opts, None)?;
    for _ in 0..warmup {
        trainer.step();
    }
    let mut step_times = Vec::with_capacity(steps);
    let mut last_loss = f32::NAN;
    for _ in 0..steps {
        let t = Instant::now();
        // `step` reads each step's loss back to the host: on the CPU the step is done when
        // it returns; a GPU queue is drained there once a step, so medians are fair.
        last_loss = trainer.step();
        step_times.push(t.elapsed());
    }
    // Inference with the trained weights, on the plain (non-autodiff) backend.
    let model = trainer.model();
    let input: Vec<f32> = (0..BATCH * PATCH * PATCH)
        .map(|i| ((i * 104_729) % 1000) as f32 / 1000.0)
        .collect();
    let infer_once = || {
        let x = Tensor::<4>::from_data(
            TensorData::new(input.clone(), [BATCH, 1, PATCH, PATCH]),
            device,
        );
        let out = model.forward(x);
        // Reading every head back to the host is what makes the work happen.
        let _ = out.classes.into_data();
        if let Some(s) = out.states {
            let _ = s.into_data();
        }
        if let Some(d) = out.distance {
            let _ = d.into_data();
        }
    };
    for _ in 0..warmup.min(3) {
        infer_once();
    }
    let mut infer_times = Vec::with_capacity(infers);
    for _ in 0..infers {
        let t = Instant::now();
        infer_once();
        infer_times.push(t.elapsed());
    }
    Ok(TrainBench {
        steps: step_times,
        infers: infer_times,
        peak_rss: peak_rss(),
        last_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_round::median;

    #[test]
    fn a_short_run_measures_every_step_and_batch() {
        let device = crate::model::default_device();
        let r = run(&device, 1, 2, 2).unwrap();
        assert_eq!(r.steps.len(), 2);
        assert_eq!(r.infers.len(), 2);
        assert!(r.last_loss.is_finite() && r.last_loss > 0.0, "{r:?}");
        assert!(median(&r.steps) > Duration::ZERO);
        assert_eq!(
            median(&[
                Duration::from_millis(3),
                Duration::from_millis(1),
                Duration::from_millis(2)
            ]),
            Duration::from_millis(2)
        );
    }
}
