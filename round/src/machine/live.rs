//! The live round: training, pooling deltas, merger turns, and checking the records the
//! round's mergers publish.

use std::collections::{BTreeMap, BTreeSet};

use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};
use cellswarm_common::wire::{Contribution, MergeRecord};

use super::fetch::{Fetches, Next};
use super::{
    Config, DeltaMeta, Durable, Effect, Job, Machine, Msg, PENDING, Refusal, Req, SignedRecord,
    Time, contributions,
};
use crate::rules::{Pooled, Position, RuleError, Rules, check_live, link, omitted};
use crate::turns::merger_order;

/// Records of one round whose hashes are remembered (a replayed record is not checked
/// twice); beyond it the memory starts again.
const SEEN: usize = 64;

/// The state of the round being worked on.
#[derive(Debug)]
pub struct Live {
    pub(super) id: RoundId,
    started: Time,
    /// One delta per member: the first that checked.
    pool: BTreeMap<SignerKey, (DeltaMeta, Time)>,
    /// Every delta of this round that checked, equivocations included (a record may name
    /// either of a liar's two deltas): at most two per member.
    known: BTreeMap<DeltaHash, DeltaMeta>,
    /// Deltas being fetched, and those nobody we asked had (forgotten every heartbeat).
    fetches: Fetches,
    /// Deltas that did not check.
    bad: BTreeSet<DeltaHash>,
    ready_at: Option<Time>,
    /// Our own merge in flight: its attempt and contributions.
    merging: Option<(u32, Vec<Contribution>)>,
    /// Attempts whose merge failed here (not tried again).
    tried: BTreeSet<u32>,
    /// The record being recomputed, and whether we took it on a certificate over our
    /// own view of the round.
    pub(super) verifying: Option<(SignedRecord, bool)>,
    seen: BTreeSet<RecordHash>,
    /// Records that passed the rules and wait for deltas (or a certificate).
    pending: Vec<(SignerKey, SignedRecord, bool)>,
    asked_record: Option<Time>,
    asked_atts: bool,
    /// The ticket of our training in flight.
    training: Option<u64>,
    /// Deltas we announced for their signers since the last heartbeat because a record
    /// left them out (at most one per member).
    relayed: BTreeSet<DeltaHash>,
}

impl Live {
    fn new(id: RoundId, started: Time) -> Self {
        Self {
            id,
            started,
            pool: BTreeMap::new(),
            known: BTreeMap::new(),
            fetches: Fetches::default(),
            bad: BTreeSet::new(),
            ready_at: None,
            merging: None,
            tried: BTreeSet::new(),
            verifying: None,
            seen: BTreeSet::new(),
            pending: Vec::new(),
            asked_record: None,
            asked_atts: false,
            training: None,
            relayed: BTreeSet::new(),
        }
    }

    pub(super) fn footprint(&self) -> usize {
        self.pool.len()
            + self.known.len()
            + self.fetches.footprint()
            + self.bad.len()
            + self.relayed.len()
            + self.seen.len()
            + self.pending.len()
            + self.tried.len()
    }

    /// (signer, delta) of the pool, answered to a member that asks.
    pub(super) fn listed(&self) -> Vec<(SignerKey, DeltaHash)> {
        self.pool.iter().map(|(s, (d, _))| (*s, d.hash)).collect()
    }

    /// The next moment the round's state changes by time alone: the collection deadline
    /// or the next merger turn.
    pub(super) fn next_wake(&self, cfg: &Config, now: Time) -> Time {
        let t = &cfg.turns;
        match self.ready_at {
            None => self.started + t.collect,
            Some(ready) => {
                // The start of the turn after the one in progress.
                let next = t.attempt_at(now.saturating_sub(ready)).saturating_add(1);
                ready + t.merge_timeout.saturating_mul(next)
            }
        }
    }
}

