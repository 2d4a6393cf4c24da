//! How a set of updates becomes one aggregate update: the [`Strategy`] trait and its
//! implementations.
//!
//! A strategy works in two steps, both deterministic:
//!
//! 1. [`Strategy::select`] looks at the whole [`View`] once (Krum scores updates here)
//!    and returns a [`Selection`]: which updates take part and their coefficients.
//! 2. [`Strategy::aggregate_chunk`] turns one chunk of the selected updates into the
//!    same chunk of the aggregate. The merger calls it for every chunk in parallel.
//!
//! The merger then adds optional DP noise and applies a server step
//! ([`crate::server::ServerOptimizer`]); see [`crate::merger::Merger`].

use std::fmt;

use crate::error::AggregateError;
use crate::kernels;
use crate::update::View;

/// The updates taking part in a merge and how much each counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Indices into the view (ascending signer order).
    pub members: Vec<usize>,
    /// Per selected update: the factor its values are multiplied by in
    /// [`Strategy::aggregate_chunk`] (clipping included).
    pub coeffs: Vec<f32>,
    /// Per selected update: its normalised weight in a linear strategy (sums to 1), used
    /// for the DP sensitivity; empty for non-linear strategies.
    pub weights: Vec<f64>,
}

/// A rule for combining verified updates. See the module documentation.
pub trait Strategy: Send + Sync + fmt::Debug {
    /// The name used in config files and merge records.
    fn name(&self) -> &'static str;

    /// Chooses the updates and their coefficients.
    ///
    /// # Errors
    /// Too few updates for the strategy, or zero sample counts for a weighted one.
    fn select(&self, view: &View<'_>) -> Result<Selection, AggregateError>;

    /// Writes the aggregate of one chunk into `out`: `inputs[j]` is selected update
    /// `j`'s slice. With `onto`, writes `onto + aggregate` instead (the plain server
    /// step, fused into the same pass). Returns whether every value written is finite.
    fn aggregate_chunk(
        &self,
        sel: &Selection,
        inputs: &[&[f32]],
        onto: Option<&[f32]>,
        out: &mut [f32],
    ) -> bool;

    /// Whether the aggregate is a fixed weighted sum of the updates (FedAvg). Only linear
    /// strategies can be combined with central DP (their sensitivity is known) and with
    /// secure aggregation (which reveals only a sum).
    fn is_linear(&self) -> bool;

    /// For linear strategies, the largest weight one member has in the aggregate: its
    /// L2 sensitivity per unit of clipping norm. `None` for non-linear strategies.
    fn sensitivity(&self, sel: &Selection) -> Option<f64> {
        self.is_linear()
            .then(|| sel.weights.iter().fold(0f64, |m, &w| m.max(w)))
    }
}

fn linear_selection(view: &View<'_>, weights: Vec<f64>) -> Selection {
    Selection {
        members: (0..view.len()).collect(),
        coeffs: weights
            .iter()
            .zip(&view.scales)
            .map(|(&w, &s)| (w * f64::from(s)) as f32)
            .collect(),
        weights,
    }
}

/// FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
/// Decentralized Data", AISTATS 2017): the mean of the updates weighted by sample count
/// `n_k / sum(n)`, or with equal weights `1 / K` when `weighted` is false, times the
/// server step size `step` (1: the plain mean).
///
/// A sample count is only what a member declares, so each is first clipped at the
/// round's median declared count ([`clipped_counts`]): members claiming more than the
/// median weigh as much as the median member, and no minority of liars outweighs the
/// rest by claiming huge counts (`u64::MAX` used to give one member weight ~1). Before
/// that, every count is capped at `max_samples` (`aggregation.max_samples`), the most a
/// member may declare, so that no member, even among liars that are the majority of a
/// round, weighs more than that ceiling allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAvg {
    /// Weight by sample count (true) or equally (false).
    pub weighted: bool,
    /// The most samples any member's count stands for (`u64::MAX`: no ceiling).
    pub max_samples: u64,
    /// Server step size eta_g: every weight is multiplied by it (1 keeps the bits of the
    /// plain mean, since `w * 1.0 == w`).
    pub step: f64,
}

