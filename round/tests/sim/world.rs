//! The simulated world: nodes (each a `Machine` with a store that has a live and a
//! durable image), a network on a virtual clock, and the faults one seed chooses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cellswarm_common::ids::{DeltaHash, ModelHash, RoundId, SignerKey};
use cellswarm_common::records::Head;
use cellswarm_common::wire::Contribution;
use cellswarm_round::machine::{
    Config, DeltaMeta, Durable, Effect, HISTORY, Input, Job, Machine, Msg, Req, Resp, Restored,
    SignedRecord, Time,
};

use crate::lies::Liar;
use crate::oracle::Oracle;

/// The consortium digest every honest member agreed on.
pub(crate) const CONSORTIUM: [u8; 32] = [7; 32];
/// The sample count a merge weighs any one delta by at most (`aggregation.max_samples`).
pub(crate) const MAX_SAMPLES: u64 = 1000;
/// How long a request waits for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(400);
/// Longest one-way network delay.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(30);

/// A small, fast, seedable generator (splitmix64): every choice of a run comes from it.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed ^ 0x5EED_CE11_5A4A_0001)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    pub(crate) fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    pub(crate) fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

/// The member key of node `i`.
pub(crate) fn key(i: usize) -> SignerKey {
    let mut k = [0u8; 32];
    k[0] = 0xA0;
    k[1] = i as u8;
    SignerKey(ModelHash::of(&k).0)
}

/// The model and state every node starts from.
pub(crate) fn genesis() -> (ModelHash, [u8; 32]) {
    (ModelHash::of(b"genesis model"), [0; 32])
}

/// The merge every node computes: a hash of the base, the state and the capped weights.
pub(crate) fn merge(base: ModelHash, state: [u8; 32], c: &[Contribution]) -> (ModelHash, [u8; 32]) {
    let mut b = Vec::with_capacity(64 + c.len() * 40);
    b.extend_from_slice(&base.0);
    b.extend_from_slice(&state);
    for x in c {
        b.extend_from_slice(&x.delta.0);
        b.extend_from_slice(&x.sample_count.min(MAX_SAMPLES).to_le_bytes());
    }
    let model = ModelHash::of(&b);
    let mut s = state.to_vec();
    s.extend_from_slice(&model.0);
    (model, ModelHash::of(&s).0)
}

/// The head a committed record makes.
pub(crate) fn head_of(s: &SignedRecord) -> Head {
    Head {
        round: s.record.round,
        record: Some(s.hash),
        model: s.record.model,
        state: s.record.state,
    }
}

/// A store image: what a node's disk holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Image {
    pub(crate) chain: Vec<SignedRecord>,
    pub(crate) own: Vec<DeltaMeta>,
    pub(crate) blobs: BTreeSet<DeltaHash>,
    pub(crate) attestations: Vec<cellswarm_round::cert::Attestation>,
    pub(crate) voted: Vec<SignedRecord>,
    pub(crate) checks: Vec<cellswarm_round::cert::Attestation>,
}

/// One member.
pub(crate) struct Node {
    pub(crate) key: SignerKey,
    pub(crate) liar: Option<Liar>,
    pub(crate) machine: Option<Machine>,
    /// Incarnation: events of an earlier one are dropped.
    pub(crate) life: u64,
    pub(crate) up: bool,
    pub(crate) joined: bool,
    pub(crate) live: Image,
    pub(crate) durable: Image,
    pub(crate) acks: Vec<Input>,
    pub(crate) flush_pending: bool,
    pub(crate) training: Option<u64>,
    pub(crate) wake_at: Option<Time>,
    pub(crate) sees: BTreeSet<usize>,
}

#[derive(Debug, Clone)]
pub(crate) enum Event {
    Gossip {
        to: usize,
        from: usize,
        msg: Msg,
    },
    Request {
        to: usize,
        from: usize,
        life: u64,
        req: Req,
    },
    Response {
        to: usize,
        from: usize,
        life: u64,
        req: Req,
        resp: Option<Resp>,
    },
    Wake {
        node: usize,
        life: u64,
    },
    Trained {
        node: usize,
        life: u64,
        id: u64,
        ticket: u64,
        round: RoundId,
        base: ModelHash,
        delta: Option<DeltaMeta>,
    },
    Merged {
        node: usize,
        life: u64,
        job: Job,
        outcome: Option<(ModelHash, [u8; 32])>,
    },
    Flush {
        node: usize,
        life: u64,
    },
    Crash(usize),
    Restart(usize),
    Join(usize),
    Split(Vec<u8>),
    Heal,
    LiarTick(usize),
}