impl Machine {
    /// Starts the round after the head: announces the delta we persisted for it before a
    /// restart, or trains.
    pub(super) fn start_round(&mut self) {
        if self.live.as_ref().is_some_and(|l| l.training.is_some()) {
            self.out.push_back(Effect::CancelTraining);
        }
        if let Some(left) = self.live.as_ref().filter(|l| l.id < self.current()) {
            self.left_pool = Some((left.id, left.listed()));
        }
        if self.done() {
            self.live = None;
            return;
        }
        let round = self.current();
        let mut live = Live::new(round, self.now);
        // (Only if it was trained from our head: a catch-up may have replaced the model.)
        let own = self
            .own
            .iter()
            .rev()
            .find(|o| o.round == round && o.base == self.head.model)
            .copied();
        match own {
            Some(own) => {
                live.pool.insert(own.signer, (own, self.now));
                live.known.insert(own.hash, own);
                self.live = Some(live);
                self.say(Msg::Delta {
                    round,
                    hash: own.hash,
                });
            }
            None => {
                self.trainings += 1;
                let ticket = self.trainings;
                live.training = Some(ticket);
                self.live = Some(live);
                self.out.push_back(Effect::Train {
                    round,
                    base: self.head.model,
                    ticket,
                });
            }
        }
        // Faster members may have pooled deltas of this round already.
        let peers: Vec<SignerKey> = self.connected.iter().copied().collect();
        for p in peers {
            self.request(p, Req::Deltas(round));
        }
    }

    pub(super) fn on_trained(
        &mut self,
        ticket: u64,
        round: RoundId,
        base: ModelHash,
        delta: Option<DeltaMeta>,
    ) {
        if base != self.head.model {
            return;
        }
        // Only the training in flight: a cancelled one of the same round and base (our
        // head left that model and came back to it) ends with nothing, and taking its
        // answer for this one's made us wait for a delta we then dropped.
        let Some(live) = self
            .live
            .as_mut()
            .filter(|l| l.id == round && l.training == Some(ticket))
        else {
            return;
        };
        live.training = None;
        if let Some(d) = delta.filter(|d| d.round == round && d.signer == self.cfg.me) {
            // Durable before anyone hears of it: after a crash we announce this delta
            // again instead of training a second one.
            self.out.push_back(Effect::Persist(Durable::OwnDelta(d)));
        }
    }

    pub(super) fn on_persisted(&mut self, d: Durable) {
        let Durable::OwnDelta(own) = d else {
            return;
        };
        if self.own.len() > super::HISTORY + 2 {
            self.own.pop_front();
        }
        self.own.push_back(own);
        // Trained from a head a catch-up has since replaced: kept (a round we may have
        // to recompute names it), never pooled.
        if own.round != self.current() || own.base != self.head.model {
            return;
        }
        if let Some(live) = self.live.as_mut() {
            live.pool.insert(own.signer, (own, self.now));
            live.known.insert(own.hash, own);
        }
        self.say(Msg::Delta {
            round: own.round,
            hash: own.hash,
        });
    }

    /// A member announced (or listed) a delta of the current round.
    pub(super) fn live_announced(&mut self, from: SignerKey, hash: DeltaHash) {
        let others: Vec<SignerKey> = self.connected.iter().copied().collect();
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if live.known.contains_key(&hash)
            || live.bad.contains(&hash)
            || live.fetches.len() >= 2 * self.cfg.members.len()
        {
            return;
        }
        let peers = std::iter::once(from).chain(others);
        if let Some(first) = live.fetches.start(hash, peers, self.cfg.me) {
            self.request(first, Req::Delta(hash));
        }
    }

    /// A delta fetch ended (from either path).
    pub(super) fn on_fetched(&mut self, from: SignerKey, hash: DeltaHash, meta: Option<DeltaMeta>) {
        if self.sync_wants(&hash) {
            self.sync_fetched(hash, meta);
            return;
        }
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if !live.fetches.asking(&hash) {
            return;
        }
        if let Some(m) = meta {
            live.fetches.done(&hash);
            self.accept_delta(from, m);
            return;
        }
        match live.fetches.next(hash) {
            Next::Ask(p) => self.request(p, Req::Delta(hash)),
            Next::Failed => self.live_retry(),
            Next::Unknown => {}
        }
    }

