//! What the node promises about privacy, each promise with a test that fails if it breaks:
//! local differential privacy (the noise actually sent has the configured scale, the
//! accountant's epsilon is reported, a swarm under DP still learns) and the canary test
//! (no pixel or file name of a site's movie is in any byte the node sends).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use cellswarm_aggregator::dp::RdpAccountant;
use cellswarm_common::delta::{Delta, DeltaLimits};
use cellswarm_common::weights::Limits;
use cellswarm_node::swarm::local::{VectorTrainer, vector_layout};

use crate::swarm_util::{Consortium, Setup, runtime, stop_all, wait_all_agree};
use crate::util::{cellswarm, ok_stdout};

const PARAMS: usize = 4000;
const CLIP: f64 = 10.0;
const SIGMA: f64 = 0.01;
const DELTA: f64 = 1e-5;

/// Mean squared distance of `w` from `t`.
fn mse(w: &[f32], t: &[f64]) -> f64 {
    w.iter()
        .zip(t)
        .map(|(a, b)| (f64::from(*a) - b).powi(2))
        .sum::<f64>()
        / t.len() as f64
}

#[test]
fn local_dp_sends_noise_of_the_configured_scale_reports_epsilon_and_still_learns() {
    let rounds = 5;
    let c = Consortium::new(Setup {
        params: PARAMS as u32,
        rounds,
        min_peers: 3,
        site: "[privacy.local_dp]\nclip_norm = 10.0\nnoise_multiplier = 0.01\ndelta = 1e-5\n",
        ..Setup::default()
    });
    let statuses = runtime().block_on(async {
        let nodes = c.start_all().await;
        wait_all_agree(&nodes, rounds, Duration::from_secs(120)).await;
        let statuses: Vec<_> = nodes.iter().map(|n| n.status().borrow().clone()).collect();
        stop_all(nodes).await;
        statuses
    });
    // Each site released one privatized delta per round: the epsilon in /status is the
    // accountant's after `rounds` Gaussian mechanisms of multiplier sigma.
    let expected_eps = (0..rounds)
        .fold(RdpAccountant::default(), |a, _| a.after(SIGMA))
        .epsilon(DELTA);
    for s in &statuses {
        let eps = s.epsilon.expect("local DP reports epsilon");
        assert_eq!(s.dp_delta, Some(DELTA));
        assert!(
            (eps - expected_eps).abs() < 1e-9 * expected_eps,
            "{eps} vs {expected_eps}"
        );
    }

    // The delta site 0 actually signed and sent in round 1 (from genesis = zeros): the
    // trainer's true update is 0.5 * target; what was sent minus that update clipped to C
    // is the noise, whose standard deviation must be sigma * C.
    let (rec, header, body) = c.sites[0].own_delta(1);
    assert_eq!(rec.local_dp_noise, Some(0.01), "{rec:?}");
    let eps1 = RdpAccountant::default().after(SIGMA).epsilon(DELTA);
    assert_eq!(
        header.metrics.epsilon,
        Some(eps1),
        "the header carries epsilon"
    );
    let layout = vector_layout(PARAMS);
    let limits = DeltaLimits {
        max_bytes: 1 << 30,
        layout: Limits {
            max_tensors: 16,
            max_params: PARAMS as u64,
        },
    };
    let sent = Delta::decode(&body, &layout, &limits).expect("a delta");
    let target = VectorTrainer::new(PARAMS, 1, Duration::ZERO)
        .target()
        .to_vec();
    let true_delta: Vec<f64> = target.iter().map(|t| 0.5 * f64::from(*t)).collect();
    let norm = true_delta.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        norm > CLIP,
        "the test needs an update the clip shrinks ({norm})"
    );
    let noise: Vec<f64> = sent
        .values()
        .iter()
        .zip(&true_delta)
        .map(|(s, d)| f64::from(*s) - d * CLIP / norm)
        .collect();
    let mean = noise.iter().sum::<f64>() / noise.len() as f64;
    let std = (noise.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / noise.len() as f64).sqrt();
    let want = SIGMA * CLIP;
    assert!(
        (std - want).abs() < 0.05 * want,
        "noise std {std}, configured {want}"
    );
    assert!(
        mean.abs() < 5.0 * want / (noise.len() as f64).sqrt(),
        "noise mean {mean}"
    );

    // Still learns: the merged model approaches the members' mean target (where FedAvg
    // without noise converges), and the sites' loss falls.
    let targets: Vec<Vec<f32>> = (1..=3)
        .map(|s| {
            VectorTrainer::new(PARAMS, s, Duration::ZERO)
                .target()
                .to_vec()
        })
        .collect();
    let mean_target: Vec<f64> = (0..PARAMS)
        .map(|j| targets.iter().map(|t| f64::from(t[j])).sum::<f64>() / 3.0)
        .collect();
    let (_, model) = c.sites[0].head_model();
    let before = mse(&vec![0.0; PARAMS], &mean_target);
    let after = mse(model.values(), &mean_target);
    assert!(
        after < 0.5 * before,
        "distance to the mean target {before} -> {after}"
    );
}

