//! Learning on one site through the real CLI: synth -> train -> segment -> eval, and
//! reading the real movies in ../shared/data when they are there.

use std::path::{Path, PathBuf};

use cellswarm_node::data::ctc::{Movie, SegSource};
use cellswarm_node::data::tiff_io::{read_image, read_labels, write_labels, write_u16};
use cellswarm_node::data::volume::Volume;
use cellswarm_node::infer::{InferOptions, classical_segment};
use cellswarm_node::metrics::match_instances;
use cellswarm_node::scale::{resample, resample_nearest};

use crate::util::{cellswarm, ok_stdout};

/// A movie over `--max-resident-mb` is streamed, a few frames held at a time, and the
/// same seed still trains the same model (the frames read ahead on a thread are swapped
/// in at fixed steps).
#[test]
fn training_streams_a_movie_over_its_memory_budget_reproducibly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let _ = ok_stdout(&cellswarm(
        d,
        &[
            "synth", "--out", "movie", "--frames", "6", "--seed", "4", "--size", "64",
        ],
    ));
    // (stdout, stderr) of 8 steps of a tiny network.
    let train = |out: &str, budget: &str| {
        let run = cellswarm(
            d,
            &[
                "train",
                "--data",
                "movie/01",
                "--out",
                out,
                "--steps",
                "8",
                "--patch",
                "32",
                "--batch",
                "2",
                "--depth",
                "2",
                "--width",
                "4",
                "--max-resident-mb",
                budget,
            ],
        );
        let said = ok_stdout(&run);
        (said, String::from_utf8_lossy(&run.stderr).into_owned())
    };
    // The losses it reports (the CPU backend's sums are not bit-exact from run to run,
    // so the weights' bytes are not compared).
    let losses = |said: &str| {
        let at = said.find("mean loss").expect(said);
        let end = said[at..].find(';').map_or(said.len(), |e| at + e);
        said[at..end].to_owned()
    };
    let (a, err) = train("a", "0");
    assert!(
        err.contains("6 annotated frames, streamed 2 at a time"),
        "{err}"
    );
    let (b, _) = train("b", "0");
    assert_eq!(losses(&a), losses(&b), "the same seed, the same batches");
    // Within the budget the frames are read at once: other batches.
    let (c, err) = train("c", "4096");
    assert!(!err.contains("streamed"), "{err}");
    assert_ne!(losses(&a), losses(&c));
}

