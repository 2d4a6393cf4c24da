//! What must hold, checked as the simulation runs and at its end. The oracle sees
//! everything: every delta ever signed, every attestation sent, every commit.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};
use cellswarm_round::cert::Attestation;
use cellswarm_round::machine::{DeltaMeta, SignedRecord, Time, final_threshold};

use cellswarm_round::rules::link;

use crate::world::{CONSORTIUM, World, genesis, head_of, merge};

type Outcome = (ModelHash, [u8; 32]);

pub(crate) struct Oracle {
    quorum: usize,
    final_q: usize,
    /// Every delta signed by anyone, honest or not.
    pub(crate) deltas: BTreeMap<DeltaHash, DeltaMeta>,
    atts: BTreeMap<RoundId, BTreeMap<Outcome, BTreeSet<SignerKey>>>,
    /// Outcomes attested by enough members to be final.
    finals: BTreeMap<RoundId, Outcome>,
    /// When each own delta was last offered (announced by its signer): a signer that
    /// moves to another fork withdraws it and announces it again if it comes back.
    offered_at: BTreeMap<DeltaHash, Time>,
    /// When each record was first committed by an honest node.
    first_commit: BTreeMap<RecordHash, Time>,
    /// The bases each outcome was committed on (by honest nodes).
    bases: BTreeMap<(RoundId, ModelHash), BTreeSet<ModelHash>>,
    pub(crate) calm_from: Option<Time>,
}

impl Oracle {
    pub(crate) fn new(n: usize, byzantine: u32, quorum: usize) -> Self {
        Self {
            quorum,
            final_q: final_threshold(n, byzantine),
            deltas: BTreeMap::new(),
            atts: BTreeMap::new(),
            finals: BTreeMap::new(),
            offered_at: BTreeMap::new(),
            first_commit: BTreeMap::new(),
            bases: BTreeMap::new(),
            calm_from: None,
        }
    }

    /// An attestation was sent: no round may ever have two final outcomes.
    pub(crate) fn attested(&mut self, a: &Attestation, _now: Time) -> Option<String> {
        let signers = self
            .atts
            .entry(a.round)
            .or_default()
            .entry((a.model, a.state))
            .or_default();
        signers.insert(a.signer);
        if signers.len() >= self.final_q {
            match self.finals.get(&a.round) {
                Some(o) if *o != (a.model, a.state) => {
                    return Some(format!(
                        "round {} has two final outcomes: {} and {}",
                        a.round,
                        o.0.short(),
                        a.model.short()
                    ));
                }
                Some(_) => {}
                None => {
                    self.finals.insert(a.round, (a.model, a.state));
                }
            }
        }
        None
    }

    pub(crate) fn own_delta(&mut self, d: DeltaMeta, now: Time) {
        self.offered_at.entry(d.hash).or_insert(now);
    }

    /// A node announced a delta of its own: it is on offer from now.
    pub(crate) fn offered(&mut self, hash: DeltaHash, now: Time) {
        if let Some(t) = self.offered_at.get_mut(&hash) {
            *t = now;
        }
    }

    /// An honest node committed the last record of `chain`: it continues the chain, names
    /// a quorum of real deltas of distinct members on its base, none merged before in the
    /// chain, and its model is the merge recomputed over them.
    pub(crate) fn committed(
        &mut self,
        i: usize,
        chain: &[SignedRecord],
        now: Time,
    ) -> Option<String> {
        let last = chain.last()?;
        self.first_commit.entry(last.hash).or_insert(now);
        let r = &last.record;
        self.bases
            .entry((r.round, r.model))
            .or_default()
            .insert(r.base);
        let (base, state, prev) = match chain.len() {
            1 => (genesis().0, genesis().1, None),
            n => {
                let p = &chain[n - 2];
                (p.record.model, p.record.state, link(&head_of(p)))
            }
        };
        if r.base != base || r.prev != prev || r.round.0 as usize != chain.len() {
            return Some(format!(
                "n{i} round {}: does not continue its chain",
                r.round
            ));
        }
        if r.consortium != CONSORTIUM {
            return Some(format!(
                "n{i} round {}: another consortium's record",
                r.round
            ));
        }
        let signers: BTreeSet<SignerKey> = r.contributions.iter().map(|c| c.signer).collect();
        if signers.len() != r.contributions.len() || signers.len() < self.quorum {
            return Some(format!(
                "n{i} round {}: {} contributions of {} members, quorum {}",
                r.round,
                r.contributions.len(),
                signers.len(),
                self.quorum
            ));
        }
        for c in &r.contributions {
            let ok = self.deltas.get(&c.delta).is_some_and(|d| {
                d.signer == c.signer
                    && d.round == r.round
                    && d.base == r.base
                    && d.consortium == CONSORTIUM
                    && d.samples == c.sample_count
            });
            if !ok {
                return Some(format!(
                    "n{i} round {}: names delta {} that {} never signed for it",
                    r.round,
                    c.delta.short(),
                    c.signer.short()
                ));
            }
        }
        let earlier: BTreeSet<DeltaHash> = chain[..chain.len() - 1]
            .iter()
            .flat_map(|s| s.record.contributions.iter().map(|c| c.delta))
            .collect();
        if let Some(c) = r.contributions.iter().find(|c| earlier.contains(&c.delta)) {
            return Some(format!(
                "n{i} round {}: delta {} merged twice",
                r.round,
                c.delta.short()
            ));
        }
        if merge(base, state, &r.contributions) != (r.model, r.state) {
            return Some(format!(
                "n{i} round {}: model {} is not the merge of the deltas it names",
                r.round,
                r.model.short()
            ));
        }
        None
    }