impl FedAvg {
    /// Plain FedAvg (server step 1), weighted by sample count or not.
    #[must_use]
    pub fn new(weighted: bool) -> Self {
        Self {
            weighted,
            max_samples: u64::MAX,
            step: 1.0,
        }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        if self.weighted {
            "fedavg"
        } else {
            "fedavg-unweighted"
        }
    }

    fn select(&self, view: &View<'_>) -> Result<Selection, AggregateError> {
        let n = view.len();
        let weights = if self.weighted {
            if let Some(i) = view.sample_counts.iter().position(|&c| c == 0) {
                return Err(AggregateError::ZeroSamples(view.signers[i]));
            }
            let capped: Vec<u64> = view
                .sample_counts
                .iter()
                .map(|&c| c.min(self.max_samples))
                .collect();
            let counts = clipped_counts(&capped);
            let total: f64 = counts.iter().map(|&c| c as f64).sum();
            counts
                .iter()
                .map(|&c| c as f64 / total * self.step)
                .collect()
        } else {
            vec![1.0 / n as f64 * self.step; n]
        };
        Ok(linear_selection(view, weights))
    }

    fn is_linear(&self) -> bool {
        true
    }

    fn aggregate_chunk(
        &self,
        sel: &Selection,
        inputs: &[&[f32]],
        onto: Option<&[f32]>,
        out: &mut [f32],
    ) -> bool {
        kernels::linear_combine(inputs, &sel.coeffs, onto, out)
    }
}

/// Declared sample counts clipped at their lower median (the `(K - 1) / 2`-th smallest):
/// the weights FedAvg gives. With honest members in the majority the median is an
/// honest count, so a member can raise its weight only to an honest member's.
#[must_use]
pub fn clipped_counts(counts: &[u64]) -> Vec<u64> {
    let mut sorted = counts.to_vec();
    sorted.sort_unstable();
    let Some(&cap) = sorted.get(sorted.len().saturating_sub(1) / 2) else {
        return Vec::new();
    };
    counts.iter().map(|&c| c.min(cap)).collect()
}

/// Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards
/// Optimal Statistical Rates", ICML 2018). Tolerates fewer than half of the updates being
/// arbitrary, per coordinate. Unweighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Median;

fn all_scaled(view: &View<'_>) -> Selection {
    Selection {
        members: (0..view.len()).collect(),
        coeffs: view.scales.clone(),
        weights: Vec::new(),
    }
}

impl Strategy for Median {
    fn name(&self) -> &'static str {
        "median"
    }

    fn select(&self, view: &View<'_>) -> Result<Selection, AggregateError> {
        Ok(all_scaled(view))
    }

    fn is_linear(&self) -> bool {
        false
    }

    fn aggregate_chunk(
        &self,
        sel: &Selection,
        inputs: &[&[f32]],
        onto: Option<&[f32]>,
        out: &mut [f32],
    ) -> bool {
        kernels::median_chunk(inputs, &sel.coeffs, out);
        kernels::add_onto(onto, out);
        kernels::all_finite(out)
    }
}

/// Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the
/// `floor(beta * K)` largest and smallest values and average the rest. Tolerates up to
/// `floor(beta * K)` arbitrary updates. Unweighted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrimmedMean {
    beta: f64,
}

impl TrimmedMean {
    /// A trimmed mean cutting `beta` (0 <= beta < 0.5) at each end.
    ///
    /// # Errors
    /// [`AggregateError::InvalidConfig`] for beta outside [0, 0.5).
    pub fn new(beta: f64) -> Result<Self, AggregateError> {
        if !(0.0..0.5).contains(&beta) {
            return Err(AggregateError::InvalidConfig(format!(
                "trimmed-mean beta must be in [0, 0.5), got {beta}"
            )));
        }
        Ok(Self { beta })
    }

