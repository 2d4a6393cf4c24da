//! The round protocol against a lying member, end to end: real libp2p on loopback, real
//! sled stores, an in-process honest node and a forger on a raw network handle.

use std::time::Duration;

use cellswarm_aggregator::Merger;
use cellswarm_common::envelope::{PayloadKind, seal};
use cellswarm_common::identity::Identity;
use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId};
use cellswarm_common::weights::Weights;
use cellswarm_common::wire::{
    Announcement, Contribution, MergeRecord, Request, ResponseHeader, encode_control,
};
use cellswarm_node::swarm::codec::SyncResponse;
use cellswarm_node::swarm::engine::merger_order;
use cellswarm_node::swarm::local::{LocalTrainer, VectorTrainer};
use cellswarm_node::swarm::network::NetEvent;
use tokio::sync::mpsc;

use crate::swarm_util::{
    Consortium, Setup, raw_member, runtime, stop_all, wait_all_agree, wait_status,
};

const LONG: Duration = Duration::from_secs(120);

/// What the forger saw an honest node ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    Latest,
    Record(RoundId),
    Delta(DeltaHash),
    Model,
}

/// A member that claims to be five rounds ahead and (if `serve_chain`) serves a chain of
/// records it signed
/// alone: each names the forger and `victim` as contributors (with deltas nobody has),
/// is signed by whichever candidate the forger is, links correctly, and ends at a model
/// of the forger's choosing, which it serves with a valid aggregator state. The chain
/// passes every check catch-up made before issue 15's rulebook.
async fn forger(
    c: &Consortium,
    me: usize,
    victim: usize,
    asked: mpsc::UnboundedSender<Asked>,
    cancel: tokio_util::sync::CancellationToken,
    serve_chain: bool,
) -> ModelHash {
    let config = c.sites[me].config();
    let id: Identity = c.sites[me].identity();
    let params = c.setup.params as usize;
    let (net, mut events, el) = raw_member(&config, &id, cancel.clone()).await;
    // The model it wants everyone to adopt, and a valid state to go with it.
    let genesis = VectorTrainer::new(params, 0, Duration::ZERO).genesis(0);
    let chosen = Weights::from_flat(
        std::sync::Arc::clone(genesis.layout()),
        vec![42.0; genesis.values().len()],
    )
    .expect("a model");
    let chosen_bytes = chosen.to_bytes();
    let chosen_hash = ModelHash::of(&chosen_bytes);
    let merger = Merger::from_config(&config.consortium.aggregation).expect("a merger");
    let state = merger.save_state(genesis.layout());
    let state_hash = ModelHash::of(&state).0;
    let digest = config.consortium.agreement_digest();
    let signers = [
        c.sites[me].identity().signer_key(),
        c.sites[victim].identity().signer_key(),
    ];
    let mut records = Vec::new();
    let (mut base, mut prev) = (c.genesis, None);
    for r in 1..=5u64 {
        let round = RoundId(r);
        let mut contributions: Vec<Contribution> = signers
            .iter()
            .map(|s| Contribution {
                signer: *s,
                delta: DeltaHash::of(&[s.0[0], r as u8, 0xf0]),
                sample_count: 100,
            })
            .collect();
        contributions.sort();
        let order = merger_order(round, contributions.iter().map(|c| c.signer));
        let attempt = order
            .iter()
            .position(|s| *s == signers[0])
            .expect("the forger contributes") as u32;
        let model = if r == 5 {
            chosen_hash
        } else {
            ModelHash::of(&[r as u8, 0xaa])
        };
        let record = MergeRecord {
            consortium: digest,
            round,
            base,
            prev,
            strategy: merger.name().to_owned(),
            contributions,
            model,
            state: state_hash,
            attempt,
        };
        let payload = encode_control(&record).expect("encodes");
        let hash = RecordHash::of(&payload);
        records.push(seal(&id, PayloadKind::MergeRecord, &payload));
        base = model;
        prev = Some(hash);
    }
    let claim = seal(
        &id,
        PayloadKind::Announcement,
        &encode_control(&Announcement::Heartbeat {
            round: RoundId(6),
            model: chosen_hash,
        })
        .expect("encodes"),
    );
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => break,
            ev = events.recv() => match ev { Some(e) => e, None => break },
        };
        match ev {
            NetEvent::Inbound {
                request, channel, ..
            } => {
                let record = |r: u64| match records
                    .get(r.wrapping_sub(1) as usize)
                    .filter(|_| serve_chain)
                {
                    Some(b) => SyncResponse {
                        header: ResponseHeader::Record,
                        body: b.clone().into(),
                    },
                    None => SyncResponse::empty(ResponseHeader::NotFound),
                };
                let resp = match request {
                    Request::Latest => {
                        let _ = asked.send(Asked::Latest);
                        record(5)
                    }
                    Request::Record(r) => {
                        let _ = asked.send(Asked::Record(r));
                        record(r.0)
                    }
                    Request::Model(h) if h == chosen_hash => {
                        let _ = asked.send(Asked::Model);
                        SyncResponse {
                            header: ResponseHeader::Model,
                            body: chosen_bytes.clone().into(),
                        }
                    }
                    Request::State(h) if h == state_hash => SyncResponse {
                        header: ResponseHeader::State,
                        body: state.clone().into(),
                    },
                    Request::Delta(h) => {
                        let _ = asked.send(Asked::Delta(h));
                        SyncResponse::empty(ResponseHeader::NotFound)
                    }
                    _ => SyncResponse::empty(ResponseHeader::NotFound),
                };
                net.respond(channel, resp).await;
            }
            NetEvent::Gossip { source, id, .. } => {
                net.validate(id, source, libp2p::gossipsub::MessageAcceptance::Accept)
                    .await;
                // Every message from an honest node is answered with the claim.
                let _ = net.publish(claim.clone()).await;
            }
            _ => {}
        }
    }
    drop(net);
    let _ = el.await;
    chosen_hash
}

