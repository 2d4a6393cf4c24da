//! What a running node reports: a [`Status`] snapshot (published on a watch channel, so
//! tests and the status endpoint wait on changes instead of polling) and [`Metrics`]
//! counters in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cellswarm_common::ids::{ModelHash, RoundId};
use cellswarm_common::wire::MergeRecord;
use serde::Serialize;

/// Why a delta, record or announcement was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Signed by a key that is not a consortium member.
    NotMember,
    /// The signature does not verify.
    BadSignature,
    /// Bytes that do not parse, or of the wrong kind.
    Malformed,
    /// Larger than the configured limit.
    Oversize,
    /// Content that does not hash to what was announced.
    HashMismatch,
    /// Another consortium configuration.
    WrongConsortium,
    /// For another round.
    WrongRound,
    /// Trained from another model than this round's.
    WrongBase,
    /// Names, shapes or count of tensors differ from the model's.
    WrongShape,
    /// NaN or infinite values.
    NonFinite,
    /// L2 norm above `aggregation.max_update_norm`.
    NormTooLarge,
    /// A delta already merged in an earlier round.
    Replayed,
    /// A second, different delta from the same member in one round.
    Equivocation,
    /// A merge record whose recomputation gives another model hash.
    MergeMismatch,
    /// A merge record that breaks the protocol's rules (quorum, merger order, chain).
    BadRecord,
}

impl RejectReason {
    /// Label value in metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotMember => "not_member",
            Self::BadSignature => "bad_signature",
            Self::Malformed => "malformed",
            Self::Oversize => "oversize",
            Self::HashMismatch => "hash_mismatch",
            Self::WrongConsortium => "wrong_consortium",
            Self::WrongRound => "wrong_round",
            Self::WrongBase => "wrong_base",
            Self::WrongShape => "wrong_shape",
            Self::NonFinite => "non_finite",
            Self::NormTooLarge => "norm_too_large",
            Self::Replayed => "replayed",
            Self::Equivocation => "equivocation",
            Self::MergeMismatch => "merge_mismatch",
            Self::BadRecord => "bad_record",
        }
    }
}

/// Upper bounds (seconds) of the round-duration histogram buckets.
pub const ROUND_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Counters a node keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Rounds accepted.
    pub rounds_completed: AtomicU64,
    /// Deltas accepted into a round's pool.
    pub deltas_accepted: AtomicU64,
    /// Secure aggregation: self-mask seeds of participants that did not answer a sealed
    /// epoch, rebuilt from the others' shares.
    pub seeds_rebuilt: AtomicU64,
    rejected: Mutex<BTreeMap<RejectReason, u64>>,
    round_seconds: Mutex<(Vec<u64>, f64, u64)>,
    last: Mutex<(Option<f32>, Option<f32>, Option<f64>)>,
}

