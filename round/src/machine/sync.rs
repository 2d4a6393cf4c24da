//! Catching up: a node behind a member takes that member's chain one record at a time,
//! each checked by [`ChainCheck`] (the rules of every record), recomputed from the deltas
//! it names, and committed once the record after it recomputed too (a quorum of signed
//! deltas started from it) or a certificate vouches for it. Training goes on meanwhile:
//! a claim to be ahead changes nothing until a record checks.
//!
//! A head that is not final may be a dead branch (its merger raced another candidate, or
//! was cut off): when the peer's chain does not continue ours, the catch-up starts one
//! round earlier, up to [`HISTORY`] rounds and never past a final record, and the records
//! it recomputes replace ours.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cellswarm_common::ids::{DeltaHash, ModelHash, RoundId, SignerKey};

use super::fetch::{Fetches, Next};
use super::{
    BATCH, DeltaMeta, Effect, HISTORY, Job, Kept, Machine, Refusal, Req, SignedRecord, Time,
};
use crate::chain::{ChainCheck, ChainError, OwnedRules};
use crate::rules::{Position, RuleError, link};

/// Most records one catch-up checks (then it ends, and the next begins from the new head).
pub const MAX_SYNC_RECORDS: usize = 1024;

/// One catch-up in progress.
#[derive(Debug)]
pub struct Sync {
    peer: SignerKey,
    check: ChainCheck,
    /// The aggregator state at the chain's position.
    state: [u8; 32],
    /// Records received and not yet checked (one batch at most).
    queue: VecDeque<SignedRecord>,
    /// The last batch was full: there may be more.
    more: bool,
    /// The batch asked for (from this round).
    asked: Option<RoundId>,
    /// The record checked and waiting for its deltas or its merge.
    waiting: Option<SignedRecord>,
    merging: bool,
    /// Deltas of the waiting record we hold.
    known: BTreeMap<DeltaHash, DeltaMeta>,
    fetches: Fetches,
    asked_atts: Option<RoundId>,
    /// The newest recomputed record, committed when its successor recomputes or a
    /// certificate vouches for it.
    confirmed: Option<SignedRecord>,
    /// How many of our newest rounds the chain replaces.
    rewind: usize,
    /// The deltas of the rounds it replaces (no longer merged, for the rules).
    unmerged: BTreeSet<DeltaHash>,
    /// The last time the catch-up moved.
    moved: Time,
    /// Records committed by it.
    committed: usize,
    /// A fork choice: its one record replaces our head without a successor.
    fork: bool,
    /// A catch-up that replaces our rounds because the peer's chain does not continue
    /// ours replaces them only with a longer chain: records up to this round (our head's
    /// when it began) are held back until one after it recomputes.
    gate: Option<RoundId>,
    /// Records recomputed and held back by the gate.
    held: Vec<SignedRecord>,
    /// A round's final outcome: a chain with another outcome of that round is not taken
    /// (the member serving it left the outcome; no lie).
    expect: Option<(RoundId, ModelHash, [u8; 32])>,
    /// Checks our own record: a broken rule ends it without blaming the peer.
    blameless: bool,
}

impl Sync {
    pub(super) fn footprint(&self) -> usize {
        self.queue.len() + self.known.len() + self.fetches.footprint() + self.unmerged.len() + 2
    }
}

impl Machine {
    /// Starts catching up from `peer` unless a catch-up runs or `peer` lately served a
    /// chain that broke a rule.
    pub(super) fn begin_sync(&mut self, peer: SignerKey) {
        if self.sync.is_some() || self.distrust.contains_key(&peer) || peer == self.cfg.me {
            return;
        }
        let at = Position::after(&self.head);
        self.counters.syncs += 1;
        self.sync = Some(self.new_sync(peer, at, self.head.state));
        self.request(
            peer,
            Req::Records {
                from: at.round,
                max: BATCH,
            },
        );
    }

    fn new_sync(&self, peer: SignerKey, at: Position, state: [u8; 32]) -> Sync {
        let rules = OwnedRules {
            consortium: self.cfg.consortium,
            strategy: self.cfg.strategy.clone(),
            quorum: self.cfg.quorum,
            members: self.cfg.members.clone(),
        };
        Sync {
            peer,
            check: ChainCheck::new(rules, at, MAX_SYNC_RECORDS),
            state,
            queue: VecDeque::new(),
            more: true,
            asked: Some(at.round),
            waiting: None,
            merging: false,
            known: BTreeMap::new(),
            fetches: Fetches::default(),
            asked_atts: None,
            confirmed: None,
            rewind: 0,
            unmerged: BTreeSet::new(),
            moved: self.now,
            committed: 0,
            fork: false,
            gate: None,
            held: Vec::new(),
            expect: None,
            blameless: false,
        }
    }

