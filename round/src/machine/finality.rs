//! Attestations and finality: which outcomes members vote for and check, when an outcome
//! is final or certified, and how a member that holds another outcome of a final round
//! moves to it.

use cellswarm_common::ids::{ModelHash, RoundId, SignerKey};
use cellswarm_common::records::Head;

use std::collections::BTreeMap;

use super::{BATCH, Durable, Effect, HISTORY, Machine, Refusal, Req, Resp, final_threshold};
use crate::cert::{Attestation, certified, threshold};

/// Heartbeats before a voter asked for a final outcome's record is asked again.
const FINAL_RETRY: u32 = 4;

impl Machine {
    /// Whether the attestations we hold make `round`'s outcome final.
    #[must_use]
    pub fn is_final(&self, round: RoundId, model: ModelHash, state: [u8; 32]) -> bool {
        self.attested_by(round, model, state)
            >= final_threshold(self.cfg.members.len(), self.cfg.byzantine)
    }

    /// Whether our head is final ([`Machine::final_at`]).
    #[must_use]
    pub fn head_is_final(&self) -> bool {
        self.final_at(self.head.round)
    }

    /// Whether our record of `round` is final: it and every round of ours before it
    /// that we still keep are attested by [`final_threshold`] members (rounds older than
    /// what we keep count as final). A record attested by enough members on top of a
    /// round that is not final is not final: it may stand on a dead branch.
    #[must_use]
    pub fn final_at(&self, round: RoundId) -> bool {
        self.outcomes()
            .take_while(|h| h.round <= round)
            .all(|h| self.is_final(h.round, h.model, h.state))
    }

