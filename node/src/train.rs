//! Local training on a site's movies.
//!
//! [`Trainer`] runs a custom Adam loop (as in burn's `custom-training-loop` example) on
//! augmented patches. The loss is a class-weighted cross-entropy over the three pixel
//! classes, plus an optional soft Dice term, plus a cell-state cross-entropy on cell
//! pixels whose state is known, plus (with a distance head) a binary cross-entropy of the
//! predicted normalised distance against its target, weighted per pixel like the class
//! loss (as StarDist trains its object probabilities), plus an optional FedProx proximal term
//! `mu * ||w - w0||^2` pulling the weights towards the round's starting model `w0`
//! (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, write
//! `mu/2`; our `mu` is theirs halved).
//!
//! Training is cancellable between steps (an [`AtomicBool`]) and bounded by steps or by
//! wall-clock time. [`params`] converts the model to and from [`Weights`].

pub mod params;
pub mod site;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::module::{ModuleVisitor, Param, ParamId};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use cellswarm_common::weights::Weights;

use crate::data::normalize::CLASSES;
use crate::data::patches::{Batch, NO_STATE, PatchSampler, PlaneSet, SamplerConfig, TrainPlane};
use crate::model::{UNet, UNetConfig};
use params::{ParamsError, load_weights, to_weights};

/// What went wrong setting up or running training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// No training planes.
    #[error("no annotated training data")]
    NoData,
    /// The patch size does not suit the network.
    #[error("patch size {patch} is not a multiple of 2^depth = {granule}")]
    PatchSize {
        /// The patch size.
        patch: usize,
        /// Required multiple.
        granule: usize,
    },
    /// Fixed class weights of the wrong length.
    #[error("{got} class weights given; the network has {CLASSES} pixel classes")]
    ClassWeights {
        /// How many were given.
        got: usize,
    },
    /// The loss became NaN or infinite.
    #[error("training diverged at step {step} (loss {loss}); lower the learning rate")]
    Diverged {
        /// The step.
        step: u64,
        /// The loss.
        loss: f32,
    },
    /// Converting parameters failed.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// A streamed movie's first frames could not be read.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Patches per step.
    pub batch: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Weight of the soft Dice term (0: off).
    pub dice_weight: f32,
    /// Weight of the cell-state loss.
    pub state_weight: f32,
    /// Weight of the distance head's loss (models with one).
    pub distance_weight: f32,
    /// FedProx mu (0: off).
    pub fedprox_mu: f32,
    /// Seed for initialisation, sampling and augmentation.
    pub seed: u64,
    /// Patch sampling.
    pub sampler: SamplerConfig,
    /// Decay the learning rate along a cosine to 5% of its value over the budget
    /// (single-site training; the swarm keeps it constant within a round).
    pub cosine_decay: bool,
    /// Fixed loss weights of the pixel classes (a consortium's agreed weights); `None`
    /// draws them from the training frames' class frequencies (single-site training).
    pub class_weights: Option<Vec<f32>>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            batch: 8,
            learning_rate: 1e-3,
            dice_weight: 0.0,
            state_weight: 0.5,
            distance_weight: 1.0,
            fedprox_mu: 0.0,
            seed: 0,
            sampler: SamplerConfig::default(),
            cosine_decay: false,
            class_weights: None,
        }
    }
}

/// When to stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// A number of optimiser steps.
    Steps(u64),
    /// Wall-clock time (checked between steps).
    Time(Duration),
}

/// What a training run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainReport {
    /// Steps taken.
    pub steps: u64,
    /// Patches seen.
    pub samples: u64,
    /// Mean loss over the run.
    pub mean_loss: f32,
    /// Loss of the last step.
    pub last_loss: f32,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// Whether it stopped because of cancellation.
    pub cancelled: bool,
}

/// The consortium's agreed pixel-class weights (`[model] class_weights`), as
/// [`TrainOptions::class_weights`] takes them.
#[must_use]
pub fn agreed_class_weights(spec: &cellswarm_common::config::ModelSpec) -> Option<Vec<f32>> {
    Some(spec.class_weights.iter().map(|&w| w as f32).collect())
}