    fn accept_delta(&mut self, from: SignerKey, m: DeltaMeta) {
        let why = if !self.cfg.members.contains(&m.signer) {
            Some("not signed by a member")
        } else if m.consortium != self.cfg.consortium {
            Some("of another consortium")
        } else if m.round != self.current() {
            Some("of another round")
        } else if m.base != self.head.model {
            Some("trained from another model than ours")
        } else if self.merged.contains(&m.hash) {
            Some("merged in an earlier round")
        } else {
            None
        };
        let now = self.now;
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if let Some(why) = why {
            live.bad.insert(m.hash);
            self.refuse(from, Refusal::Delta { delta: m.hash, why });
            return;
        }
        let of_signer = live.known.values().filter(|k| k.signer == m.signer).count();
        if of_signer >= 2 {
            return;
        }
        live.known.insert(m.hash, m);
        match live.pool.get(&m.signer) {
            Some((held, _)) if held.hash != m.hash => {
                self.refuse(
                    m.signer,
                    Refusal::Equivocation {
                        signer: m.signer,
                        delta: m.hash,
                    },
                );
            }
            Some(_) => {}
            None => {
                live.pool.insert(m.signer, (m, now));
            }
        }
        self.live_retry();
    }

    /// Asks `from` for the current round's record (at most once per quarter heartbeat).
    pub(super) fn ask_record(&mut self, from: SignerKey) {
        let (now, gap) = (self.now, self.cfg.heartbeat / 4);
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if live.verifying.is_some() || live.asked_record.is_some_and(|t| now < t + gap) {
            return;
        }
        live.asked_record = Some(now);
        let round = live.id;
        self.request(from, Req::Record(round));
    }

    /// Every heartbeat: forget failed fetches and ask again for what we miss.
    pub(super) fn live_heartbeat(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        live.fetches.forget_failures();
        live.asked_atts = false;
        // A relay may have been lost, or reached a merger whose own fetch had just
        // failed (and that ignores the delta until this heartbeat): again if needed.
        live.relayed.clear();
        let round = live.id;
        let lacking: Vec<SignerKey> = self
            .connected
            .iter()
            .filter(|p| !live.pool.contains_key(p))
            .copied()
            .collect();
        for p in lacking {
            self.request(p, Req::Deltas(round));
        }
        self.live_retry();
    }

    /// Whether the collection is complete and it is our turn to merge; if so, merges.
    pub(super) fn check_merge(&mut self) {
        let (now, me, quorum) = (self.now, self.cfg.me, self.cfg.quorum.max(1));
        let turns = self.cfg.turns;
        let connected = &self.connected;
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if live.merging.is_some() || live.verifying.is_some() {
            return;
        }
        if live.ready_at.is_none() && live.pool.len() >= quorum {
            let everyone =
                live.pool.contains_key(&me) && connected.iter().all(|s| live.pool.contains_key(s));
            if everyone || now.saturating_sub(live.started) >= turns.collect {
                live.ready_at = Some(now);
            }
        }
        let Some(ready) = live.ready_at else { return };
        let order = merger_order(live.id, live.pool.keys().copied());
        let attempt = turns.attempt_at(now.saturating_sub(ready));
        let Some(position) = order.iter().position(|s| *s == me) else {
            return;
        };
        // After every candidate had its turn, the turns start again (never stall).
        if position != attempt as usize % order.len() || live.tried.contains(&attempt) {
            return;
        }
        live.tried.insert(attempt);
        let c = contributions(live.pool.values().map(|(d, _)| *d));
        live.merging = Some((attempt, c.clone()));
        let round = live.id;
        self.out.push_back(Effect::Merge {
            job: Job::Own { round, attempt },
            base: self.head.model,
            state: self.head.state,
            contributions: c,
        });
    }

