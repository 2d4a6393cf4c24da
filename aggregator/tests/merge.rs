//! End-to-end tests of the merge pipeline: determinism, robustness, typed errors,
//! persistent optimiser state, DP noise, and an independent numpy FedAvg.

use std::sync::Arc;

use cellswarm_aggregator::bench::{layout, random_inputs};
use cellswarm_aggregator::dp::GaussianStream;
use cellswarm_aggregator::kernels::CHUNK;
use cellswarm_aggregator::{
    Adaptive, AdaptiveParams, AggregateError, CentralDp, FedAvg, Krum, Median, Merger,
    ServerOptimizer, Strategy, TrimmedMean, Update,
};
use cellswarm_common::config::{AggregationConfig, StrategyKind};
use cellswarm_common::delta::Delta;
use cellswarm_common::ids::{DeltaHash, ModelHash, RoundId, SignerKey};
use cellswarm_common::weights::{Layout, Weights};
use proptest::prelude::*;

fn all_strategies() -> Vec<Merger> {
    let adam = AdaptiveParams {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.99,
        tau: 1e-3,
    };
    let parts: Vec<(Box<dyn Strategy>, ServerOptimizer)> = vec![
        (Box::new(FedAvg::new(true)), ServerOptimizer::Sgd),
        (Box::new(FedAvg::new(false)), ServerOptimizer::Sgd),
        (
            Box::new(FedAvg::new(true)),
            ServerOptimizer::Adaptive(Adaptive::Adam, adam),
        ),
        (
            Box::new(FedAvg::new(true)),
            ServerOptimizer::Adaptive(Adaptive::Yogi, adam),
        ),
        (
            Box::new(FedAvg::new(true)),
            ServerOptimizer::Adaptive(Adaptive::Adagrad, adam),
        ),
        (Box::new(Median), ServerOptimizer::Sgd),
        (
            Box::new(TrimmedMean::new(0.2).unwrap()),
            ServerOptimizer::Sgd,
        ),
        (Box::new(Krum::new(1)), ServerOptimizer::Sgd),
        (Box::new(Krum::multi(1, None)), ServerOptimizer::Sgd),
    ];
    parts
        .into_iter()
        .map(|(s, o)| Merger::new(s, o, Some(0.5), None).unwrap())
        .collect()
}

fn bits(w: &[f32]) -> Vec<u32> {
    w.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// The output bytes do not depend on the order in which updates are passed.
    #[test]
    fn output_ignores_update_order(
        k in 5usize..9,
        p in prop_oneof![1usize..40, (2 * CHUNK - 5)..(2 * CHUNK + 50)],
        seed in 0u64..1000,
        perm_seed in any::<u64>(),
    ) {
        let inputs = random_inputs(k, p, seed);
        let mut shuffled = inputs.updates.clone();
        // A permutation from the seed (Fisher-Yates with a tiny LCG).
        let mut s = perm_seed | 1;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        for m in all_strategies() {
            let a = m.merge(&inputs.base, inputs.base_hash, &inputs.updates, RoundId(3)).unwrap();
            let b = m.merge(&inputs.base, inputs.base_hash, &shuffled, RoundId(3)).unwrap();
            prop_assert_eq!(a.hash, b.hash, "{}", m.name());
            prop_assert_eq!(&a.outcome, &b.outcome);
        }
    }

    /// The output bytes do not depend on the number of threads.
    #[test]
    fn output_ignores_thread_count(
        k in 5usize..8,
        p in prop_oneof![1usize..40, (3 * CHUNK - 5)..(3 * CHUNK + 50)],
        seed in 0u64..1000,
    ) {
        let inputs = random_inputs(k, p, seed);
        let pools: Vec<rayon::ThreadPool> = [1, 2, 3, 5]
            .iter()
            .map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap())
            .collect();
        for m in all_strategies() {
            let outs: Vec<Vec<u32>> = pools
                .iter()
                .map(|pool| pool.install(|| {
                    let merged = m.merge(&inputs.base, inputs.base_hash, &inputs.updates, RoundId(1)).unwrap();
                    bits(merged.weights.values())
                }))
                .collect();
            for o in &outs[1..] {
                prop_assert!(o == &outs[0], "{} differs across thread counts", m.name());
            }
        }
    }
}

// --------------------------------------------------------------------------------------
// Robustness: n = 10 updates, f of them malicious.
// --------------------------------------------------------------------------------------

