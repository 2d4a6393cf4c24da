//! Crashes: a member killed with SIGKILL at random moments, hundreds of times in a row.
//!
//! Each kill lands shortly after a randomly chosen event of the victim (starting up,
//! training done and delta proposed, a peer's delta accepted, merging, publishing a
//! record, committing a round, catching up), plus a random delay, so that over the run
//! the kills cover training, sending, merging and writing the store. After every kill
//! the store must open and pass its check, and must hold every round the node had
//! acknowledged (logged as committed) before it died. At the end the victim must reach
//! the same model hash as its peers. (A restarted member can race the others and commit
//! its own record for a round they merged differently; it then replaces that round with
//! theirs when it catches up: the test reports how often.)
//!
//! 200 kills by default; set `CELLSWARM_KILLS` (for example to 1000) for more.

use std::process::Child;
use std::time::Duration;

use cellswarm_common::ids::RoundId;
use cellswarm_node::store::{DiskStore, Store};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::swarm_util::{Consortium, EXITED, LogEvent, Logs, Setup, terminate};

const VICTIM: usize = 2;

/// Events of the victim after which a kill may land.
const MOMENTS: [&str; 8] = [
    "resumed from the store",
    "proposing our delta",
    "accepted a delta",
    "merging as the round's merger",
    "published the merge record",
    "round committed",
    "caught up",
    "listening",
];

fn committed(e: &LogEvent) -> Option<u64> {
    matches!(e.message.as_str(), "round committed" | "caught up")
        .then(|| e.round())
        .flatten()
}

#[test]
fn a_member_killed_at_random_moments_hundreds_of_times_keeps_its_store_and_rejoins() {
    let kills: usize = std::env::var("CELLSWARM_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let c = Consortium::new(Setup {
        nodes: 3,
        min_peers: 2,
        collect: "3s",
        merge: "2s",
        rounds: 1_000_000,
        training_delay: "20ms",
        ..Setup::default()
    });
    let (tx, mut logs) = Logs::new();
    let mut children: Vec<Child> = (0..3).map(|i| c.spawn(i, &tx)).collect();
    logs.wait_for("the victim's first round", Duration::from_secs(120), |e| {
        e.node == VICTIM && committed(e).is_some()
    });
    let mut rng = ChaCha8Rng::seed_from_u64(0xdead);
    let mut acked = 0u64;
    let mut moments = std::collections::BTreeMap::<&str, usize>::new();
    for k in 0..kills {
        // Wait for a random kind of event (or give up after a while: then the kill
        // lands wherever the node is), then a random delay.
        let moment = MOMENTS[rng.random_range(0..MOMENTS.len())];
        let hit = logs
            .next_matching(Duration::from_secs(1), |e| {
                e.node == VICTIM && e.message == moment
            })
            .is_some();
        *moments
            .entry(if hit { moment } else { "timeout" })
            .or_default() += 1;
        let jitter = rng.random_range(0..40u64);
        // Deliberate: the point is to land between events at a random moment.
        std::thread::sleep(Duration::from_millis(jitter));
        children[VICTIM].kill().expect("SIGKILL");
        children[VICTIM].wait().expect("reaped");
        // Every line the process wrote before dying, then the rounds it acknowledged.
        logs.wait_for_new("the victim's last log line", Duration::from_secs(30), |e| {
            e.node == VICTIM && e.message == EXITED
        });
        acked = acked.max(
            logs.seen
                .iter()
                .filter(|e| e.node == VICTIM)
                .filter_map(committed)
                .max()
                .unwrap_or(0),
        );
        let store = DiskStore::open(&c.sites[VICTIM].store, 1 << 20)
            .unwrap_or_else(|e| panic!("kill {k} ({moment}): the store does not open: {e}"));
        let report = store
            .check()
            .unwrap_or_else(|e| panic!("kill {k} ({moment}): the store check fails: {e}"));
        assert!(
            report.quarantined.is_empty() && report.head_model_ok && report.head_state_ok,
            "kill {k} ({moment}): damaged store {report:?}"
        );
        let head = store
            .head()
            .expect("the head reads")
            .expect("a head after the first round");
        assert!(
            head.round.0 >= acked,
            "kill {k} ({moment}): head at round {} but round {acked} was acknowledged",
            head.round
        );
        assert!(
            store.record(RoundId(acked)).expect("reads").is_some(),
            "kill {k} ({moment}): the acknowledged record of round {acked} is gone"
        );
        drop(store);
        children[VICTIM] = c.spawn(VICTIM, &tx);
    }
    let forks = logs
        .seen
        .iter()
        .filter(|e| e.message.starts_with("our last round is not the one"))
        .count();
    eprintln!(
        "{kills} kills; moments: {moments:?}; acknowledged up to round {acked}; \
         forked last rounds replaced by the peers' record: {forks}"
    );
    // Left alone, the victim rejoins and commits a round with the same model hash as
    // its peers.
    let mine = logs.wait_for_new(
        "a round committed after the last restart",
        Duration::from_secs(120),
        |e| e.node == VICTIM && e.message == "round committed",
    );
    let r = mine.round().expect("a round");
    let theirs = logs.wait_for(
        "node 0 committing the same round",
        Duration::from_secs(120),
        |e| e.node == 0 && e.message == "round committed" && e.round() == Some(r),
    );
    assert_eq!(
        mine.field("model"),
        theirs.field("model"),
        "round {r}: the victim's model differs from its peers'"
    );
    for (i, child) in children.iter_mut().enumerate() {
        assert!(
            terminate(child, Duration::from_secs(30)),
            "node {i} did not exit 0 on SIGTERM"
        );
    }
}