    /// A record of the current round, signed by its merger, reached us from `from`.
    pub(super) fn on_record(&mut self, from: SignerKey, sr: SignedRecord) {
        if sr.record.round > self.current() {
            self.begin_sync(from);
            return;
        }
        if sr.record.round != self.current() {
            return;
        }
        let verdict = self.live_rules(&sr);
        let certified = self.certified(sr.record.round, sr.record.model, sr.record.state);
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if live.seen.contains(&sr.hash) {
            return;
        }
        if live.verifying.is_some() {
            if live.pending.len() < PENDING && !live.pending.iter().any(|p| p.1.hash == sr.hash) {
                live.pending.push((from, sr, false));
            }
            return;
        }
        if live.seen.len() >= SEEN {
            live.seen.clear();
        }
        live.seen.insert(sr.hash);
        let on_certificate = match verdict {
            Ok(()) => false,
            // What only our view of the round says against it is overruled by a commit
            // certificate: enough members checked it and committed it.
            Err(RuleError::TooEarly { .. } | RuleError::Omitted { .. }) if certified => true,
            Err(rule) => {
                if matches!(rule, RuleError::TooEarly { .. } | RuleError::Omitted { .. }) {
                    // Looked at again if it comes again (its turn came, or it got
                    // certified).
                    live.seen.remove(&sr.hash);
                }
                let omitted = matches!(rule, RuleError::Omitted { .. });
                let record = sr.hash;
                self.refuse(sr.signer, Refusal::Rule { record, rule });
                if omitted {
                    self.relay_omitted(&sr.record);
                }
                return;
            }
        };
        self.try_verify(from, sr, on_certificate);
    }

    fn live_rules(&self, sr: &SignedRecord) -> Result<(), RuleError> {
        let Some(live) = self.live.as_ref() else {
            return Err(RuleError::WrongRound {
                expected: self.current(),
                got: sr.record.round,
            });
        };
        let rules = Rules {
            consortium: self.cfg.consortium,
            strategy: &self.cfg.strategy,
            quorum: self.cfg.quorum,
            members: &self.cfg.members,
        };
        let at = Position::after(&self.head);
        let held = self.held(live);
        check_live(
            &rules,
            &at,
            &sr.record,
            sr.signer,
            |d| self.merged.contains(d),
            &self.cfg.turns,
            self.now.saturating_sub(live.started),
            &held,
        )
    }

    /// Our pool as the inclusion rule sees it.
    fn held(&self, live: &Live) -> Vec<Pooled> {
        live.pool
            .iter()
            .map(|(s, (d, at))| Pooled {
                signer: *s,
                delta: d.hash,
                age: self.now.saturating_sub(*at),
                at: at.saturating_sub(live.started),
                // Our own delta binds no merger (we may have pooled it before anyone
                // could fetch it, after a restart).
                connected: *s != self.cfg.me && self.connected.contains(s),
            })
            .collect()
    }

    /// Announces, for their signers, the deltas we hold that `record` left out and that
    /// bind its merger, each at most once a heartbeat: the merger lacked them (their
    /// signer may have announced them to some members only, or its fetch failed), and
    /// the candidates after it fetch them from the signer, us or anyone once they know.
    fn relay_omitted(&mut self, record: &MergeRecord) {
        let Some(live) = self.live.as_ref() else {
            return;
        };
        let held = self.held(live);
        let mut left_out: Vec<DeltaHash> = omitted(record, &held, &self.cfg.turns)
            .map(|p| p.delta)
            .collect();
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let round = live.id;
        left_out.retain(|d| live.relayed.insert(*d));
        for hash in left_out {
            self.say(Msg::Delta { round, hash });
        }
    }