    /// Checks `sr`, another record of our head's round that fork choice prefers, as a
    /// catch-up from the round before that replaces our head once it recomputes.
    pub(super) fn fork_sync(&mut self, peer: SignerKey, sr: SignedRecord, k: &Kept) {
        let mut s = self.new_sync(peer, Position::after(&k.before), k.before.state);
        s.asked = None;
        s.more = false;
        s.rewind = 1;
        s.fork = true;
        s.unmerged.extend(k.merged.iter().copied());
        s.queue.push_back(sr);
        self.counters.syncs += 1;
        self.sync = Some(s);
        self.sync_step();
    }

    /// Replaces our newest `depth` rounds by `peer`'s chain, checked and recomputed like
    /// any catch-up, provided its first record is `outcome` (a final outcome of the first
    /// of them that is not ours).
    pub(super) fn rewind_to_final(
        &mut self,
        peer: SignerKey,
        depth: usize,
        outcome: (ModelHash, [u8; 32]),
    ) {
        let start = self.kept.len() - depth;
        let before = self.kept[start].before;
        let mut s = self.new_sync(peer, Position::after(&before), before.state);
        s.rewind = depth;
        for k in self.kept.iter().skip(start) {
            s.unmerged.extend(k.merged.iter().copied());
        }
        let from = before.round.next();
        s.expect = Some((from, outcome.0, outcome.1));
        self.counters.syncs += 1;
        self.sync = Some(s);
        self.request(peer, Req::Records { from, max: BATCH });
    }

    /// Replaces our newest `depth` rounds by `sr` alone, the final outcome of the first
    /// of them, once it passes the rules and recomputes (its deltas fetched from their
    /// signers, `peer` and every member we reach). The rounds after it are then caught
    /// up or played again.
    ///
    /// `own`: the record is our own vote, and a rule it breaks is no peer's lie.
    pub(super) fn final_sync(
        &mut self,
        peer: SignerKey,
        sr: SignedRecord,
        depth: usize,
        own: bool,
    ) {
        let start = self.kept.len() - depth;
        let before = self.kept[start].before;
        let mut s = self.new_sync(peer, Position::after(&before), before.state);
        s.asked = None;
        s.more = false;
        s.rewind = depth;
        s.fork = true;
        s.blameless = own;
        s.expect = Some((sr.record.round, sr.record.model, sr.record.state));
        for k in self.kept.iter().skip(start) {
            s.unmerged.extend(k.merged.iter().copied());
        }
        s.queue.push_back(sr);
        self.counters.syncs += 1;
        self.sync = Some(s);
        self.sync_step();
    }

    /// Fork choice prefers a member's head whose chain forks from ours before our head:
    /// its chain from our head's round, replacing ours as deep as it differs.
    pub(super) fn fork_deep(&mut self, peer: SignerKey, k: &Kept) {
        let mut s = self.new_sync(peer, Position::after(&k.before), k.before.state);
        s.rewind = 1;
        s.fork = true;
        s.unmerged.extend(k.merged.iter().copied());
        let from = k.before.round.next();
        s.asked = Some(from);
        self.counters.syncs += 1;
        self.sync = Some(s);
        self.request(peer, Req::Records { from, max: BATCH });
    }

    pub(super) fn sync_wants(&self, hash: &DeltaHash) -> bool {
        self.sync.as_ref().is_some_and(|s| s.fetches.asking(hash))
    }

    /// Ends the catch-up; `lied` when the peer's chain broke a rule.
    fn end_sync(&mut self, lied: Option<Refusal>) {
        if let Some(s) = self.sync.take()
            && let Some(why) = lied
        {
            self.distrust.insert(s.peer, self.now);
            self.refuse(s.peer, why);
        }
    }

    /// Gives up a catch-up that has not moved for four heartbeats.
    pub(super) fn sync_deadline(&mut self) {
        let limit = self.cfg.heartbeat.saturating_mul(4);
        if self
            .sync
            .as_ref()
            .is_some_and(|s| self.now.saturating_sub(s.moved) > limit)
        {
            self.end_sync(None);
        }
    }