/// Totals of one run (or of many, added).
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    pub(crate) rounds: u64,
    pub(crate) byzantine: u64,
    pub(crate) crashes: u64,
    pub(crate) partitions: u64,
    pub(crate) violations: u64,
    pub(crate) first_violation: Option<String>,
    /// Runs whose honest members had not agreed on one chain when the time to settle
    /// ran out (a known open defect: see docs/security.md).
    pub(crate) stalls: u64,
    pub(crate) first_stall: Option<String>,
}

impl Outcome {
    pub(crate) fn add(&mut self, o: &Outcome) {
        self.rounds += o.rounds;
        self.byzantine += o.byzantine;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.violations += o.violations;
        self.stalls += o.stalls;
    }
}

pub(crate) struct World {
    pub(crate) rng: Rng,
    pub(crate) now: Time,
    pub(crate) seq: u64,
    pub(crate) queue: BTreeMap<(Time, u64), Event>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) cfg: Config,
    pub(crate) group: Vec<u8>,
    pub(crate) loss: u64,
    pub(crate) dup: u64,
    pub(crate) train_ids: u64,
    pub(crate) oracle: Oracle,
    pub(crate) trace: bool,
    pub(crate) outcome: Outcome,
    /// No training completes any more: the last rounds settle before the end.
    pub(crate) frozen: bool,
    /// Honest members keep the deltas they fetch and serve them, for the rounds they
    /// keep (as the node's store does); `false` (`CELLSWARM_SIM_KEEP_FETCHED=0`) serves
    /// only a member's own deltas, as the node did before.
    pub(crate) keep_fetched: bool,
}

impl World {
    pub(crate) fn schedule(&mut self, after: Duration, ev: Event) {
        self.seq += 1;
        self.queue.insert((self.now + after, self.seq), ev);
    }

    pub(crate) fn honest(&self, i: usize) -> bool {
        self.nodes[i].liar.is_none()
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        a != b
            && self.nodes[a].up
            && self.nodes[b].up
            && self.nodes[a].joined
            && self.nodes[b].joined
            && self.group[a] == self.group[b]
    }

    fn index(&self, k: SignerKey) -> Option<usize> {
        self.nodes.iter().position(|n| n.key == k)
    }

    /// Tells every machine who it can reach now.
    fn reconnect(&mut self) {
        for a in 0..self.nodes.len() {
            if self.nodes[a].machine.is_none() {
                continue;
            }
            let now_sees: BTreeSet<usize> = (0..self.nodes.len())
                .filter(|&b| self.reachable(a, b))
                .collect();
            let before = std::mem::take(&mut self.nodes[a].sees);
            for &b in now_sees.difference(&before) {
                let k = self.nodes[b].key;
                self.input(a, Input::Connected(k));
            }
            for &b in before.difference(&now_sees) {
                let k = self.nodes[b].key;
                self.input(a, Input::Disconnected(k));
            }
            self.nodes[a].sees = now_sees;
        }
    }

    /// Sends `msg` from `a` to `b` through the network (maybe lost or duplicated).
    pub(crate) fn send_gossip(&mut self, from: usize, to: usize, msg: Msg) {
        if !self.reachable(from, to) || self.rng.chance(self.loss) {
            return;
        }
        let d = self.rng.ms(1, MAX_DELAY.as_millis() as u64);
        self.schedule(d, Event::Gossip { to, from, msg });
        if self.rng.chance(self.dup) {
            let d = self.rng.ms(1, MAX_DELAY.as_millis() as u64 * 3);
            self.schedule(d, Event::Gossip { to, from, msg });
        }
    }

    pub(crate) fn broadcast(&mut self, from: usize, msg: Msg) {
        if let Msg::Attest(a) = msg {
            let v = self.oracle.attested(&a, self.now);
            self.violation(v);
        }
        if let Msg::Delta { hash, .. } = msg
            && self
                .oracle
                .deltas
                .get(&hash)
                .is_some_and(|d| d.signer == self.nodes[from].key)
        {
            self.oracle.offered(hash, self.now);
        }
        for to in 0..self.nodes.len() {
            if to != from {
                self.send_gossip(from, to, msg);
            }
        }
    }