/// The canary block in every frame of the canary movie: rows and columns, and its corner.
const CANARY_SIDE: usize = 40;
const CANARY_AT: usize = 8;
/// Consecutive canary pixels that count as a leak.
const RUN: usize = 16;

/// A site movie whose frames carry a high-entropy canary block, in a folder whose name
/// carries a canary string. Returns the sequence folder.
fn canary_movie(root: &Path, tag: &str) -> std::path::PathBuf {
    use rand::{RngExt, SeedableRng};
    let mut profile = cellswarm_node::synth::Profile::named("balanced").expect("a profile");
    profile.size = 128;
    let mut movie = cellswarm_node::synth::generate(&profile, 6, 11);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0xC0FFEE);
    for f in &mut movie.frames {
        for y in CANARY_AT..CANARY_AT + CANARY_SIDE {
            for x in CANARY_AT..CANARY_AT + CANARY_SIDE {
                f.data[y * f.width + x] = rng.random_range(1000..64000);
            }
        }
    }
    let dir = root.join(tag);
    movie
        .write_ctc(&dir, "01")
        .expect("the canary movie is written");
    dir.join("01")
}

/// Every encoding of every run of `RUN` consecutive canary pixels (along rows) that a
/// leak could take: the raw 16-bit values (both byte orders), their high bytes (an 8-bit
/// rendering), as f32 (raw, scaled to [0, 1], and exactly as the trainer normalises them).
fn canary_patterns(seq: &Path) -> Vec<Vec<u8>> {
    use cellswarm_node::data::ctc::Movie;
    let movie = Movie::open(seq).expect("the canary movie opens");
    let normalised = cellswarm_node::data::dataset::load_annotated(&movie, None)
        .expect("the canary movie loads as the trainer loads it");
    let mut out = Vec::new();
    for a in &normalised {
        let raw = movie.frame(a.t).expect("a frame");
        let w = raw.width;
        for y in CANARY_AT..CANARY_AT + CANARY_SIDE {
            for x0 in CANARY_AT..=CANARY_AT + CANARY_SIDE - RUN {
                let idx = (x0..x0 + RUN).map(|x| y * w + x);
                let vals: Vec<f32> = idx.clone().map(|i| raw.data[i]).collect();
                let norm: Vec<f32> = idx.map(|i| a.image.data[i]).collect();
                let enc = |f: &dyn Fn(f32) -> Vec<u8>| vals.iter().flat_map(|v| f(*v)).collect();
                out.push(enc(&|v| (v as u16).to_le_bytes().to_vec()));
                out.push(enc(&|v| (v as u16).to_be_bytes().to_vec()));
                out.push(enc(&|v| vec![((v as u16) >> 8) as u8]));
                out.push(enc(&|v| v.to_le_bytes().to_vec()));
                out.push(enc(&|v| v.to_be_bytes().to_vec()));
                out.push(enc(&|v| (v / 65535.0).to_le_bytes().to_vec()));
                out.push(norm.iter().flat_map(|v| v.to_le_bytes()).collect());
            }
        }
    }
    out
}