/// Hole 1 of issue 15: catch-up adopted any chain a single member signed, as long as the
/// hashes linked and the model matched the last record. Now every record must pass the
/// live rules and its merge must recompute from deltas its contributors signed: the
/// forged chain is looked at (the forger is asked for the deltas it named) and refused,
/// and the honest members go on to finish their rounds with a model of their own.
#[test]
fn a_chain_signed_by_one_member_alone_is_not_adopted() {
    let c = Consortium::new(Setup {
        nodes: 3,
        min_peers: 2,
        collect: "3s",
        merge: "3s",
        rounds: 2,
        ..Setup::default()
    });
    runtime().block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        let (tx, mut asked) = mpsc::unbounded_channel();
        let a = c.start(0, None).await;
        let forged = {
            let cancel = cancel.clone();
            let c = &c;
            async move { forger(c, 2, 0, tx, cancel, true).await }
        };
        let watch = async {
            // Wait until the honest node has checked the first forged record far enough
            // to look for the deltas it names (the old catch-up never asked for deltas:
            // it fetched the model and adopted it).
            let first = tokio::time::timeout(LONG, async {
                let mut seen = Vec::new();
                while let Some(x) = asked.recv().await {
                    seen.push(x);
                    if matches!(x, Asked::Delta(_)) {
                        return seen;
                    }
                }
                seen
            })
            .await
            .expect("the honest node looks at the forged chain's deltas");
            assert!(first.contains(&Asked::Latest), "{first:?}");
            assert!(first.contains(&Asked::Record(RoundId(1))), "{first:?}");
            assert!(
                !first.contains(&Asked::Model),
                "the forged model was fetched: {first:?}"
            );
            let s = a.status().borrow().clone();
            assert_eq!(
                s.head_round,
                RoundId(0),
                "a forged round was adopted: {s:?}"
            );
            // An honest member joins; the two finish their rounds despite the claims.
            let b = c.start(1, None).await;
            let nodes = vec![a, b];
            let model = wait_all_agree(&nodes, 2, LONG).await;
            while let Ok(x) = asked.try_recv() {
                assert_ne!(x, Asked::Model, "the forged model was fetched");
            }
            cancel.cancel();
            stop_all(nodes).await;
            model
        };
        let (chosen, model) = tokio::join!(forged, watch);
        assert_ne!(model, chosen, "the forger's model was adopted");
    });
    let (head, audit) = c.sites[0].stored();
    assert_eq!(head.expect("a head").round, RoundId(2));
    let forger_key = c.sites[2].identity().signer_key();
    assert!(audit.iter().all(|e| e.signer != forger_key), "{audit:?}");
}

