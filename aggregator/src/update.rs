//! Verified updates and their canonical, validated view.

use std::sync::Arc;

use cellswarm_common::delta::Delta;
use cellswarm_common::ids::{DeltaHash, ModelHash, SignerKey};
use cellswarm_common::weights::Layout;

use crate::error::AggregateError;

/// One member's verified update for a round: its delta and what the merge needs to know
/// about it. The node builds it after the envelope's signature, the round, the base hash,
/// the layout and the norm bound have all been checked.
#[derive(Debug, Clone)]
pub struct Update {
    /// The member's signing key; updates are merged in ascending signer order.
    pub signer: SignerKey,
    /// Content hash of the delta envelope's payload (named in the merge record).
    pub id: DeltaHash,
    /// Hash of the model the update was trained from.
    pub base: ModelHash,
    /// Training samples behind the update (the FedAvg weight).
    pub sample_count: u64,
    /// Shared: clones of an update (handed to a merge thread) do not copy the values.
    delta: Arc<Delta>,
    norm: f64,
}

impl Update {
    /// Wraps a delta, computing its L2 norm once (deterministically).
    #[must_use]
    pub fn new(
        signer: SignerKey,
        id: DeltaHash,
        base: ModelHash,
        sample_count: u64,
        delta: Delta,
    ) -> Self {
        let norm = delta.l2_norm();
        Self {
            signer,
            id,
            base,
            sample_count,
            delta: Arc::new(delta),
            norm,
        }
    }

    /// The delta.
    #[must_use]
    pub fn delta(&self) -> &Delta {
        &self.delta
    }

    /// The delta's flat values.
    #[must_use]
    pub fn values(&self) -> &[f32] {
        self.delta.values()
    }

    /// The delta's L2 norm.
    #[must_use]
    pub fn norm(&self) -> f64 {
        self.norm
    }
}

/// The updates of one merge, validated against the base and sorted by signer: the only
/// form strategies ever see, so the order they arrived in cannot matter.
#[derive(Debug)]
pub struct View<'a> {
    /// Signers, ascending.
    pub signers: Vec<SignerKey>,
    /// Each update's flat delta, in signer order.
    pub deltas: Vec<&'a [f32]>,
    /// Each update's sample count.
    pub sample_counts: Vec<u64>,
    /// Each update's L2 norm (before clipping).
    pub norms: Vec<f64>,
    /// Each update's clipping factor (1 when not clipped).
    pub scales: Vec<f32>,
    /// The updates' delta hashes, in signer order.
    pub ids: Vec<DeltaHash>,
}

impl<'a> View<'a> {
    /// Validates `updates` against the base model's layout `base` (and hash `base_hash`)
    /// and sorts them by signer.
    ///
    /// With `clip_norm`, each update gets the factor `min(1, clip_norm / norm)`.
    ///
    /// # Errors
    /// No updates, duplicate signers, a wrong base hash or a layout mismatch.
    pub fn new(
        base: &Arc<Layout>,
        base_hash: ModelHash,
        updates: &'a [Update],
        clip_norm: Option<f64>,
    ) -> Result<Self, AggregateError> {
        if updates.is_empty() {
            return Err(AggregateError::NoUpdates);
        }
        let mut order: Vec<&Update> = updates.iter().collect();
        order.sort_by_key(|u| u.signer);
        for pair in order.windows(2) {
            if pair[0].signer == pair[1].signer {
                return Err(AggregateError::DuplicateSigner(pair[0].signer));
            }
        }
        for u in &order {
            if u.base != base_hash {
                return Err(AggregateError::BaseMismatch {
                    signer: u.signer,
                    expected: base_hash,
                    got: u.base,
                });
            }
            let layout: &Arc<Layout> = u.delta.layout();
            if !Arc::ptr_eq(layout, base) {
                base.ensure_same(layout)
                    .map_err(|e| AggregateError::LayoutMismatch {
                        signer: u.signer,
                        detail: e.to_string(),
                    })?;
            }
        }
        let scales = order
            .iter()
            .map(|u| match clip_norm {
                Some(c) if u.norm > c => (c / u.norm) as f32,
                _ => 1.0,
            })
            .collect();
        Ok(Self {
            signers: order.iter().map(|u| u.signer).collect(),
            deltas: order.iter().map(|u| u.values()).collect(),
            sample_counts: order.iter().map(|u| u.sample_count).collect(),
            norms: order.iter().map(|u| u.norm).collect(),
            scales,
            ids: order.iter().map(|u| u.id).collect(),
        })
    }

    /// Number of updates.
    #[must_use]
    pub fn len(&self) -> usize {
        self.signers.len()
    }

    /// Whether there are none (never true for a built view).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }

    /// Parameters per update.
    #[must_use]
    pub fn params(&self) -> usize {
        self.deltas.first().map_or(0, |d| d.len())
    }
}