    pub(super) fn sync_records(
        &mut self,
        from: SignerKey,
        start: RoundId,
        max: u32,
        list: Vec<SignedRecord>,
    ) {
        let now = self.now;
        let Some(s) = self.sync.as_mut() else { return };
        if s.peer != from || s.asked != Some(start) {
            return;
        }
        s.asked = None;
        s.moved = now;
        let consecutive = list
            .iter()
            .enumerate()
            .all(|(i, r)| r.record.round.0 == start.0 + i as u64);
        if list.len() > max as usize || !consecutive {
            self.end_sync(Some(Refusal::Answer(Req::Records { from: start, max })));
            return;
        }
        if list.is_empty() && s.committed == 0 && s.check.confirmed() == 0 && !s.fork {
            // It claimed to be ahead and has nothing to show: not believed again for a
            // while (a claim is only ever made of what is durable).
            let peer = s.peer;
            self.sync = None;
            self.distrust.insert(peer, now);
            return;
        }
        s.more = list.len() == max as usize && max > 0;
        s.queue = list.into();
        self.sync_step();
    }

    /// Checks the next record if none waits.
    fn sync_step(&mut self) {
        let Some(s) = self.sync.as_mut() else { return };
        if s.waiting.is_some() || s.merging || s.asked.is_some() {
            return;
        }
        let Some(sr) = s.queue.pop_front() else {
            if s.more && s.check.has_room() {
                let from = s.check.position().round;
                s.asked = Some(from);
                let peer = s.peer;
                self.request(peer, Req::Records { from, max: BATCH });
            } else {
                self.sync_finish(false);
            }
            return;
        };
        if s.expect.is_some_and(|(r, m, st)| {
            sr.record.round == r && (sr.record.model, sr.record.state) != (m, st)
        }) {
            // Not the final outcome: the peer left it, as we did.
            self.sync = None;
            return;
        }
        let first = s.check.confirmed() == 0;
        let merged = &self.merged;
        let unmerged = &s.unmerged;
        let checked = s
            .check
            .check(sr.record.clone(), sr.hash, sr.signer, |d| {
                merged.contains(d) && !unmerged.contains(d)
            })
            .map(|_| ());
        match checked {
            Ok(()) => {
                s.waiting = Some(sr);
                s.known.clear();
                s.fetches = Fetches::default();
                self.sync_fetch();
            }
            Err(ChainError::Rule {
                rule: RuleError::WrongPrev { .. } | RuleError::WrongBase { .. },
                ..
            }) if first && self.may_rewind() => self.rewind_sync(),
            Err(_) if self.sync.as_ref().is_some_and(|s| s.blameless) => self.end_sync(None),
            Err(e) => self.end_sync(Some(Refusal::Chain(e))),
        }
    }

    /// Whether the catch-up may start one round earlier: the round it would replace is
    /// ours to replace (kept, and not final).
    fn may_rewind(&self) -> bool {
        let Some(s) = self.sync.as_ref() else {
            return false;
        };
        let depth = s.rewind + 1;
        if depth > self.kept.len() || depth > HISTORY {
            return false;
        }
        // The record at depth `depth` from the head is the one that would be replaced;
        // it is final if enough members attest it.
        let replaced = self.kept[self.kept.len() - depth].before.round.next();
        !self.final_at(replaced)
    }

    fn rewind_sync(&mut self) {
        let depth = self.sync.as_ref().map_or(0, |s| s.rewind) + 1;
        let k = self.kept[self.kept.len() - depth].clone();
        let head = self.head.round;
        let Some(s) = self.sync.as_mut() else { return };
        if !s.fork {
            s.gate = Some(head);
        }
        s.rewind = depth;
        s.unmerged.extend(k.merged.iter().copied());
        let at = Position::after(&k.before);
        s.check.restart(at);
        s.state = k.before.state;
        s.queue.clear();
        s.more = true;
        s.asked = Some(at.round);
        let peer = s.peer;
        self.request(
            peer,
            Req::Records {
                from: at.round,
                max: BATCH,
            },
        );
    }

