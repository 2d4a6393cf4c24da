//! The round protocol as a deterministic state machine, in the style of quinn-proto and
//! str0m: the caller feeds it [`Input`]s with the time they happened, carries out the
//! [`Effect`]s it asks for, and wakes it at [`Machine::next_wake`]. It holds no clock,
//! no randomness, no sockets and no files; the same inputs always give the same effects,
//! which is what lets `tests/sim.rs` run thousands of consortia with liars, crashes and
//! partitions from one seed each.
//!
//! What the caller does: verify signatures and delta contents (an input names the member
//! who signed it, and a [`DeltaMeta`] is a delta whose envelope checked), run merges
//! ([`Effect::Merge`], answered by [`Input::Merged`]), make writes durable before it
//! acknowledges them ([`Effect::Commit`] / [`Input::Committed`], [`Effect::Persist`] /
//! [`Input::Persisted`]), and answer the peers' requests from its store
//! ([`Machine::serve`] answers what only the machine knows).
//!
//! Plain rounds only: secure aggregation stays in the node's engine for now.
//!
//! The machine's rules are the crate's: [`crate::rules`] for every record, live or
//! caught up, [`crate::chain`] for catch-up, [`crate::cert`] for certificates. What it
//! adds is when each rule runs, and finality (see [`final_threshold`]).

mod fetch;
mod finality;
mod fork;
mod live;
mod sync;
mod types;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use cellswarm_common::ids::{DeltaHash, ModelHash, RoundId, SignerKey};
use cellswarm_common::records::Head;
use cellswarm_common::wire::Contribution;

use crate::cert::Attestation;

pub use live::Live;
pub use sync::{MAX_SYNC_RECORDS, Sync};
pub use types::{
    Config, Counters, DeltaMeta, Durable, Effect, Input, Job, Kept, Msg, Refusal, Req, Resp,
    Restored, SignedRecord,
};

/// Time as the driver measures it: since a fixed moment of its own (monotonic).
pub type Time = Duration;

/// How many of the newest committed rounds a node keeps what it needs to replace them
/// (a head that turned out to be a dead branch).
pub const HISTORY: usize = 8;

/// Rounds whose own attestations a member repeats with every heartbeat.
pub const REPEAT: u64 = 3;

/// Records asked for in one catch-up batch.
pub const BATCH: u32 = 16;

/// Records of one round the machine keeps waiting for their deltas.
pub const PENDING: usize = 8;

/// Attestations needed for a round's outcome to be final: any two sets of this many
/// members share more than `byzantine` members, so two different outcomes of one round
/// can never both be final while at most `byzantine` members lie (honest members attest
/// one outcome per round). Needs `members ≥ 3 × byzantine + 1` to be reachable with the
/// liars silent.
#[must_use]
pub fn final_threshold(members: usize, byzantine: u32) -> usize {
    ((members + byzantine as usize) / 2 + 1).min(members.max(1))
}