    /// Values cut at each end for `n` updates.
    #[must_use]
    pub fn trim(&self, n: usize) -> usize {
        (self.beta * n as f64).floor() as usize
    }
}

impl Strategy for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed-mean"
    }

    fn select(&self, view: &View<'_>) -> Result<Selection, AggregateError> {
        Ok(all_scaled(view))
    }

    fn is_linear(&self) -> bool {
        false
    }

    fn aggregate_chunk(
        &self,
        sel: &Selection,
        inputs: &[&[f32]],
        onto: Option<&[f32]>,
        out: &mut [f32],
    ) -> bool {
        kernels::trimmed_mean_chunk(inputs, &sel.coeffs, self.trim(inputs.len()), out);
        kernels::add_onto(onto, out);
        kernels::all_finite(out)
    }
}

/// Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine
/// Tolerant Gradient Descent", NeurIPS 2017). Each update is scored by the sum of squared
/// distances to its `n - f - 2` nearest neighbours; Krum takes the best-scoring update,
/// Multi-Krum averages the `m` best. Tolerates `f` Byzantine updates when `n > 2f + 2`.
/// Ties go to the lower signer key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Krum {
    f: usize,
    keep: Option<usize>,
    multi: bool,
}

impl Krum {
    /// Krum tolerating `f` Byzantine updates.
    #[must_use]
    pub fn new(f: usize) -> Self {
        Self {
            f,
            keep: Some(1),
            multi: false,
        }
    }

    /// Multi-Krum tolerating `f`, averaging the `keep` best (default `n - f`).
    #[must_use]
    pub fn multi(f: usize, keep: Option<usize>) -> Self {
        Self {
            f,
            keep,
            multi: true,
        }
    }

    /// Krum scores of the updates (lower is better), in view order.
    ///
    /// # Errors
    /// [`AggregateError::TooFewUpdates`] unless `n > 2f + 2`.
    pub fn scores(&self, view: &View<'_>) -> Result<Vec<f64>, AggregateError> {
        let n = view.len();
        if n <= 2 * self.f + 2 {
            return Err(AggregateError::TooFewUpdates {
                strategy: self.name(),
                needed: format!(
                    "more than 2f + 2 = {} updates (f = {})",
                    2 * self.f + 2,
                    self.f
                ),
                got: n,
            });
        }
        let d = kernels::pairwise_sq_distances(&view.deltas, &view.scales);
        let neighbours = n - self.f - 2;
        Ok((0..n)
            .map(|i| {
                let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i * n + j]).collect();
                row.sort_unstable_by(f64::total_cmp);
                row[..neighbours].iter().sum()
            })
            .collect())
    }
}

impl Strategy for Krum {
    fn name(&self) -> &'static str {
        if self.multi { "multi-krum" } else { "krum" }
    }

    fn select(&self, view: &View<'_>) -> Result<Selection, AggregateError> {
        let scores = self.scores(view)?;
        let n = view.len();
        let keep = if self.multi {
            self.keep.unwrap_or(n - self.f)
        } else {
            1
        };
        if keep == 0 || keep > n {
            return Err(AggregateError::InvalidConfig(format!(
                "multi-krum keeps {keep} of {n} updates; it must keep between 1 and n"
            )));
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let mut members = order[..keep].to_vec();
        members.sort_unstable();
        let coeffs = members
            .iter()
            .map(|&i| view.scales[i] / keep as f32)
            .collect();
        Ok(Selection {
            members,
            coeffs,
            weights: Vec::new(),
        })
    }

    fn is_linear(&self) -> bool {
        false
    }

    fn aggregate_chunk(
        &self,
        sel: &Selection,
        inputs: &[&[f32]],
        onto: Option<&[f32]>,
        out: &mut [f32],
    ) -> bool {
        kernels::linear_combine(inputs, &sel.coeffs, onto, out)
    }
}
