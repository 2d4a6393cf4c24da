//! The merge pipeline: validate, select, one fused pass over the parameters, commit.
//!
//! [`Merger::merge`] is a pure function of the merger's committed state, the base model
//! and the set of updates:
//!
//! 1. [`View::new`]: refuse duplicate signers, wrong base hashes and layouts; sort by
//!    signer; compute each update's clipping factor from its precomputed norm.
//! 2. [`Strategy::select`]: which updates take part and with which coefficients.
//! 3. One parallel pass over fixed chunks of [`CHUNK`] parameters: the strategy's
//!    aggregate, plus central-DP noise from the round's public seed, plus the server step
//!    (`x + g`, or an adaptive optimiser reading and writing its moments), with a check
//!    that every result is finite. Each input value is read once.
//! 4. The result carries the *next* state (optimiser moments, DP accountant). Nothing
//!    changes until [`Merger::commit`], so a member that recomputes a merger's record and
//!    finds a different hash simply drops the result.

use std::sync::{Arc, Mutex};

use cellswarm_common::config::{AggregationConfig, StrategyKind};
use cellswarm_common::ids::{DeltaHash, ModelHash, RoundId, SignerKey};
use cellswarm_common::weights::{Layout, Weights};
use rayon::prelude::*;

thread_local! {
    /// One chunk of base values, for merges written over the base (`merge_owned`).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

use crate::dp::{GaussianStream, RdpAccountant, noise_seed};
use crate::error::AggregateError;
use crate::kernels::{self, CHUNK};
use crate::server::{
    Adaptive, AdaptiveParams, MomentChunk, ServerOptimizer, adaptive_chunk, sgd_chunk,
};
use crate::strategy::{FedAvg, Krum, Median, Selection, Strategy, TrimmedMean};
use crate::update::{Update, View};

/// Central differential privacy on the aggregate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CentralDp {
    /// Noise standard deviation divided by the L2 sensitivity.
    pub noise_multiplier: f64,
    /// The delta of the (epsilon, delta) reported.
    pub delta: f64,
}

/// State carried from round to round: optimiser moments and the DP accountant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MergerState {
    /// Merges committed so far.
    pub step: u64,
    /// Adaptive optimiser moments `(m, v)`, created at the first merge.
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
    /// Privacy spent by central DP.
    pub accountant: RdpAccountant,
}

const STATE_MAGIC: [u8; 4] = *b"CSAG";
const STATE_VERSION: u16 = 1;

/// What a merge did, and the state to commit if its result is accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Updates included, in signer order, with their delta hashes.
    pub included: Vec<(SignerKey, DeltaHash)>,
    /// Updates left out by the strategy (Krum).
    pub excluded: Vec<SignerKey>,
    /// Updates scaled down by clipping.
    pub clipped: Vec<SignerKey>,
    /// Standard deviation of the central-DP noise added to each coordinate.
    pub noise_std: Option<f64>,
    /// Central-DP epsilon spent including this round.
    pub epsilon: Option<f64>,
    /// The state after this merge.
    pub next_state: MergerState,
}

/// A merged model.
#[derive(Debug, Clone)]
pub struct Merged {
    /// The next model M(r).
    pub weights: Weights,
    /// Its hash H(r).
    pub hash: ModelHash,
    /// What happened.
    pub outcome: Outcome,
}

impl Merged {
    /// The merged model of these values, hashed.
    fn new(
        layout: Arc<Layout>,
        values: Vec<f32>,
        outcome: Outcome,
    ) -> Result<Self, AggregateError> {
        let weights = Weights::from_flat(layout, values)
            .map_err(|e| AggregateError::NonFinite(e.to_string()))?;
        let hash = weights.hash();
        Ok(Self {
            weights,
            hash,
            outcome,
        })
    }
}

