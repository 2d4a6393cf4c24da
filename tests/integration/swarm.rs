//! The swarm, in process: real libp2p swarms on loopback, real sled stores, the
//! `test-vector` model. Waits are on status changes, bounded by timeouts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use cellswarm_common::delta::{Delta, DeltaEncoding};
use cellswarm_common::envelope::{MemberKeys, PayloadKind, UnverifiedEnvelope, seal};
use cellswarm_common::identity::Identity;
use cellswarm_common::ids::{DeltaHash, ModelHash, RoundId, SignerKey};
use cellswarm_common::weights::Weights;
use cellswarm_common::wire::{
    Announcement, DeltaHeader, LocalMetrics, Request, ResponseHeader, decode_control,
    encode_control, encode_frame,
};
use cellswarm_node::daemon::Node;
use cellswarm_node::swarm::codec::SyncResponse;
use cellswarm_node::swarm::local::{LocalTrainer, RoundError, TrainedRound, VectorTrainer};
use cellswarm_node::swarm::network::{self, NetEvent, NetSettings};
use cellswarm_node::swarm::status::RejectReason;

use crate::swarm_util::{
    Consortium, Setup, raw_member, runtime, stop_all, wait_all_agree, wait_done, wait_status,
};

const LONG: Duration = Duration::from_secs(120);

/// The FedAvg of `test-vector` updates, recomputed from the audit log of site 0's store:
/// each round every contributor i moves the model half-way to its target t_i, and the
/// merge is the sample-weighted mean (counts clipped at their median).
fn expected_fedavg(c: &Consortium) -> Vec<f64> {
    let (head, audit) = c.sites[0].stored();
    let head = head.expect("a head");
    let params = c.setup.params as usize;
    let by_signer: HashMap<SignerKey, VectorTrainer> = c
        .sites
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                s.identity().signer_key(),
                VectorTrainer::new(params, i as u64 + 1, Duration::ZERO),
            )
        })
        .collect();
    let mut w = vec![0f64; params];
    for r in 1..=head.round.0 {
        let contributors: Vec<_> = audit.iter().filter(|a| a.round.0 == r).collect();
        assert!(!contributors.is_empty(), "round {r} has contributors");
        // FedAvg weighs declared counts clipped at their lower median.
        let mut sorted: Vec<u64> = contributors.iter().map(|a| a.sample_count).collect();
        sorted.sort_unstable();
        let cap = sorted[(sorted.len() - 1) / 2];
        let count = |a: &&cellswarm_common::records::AuditEntry| a.sample_count.min(cap) as f64;
        let total: f64 = contributors.iter().map(count).sum();
        let mut next = vec![0f64; params];
        for a in &contributors {
            let t = by_signer[&a.signer].target();
            for (j, n) in next.iter_mut().enumerate() {
                let trained = w[j] + 0.5 * (f64::from(t[j]) - w[j]);
                *n += count(a) / total * trained;
            }
        }
        w = next;
    }
    w
}

