//! `cellswarm demo` end to end with a tiny configuration: three nodes over loopback, the
//! report's numbers checked against an independent `cellswarm segment` + `eval`.

use std::path::Path;

use crate::util::{cellswarm, ok_stdout};

#[test]
fn the_demo_trains_a_swarm_and_writes_a_truthful_report() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let d = dir.path();
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "demo", "--out", "report", "--rounds", "3", "--steps", "25", "--frames", "8",
            "--fields", "2",
        ],
    ));
    // One line per round, with the model hash, losses and both F1 columns.
    let round_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("round ")).collect();
    assert_eq!(round_lines.len(), 3, "{out}");
    for l in &round_lines {
        for part in [
            "model ",
            "loss site-a=",
            "F1 swarm site-a=",
            "local-only site-a=",
            "site-c=",
            "union swarm=",
            " pooled=",
        ] {
            assert!(l.contains(part), "{l}");
        }
    }

    let report = d.join("report");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("metrics.json")).expect("metrics.json"))
            .expect("valid JSON");
    let sites = v["sites"].as_array().expect("sites");
    assert_eq!(sites.len(), 3);
    let rounds = v["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    // A new merged model every round.
    let hashes: std::collections::HashSet<&str> = rounds
        .iter()
        .map(|r| r["model"].as_str().expect("hash"))
        .collect();
    assert_eq!(hashes.len(), 3, "{hashes:?}");
    // The cross-site matrix: the swarm model, the pooled model and one local model per
    // site, on every site; and each of them on the union of all sites' held-out frames.
    let models: Vec<&str> = v["cross_site_models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| m.as_str().expect("a name"))
        .collect();
    assert_eq!(
        models,
        [
            "swarm",
            "pooled",
            "local:site-a",
            "local:site-b",
            "local:site-c"
        ]
    );
    let matrix = v["cross_site_f1"].as_array().expect("matrix");
    assert_eq!(matrix.len(), 5);
    for m in &models {
        let u = v["union"][m].as_f64().expect("a union F1 for every model");
        assert!((0.0..=1.0).contains(&u), "{m}: {u}");
    }
    // The union lies between the worst and the best site (it pools the sites' counts).
    for (m, row) in models.iter().zip(matrix) {
        let row: Vec<f64> = row
            .as_array()
            .expect("a row")
            .iter()
            .filter_map(|x| x.as_f64())
            .collect();
        let u = v["union"][m].as_f64().expect("f64");
        let (lo, hi) = row
            .iter()
            .fold((1.0f64, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        assert!(
            u >= lo - 1e-9 && u <= hi + 1e-9,
            "{m}: union {u} outside {row:?}"
        );
    }
    assert!(out.contains("union F1: swarm "), "{out}");
    for row in matrix {
        let row = row.as_array().expect("a row");
        assert_eq!(row.len(), 3);
        assert!(
            row.iter()
                .all(|x| (0.0..=1.0).contains(&x.as_f64().expect("f64")))
        );
    }
    for f in [
        "f1_per_round.svg",
        "cross_site.svg",
        "model/config.json",
        "overlays/site-a.png",
    ] {
        assert!(report.join(f).is_file(), "{f} missing");
    }
    let png = std::fs::read(report.join("overlays/site-b.png")).expect("an overlay");
    assert_eq!(&png[1..4], b"PNG");

    // The report's F1 of the final swarm model on site-a is what segmenting site-a's
    // held-out fields of view (the last frame of two movies of their own, none of them
    // the movie site-a trained on) with the saved model and scoring them independently
    // gives.
    let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
    for k in 0..2 {
        let field = format!("{:02}", k + 2);
        let movie = report.join("data/site-a").join(&field);
        let pred = format!("pred-{field}");
        let _ = ok_stdout(&cellswarm(
            d,
            &[
                "segment",
                "--model",
                &p(&report.join("model")),
                "--movie",
                &p(&movie),
                "--frames",
                "7",
                "--out",
                &pred,
            ],
        ));
        let eval = ok_stdout(&cellswarm(
            d,
            &[
                "eval",
                "--pred",
                &pred,
                "--gt",
                &p(&report.join(format!("data/site-a/{field}_GT"))),
                "--json",
            ],
        ));
        let e: serde_json::Value = serde_json::from_str(&eval).expect("eval JSON");
        assert_eq!(e["frames"], serde_json::json!([7]), "{eval}");
        let at_half = e["matching"]
            .as_array()
            .expect("matching")
            .iter()
            .find(|m| (m["threshold"].as_f64().unwrap_or(0.0) - 0.5).abs() < 1e-9)
            .expect("matches at 0.5")["counts"]
            .clone();
        let n = |k: &str| at_half[k].as_u64().expect("a count");
        tp += n("tp");
        fp += n("fp");
        fn_ += n("fn_");
    }
    assert!(tp + fn_ > 0, "the fields hold cells");
    let f1 = 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64;
    let reported = matrix[0][0].as_f64().expect("f64");
    assert!(
        (f1 - reported).abs() < 1e-9,
        "report says {reported}, independent scoring gives {f1}"
    );

    // Whether the swarm beats the local-only and pooled models is a question of the
    // training budget, not of correctness: at this test's three rounds of 25 steps every
    // model is far from converged and the ranking is noise. It is measured at the demo's
    // defaults in docs/benchmarks.md (issue 16), never asserted here.
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn a_site_left_out_is_scored_by_every_model_and_the_classical_baseline() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let d = dir.path();
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "demo", "--out", "report", "--sites", "3", "--unseen", "2", "--rounds", "1", "--steps",
            "5", "--frames", "4", "--fields", "2",
        ],
    ));
    assert!(out.contains("unseen site site-c"), "{out}");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.join("report/metrics.json")).expect("metrics.json"),
    )
    .expect("valid JSON");
    // Two sites trained; the third took no part, and every frame it has was scored: the
    // 4 of its movie and its 2 held-out fields of view.
    assert_eq!(v["sites"].as_array().expect("sites").len(), 2);
    let u = &v["unseen"];
    assert_eq!(u["site"], "site-c");
    assert_eq!(u["frames"], 4 + 2);
    assert!(u["objects"].as_u64().expect("objects") > 0);
    for m in [
        "swarm",
        "pooled",
        "local:site-a",
        "local:site-b",
        "classical",
    ] {
        let f = u["f1"][m].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&f), "{m}: {f}");
    }
    // The synthetic movies' cells are bright, round and mostly apart: the classical
    // baseline must find most of them, or it is no baseline.
    assert!(u["f1"]["classical"].as_f64().expect("f64") > 0.5, "{u}");

    // An index past the sites is refused before anything trains.
    let bad = cellswarm(
        d,
        &["demo", "--out", "bad", "--sites", "3", "--unseen", "3"],
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("cannot leave site 3 out of 3 sites"), "{err}");
}

#[test]
fn the_swarm_trains_alone_without_baselines() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let d = dir.path();
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "demo",
            "--out",
            "report",
            "--no-baselines",
            "--rounds",
            "1",
            "--steps",
            "3",
            "--frames",
            "4",
            "--fields",
            "1",
        ],
    ));
    assert!(
        !out.contains("pooled") && !out.contains("local-only"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.join("report/metrics.json")).expect("metrics.json"),
    )
    .expect("valid JSON");
    assert_eq!(v["cross_site_models"], serde_json::json!(["swarm"]));
    assert_eq!(
        v["union"]
            .as_object()
            .expect("union")
            .keys()
            .collect::<Vec<_>>(),
        ["swarm"]
    );
    assert!(v["pooled_mean_f1"].is_null(), "{}", v["pooled_mean_f1"]);
    assert!(
        v["rounds"][0]["f1_pooled"]
            .as_object()
            .expect("map")
            .is_empty()
    );
    assert!(d.join("report/model/weights.safetensors").is_file());
}