/// A configured merge pipeline with its committed state.
#[derive(Debug)]
pub struct Merger {
    name: &'static str,
    strategy: Box<dyn Strategy>,
    server: ServerOptimizer,
    clip_norm: Option<f64>,
    central_dp: Option<CentralDp>,
    state: MergerState,
    /// Moment buffers of a state that was replaced, reused by the next merge so that an
    /// adaptive optimiser does not fault in 2 x P fresh pages every round.
    spare: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl Merger {
    /// A merger from its parts.
    ///
    /// # Errors
    /// [`AggregateError::InvalidConfig`] for a non-positive clip norm, central DP without
    /// clipping or with a non-linear strategy, or bad optimiser parameters.
    pub fn new(
        strategy: Box<dyn Strategy>,
        server: ServerOptimizer,
        clip_norm: Option<f64>,
        central_dp: Option<CentralDp>,
    ) -> Result<Self, AggregateError> {
        if let Some(c) = clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(AggregateError::InvalidConfig(format!(
                "clip norm must be positive, got {c}"
            )));
        }
        if let ServerOptimizer::Adaptive(_, p) = &server {
            p.validate()?;
        }
        if let Some(dp) = central_dp {
            if clip_norm.is_none() {
                return Err(AggregateError::InvalidConfig(
                    "central DP needs a clip norm to bound each member's influence".into(),
                ));
            }
            if !strategy.is_linear() {
                return Err(AggregateError::InvalidConfig(format!(
                    "central DP needs a linear strategy (its sensitivity is known); {} is not",
                    strategy.name()
                )));
            }
            if !(dp.noise_multiplier.is_finite()
                && dp.noise_multiplier > 0.0
                && dp.delta > 0.0
                && dp.delta < 1.0)
            {
                return Err(AggregateError::InvalidConfig(format!(
                    "central DP needs noise_multiplier > 0 and delta in (0, 1), got {dp:?}"
                )));
            }
        }
        let name = match server {
            ServerOptimizer::Adaptive(a, _) => a.name(),
            ServerOptimizer::Sgd => strategy.name(),
        };
        Ok(Self {
            name,
            strategy,
            server,
            clip_norm,
            central_dp,
            state: MergerState::default(),
            spare: Mutex::new(None),
        })
    }

    /// The merger a consortium's `[aggregation]` section describes.
    ///
    /// # Errors
    /// As [`Merger::new`], and secure aggregation with a strategy that must see each update.
    pub fn from_config(cfg: &AggregationConfig) -> Result<Self, AggregateError> {
        let weighted = FedAvg {
            max_samples: cfg.max_samples.unwrap_or(u64::MAX),
            ..FedAvg::new(true)
        };
        let adaptive = |kind| {
            ServerOptimizer::Adaptive(
                kind,
                AdaptiveParams {
                    lr: cfg.server_learning_rate as f32,
                    beta1: cfg.server_beta1 as f32,
                    beta2: cfg.server_beta2 as f32,
                    tau: cfg.server_tau as f32,
                },
            )
        };
        let f = cfg.byzantine as usize;
        let (strategy, server): (Box<dyn Strategy>, ServerOptimizer) = match cfg.strategy {
            StrategyKind::FedAvg => (
                Box::new(FedAvg {
                    step: cfg.server_step,
                    ..weighted
                }),
                ServerOptimizer::Sgd,
            ),
            StrategyKind::FedAvgUnweighted => (
                Box::new(FedAvg {
                    weighted: false,
                    step: cfg.server_step,
                    ..weighted
                }),
                ServerOptimizer::Sgd,
            ),
            StrategyKind::FedAdam => (Box::new(weighted), adaptive(Adaptive::Adam)),
            StrategyKind::FedYogi => (Box::new(weighted), adaptive(Adaptive::Yogi)),
            StrategyKind::FedAdagrad => (Box::new(weighted), adaptive(Adaptive::Adagrad)),
            StrategyKind::Median => (Box::new(Median), ServerOptimizer::Sgd),
            StrategyKind::TrimmedMean => (
                Box::new(TrimmedMean::new(cfg.trim_beta)?),
                ServerOptimizer::Sgd,
            ),
            StrategyKind::Krum => (Box::new(Krum::new(f)), ServerOptimizer::Sgd),
            StrategyKind::MultiKrum => (
                Box::new(Krum::multi(f, cfg.multi_krum_keep.map(|k| k as usize))),
                ServerOptimizer::Sgd,
            ),
        };
        if cfg.secure_aggregation && !strategy.is_linear() {
            return Err(AggregateError::InvalidConfig(format!(
                "secure aggregation reveals only the sum of updates; {} must see each update",
                strategy.name()
            )));
        }
        let dp = cfg.central_dp.map(|d| CentralDp {
            noise_multiplier: d.noise_multiplier,
            delta: d.delta,
        });
        Self::new(strategy, server, cfg.clip_norm, dp)
    }