const N: usize = 10;
const P: usize = 20_000;
/// Robust merges must land within this fraction of the honest mean's norm from it.
const ROBUST_BOUND: f64 = 0.15;

fn gaussian(seed: u8, std: f64) -> Vec<f32> {
    let mut v = vec![0f32; P];
    GaussianStream::new([seed; 32]).for_each(0, P, |i, z| v[i] = (std * z) as f32);
    v
}

fn signer(i: usize) -> SignerKey {
    let mut k = [0u8; 32];
    k[0] = i as u8 + 1;
    SignerKey(k)
}

fn update(base: &Weights, i: usize, values: Vec<f32>) -> Update {
    let d = Delta::from_flat(Arc::clone(base.layout()), values).unwrap();
    Update::new(signer(i), DeltaHash::of(&[i as u8]), base.hash(), 100, d)
}

#[derive(Debug, Clone, Copy)]
enum Attack {
    Scale100,
    SignFlip,
    Noise,
}

/// Honest updates are `mu + N(0, 0.005^2)`; the first `f` are replaced by an attack.
fn scenario(f: usize, attack: Attack) -> (Weights, Vec<Update>, Vec<f32>) {
    let layout = layout(P);
    let base = Weights::zeros(Arc::clone(&layout));
    let mu = gaussian(200, 0.05);
    let honest: Vec<Vec<f32>> = (0..N)
        .map(|i| {
            let noise = gaussian(i as u8, 0.005);
            mu.iter().zip(&noise).map(|(m, e)| m + e).collect()
        })
        .collect();
    let mut honest_mean = vec![0f32; P];
    for h in &honest[f..] {
        for (m, x) in honest_mean.iter_mut().zip(h) {
            *m += x / (N - f) as f32;
        }
    }
    let updates = honest
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let v = if i < f {
                match attack {
                    Attack::Scale100 => h.iter().map(|x| x * 100.0).collect(),
                    Attack::SignFlip => h.iter().map(|x| -x).collect(),
                    Attack::Noise => gaussian(100 + i as u8, 1.0),
                }
            } else {
                h
            };
            update(&base, i, v)
        })
        .collect();
    (base, updates, honest_mean)
}

