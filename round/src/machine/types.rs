//! The machine's inputs, effects and messages, and what a node restores from its store.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};
use cellswarm_common::records::Head;
use cellswarm_common::wire::{Contribution, MergeRecord};

use super::HISTORY;
use crate::cert::Attestation;
use crate::chain::ChainError;
use crate::rules::RuleError;
use crate::turns::Turns;

/// What the consortium agreed, and who this node is.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's signing key.
    pub me: SignerKey,
    /// The members' signing keys (this node's included).
    pub members: BTreeSet<SignerKey>,
    /// The consortium agreement digest.
    pub consortium: [u8; 32],
    /// The agreed merge strategy's name.
    pub strategy: String,
    /// `rounds.min_peers`.
    pub quorum: usize,
    /// `aggregation.byzantine`: liars the consortium is built to survive.
    pub byzantine: u32,
    /// Merger turns.
    pub turns: Turns,
    /// How often a node tells the others where it stands.
    pub heartbeat: Duration,
    /// `rounds.max_rounds`.
    pub max_rounds: Option<u64>,
}

/// A delta whose envelope the driver checked (signature, layout, norm): who signed it
/// and what it declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaMeta {
    /// SHA-256 of its envelope's payload.
    pub hash: DeltaHash,
    /// The member who signed it.
    pub signer: SignerKey,
    /// The consortium digest it names.
    pub consortium: [u8; 32],
    /// Its round.
    pub round: RoundId,
    /// The model it was trained from.
    pub base: ModelHash,
    /// Its declared sample count.
    pub samples: u64,
}

/// A merge record whose envelope's signature the driver checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRecord {
    /// The record.
    pub record: MergeRecord,
    /// Its hash.
    pub hash: RecordHash,
    /// The member who signed it.
    pub signer: SignerKey,
}

impl SignedRecord {
    /// A record this node signs: its hash is that of its canonical encoding.
    #[must_use]
    pub fn own(record: MergeRecord, me: SignerKey) -> Self {
        let bytes = cellswarm_common::wire::encode_control(&record).unwrap_or_default();
        Self {
            hash: RecordHash::of(&bytes),
            record,
            signer: me,
        }
    }
}

/// What a node sends to every member it is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// Our delta of `round` is ready to fetch.
    Delta {
        /// The round.
        round: RoundId,
        /// The delta.
        hash: DeltaHash,
    },
    /// We committed `record` as `round`'s merge (as its merger).
    MergeReady {
        /// The round.
        round: RoundId,
        /// The record.
        record: RecordHash,
    },
    /// Where we stand: our head.
    Heartbeat {
        /// The last round we committed.
        head: RoundId,
        /// Its model.
        model: ModelHash,
    },
    /// We checked and committed a round: our one vote in it.
    Attest(Attestation),
    /// We recomputed and committed another outcome of a round we had voted in already
    /// (we followed the consortium to it): counts towards certificates, never towards
    /// finality.
    Checked(Attestation),
}

/// A request to one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Req {
    /// A delta by hash.
    Delta(DeltaHash),
    /// The record of a round.
    Record(RoundId),
    /// Up to `max` records from round `from` on.
    Records {
        /// The first round.
        from: RoundId,
        /// The most records.
        max: u32,
    },
    /// The attestations a member holds for a round.
    Attestations(RoundId),
    /// The deltas a member pooled for a round.
    Deltas(RoundId),
    /// The record a member voted for in a round, kept even after it followed the
    /// consortium to another outcome (answered with [`Resp::Record`]).
    Voted(RoundId),
}

/// An answer to a [`Req`]; the driver checked every signature in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// The delta, if held.
    Delta(Option<DeltaMeta>),
    /// The record, if held.
    Record(Option<SignedRecord>),
    /// Consecutive records.
    Records(Vec<SignedRecord>),
    /// Attestations of a round.
    Attestations(Vec<Attestation>),
    /// (signer, delta) pooled for a round.
    Deltas(Vec<(SignerKey, DeltaHash)>),
}