    fn request(&mut self, from: usize, to: SignerKey, req: Req) {
        let life = self.nodes[from].life;
        match self.index(to) {
            Some(to) if self.reachable(from, to) && !self.rng.chance(self.loss) => {
                let d = self.rng.ms(1, MAX_DELAY.as_millis() as u64);
                self.schedule(
                    d,
                    Event::Request {
                        to,
                        from,
                        life,
                        req,
                    },
                );
            }
            _ => {
                let to = self.index(to).unwrap_or(from);
                self.schedule(
                    REQUEST_TIMEOUT,
                    Event::Response {
                        to: from,
                        from: to,
                        life,
                        req,
                        resp: None,
                    },
                );
            }
        }
    }

    /// What node `i` answers to `req` (honest: from its durable store and machine).
    fn serve(&mut self, i: usize, req: Req) -> Option<Resp> {
        if let Some(r) = crate::lies::serve(self, i, req) {
            return r;
        }
        let n = &self.nodes[i];
        match req {
            Req::Delta(h) => Some(Resp::Delta(
                n.live
                    .blobs
                    .contains(&h)
                    .then(|| self.oracle.deltas.get(&h).copied())
                    .flatten(),
            )),
            Req::Record(r) => Some(Resp::Record(
                n.durable.chain.get((r.0 as usize).wrapping_sub(1)).cloned(),
            )),
            Req::Records { from, max } => Some(Resp::Records(
                n.durable
                    .chain
                    .iter()
                    .skip((from.0 as usize).saturating_sub(1))
                    .take(max as usize)
                    .cloned()
                    .collect(),
            )),
            Req::Attestations(_) | Req::Deltas(_) | Req::Voted(_) => {
                n.machine.as_ref().and_then(|m| m.serve(req))
            }
        }
    }

    pub(crate) fn violation(&mut self, v: Option<String>) {
        if let Some(v) = v {
            self.outcome.violations += 1;
            if self.outcome.first_violation.is_none() {
                self.outcome.first_violation = Some(format!("t={:?}: {v}", self.now));
            }
        }
    }

    /// Feeds `input` to node `i`'s machine and carries out what it asks.
    pub(crate) fn input(&mut self, i: usize, input: Input) {
        let now = self.now;
        let Some(m) = self.nodes[i].machine.as_mut() else {
            return;
        };
        if self.trace {
            println!("{now:?} n{i} <- {input:?}");
        }
        m.handle(now, input);
        let mut effects = Vec::new();
        while let Some(e) = m.poll() {
            effects.push(e);
        }
        let footprint = m.footprint();
        let wake = m.next_wake();
        let bound = 400 + 40 * self.nodes.len();
        if footprint > bound {
            self.violation(Some(format!("n{i} holds {footprint} items, over {bound}")));
        }
        for e in effects {
            if self.trace {
                println!("{now:?} n{i} -> {e:?}");
            }
            self.effect(i, e);
        }
        if self.nodes[i].wake_at != Some(wake) {
            self.nodes[i].wake_at = Some(wake);
            let life = self.nodes[i].life;
            self.schedule(wake.saturating_sub(self.now), Event::Wake { node: i, life });
        }
    }

    fn flush_soon(&mut self, i: usize) {
        if !self.nodes[i].flush_pending {
            self.nodes[i].flush_pending = true;
            let life = self.nodes[i].life;
            let d = self.rng.ms(1, 15);
            self.schedule(d, Event::Flush { node: i, life });
        }
    }

