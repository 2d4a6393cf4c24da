//! Deterministic simulation of the round protocol (`cellswarm_round::machine`).
//!
//! Each seed builds a consortium of 3 to 10 members on a virtual clock: some of them
//! liars (up to `aggregation.byzantine`, with a random set of lies each), a network that
//! delays, loses, duplicates and reorders, nodes that crash (losing every write not yet
//! synced) and restart, partitions that heal, and a member that joins late with an empty
//! store. After a stretch of chaos comes a calm stretch (liars still lying). Invariants
//! are checked after every step (`oracle`); at the end the honest chains must agree and
//! every honest node must have kept committing.
//!
//! `CELLSWARM_SIM_SEEDS=N` runs N seeds (default 2,000); `CELLSWARM_SIM_SEED=S` runs seed
//! S alone and `CELLSWARM_SIM_TRACE=1` prints its events. A failing seed prints the
//! command that replays it. The test ends with one line:
//! `sim seeds=N rounds=R byzantine=B crashes=C partitions=P violations=V stalls=S`
//! (stalls: runs whose honest members had not settled on one chain holding every final
//! outcome when the time to settle ran out; bounded at 0.5 %, none in 100,000 seeds
//! today, see docs/security.md).

#[path = "sim/lies.rs"]
mod lies;
#[path = "sim/oracle.rs"]
mod oracle;
#[path = "sim/scenario.rs"]
mod scenario;
#[path = "sim/world.rs"]
mod world;

use std::io::Write as _;
use std::sync::Mutex;

use scenario::run_seed;
use world::Outcome;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn seeds_hold_every_invariant() {
    let trace = std::env::var("CELLSWARM_SIM_TRACE").is_ok_and(|v| v == "1");
    let seeds: Vec<u64> = match env_u64("CELLSWARM_SIM_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("CELLSWARM_SIM_SEEDS").unwrap_or(2000)).collect(),
    };
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let total = Mutex::new(Outcome::default());
    let failures = Mutex::new(Vec::<(u64, String)>::new());
    let stalls = Mutex::new(Vec::<(u64, String)>::new());
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (seeds, total, failures, stalls) = (&seeds, &total, &failures, &stalls);
            scope.spawn(move || {
                for &seed in seeds.iter().skip(t).step_by(threads) {
                    let o = run_seed(seed, trace);
                    if let Some(v) = o.first_violation.clone() {
                        failures.lock().unwrap().push((seed, v));
                    }
                    if let Some(s) = o.first_stall.clone() {
                        stalls.lock().unwrap().push((seed, s));
                    }
                    total.lock().unwrap().add(&o);
                }
            });
        }
    });
    let total = total.into_inner().unwrap();
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    let mut stalls = stalls.into_inner().unwrap();
    stalls.sort();
    // Written to the process's stdout itself, not through `println!`, so the line shows
    // in a plain `cargo test` too (the test harness captures only the print macros).
    let _ = writeln!(
        std::io::stdout(),
        "sim seeds={} rounds={} byzantine={} crashes={} partitions={} violations={} stalls={}",
        seeds.len(),
        total.rounds,
        total.byzantine,
        total.crashes,
        total.partitions,
        total.violations,
        total.stalls
    );
    let show = env_u64("CELLSWARM_SIM_SHOW").unwrap_or(5) as usize;
    for (kind, list) in [("violation", &failures), ("stall", &stalls)] {
        for (seed, v) in list.iter().take(show) {
            println!("{kind}: seed {seed}: {v}");
            println!(
                "  replay: CELLSWARM_SIM_SEED={seed} CELLSWARM_SIM_TRACE=1 cargo test -p cellswarm-round --test sim -- --nocapture"
            );
        }
    }
    assert_eq!(
        total.violations,
        0,
        "{} seeds broke an invariant",
        failures.len()
    );
    // No run of 100,000 ends unsettled today (docs/security.md); the budget stays so
    // that a rare split cannot fail CI's 2,000 seeds by chance, and cannot grow
    // unnoticed either. The goal is zero.
    assert!(
        total.stalls * 200 <= seeds.len() as u64,
        "{} of {} runs did not settle on one chain (the budget is 0.5%)",
        total.stalls,
        seeds.len()
    );
    if seeds.len() >= 100 {
        assert!(total.byzantine > 0, "no seed had a liar");
        assert!(
            total.crashes > 0 && total.partitions > 0,
            "no seed had faults"
        );
    }
}

