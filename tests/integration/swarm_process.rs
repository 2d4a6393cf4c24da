//! The swarm as real processes (`cellswarm run`): a member killed mid-round, a merger
//! killed while merging, and graceful stops on SIGTERM. Waits are on log events (JSON
//! lines on stderr), each bounded by a timeout.

use std::collections::HashSet;
use std::process::Child;
use std::time::Duration;

use cellswarm_common::ids::{DeltaHash, SignerKey};

use crate::swarm_util::{Consortium, LogEvent, Logs, Setup, terminate};

const WAIT: Duration = Duration::from_secs(120);

fn reached(node: usize, round: u64) -> impl FnMut(&LogEvent) -> bool {
    move |e: &LogEvent| {
        e.node == node
            && matches!(e.message.as_str(), "round committed" | "caught up")
            && e.round().is_some_and(|r| r >= round)
    }
}

/// Stops every child with SIGTERM (each must exit 0), then checks the stores: one head
/// for all, and no delta merged twice or twice from one member in a round.
fn stop_and_check(c: &Consortium, children: &mut [Child], rounds: u64) {
    for (i, child) in children.iter_mut().enumerate() {
        assert!(
            terminate(child, Duration::from_secs(30)),
            "node {i} did not exit 0 on SIGTERM"
        );
    }
    let mut heads = Vec::new();
    for (i, site) in c.sites.iter().enumerate() {
        let (head, audit) = site.stored();
        let head = head.unwrap_or_else(|| panic!("node {i} has no head"));
        assert_eq!(head.round.0, rounds, "node {i}");
        heads.push(head.model);
        let distinct: HashSet<DeltaHash> = audit.iter().map(|a| a.delta).collect();
        assert_eq!(
            distinct.len(),
            audit.len(),
            "node {i}: a delta merged twice"
        );
        let per_round: HashSet<(u64, SignerKey)> =
            audit.iter().map(|a| (a.round.0, a.signer)).collect();
        assert_eq!(
            per_round.len(),
            audit.len(),
            "node {i}: two deltas of one member in a round"
        );
    }
    assert!(heads.windows(2).all(|w| w[0] == w[1]), "{heads:?}");
}

#[test]
fn five_nodes_one_killed_mid_round_the_round_completes_and_it_rejoins() {
    let c = Consortium::new(Setup {
        nodes: 5,
        min_peers: 3,
        collect: "5s",
        merge: "3s",
        rounds: 4,
        training_delay: "300ms",
        ..Setup::default()
    });
    let (tx, mut logs) = Logs::new();
    let mut children: Vec<Child> = (0..5).map(|i| c.spawn(i, &tx)).collect();
    // Node 4 proposed its delta for round 2: kill it (SIGKILL, no clean-up).
    logs.wait_for("node 4 proposing in round 2", WAIT, |e| {
        e.node == 4 && e.message == "proposing our delta" && e.round() == Some(2)
    });
    children[4].kill().expect("SIGKILL");
    children[4].wait().expect("reaped");
    // The round completes with the quorum of the four others.
    for i in 0..4 {
        logs.wait_for("round 2 without node 4", WAIT, reached(i, 2));
    }
    // Restarted from its store, it catches up and finishes with the others.
    children[4] = c.spawn(4, &tx);
    for i in 0..5 {
        logs.wait_for("every node at the last round", WAIT, reached(i, 4));
    }
    stop_and_check(&c, &mut children, 4);
}

#[test]
fn a_merger_killed_while_merging_is_replaced_and_no_delta_is_applied_twice() {
    let c = Consortium::new(Setup {
        nodes: 3,
        min_peers: 2,
        collect: "10s",
        merge: "3s",
        rounds: 3,
        training_delay: "100ms",
        merge_delay: "1500ms",
        ..Setup::default()
    });
    let (tx, mut logs) = Logs::new();
    let mut children: Vec<Child> = (0..3).map(|i| c.spawn(i, &tx)).collect();
    let merging = logs.wait_for("a merger in round 2", WAIT, |e| {
        e.message == "merging as the round's merger" && e.round() == Some(2)
    });
    let m = merging.node;
    children[m].kill().expect("SIGKILL");
    children[m].wait().expect("reaped");
    // Another member merges round 2 within the protocol's deadlines: the next
    // candidate (attempt >= 1) when the dead merger's delta had spread, or the first
    // candidate among the remaining contributors when it had not.
    let deadline = Duration::from_secs(10 + 2 * 3 + 20);
    let replacement = logs.wait_for("a replacement merger", deadline, |e| {
        e.node != m && e.message == "merging as the round's merger" && e.round() == Some(2)
    });
    assert_ne!(replacement.node, m);
    for i in (0..3).filter(|i| *i != m) {
        logs.wait_for("round 2 after the merger died", WAIT, reached(i, 2));
    }
    children[m] = c.spawn(m, &tx);
    for i in 0..3 {
        logs.wait_for("every node at the last round", WAIT, reached(i, 3));
    }
    stop_and_check(&c, &mut children, 3);
}