    /// The strategy's config name (as written in merge records).
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The strategy.
    #[must_use]
    pub fn strategy(&self) -> &dyn Strategy {
        &*self.strategy
    }

    /// The committed state.
    #[must_use]
    pub fn state(&self) -> &MergerState {
        &self.state
    }

    /// Central-DP epsilon spent so far, if central DP is on.
    #[must_use]
    pub fn epsilon(&self) -> Option<f64> {
        self.central_dp
            .map(|dp| self.state.accountant.epsilon(dp.delta))
    }

    /// Adopts the state of an accepted merge.
    pub fn commit(&mut self, state: MergerState) {
        let old = std::mem::replace(&mut self.state, state);
        if let Some(buffers) = old.moments {
            *self
                .spare
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(buffers);
        }
    }

    /// Merges `updates` into `base`, whose hash must be `base_hash`.
    ///
    /// # Errors
    /// Any [`AggregateError`]: invalid updates, too few for the strategy, or a non-finite
    /// result. The committed state is never changed.
    pub fn merge(
        &self,
        base: &Weights,
        base_hash: ModelHash,
        updates: &[Update],
        round: RoundId,
    ) -> Result<Merged, AggregateError> {
        // calloc'd: the pages are zeroed lazily by the kernel as the merge first writes them.
        let mut out = vec![0f32; base.values().len()];
        let outcome = self.merge_into(base, base_hash, updates, round, &mut out)?;
        Merged::new(Arc::clone(base.layout()), out, outcome)
    }

    /// Like [`Merger::merge`], writing the new model's flat values into `out` (its
    /// allocation is reused), so a node or a benchmark can recycle buffers.
    ///
    /// # Errors
    /// As [`Merger::merge`].
    pub fn merge_into(
        &self,
        base: &Weights,
        base_hash: ModelHash,
        updates: &[Update],
        round: RoundId,
        out: &mut Vec<f32>,
    ) -> Result<Outcome, AggregateError> {
        debug_assert_eq!(
            base.hash(),
            base_hash,
            "base_hash must be the base model's hash"
        );
        // Every value is overwritten: only (re)size a buffer of the wrong length, so
        // recycled buffers are not zeroed first (a whole extra pass over memory).
        let p = base.values().len();
        if out.len() != p {
            out.clear();
            out.resize(p, 0.0);
        }
        self.merge_values(
            base.layout(),
            Some(base.values()),
            base_hash,
            updates,
            round,
            out,
        )
    }

    /// Like [`Merger::merge`], writing the new model over the base model's own values:
    /// no second model-sized buffer (each chunk of the base is copied to a small scratch
    /// buffer before its new values are written). Same bits as [`Merger::merge`]. On an
    /// error the base is consumed (a caller that needs it again reloads it by its hash).
    ///
    /// # Errors
    /// As [`Merger::merge`].
    pub fn merge_owned(
        &self,
        base: Weights,
        base_hash: ModelHash,
        updates: &[Update],
        round: RoundId,
    ) -> Result<Merged, AggregateError> {
        let layout = Arc::clone(base.layout());
        let mut values = base.into_values();
        let outcome = self.merge_values(&layout, None, base_hash, updates, round, &mut values)?;
        Merged::new(layout, values, outcome)
    }