/// Seeds that once broke liveness or did not settle (the first six of the 20,000-seed
/// run, settled by the fix of the first; the others of 100,000-seed runs). Every one must now keep committing and settle
/// on one chain.
const REGRESSIONS: [(u64, &str); 17] = [
    // A liar's two deltas split three honest votes three ways; the one member on the
    // preferred outcome was asked for its record once, could not give one of its deltas
    // in time, and was never asked again: the round stayed split for good (the fork
    // choice now asks a member again after a few heartbeats).
    (9806, "three-way split, fork never asked again"),
    (16445, "no commit in the calm stretch"),
    (3230, "did not settle"),
    (3874, "did not settle (one outcome final)"),
    (4709, "did not settle"),
    (7461, "did not settle"),
    // Of the 100,000-seed run: two of three members voted for one outcome of round 3 and
    // each left it for the third's lower-hash outcome before hearing the other's vote; it
    // became final with no member holding it, and each member caught up from a voter's
    // chain, which no longer held it, again and again (members now keep the records they
    // voted for and take a final outcome from their own vote or a voter's).
    (44604, "final outcome no member held"),
    // Of the same run: without the vote lock a member ends alone on a branch beside a
    // final outcome (docs/protocol.md, "Votes lock").
    (23551, "alone beside a final outcome"),
    // With the lock and without checks in the store: a member that locked and restarted
    // repeated no check, and three members waited 36 s on a record's certificate.
    (59395, "certificate waited on a lost check"),
    // A liar announced its second delta to half the members; one merger's fetch of it
    // was lost, so the members holding it refused every record for 8 s while the
    // mergers never heard of it (a verifier now announces a delta a record left out).
    (49094, "omitted delta never relayed"),
    // Of the same run, honest chains on two non-final branches at the end; settles
    // since omitted deltas are relayed.
    (65310, "two non-final branches at the end"),
    // Two members restarted after round 3's merger announced its record; catching up,
    // they recomputed it but found no certificate (the liar among the two attesters
    // attested two outcomes) and dropped it, and the live round only ever saw the
    // liar's own record, whose delta it withheld: no round for 28 s (a catch-up's
    // uncertified newest record now goes to the live round's rules).
    (86830, "caught-up record never reached the live round"),
    // A member's head left a model for another outcome of the round and came back to
    // it; the answer of the training cancelled on the way (same round, same base) was
    // taken for the new training's, which was then dropped: the member never
    // contributed to the round again and it lacked a quorum (trainings carry tickets).
    (18009, "cancelled training's answer taken for the live one"),
    // A member on a non-final outcome could not recompute the consortium's round: one
    // of its deltas was a liar's and only the liar served it (members now serve the
    // deltas they fetched, for the rounds they keep).
    (45279, "a round's delta served only by a liar"),
    // A partition left two honest members on a liar's record of round 6 and four still
    // collecting it, each side short of a quorum: the round's deltas the two had pooled
    // were answered to nobody once they moved on (members now answer `Deltas(r)` for the
    // round they left too).
    (11004, "the two sides of a partition each short of a quorum"),
    (32384, "the two sides of a partition each short of a quorum"),
    (62355, "the two sides of a partition each short of a quorum"),
];

#[test]
fn seeds_that_once_failed_now_settle() {
    for (seed, what) in REGRESSIONS {
        let o = run_seed(seed, false);
        assert!(
            o.first_violation.is_none() && o.first_stall.is_none(),
            "seed {seed} ({what}): {:?} {:?}",
            o.first_violation,
            o.first_stall
        );
        assert!(
            o.rounds >= 8,
            "seed {seed} ({what}): only {} rounds",
            o.rounds
        );
    }
}
