//! Liars: members that run the protocol and, on top of it, lie in the ways a member can
//! (they sign as themselves only; they cannot forge another member's signature).

use std::collections::{BTreeMap, BTreeSet};

use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};
use cellswarm_common::wire::{Contribution, MergeRecord};
use cellswarm_round::cert::Attestation;
use cellswarm_round::machine::{DeltaMeta, Msg, Req, Resp, SignedRecord};
use cellswarm_round::rules::link;
use cellswarm_round::turns::merger_order;

use crate::world::head_of;

use crate::world::{CONSORTIUM, Rng, World, genesis, merge};

/// One way to lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lie {
    /// Serves catch-up chains it signed alone, naming deltas nobody signed, and claims
    /// to be ahead to lure nodes into catching up from it.
    ForgeChain,
    /// Publishes, as soon as it can, a record over a subset of deltas it chose, as
    /// whichever candidate it is.
    TurnJump,
    /// Claims rounds far in the future.
    FarClaim,
    /// Signs two deltas per round, announcing each to half the members.
    Equivocate,
    /// Announces deltas and records of earlier rounds as current.
    Replay,
    /// Signs deltas under another consortium's digest.
    Foreign,
    /// Declares a huge sample count.
    Inflate,
    /// Publishes records whose model is not the merge of their deltas.
    BogusRecord,
    /// Announces its delta and never serves it.
    Withhold,
    /// Attests outcomes that never happened.
    BogusAttest,
}

const ALL: [Lie; 10] = [
    Lie::ForgeChain,
    Lie::TurnJump,
    Lie::FarClaim,
    Lie::Equivocate,
    Lie::Replay,
    Lie::Foreign,
    Lie::Inflate,
    Lie::BogusRecord,
    Lie::Withhold,
    Lie::BogusAttest,
];

impl Lie {
    /// A random non-empty set of lies.
    pub(crate) fn pick(rng: &mut Rng) -> Vec<Lie> {
        let mut v: Vec<Lie> = ALL.iter().copied().filter(|_| rng.chance(400)).collect();
        if v.is_empty() {
            v.push(ALL[rng.below(ALL.len() as u64) as usize]);
        }
        v
    }
}

/// A liar's own state.
pub(crate) struct Liar {
    pub(crate) lies: Vec<Lie>,
    /// Deltas it serves besides its own (its equivocations).
    served: BTreeMap<DeltaHash, DeltaMeta>,
    /// Records it serves for a round instead of its store's.
    records: BTreeMap<RoundId, SignedRecord>,
    done: BTreeSet<RoundId>,
}

impl Liar {
    pub(crate) fn new(lies: Vec<Lie>) -> Self {
        Self {
            lies,
            served: BTreeMap::new(),
            records: BTreeMap::new(),
            done: BTreeSet::new(),
        }
    }
    fn has(&self, l: Lie) -> bool {
        self.lies.contains(&l)
    }
}

fn random_hash(rng: &mut Rng) -> ModelHash {
    ModelHash::of(&rng.next().to_le_bytes())
}

/// What a liar answers instead of the honest answer (None: the honest one).
pub(crate) fn serve(w: &mut World, i: usize, req: Req) -> Option<Option<Resp>> {
    let key = w.nodes[i].key;
    let l = w.nodes[i].liar.as_ref()?;
    match req {
        Req::Delta(h) => {
            if let Some(m) = l.served.get(&h) {
                return Some(Some(Resp::Delta(Some(*m))));
            }
            let own = w.oracle.deltas.get(&h).is_some_and(|d| d.signer == key);
            (l.has(Lie::Withhold) && own).then_some(None)
        }
        Req::Record(r) | Req::Voted(r) => l
            .records
            .get(&r)
            .map(|s| Some(Resp::Record(Some(s.clone())))),
        Req::Records { from, max } if l.has(Lie::ForgeChain) => {
            Some(Some(Resp::Records(forged_chain(w, i, from, max))))
        }
        _ => None,
    }
}

/// A chain from round `from` that the liar signs alone: its records name deltas nobody
/// signed (every rule a record carries on its face is kept).
fn forged_chain(w: &mut World, i: usize, from: RoundId, max: u32) -> Vec<SignedRecord> {
    let key = w.nodes[i].key;
    let chain = &w.nodes[i].durable.chain;
    let (mut base, mut prev) = match (from.0 as usize).checked_sub(2).and_then(|k| chain.get(k)) {
        Some(p) => (p.record.model, link(&head_of(p))),
        None if from.0 <= 1 => (genesis().0, None),
        None => return Vec::new(),
    };
    let n = w.nodes.len();
    let quorum = w.cfg.quorum;
    let mut out = Vec::new();
    for k in 0..(max as u64).min(3) {
        let round = RoundId(from.0 + k);
        let mut contributions: Vec<Contribution> = (0..n)
            .map(|j| w.nodes[j].key)
            .filter(|s| *s != key)
            .take(quorum.saturating_sub(1))
            .chain(std::iter::once(key))
            .map(|signer| Contribution {
                signer,
                delta: DeltaHash(random_hash(&mut w.rng).0),
                sample_count: 100,
            })
            .collect();
        contributions.sort();
        let order = merger_order(round, contributions.iter().map(|c| c.signer));
        let attempt = order.iter().position(|s| *s == key).unwrap_or(0) as u32;
        let record = MergeRecord {
            consortium: CONSORTIUM,
            round,
            base,
            prev,
            strategy: "fedavg".into(),
            contributions,
            model: random_hash(&mut w.rng),
            state: random_hash(&mut w.rng).0,
            attempt,
        };
        let s = SignedRecord::own(record, key);
        base = s.record.model;
        prev = link(&head_of(&s));
        out.push(s);
    }
    out
}

