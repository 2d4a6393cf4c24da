//! Secure aggregation end to end: members agree pairwise keys (X25519 through ring, each
//! key share signed by the member), send masked deltas, and merge only their sum; every
//! member still recomputes the merge. Checked here: the merged model is bit for bit what
//! the same updates give without masks; a masked delta as sent is uncorrelated with the
//! true delta; a member that drops out after its keys went out makes the round restart
//! its masking without it; robust strategies are refused together with masking.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cellswarm_aggregator::masking;
use cellswarm_aggregator::{Merger, Update};
use cellswarm_common::config::Config;
use cellswarm_common::envelope::{AnySigner, PayloadKind, UnverifiedEnvelope};
use cellswarm_common::ids::{DeltaHash, RoundId, SignerKey};
use cellswarm_common::weights::Weights;
use cellswarm_common::wire::{MergeRecord, decode_control};
use cellswarm_node::store::{DiskStore, Store};
use cellswarm_node::swarm::local::{LocalTrainer, VectorTrainer, vector_layout};
use cellswarm_node::swarm::secagg;

use crate::swarm_util::{
    Consortium, Setup, runtime, stop_all, wait_all_agree, wait_done, wait_status,
};

const PARAMS: usize = 4000;
const LONG: Duration = Duration::from_secs(120);

fn secure(nodes: usize, min_peers: u32, rounds: u64, collect: &'static str) -> Setup {
    Setup {
        nodes,
        params: PARAMS as u32,
        strategy: "fedavg-unweighted",
        aggregation: "secure_aggregation = true\nclip_norm = 100.0",
        min_peers,
        rounds,
        collect,
        ..Setup::default()
    }
}

/// The model after `rounds` rounds in which the members with these trainer seeds each
/// move the model half-way to their target, merged WITHOUT masks: their fixed-point
/// encodings summed plainly, the mean decoded, and merged by the same merger.
fn unmasked_model(c: &Consortium, per_round: &[Vec<u64>]) -> Weights {
    let config = c.sites[0].config();
    let agg = &config.consortium.aggregation;
    let fp = secagg::fixed_point(agg, c.sites.len()).expect("a fixed-point encoding");
    let layout = vector_layout(PARAMS);
    let mut base = Weights::zeros(Arc::clone(&layout));
    let mut merger = Merger::from_config(agg).expect("a merger");
    for (r, seeds) in per_round.iter().enumerate() {
        let round = RoundId(r as u64 + 1);
        let encoded: Vec<Vec<u32>> = seeds
            .iter()
            .map(|&seed| {
                let mut t = VectorTrainer::new(PARAMS, seed, Duration::ZERO);
                let trained = t
                    .train_round(&base, round, &std::sync::atomic::AtomicBool::new(false))
                    .expect("trains");
                let delta = cellswarm_common::delta::Delta::between(&base, &trained.weights)
                    .expect("a delta");
                fp.encode(delta.values())
            })
            .collect();
        let refs: Vec<&[u32]> = encoded.iter().map(Vec::as_slice).collect();
        let plain_sum = masking::sum(&refs).expect("sums");
        // Decoded as secagg::masked_mean does: the sum, then the mean over k members.
        let k = seeds.len() as f64;
        let mean: Vec<f32> = plain_sum
            .iter()
            .map(|q| (f64::from(q.cast_signed()) / fp.scale() / k) as f32)
            .collect();
        let delta =
            cellswarm_common::delta::Delta::from_flat(Arc::clone(&layout), mean).expect("a delta");
        let update = Update::new(
            SignerKey([0; 32]),
            DeltaHash([0; 32]),
            base.hash(),
            1,
            delta,
        );
        let merged = merger
            .merge(&base, base.hash(), &[update], round)
            .expect("merges");
        merger.commit(merged.outcome.next_state.clone());
        base = merged.weights;
    }
    base
}

fn record(c: &Consortium, i: usize, round: u64) -> MergeRecord {
    let store = DiskStore::open(&c.sites[i].store, 1 << 20).expect("the store opens");
    let env = store
        .record(RoundId(round))
        .expect("reads")
        .expect("a record");
    let v = UnverifiedEnvelope::parse(env, 1 << 20)
        .and_then(|u| u.verify(PayloadKind::MergeRecord, &AnySigner))
        .expect("a signed record");
    decode_control(v.payload()).expect("a record")
}