    fn effect(&mut self, i: usize, e: Effect) {
        let life = self.nodes[i].life;
        match e {
            Effect::Train {
                round,
                base,
                ticket,
            } => {
                self.train_ids += 1;
                let id = self.train_ids;
                self.nodes[i].training = Some(id);
                let honest = 50 + self.rng.below(200);
                let samples = crate::lies::samples(self, i, honest);
                let mut h = self.nodes[i].key.0.to_vec();
                h.extend_from_slice(&id.to_le_bytes());
                let delta = DeltaMeta {
                    hash: DeltaHash(ModelHash::of(&h).0),
                    signer: self.nodes[i].key,
                    consortium: CONSORTIUM,
                    round,
                    base,
                    samples,
                };
                let d = self.rng.ms(100, 600);
                self.schedule(
                    d,
                    Event::Trained {
                        node: i,
                        life,
                        id,
                        ticket,
                        round,
                        base,
                        delta: Some(delta),
                    },
                );
            }
            Effect::CancelTraining => self.nodes[i].training = None,
            Effect::Broadcast(msg) => self.broadcast(i, msg),
            Effect::Request { to, req } => self.request(i, to, req),
            Effect::Merge {
                job,
                base,
                state,
                contributions,
            } => {
                let round = match job {
                    Job::Own { round, .. }
                    | Job::Verify { round, .. }
                    | Job::Sync { round, .. } => round,
                };
                // The driver merges only deltas whose envelopes it checked: each named
                // delta must be a real one, of that round and base, as declared.
                let real = contributions.iter().all(|c| {
                    self.oracle.deltas.get(&c.delta).is_some_and(|d| {
                        d.signer == c.signer
                            && d.round == round
                            && d.base == base
                            && d.samples == c.sample_count
                            && d.consortium == CONSORTIUM
                    })
                });
                if !real && self.honest(i) {
                    self.violation(Some(format!(
                        "n{i} asked to merge deltas it never checked: {job:?}"
                    )));
                }
                let outcome = real.then(|| merge(base, state, &contributions));
                let d = self.rng.ms(5, 60);
                self.schedule(
                    d,
                    Event::Merged {
                        node: i,
                        life,
                        job,
                        outcome,
                    },
                );
            }
            Effect::Persist(Durable::Attestation(a)) => {
                let kept = &mut self.nodes[i].live.attestations;
                kept.push(a);
                let newest = kept.iter().map(|a| a.round).max().unwrap_or_default();
                kept.retain(|x| x.round.0 + 16 > newest.0);
                self.flush_soon(i);
            }
            Effect::Persist(Durable::Check(a)) => {
                let kept = &mut self.nodes[i].live.checks;
                kept.retain(|x| x.round != a.round);
                kept.push(a);
                let newest = kept.iter().map(|x| x.round).max().unwrap_or_default();
                kept.retain(|x| x.round.0 + 16 > newest.0);
                self.flush_soon(i);
            }
            Effect::Persist(Durable::Voted(v)) => {
                let kept = &mut self.nodes[i].live.voted;
                kept.retain(|x| x.record.round != v.record.round);
                kept.push(v);
                let newest = kept
                    .iter()
                    .map(|x| x.record.round)
                    .max()
                    .unwrap_or_default();
                kept.retain(|x| x.record.round.0 + 8 > newest.0);
                self.flush_soon(i);
            }
            Effect::Persist(Durable::OwnDelta(d)) => {
                let own = &mut self.nodes[i].live.own;
                own.push(d);
                if own.len() > 12 {
                    own.remove(0);
                }
                self.nodes[i].live.blobs.insert(d.hash);
                self.nodes[i]
                    .acks
                    .push(Input::Persisted(Durable::OwnDelta(d)));
                self.oracle.own_delta(d, self.now);
                self.flush_soon(i);
            }
            Effect::Commit {
                record, replaces, ..
            } => {
                let chain = &mut self.nodes[i].live.chain;
                if let Some(r) = replaces {
                    chain.truncate((r.0 as usize).saturating_sub(1));
                }
                if record.record.round.0 as usize != chain.len() + 1 {
                    let v = format!(
                        "n{i} commits round {} on a chain of {}",
                        record.record.round,
                        chain.len()
                    );
                    self.violation(Some(v));
                    return;
                }
                chain.push(record.clone());
                let round = record.record.round;
                // Others' deltas of rounds the node no longer keeps are deleted; its own
                // stay.
                let me = self.nodes[i].key;
                let deltas = &self.oracle.deltas;
                self.nodes[i].live.blobs.retain(|h| {
                    deltas
                        .get(h)
                        .is_none_or(|m| m.signer == me || m.round.0 + HISTORY as u64 > round.0)
                });
                if self.honest(i) {
                    let chain = self.nodes[i].live.chain.clone();
                    let v = self.oracle.committed(i, &chain, self.now);
                    self.violation(v);
                }
                self.nodes[i].acks.push(Input::Committed(round));
                self.flush_soon(i);
            }
            Effect::Refused { .. } => {}
        }
    }