impl Metrics {
    /// Counts a rejection.
    pub fn reject(&self, reason: RejectReason) {
        if let Ok(mut m) = self.rejected.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Rejections by reason.
    #[must_use]
    pub fn rejections(&self) -> BTreeMap<RejectReason, u64> {
        self.rejected.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Records a completed round's duration.
    pub fn observe_round(&self, seconds: f64) {
        if let Ok(mut h) = self.round_seconds.lock() {
            if h.0.is_empty() {
                h.0 = vec![0; ROUND_BUCKETS.len()];
            }
            for (b, bound) in h.0.iter_mut().zip(ROUND_BUCKETS) {
                if seconds <= bound {
                    *b += 1;
                }
            }
            h.1 += seconds;
            h.2 += 1;
        }
    }

    /// Records the last training loss, validation F1 and DP epsilon.
    pub fn set_last(&self, loss: Option<f32>, f1: Option<f32>, epsilon: Option<f64>) {
        if let Ok(mut l) = self.last.lock() {
            if loss.is_some() {
                l.0 = loss;
            }
            if f1.is_some() {
                l.1 = f1;
            }
            if epsilon.is_some() {
                l.2 = epsilon;
            }
        }
    }

    /// The metrics in the Prometheus text exposition format.
    #[must_use]
    pub fn prometheus(&self, bytes_in: u64, bytes_out: u64, round: RoundId) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "cellswarm_rounds_completed_total",
            "Rounds whose merged model this node accepted.",
            self.rounds_completed.load(Ordering::Relaxed),
        );
        counter(
            "cellswarm_deltas_accepted_total",
            "Deltas verified and accepted into a round.",
            self.deltas_accepted.load(Ordering::Relaxed),
        );
        counter(
            "cellswarm_secagg_seeds_rebuilt_total",
            "Self-mask seeds of participants that did not answer a sealed epoch, rebuilt from seed shares.",
            self.seeds_rebuilt.load(Ordering::Relaxed),
        );
        counter(
            "cellswarm_bytes_in_total",
            "Bytes received over the sync protocol.",
            bytes_in,
        );
        counter(
            "cellswarm_bytes_out_total",
            "Bytes sent over the sync protocol.",
            bytes_out,
        );
        let _ = writeln!(
            s,
            "# HELP cellswarm_rejected_total Messages refused, by reason.\n# TYPE cellswarm_rejected_total counter"
        );
        for (r, n) in self.rejections() {
            let _ = writeln!(
                s,
                "cellswarm_rejected_total{{reason=\"{}\"}} {n}",
                r.as_str()
            );
        }
        let _ = writeln!(
            s,
            "# HELP cellswarm_round Current round.\n# TYPE cellswarm_round gauge\ncellswarm_round {}",
            round.0
        );
        if let Ok(h) = self.round_seconds.lock() {
            let _ = writeln!(
                s,
                "# HELP cellswarm_round_duration_seconds Time from a round's start to its accepted merge.\n\
                 # TYPE cellswarm_round_duration_seconds histogram"
            );
            for (i, bound) in ROUND_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "cellswarm_round_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                    h.0.get(i).copied().unwrap_or(0)
                );
            }
            let _ = writeln!(
                s,
                "cellswarm_round_duration_seconds_bucket{{le=\"+Inf\"}} {}",
                h.2
            );
            let _ = writeln!(s, "cellswarm_round_duration_seconds_sum {}", h.1);
            let _ = writeln!(s, "cellswarm_round_duration_seconds_count {}", h.2);
        }
        if let Ok(l) = self.last.lock() {
            for (name, help, v) in [
                (
                    "cellswarm_last_training_loss",
                    "Mean loss of the last local training.",
                    l.0.map(f64::from),
                ),
                (
                    "cellswarm_last_validation_f1",
                    "F1 at IoU 0.5 of the merged model on held-out frames.",
                    l.1.map(f64::from),
                ),
                (
                    "cellswarm_dp_epsilon",
                    "Differential-privacy epsilon spent so far.",
                    l.2,
                ),
            ] {
                if let Some(v) = v {
                    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
                }
            }
        }
        s
    }
}

/// A snapshot of a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Status {
    /// This node's PeerId.
    pub peer_id: String,
    /// The round being worked on.
    pub round: RoundId,
    /// What the node is doing.
    pub phase: String,
    /// Hash of the model the round started from (the last accepted merge).
    pub model: Option<ModelHash>,
    /// The last accepted round.
    pub head_round: RoundId,
    /// Connected members' PeerIds.
    pub connected: Vec<String>,
    /// Deltas verified and held for the current round (ours included).
    pub deltas: usize,
    /// The last accepted merge record.
    pub last_record: Option<MergeRecord>,
    /// Rounds accepted since start.
    pub rounds_completed: u64,
    /// Secure aggregation: seeds rebuilt from shares so far.
    #[serde(default)]
    pub seeds_rebuilt: u64,
    /// Local differential-privacy epsilon spent, if local DP is on.
    pub epsilon: Option<f64>,
    /// The delta of that (epsilon, delta), if local DP is on.
    pub dp_delta: Option<f64>,
    /// Whether the node has stopped (finished `max_rounds` or shut down).
    pub stopped: bool,
}