#[test]
fn masked_merges_equal_the_unmasked_sum_and_a_masked_delta_reveals_nothing() {
    let rounds = 3;
    let c = Consortium::new(secure(3, 3, rounds, "20s"));
    runtime().block_on(async {
        let nodes = c.start_all().await;
        wait_all_agree(&nodes, rounds, LONG).await;
        stop_all(nodes).await;
    });
    // Identical with and without masking.
    let (r, model) = c.sites[0].head_model();
    assert_eq!(r, RoundId(rounds));
    let all: Vec<u64> = vec![1, 2, 3];
    let expected = unmasked_model(&c, &vec![all; rounds as usize]);
    assert_eq!(
        model.hash(),
        expected.hash(),
        "masking changed the merged model"
    );
    assert_eq!(record(&c, 1, 1).contributions.len(), 3);

    // The masked delta site 0 sent in round 1, against its true delta (0.5 * target):
    // uncorrelated, and spread over the whole 32-bit range.
    let (_, header, body) = c.sites[0].own_delta(1);
    assert!(header.masked);
    let words = secagg::words_from_bytes(&body, PARAMS).expect("masked words");
    let masked: Vec<f64> = words.iter().map(|w| f64::from(w.cast_signed())).collect();
    let truth: Vec<f64> = VectorTrainer::new(PARAMS, 1, Duration::ZERO)
        .target()
        .iter()
        .map(|t| 0.5 * f64::from(*t))
        .collect();
    let corr = pearson(&masked, &truth);
    assert!(
        corr.abs() < 0.06,
        "masked and true delta correlate: r = {corr}"
    );
    let std = {
        let m = masked.iter().sum::<f64>() / masked.len() as f64;
        (masked.iter().map(|x| (x - m).powi(2)).sum::<f64>() / masked.len() as f64).sqrt()
    };
    let uniform = 2f64.powi(32) / 12f64.sqrt();
    assert!(
        (std / uniform - 1.0).abs() < 0.1,
        "masked words std {std}, uniform {uniform}"
    );
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn a_member_that_drops_out_after_its_keys_went_out_makes_the_round_restart_without_it() {
    let c = Consortium::new(secure(3, 2, 2, "3s"));
    runtime().block_on(async {
        let n0 = c.start(0, None).await;
        let n1 = c.start(1, None).await;
        // Member 2 publishes its keys at the start of round 1, then trains slowly.
        let slow = Box::new(VectorTrainer::new(PARAMS, 3, Duration::from_secs(60)));
        let n2 = c.start(2, Some(slow)).await;
        // Members 0 and 1 have masked against member 2's keys and exchanged their
        // masked deltas: now member 2 drops out.
        for n in [&n0, &n1] {
            wait_status(n, "both fast members' masked deltas", LONG, |s| {
                s.round == RoundId(1) && s.deltas >= 2
            })
            .await;
        }
        n2.shutdown();
        n2.wait().await.expect("a clean stop");
        let h0 = wait_done(&n0, 2, LONG).await;
        let h1 = wait_done(&n1, 2, LONG).await;
        assert_eq!(h0, h1);
        for n in [&n0, &n1] {
            n.shutdown();
        }
        n0.wait().await.expect("a clean stop");
        n1.wait().await.expect("a clean stop");
    });
    // Round 1 was merged from members 0 and 1 only, after a fresh masking among them
    // (their epoch-0 deltas were masked against member 2 as well and never unmasked).
    let rec = record(&c, 0, 1);
    let signers: BTreeSet<SignerKey> = rec.contributions.iter().map(|x| x.signer).collect();
    let expected: BTreeSet<SignerKey> =
        (0..2).map(|i| c.sites[i].identity().signer_key()).collect();
    assert_eq!(signers, expected);
    let (r, model) = c.sites[0].head_model();
    assert_eq!(r, RoundId(2));
    let pair = vec![1u64, 2];
    let expected = unmasked_model(&c, &[pair.clone(), pair]);
    assert_eq!(
        model.hash(),
        expected.hash(),
        "the restarted rounds merged something else"
    );
}

#[test]
fn a_member_that_drops_out_after_its_delta_was_sealed_is_completed_from_seed_shares() {
    // Four members: any 3 shares rebuild a seed (more than half of members + 1).
    assert_eq!(secagg::share_threshold(4), 3);
    let rounds = 2;
    let c = Consortium::new(secure(4, 4, rounds, "20s"));
    // Member 3 masks and delivers, then never answers the seal (it dropped out at that
    // moment): before, the epoch restarted without it, and its answer arriving late could
    // expose its update; now the others rebuild its self-mask seed from their shares.
    c.append_site(3, "withhold_answer = true\n");
    runtime().block_on(async {
        let nodes = c.start_all().await;
        wait_all_agree(&nodes, rounds, LONG).await;
        // Each of the three answering members rebuilt member 3's seed in each round.
        for n in &nodes[..3] {
            let rebuilt = n.status().borrow().seeds_rebuilt;
            assert_eq!(rebuilt, rounds, "seeds rebuilt");
        }
        stop_all(nodes).await;
    });
    // Every round merged all four updates in the first epoch (no restart), and the model
    // is bit for bit the unmasked mean of all four.
    for round in 1..=rounds {
        let rec = record(&c, 0, round);
        assert_eq!(rec.contributions.len(), 4, "round {round}");
    }
    let all = vec![1u64, 2, 3, 4];
    let expected = unmasked_model(&c, &[all.clone(), all]);
    let (r, model) = c.sites[1].head_model();
    assert_eq!(r, RoundId(rounds));
    assert_eq!(model.hash(), expected.hash(), "merged something else");
}

#[test]
fn a_member_restarted_after_its_delta_was_sealed_answers_with_its_stored_seed() {
    // Three members: t = 3, so a missing answer cannot be rebuilt from shares; the sealed
    // epoch waits (it is never restarted) until member 2, restarted, answers with the
    // seed it stored beside its masked delta.
    let c = Consortium::new(secure(3, 3, 1, "20s"));
    let file = c.sites[2].node_file.clone();
    let plain = std::fs::read_to_string(&file).expect("reads");
    c.append_site(2, "withhold_answer = true\n");
    runtime().block_on(async {
        let n0 = c.start(0, None).await;
        let n1 = c.start(1, None).await;
        let n2 = c.start(2, None).await;
        for n in [&n0, &n1] {
            wait_status(n, "all three masked deltas", LONG, |s| {
                s.round == RoundId(1) && s.deltas >= 3
            })
            .await;
        }
        n2.shutdown();
        n2.wait().await.expect("a clean stop");
        std::fs::write(&file, &plain).expect("writes");
        let nodes = vec![n0, n1, c.start(2, None).await];
        wait_all_agree(&nodes, 1, LONG).await;
        stop_all(nodes).await;
    });
    assert_eq!(record(&c, 0, 1).contributions.len(), 3);
    let (_, model) = c.sites[0].head_model();
    assert_eq!(model.hash(), unmasked_model(&c, &[vec![1, 2, 3]]).hash());
}

#[test]
fn a_seal_racing_a_restart_is_answered_by_the_members_that_restarted() {
    // Four members. Member 3's delta reaches members 1 and 3 only: members 0 and 2 time
    // out and restart the masking without it, while members 1 and 3, whose view is
    // complete, seal the first epoch a few seconds later. Members 0 and 2 have answered
    // nothing, so they answer the sealed epoch they left; it completes with all four
    // updates, and 0 and 2 catch up from the record.
    let c = Consortium::new(Setup {
        merge: "2s",
        ..secure(4, 3, 1, "2s")
    });
    let d = c.sites[3].identity().peer_id().to_string();
    for (i, extra) in [
        (0, format!("ignore_deltas_from = [\"{d}\"]\n")),
        (2, format!("ignore_deltas_from = [\"{d}\"]\n")),
        (1, "seal_delay = \"6s\"\n".to_owned()),
        (3, "seal_delay = \"6s\"\n".to_owned()),
    ] {
        c.append_site(i, &extra);
    }
    runtime().block_on(async {
        let nodes = c.start_all().await;
        wait_all_agree(&nodes, 1, LONG).await;
        stop_all(nodes).await;
    });
    assert_eq!(record(&c, 1, 1).contributions.len(), 4);
    let (_, model) = c.sites[0].head_model();
    assert_eq!(model.hash(), unmasked_model(&c, &[vec![1, 2, 3, 4]]).hash());
}

#[test]
fn robust_strategies_are_refused_with_secure_aggregation() {
    for strategy in ["median", "krum", "trimmed-mean"] {
        let c = Consortium::new(Setup {
            nodes: 5,
            min_peers: 5,
            strategy,
            aggregation: "secure_aggregation = true\nclip_norm = 10.0",
            ..Setup::default()
        });
        let err = Config::load(&c.sites[0].node_file).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("secure_aggregation"), "{msg}");
        assert!(msg.contains("must see each update"), "{msg}");
    }
    // Without a clip norm masked updates would be unbounded: refused too.
    let c = Consortium::new(Setup {
        strategy: "fedavg-unweighted",
        aggregation: "secure_aggregation = true",
        ..Setup::default()
    });
    let msg = Config::load(&c.sites[0].node_file)
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("clip_norm"), "{msg}");
}