/// One node's round protocol: see the module documentation.
#[derive(Debug)]
pub struct Machine {
    cfg: Config,
    now: Time,
    head: Head,
    kept: VecDeque<Kept>,
    merged: BTreeSet<DeltaHash>,
    connected: BTreeSet<SignerKey>,
    live: Option<Live>,
    /// The pool of the round we committed last, as (signer, delta): answered to members
    /// still collecting that round, so that the two halves of a partition that each pooled
    /// a part of it can still reach a quorum together.
    left_pool: Option<(RoundId, Vec<(SignerKey, DeltaHash)>)>,
    sync: Option<Sync>,
    /// Attestations by round and signer (first wins), for rounds near the head.
    atts: BTreeMap<RoundId, BTreeMap<SignerKey, Attestation>>,
    /// A second, different attestation of a round by one member: proof that it lied.
    two_faced: BTreeMap<RoundId, BTreeMap<SignerKey, Attestation>>,
    /// Outcomes members recomputed after voting for another one (`Msg::Checked`).
    checked: BTreeMap<RoundId, BTreeMap<SignerKey, Attestation>>,
    /// The newest round we attested (we attest each round once, never after a rewind).
    attested: RoundId,
    /// Messages held until what they announce is durable.
    held: Vec<Msg>,
    /// The newest commit not yet durable.
    unsynced: Option<RoundId>,
    last_heartbeat: Option<Time>,
    /// Our persisted delta of the round after the head.
    own: VecDeque<DeltaMeta>,
    /// When a peer was first seen ahead of us.
    ahead_since: Option<Time>,
    /// When we last asked a member for its record of our head's round (fork choice).
    fork_asked: Option<Time>,
    /// Members asked so far about our head (fork choice), and when.
    fork_tried: BTreeMap<SignerKey, Time>,
    /// Peers whose last catch-up chain broke a rule, and when.
    distrust: BTreeMap<SignerKey, Time>,
    /// The records we voted for, by round (the newest [`HISTORY`] rounds), kept when we
    /// leave them: an outcome can become final after every voter left it.
    voted: BTreeMap<RoundId, SignedRecord>,
    /// When we last asked a voter for a final outcome we do not hold.
    final_asked: Option<Time>,
    /// Voters asked for a final outcome's record, and when.
    final_tried: BTreeMap<SignerKey, Time>,
    out: VecDeque<Effect>,
    counters: Counters,
    /// Trainings asked for so far (the last one's ticket).
    trainings: u64,
}

impl Machine {
    /// A node starting from what its store held, at time `now`.
    #[must_use]
    pub fn new(cfg: Config, restored: Restored, now: Time) -> Self {
        let mut m = Self {
            attested: restored.head.round,
            head: restored.head,
            kept: restored.kept.into(),
            merged: restored.merged,
            connected: BTreeSet::new(),
            live: None,
            left_pool: None,
            sync: None,
            atts: BTreeMap::new(),
            two_faced: BTreeMap::new(),
            checked: BTreeMap::new(),
            held: Vec::new(),
            unsynced: None,
            last_heartbeat: None,
            own: restored.own.into(),
            ahead_since: None,
            fork_asked: None,
            fork_tried: BTreeMap::new(),
            distrust: BTreeMap::new(),
            voted: BTreeMap::new(),
            final_asked: None,
            final_tried: BTreeMap::new(),
            out: VecDeque::new(),
            counters: Counters::default(),
            trainings: 0,
            cfg,
            now,
        };
        let me = m.cfg.me;
        for a in restored.attestations {
            // We vote once per round, also across a restart after a rewind.
            if a.signer == me && a.round > m.attested {
                m.attested = a.round;
            }
            m.on_attestation(a);
        }
        for c in restored.checks {
            if c.signer == me {
                m.on_checked(c);
            }
        }
        // The records we voted for, on our chain or left.
        let low = m.head.round.0.saturating_sub(HISTORY as u64);
        for v in restored.voted {
            if v.record.round.0 > low {
                m.voted.insert(v.record.round, v);
            }
        }
        m.out.clear();
        m.start_round();
        m
    }

    /// The agreed parameters.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The head of our chain.
    #[must_use]
    pub fn head(&self) -> Head {
        self.head
    }

    /// The round being worked on.
    #[must_use]
    pub fn current(&self) -> RoundId {
        self.head.round.next()
    }

    /// Counters since start.
    #[must_use]
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Whether the configured number of rounds is done.
    #[must_use]
    pub fn done(&self) -> bool {
        self.cfg.max_rounds.is_some_and(|m| self.head.round.0 >= m)
    }

    /// The next effect to carry out, in order.
    pub fn poll(&mut self) -> Option<Effect> {
        self.out.pop_front()
    }

    /// Items the machine holds in memory (pool, known deltas, pending records,
    /// attestations, catch-up queue): bounded by the members and the constants above.
    #[must_use]
    pub fn footprint(&self) -> usize {
        self.live.as_ref().map_or(0, Live::footprint)
            + self.sync.as_ref().map_or(0, Sync::footprint)
            + self.atts.values().map(BTreeMap::len).sum::<usize>()
            + self.two_faced.values().map(BTreeMap::len).sum::<usize>()
            + self.checked.values().map(BTreeMap::len).sum::<usize>()
            + self.distrust.len()
            + self.voted.len()
            + self.final_tried.len()
            + self.held.len()
            + self.kept.len()
    }

