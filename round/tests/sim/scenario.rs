//! One run: the consortium, the liars and the faults a seed chooses, the run itself, and
//! the checks at its end.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cellswarm_common::ids::{ModelHash, SignerKey};
use cellswarm_round::machine::Config;
use cellswarm_round::turns::Turns;

use crate::lies::{Liar, Lie};
use crate::oracle::Oracle;
use crate::world::{CONSORTIUM, Event, Image, Node, Outcome, Rng, World, key};

/// Runs one seed to the end and checks the final invariants.
pub(crate) fn run_seed(seed: u64, trace: bool) -> Outcome {
    let mut rng = Rng::new(seed);
    let n = 3 + rng.below(8) as usize;
    let byzantine = ((n - 1) / 3) as u32;
    let liars = if byzantine > 0 && rng.chance(750) {
        1 + rng.below(u64::from(byzantine)) as usize
    } else {
        0
    };
    let quorum = n / 2 + 1;
    let members: BTreeSet<SignerKey> = (0..n).map(key).collect();
    let cfg = Config {
        me: key(0),
        members,
        consortium: CONSORTIUM,
        strategy: "fedavg".into(),
        quorum,
        byzantine,
        turns: Turns::new(Duration::from_millis(1500), Duration::from_millis(1000)),
        heartbeat: Duration::from_millis(500),
        max_rounds: None,
    };
    let mut liar_set: Vec<usize> = Vec::new();
    while liar_set.len() < liars {
        let i = rng.below(n as u64) as usize;
        if !liar_set.contains(&i) {
            liar_set.push(i);
        }
    }
    let nodes = (0..n)
        .map(|i| Node {
            key: key(i),
            liar: liar_set
                .contains(&i)
                .then(|| Liar::new(Lie::pick(&mut rng))),
            machine: None,
            life: 0,
            up: false,
            joined: false,
            live: Image::default(),
            durable: Image::default(),
            acks: Vec::new(),
            flush_pending: false,
            training: None,
            wake_at: None,
            sees: BTreeSet::new(),
        })
        .collect();
    let loss = rng.below(60);
    let dup = rng.below(40);
    let mut w = World {
        rng,
        now: Duration::ZERO,
        seq: 0,
        queue: BTreeMap::new(),
        nodes,
        oracle: Oracle::new(n, byzantine, quorum),
        cfg,
        group: vec![0; n],
        loss,
        dup,
        train_ids: 0,
        trace,
        frozen: false,
        // As the node: each member serves every delta it fetched, for the rounds it keeps.
        // `CELLSWARM_SIM_KEEP_FETCHED=0` serves only its own (the node before).
        keep_fetched: !std::env::var("CELLSWARM_SIM_KEEP_FETCHED").is_ok_and(|v| v == "0"),
        outcome: Outcome {
            byzantine: liars as u64,
            ..Outcome::default()
        },
    };
    let chaos = w.rng.ms(8_000, 16_000);
    let calm = Duration::from_millis(14_000);
    // A late joiner: an honest member that starts with an empty store.
    let late = w
        .rng
        .chance(500)
        .then(|| w.rng.below(n as u64) as usize)
        .filter(|&i| w.honest(i));
    for i in 0..n {
        if Some(i) == late {
            let d = w.rng.ms(2_000, 8_000);
            w.schedule(d, Event::Join(i));
        } else {
            let d = w.rng.ms(0, 50);
            w.schedule(d, Event::Join(i));
        }
        if !w.honest(i) {
            let d = w.rng.ms(100, 600);
            w.schedule(d, Event::LiarTick(i));
        }
    }
    if trace {
        let lies: Vec<String> = (0..n)
            .filter_map(|i| {
                w.nodes[i]
                    .liar
                    .as_ref()
                    .map(|l| format!("n{i} {:?}", l.lies))
            })
            .collect();
        println!(
            "scenario: {n} members, quorum {quorum}, byzantine {byzantine}, liars [{}], \
             late joiner {late:?}, chaos until {chaos:?}, calm until {:?}, fetched deltas \
             kept: {}",
            lies.join("; "),
            chaos + calm,
            w.keep_fetched
        );
    }
    // Faults during the chaos stretch.
    let faults = 1 + w.rng.below(4);
    for _ in 0..faults {
        let at = w.rng.ms(500, chaos.as_millis() as u64 - 1500);
        let down = w.rng.ms(300, 4_000);
        if w.rng.chance(500) {
            let i = w.rng.below(n as u64) as usize;
            if trace {
                println!("scenario: n{i} crashes at {at:?} for {down:?}");
            }
            w.queue_at(at, Event::Crash(i));
            w.queue_at((at + down).min(chaos), Event::Restart(i));
        } else {
            let g: Vec<u8> = (0..n).map(|_| w.rng.below(2) as u8).collect();
            if trace {
                println!("scenario: partition {g:?} at {at:?} for {down:?}");
            }
            w.queue_at(at, Event::Split(g));
            w.queue_at((at + down).min(chaos), Event::Heal);
        }
    }
    w.queue_at(chaos, Event::Heal);
    for i in 0..n {
        w.queue_at(chaos, Event::Restart(i));
    }
    // Training stops at `end`; the consortium then has until `deadline` to agree.
    let end = chaos + calm;
    let deadline = end + Duration::from_millis(20_000);
    let mut next_check = end;
    let mut calm_heads: Option<Vec<u64>> = None;
    while let Some((&(t, s), _)) = w.queue.iter().next() {
        if t > deadline {
            break;
        }
        let ev = w.queue.remove(&(t, s)).unwrap_or(Event::Heal);
        w.now = t;
        w.frozen = t >= end;
        if calm_heads.is_none() && t >= chaos + Duration::from_millis(2_000) {
            // Loss stays; the faults are over.
            calm_heads = Some(w.heads());
            w.oracle.calm_from = Some(t);
        }
        if t >= next_check {
            next_check = t + Duration::from_millis(250);
            if w.frozen && w.agree() {
                break;
            }
        }
        w.on_event(ev);
        if w.outcome.violations > 0 && !trace {
            break;
        }
    }
    if w.outcome.violations == 0 {
        let (v, stall) = w.oracle.at_end(&w, calm_heads.unwrap_or_default());
        w.violation(v);
        if let Some(s) = stall {
            w.outcome.stalls += 1;
            w.outcome.first_stall = Some(format!("t={:?}: {s}", w.now));
        }
    }
    w.outcome.rounds = w.heads().into_iter().max().unwrap_or(0);
    w.outcome
}

impl World {
    fn queue_at(&mut self, at: Duration, ev: Event) {
        let now = self.now;
        self.now = Duration::ZERO;
        self.schedule(at, ev);
        self.now = now;
    }

    /// Whether every honest node holds the same chain (by outcome).
    fn agree(&self) -> bool {
        let outcome = |i: usize| -> Vec<(ModelHash, [u8; 32])> {
            self.nodes[i]
                .live
                .chain
                .iter()
                .map(|s| (s.record.model, s.record.state))
                .collect()
        };
        let honest: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.honest(i)).collect();
        honest.windows(2).all(|w| outcome(w[0]) == outcome(w[1]))
    }

    /// Honest nodes' head rounds.
    pub(crate) fn heads(&self) -> Vec<u64> {
        (0..self.nodes.len())
            .filter(|&i| self.honest(i))
            .map(|i| self.nodes[i].live.chain.len() as u64)
            .collect()
    }
}