/// The messages of a `net.capture_sent` file: `kind u8 | len u64 LE | bytes`.
fn captured(path: &Path) -> Vec<(u8, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("the capture file");
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        assert!(rest.len() >= 9, "a truncated capture record");
        let kind = rest[0];
        let len = u64::from_le_bytes(rest[1..9].try_into().expect("8 bytes")) as usize;
        assert!(rest.len() >= 9 + len, "a truncated capture record");
        out.push((kind, rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    out
}

/// Offsets in `hay` where one of `patterns` (all at least 16 bytes) starts.
fn find_any(hay: &[u8], patterns: &[Vec<u8>]) -> Vec<(usize, usize)> {
    // Index the patterns by their first 16 bytes, then scan every offset once.
    let mut index: HashMap<[u8; 16], Vec<usize>> = HashMap::new();
    for (i, p) in patterns.iter().enumerate() {
        let key: [u8; 16] = p[..16].try_into().expect("16 bytes");
        index.entry(key).or_default().push(i);
    }
    let mut hits = Vec::new();
    for at in 0..hay.len().saturating_sub(15) {
        let key: [u8; 16] = hay[at..at + 16].try_into().expect("16 bytes");
        if let Some(ids) = index.get(&key) {
            for &i in ids {
                if hay[at..].starts_with(&patterns[i]) {
                    hits.push((at, i));
                }
            }
        }
    }
    hits
}

#[test]
fn no_canary_pixel_or_file_name_leaves_a_node() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let d = dir.path();
    let tag = "CANARY-7d1f9a0c4e52b8366a1d";
    let seq = canary_movie(d, tag);
    let mut other = cellswarm_node::synth::Profile::named("dense").expect("a profile");
    other.size = 128;
    cellswarm_node::synth::generate(&other, 6, 5)
        .write_ctc(&d.join("other"), "01")
        .expect("the second site's movie");
    let capture = d.join("sent.bin");
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "demo",
            "--data",
            &seq.display().to_string(),
            &d.join("other/01").display().to_string(),
            "--sites",
            "2",
            "--rounds",
            "3",
            "--steps",
            "10",
            "--out",
            "report",
            "--capture-sent",
            &capture.display().to_string(),
        ],
    ));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("round ")).count(),
        3,
        "{out}"
    );

    let messages = captured(&capture);
    // The capture saw the protocol: announcements, requests and responses carrying the
    // node's deltas (each several times the model's size would be far more than 64 KiB).
    let kinds: std::collections::BTreeSet<u8> = messages.iter().map(|m| m.0).collect();
    assert!(
        kinds.contains(&3) && kinds.contains(&2),
        "captured kinds {kinds:?}"
    );
    let sent: usize = messages.iter().map(|m| m.1.len()).sum();
    assert!(sent > 64 << 10, "only {sent} bytes captured");

    // The canary check must be able to see a leak: a frame's raw bytes and the trainer's
    // input, planted in a fake message, are found.
    let patterns = canary_patterns(&seq);
    let movie = cellswarm_node::data::ctc::Movie::open(&seq).expect("opens");
    let frame = movie.frame(2).expect("a frame");
    let planted: Vec<u8> = frame
        .data
        .iter()
        .flat_map(|v| (*v as u16).to_le_bytes())
        .collect();
    assert!(
        !find_any(&planted, &patterns).is_empty(),
        "the search cannot see raw pixels"
    );

    for (i, (kind, body)) in messages.iter().enumerate() {
        let hits = find_any(body, &patterns);
        assert!(
            hits.is_empty(),
            "message {i} (kind {kind}, {} bytes) holds canary pixels at {:?}",
            body.len(),
            &hits[..hits.len().min(5)]
        );
        let has_tag = body.windows(tag.len()).any(|w| w == tag.as_bytes());
        assert!(
            !has_tag,
            "message {i} (kind {kind}) holds the movie's folder name"
        );
        for name in ["t000.tif", "man_seg000.tif", "01_GT"] {
            assert!(
                !body.windows(name.len()).any(|w| w == name.as_bytes()),
                "message {i} (kind {kind}) holds the file name {name}"
            );
        }
    }
}

#[test]
fn the_demo_under_local_dp_still_learns_and_reports_epsilon() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let d = dir.path();
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "demo",
            "--rounds",
            "3",
            "--steps",
            "20",
            "--frames",
            "6",
            "--fields",
            "2",
            "--out",
            "report",
            "--local-dp-clip",
            "1.0",
            "--local-dp-noise",
            "0.01",
        ],
    ));
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("round ")).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines.iter().all(|l| l.contains("DP epsilon site-a=")),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.join("report/metrics.json")).expect("metrics.json"),
    )
    .expect("valid JSON");
    let rounds = v["rounds"].as_array().expect("rounds");
    let mean_loss = |r: &serde_json::Value| {
        let l = r["train_loss"].as_object().expect("losses");
        l.values().map(|x| x.as_f64().expect("f64")).sum::<f64>() / l.len() as f64
    };
    let (first, last) = (mean_loss(&rounds[0]), mean_loss(&rounds[2]));
    assert!(
        last < 0.9 * first,
        "loss {first} -> {last} under local DP\n{out}"
    );
    // Epsilon grows round by round as the accountant says, and each node's own
    // accountant agrees at the end.
    let eps = |r: usize| rounds[r]["epsilon"]["site-b"].as_f64().expect("epsilon");
    for r in 0..3 {
        let want = (0..=r)
            .fold(RdpAccountant::default(), |a, _| a.after(0.01))
            .epsilon(1e-5);
        assert!(
            (eps(r) - want).abs() < 1e-9 * want,
            "round {}: {} vs {want}",
            r + 1,
            eps(r)
        );
    }
    let dp = &v["local_dp"];
    assert_eq!(dp["noise_multiplier"].as_f64(), Some(0.01));
    for site in ["site-a", "site-b", "site-c"] {
        let e = dp["epsilon"][site].as_f64().expect("a node's epsilon");
        assert!((e - eps(2)).abs() < 1e-9 * e, "{site}: {e} vs {}", eps(2));
    }
}
