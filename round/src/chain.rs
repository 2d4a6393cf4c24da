//! Verified catch-up: a node that is behind adopts a peer's chain of records one record
//! at a time, each checked by the same rules as a live round and recomputed from the
//! deltas it names before the next is looked at.
//!
//! [`ChainCheck`] is the state of one catch-up: where the chain stands, which deltas the
//! records checked so far merged (so none is merged twice across the chain), and the
//! record waiting for its recomputation. Its driver fetches records and deltas, runs the
//! merges and commits what was confirmed; the check itself is pure.
//!
//! Before this, catch-up accepted any chain that one member had signed as long as the
//! hashes linked: a single member could hand a lagging node a model of its choosing.

use std::collections::{BTreeSet, HashSet};

use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};
use cellswarm_common::records::Head;
use cellswarm_common::wire::MergeRecord;

use crate::rules::{Position, RuleError, Rules, check_record};

/// Why a catch-up stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The record breaks a rule.
    #[error("round {round}: {rule}")]
    Rule {
        /// The record's round.
        round: RoundId,
        /// The rule it breaks.
        rule: RuleError,
    },
    /// Recomputing the record's merge gave another model or aggregator state.
    #[error("round {round}: the record says model {}, recomputing its merge gives {}", .claimed.short(), .recomputed.short())]
    Mismatch {
        /// The record's round.
        round: RoundId,
        /// The model the record names.
        claimed: ModelHash,
        /// The model the merge gives.
        recomputed: ModelHash,
    },
    /// A record was offered before the previous one was confirmed, or a confirmation
    /// came with no record waiting.
    #[error("out of order: {0}")]
    OutOfOrder(&'static str),
    /// The catch-up checked as many records as it may hold.
    #[error("{0} records checked, the most one catch-up commits")]
    Full(usize),
}

/// The agreed parameters of [`Rules`], owned for the length of a catch-up.
#[derive(Debug, Clone)]
pub struct OwnedRules {
    /// The consortium agreement digest.
    pub consortium: [u8; 32],
    /// The agreed merge strategy's name.
    pub strategy: String,
    /// `rounds.min_peers`.
    pub quorum: usize,
    /// The members' signing keys.
    pub members: BTreeSet<SignerKey>,
}

impl OwnedRules {
    fn rules(&self) -> Rules<'_> {
        Rules {
            consortium: self.consortium,
            strategy: &self.strategy,
            quorum: self.quorum,
            members: &self.members,
        }
    }
}

/// One catch-up in progress: see the module documentation.
#[derive(Debug)]
pub struct ChainCheck {
    rules: OwnedRules,
    at: Position,
    /// Deltas merged by the records confirmed so far.
    merged: HashSet<DeltaHash>,
    /// The record waiting for its merge to be recomputed.
    waiting: Option<(MergeRecord, RecordHash)>,
    confirmed: usize,
    limit: usize,
}

impl ChainCheck {
    /// A catch-up from `at` that confirms at most `limit` records.
    #[must_use]
    pub fn new(rules: OwnedRules, at: Position, limit: usize) -> Self {
        Self {
            rules,
            at,
            merged: HashSet::new(),
            waiting: None,
            confirmed: 0,
            limit,
        }
    }

    /// The same catch-up from another position, before any record was confirmed: a node
    /// whose head round may be a dead branch starts one round earlier.
    #[must_use]
    pub fn restart_at(mut self, at: Position) -> Self {
        self.restart(at);
        self
    }

    /// [`ChainCheck::restart_at`] in place: from `at`, if no record was confirmed yet.
    pub fn restart(&mut self, at: Position) {
        if self.confirmed == 0 {
            self.at = at;
            self.waiting = None;
        }
    }

    /// Where the chain stands: the next record must continue it.
    #[must_use]
    pub fn position(&self) -> Position {
        self.at
    }

    /// Records confirmed so far.
    #[must_use]
    pub fn confirmed(&self) -> usize {
        self.confirmed
    }

    /// Whether the catch-up may check another record.
    #[must_use]
    pub fn has_room(&self) -> bool {
        self.confirmed < self.limit
    }

    /// Checks the next record of the chain, signed by `signer`; `merged_before` says
    /// whether a delta was merged before the catch-up began. On success the record waits
    /// for [`ChainCheck::confirm`] with the result of recomputing its merge.
    ///
    /// # Errors
    /// The rule it breaks; [`ChainError::OutOfOrder`] while another record waits;
    /// [`ChainError::Full`] once `limit` records were confirmed.
    pub fn check(
        &mut self,
        record: MergeRecord,
        hash: RecordHash,
        signer: SignerKey,
        merged_before: impl Fn(&DeltaHash) -> bool,
    ) -> Result<&MergeRecord, ChainError> {
        if self.waiting.is_some() {
            return Err(ChainError::OutOfOrder(
                "the previous record is not confirmed",
            ));
        }
        if !self.has_room() {
            return Err(ChainError::Full(self.confirmed));
        }
        let rule = |rule| ChainError::Rule {
            round: record.round,
            rule,
        };
        check_record(&self.rules.rules(), &self.at, &record, signer, |d| {
            merged_before(d) || self.merged.contains(d)
        })
        .map_err(rule)?;
        Ok(&self.waiting.insert((record, hash)).0)
    }