    /// Fetches the waiting record's deltas; merges once all are here.
    fn sync_fetch(&mut self) {
        let connected: Vec<SignerKey> = self.connected.iter().copied().collect();
        let me = self.cfg.me;
        let Some(s) = self.sync.as_mut() else { return };
        let Some(sr) = s.waiting.as_ref() else { return };
        // Our own deltas we hold.
        for c in sr.record.contributions.iter().filter(|c| c.signer == me) {
            if let Some(o) = self.own.iter().find(|o| o.hash == c.delta) {
                s.known.insert(o.hash, *o);
            }
        }
        let missing: Vec<(SignerKey, DeltaHash)> = sr
            .record
            .contributions
            .iter()
            .filter(|c| !s.known.contains_key(&c.delta))
            .map(|c| (c.signer, c.delta))
            .collect();
        if missing.is_empty() {
            s.merging = true;
            let job = Job::Sync {
                round: sr.record.round,
                record: sr.hash,
            };
            let e = Effect::Merge {
                job,
                base: sr.record.base,
                state: s.state,
                contributions: sr.record.contributions.clone(),
            };
            self.out.push_back(e);
            return;
        }
        if missing.iter().all(|(_, d)| s.fetches.failed(d)) {
            // Nobody we asked holds them: only a certificate can vouch for the record.
            let round = sr.record.round;
            if s.asked_atts != Some(round) {
                s.asked_atts = Some(round);
                let peer = s.peer;
                self.request(peer, Req::Attestations(round));
            } else {
                self.sync_retry(false);
            }
            return;
        }
        let peer = s.peer;
        let mut asks = Vec::new();
        for (signer, d) in missing {
            let peers = [signer, peer].into_iter().chain(connected.iter().copied());
            if let Some(first) = s.fetches.start(d, peers, me) {
                asks.push((first, d));
            }
        }
        for (to, d) in asks {
            self.request(to, Req::Delta(d));
        }
    }

    pub(super) fn sync_fetched(&mut self, hash: DeltaHash, meta: Option<DeltaMeta>) {
        let (consortium, now) = (self.cfg.consortium, self.now);
        let Some(s) = self.sync.as_mut() else { return };
        if !s.fetches.asking(&hash) {
            return;
        }
        let Some(sr) = s.waiting.as_ref() else { return };
        let named = sr
            .record
            .contributions
            .iter()
            .find(|c| c.delta == hash)
            .copied();
        match (meta, named) {
            (Some(m), Some(c))
                if m.signer == c.signer
                    && m.samples == c.sample_count
                    && m.round == sr.record.round
                    && m.base == sr.record.base
                    && m.consortium == consortium =>
            {
                s.fetches.done(&hash);
                s.known.insert(hash, m);
                s.moved = now;
                self.sync_fetch();
            }
            (Some(_), Some(_)) => {
                // A genuine signed delta that is not what the record says: the record
                // lies about it.
                let round = sr.record.round;
                self.end_sync(Some(Refusal::Chain(ChainError::Rule {
                    round,
                    rule: RuleError::Replayed(hash),
                })));
            }
            _ => match s.fetches.next(hash) {
                Next::Ask(p) => self.request(p, Req::Delta(hash)),
                Next::Failed => self.sync_fetch(),
                Next::Unknown => {}
            },
        }
    }

    /// A recomputation of a caught-up record ended.
    pub(super) fn sync_merged(&mut self, job: Job, outcome: Option<(ModelHash, [u8; 32])>) {
        let Some(s) = self.sync.as_mut() else { return };
        let Job::Sync { record, .. } = job else {
            return;
        };
        if !s.merging || s.waiting.as_ref().map(|w| w.hash) != Some(record) {
            return;
        }
        s.merging = false;
        let Some((model, state)) = outcome else {
            self.end_sync(None);
            return;
        };
        match s.check.confirm(model, state) {
            Ok(_) => {
                let sr = s.waiting.take();
                s.state = state;
                s.moved = self.now;
                if let Some(sr) = sr {
                    self.sync_confirmed(sr, true);
                }
                self.sync_step();
            }
            Err(e) => self.end_sync(Some(Refusal::Chain(e))),
        }
    }