#[test]
fn three_nodes_converge_to_bit_identical_models_over_five_rounds() {
    let c = Consortium::new(Setup::default());
    runtime().block_on(async {
        let nodes = c.start_all().await;
        let hash = wait_all_agree(&nodes, 5, LONG).await;
        assert_ne!(hash, c.genesis, "the model moved");
        let accepted: u64 = nodes
            .iter()
            .map(|n| {
                n.metrics()
                    .deltas_accepted
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        assert!(accepted >= 5 * 2 * 2, "accepted {accepted} deltas");
        stop_all(nodes).await;
    });
    // Every store holds the same head; the merged values are the FedAvg of the
    // contributions the audit log names (recomputed here in f64).
    let (r0, w0) = c.sites[0].head_model();
    assert_eq!(r0, RoundId(5));
    for i in 1..3 {
        let (r, w) = c.sites[i].head_model();
        assert_eq!((r, w.hash()), (r0, w0.hash()));
    }
    let expected = expected_fedavg(&c);
    let worst = w0
        .values()
        .iter()
        .zip(&expected)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "merged model differs from FedAvg by {worst}");
    let (_, audit) = c.sites[1].stored();
    let distinct: HashSet<DeltaHash> = audit.iter().map(|a| a.delta).collect();
    assert_eq!(distinct.len(), audit.len(), "a delta was merged twice");
}

/// Honest training, then the delta scaled by `factor` (a malicious member).
struct Scaled {
    inner: VectorTrainer,
    factor: f32,
}

impl LocalTrainer for Scaled {
    fn genesis(&mut self, seed: u64) -> Weights {
        self.inner.genesis(seed)
    }

    fn train_round(
        &mut self,
        base: &Weights,
        round: RoundId,
        cancel: &AtomicBool,
    ) -> Result<TrainedRound, RoundError> {
        let mut t = self.inner.train_round(base, round, cancel)?;
        let values = base
            .values()
            .iter()
            .zip(t.weights.values())
            .map(|(b, w)| b + self.factor * (w - b))
            .collect();
        t.weights = Weights::from_flat(Arc::clone(base.layout()), values)
            .map_err(|e| RoundError::Failed(Box::new(e)))?;
        Ok(t)
    }

    fn evaluate(&mut self, _model: &Weights) -> Option<f32> {
        None
    }
}

/// RMS distance of the final model from the honest sites' sample-weighted mean target
/// (where FedAvg over honest members converges).
async fn run_with_attacker(strategy: &'static str, aggregation: &'static str) -> f64 {
    let setup = Setup {
        nodes: 5,
        strategy,
        aggregation,
        min_peers: 5,
        rounds: 4,
        ..Setup::default()
    };
    let c = Consortium::new(setup);
    let params = c.setup.params as usize;
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(c.start(i, None).await);
    }
    let attacker = Scaled {
        inner: VectorTrainer::new(params, 5, Duration::ZERO),
        factor: 100.0,
    };
    nodes.push(c.start(4, Some(Box::new(attacker))).await);
    let mut hashes = Vec::new();
    for n in &nodes {
        hashes.push(wait_done(n, 4, LONG).await);
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
    stop_all(nodes).await;
    let (_, w) = c.sites[0].head_model();
    let mut target = vec![0f64; params];
    let mut total = 0.0;
    for seed in 1..=4u64 {
        let n = (100 + seed % 100) as f64;
        total += n;
        let t = VectorTrainer::new(params, seed, Duration::ZERO);
        for (a, b) in target.iter_mut().zip(&t.target()) {
            *a += n * f64::from(*b);
        }
    }
    let ss: f64 = w
        .values()
        .iter()
        .zip(&target)
        .map(|(a, b)| (f64::from(*a) - b / total).powi(2))
        .sum();
    (ss / params as f64).sqrt()
}

#[test]
fn scaled_deltas_are_contained_by_robust_strategies_and_damage_fedavg() {
    let rt = runtime();
    // The honest targets are uniform in [-1, 1] (RMS 0.58); their mean has RMS ~0.29.
    let fedavg = rt.block_on(run_with_attacker("fedavg", ""));
    let median = rt.block_on(run_with_attacker("median", ""));
    let trimmed = rt.block_on(run_with_attacker("trimmed-mean", "trim_beta = 0.2"));
    eprintln!(
        "RMS distance from the honest mean: fedavg {fedavg:.3}, median {median:.3}, trimmed {trimmed:.3}"
    );
    assert!(
        fedavg > 5.0,
        "FedAvg should be visibly damaged, RMS {fedavg}"
    );
    assert!(median < 0.5, "median RMS distance {median}");
    assert!(trimmed < 0.5, "trimmed mean RMS distance {trimmed}");
}

/// An adversarial member on a raw network handle: it announces a tampered delta, a delta
/// for the wrong round, and (from round 2) a replay of an honest member's earlier delta.
async fn adversary(
    config: cellswarm_common::config::Config,
    id: Identity,
    params: usize,
    cancel: tokio_util::sync::CancellationToken,
) {
    let keys = MemberKeys::new(config.consortium.members.iter().map(|m| {
        cellswarm_common::identity::signer_key_from_peer_id(&m.peer_id).expect("ed25519")
    }));
    let (net, mut events, el) = raw_member(&config, &id, cancel.clone()).await;
    let digest = config.consortium.agreement_digest();
    let mut served: HashMap<DeltaHash, Vec<u8>> = HashMap::new();
    let mut honest: BTreeMap<RoundId, Vec<(DeltaHash, libp2p::PeerId)>> = BTreeMap::new();
    let mut done_rounds = HashSet::new();
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => break,
            ev = events.recv() => match ev { Some(e) => e, None => break },
        };
        match ev {
            NetEvent::Inbound {
                request, channel, ..
            } => {
                let resp = match request {
                    Request::Delta(h) => match served.get(&h) {
                        Some(b) => SyncResponse {
                            header: ResponseHeader::Delta,
                            body: b.clone().into(),
                        },
                        None => SyncResponse::empty(ResponseHeader::NotFound),
                    },
                    _ => SyncResponse::empty(ResponseHeader::NotFound),
                };
                net.respond(channel, resp).await;
            }
            NetEvent::Gossip {
                source,
                id: msg_id,
                data,
            } => {
                net.validate(msg_id, source, libp2p::gossipsub::MessageAcceptance::Accept)
                    .await;
                let Ok(v) = UnverifiedEnvelope::parse(data, 1 << 16)
                    .and_then(|e| e.verify(PayloadKind::Announcement, &keys))
                else {
                    continue;
                };
                let Ok(a) = decode_control::<Announcement>(v.payload()) else {
                    continue;
                };
                match a {
                    Announcement::DeltaReady { round, delta, .. } => {
                        honest.entry(round).or_default().push((delta, source));
                    }
                    Announcement::Heartbeat { round, model } if done_rounds.insert(round) => {
                        // Deltas built on the real base, but broken in three ways.
                        let base = VectorTrainer::new(params, 0, Duration::ZERO).genesis(0);
                        let mut t = VectorTrainer::new(params, 99, Duration::ZERO);
                        let trained = t
                            .train_round(&base, round, &AtomicBool::new(false))
                            .expect("trains");
                        let delta = Delta::between(&base, &trained.weights).expect("a delta");
                        let body = delta.encode(DeltaEncoding::F32).expect("encodes");
                        let header = |r: RoundId| DeltaHeader {
                            consortium: digest,
                            round: r,
                            base: model,
                            sample_count: 100,
                            metrics: LocalMetrics::default(),
                            masked: false,
                            mask_epoch: 0,
                        };
                        let mut out = Vec::new();
                        // 1. Tampered after signing: one payload byte flipped.
                        let payload = encode_frame(&header(round), &body).expect("frame");
                        let mut env = seal(&id, PayloadKind::Delta, &payload);
                        let n = env.len();
                        env[n - 10] ^= 0x55;
                        out.push((DeltaHash::of(&payload), env));
                        // 2. Signed correctly, for another round.
                        let payload = encode_frame(&header(round.next()), &body).expect("frame");
                        out.push((
                            DeltaHash::of(&payload),
                            seal(&id, PayloadKind::Delta, &payload),
                        ));
                        // 3. A replay of an honest delta merged in an earlier round.
                        if let Some((h, peer)) = round
                            .0
                            .checked_sub(1)
                            .and_then(|p| honest.get(&RoundId(p)))
                            .and_then(|v| v.first().copied())
                            && let Ok(r) = net.request(peer, Request::Delta(h)).await
                            && r.header == ResponseHeader::Delta
                        {
                            out.push((h, r.body.into()));
                        }
                        for (h, env) in out {
                            served.insert(h, env);
                            let a = Announcement::DeltaReady {
                                round,
                                base: model,
                                delta: h,
                                bytes: 0,
                            };
                            let payload = encode_control(&a).expect("encodes");
                            let _ = net
                                .publish(seal(&id, PayloadKind::Announcement, &payload))
                                .await;
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    drop(net);
    let _ = el.await;
}

#[test]
fn bad_members_and_non_members_are_refused_without_stalling_the_round() {
    // Three honest members and one adversarial member; a non-member knocks too.
    let setup = Setup {
        nodes: 4,
        min_peers: 2,
        collect: "3s",
        merge: "3s",
        rounds: 3,
        ..Setup::default()
    };
    let c = Consortium::new(setup);
    runtime().block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut nodes = Vec::new();
        for i in 0..3 {
            nodes.push(c.start(i, None).await);
        }
        let adv = tokio::spawn(adversary(
            c.sites[3].config(),
            c.sites[3].identity(),
            c.setup.params as usize,
            cancel.clone(),
        ));

        // A non-member with a valid key: refused at connection, never served.
        let outsider = Identity::from_seed([200; 32]).expect("a key");
        let config = c.sites[0].config();
        let (onet, _oev, oloop) = network::start(outsider.libp2p_keypair(), &{
            let mut settings = NetSettings::of(&config);
            settings.net.listen.clear();
            settings
        })
        .expect("the outsider's network starts");
        let oc = cancel.clone();
        let ol = tokio::spawn(oloop.run(oc));
        for a in &config.consortium.members[0].addresses {
            onet.dial(a.clone()).await;
        }
        let answer = onet
            .request(nodes[0].peer_id(), Request::Model(c.genesis))
            .await;
        assert!(
            !matches!(&answer, Ok(r) if r.header == ResponseHeader::Model),
            "a non-member was served: {answer:?}"
        );

        let mut hashes = Vec::new();
        for n in &nodes {
            hashes.push(wait_done(n, 3, LONG).await);
        }
        assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
        for n in &nodes {
            let s = n.status().borrow().clone();
            assert!(
                !s.connected.contains(&outsider.peer_id().to_string()),
                "the outsider got connected"
            );
        }
        let mut rejected: BTreeMap<RejectReason, u64> = BTreeMap::new();
        for n in &nodes {
            for (k, v) in n.metrics().rejections() {
                *rejected.entry(k).or_default() += v;
            }
        }
        eprintln!("rejections on the honest members: {rejected:?}");
        for reason in [
            RejectReason::BadSignature,
            RejectReason::WrongRound,
            RejectReason::Replayed,
        ] {
            assert!(
                rejected.get(&reason).copied().unwrap_or(0) >= 1,
                "no {reason:?} rejection: {rejected:?}"
            );
        }
        // Every merged round contains only honest deltas.
        let adversary_key = c.sites[3].identity().signer_key();
        let s = nodes[0].status().borrow().clone();
        let record = s.last_record.expect("a record");
        assert!(
            record
                .contributions
                .iter()
                .all(|c| c.signer != adversary_key)
        );
        cancel.cancel();
        let _ = adv.await;
        drop(onet);
        let _ = ol.await;
        stop_all(nodes).await;
    });
    let (_, audit) = c.sites[0].stored();
    let adversary_key = c.sites[3].identity().signer_key();
    assert!(audit.iter().all(|a| a.signer != adversary_key));
}

#[test]
fn a_damaged_model_file_is_repaired_from_peers_and_damaged_metadata_refuses_to_start() {
    let c = Consortium::new(Setup {
        rounds: 2,
        ..Setup::default()
    });
    let rt = runtime();
    let hash: ModelHash = rt.block_on(async {
        let mut nodes = Vec::new();
        for i in 0..3 {
            nodes.push(c.start(i, None).await);
        }
        let mut hashes = Vec::new();
        for n in &nodes {
            hashes.push(wait_done(n, 2, LONG).await);
        }
        assert!(hashes.windows(2).all(|w| w[0] == w[1]));
        stop_all(nodes).await;
        hashes[0]
    });
    // Flip bytes in site 2's head model file.
    let model_file = c.sites[2].store.join("blobs/models").join(hash.to_hex());
    let mut bytes = std::fs::read(&model_file).expect("the model file exists");
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    bytes[n - 1] ^= 0xff;
    std::fs::write(&model_file, bytes).expect("damaged");
    rt.block_on(async {
        let mut nodes = Vec::new();
        for i in 0..3 {
            nodes.push(c.start(i, None).await);
        }
        let s = wait_status(&nodes[2], "the repaired model", LONG, |s| {
            s.model == Some(hash) && s.stopped
        })
        .await;
        assert_eq!(s.head_round, RoundId(2));
        stop_all(nodes).await;
    });
    let repaired = std::fs::read(&model_file).expect("the model file is back");
    assert_eq!(ModelHash::of(&repaired), hash);
    assert!(
        std::fs::read_dir(c.sites[2].store.join("quarantine"))
            .expect("a quarantine folder")
            .count()
            >= 1,
        "the damaged file was kept for inspection"
    );

    // Damaged metadata: the record the head names no longer matches.
    {
        let db = sled::open(c.sites[1].store.join("meta.sled")).expect("the database opens");
        let records = db.open_tree("records").expect("the records tree");
        let mut record = records
            .get(2u64.to_be_bytes())
            .expect("reads")
            .expect("round 2's record")
            .to_vec();
        let n = record.len();
        record[n - 3] ^= 0x01;
        records
            .insert(2u64.to_be_bytes(), record)
            .expect("overwritten");
        db.flush().expect("flushed");
    }
    let config = c.sites[1].config();
    let err = rt
        .block_on(Node::start(
            config,
            c.sites[1].identity(),
            Box::new(VectorTrainer::new(1000, 2, Duration::ZERO)),
        ))
        .expect_err("a damaged store must not start");
    let msg = err.to_string();
    assert!(
        msg.contains("store") && msg.contains(&c.sites[1].store.display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("move it aside"), "{msg}");
}

#[test]
fn merger_order_is_a_deterministic_permutation() {
    use cellswarm_node::swarm::engine::merger_order;
    let keys: Vec<SignerKey> = (1..=6u8)
        .map(|b| Identity::from_seed([b; 32]).expect("key").signer_key())
        .collect();
    let a = merger_order(RoundId(3), keys.clone());
    let mut rev = keys.clone();
    rev.reverse();
    assert_eq!(a, merger_order(RoundId(3), rev));
    let mut sorted = a.clone();
    sorted.sort();
    let mut k = keys.clone();
    k.sort();
    assert_eq!(sorted, k);
    // Different rounds rotate the first candidate among members.
    let firsts: HashSet<SignerKey> = (1..40)
        .map(|r| merger_order(RoundId(r), keys.clone())[0])
        .collect();
    assert!(firsts.len() >= 4, "{}", firsts.len());
}

#[test]
fn the_status_endpoint_serves_json_prometheus_and_the_status_command() {
    let c = Consortium::new(Setup {
        nodes: 2,
        rounds: 2,
        ..Setup::default()
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let file = &c.sites[0].node_file;
    let text = std::fs::read_to_string(file).expect("the site file");
    std::fs::write(
        file,
        text.replace(
            "[status]\nenabled = false",
            &format!("[status]\nenabled = true\nlisten = \"127.0.0.1:{port}\""),
        ),
    )
    .expect("rewritten");
    let endpoint = format!("http://127.0.0.1:{port}");
    runtime().block_on(async {
        let a = c.start(0, None).await;
        let b = c.start(1, None).await;
        let hash = wait_done(&a, 2, LONG).await;
        assert_eq!(wait_done(&b, 2, LONG).await, hash);
        let e = endpoint.clone();
        let (status, metrics) = tokio::task::spawn_blocking(move || {
            (
                cellswarm_node::status_http::fetch(&e, "/status").expect("GET /status"),
                cellswarm_node::status_http::fetch(&e, "/metrics").expect("GET /metrics"),
            )
        })
        .await
        .expect("joined");
        let v: serde_json::Value = serde_json::from_str(&status).expect("JSON");
        assert_eq!(v["peer_id"], a.peer_id().to_string());
        assert_eq!(v["model"], hash.to_hex());
        assert_eq!(v["head_round"], 2);
        assert_eq!(v["last_record"]["round"], 2);
        assert_eq!(v["connected"].as_array().map(Vec::len), Some(1));
        assert!(
            metrics.contains("cellswarm_rounds_completed_total 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("cellswarm_round_duration_seconds_count 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("# TYPE cellswarm_rejected_total counter"),
            "{metrics}"
        );
        let e = endpoint.clone();
        let out = tokio::task::spawn_blocking(move || {
            crate::util::ok_stdout(&crate::util::cellswarm(
                std::path::Path::new("."),
                &["status", "--endpoint", &e],
            ))
        })
        .await
        .expect("joined");
        assert!(out.contains(&a.peer_id().to_string()), "{out}");
        assert!(out.contains(&hash.to_hex()), "{out}");
        assert!(out.contains("1 member(s)"), "{out}");
        stop_all(vec![a, b]).await;
    });
    // Stopped: the port is closed.
    assert!(cellswarm_node::status_http::fetch(&endpoint, "/status").is_err());
}