/// Hole 3 of issue 15: a signed heartbeat claiming a round far ahead cancelled training
/// and started a catch-up before any newer record was verified, so one member repeating
/// the claim stalled everyone. Now training goes on; only checked records move a node.
#[test]
fn a_far_ahead_claim_without_records_cancels_no_training() {
    let c = Consortium::new(Setup {
        nodes: 3,
        min_peers: 2,
        collect: "3s",
        merge: "3s",
        rounds: 2,
        // Training takes long enough that a claim answered to every gossip message
        // would cancel it every time.
        training_delay: "1500ms",
        ..Setup::default()
    });
    runtime().block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        let (tx, mut asked) = mpsc::unbounded_channel();
        let forged = {
            let cancel = cancel.clone();
            let c = &c;
            async move { forger(c, 2, 0, tx, cancel, false).await }
        };
        let watch = async {
            let nodes = vec![c.start(0, None).await, c.start(1, None).await];
            let model = wait_all_agree(&nodes, 2, LONG).await;
            let mut latest = 0;
            while let Ok(x) = asked.try_recv() {
                latest += usize::from(x == Asked::Latest);
            }
            assert!(latest >= 1, "the claim was never looked at");
            cancel.cancel();
            stop_all(nodes).await;
            model
        };
        let (_, model) = tokio::join!(forged, watch);
        assert_ne!(model, c.genesis);
    });
}

/// A node that lost its store (and its own deltas with it) catches up after a member
/// that contributed to the early rounds left for good: those rounds cannot be
/// recomputed by anyone, so they are adopted on their commit certificates (the
/// attestations the members signed when they committed them, kept by the others).
#[test]
fn a_node_that_lost_its_store_catches_up_on_commit_certificates_after_a_member_left() {
    let c = Consortium::new(Setup {
        nodes: 3,
        min_peers: 2,
        collect: "3s",
        merge: "3s",
        rounds: 4,
        ..Setup::default()
    });
    runtime().block_on(async {
        let mut nodes = c.start_all().await;
        // The third member leaves after round 2, taking its deltas with it.
        wait_status(&nodes[2], "round 2 at the member that leaves", LONG, |s| {
            s.head_round.0 >= 2
        })
        .await;
        let leaver = nodes.pop().expect("three nodes");
        stop_all(vec![leaver]).await;
        let model = wait_all_agree(&nodes, 4, LONG).await;
        // The first member loses its store.
        let b = nodes.pop().expect("two nodes");
        let a = nodes.pop().expect("one node");
        stop_all(vec![a]).await;
        std::fs::remove_dir_all(&c.sites[0].store).expect("the store is removed");
        let a = c.start(0, None).await;
        let s = wait_status(&a, "the node that lost its store catching up", LONG, |s| {
            s.head_round.0 >= 4
        })
        .await;
        assert_eq!(s.model, Some(model), "{s:?}");
        stop_all(vec![a, b]).await;
    });
    let (head, audit) = c.sites[0].stored();
    assert_eq!(head.expect("a head").round, RoundId(4));
    // The rounds the leaver contributed to are in the rebuilt audit log.
    let leaver = c.sites[2].identity().signer_key();
    assert!(
        audit.iter().any(|e| e.signer == leaver && e.round.0 <= 2),
        "{audit:?}"
    );
}