    /// The merge proper: `out` receives the new model; the base values are `base`, or,
    /// when `None`, `out`'s own values on entry (merged in place).
    fn merge_values(
        &self,
        layout: &Arc<Layout>,
        base: Option<&[f32]>,
        base_hash: ModelHash,
        updates: &[Update],
        round: RoundId,
        out: &mut [f32],
    ) -> Result<Outcome, AggregateError> {
        let view = View::new(layout, base_hash, updates, self.clip_norm)?;
        let sel = self.strategy.select(&view)?;
        let inputs: Vec<&[f32]> = sel.members.iter().map(|&i| view.deltas[i]).collect();
        let p = out.len();
        if base.is_some_and(|b| b.len() != p) || layout.total() != p {
            return Err(AggregateError::BadState(format!(
                "a model of {} parameters, {p} values to write",
                layout.total()
            )));
        }

        let mut next = MergerState {
            step: self.state.step + 1,
            moments: None,
            accountant: self.state.accountant,
        };
        let mut noise_std = None;
        let mut epsilon = None;
        let noise = match self.central_dp {
            None => None,
            Some(dp) => {
                let clip = self.clip_norm.ok_or_else(|| {
                    AggregateError::InvalidConfig("central DP without a clip norm".into())
                })?;
                let sens = self.strategy.sensitivity(&sel).ok_or_else(|| {
                    AggregateError::InvalidConfig("central DP with a non-linear strategy".into())
                })?;
                let ids: Vec<DeltaHash> = sel.members.iter().map(|&i| view.ids[i]).collect();
                noise_std = Some(dp.noise_multiplier * clip * sens);
                next.accountant.step(dp.noise_multiplier);
                epsilon = Some(next.accountant.epsilon(dp.delta));
                Some(GaussianStream::new(noise_seed(round, &base_hash, &ids)))
            }
        };

        let strategy = &*self.strategy;
        // The aggregate of one chunk into `o`, given the chunk's base values `b`; with
        // `fuse_base`, base + aggregate in the same pass (only when no noise has to be
        // added to the aggregate first). Returns whether the strategy's output was finite.
        let aggregate = |c: usize, b: &[f32], o: &mut [f32], fuse_base: bool| {
            let start = c * CHUNK;
            let end = start + o.len();
            let chunk_inputs: Vec<&[f32]> = inputs.iter().map(|d| &d[start..end]).collect();
            let onto = fuse_base.then_some(b);
            let finite = strategy.aggregate_chunk(&sel, &chunk_inputs, onto, o);
            if let (Some(n), Some(std)) = (&noise, noise_std) {
                n.add_to(start, std, o);
            }
            finite
        };
        // Runs `f(chunk's base values, chunk's output)`; merged in place, the chunk's base
        // values are first copied to this thread's scratch buffer.
        let with_base =
            |c: usize, o: &mut [f32], f: &mut dyn FnMut(&[f32], &mut [f32]) -> bool| match base {
                Some(b) => f(&b[c * CHUNK..c * CHUNK + o.len()], o),
                None => SCRATCH.with(|s| {
                    let mut s = s.borrow_mut();
                    s.clear();
                    s.extend_from_slice(o);
                    f(&s, o)
                }),
            };
        let finite = match self.server {
            ServerOptimizer::Sgd => out.par_chunks_mut(CHUNK).enumerate().all(|(c, o)| {
                with_base(c, o, &mut |b, o| {
                    if noise.is_none() {
                        aggregate(c, b, o, true)
                    } else {
                        aggregate(c, b, o, false);
                        sgd_chunk(b, o);
                        kernels::all_finite(o)
                    }
                })
            }),
            ServerOptimizer::Adaptive(kind, params) => {
                let initial;
                let (m0, v0) = match &self.state.moments {
                    Some((m, v)) if m.len() == p && v.len() == p => (m, v),
                    Some(_) => {
                        return Err(AggregateError::BadState(format!(
                            "optimiser moments have the wrong length for a model of {p} parameters"
                        )));
                    }
                    None => {
                        initial = self.server.initial_moments(p).unwrap_or_default();
                        (&initial.0, &initial.1)
                    }
                };
                let spare = self
                    .spare
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    .filter(|(m, v)| m.len() == p && v.len() == p);
                // Every value of the new moments is written below.
                let (mut m1, mut v1) = spare.unwrap_or_else(|| (vec![0f32; p], vec![0f32; p]));
                let ok = out
                    .par_chunks_mut(CHUNK)
                    .zip(m1.par_chunks_mut(CHUNK))
                    .zip(v1.par_chunks_mut(CHUNK))
                    .enumerate()
                    .all(|(c, ((o, m), v))| {
                        let (start, end) = (c * CHUNK, c * CHUNK + o.len());
                        with_base(c, o, &mut |b, o| {
                            aggregate(c, b, o, false);
                            let moments = MomentChunk {
                                m0: &m0[start..end],
                                v0: &v0[start..end],
                                m1: &mut *m,
                                v1: &mut *v,
                            };
                            adaptive_chunk(kind, &params, b, o, moments);
                            kernels::all_finite(o)
                        })
                    });
                next.moments = Some((m1, v1));
                ok
            }
        };
        if !finite {
            let i = out.iter().position(|x| !x.is_finite()).unwrap_or(0);
            let name = layout
                .entry_at(i)
                .map_or_else(String::new, |e| format!(" (tensor {:?})", e.name()));
            return Err(AggregateError::NonFinite(format!(
                "parameter {i}{name} overflowed; the updates or the server learning rate are too large"
            )));
        }

        let in_sel = |i: usize| sel.members.binary_search(&i).is_ok();
        Ok(Outcome {
            included: sel
                .members
                .iter()
                .map(|&i| (view.signers[i], view.ids[i]))
                .collect(),
            excluded: (0..view.len())
                .filter(|&i| !in_sel(i))
                .map(|i| view.signers[i])
                .collect(),
            clipped: (0..view.len())
                .filter(|&i| view.scales[i] < 1.0)
                .map(|i| view.signers[i])
                .collect(),
            noise_std,
            epsilon,
            next_state: next,
        })
    }

