//! Fork choice between two outcomes of one round. Forks of the newest round happen
//! without any liar: a merger commits its own record and is cut off before the others
//! see it, and the next candidate merges another set of deltas; after a partition heals
//! both halves may hold a head of the same height, neither with a successor, and neither
//! side can reach a quorum alone. Two outcomes of one round can never both be final
//! ([`super::final_threshold`]); between non-final ones every member prefers the same:
//! a final one, then the one more members attested, then the lower model hash. A node
//! whose head loses replaces it with the other record once that record passes the rules
//! from the round before and recomputes from the deltas it names.

use std::cmp::Reverse;

use cellswarm_common::ids::{ModelHash, RoundId, SignerKey};

use super::{Machine, Refusal, Req, SignedRecord};

/// Heartbeats before a member that was asked about our head's round is asked again.
const FORK_RETRY: u32 = 4;
use crate::rules::{Position, RuleError, Rules, check_record};

impl Machine {
    /// How much the consortium (as far as we know) prefers a model as `round`'s outcome:
    /// final first, then attested by more members, then the lower hash.
    pub(super) fn preference(
        &self,
        round: RoundId,
        model: ModelHash,
    ) -> (bool, usize, Reverse<ModelHash>) {
        let by = self.votes(round).filter(|a| a.model == model).count();
        let final_q = super::final_threshold(self.cfg.members.len(), self.cfg.byzantine);
        let before = RoundId(round.0.saturating_sub(1));
        (by >= final_q && self.final_at(before), by, Reverse(model))
    }

    /// A member's head is of our head's round with another model: if we prefer it to
    /// ours (and ours is not final), ask for its record (once per half heartbeat).
    pub(super) fn ask_fork(&mut self, from: SignerKey, model: ModelHash) {
        let round = self.head.round;
        if self.head_is_final()
            || self.sync.is_some()
            || self.preference(round, model) <= self.preference(round, self.head.model)
        {
            return;
        }
        if self
            .fork_asked
            .is_some_and(|t| self.now < t + self.cfg.heartbeat / 2)
        {
            return;
        }
        // Each member once per head (a liar may answer with another record than the
        // head it claims), then all again; and any member again after a few heartbeats:
        // when the one member on the preferred outcome could not give us every delta it
        // names (lost, or the one holding it was down), we must ask it again later, or a
        // three-way split of votes never resolves.
        if self
            .fork_tried
            .get(&from)
            .is_some_and(|t| self.now < *t + self.cfg.heartbeat * FORK_RETRY)
        {
            return;
        }
        if self.fork_tried.len() + 1 >= self.cfg.members.len() {
            self.fork_tried.clear();
        }
        self.fork_tried.insert(from, self.now);
        self.fork_asked = Some(self.now);
        // What it knows of the round's attestations first: the preference is by them.
        self.request(from, Req::Attestations(round));
        self.request(from, Req::Record(round));
    }

    /// Another record of our head's round: if its outcome is preferred to ours and it
    /// passes the rules from the round before, check it as a catch-up that replaces our
    /// head.
    pub(super) fn consider_fork(&mut self, from: SignerKey, sr: SignedRecord) {
        let round = self.head.round;
        if sr.record.round != round || self.sync.is_some() || self.head_is_final() {
            return;
        }
        let (model, state) = (sr.record.model, sr.record.state);
        if (model, state) == (self.head.model, self.head.state)
            || self.preference(round, model) <= self.preference(round, self.head.model)
        {
            return;
        }
        let Some(k) = self.kept.back().cloned() else {
            return;
        };
        let rules = Rules {
            consortium: self.cfg.consortium,
            strategy: &self.cfg.strategy,
            quorum: self.cfg.quorum,
            members: &self.cfg.members,
        };
        let at = Position::after(&k.before);
        let merged = |d: &_| self.merged.contains(d) && !k.merged.contains(d);
        match check_record(&rules, &at, &sr.record, sr.signer, merged) {
            Ok(()) => self.fork_sync(from, sr, &k),
            // The fork is older than our head: a catch-up from that member that starts
            // one round earlier for as long as its chain does not continue ours.
            Err(RuleError::WrongBase { .. } | RuleError::WrongPrev { .. }) => {
                self.fork_deep(from, &k);
            }
            Err(rule) => {
                let record = sr.hash;
                self.refuse(sr.signer, Refusal::Rule { record, rule });
            }
        }
    }
}