    pub(crate) fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Gossip { to, from, msg } => {
                if self.reachable(from, to) {
                    let k = self.nodes[from].key;
                    self.input(to, Input::Gossip { from: k, msg });
                }
            }
            Event::Request {
                to,
                from,
                life,
                req,
            } => {
                let resp = if self.reachable(from, to) {
                    self.serve(to, req)
                } else {
                    None
                };
                if resp.is_some() && self.reachable(from, to) && !self.rng.chance(self.loss) {
                    let d = self.rng.ms(1, MAX_DELAY.as_millis() as u64);
                    self.schedule(
                        d,
                        Event::Response {
                            to: from,
                            from: to,
                            life,
                            req,
                            resp,
                        },
                    );
                } else {
                    let d = REQUEST_TIMEOUT.saturating_sub(MAX_DELAY);
                    self.schedule(
                        d,
                        Event::Response {
                            to: from,
                            from: to,
                            life,
                            req,
                            resp: None,
                        },
                    );
                }
            }
            Event::Response {
                to,
                from,
                life,
                req,
                resp,
            } => {
                if self.nodes[to].life == life {
                    if let Some(Resp::Delta(Some(m))) = &resp
                        && self.keep_fetched
                        && self.honest(to)
                        && self.oracle.deltas.get(&m.hash) == Some(m)
                    {
                        // The driver checked the envelope and wrote the blob.
                        self.nodes[to].live.blobs.insert(m.hash);
                    }
                    let k = self.nodes[from].key;
                    self.input(to, Input::Response { from: k, req, resp });
                }
            }
            Event::Wake { node, life } => {
                if self.nodes[node].life == life
                    && self.nodes[node].wake_at.is_some_and(|t| t <= self.now)
                {
                    self.nodes[node].wake_at = None;
                    self.input(node, Input::Tick);
                }
            }
            Event::Trained {
                node,
                life,
                id,
                ticket,
                round,
                base,
                delta,
            } => {
                if self.nodes[node].life == life && !self.frozen {
                    let live = self.nodes[node].training == Some(id);
                    if live {
                        self.nodes[node].training = None;
                    }
                    if let Some(d) = delta.filter(|_| live) {
                        self.oracle.deltas.insert(d.hash, d);
                        crate::lies::trained(self, node, d);
                        self.input(
                            node,
                            Input::Trained {
                                ticket,
                                round,
                                base,
                                delta: Some(d),
                            },
                        );
                    } else {
                        self.input(
                            node,
                            Input::Trained {
                                ticket,
                                round,
                                base,
                                delta: None,
                            },
                        );
                    }
                }
            }
            Event::Merged {
                node,
                life,
                job,
                outcome,
            } => {
                if self.nodes[node].life == life {
                    self.input(node, Input::Merged { job, outcome });
                }
            }
            Event::Flush { node, life } => {
                if self.nodes[node].life == life {
                    let n = &mut self.nodes[node];
                    n.flush_pending = false;
                    n.durable = n.live.clone();
                    let acks = std::mem::take(&mut n.acks);
                    let top = acks
                        .iter()
                        .filter_map(|a| match a {
                            Input::Committed(r) => Some(*r),
                            _ => None,
                        })
                        .max();
                    for a in acks {
                        if !matches!(a, Input::Committed(_)) {
                            self.input(node, a);
                        }
                    }
                    if let Some(r) = top {
                        self.input(node, Input::Committed(r));
                    }
                }
            }
            Event::Crash(i) => {
                if self.nodes[i].up && self.honest(i) {
                    self.outcome.crashes += 1;
                    let n = &mut self.nodes[i];
                    n.up = false;
                    n.machine = None;
                    n.life += 1;
                    n.live = n.durable.clone();
                    n.acks.clear();
                    n.flush_pending = false;
                    n.training = None;
                    n.wake_at = None;
                    n.sees.clear();
                    self.reconnect();
                }
            }
            Event::Restart(i) | Event::Join(i) => {
                let cfg = self.cfg_for(i);
                let n = &mut self.nodes[i];
                if n.up && n.joined {
                    return;
                }
                n.up = true;
                n.joined = true;
                let mut restored = Restored::from_chain(genesis(), &n.durable.chain);
                restored.own = n.durable.own.clone();
                restored.attestations = n.durable.attestations.clone();
                restored.voted = n.durable.voted.clone();
                restored.checks = n.durable.checks.clone();
                n.machine = Some(Machine::new(cfg, restored, self.now));
                n.sees.clear();
                self.input(i, Input::Tick);
                self.reconnect();
            }
            Event::Split(g) => {
                self.outcome.partitions += 1;
                self.group = g;
                self.reconnect();
            }
            Event::Heal => {
                self.group = vec![0; self.nodes.len()];
                self.reconnect();
            }
            Event::LiarTick(i) => {
                crate::lies::tick(self, i);
                let hb = self.cfg.heartbeat;
                self.schedule(hb, Event::LiarTick(i));
            }
        }
    }

    fn cfg_for(&self, i: usize) -> Config {
        Config {
            me: self.nodes[i].key,
            ..self.cfg.clone()
        }
    }
}