    /// The committed state as bytes (`CSAG` v1), bound to `layout`, so a restarted node
    /// continues exactly where it stopped.
    #[must_use]
    pub fn save_state(&self, layout: &Layout) -> Vec<u8> {
        let s = &self.state;
        let mut out = Vec::new();
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.push(self.server.tag());
        out.push(0);
        out.extend_from_slice(&s.step.to_le_bytes());
        out.extend_from_slice(&s.accountant.rounds.to_le_bytes());
        out.extend_from_slice(&s.accountant.sum_inv_z2.to_le_bytes());
        out.extend_from_slice(ModelHash::of(layout.table_bytes()).as_bytes());
        match &s.moments {
            None => out.push(0),
            Some((m, v)) => {
                out.push(1);
                out.extend_from_slice(&(m.len() as u64).to_le_bytes());
                for x in m.iter().chain(v) {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        out
    }

    /// Restores state saved by [`Merger::save_state`] for the same strategy and layout.
    ///
    /// # Errors
    /// [`AggregateError::BadState`] for bytes of another strategy or layout, truncated or
    /// trailing bytes, or non-finite values.
    pub fn load_state(&mut self, bytes: &[u8], layout: &Layout) -> Result<(), AggregateError> {
        let bad = |m: &str| AggregateError::BadState(m.to_owned());
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8], AggregateError> {
            let s = bytes
                .get(pos..pos + n)
                .ok_or_else(|| bad("truncated strategy state"))?;
            pos += n;
            Ok(s)
        };
        let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        if take(4)? != STATE_MAGIC {
            return Err(bad("not a strategy state (bad magic)"));
        }
        if take(2)? != STATE_VERSION.to_le_bytes() {
            return Err(bad("unsupported strategy state version"));
        }
        let head = take(2)?;
        if head[0] != self.server.tag() || head[1] != 0 {
            return Err(bad("the state was saved by another server optimiser"));
        }
        let step = u64_at(take(8)?);
        let rounds = u64_at(take(8)?);
        let sum_inv_z2 = f64::from_bits(u64_at(take(8)?));
        if take(32)? != ModelHash::of(layout.table_bytes()).as_bytes() {
            return Err(bad("the state was saved for a model with another layout"));
        }
        let moments = match take(1)?[0] {
            0 => None,
            1 => {
                let p = u64_at(take(8)?);
                if p != layout.total() as u64 {
                    return Err(bad("moment vectors do not match the layout"));
                }
                let p = p as usize;
                let raw = take(8 * p)?;
                let vals: Vec<f32> = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                if vals.iter().any(|x| !x.is_finite()) {
                    return Err(bad("non-finite optimiser moment"));
                }
                let (m, v) = vals.split_at(p);
                Some((m.to_vec(), v.to_vec()))
            }
            _ => return Err(bad("bad moments flag")),
        };
        if pos != bytes.len() {
            return Err(bad("trailing bytes after the strategy state"));
        }
        if !(sum_inv_z2.is_finite() && sum_inv_z2 >= 0.0) {
            return Err(bad("bad accountant state"));
        }
        if moments.is_some() != self.server.has_state() && step > 0 {
            return Err(bad("moments present for a stateless optimiser, or missing"));
        }
        self.state = MergerState {
            step,
            moments,
            accountant: RdpAccountant { rounds, sum_inv_z2 },
        };
        Ok(())
    }

    /// The selection a merge would use (for inspection and tests).
    ///
    /// # Errors
    /// As [`Merger::merge`].
    pub fn preview_selection(
        &self,
        base: &Weights,
        base_hash: ModelHash,
        updates: &[Update],
    ) -> Result<Selection, AggregateError> {
        let view = View::new(base.layout(), base_hash, updates, self.clip_norm)?;
        self.strategy.select(&view)
    }
}