    /// Confirms the waiting record with the model hash and aggregator state hash its
    /// recomputed merge gave; on a match the chain moves on to the record's round and the
    /// confirmed record is returned (for the driver to commit).
    ///
    /// # Errors
    /// [`ChainError::Mismatch`] if the merge gave something else (the record is then
    /// dropped and the catch-up should stop); [`ChainError::OutOfOrder`] with no record
    /// waiting.
    pub fn confirm(
        &mut self,
        model: ModelHash,
        state: [u8; 32],
    ) -> Result<(MergeRecord, RecordHash), ChainError> {
        let (record, hash) = self
            .waiting
            .take()
            .ok_or(ChainError::OutOfOrder("no record waits for its merge"))?;
        if record.model != model || record.state != state {
            return Err(ChainError::Mismatch {
                round: record.round,
                claimed: record.model,
                recomputed: model,
            });
        }
        self.merged
            .extend(record.contributions.iter().map(|c| c.delta));
        self.at = Position::after(&Head {
            round: record.round,
            record: Some(hash),
            model: record.model,
            state: record.state,
        });
        self.confirmed += 1;
        Ok((record, hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::tests::{key, members, record, start};

    fn rules() -> OwnedRules {
        OwnedRules {
            consortium: [7; 32],
            strategy: "fedavg".into(),
            quorum: 2,
            members: members(4),
        }
    }

    /// A record and its hash, continuing `at`.
    fn next(at: &Position, signers: &[u8]) -> (MergeRecord, RecordHash, SignerKey) {
        let (r, s) = record(at, signers, 0);
        let hash = RecordHash::of(&[r.round.0 as u8, 42]);
        (r, hash, s)
    }

    #[test]
    fn an_honest_chain_is_confirmed_record_by_record() {
        let mut c = ChainCheck::new(rules(), start(), 10);
        for _ in 0..5 {
            let (r, h, s) = next(&c.position(), &[1, 2, 3]);
            let (model, state) = (r.model, r.state);
            c.check(r, h, s, |_| false).unwrap();
            let (done, hash) = c.confirm(model, state).unwrap();
            assert_eq!(hash, h);
            assert_eq!(c.position().base, done.model);
            // The next record links to this round's outcome, not to its record.
            let outcome = Head {
                round: done.round,
                record: Some(h),
                model: done.model,
                state: done.state,
            };
            assert_eq!(c.position().prev, crate::rules::link(&outcome));
        }
        assert_eq!(c.confirmed(), 5);
        assert_eq!(c.position().round, RoundId(6));
    }

    /// Hole 1 of issue 15: catch-up adopted any chain one member signed whose hashes
    /// linked. A chain naming a model that its deltas do not give stops at that record.
    #[test]
    fn a_forged_chain_is_refused() {
        let mut c = ChainCheck::new(rules(), start(), 10);
        let (r, h, s) = next(&c.position(), &[1, 2, 3]);
        c.check(r, h, s, |_| false).unwrap();
        // The deltas merge to another model than the record names.
        let err = c.confirm(ModelHash::of(b"what the deltas give"), [0; 32]);
        assert!(matches!(err, Err(ChainError::Mismatch { .. })));
        assert_eq!(c.confirmed(), 0);
        assert_eq!(c.position(), start());
        // Right model, wrong aggregator state.
        let (r, h, s) = next(&c.position(), &[1, 2, 3]);
        let model = r.model;
        c.check(r, h, s, |_| false).unwrap();
        assert!(c.confirm(model, [1; 32]).is_err());
        // A chain signed by its merger alone, over too few deltas or by the wrong
        // candidate, is refused before any merge is run.
        let (r, h, s) = next(&c.position(), &[1]);
        assert!(matches!(
            c.check(r, h, s, |_| false),
            Err(ChainError::Rule {
                rule: RuleError::BelowQuorum { .. },
                ..
            })
        ));
        let (r, h, s) = next(&c.position(), &[1, 2, 3]);
        let wrong = (1..=3).map(key).find(|k| *k != s).unwrap();
        assert!(matches!(
            c.check(r, h, wrong, |_| false),
            Err(ChainError::Rule {
                rule: RuleError::NotCandidate { .. },
                ..
            })
        ));
    }

    #[test]
    fn no_delta_is_merged_twice_across_the_chain() {
        let mut c = ChainCheck::new(rules(), start(), 10);
        let (r, h, s) = next(&c.position(), &[1, 2, 3]);
        let replayed = r.contributions[0].delta;
        let (model, state) = (r.model, r.state);
        c.check(r, h, s, |_| false).unwrap();
        c.confirm(model, state).unwrap();
        let (mut r, h, s) = next(&c.position(), &[1, 2, 3]);
        r.contributions[0].delta = replayed;
        assert!(matches!(
            c.check(r, h, s, |_| false),
            Err(ChainError::Rule { rule: RuleError::Replayed(d), .. }) if d == replayed
        ));
    }

    /// Hole 3 of issue 15 (memory): one catch-up holds a bounded number of records.
    #[test]
    fn a_catch_up_confirms_a_bounded_number_of_records() {
        let mut c = ChainCheck::new(rules(), start(), 2);
        for _ in 0..2 {
            let (r, h, s) = next(&c.position(), &[1, 2]);
            let (model, state) = (r.model, r.state);
            c.check(r, h, s, |_| false).unwrap();
            c.confirm(model, state).unwrap();
        }
        assert!(!c.has_room());
        let (r, h, s) = next(&c.position(), &[1, 2]);
        assert_eq!(
            c.check(r, h, s, |_| false).unwrap_err(),
            ChainError::Full(2)
        );
    }

    #[test]
    fn records_are_taken_one_at_a_time() {
        let mut c = ChainCheck::new(rules(), start(), 10);
        assert!(matches!(
            c.confirm(ModelHash::default(), [0; 32]),
            Err(ChainError::OutOfOrder(_))
        ));
        let (r, h, s) = next(&c.position(), &[1, 2]);
        let again = (r.clone(), h, s);
        c.check(r, h, s, |_| false).unwrap();
        assert!(matches!(
            c.check(again.0, again.1, again.2, |_| false),
            Err(ChainError::OutOfOrder(_))
        ));
    }
}
