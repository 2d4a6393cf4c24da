//! A site's U-Net as the swarm trains it: [`UNetTrainer`] implements the swarm's
//! [`LocalTrainer`] (steps per round on the site's movies, FedProx if configured, the
//! held-out frames scored after each merge), and [`movie_counts`] scores a model on one
//! movie the way `cellswarm segment` sees it (one cell width for the whole movie).

use std::sync::atomic::AtomicBool;

use cellswarm_common::ids::RoundId;
use cellswarm_common::weights::Weights;
use cellswarm_common::wire::LocalMetrics;

use super::params::to_weights;
use super::{Budget, TrainOptions, Trainer};
use crate::data::dataset::Annotated;
use crate::infer::{InferOptions, estimate_width_with_pass, labels_from, segment};
use crate::metrics::{MatchCounts, Overlaps, match_counts};
use burn::prelude::Device;

use crate::model::{UNet, UNetConfig};
use crate::swarm::local::{LocalTrainer, RoundError, TrainedRound};

/// Object matches at IoU 0.5 of `net` on `frames`, the frames of one movie, segmented at
/// one cell width estimated on the movie's middle frame (as `cellswarm segment` does), so
/// every frame is seen at the same scale. Counts add up over movies.
#[must_use]
pub fn movie_counts(
    net: &UNet,
    config: &UNetConfig,
    device: &Device,
    frames: &[Annotated],
    opts: &InferOptions,
) -> MatchCounts {
    let mut opts = *opts;
    let mid = frames.len() / 2;
    // The middle frame's probabilities from the width estimate, where they are the ones
    // segmenting it at that width would compute again.
    let mut estimated = None;
    if let (Some(target), Some(a), None) = (config.diameter, frames.get(mid), opts.diameter) {
        let (width, planes) = estimate_width_with_pass(net, config, device, &a.image, &opts);
        opts.diameter = Some(width.unwrap_or(target as f32));
        estimated = planes;
    }
    let mut counts = MatchCounts::default();
    for (i, a) in frames.iter().enumerate() {
        let pred = match estimated.take_if(|_| i == mid) {
            Some(planes) => labels_from(&planes, &opts),
            None => segment(net, config, device, &a.image, &opts),
        };
        counts += match_counts(&Overlaps::new(&a.labels, &pred), 0.5);
    }
    counts
}

/// A site's U-Net training for the swarm: steps per round on its movies, FedProx if
/// configured, the held-out frames scored after each merge.
pub struct UNetTrainer {
    config: UNetConfig,
    trainer: Trainer,
    steps: u64,
    heldout: Vec<Annotated>,
    infer: InferOptions,
    cosine_rounds: Option<u64>,
}

impl std::fmt::Debug for UNetTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UNetTrainer")
            .field("steps", &self.steps)
            .field("heldout", &self.heldout.len())
            .finish_non_exhaustive()
    }
}

impl UNetTrainer {
    /// A trainer over `train` planes, scoring `heldout` frames.
    ///
    /// # Errors
    /// As [`Trainer::new`].
    pub fn new(
        config: UNetConfig,
        train: &[Annotated],
        heldout: Vec<Annotated>,
        options: TrainOptions,
        steps: u64,
    ) -> Result<Self, super::TrainError> {
        let planes = crate::data::dataset::train_planes(train, config.diameter);
        Self::with_planes(config, planes.into(), heldout, options, steps)
    }

    /// A trainer over `planes` (in memory or streamed), scoring `heldout` frames.
    ///
    /// # Errors
    /// As [`Trainer::new`].
    pub fn with_planes(
        config: UNetConfig,
        planes: crate::data::patches::PlaneSet,
        heldout: Vec<Annotated>,
        options: TrainOptions,
        steps: u64,
    ) -> Result<Self, super::TrainError> {
        let device = crate::model::default_device();
        let trainer = Trainer::new(&config, &device, planes, options, None)?;
        Ok(Self {
            config,
            trainer,
            steps,
            heldout,
            infer: InferOptions::default(),
            cosine_rounds: None,
        })
    }

    /// Decays the learning rate along one cosine over `rounds` rounds (to 5 % in the
    /// last), by the round number each round trains for.
    #[must_use]
    pub fn with_cosine_rounds(mut self, rounds: u64) -> Self {
        self.cosine_rounds = Some(rounds.max(1));
        self
    }
}

impl LocalTrainer for UNetTrainer {
    fn genesis(&mut self, seed: u64) -> Weights {
        let device = crate::model::default_device();
        device.seed(seed);
        let model = self.config.init(&device);
        to_weights(&model)
            .unwrap_or_else(|e| unreachable!("a freshly initialised model is finite: {e}"))
    }

    fn train_round(
        &mut self,
        base: &Weights,
        round: RoundId,
        cancel: &AtomicBool,
    ) -> Result<TrainedRound, RoundError> {
        let failed = |e: crate::train::TrainError| RoundError::Failed(Box::new(e));
        self.trainer.load(base).map_err(failed)?;
        self.trainer.set_anchor();
        if let Some(total) = self.cosine_rounds {
            let done = round.0.saturating_sub(1).min(total) * self.steps;
            self.trainer.set_cosine_span(done, total * self.steps);
        }
        let report = self
            .trainer
            .train(Budget::Steps(self.steps), cancel, |_, _| {})
            .map_err(failed)?;
        if report.cancelled {
            return Err(RoundError::Cancelled);
        }
        Ok(TrainedRound {
            weights: self.trainer.weights().map_err(failed)?,
            samples: report.samples,
            metrics: LocalMetrics {
                train_loss: report.mean_loss,
                val_f1: None,
                steps: report.steps as u32,
                epsilon: None,
            },
        })
    }

    fn evaluate(&mut self, model: &Weights) -> Option<f32> {
        if self.heldout.is_empty() {
            return None;
        }
        let device = crate::model::default_device();
        let mut net = self.config.init(&device);
        super::params::load_weights(&mut net, model).ok()?;
        // Movie by movie, each at one cell width (as the demo scores them).
        let mut counts = MatchCounts::default();
        for movie in self.heldout.chunk_by(|a, b| a.movie == b.movie) {
            counts += movie_counts(&net, &self.config, &device, movie, &self.infer);
        }
        Some(counts.scores(0.5).f1 as f32)
    }
}