fn relative_distance(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn robust_merges_contain_malicious_updates_and_fedavg_does_not() {
    for f in 1..=3 {
        for attack in [Attack::Scale100, Attack::SignFlip, Attack::Noise] {
            let (base, updates, honest) = scenario(f, attack);
            let h = base.hash();
            let dist = |s: Box<dyn Strategy>| {
                let m = Merger::new(s, ServerOptimizer::Sgd, None, None).unwrap();
                let merged = m.merge(&base, h, &updates, RoundId(1)).unwrap();
                relative_distance(merged.weights.values(), &honest)
            };
            let fedavg = dist(Box::new(FedAvg::new(true)));
            assert!(
                fedavg > 0.2,
                "f={f} {attack:?}: FedAvg should be visibly damaged, distance {fedavg:.3}"
            );
            let robust: Vec<(&str, Box<dyn Strategy>)> = vec![
                ("median", Box::new(Median)),
                (
                    "trimmed-mean",
                    Box::new(TrimmedMean::new(f as f64 / N as f64).unwrap()),
                ),
                ("krum", Box::new(Krum::new(f))),
                ("multi-krum", Box::new(Krum::multi(f, None))),
            ];
            for (name, s) in robust {
                let d = dist(s);
                assert!(
                    d < ROBUST_BOUND,
                    "f={f} {attack:?}: {name} is {d:.3} from the honest mean (bound {ROBUST_BOUND}); FedAvg {fedavg:.3}"
                );
            }
        }
    }
}

#[test]
fn krum_never_selects_an_attacker() {
    let (base, updates, _) = scenario(3, Attack::Scale100);
    let m = Merger::new(
        Box::new(Krum::multi(3, None)),
        ServerOptimizer::Sgd,
        None,
        None,
    )
    .unwrap();
    let merged = m.merge(&base, base.hash(), &updates, RoundId(1)).unwrap();
    let attackers: Vec<SignerKey> = (0..3).map(signer).collect();
    assert_eq!(merged.outcome.excluded, attackers);
}

#[test]
fn nan_filled_updates_cannot_be_built_or_decoded() {
    let layout = layout(16);
    assert!(Delta::from_flat(Arc::clone(&layout), vec![f32::NAN; 16]).is_err());
    let ok = Delta::from_flat(Arc::clone(&layout), vec![0.5; 16]).unwrap();
    let mut bytes = ok
        .encode(cellswarm_common::delta::DeltaEncoding::F32)
        .unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(Delta::decode(&bytes, &layout, &Default::default()).is_err());
}

// --------------------------------------------------------------------------------------
// Typed errors.
// --------------------------------------------------------------------------------------

#[test]
fn mismatched_inputs_give_typed_errors() {
    let inputs = random_inputs(3, 100, 1);
    let m = Merger::from_config(&AggregationConfig::default()).unwrap();
    let merge = |u: &[Update]| m.merge(&inputs.base, inputs.base_hash, u, RoundId(1));

    assert_eq!(merge(&[]).unwrap_err(), AggregateError::NoUpdates);

    let mut dup = inputs.updates.clone();
    dup[1].signer = dup[0].signer;
    assert!(matches!(
        merge(&dup),
        Err(AggregateError::DuplicateSigner(_))
    ));

    let mut wrong_base = inputs.updates.clone();
    wrong_base[2].base = ModelHash::of(b"another model");
    assert!(matches!(
        merge(&wrong_base),
        Err(AggregateError::BaseMismatch { .. })
    ));

    let other_shape = Arc::new(
        Layout::new(
            inputs
                .base
                .layout()
                .entries()
                .iter()
                .map(|e| (e.name().to_owned(), vec![1, e.len()])),
        )
        .unwrap(),
    );
    let renamed = Arc::new(
        Layout::new(
            inputs
                .base
                .layout()
                .entries()
                .iter()
                .map(|e| (format!("x.{}", e.name()), e.shape().to_vec())),
        )
        .unwrap(),
    );
    for layout in [other_shape, renamed] {
        let mut bad = inputs.updates.clone();
        let values = bad[0].values().to_vec();
        bad[0] = Update::new(
            bad[0].signer,
            bad[0].id,
            bad[0].base,
            1,
            Delta::from_flat(layout, values).unwrap(),
        );
        let err = merge(&bad).unwrap_err();
        assert!(
            matches!(err, AggregateError::LayoutMismatch { .. }),
            "{err}"
        );
    }

    // A member claiming a huge sample count weighs no more than the median member:
    // with the others' counts equal, the merge is the plain mean.
    let mut liar = inputs.updates.clone();
    for u in &mut liar {
        u.sample_count = 100;
    }
    liar[0].sample_count = u64::MAX;
    let plain = Merger::new(
        Box::new(FedAvg::new(false)),
        ServerOptimizer::Sgd,
        None,
        None,
    )
    .unwrap()
    .merge(&inputs.base, inputs.base_hash, &liar, RoundId(1))
    .unwrap();
    let weighted = merge(&liar).unwrap();
    assert!(relative_distance(weighted.weights.values(), plain.weights.values()) < 1e-6);
    assert_eq!(
        cellswarm_aggregator::clipped_counts(&[5, u64::MAX, 7, 6]),
        vec![5, 6, 6, 6]
    );
    assert_eq!(cellswarm_aggregator::clipped_counts(&[9, 3]), vec![3, 3]);
    // Issue 15, hole 4: with `max_samples` no member outweighs the ceiling, even when
    // the liars are the round's majority and the median count is theirs.
    let mut majority = inputs.updates.clone();
    for (i, u) in majority.iter_mut().enumerate() {
        u.sample_count = if i == 0 { 100 } else { u64::MAX };
    }
    let capped = |cap: u64| {
        Merger::new(
            Box::new(FedAvg {
                max_samples: cap,
                ..FedAvg::new(true)
            }),
            ServerOptimizer::Sgd,
            None,
            None,
        )
        .unwrap()
        .merge(&inputs.base, inputs.base_hash, &majority, RoundId(1))
        .unwrap()
    };
    // A ceiling of 100 gives every member the same weight: the plain mean.
    let equal = Merger::new(
        Box::new(FedAvg::new(false)),
        ServerOptimizer::Sgd,
        None,
        None,
    )
    .unwrap()
    .merge(&inputs.base, inputs.base_hash, &majority, RoundId(1))
    .unwrap();
    assert!(relative_distance(capped(100).weights.values(), equal.weights.values()) < 1e-6);
    // Without it, the majority's median count is theirs and member 0 weighs nothing.
    assert!(relative_distance(capped(u64::MAX).weights.values(), equal.weights.values()) > 1e-3);
    assert!(cellswarm_aggregator::clipped_counts(&[]).is_empty());

    let mut zero = inputs.updates.clone();
    zero[0].sample_count = 0;
    assert!(matches!(merge(&zero), Err(AggregateError::ZeroSamples(_))));

    let krum = Merger::new(Box::new(Krum::new(1)), ServerOptimizer::Sgd, None, None).unwrap();
    let err = krum
        .merge(&inputs.base, inputs.base_hash, &inputs.updates, RoundId(1))
        .unwrap_err();
    assert!(matches!(err, AggregateError::TooFewUpdates { .. }), "{err}");
    assert!(err.to_string().contains("2f + 2"), "{err}");
}

#[test]
fn configurations_that_exclude_each_other_are_refused() {
    let dp = Some(CentralDp {
        noise_multiplier: 1.0,
        delta: 1e-5,
    });
    assert!(Merger::new(Box::new(FedAvg::new(true)), ServerOptimizer::Sgd, None, dp).is_err());
    assert!(Merger::new(Box::new(Median), ServerOptimizer::Sgd, Some(1.0), dp).is_err());
    assert!(
        Merger::new(
            Box::new(FedAvg::new(true)),
            ServerOptimizer::Sgd,
            Some(-1.0),
            None
        )
        .is_err()
    );
    let cfg = AggregationConfig {
        strategy: StrategyKind::TrimmedMean,
        secure_aggregation: true,
        ..AggregationConfig::default()
    };
    assert!(matches!(
        Merger::from_config(&cfg),
        Err(AggregateError::InvalidConfig(_))
    ));
}

// --------------------------------------------------------------------------------------
// Server optimiser state.
// --------------------------------------------------------------------------------------

#[test]
fn a_restarted_merger_continues_exactly() {
    let cfg = AggregationConfig {
        strategy: StrategyKind::FedYogi,
        ..AggregationConfig::default()
    };
    let rounds: Vec<_> = (0..3)
        .map(|r| random_inputs(4, 3 * CHUNK + 7, 10 + r))
        .collect();
    // The rounds chain: each starts from the previous merge.
    let run = |restart_after: Option<usize>| {
        let mut m = Merger::from_config(&cfg).unwrap();
        let mut base = rounds[0].base.clone();
        let mut hashes = Vec::new();
        for (r, inp) in rounds.iter().enumerate() {
            let h = base.hash();
            let updates: Vec<Update> = inp
                .updates
                .iter()
                .map(|u| Update::new(u.signer, u.id, h, u.sample_count, u.delta().clone()))
                .collect();
            let merged = m.merge(&base, h, &updates, RoundId(r as u64 + 1)).unwrap();
            m.commit(merged.outcome.next_state.clone());
            if restart_after == Some(r) {
                let saved = m.save_state(base.layout());
                m = Merger::from_config(&cfg).unwrap();
                m.load_state(&saved, base.layout()).unwrap();
            }
            hashes.push(merged.hash);
            base = merged.weights;
        }
        hashes
    };
    let straight = run(None);
    assert_eq!(run(Some(0)), straight);
    assert_eq!(run(Some(1)), straight);
    // The state really matters: a merger that forgot it diverges.
    assert_ne!(straight[1], {
        let m = Merger::from_config(&cfg).unwrap();
        let base = {
            let first = Merger::from_config(&cfg).unwrap();
            first
                .merge(
                    &rounds[0].base,
                    rounds[0].base_hash,
                    &rounds[0].updates,
                    RoundId(1),
                )
                .unwrap()
                .weights
        };
        let h = base.hash();
        let updates: Vec<Update> = rounds[1]
            .updates
            .iter()
            .map(|u| Update::new(u.signer, u.id, h, u.sample_count, u.delta().clone()))
            .collect();
        m.merge(&base, h, &updates, RoundId(2)).unwrap().hash
    });
}

#[test]
fn bad_state_bytes_are_refused() {
    let cfg = AggregationConfig {
        strategy: StrategyKind::FedAdam,
        ..AggregationConfig::default()
    };
    let inp = random_inputs(3, 50, 3);
    let mut m = Merger::from_config(&cfg).unwrap();
    let merged = m
        .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(1))
        .unwrap();
    m.commit(merged.outcome.next_state);
    let saved = m.save_state(inp.base.layout());
    let mut fresh = Merger::from_config(&cfg).unwrap();
    for cut in [0, 5, 20, saved.len() - 1] {
        assert!(matches!(
            fresh.load_state(&saved[..cut], inp.base.layout()),
            Err(AggregateError::BadState(_))
        ));
    }
    let other = layout(51);
    assert!(fresh.load_state(&saved, &other).is_err());
    let mut fedavg = Merger::from_config(&AggregationConfig::default()).unwrap();
    assert!(fedavg.load_state(&saved, inp.base.layout()).is_err());
    fresh.load_state(&saved, inp.base.layout()).unwrap();
    assert_eq!(fresh.state(), m.state());
}