/// Class weights `1/sqrt(frequency)`, normalised so the average pixel weighs 1, and
/// capped at 10.
#[must_use]
pub fn class_weights(counts: &[u64]) -> Vec<f32> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return vec![1.0; counts.len()];
    }
    let freq: Vec<f64> = counts
        .iter()
        .map(|&c| (c as f64 / total as f64).max(1e-6))
        .collect();
    let raw: Vec<f64> = freq.iter().map(|f| 1.0 / f.sqrt()).collect();
    let mean: f64 = freq.iter().zip(&raw).map(|(f, w)| f * w).sum();
    raw.iter().map(|w| ((w / mean).min(10.0)) as f32).collect()
}

/// Cell-state loss weights: `1/frequency`, normalised so the average labelled pixel
/// weighs 1, capped at [`STATE_WEIGHT_CAP`]. Fully balanced, unlike the pixel classes:
/// a dying cell is rarer than one pixel in a hundred, and at the classes' `1/sqrt` with
/// its cap of 10 the state head never learnt it.
#[must_use]
pub fn state_weights(counts: &[u64]) -> Vec<f32> {
    let total: u64 = counts.iter().sum();
    let present = counts.iter().filter(|&&c| c > 0).count();
    if total == 0 {
        return vec![1.0; counts.len()];
    }
    counts
        .iter()
        .map(|&c| {
            if c == 0 {
                1.0
            } else {
                // Each present class then carries 1/present of the total weight.
                (total as f64 / (present as f64 * c as f64)).min(STATE_WEIGHT_CAP) as f32
            }
        })
        .collect()
}

/// Largest cell-state loss weight.
pub const STATE_WEIGHT_CAP: f64 = 50.0;

/// Collects the proximal term's reference weights `w0` by parameter id, as plain data
/// (tensors kept across steps would stay tied to an already consumed autodiff tape).
struct Anchor(HashMap<ParamId, TensorData>);

impl ModuleVisitor for Anchor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.0.insert(param.id, t.reshape([n]).into_data());
    }
}

/// Sums `||w - w0||^2` over the parameters (with gradients flowing into `w`).
struct Proximal<'a> {
    anchor: &'a HashMap<ParamId, TensorData>,
    device: &'a Device,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for Proximal<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(w0) = self.anchor.get(&param.id) else {
            return;
        };
        let w = param.val();
        let n = w.shape().num_elements();
        let d = w.reshape([n]) - Tensor::<1>::from_data(w0.clone(), self.device);
        let s = (d.clone() * d).sum();
        self.total = Some(match self.total.take() {
            Some(t) => t + s,
            None => s,
        });
    }
}

