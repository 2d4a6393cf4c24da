//! Local training as the swarm sees it: any function that turns the round's model into
//! an updated model.
//!
//! [`LocalTrainer`] is implemented by `crate::train::site::UNetTrainer` (a site's movies
//! and the U-Net, kept with training so that the swarm never imports the model) and by
//! [`VectorTrainer`] (the `test-vector` model: a flat vector that each site pulls towards
//! its own target; cheap and deterministic, for protocol tests and benchmarks).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cellswarm_common::ids::RoundId;
use cellswarm_common::weights::{Layout, Weights};
use cellswarm_common::wire::LocalMetrics;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The result of one round of local training.
#[derive(Debug, Clone)]
pub struct TrainedRound {
    /// The updated weights.
    pub weights: Weights,
    /// Samples (patches) seen: the FedAvg weight.
    pub samples: u64,
    /// Metrics reported with the delta.
    pub metrics: LocalMetrics,
}

/// Why a round of local training gave no update.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The round ended (or the node stops) before training finished.
    #[error("cancelled")]
    Cancelled,
    /// Training failed: it diverged, or the weights do not fit the model.
    #[error("training failed: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Turns the round's model into an updated model on this site's data.
pub trait LocalTrainer: Send + 'static {
    /// The model's initial weights (the genesis model), from `seed`.
    fn genesis(&mut self, seed: u64) -> Weights;

    /// One round of training from `base`; stops early when `cancel` is set.
    ///
    /// # Errors
    /// Training was cancelled, or failed (diverged, weights do not fit).
    fn train_round(
        &mut self,
        base: &Weights,
        round: RoundId,
        cancel: &AtomicBool,
    ) -> Result<TrainedRound, RoundError>;

    /// F1 at IoU 0.5 of `model` on this site's held-out frames, if it has any.
    fn evaluate(&mut self, model: &Weights) -> Option<f32>;
}

/// The `test-vector` model: `params` values in 4 tensors; each round moves the weights a
/// fixed fraction towards a target drawn from the site's seed. Its merge under FedAvg
/// converges to the mean target, so convergence and damage are easy to see. The target is
/// a hash of (seed, index), computed as it is used rather than held (at 8M parameters a
/// held target would be 32 MB per site of "training data" in the protocol benchmark).
#[derive(Debug, Clone)]
pub struct VectorTrainer {
    layout: Arc<Layout>,
    key: u32,
    rate: f32,
    delay: Duration,
    samples: u64,
}

impl VectorTrainer {
    /// A site with `params` parameters, its target from `seed`, taking `delay` per round
    /// (cancellable) to stand in for real training time.
    ///
    /// # Panics
    /// Never for `params` >= 1 (validated in the consortium file).
    #[must_use]
    pub fn new(params: usize, seed: u64, delay: Duration) -> Self {
        let layout = vector_layout(params);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self {
            layout,
            key: rng.random(),
            rate: 0.5,
            delay,
            samples: 100 + seed % 100,
        }
    }

    /// The site's target (computed).
    #[must_use]
    pub fn target(&self) -> Vec<f32> {
        (0..self.layout.total())
            .map(|i| target_at(self.key, i))
            .collect()
    }
}

/// The target value at index `i` for a site's key: uniform in [-1, 1) from a 32-bit
/// integer hash (lowbias32 by Chris Wellons), which vectorises.
#[inline]
fn target_at(key: u32, i: usize) -> f32 {
    let mut h = (i as u32) ^ key;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    // 24 random bits -> [0, 2) -> [-1, 1).
    (h >> 8) as f32 * (2.0 / 16_777_216.0) - 1.0
}

/// The layout of a `test-vector` model of `params` values.
///
/// # Panics
/// Never for `params` >= 1.
#[must_use]
pub fn vector_layout(params: usize) -> Arc<Layout> {
    let parts = params.clamp(1, 4);
    Arc::new(
        Layout::new((0..parts).map(|i| {
            let n = params / parts + usize::from(i < params % parts);
            (format!("vector.{i}"), vec![n.max(1)])
        }))
        .expect("distinct names, non-zero sizes"),
    )
}

impl LocalTrainer for VectorTrainer {
    fn genesis(&mut self, _seed: u64) -> Weights {
        Weights::zeros(Arc::clone(&self.layout))
    }

    fn train_round(
        &mut self,
        base: &Weights,
        _round: RoundId,
        cancel: &AtomicBool,
    ) -> Result<TrainedRound, RoundError> {
        let start = Instant::now();
        while start.elapsed() < self.delay {
            if cancel.load(Ordering::Relaxed) {
                return Err(RoundError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(10).min(self.delay));
        }
        let key = self.key;
        let base_v = base.values();
        // Eight independent loss lanes so that the loop vectorises (one f32 sum in
        // index order would chain every addition).
        let mut values = vec![0f32; base_v.len()];
        let mut lanes = [0f32; 8];
        for (c, (out, w)) in values.chunks_mut(8).zip(base_v.chunks(8)).enumerate() {
            for (j, (o, &w)) in out.iter_mut().zip(w).enumerate() {
                let t = target_at(key, c * 8 + j);
                lanes[j] += (w - t) * (w - t);
                *o = w + self.rate * (t - w);
            }
        }
        let loss = lanes.iter().sum::<f32>() / base_v.len().max(1) as f32;
        let weights = Weights::from_flat(Arc::clone(base.layout()), values)
            .map_err(|e| RoundError::Failed(Box::new(e)))?;
        Ok(TrainedRound {
            weights,
            samples: self.samples,
            metrics: LocalMetrics {
                train_loss: loss,
                val_f1: None,
                steps: 1,
                epsilon: None,
            },
        })
    }

    fn evaluate(&mut self, _model: &Weights) -> Option<f32> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_sites_pull_towards_their_targets() {
        let mut a = VectorTrainer::new(10, 1, Duration::ZERO);
        let base = a.genesis(0);
        let r = a
            .train_round(&base, RoundId(1), &AtomicBool::new(false))
            .unwrap();
        for (w, t) in r.weights.values().iter().zip(a.target()) {
            assert!((w - 0.5 * t).abs() < 1e-6);
        }
        assert!(r.metrics.train_loss > 0.0);
        let b = VectorTrainer::new(10, 2, Duration::ZERO);
        assert_ne!(a.target(), b.target());
        let slow = &mut VectorTrainer::new(10, 1, Duration::from_secs(60));
        let cancel = AtomicBool::new(true);
        assert!(slow.train_round(&base, RoundId(1), &cancel).is_err());
    }
}