/// The sample count a liar declares.
pub(crate) fn samples(w: &World, i: usize, honest: u64) -> u64 {
    match &w.nodes[i].liar {
        Some(l) if l.has(Lie::Inflate) => u64::MAX / 3,
        _ => honest,
    }
}

/// After a liar trained its delta `d`.
pub(crate) fn trained(w: &mut World, i: usize, d: DeltaMeta) {
    let Some(l) = w.nodes[i].liar.as_ref() else {
        return;
    };
    let (equivocate, foreign) = (l.has(Lie::Equivocate), l.has(Lie::Foreign));
    let n = w.nodes.len();
    if equivocate {
        let second = DeltaMeta {
            hash: DeltaHash(random_hash(&mut w.rng).0),
            ..d
        };
        w.oracle.deltas.insert(second.hash, second);
        if let Some(l) = w.nodes[i].liar.as_mut() {
            l.served.insert(second.hash, second);
        }
        for to in (0..n).filter(|j| j % 2 == 1 && *j != i) {
            w.send_gossip(
                i,
                to,
                Msg::Delta {
                    round: d.round,
                    hash: second.hash,
                },
            );
        }
    }
    if foreign {
        let other = DeltaMeta {
            hash: DeltaHash(random_hash(&mut w.rng).0),
            consortium: [0xEE; 32],
            ..d
        };
        w.oracle.deltas.insert(other.hash, other);
        if let Some(l) = w.nodes[i].liar.as_mut() {
            l.served.insert(other.hash, other);
        }
        w.broadcast(
            i,
            Msg::Delta {
                round: d.round,
                hash: other.hash,
            },
        );
    }
}

/// A liar's lies of one heartbeat.
pub(crate) fn tick(w: &mut World, i: usize) {
    let Some(m) = w.nodes[i].machine.as_ref() else {
        return;
    };
    let (head, key) = (m.head(), w.nodes[i].key);
    let current = head.round.next();
    let Some(l) = w.nodes[i].liar.as_ref() else {
        return;
    };
    let lies = l.lies.clone();
    let fresh = !l.done.contains(&current);
    if lies.contains(&Lie::FarClaim) {
        let model = random_hash(&mut w.rng);
        w.broadcast(
            i,
            Msg::Heartbeat {
                head: RoundId(current.0 + 1000),
                model,
            },
        );
    }
    if lies.contains(&Lie::ForgeChain) {
        let model = random_hash(&mut w.rng);
        w.broadcast(
            i,
            Msg::Heartbeat {
                head: RoundId(current.0 + 3),
                model,
            },
        );
    }
    if lies.contains(&Lie::BogusAttest) {
        for round in [head.round, current] {
            let a = Attestation {
                signer: key,
                round,
                record: RecordHash(random_hash(&mut w.rng).0),
                model: random_hash(&mut w.rng),
                state: random_hash(&mut w.rng).0,
            };
            w.broadcast(i, Msg::Attest(a));
            let b = Attestation {
                model: random_hash(&mut w.rng),
                ..a
            };
            w.broadcast(i, Msg::Checked(b));
        }
    }
    if lies.contains(&Lie::Replay) {
        let old = w
            .oracle
            .deltas
            .values()
            .find(|d| d.round < current && d.consortium == CONSORTIUM)
            .map(|d| d.hash);
        if let Some(h) = old {
            w.broadcast(
                i,
                Msg::Delta {
                    round: current,
                    hash: h,
                },
            );
        }
    }
    let jump = lies.contains(&Lie::TurnJump);
    let bogus = lies.contains(&Lie::BogusRecord);
    if fresh && (jump || bogus) {
        // The deltas of this round on our base, one per member, ours first.
        let mut by_signer: BTreeMap<SignerKey, DeltaMeta> = BTreeMap::new();
        for d in w.oracle.deltas.values() {
            if d.round == current && d.base == head.model && d.consortium == CONSORTIUM {
                by_signer.entry(d.signer).or_insert(*d);
            }
        }
        if !by_signer.contains_key(&key) || by_signer.len() < w.cfg.quorum {
            return;
        }
        let chosen: Vec<DeltaMeta> = if jump {
            // Ours and just enough others for a quorum: everyone else censored.
            let mut v = vec![by_signer[&key]];
            v.extend(
                by_signer
                    .values()
                    .filter(|d| d.signer != key)
                    .take(w.cfg.quorum - 1)
                    .copied(),
            );
            v
        } else {
            by_signer.values().copied().collect()
        };
        let mut contributions: Vec<Contribution> = chosen
            .iter()
            .map(|d| Contribution {
                signer: d.signer,
                delta: d.hash,
                sample_count: d.samples,
            })
            .collect();
        contributions.sort();
        let order = merger_order(current, contributions.iter().map(|c| c.signer));
        let attempt = order.iter().position(|s| *s == key).unwrap_or(0) as u32;
        let (mut model, mut state) = merge(head.model, head.state, &contributions);
        if bogus && !jump {
            model = random_hash(&mut w.rng);
            state = random_hash(&mut w.rng).0;
        }
        let record = MergeRecord {
            consortium: CONSORTIUM,
            round: current,
            base: head.model,
            prev: link(&head),
            strategy: "fedavg".into(),
            contributions,
            model,
            state,
            attempt,
        };
        let s = SignedRecord::own(record, key);
        let hash = s.hash;
        if let Some(l) = w.nodes[i].liar.as_mut() {
            l.done.insert(current);
            l.records.insert(current, s);
        }
        w.broadcast(
            i,
            Msg::MergeReady {
                round: current,
                record: hash,
            },
        );
    }
}