/// A merge the machine asks for, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Job {
    /// Our own merge as candidate `attempt`.
    Own {
        /// The round.
        round: RoundId,
        /// Our attempt.
        attempt: u32,
    },
    /// Recomputing a live record.
    Verify {
        /// The round.
        round: RoundId,
        /// The record.
        record: RecordHash,
    },
    /// Recomputing a record while catching up.
    Sync {
        /// The round.
        round: RoundId,
        /// The record.
        record: RecordHash,
    },
}

/// A typed record the driver must make durable before it acknowledges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durable {
    /// Our delta of a round: after a restart it is announced again, never trained again
    /// (one delta per member per round).
    OwnDelta(DeltaMeta),
    /// A member's attestation (ours included): finality and certificates outlive a
    /// restart. Nothing waits for it to be durable, but the driver must make ours
    /// durable no later than the [`Effect::Commit`] that follows it (effects are given in
    /// order): a member that restarts votes from its newest own attestation on.
    Attestation(Attestation),
    /// Our check of a round we had voted in already ([`Msg::Checked`]): repeated with
    /// our heartbeats after a restart too, it is what lets members that cannot
    /// recompute that outcome take it on a certificate. Nothing waits for it.
    Check(Attestation),
    /// A record we voted for, written when we vote: if we later follow the consortium
    /// to another outcome, ours may still become final, and members that want it ask
    /// its voters ([`Req::Voted`]). The driver keeps the newest per round for the last
    /// [`HISTORY`] rounds; nothing waits for it to be durable.
    Voted(SignedRecord),
}

/// Why the machine refused something a peer sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A record broke a rule.
    #[error("record {}: {rule}", .record.short())]
    Rule {
        /// The record.
        record: RecordHash,
        /// The rule.
        rule: RuleError,
    },
    /// Recomputing a record's merge gave another model or state.
    #[error("record {}: recomputed model {}, the record says {}", .record.short(), .recomputed.short(), .claimed.short())]
    Mismatch {
        /// The record.
        record: RecordHash,
        /// What it says.
        claimed: ModelHash,
        /// What the merge gave.
        recomputed: ModelHash,
    },
    /// A catch-up chain broke.
    #[error("catch-up: {0}")]
    Chain(ChainError),
    /// A second, different delta from one member in one round.
    #[error("{} signed a second delta {} this round", .signer.short(), .delta.short())]
    Equivocation {
        /// The member.
        signer: SignerKey,
        /// The second delta.
        delta: DeltaHash,
    },
    /// A delta that cannot be pooled.
    #[error("delta {}: {why}", .delta.short())]
    Delta {
        /// The delta.
        delta: DeltaHash,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An answer that is not what was asked.
    #[error("answer to {0:?} is not what was asked")]
    Answer(Req),
}

/// What the machine asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Train on `base` for `round`; answer with [`Input::Trained`] and the same ticket.
    Train {
        /// The round.
        round: RoundId,
        /// The model to start from.
        base: ModelHash,
        /// Names this training: an answer to a cancelled one is told apart by it.
        ticket: u64,
    },
    /// Stop a training in flight (its round is over).
    CancelTraining,
    /// Send to every connected member.
    Broadcast(Msg),
    /// Ask one member; answer with [`Input::Response`].
    Request {
        /// The member.
        to: SignerKey,
        /// The request.
        req: Req,
    },
    /// Merge `contributions` (deltas the driver holds) into `base` from aggregator state
    /// `state`; answer with [`Input::Merged`].
    Merge {
        /// Why.
        job: Job,
        /// The model merged into.
        base: ModelHash,
        /// The aggregator state before.
        state: [u8; 32],
        /// The deltas, sorted by signer.
        contributions: Vec<Contribution>,
    },
    /// Make a typed record durable; answer with [`Input::Persisted`].
    Persist(Durable),
    /// Commit `record` (signed by its merger; by us when `record.signer` is us) in one
    /// transaction, first dropping every record from round `replaces` on when set;
    /// answer with [`Input::Committed`] once durable. When `recomputed` is false the
    /// model was not merged here and must be fetched by its hash.
    Commit {
        /// The record.
        record: SignedRecord,
        /// The first round of ours it replaces.
        replaces: Option<RoundId>,
        /// Whether we merged the model ourselves.
        recomputed: bool,
    },
    /// A peer sent something refused (to log and count; a lie strikes the peer).
    Refused {
        /// Who sent it.
        from: SignerKey,
        /// What and why.
        why: Refusal,
    },
}