// --------------------------------------------------------------------------------------
// Central DP.
// --------------------------------------------------------------------------------------

#[test]
fn merging_over_the_base_gives_the_same_bits_as_merging_into_a_new_buffer() {
    // Every strategy and optimiser, plus central DP noise; sizes that end mid-chunk.
    let mut mergers = all_strategies();
    mergers.push(
        Merger::new(
            Box::new(FedAvg::new(false)),
            ServerOptimizer::Sgd,
            Some(0.5),
            Some(CentralDp {
                noise_multiplier: 1.5,
                delta: 1e-5,
            }),
        )
        .unwrap(),
    );
    for p in [7, CHUNK, 3 * CHUNK + 11] {
        let inp = random_inputs(6, p, 11);
        for m in &mergers {
            let a = m
                .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(2))
                .unwrap();
            let b = m
                .merge_owned(inp.base.clone(), inp.base_hash, &inp.updates, RoundId(2))
                .unwrap();
            assert_eq!(a.hash, b.hash, "{} at {p}", m.name());
            assert_eq!(bits(a.weights.values()), bits(b.weights.values()));
            assert_eq!(a.outcome, b.outcome);
        }
    }
}

#[test]
fn central_dp_noise_has_the_configured_scale_and_is_reproducible() {
    let p = 4 * CHUNK;
    let inp = random_inputs(4, p, 5);
    let clip = 0.5;
    let z = 2.0;
    let plain = Merger::new(
        Box::new(FedAvg::new(false)),
        ServerOptimizer::Sgd,
        Some(clip),
        None,
    )
    .unwrap();
    let dp = CentralDp {
        noise_multiplier: z,
        delta: 1e-5,
    };
    let noisy = Merger::new(
        Box::new(FedAvg::new(false)),
        ServerOptimizer::Sgd,
        Some(clip),
        Some(dp),
    )
    .unwrap();
    let a = plain
        .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(1))
        .unwrap();
    let b = noisy
        .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(1))
        .unwrap();
    let expected_std = z * clip / 4.0;
    assert_eq!(b.outcome.noise_std, Some(expected_std));
    let diffs: Vec<f64> = a
        .weights
        .values()
        .iter()
        .zip(b.weights.values())
        .map(|(x, y)| f64::from(y - x))
        .collect();
    let mean = diffs.iter().sum::<f64>() / p as f64;
    let std = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / p as f64).sqrt();
    assert!(
        (std / expected_std - 1.0).abs() < 0.02,
        "noise std {std} vs {expected_std}"
    );
    assert!(mean.abs() < 0.02 * expected_std, "noise mean {mean}");
    // Every member draws the same noise; the next round draws other noise.
    let again = noisy
        .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(1))
        .unwrap();
    assert_eq!(again.hash, b.hash);
    let next = noisy
        .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(2))
        .unwrap();
    assert_ne!(next.hash, b.hash);
    // The accountant reports after each round.
    let eps1 = b.outcome.epsilon.unwrap();
    let mut committed = noisy;
    committed.commit(b.outcome.next_state);
    let b2 = committed
        .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(2))
        .unwrap();
    assert!(b2.outcome.epsilon.unwrap() > eps1);
    assert_eq!(committed.epsilon(), Some(eps1));
}