#[test]
fn synth_train_segment_eval_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "synth",
            "--out",
            "movie",
            "--profile",
            "dense",
            "--frames",
            "6",
            "--seed",
            "3",
            "--size",
            "64",
        ],
    ));
    assert!(out.contains("wrote 6 frames"), "{out}");
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "train",
            "--data",
            "movie/01",
            "--out",
            "model",
            "--frames",
            "0-3",
            "--val-frames",
            "4-5",
            "--steps",
            "30",
            "--patch",
            "32",
            "--batch",
            "4",
            "--depth",
            "2",
            "--width",
            "8",
            "--seed",
            "1",
        ],
    ));
    assert!(out.contains("trained 30 steps"), "{out}");
    assert!(out.contains("held-out frames 4-5: F1@0.5"), "{out}");
    for f in ["weights.safetensors", "config.json", "postprocess.json"] {
        assert!(d.join("model").join(f).is_file(), "{f} missing");
    }
    let _ = ok_stdout(&cellswarm(
        d,
        &[
            "segment", "--model", "model", "--movie", "movie/01", "--out", "seg", "--frames", "4-5",
        ],
    ));
    assert!(d.join("seg/mask004.tif").is_file() && d.join("seg/mask005.tif").is_file());
    assert!(
        !d.join("seg/mask003.tif").exists(),
        "frames outside --frames are not segmented"
    );
    let json = ok_stdout(&cellswarm(
        d,
        &["eval", "--pred", "seg", "--gt", "movie/01_GT", "--json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["frames"], serde_json::json!([4, 5]));
    let f1 = v["matching"][0]["f1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&f1), "{json}");
    assert!(v["gt_objects"].as_u64().unwrap() >= 4, "{json}");

    // Cell dynamics with the same model: segment and track every frame, classify each
    // tracked cell's state, and score both against the synthetic ground truth.
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "track", "--model", "model", "--movie", "movie/01", "--out", "res",
        ],
    ));
    assert!(out.contains("tracked 6 frames"), "{out}");
    assert!(d.join("res/res_track.txt").is_file() && d.join("res/mask005.tif").is_file());
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "classify",
            "--model",
            "model",
            "--movie",
            "movie/01",
            "--masks",
            "res",
            "--out",
            "states.csv",
        ],
    ));
    // The masks are a tracking result: states are read along the tracks.
    assert!(out.contains("along their tracks"), "{out}");
    let csv = std::fs::read_to_string(d.join("states.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("frame,label,class,probability"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(!rows.is_empty(), "no objects classified");
    for r in &rows {
        let t: u32 = r[0].parse().unwrap();
        let label: u32 = r[1].parse().unwrap();
        let mask = read_labels(&d.join(format!("res/mask{t:03}.tif"))).unwrap();
        assert!(mask.data.contains(&label), "row {r:?}: no such object");
        assert!(["interphase", "dividing", "dying"].contains(&r[2]), "{r:?}");
        let p: f64 = r[3].parse().unwrap();
        assert!((0.0..=1.0).contains(&p), "{r:?}");
    }
    let json = ok_stdout(&cellswarm(
        d,
        &[
            "eval",
            "--pred",
            "res",
            "--gt",
            "movie/01_GT",
            "--states",
            "states.csv",
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let tra = v["tracking"]["tra"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&tra), "{json}");
    assert_eq!(v["tracking"]["frames"], 6);
    let acc = v["states"]["accuracy"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&acc) && v["states"]["objects"].as_u64().unwrap() > 0,
        "{json}"
    );
}

#[test]
fn cli_errors_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let err = |args: &[&str]| {
        let o = cellswarm(d, args);
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(err(&["synth", "--out", "x", "--profile", "crowded"]).contains("balanced"));
    std::fs::create_dir_all(d.join("empty/01")).unwrap();
    let e = err(&["train", "--data", "empty/01", "--out", "m", "--steps", "1"]);
    assert!(e.contains("empty/01") && e.contains("no frames"), "{e}");
    let e = err(&[
        "segment", "--model", "nope", "--movie", "empty/01", "--out", "s",
    ]);
    assert!(e.contains("config.json"), "{e}");
    let e = err(&["eval", "--pred", "empty", "--gt", "empty/01"]);
    assert!(e.contains("ground-truth"), "{e}");
}

/// F1@0.5 of `cellswarm eval` on `pred` against `gt`.
fn eval_f1(d: &Path, pred: &str, gt: &str) -> f64 {
    let json = ok_stdout(&cellswarm(
        d,
        &["eval", "--pred", pred, "--gt", gt, "--json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["matching"][0]["f1"].as_f64().unwrap()
}

/// Writes `src` (a CTC sequence with `_GT/SEG`) enlarged `k` times into `dst`.
fn enlarge(src: &Path, dst: &Path, k: usize) {
    let gt = dst.with_file_name(format!(
        "{}_GT/SEG",
        dst.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(dst).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    let movie = Movie::open(src).unwrap();
    for t in movie.frames() {
        let raw = read_image(&src.join(format!("t{t:03}.tif"))).unwrap();
        let (h, w) = (raw.height, raw.width);
        let big: Vec<u16> = resample(&raw.data, h, w, h * k, w * k)
            .into_iter()
            .map(|v| v.round().clamp(0.0, 65535.0) as u16)
            .collect();
        write_u16(
            &dst.join(format!("t{t:03}.tif")),
            &Volume::from_2d(h * k, w * k, big),
        )
        .unwrap();
        let seg = src.with_file_name(format!(
            "{}_GT/SEG/man_seg{t:03}.tif",
            src.file_name().unwrap().to_string_lossy()
        ));
        let m = read_labels(&seg).unwrap();
        let big = resample_nearest(&m.data, h, w, h * k, w * k);
        write_labels(
            &gt.join(format!("man_seg{t:03}.tif")),
            &Volume::from_2d(h * k, w * k, big),
        )
        .unwrap();
    }
}

#[test]
fn the_built_in_model_segments_cells_of_other_sizes_without_a_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // A movie no model has seen (its own seed), at its own scale and enlarged 2.5x: the
    // built-in model estimates the cells' width and rescales.
    let _ = ok_stdout(&cellswarm(
        d,
        &[
            "synth",
            "--out",
            "movie",
            "--profile",
            "balanced",
            "--frames",
            "2",
            "--seed",
            "4242",
            "--size",
            "160",
        ],
    ));
    enlarge(&d.join("movie/01"), &d.join("big/01"), 2);
    let mut scores = Vec::new();
    for name in ["movie", "big"] {
        let out = cellswarm(
            d,
            &[
                "segment",
                "--movie",
                &format!("{name}/01"),
                "--out",
                &format!("seg-{name}"),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("built-in generalist model"), "{err}");
        assert!(err.contains("px wide"), "{err}");
        scores.push(eval_f1(d, &format!("seg-{name}"), &format!("{name}/01_GT")));
    }
    // The shipped model must find the cells at either size; its measured scores are in
    // docs/benchmarks.md, these bounds only catch a broken model or a broken rescale.
    assert!(scores.iter().all(|&f| f > 0.7), "F1 {scores:?}");
    // Tracking segments with the built-in model too.
    let out = ok_stdout(&cellswarm(
        d,
        &["track", "--movie", "big/01", "--out", "res"],
    ));
    assert!(out.contains("tracked 2 frames"), "{out}");
    assert!(d.join("res/res_track.txt").is_file());
    // A width no image has is refused, saying which flag.
    let out = cellswarm(
        d,
        &[
            "segment",
            "--movie",
            "big/01",
            "--out",
            "seg-given",
            "--diameter",
            "0.5",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--diameter must be between"));
}

/// Nuclei from a lab that trained nothing here (`scripts/other-lab-nuclei.sh`: the 2018
/// Data Science Bowl image that the StarDist package ships, with its 125 reference
/// nuclei), pointed to by `CELLSWARM_OTHER_LAB`; CI sets it. The built-in model must
/// beat the classical watershed there, which is what review asks of it on other labs'
/// data. Its measured score is in docs/benchmarks.md ("Nuclei from another lab"); the
/// bound only catches a model that stopped travelling.
#[test]
fn the_built_in_model_beats_the_classical_watershed_on_nuclei_from_another_lab() {
    let Some(root) = std::env::var_os("CELLSWARM_OTHER_LAB").map(PathBuf::from) else {
        eprintln!(
            "skipping: CELLSWARM_OTHER_LAB is not set (scripts/other-lab-nuclei.sh DEST writes \
             the image; then CELLSWARM_OTHER_LAB=DEST)"
        );
        return;
    };
    let movie = Movie::open(&root.join("01"))
        .unwrap_or_else(|e| panic!("CELLSWARM_OTHER_LAB={}: {e}", root.display()));
    let frame = movie.frame(0).unwrap();
    let gt = movie
        .seg_mask(0, &frame)
        .unwrap()
        .expect("reference masks in 01_GT/SEG");
    assert_eq!(gt.ids().len(), 125, "the DSB image's 125 nuclei");

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let _ = ok_stdout(&cellswarm(
        d,
        &[
            "segment",
            "--movie",
            &root.join("01").to_string_lossy(),
            "--out",
            "seg",
        ],
    ));
    let model = eval_f1(d, "seg", &root.join("01_GT").to_string_lossy());
    let classical = match_instances(
        &gt,
        &classical_segment(&frame, &InferOptions::default()),
        0.5,
    )
    .f1;
    eprintln!(
        "F1@0.5 on nuclei from another lab: built-in model {model:.3}, classical {classical:.3}"
    );
    assert!(
        model > classical + 0.1 && model > 0.8,
        "built-in model F1 {model:.3}, classical watershed {classical:.3}"
    );
}

/// `../shared/data` beside the checkout, if present.
fn shared_data() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    if root.is_dir() {
        Some(root)
    } else {
        eprintln!(
            "skipping: ../shared/data is not beside this checkout (real-movie tests need it)"
        );
        None
    }
}

#[test]
fn reads_the_real_hela_and_bacteria_movies() {
    let Some(root) = shared_data() else { return };
    let hela = Movie::open(&root.join("Fluo-N2DL-HeLa/02")).unwrap();
    assert_eq!(hela.len(), 20);
    assert_eq!(hela.seg_source(), Some(SegSource::Reference));
    let f = hela.frame(0).unwrap();
    assert_eq!(f.shape(), (1, 700, 1100));
    let m = hela.seg_mask(0, &f).unwrap().unwrap();
    let n = m.ids().len();
    assert!((120..=200).contains(&n), "{n} nuclei in frame 0");
    assert_eq!(match_instances(&m, &m, 0.5).f1, 1.0);

    let bact = Movie::open(&root.join("bacteria-trpL/01")).unwrap();
    assert_eq!(bact.seg_source(), Some(SegSource::GroundTruth));
    let f = bact.frame(19).unwrap();
    assert_eq!(f.shape(), (1, 727, 1026));
    let m = bact.seg_mask(19, &f).unwrap().unwrap();
    assert!((10..=25).contains(&m.ids().len()));
}