    /// A record checked and recomputed (or certified): the one before it is committed,
    /// and it waits for its own successor or certificate.
    fn sync_confirmed(&mut self, sr: SignedRecord, recomputed: bool) {
        if let Some(s) = self.sync.as_mut()
            && let Some(gate) = s.gate
        {
            if sr.record.round <= gate {
                s.held.push(sr);
                return;
            }
            // Longer than our chain: what was held back is committed, in order.
            s.gate = None;
            let held = std::mem::take(&mut s.held);
            for h in held {
                self.sync_commit(h, true);
            }
        }
        let before = self
            .sync
            .as_mut()
            .and_then(|s| s.confirmed.replace(sr.clone()));
        if let Some(prev) = before {
            self.sync_commit(prev, true);
        }
        if !recomputed || self.certified(sr.record.round, sr.record.model, sr.record.state) {
            if let Some(s) = self.sync.as_mut() {
                s.confirmed = None;
            }
            self.sync_commit(sr, recomputed);
        }
    }

    /// Commits a caught-up record on our head (replacing our dead rounds the first time).
    fn sync_commit(&mut self, sr: SignedRecord, recomputed: bool) {
        let (current, head) = (self.current(), link(&self.head));
        let Some(s) = self.sync.as_mut() else { return };
        let replaces = (s.committed == 0 && s.rewind > 0).then_some(sr.record.round);
        let fits = if replaces.is_some() {
            true
        } else {
            sr.record.round == current && sr.record.prev == head
        };
        if !fits {
            // A round committed on the live path while we caught up: this chain was
            // checked from an older head; the next heartbeat starts another.
            self.sync = None;
            return;
        }
        s.committed += 1;
        s.rewind = 0;
        s.unmerged.clear();
        // A round we recomputed ourselves we vote for, unless we voted in it already.
        self.commit(sr, replaces, recomputed, recomputed);
    }

    /// The peer's chain ended: its newest record is committed only on a certificate
    /// (otherwise the live round decides it).
    fn sync_finish(&mut self, answered: bool) {
        let Some(last) = self.sync.as_ref().and_then(|s| s.confirmed.as_ref()) else {
            self.sync = None;
            return;
        };
        let (round, model, state) = (last.record.round, last.record.model, last.record.state);
        let certified = self.certified(round, model, state);
        let Some(s) = self.sync.as_mut() else { return };
        if certified || s.fork {
            let sr = s.confirmed.take();
            if let Some(sr) = sr {
                self.sync_commit(sr, true);
            }
            self.sync = None;
        } else if s.asked_atts != Some(round) {
            s.asked_atts = Some(round);
            let peer = s.peer;
            self.request(peer, Req::Attestations(round));
        } else if answered {
            let (peer, sr) = (s.peer, s.confirmed.take());
            self.sync = None;
            // No certificate: the record goes to the live round's rules, as if its
            // merger had announced it to us. A member that restarted after the merger's
            // announcement hears of the round's record only this way (and a liar's own
            // record, served to our requests, is all the live round would see).
            if let Some(sr) = sr.filter(|sr| {
                sr.record.round == self.current() && sr.record.prev == link(&self.head)
            }) {
                self.on_record(peer, sr);
            }
        }
    }

    /// New attestations: a record waiting on a certificate may go on.
    /// `answered`: a member answered our request for attestations (without it, a
    /// catch-up waiting on a certificate keeps waiting).
    pub(super) fn sync_retry(&mut self, answered: bool) {
        let Some(s) = self.sync.as_ref() else { return };
        if s.merging || s.asked.is_some() {
            return;
        }
        if let Some(w) = s.waiting.as_ref() {
            let all_failed = w
                .record
                .contributions
                .iter()
                .filter(|c| !s.known.contains_key(&c.delta))
                .all(|c| s.fetches.failed(&c.delta));
            if !all_failed {
                return;
            }
            if self.certified(w.record.round, w.record.model, w.record.state) {
                let (model, state) = (w.record.model, w.record.state);
                let Some(s) = self.sync.as_mut() else { return };
                if s.check.confirm(model, state).is_ok() {
                    let sr = s.waiting.take();
                    s.state = state;
                    if let Some(sr) = sr {
                        self.sync_confirmed(sr, false);
                    }
                    self.sync_step();
                }
            } else if answered && s.asked_atts == Some(w.record.round) {
                // Asked, and still no certificate: give up, and catch up from someone
                // else for a while (a chain nobody can recompute or vouch for is what a
                // forger serves; an honest peer whose contributors left is merely
                // useless to us).
                let peer = s.peer;
                self.end_sync(None);
                self.distrust.insert(peer, self.now);
            }
        } else if s.queue.is_empty() && !s.more && s.confirmed.is_some() {
            self.sync_finish(answered);
        }
    }
}