/// Local training of a U-Net on augmented patches.
pub struct Trainer {
    device: Device,
    model: UNet,
    optim: ModuleOptimizer,
    sampler: PatchSampler,
    options: TrainOptions,
    class_weights: Vec<f32>,
    state_weights: Vec<f32>,
    states: usize,
    anchor: Option<HashMap<ParamId, TensorData>>,
    steps: u64,
    /// A cosine decay over a longer run than one `train` call: (steps done before this
    /// call, steps of the whole run).
    span: Option<(u64, u64)>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("steps", &self.steps)
            .field("options", &self.options)
            .field("class_weights", &self.class_weights)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A trainer for a new network of `config` (or `init` weights) on `planes` (a
    /// `Vec<TrainPlane>`, or a [`PlaneSet::Streamed`] movie; the class and state weights
    /// of a streamed movie come from the frames it holds first).
    ///
    /// # Errors
    /// No planes, a patch size the network cannot take, weights that do not fit, or a
    /// streamed movie whose first frames cannot be read.
    pub fn new(
        config: &UNetConfig,
        device: &Device,
        planes: impl Into<PlaneSet>,
        options: TrainOptions,
        init: Option<&Weights>,
    ) -> Result<Self, TrainError> {
        let planes = planes.into();
        if matches!(&planes, PlaneSet::Resident(p) if p.is_empty()) {
            return Err(TrainError::NoData);
        }
        if let Some(w) = options
            .class_weights
            .as_ref()
            .filter(|w| w.len() != CLASSES)
        {
            return Err(TrainError::ClassWeights { got: w.len() });
        }
        let granule = config.granule();
        if !options.sampler.patch.is_multiple_of(granule) || options.sampler.patch == 0 {
            return Err(TrainError::PatchSize {
                patch: options.sampler.patch,
                granule,
            });
        }
        // The distance head's targets, only for a network that has the head.
        let sampler = match planes {
            PlaneSet::Resident(planes) => {
                let planes = if config.distance {
                    planes.into_iter().map(TrainPlane::with_distance).collect()
                } else {
                    planes
                };
                PatchSampler::new(planes, options.sampler, options.seed)
            }
            PlaneSet::Streamed(stream) => PatchSampler::streamed(
                stream.with_distance(config.distance),
                options.sampler,
                options.seed,
            )?,
        };
        let mut counts = [0u64; CLASSES];
        let mut state_counts = vec![0u64; config.cell_states];
        for p in sampler.planes() {
            for (c, n) in counts.iter_mut().zip(p.class_counts()) {
                *c += n;
            }
            for &s in &p.states {
                if let Some(c) = state_counts.get_mut(s as usize) {
                    *c += 1;
                }
            }
        }
        let device = device.clone().autodiff();
        device.seed(options.seed);
        let mut model = config.init(&device);
        if let Some(w) = init {
            load_weights(&mut model, w)?;
        }
        Ok(Self {
            device,
            model,
            optim: AdamConfig::new().init(),
            sampler,
            class_weights: match &options.class_weights {
                Some(w) => w.clone(),
                None => class_weights(&counts),
            },
            state_weights: state_weights(&state_counts),
            states: config.cell_states,
            options,
            anchor: None,
            steps: 0,
            span: None,
        })
    }

    /// Replaces the weights (the start of a swarm round). The Adam state is kept.
    ///
    /// # Errors
    /// Weights that do not fit the model.
    pub fn load(&mut self, weights: &Weights) -> Result<(), TrainError> {
        load_weights(&mut self.model, weights)?;
        Ok(())
    }

    /// Decays the learning rate along one cosine over a run longer than the next
    /// [`train`](Self::train) call (the rounds of a swarm): `done` steps of `total` are
    /// behind it. Overrides `cosine_decay`.
    pub fn set_cosine_span(&mut self, done: u64, total: u64) {
        self.span = Some((done, total.max(1)));
    }

    /// Makes the current weights the FedProx reference `w0` (when `fedprox_mu > 0`).
    pub fn set_anchor(&mut self) {
        if self.options.fedprox_mu > 0.0 {
            let mut a = Anchor(HashMap::new());
            self.model.valid().visit(&mut a);
            self.anchor = Some(a.0);
        }
    }

    /// The current weights.
    ///
    /// # Errors
    /// Non-finite parameters.
    pub fn weights(&self) -> Result<Weights, TrainError> {
        Ok(to_weights(&self.model.valid())?)
    }

    /// The model without autodiff, for inference.
    #[must_use]
    pub fn model(&self) -> UNet {
        self.model.valid()
    }

    /// Steps taken so far.
    #[must_use]
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Per-class loss weights in use.
    #[must_use]
    pub fn class_weight_values(&self) -> &[f32] {
        &self.class_weights
    }

    fn tensors(
        &self,
        b: &Batch,
    ) -> (
        Tensor<4>,
        Tensor<4>,
        Tensor<4>,
        Option<(Tensor<4>, Tensor<4>)>,
    ) {
        let (n, p) = (b.n, b.patch);
        let px = n * p * p;
        let images = Tensor::from_data(
            TensorData::new(b.images.clone(), [n, 1, p, p]),
            &self.device,
        );
        let mut onehot = vec![0f32; CLASSES * px];
        let mut weight = vec![0f32; px];
        for (i, &c) in b.classes.iter().enumerate() {
            let (img, pix) = (i / (p * p), i % (p * p));
            onehot[(img * CLASSES + c as usize) * p * p + pix] = 1.0;
            weight[i] = self.class_weights[c as usize];
        }
        let onehot = Tensor::from_data(TensorData::new(onehot, [n, CLASSES, p, p]), &self.device);
        let weight = Tensor::from_data(TensorData::new(weight, [n, 1, p, p]), &self.device);
        let states = (self.states > 0 && b.states.iter().any(|&s| s != NO_STATE)).then(|| {
            let s = self.states;
            let mut oh = vec![0f32; s * px];
            let mut w = vec![0f32; px];
            for (i, &st) in b.states.iter().enumerate() {
                if (st as usize) < s && b.classes[i] != 0 {
                    let (img, pix) = (i / (p * p), i % (p * p));
                    oh[(img * s + st as usize) * p * p + pix] = 1.0;
                    w[i] = self.state_weights[st as usize];
                }
            }
            (
                Tensor::from_data(TensorData::new(oh, [n, s, p, p]), &self.device),
                Tensor::from_data(TensorData::new(w, [n, 1, p, p]), &self.device),
            )
        });
        (images, onehot, weight, states)
    }

    /// One optimiser step on a fresh batch at the configured learning rate.
    pub fn step(&mut self) -> f32 {
        self.step_with_lr(self.options.learning_rate)
    }

    /// One optimiser step on a fresh batch at learning rate `lr`; returns the loss.
    pub fn step_with_lr(&mut self, lr: f64) -> f32 {
        let batch = self.sampler.batch(self.options.batch);
        let (x, onehot, weight, states) = self.tensors(&batch);
        let out = self.model.forward(x);
        let total_w: f32 = weight.clone().sum().into_scalar();
        let ce = (onehot.clone() * log_softmax(out.classes.clone(), 1))
            .sum_dim(1)
            .neg();
        let mut loss = (ce * weight.clone()).sum().div_scalar(total_w.max(1e-6));
        if let Some(logits) = out.distance {
            let (n, p) = (batch.n, batch.patch);
            let target = Tensor::<4>::from_data(
                TensorData::new(batch.distance.clone(), [n, 1, p, p]),
                &self.device,
            );
            // Binary cross-entropy with logits x against t, in the stable form
            // max(x, 0) - x t + log(1 + e^-|x|).
            let bce = logits.clone().clamp_min(0.0) - logits.clone() * target
                + logits.abs().neg().exp().log1p();
            loss = loss
                + (bce * weight)
                    .sum()
                    .div_scalar(total_w.max(1e-6))
                    .mul_scalar(self.options.distance_weight);
        }
        if self.options.dice_weight > 0.0 {
            let probs = softmax(out.classes, 1);
            let inter = (probs.clone() * onehot.clone())
                .sum_dim(0)
                .sum_dim(2)
                .sum_dim(3);
            let denom = (probs + onehot).sum_dim(0).sum_dim(2).sum_dim(3);
            let dice = (inter.mul_scalar(2.0).add_scalar(1.0) / denom.add_scalar(1.0)).mean();
            loss = loss
                + dice
                    .neg()
                    .add_scalar(1.0)
                    .mul_scalar(self.options.dice_weight);
        }
        if let (Some(logits), Some((soh, sw))) = (out.states, states) {
            let w: f32 = sw.clone().sum().into_scalar();
            if w > 0.0 {
                let sce = (soh * log_softmax(logits, 1)).sum_dim(1).neg();
                loss = loss
                    + (sce * sw)
                        .sum()
                        .div_scalar(w)
                        .mul_scalar(self.options.state_weight);
            }
        }
        if let Some(anchor) = &self.anchor {
            let mut prox = Proximal {
                anchor,
                device: &self.device,
                total: None,
            };
            self.model.visit(&mut prox);
            if let Some(t) = prox.total {
                loss = loss + t.mul_scalar(self.options.fedprox_mu);
            }
        }
        let value: f32 = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.model = self.optim.step(lr, self.model.clone(), grads);
        self.steps += 1;
        value
    }

    /// Trains until the budget is spent or `cancel` is set; calls `on_step(step, loss)`
    /// after every step.
    ///
    /// # Errors
    /// [`TrainError::Diverged`] if the loss becomes non-finite.
    pub fn train(
        &mut self,
        budget: Budget,
        cancel: &AtomicBool,
        mut on_step: impl FnMut(u64, f32),
    ) -> Result<TrainReport, TrainError> {
        let start = Instant::now();
        let (mut n, mut sum, mut last) = (0u64, 0f64, f32::NAN);
        let mut cancelled = false;
        loop {
            let done = match budget {
                Budget::Steps(s) => n >= s,
                Budget::Time(d) => start.elapsed() >= d,
            };
            if done {
                break;
            }
            if cancel.load(Ordering::Relaxed) {
                cancelled = true;
                break;
            }
            let progress = match budget {
                Budget::Steps(s) => n as f64 / s.max(1) as f64,
                Budget::Time(d) => start.elapsed().as_secs_f64() / d.as_secs_f64().max(1e-9),
            };
            let progress = match self.span {
                Some((done, total)) => Some((done + n) as f64 / total as f64),
                None => self.options.cosine_decay.then_some(progress),
            };
            let lr = match progress {
                Some(p) => {
                    let f = 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos());
                    self.options.learning_rate * (0.05 + 0.95 * f)
                }
                None => self.options.learning_rate,
            };
            last = self.step_with_lr(lr);
            if !last.is_finite() {
                return Err(TrainError::Diverged {
                    step: self.steps,
                    loss: last,
                });
            }
            n += 1;
            sum += f64::from(last);
            on_step(n, last);
        }
        Ok(TrainReport {
            steps: n,
            samples: n * self.options.batch as u64,
            mean_loss: if n > 0 {
                (sum / n as f64) as f32
            } else {
                f32::NAN
            },
            last_loss: last,
            elapsed: start.elapsed(),
            cancelled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ctc::Movie;
    use crate::data::dataset::{load_annotated, train_planes};
    use crate::model::default_device;
    use crate::synth::{Profile, generate};

    fn tiny_planes() -> Vec<TrainPlane> {
        let dir = tempfile::tempdir().unwrap();
        let p = Profile {
            size: 64,
            ..Profile::named("balanced").unwrap()
        };
        generate(&p, 3, 1).write_ctc(dir.path(), "01").unwrap();
        let movie = Movie::open(&dir.path().join("01")).unwrap();
        train_planes(&load_annotated(&movie, None).unwrap(), None)
    }

    fn options() -> TrainOptions {
        TrainOptions {
            batch: 2,
            learning_rate: 3e-3,
            seed: 5,
            // The optimiser is under test here, not augmentation: no zoom, blur or
            // noise, so 40 steps of a tiny network show the loss falling.
            sampler: SamplerConfig {
                patch: 32,
                zoom: 1.0,
                blur: 0.0,
                noise: 0.0,
                ..SamplerConfig::default()
            },
            ..TrainOptions::default()
        }
    }

    #[test]
    fn class_weights_favour_rare_classes() {
        let w = class_weights(&[900, 90, 10]);
        assert!(w[0] < w[1] && w[1] < w[2]);
        let mean: f64 = [0.9, 0.09, 0.01]
            .iter()
            .zip(&w)
            .map(|(f, w)| f * f64::from(*w))
            .sum();
        assert!((mean - 1.0).abs() < 1e-5);
        assert_eq!(class_weights(&[0, 0, 0]), vec![1.0; 3]);
    }

    #[test]
    fn agreed_class_weights_replace_the_sites_own() {
        let planes = tiny_planes();
        let cfg = UNetConfig::new().with_depth(2).with_base_channels(4);
        let device = default_device();
        let own = Trainer::new(&cfg, &device, planes.clone(), options(), None).unwrap();
        let counts = planes.iter().fold([0u64; 3], |mut c, p| {
            for (a, b) in c.iter_mut().zip(p.class_counts()) {
                *a += b;
            }
            c
        });
        assert_eq!(own.class_weight_values(), class_weights(&counts));
        let agreed = TrainOptions {
            class_weights: Some(vec![0.75, 2.25, 5.0]),
            ..options()
        };
        let t = Trainer::new(&cfg, &device, planes.clone(), agreed, None).unwrap();
        assert_eq!(t.class_weight_values(), [0.75, 2.25, 5.0]);
        let wrong = TrainOptions {
            class_weights: Some(vec![1.0, 2.0]),
            ..options()
        };
        let err = Trainer::new(&cfg, &device, planes, wrong, None).unwrap_err();
        assert!(err.to_string().contains("2 class weights given"), "{err}");
    }

    #[test]
    fn loss_falls_and_training_is_reproducible() {
        let planes = tiny_planes();
        let cfg = UNetConfig::new().with_depth(2).with_base_channels(4);
        let device = default_device();
        let run = || {
            let mut t = Trainer::new(&cfg, &device, planes.clone(), options(), None).unwrap();
            let mut losses = Vec::new();
            let r = t
                .train(Budget::Steps(40), &AtomicBool::new(false), |_, l| {
                    losses.push(l)
                })
                .unwrap();
            (r, losses, t.weights().unwrap().hash())
        };
        let (r, losses, h) = run();
        assert_eq!(r.steps, 40);
        let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
        let last: f32 = losses[35..].iter().sum::<f32>() / 5.0;
        assert!(last < 0.8 * first, "loss should fall: {first} -> {last}");
        let (_, _, h2) = run();
        assert_eq!(h, h2, "same seed, same weights");
    }

    #[test]
    fn state_weights_balance_the_states() {
        // Each present state carries the same share of the loss.
        let counts = [9000u64, 900, 100];
        let w = state_weights(&counts);
        let shares: Vec<f64> = counts
            .iter()
            .zip(&w)
            .map(|(&c, &w)| c as f64 * f64::from(w))
            .collect();
        assert!(
            shares
                .iter()
                .all(|s| (s - shares[0]).abs() < 1e-2 * shares[0])
        );
        // A state too rare is capped; an absent one weighs 1; no labels, all 1.
        assert_eq!(state_weights(&[100_000, 1, 0])[1] as f64, STATE_WEIGHT_CAP);
        assert_eq!(state_weights(&[100_000, 1, 0])[2], 1.0);
        assert_eq!(state_weights(&[0, 0, 0]), vec![1.0; 3]);
    }

    #[test]
    fn the_distance_head_learns_its_target() {
        let planes = tiny_planes();
        let cfg = UNetConfig::new()
            .with_depth(2)
            .with_base_channels(4)
            .with_distance(true);
        let device = default_device();
        // Equal class weights and no state loss: the loss is class CE plus distance BCE.
        let only_distance = TrainOptions {
            class_weights: Some(vec![1.0; CLASSES]),
            state_weight: 0.0,
            ..options()
        };
        let mut t = Trainer::new(&cfg, &device, planes.clone(), only_distance, None).unwrap();
        let mut losses = Vec::new();
        t.train(Budget::Steps(40), &AtomicBool::new(false), |_, l| {
            losses.push(l)
        })
        .unwrap();
        let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
        let last: f32 = losses[35..].iter().sum::<f32>() / 5.0;
        assert!(last < 0.9 * first, "loss should fall: {first} -> {last}");
        // The head is part of the weights a swarm exchanges, and of inference's output.
        let plain = UNetConfig::new().with_depth(2).with_base_channels(4);
        let with_head = t.weights().unwrap();
        let without = Trainer::new(&plain, &device, planes.clone(), options(), None)
            .unwrap()
            .weights()
            .unwrap();
        assert!(with_head.layout().total() > without.layout().total());
        let p = planes[0].clone().with_distance();
        let probs = crate::infer::predict_plane(
            &t.model(),
            &cfg,
            &device,
            &p.image,
            p.height,
            p.width,
            &crate::infer::InferOptions::default(),
        );
        let d = probs.distance.expect("a distance head's output");
        assert_eq!(d.len(), p.height * p.width);
        assert!(d.iter().all(|v| (0.0..=1.0).contains(v)));
        // The head learnt its target: cell centres (target above 0.5) read higher than
        // the background (target 0).
        let mean = |keep: &dyn Fn(usize) -> bool| {
            let v: Vec<f32> = (0..d.len()).filter(|&i| keep(i)).map(|i| d[i]).collect();
            v.iter().sum::<f32>() / v.len().max(1) as f32
        };
        let centres = mean(&|i| p.distance[i] > 0.5);
        let background = mean(&|i| p.classes[i] == 0);
        assert!(
            centres > background + 0.1,
            "centres {centres}, background {background}"
        );
    }

    #[test]
    fn cancellation_and_fedprox() {
        let planes = tiny_planes();
        let cfg = UNetConfig::new().with_depth(2).with_base_channels(4);
        let device = default_device();
        let mut t = Trainer::new(&cfg, &device, planes.clone(), options(), None).unwrap();
        let cancel = AtomicBool::new(true);
        let r = t.train(Budget::Steps(10), &cancel, |_, _| {}).unwrap();
        assert!(r.cancelled && r.steps == 0);
        // A strong proximal term keeps the weights near the anchor.
        let start = t.weights().unwrap();
        let drift = |mu: f32| {
            let mut t = Trainer::new(
                &cfg,
                &device,
                planes.clone(),
                TrainOptions {
                    fedprox_mu: mu,
                    ..options()
                },
                Some(&start),
            )
            .unwrap();
            t.set_anchor();
            t.train(Budget::Steps(15), &AtomicBool::new(false), |_, _| {})
                .unwrap();
            let w = t.weights().unwrap();
            cellswarm_common::delta::Delta::between(&start, &w)
                .unwrap()
                .l2_norm()
        };
        let (free, held) = (drift(0.0), drift(10.0));
        assert!(
            held < 0.7 * free,
            "FedProx should hold weights: {held} vs {free}"
        );
    }
}