    /// When to be woken with [`Input::Tick`] at the latest.
    #[must_use]
    pub fn next_wake(&self) -> Time {
        // A deadline already passed is not one to wake for again (a heartbeat held back
        // until a commit is durable waits for that input instead).
        let hb = self
            .last_heartbeat
            .map_or(self.now, |t| t + self.cfg.heartbeat);
        let live = self.live.as_ref().map(|l| l.next_wake(&self.cfg, self.now));
        [Some(hb), live]
            .into_iter()
            .flatten()
            .filter(|t| *t > self.now)
            .min()
            .unwrap_or(self.now + self.cfg.heartbeat)
    }

    /// Answers what only the machine knows: attestations, the current pool and the
    /// records we voted for.
    #[must_use]
    pub fn serve(&self, req: Req) -> Option<Resp> {
        match req {
            Req::Attestations(r) => Some(Resp::Attestations(
                self.atts
                    .get(&r)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .chain(self.two_faced.get(&r).into_iter().flat_map(|m| m.values()))
                    .copied()
                    .collect(),
            )),
            Req::Deltas(r) => Some(Resp::Deltas(match (&self.live, &self.left_pool) {
                (Some(l), _) if l.id == r => l.listed(),
                (_, Some((id, list))) if *id == r => list.clone(),
                _ => Vec::new(),
            })),
            Req::Voted(r) => Some(Resp::Record(self.voted.get(&r).cloned())),
            _ => None,
        }
    }