    /// Recomputes `sr` once we hold every delta it names; fetches what is missing; adopts
    /// it on a certificate when nobody has the deltas any more.
    fn try_verify(&mut self, from: SignerKey, sr: SignedRecord, on_certificate: bool) {
        let connected: Vec<SignerKey> = self.connected.iter().copied().collect();
        let certified = self.certified(sr.record.round, sr.record.model, sr.record.state);
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let mut missing = Vec::new();
        let mut asks_atts = None;
        for c in &sr.record.contributions {
            match live.known.get(&c.delta) {
                Some(k) if k.signer == c.signer && k.samples == c.sample_count => {}
                Some(_) => {
                    let delta = c.delta;
                    self.refuse(
                        sr.signer,
                        Refusal::Delta {
                            delta,
                            why: "the record names it with another signer or sample count",
                        },
                    );
                    return;
                }
                None => missing.push(*c),
            }
        }
        if missing.is_empty() {
            live.verifying = Some((sr.clone(), on_certificate));
            let record = sr.hash;
            self.out.push_back(Effect::Merge {
                job: Job::Verify {
                    round: sr.record.round,
                    record,
                },
                base: self.head.model,
                state: self.head.state,
                contributions: sr.record.contributions,
            });
            return;
        }
        if missing.iter().all(|c| live.fetches.failed(&c.delta)) {
            if certified {
                // Nobody we can reach holds its deltas, and enough members vouch for it.
                self.commit(sr, None, false, false);
                return;
            }
            if !live.asked_atts {
                live.asked_atts = true;
                asks_atts = Some(live.id);
            }
        }
        let mut asks = Vec::new();
        for c in &missing {
            let peers = [c.signer, from]
                .into_iter()
                .chain(connected.iter().copied());
            if let Some(first) = live.fetches.start(c.delta, peers, self.cfg.me) {
                asks.push((first, c.delta));
            }
        }
        if live.pending.len() < PENDING && !live.pending.iter().any(|p| p.1.hash == sr.hash) {
            live.pending.push((from, sr, on_certificate));
        }
        for (to, h) in asks {
            self.request(to, Req::Delta(h));
        }
        if let Some(round) = asks_atts {
            self.request(from, Req::Attestations(round));
        }
    }

    /// Looks again at the records waiting for deltas or a certificate.
    pub(super) fn live_retry(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if live.verifying.is_some() || live.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut live.pending);
        for (from, sr, cert) in pending {
            if self.live.as_ref().is_none_or(|l| l.id != sr.record.round) {
                return;
            }
            if self.live.as_ref().is_some_and(|l| l.verifying.is_some()) {
                if let Some(l) = self.live.as_mut()
                    && l.pending.len() < PENDING
                {
                    l.pending.push((from, sr, cert));
                }
                continue;
            }
            self.try_verify(from, sr, cert);
        }
    }

    /// Our merge or a recomputation of a live record ended.
    pub(super) fn live_merged(&mut self, job: Job, outcome: Option<(ModelHash, [u8; 32])>) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        match job {
            Job::Own { round, attempt } => {
                if live.id != round || live.merging.as_ref().map(|m| m.0) != Some(attempt) {
                    return;
                }
                let Some((_, contributions)) = live.merging.take() else {
                    return;
                };
                let Some((model, state)) = outcome else {
                    return;
                };
                let record = MergeRecord {
                    consortium: self.cfg.consortium,
                    round,
                    base: self.head.model,
                    prev: link(&self.head),
                    strategy: self.cfg.strategy.clone(),
                    contributions,
                    model,
                    state,
                    attempt,
                };
                let sr = SignedRecord::own(record, self.cfg.me);
                self.commit(sr, None, true, true);
            }
            Job::Verify { round, record } => {
                if live.id != round || live.verifying.as_ref().map(|v| v.0.hash) != Some(record) {
                    return;
                }
                let Some((sr, on_certificate)) = live.verifying.take() else {
                    return;
                };
                match outcome {
                    Some((model, state))
                        if model == sr.record.model && state == sr.record.state =>
                    {
                        // If we were about to merge, stand down: the round is decided.
                        live.merging = None;
                        self.commit(sr, None, true, !on_certificate);
                    }
                    Some((model, _)) => {
                        let claimed = sr.record.model;
                        self.refuse(
                            sr.signer,
                            Refusal::Mismatch {
                                record,
                                claimed,
                                recomputed: model,
                            },
                        );
                        self.live_retry();
                    }
                    None => self.live_retry(),
                }
            }
            Job::Sync { .. } => {}
        }
    }
}