#[test]
fn clipping_bounds_each_update() {
    let inp = random_inputs(3, 1000, 8);
    let big = inp.updates[0].norm() * 10.0;
    let mut updates = inp.updates.clone();
    let scaled: Vec<f32> = updates[0].values().iter().map(|x| x * 10.0).collect();
    updates[0] = Update::new(
        updates[0].signer,
        updates[0].id,
        inp.base_hash,
        updates[0].sample_count,
        Delta::from_flat(Arc::clone(inp.base.layout()), scaled).unwrap(),
    );
    assert!((updates[0].norm() - big).abs() / big < 1e-5);
    let clip = inp.updates[1].norm() * 1.01;
    let m = Merger::new(
        Box::new(FedAvg::new(false)),
        ServerOptimizer::Sgd,
        Some(clip),
        None,
    )
    .unwrap();
    let merged = m
        .merge(&inp.base, inp.base_hash, &updates, RoundId(1))
        .unwrap();
    assert!(merged.outcome.clipped.contains(&updates[0].signer));
    let moved: Vec<f32> = merged
        .weights
        .values()
        .iter()
        .zip(inp.base.values())
        .map(|(a, b)| a - b)
        .collect();
    let norm = cellswarm_common::delta::sum_squares(&moved).sqrt();
    assert!(
        norm <= clip * 1.0001,
        "the mean of clipped updates has norm {norm} > {clip}"
    );
}

