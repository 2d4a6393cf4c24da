//! The aggregator's error type.

use cellswarm_common::ids::{ModelHash, SignerKey};

/// Why a merge (or a strategy's configuration) was refused. Never a panic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// No updates were given.
    #[error("no updates to merge")]
    NoUpdates,
    /// Two updates have the same signer.
    #[error("two updates from signer {0}")]
    DuplicateSigner(SignerKey),
    /// An update was trained from another model than the base.
    #[error("update from {signer} was trained from model {got}, but the base is {expected}")]
    BaseMismatch {
        /// The update's signer.
        signer: SignerKey,
        /// The base model's hash.
        expected: ModelHash,
        /// The update's base hash.
        got: ModelHash,
    },
    /// An update's layout differs from the base model's.
    #[error("update from {signer} does not fit the base model: {detail}")]
    LayoutMismatch {
        /// The update's signer.
        signer: SignerKey,
        /// The first difference.
        detail: String,
    },
    /// A weighted strategy got an update with no samples.
    #[error("update from {0} reports zero samples; a weighted merge cannot use it")]
    ZeroSamples(SignerKey),
    /// The strategy cannot work with this many updates (e.g. Krum with n <= 2f + 2).
    #[error("{strategy} needs {needed}, got {got} updates")]
    TooFewUpdates {
        /// The strategy.
        strategy: &'static str,
        /// What it needs, in words.
        needed: String,
        /// Updates given.
        got: usize,
    },
    /// A parameter is out of range, or two options exclude each other.
    #[error("invalid aggregation setting: {0}")]
    InvalidConfig(String),
    /// The merged model holds a NaN or infinity (inputs too large).
    #[error("the merged model is not finite: {0}")]
    NonFinite(String),
    /// Saved strategy state does not fit (another layout, another strategy, corrupt bytes).
    #[error("strategy state: {0}")]
    BadState(String),
}