    /// The final chain: from round 1, each round's outcome attested by enough members
    /// and committed on the final outcome of the round before.
    fn final_chain(&self, of: &BTreeMap<RoundId, Outcome>) -> Vec<Outcome> {
        let mut finals: Vec<Outcome> = Vec::new();
        let mut base = genesis().0;
        while let Some(o) = of.get(&RoundId(finals.len() as u64 + 1)) {
            let on_base = self
                .bases
                .get(&(RoundId(finals.len() as u64 + 1), o.0))
                .is_some_and(|b| b.contains(&base));
            if !on_base {
                break;
            }
            base = o.0;
            finals.push(*o);
        }
        finals
    }

    /// Outcomes final by the protocol's count: attested by enough members, none of whom
    /// attested another outcome of the round (a member that did is a liar, and its proof
    /// reaches every member that asks for the round's attestations, so no member can
    /// hold on to its vote). Only these must be on every honest chain at the end; the
    /// safety check counts a liar's every attestation (`finals`).
    fn settled_finals(&self) -> BTreeMap<RoundId, Outcome> {
        let mut out = BTreeMap::new();
        for (round, by) in &self.atts {
            let mut seen: BTreeMap<SignerKey, usize> = BTreeMap::new();
            for signers in by.values() {
                for s in signers {
                    *seen.entry(*s).or_default() += 1;
                }
            }
            for (o, signers) in by {
                let one_faced = signers.iter().filter(|s| seen[*s] == 1).count();
                if one_faced >= self.final_q {
                    out.insert(*round, *o);
                }
            }
        }
        out
    }

    /// At the end: honest chains are prefixes of one chain and hold every final outcome;
    /// every honest node kept committing in the calm stretch; a final record of the calm
    /// stretch leaves out no honest delta offered well before it.
    pub(crate) fn at_end(
        &self,
        w: &World,
        calm_heads: Vec<u64>,
    ) -> (Option<String>, Option<String>) {
        let stall = self.agreement(w);
        (self.progress(w, calm_heads), stall)
    }

    /// Honest chains are one chain (by outcome) and hold every final outcome, once the
    /// faults stopped and the consortium had time to settle.
    fn agreement(&self, w: &World) -> Option<String> {
        let (honest, chains) = honest_chains(w);
        let longest = chains.iter().max_by_key(|c| c.len()).copied()?;
        let finals = self.final_chain(&self.settled_finals());
        for (k, c) in chains.iter().enumerate() {
            // Twin records (one merge signed by two racing candidates) are one outcome.
            let same = |a: &SignedRecord, b: &SignedRecord| {
                (a.record.model, a.record.state) == (b.record.model, b.record.state)
            };
            if let Some(at) = c.iter().zip(longest.iter()).position(|(a, b)| !same(a, b)) {
                let r = &c[at].record;
                return Some(format!(
                    "honest chains diverge at round {} (n{} has {} rounds, the longest {}; final: {})",
                    r.round,
                    honest[k],
                    c.len(),
                    longest.len(),
                    self.finals.contains_key(&r.round)
                ));
            }
            for (i, outcome) in finals.iter().enumerate() {
                if let Some(s) = c.get(i)
                    && (s.record.model, s.record.state) != *outcome
                {
                    return Some(format!(
                        "n{} holds a round {} that is not its final outcome",
                        honest[k],
                        i + 1
                    ));
                }
            }
        }
        None
    }

    /// Every honest node kept committing in the calm stretch, and a final record of the
    /// calm stretch leaves out no honest delta offered well before it.
    fn progress(&self, w: &World, calm_heads: Vec<u64>) -> Option<String> {
        let (honest, chains) = honest_chains(w);
        let longest = chains.iter().max_by_key(|c| c.len()).copied()?;
        let finals = self.final_chain(&self.finals);
        for (k, c) in chains.iter().enumerate() {
            let before = calm_heads.get(k).copied().unwrap_or(0);
            if (c.len() as u64) < before + 2 {
                return Some(format!(
                    "n{} committed {} rounds in the calm stretch (head {} -> {})",
                    honest[k],
                    c.len() as u64 - before.min(c.len() as u64),
                    before,
                    c.len()
                ));
            }
        }
        let calm = self.calm_from?;
        let margin = Duration::from_millis(2_500);
        for s in longest {
            let Some(&at) = self.first_commit.get(&s.hash) else {
                continue;
            };
            let fin = finals.get(s.record.round.0 as usize - 1);
            if at < calm + margin || fin != Some(&(s.record.model, s.record.state)) {
                continue;
            }
            for (h, d) in &self.deltas {
                let honest_signer = honest.iter().any(|&i| w.nodes[i].key == d.signer);
                let made = self.offered_at.get(h).copied();
                if honest_signer
                    && d.round == s.record.round
                    && d.base == s.record.base
                    && made.is_some_and(|t| t + margin <= at)
                    && !s.record.contributions.iter().any(|c| c.signer == d.signer)
                {
                    return Some(format!(
                        "round {} leaves out {}'s delta {} offered {:?} before the record",
                        s.record.round,
                        d.signer.short(),
                        h.short(),
                        at - made.unwrap_or_default()
                    ));
                }
            }
        }
        None
    }
}

/// The honest nodes and their chains.
fn honest_chains(w: &World) -> (Vec<usize>, Vec<&Vec<SignedRecord>>) {
    let honest: Vec<usize> = (0..w.nodes.len()).filter(|&i| w.honest(i)).collect();
    let chains = honest.iter().map(|&i| &w.nodes[i].live.chain).collect();
    (honest, chains)
}