    /// Feeds one input that happened at `now`.
    pub fn handle(&mut self, now: Time, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::Tick => {}
            Input::Connected(p) => {
                if p != self.cfg.me && self.cfg.members.contains(&p) {
                    self.connected.insert(p);
                    let r = self.current();
                    self.request(p, Req::Deltas(r));
                }
            }
            Input::Disconnected(p) => {
                self.connected.remove(&p);
            }
            Input::Gossip { from, msg } => self.on_gossip(from, msg),
            Input::Response { from, req, resp } => self.on_response(from, req, resp),
            Input::Trained {
                ticket,
                round,
                base,
                delta,
            } => self.on_trained(ticket, round, base, delta),
            Input::Merged { job, outcome } => match job {
                Job::Sync { .. } => self.sync_merged(job, outcome),
                _ => self.live_merged(job, outcome),
            },
            Input::Persisted(d) => self.on_persisted(d),
            Input::Committed(r) => {
                if self.unsynced.is_some_and(|u| r >= u) {
                    self.unsynced = None;
                    for m in std::mem::take(&mut self.held) {
                        self.out.push_back(Effect::Broadcast(m));
                    }
                }
            }
        }
        self.on_time();
    }

    fn on_time(&mut self) {
        if self.unsynced.is_none()
            && self
                .last_heartbeat
                .is_none_or(|t| self.now >= t + self.cfg.heartbeat)
        {
            self.last_heartbeat = Some(self.now);
            self.out.push_back(Effect::Broadcast(Msg::Heartbeat {
                head: self.head.round,
                model: self.head.model,
            }));
            // Our attestations of the newest rounds again, for members that missed them
            // (finality and fork choice are only as good as what a member heard).
            let from = self.attested.0.saturating_sub(REPEAT - 1);
            let mine: Vec<Attestation> = (from..=self.attested.0)
                .filter_map(|r| self.atts.get(&RoundId(r))?.get(&self.cfg.me).copied())
                .collect();
            // And our votes for outcomes we left (the lock's rounds may be older).
            let ours: BTreeSet<(RoundId, ModelHash)> =
                self.outcomes().map(|h| (h.round, h.model)).collect();
            let left: Vec<Attestation> = self
                .voted
                .iter()
                .filter(|(r, v)| r.0 < from && !ours.contains(&(**r, v.record.model)))
                .filter_map(|(r, _)| self.atts.get(r)?.get(&self.cfg.me).copied())
                .collect();
            for a in mine.into_iter().chain(left) {
                self.out.push_back(Effect::Broadcast(Msg::Attest(a)));
            }
            let checks: Vec<Attestation> = self
                .checked
                .range(RoundId(from)..)
                .filter_map(|(_, m)| m.get(&self.cfg.me).copied())
                .collect();
            for a in checks {
                self.out.push_back(Effect::Broadcast(Msg::Checked(a)));
            }
            self.live_heartbeat();
            self.scan_final();
        }
        self.check_merge();
        self.sync_deadline();
        let horizon = self.cfg.heartbeat.saturating_mul(8);
        let now = self.now;
        self.distrust
            .retain(|_, t| now.saturating_sub(*t) < horizon);
    }

    fn request(&mut self, to: SignerKey, req: Req) {
        self.out.push_back(Effect::Request { to, req });
    }

    fn refuse(&mut self, from: SignerKey, why: Refusal) {
        self.counters.refused += 1;
        self.out.push_back(Effect::Refused { from, why });
    }

    /// Sends `msg` now, or once what it announces is durable.
    fn say(&mut self, msg: Msg) {
        if self.unsynced.is_some() {
            self.held.push(msg);
        } else {
            self.out.push_back(Effect::Broadcast(msg));
        }
    }

    fn on_gossip(&mut self, from: SignerKey, msg: Msg) {
        if !self.cfg.members.contains(&from) || from == self.cfg.me {
            return;
        }
        match msg {
            Msg::Delta { round, hash } => {
                if round == self.current() {
                    self.live_announced(from, hash);
                } else if round > self.current() {
                    self.peer_ahead(from, RoundId(round.0 - 1));
                }
            }
            Msg::MergeReady { round, .. } => {
                if round == self.current() {
                    self.ask_record(from);
                } else if round > self.current() {
                    self.peer_ahead(from, round);
                }
            }
            Msg::Heartbeat { head, model } => {
                if head >= self.current() {
                    self.peer_ahead(from, head);
                } else if head == self.head.round && model != self.head.model {
                    // Two heads for one round: fork choice (`fork`).
                    self.ask_fork(from, model);
                }
            }
            Msg::Checked(a) => {
                if a.signer == from {
                    self.on_checked(a);
                    self.live_retry();
                    self.sync_retry(false);
                }
            }
            Msg::Attest(a) => {
                if a.signer == from {
                    self.on_attestation(a);
                    self.check_final(a);
                    self.live_retry();
                    self.sync_retry(false);
                }
            }
        }
    }

    fn on_response(&mut self, from: SignerKey, req: Req, resp: Option<Resp>) {
        match (req, resp) {
            (Req::Delta(h), r) => {
                let meta = match r {
                    Some(Resp::Delta(Some(m))) if m.hash == h => Some(m),
                    Some(Resp::Delta(None)) | None => None,
                    Some(_) => {
                        self.refuse(from, Refusal::Answer(req));
                        None
                    }
                };
                self.on_fetched(from, h, meta);
            }
            (Req::Record(r), Some(Resp::Record(Some(sr)))) if sr.record.round == r => {
                if r == self.head.round {
                    self.consider_fork(from, sr);
                } else {
                    self.on_record(from, sr);
                }
            }
            (Req::Voted(r), resp) => self.on_voted(from, r, resp),
            (Req::Records { from: start, max }, resp) => {
                let list = match resp {
                    Some(Resp::Records(l)) => l,
                    _ => Vec::new(),
                };
                self.sync_records(from, start, max, list);
            }
            (Req::Attestations(_), Some(Resp::Attestations(list))) => {
                let cap = 2 * self.cfg.members.len();
                for a in list.into_iter().take(cap) {
                    self.on_attestation(a);
                    self.check_final(a);
                }
                self.live_retry();
                self.sync_retry(true);
            }
            (Req::Attestations(_), _) => {
                // No answer is an answer: a catch-up waiting on a certificate stops.
                self.sync_retry(true);
            }
            (Req::Deltas(r), Some(Resp::Deltas(list))) if r == self.current() => {
                let cap = self.cfg.members.len();
                for (signer, hash) in list.into_iter().take(cap) {
                    if self.cfg.members.contains(&signer) {
                        self.live_announced(signer, hash);
                    }
                }
            }
            _ => {}
        }
    }

    /// A member claims to have committed `round`.
    fn peer_ahead(&mut self, from: SignerKey, round: RoundId) {
        let current = self.current();
        if round == current {
            // Most likely it committed the round we are in: ask for that record, checked
            // like any live one; still behind two heartbeats later, catch up (our head
            // may be a dead branch).
            self.ask_record(from);
            let since = *self.ahead_since.get_or_insert(self.now);
            let verifying = self.live.as_ref().is_some_and(|l| l.verifying.is_some());
            if verifying || self.now.saturating_sub(since) < self.cfg.heartbeat * 2 {
                return;
            }
        } else if round < current {
            return;
        }
        self.begin_sync(from);
    }

    /// Commits `sr` on top of our head (after dropping our rounds from `replaces` on),
    /// attests it if we checked it ourselves, and starts the next round.
    fn commit(
        &mut self,
        sr: SignedRecord,
        replaces: Option<RoundId>,
        recomputed: bool,
        attest: bool,
    ) {
        if let Some(from) = replaces {
            while self.head.round >= from {
                let Some(k) = self.kept.pop_back() else { break };
                for d in &k.merged {
                    self.merged.remove(d);
                }
                self.head = k.before;
                self.counters.rewound += 1;
            }
        }
        let r = &sr.record;
        let deltas: Vec<DeltaHash> = r.contributions.iter().map(|c| c.delta).collect();
        self.merged.extend(deltas.iter().copied());
        self.kept.push_back(Kept {
            before: self.head,
            merged: deltas,
        });
        if self.kept.len() > HISTORY {
            self.kept.pop_front();
        }
        self.head = Head {
            round: r.round,
            record: Some(sr.hash),
            model: r.model,
            state: r.state,
        };
        self.counters.commits += 1;
        let low = self.head.round.0.saturating_sub(HISTORY as u64);
        self.atts.retain(|k, _| k.0 > low);
        self.two_faced.retain(|k, _| k.0 > low);
        self.checked.retain(|k, _| k.0 > low);
        self.voted.retain(|k, _| k.0 > low);
        self.unsynced = Some(r.round);
        let a = Attestation {
            signer: self.cfg.me,
            round: r.round,
            record: sr.hash,
            model: r.model,
            state: r.state,
        };
        if attest && r.round > self.attested && !self.locked() {
            self.attested = r.round;
            self.voted.insert(r.round, sr.clone());
            // Kept in the store too: we serve it after leaving it, also across a restart.
            self.out
                .push_back(Effect::Persist(Durable::Voted(sr.clone())));
            self.on_attestation(a);
            if sr.signer == self.cfg.me {
                self.held.push(Msg::MergeReady {
                    round: r.round,
                    record: sr.hash,
                });
            }
            self.held.push(Msg::Attest(a));
        } else if attest && recomputed {
            // We voted in this round already (for the outcome we left): what we
            // recomputed still helps a member that cannot recompute it.
            self.on_checked(a);
            self.out.push_back(Effect::Persist(Durable::Check(a)));
            self.held.push(Msg::Checked(a));
        }
        self.out.push_back(Effect::Commit {
            record: sr,
            replaces,
            recomputed,
        });
        self.ahead_since = None;
        self.fork_tried.clear();
        let oldest = self.head.round.0.saturating_sub(HISTORY as u64);
        self.own.retain(|o| o.round.0 > oldest);
        self.start_round();
    }
}

/// The merge a record names, as contributions sorted by signer.
fn contributions(pool: impl IntoIterator<Item = DeltaMeta>) -> Vec<Contribution> {
    let mut v: Vec<Contribution> = pool
        .into_iter()
        .map(|d| Contribution {
            signer: d.signer,
            delta: d.hash,
            sample_count: d.samples,
        })
        .collect();
    v.sort();
    v
}