/// Something that happened, fed to [`Machine::handle`](super::Machine::handle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Time passed (the wake-up asked for, or any other).
    Tick,
    /// A member connected.
    Connected(SignerKey),
    /// A member went away.
    Disconnected(SignerKey),
    /// A broadcast from a member (its signature checked).
    Gossip {
        /// The member.
        from: SignerKey,
        /// The message.
        msg: Msg,
    },
    /// The answer to an [`Effect::Request`]; `None` when it failed or timed out.
    Response {
        /// Who was asked.
        from: SignerKey,
        /// What was asked.
        req: Req,
        /// The answer.
        resp: Option<Resp>,
    },
    /// Training for `round` from `base` ended: our delta, or none if it failed or was
    /// cancelled.
    Trained {
        /// The ticket of the [`Effect::Train`] it answers.
        ticket: u64,
        /// The round.
        round: RoundId,
        /// The model it started from.
        base: ModelHash,
        /// The delta the driver built, signed and holds.
        delta: Option<DeltaMeta>,
    },
    /// A merge ended: the model and state hashes, or none if it failed.
    Merged {
        /// The merge's job.
        job: Job,
        /// (model, state).
        outcome: Option<(ModelHash, [u8; 32])>,
    },
    /// A [`Effect::Persist`] is durable.
    Persisted(Durable),
    /// Every [`Effect::Commit`] up to `round` is durable.
    Committed(RoundId),
}

/// One of the newest commits, kept to replace it if it turns out a dead branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The head before it.
    pub before: Head,
    /// The deltas it merged.
    pub merged: Vec<DeltaHash>,
}

/// What a node's store held when it started: see [`Restored::from_chain`].
#[derive(Debug, Clone)]
pub struct Restored {
    /// The head.
    pub head: Head,
    /// The newest commits (oldest first, at most [`HISTORY`]).
    pub kept: Vec<Kept>,
    /// Every delta merged so far.
    pub merged: BTreeSet<DeltaHash>,
    /// Our own deltas of the newest rounds (the driver holds them): the one of the round
    /// after the head is announced again, never trained again; older ones let us
    /// recompute a round we replace.
    pub own: Vec<DeltaMeta>,
    /// Attestations kept for the rounds near the head.
    pub attestations: Vec<Attestation>,
    /// Records we voted for ([`Durable::Voted`]).
    pub voted: Vec<SignedRecord>,
    /// Our checks ([`Durable::Check`]).
    pub checks: Vec<Attestation>,
}

impl Restored {
    /// The state of a node whose chain, from `genesis` (model, aggregator state), is
    /// `records` (oldest first).
    #[must_use]
    pub fn from_chain(genesis: (ModelHash, [u8; 32]), records: &[SignedRecord]) -> Self {
        let mut head = Head {
            round: RoundId(0),
            record: None,
            model: genesis.0,
            state: genesis.1,
        };
        let mut kept = VecDeque::new();
        let mut merged = BTreeSet::new();
        for r in records {
            let deltas: Vec<DeltaHash> = r.record.contributions.iter().map(|c| c.delta).collect();
            merged.extend(deltas.iter().copied());
            kept.push_back(Kept {
                before: head,
                merged: deltas,
            });
            if kept.len() > HISTORY {
                kept.pop_front();
            }
            head = Head {
                round: r.record.round,
                record: Some(r.hash),
                model: r.record.model,
                state: r.record.state,
            };
        }
        Self {
            head,
            kept: kept.into(),
            merged,
            own: Vec::new(),
            attestations: Vec::new(),
            voted: Vec::new(),
            checks: Vec::new(),
        }
    }
}

/// Counters a driver exports and a simulation sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Rounds committed (live, own or caught up).
    pub commits: u64,
    /// Records replaced by a catch-up (dead branches left).
    pub rewound: u64,
    /// Things refused.
    pub refused: u64,
    /// Catch-ups begun.
    pub syncs: u64,
}