    /// Our outcomes of the rounds we keep, oldest first.
    pub(super) fn outcomes(&self) -> impl Iterator<Item = Head> + '_ {
        self.kept
            .iter()
            .skip(1)
            .map(|k| k.before)
            .chain((!self.kept.is_empty()).then_some(self.head))
    }

    /// How many of our newest rounds to replace for `a`'s outcome: a round we kept whose
    /// final outcome is not ours (we preferred another before its attestations reached
    /// us), while every round of ours before it is final. `None` when there is nothing to
    /// replace or a catch-up runs.
    pub(super) fn final_not_ours(&self, a: &Attestation) -> Option<usize> {
        if self.sync.is_some() || a.round > self.head.round || a.round.0 == 0 {
            return None;
        }
        let ours = self.outcomes().find(|h| h.round == a.round)?;
        if (ours.model, ours.state) == (a.model, a.state)
            || !self.is_final(a.round, a.model, a.state)
            || !self.final_at(RoundId(a.round.0 - 1))
        {
            return None;
        }
        let depth = (self.head.round.0 - a.round.0 + 1) as usize;
        (depth <= self.kept.len()).then_some(depth)
    }

    /// An outcome of a round we kept became final and it is not ours: our chain from that
    /// round stands on a dead branch. Its record comes from our own vote when we voted
    /// for it and left it, else from a member that voted for it (which keeps it even
    /// after leaving it: the outcome may have become final after all its voters moved);
    /// checked and recomputed like any catch-up, it replaces our rounds from there.
    pub(super) fn check_final(&mut self, a: Attestation) {
        let Some(depth) = self.final_not_ours(&a) else {
            return;
        };
        let mine = self
            .voted
            .get(&a.round)
            .filter(|v| (v.record.model, v.record.state) == (a.model, a.state))
            .cloned();
        if let Some(sr) = mine {
            // Our own record: nobody to blame if it no longer fits; a voter (or any member
            // we reach) serves the deltas it names.
            let helper = self
                .other_voters(&a)
                .chain(self.connected.iter().copied())
                .next();
            if let Some(peer) = helper {
                self.final_sync(peer, sr, depth, true);
            }
            return;
        }
        if self
            .final_asked
            .is_some_and(|t| self.now < t + self.cfg.heartbeat / 2)
        {
            return;
        }
        // Each voter in turn (one that cannot or will not give it is not asked again for
        // a few heartbeats): a liar or a voter that crashed must not hold up the rest.
        let retry = self.cfg.heartbeat * FINAL_RETRY;
        let now = self.now;
        self.final_tried.retain(|_, t| now < *t + retry);
        let Some(asked) = self.other_voters(&a).find(|s| {
            !self.distrust.contains_key(s)
                && self.connected.contains(s)
                && !self.final_tried.contains_key(s)
        }) else {
            return;
        };
        self.final_asked = Some(now);
        self.final_tried.insert(asked, now);
        self.request(asked, Req::Voted(a.round));
    }

    /// The members other than us whose counted vote is `a`'s outcome.
    fn other_voters<'a>(&'a self, a: &'a Attestation) -> impl Iterator<Item = SignerKey> + 'a {
        self.votes(a.round)
            .filter(move |v| (v.model, v.state) == (a.model, a.state) && v.signer != self.cfg.me)
            .map(|v| v.signer)
    }

    /// A member's answer to our request for the record it voted for in `round`.
    pub(super) fn on_voted(&mut self, from: SignerKey, round: RoundId, resp: Option<Resp>) {
        let sr = match resp {
            Some(Resp::Record(Some(sr))) => sr,
            Some(Resp::Record(None)) => {
                // It no longer holds it (its store lost it): its chain, if that still
                // holds the final outcome.
                let Some(a) = self.final_outcome(round) else {
                    return;
                };
                if let Some(depth) = self.final_not_ours(&a) {
                    self.rewind_to_final(from, depth, (a.model, a.state));
                }
                return;
            }
            // No answer: the next voter, in turn.
            None => return,
            Some(_) => {
                self.refuse(from, Refusal::Answer(Req::Voted(round)));
                return;
            }
        };
        if sr.record.round != round {
            self.refuse(from, Refusal::Answer(Req::Voted(round)));
            return;
        }
        let a = Attestation {
            signer: from,
            round,
            record: sr.hash,
            model: sr.record.model,
            state: sr.record.state,
        };
        // Not final (any more) by what we hold: a vote that no longer counts, or a round
        // that left our window; nothing to do, and no lie.
        if !self.is_final(round, a.model, a.state) {
            return;
        }
        if let Some(depth) = self.final_not_ours(&a) {
            self.final_sync(from, sr, depth, false);
        }
    }

    /// Whether we left an outcome we voted for that may still become final (the
    /// members who attested other outcomes of its round are too few to stop it): then we
    /// vote no more, sending checks instead, until it is ours again or cannot become
    /// final. Our last votes are repeated with every heartbeat meanwhile, so a member
    /// that left an outcome it made final (the last vote came after it left) lets
    /// everyone learn it is final, and nobody's newer votes make a branch beside it look
    /// final.
    pub(super) fn locked(&self) -> bool {
        let q = final_threshold(self.cfg.members.len(), self.cfg.byzantine);
        let ours: BTreeMap<RoundId, (ModelHash, [u8; 32])> = self
            .outcomes()
            .map(|h| (h.round, (h.model, h.state)))
            .collect();
        self.voted.iter().any(|(r, v)| {
            let x = (v.record.model, v.record.state);
            if ours.get(r).is_none_or(|o| *o == x) {
                return false;
            }
            let against = self.votes(*r).filter(|a| (a.model, a.state) != x).count();
            self.cfg.members.len().saturating_sub(against) >= q
        })
    }

    /// A final outcome of `round` by the attestations we hold, as one of its votes
    /// (another member's where there is one).
    pub(super) fn final_outcome(&self, round: RoundId) -> Option<Attestation> {
        let q = final_threshold(self.cfg.members.len(), self.cfg.byzantine);
        let mut tally: BTreeMap<(ModelHash, [u8; 32]), (usize, Attestation)> = BTreeMap::new();
        for v in self.votes(round) {
            let e = tally.entry((v.model, v.state)).or_insert((0, *v));
            e.0 += 1;
            if e.1.signer == self.cfg.me {
                e.1 = *v;
            }
        }
        tally.into_values().find(|(n, _)| *n >= q).map(|(_, a)| a)
    }

    /// Every heartbeat: a round we kept whose final outcome is not ours (the attestation
    /// that made it final may have arrived while a catch-up ran, and voters repeat only
    /// their newest rounds).
    pub(super) fn scan_final(&mut self) {
        let rounds: Vec<RoundId> = self.outcomes().map(|h| h.round).collect();
        for r in rounds {
            if self.sync.is_some() {
                return;
            }
            if let Some(a) = self.final_outcome(r) {
                self.check_final(a);
            }
        }
    }

    /// Attestations of `round` that count: one per member, none from a member that
    /// attested two outcomes of the round (it lied; dropping it everywhere keeps the
    /// members' counts alike, whichever of its two votes each heard first).
    pub(super) fn votes(&self, round: RoundId) -> impl Iterator<Item = &Attestation> + '_ {
        let liars = self.two_faced.get(&round);
        self.atts
            .get(&round)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(move |a| liars.is_none_or(|l| !l.contains_key(&a.signer)))
    }

    pub(super) fn attested_by(&self, round: RoundId, model: ModelHash, state: [u8; 32]) -> usize {
        self.votes(round)
            .filter(|a| a.model == model && a.state == state)
            .count()
    }

    /// Whether enough members attest `round`'s outcome for us to adopt a record of it
    /// we could not recompute ([`crate::cert`]).
    pub(super) fn certified(&self, round: RoundId, model: ModelHash, state: [u8; 32]) -> bool {
        // A vote or a check: either way its member recomputed that outcome.
        let list: Vec<Attestation> = self
            .votes(round)
            .chain(
                self.checked
                    .get(&round)
                    .into_iter()
                    .flat_map(|m| m.values()),
            )
            .copied()
            .collect();
        certified(
            round,
            model,
            state,
            &list,
            &self.cfg.members,
            threshold(self.cfg.members.len(), self.cfg.byzantine),
        )
    }

    pub(super) fn on_checked(&mut self, a: Attestation) {
        let low = self.head.round.0.saturating_sub(HISTORY as u64);
        let high = self.head.round.0 + 2 + u64::from(BATCH);
        if !self.cfg.members.contains(&a.signer) || a.round.0 <= low || a.round.0 > high {
            return;
        }
        // A member's newest check of a round: the outcome it holds now.
        self.checked.entry(a.round).or_default().insert(a.signer, a);
    }

    pub(super) fn on_attestation(&mut self, a: Attestation) {
        if !self.cfg.members.contains(&a.signer) {
            return;
        }
        // Only rounds near the head are kept: what a certificate or finality needs.
        let low = self.head.round.0.saturating_sub(HISTORY as u64);
        let high = self.head.round.0 + 2 + u64::from(BATCH);
        if a.round.0 <= low || a.round.0 > high {
            return;
        }
        let by = self.atts.entry(a.round).or_default();
        match by.entry(a.signer) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(a);
                self.out.push_back(Effect::Persist(Durable::Attestation(a)));
            }
            std::collections::btree_map::Entry::Occupied(o) => {
                let first = o.get();
                if (first.model, first.state) != (a.model, a.state) {
                    // Kept as proof, served with the others.
                    let proof = self.two_faced.entry(a.round).or_default();
                    if let std::collections::btree_map::Entry::Vacant(v) = proof.entry(a.signer) {
                        v.insert(a);
                        self.out.push_back(Effect::Persist(Durable::Attestation(a)));
                    }
                }
            }
        }
    }
}