// --------------------------------------------------------------------------------------
// Oracle: an independent FedAvg in numpy.
// --------------------------------------------------------------------------------------

const NUMPY_FEDAVG: &str = r#"
import sys, numpy as np
d, k = sys.argv[1], int(sys.argv[2])
base = np.fromfile(f"{d}/base.f32", dtype="<f4").astype(np.float64)
counts = np.loadtxt(f"{d}/counts.txt", dtype=np.float64, ndmin=1)
counts = np.minimum(counts, np.sort(counts)[(k - 1) // 2])
ups = np.stack([np.fromfile(f"{d}/u{i}.f32", dtype="<f4").astype(np.float64) for i in range(k)])
(base + (counts / counts.sum()) @ ups).astype("<f4").tofile(f"{d}/numpy.f32")
"#;

fn oracles_required() -> bool {
    std::env::var_os("CELLSWARM_REQUIRE_ORACLES").is_some_and(|v| v == "1")
}

#[test]
fn fedavg_agrees_with_numpy() {
    let have_numpy = std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_numpy {
        assert!(
            !oracles_required(),
            "CELLSWARM_REQUIRE_ORACLES=1 but python3 with numpy is missing"
        );
        eprintln!("skipping: python3 with numpy not found (pip install -r .ci/requirements.txt)");
        return;
    }
    let k = 8;
    let p = 3 * CHUNK + 123;
    let inp = random_inputs(k, p, 42);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let write = |name: &str, v: &[f32]| {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    write("base.f32", inp.base.values());
    for (i, u) in inp.updates.iter().enumerate() {
        write(&format!("u{i}.f32"), u.values());
    }
    let counts: Vec<String> = inp
        .updates
        .iter()
        .map(|u| u.sample_count.to_string())
        .collect();
    std::fs::write(dir.join("counts.txt"), counts.join("\n")).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-c", NUMPY_FEDAVG, dir.to_str().unwrap(), &k.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let numpy: Vec<f32> = std::fs::read(dir.join("numpy.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let m = Merger::from_config(&AggregationConfig::default()).unwrap();
    let ours = m
        .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(1))
        .unwrap();
    let rel = relative_distance(ours.weights.values(), &numpy);
    assert!(rel < 1e-6, "relative difference to numpy {rel:e}");
    let worst = ours
        .weights
        .values()
        .iter()
        .zip(&numpy)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs() / f64::from(b.abs()).max(1e-3))
        .fold(0f64, f64::max);
    assert!(
        worst < 1e-5,
        "worst element-wise relative difference {worst:e}"
    );
}

#[test]
fn fedavg_server_step_scales_the_mean_update_and_step_one_is_plain_fedavg() {
    let inp = random_inputs(3, 2 * CHUNK + 5, 21);
    let merge = |step: f64, strategy: StrategyKind| {
        let cfg = AggregationConfig {
            strategy,
            server_step: step,
            ..AggregationConfig::default()
        };
        Merger::from_config(&cfg)
            .unwrap()
            .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(1))
            .unwrap()
    };
    for strategy in [StrategyKind::FedAvg, StrategyKind::FedAvgUnweighted] {
        // Step 1 is the plain mean, to the bit.
        let plain = Merger::new(
            Box::new(FedAvg::new(strategy == StrategyKind::FedAvg)),
            ServerOptimizer::Sgd,
            None,
            None,
        )
        .unwrap()
        .merge(&inp.base, inp.base_hash, &inp.updates, RoundId(1))
        .unwrap();
        assert_eq!(merge(1.0, strategy).hash, plain.hash);
        // Step 2.5 moves the model 2.5 times as far along the same mean update.
        let far = merge(2.5, strategy);
        let base = inp.base.values();
        for ((b, p), f) in base
            .iter()
            .zip(plain.weights.values())
            .zip(far.weights.values())
        {
            let (dp, df) = (f64::from(p - b), f64::from(f - b));
            assert!((df - 2.5 * dp).abs() <= 1e-6 + 1e-4 * dp.abs(), "{dp} {df}");
        }
    }
}
