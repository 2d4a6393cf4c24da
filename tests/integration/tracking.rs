//! Cell dynamics through the real CLI: `track`, `eval` with the CTC measures checked
//! against the challenge's own Python package (py-ctcmetrics), and the real bacteria
//! movie when ../shared/data is there.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use cellswarm_node::data::ctc::{TrackRecord, read_tracks, write_tracks};
use cellswarm_node::data::tiff_io::{read_labels, write_labels};
use cellswarm_node::data::volume::Labels;

use crate::util::{cellswarm, ok_stdout};

fn synth(dir: &Path, profile: &str, frames: u32, seed: u32) {
    let (f, s) = (frames.to_string(), seed.to_string());
    let out = ok_stdout(&cellswarm(
        dir,
        &[
            "synth",
            "--out",
            "ds",
            "--profile",
            profile,
            "--frames",
            &f,
            "--seed",
            &s,
            "--size",
            "192",
        ],
    ));
    assert!(out.contains("division daughters"), "{out}");
}

fn eval_json(dir: &Path, res: &str, gt: &str) -> serde_json::Value {
    let json = ok_stdout(&cellswarm(
        dir,
        &["eval", "--pred", res, "--gt", gt, "--json"],
    ));
    serde_json::from_str(&json).unwrap()
}

/// A result folder copied from a TRA ground truth, to be damaged on purpose.
struct Result {
    masks: Vec<Labels>,
    tracks: Vec<TrackRecord>,
}

impl Result {
    fn from_gt(gt: &Path) -> Self {
        let tracks = read_tracks(&gt.join("TRA/man_track.txt")).unwrap();
        let mut masks = Vec::new();
        while let Ok(m) = read_labels(&gt.join(format!("TRA/man_track{:03}.tif", masks.len()))) {
            masks.push(m);
        }
        Self { masks, tracks }
    }

    fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (t, m) in self.masks.iter().enumerate() {
            write_labels(&dir.join(format!("mask{t:03}.tif")), m).unwrap();
        }
        write_tracks(&dir.join("res_track.txt"), &self.tracks).unwrap();
    }

    fn get(&self, label: u32) -> TrackRecord {
        *self.tracks.iter().find(|t| t.label == label).unwrap()
    }

    fn relabel(&mut self, from: u32, to: u32, frames: std::ops::RangeInclusive<u32>) {
        for t in frames {
            for v in &mut self.masks[t as usize].data {
                if *v == from {
                    *v = to;
                }
            }
        }
    }

    /// The first division's first daughter continues her mother's track, the second
    /// loses her parent: a missed division.
    fn miss_a_division(&mut self) {
        let d1 = *self.tracks.iter().find(|t| t.parent != 0).unwrap();
        let mother = self.get(d1.parent);
        let d2 = *self
            .tracks
            .iter()
            .find(|t| t.parent == mother.label && t.label != d1.label)
            .unwrap();
        self.relabel(d1.label, mother.label, d1.begin..=d1.end);
        self.tracks.retain(|t| t.label != d1.label);
        for t in &mut self.tracks {
            if t.label == mother.label {
                t.end = d1.end;
            }
            if t.label == d2.label {
                t.parent = 0;
            }
            if t.parent == d1.label {
                t.parent = mother.label;
            }
        }
    }

    /// Two tracks alive in frames `k - 1` and `k` swap labels from frame `k` on.
    fn switch_identities(&mut self, k: u32) {
        let alive: Vec<TrackRecord> = self
            .tracks
            .iter()
            .filter(|t| t.begin < k && t.end > k)
            .copied()
            .collect();
        let (a, b) = (alive[0], alive[1]);
        let tmp = u32::MAX - 1;
        self.relabel(a.label, tmp, k..=a.end);
        self.relabel(b.label, a.label, k..=b.end);
        self.relabel(tmp, b.label, k..=a.end);
        for t in &mut self.tracks {
            if t.label == a.label {
                t.end = b.end;
            } else if t.label == b.label {
                t.end = a.end;
            } else if t.parent == a.label {
                t.parent = b.label;
            } else if t.parent == b.label {
                t.parent = a.label;
            }
        }
    }

    /// A 6x6 object where frame `t` has only background, as a one-frame track.
    fn add_false_positive(&mut self, t: u32) {
        let m = &mut self.masks[t as usize];
        let label = self.tracks.iter().map(|r| r.label).max().unwrap() + 1;
        let (h, w) = (m.height, m.width);
        let free = (0..h - 6)
            .flat_map(|y| (0..w - 6).map(move |x| (y, x)))
            .find(|&(y, x)| (y..y + 6).all(|yy| (x..x + 6).all(|xx| m.data[yy * w + xx] == 0)))
            .unwrap();
        for yy in free.0..free.0 + 6 {
            for xx in free.1..free.1 + 6 {
                m.data[yy * w + xx] = label;
            }
        }
        self.tracks.push(TrackRecord {
            label,
            begin: t,
            end: t,
            parent: 0,
        });
    }
}

/// Masks with segmentation errors: every 7th object of each frame is dropped and, in
/// every frame, the two objects with the lowest labels are merged.
fn degrade(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    let mut t = 0;
    while let Ok(mut m) = read_labels(&src.join(format!("man_track{t:03}.tif"))) {
        let ids = m.ids();
        let drop: HashSet<u32> = ids.iter().copied().step_by(7).skip(1).collect();
        for v in &mut m.data {
            if drop.contains(v) {
                *v = 0;
            } else if ids.len() > 2 && *v == ids[1] {
                *v = ids[0];
            }
        }
        write_labels(&dst.join(format!("mask{t:03}.tif")), &m).unwrap();
        t += 1;
    }
}

const PY_CTC: &str = r#"
import json, sys, warnings
warnings.simplefilter("ignore")
from ctc_metrics.scripts.evaluate import evaluate_sequence
out = []
for res, gt in zip(sys.argv[1::2], sys.argv[2::2]):
    r = evaluate_sequence(res, gt, ["Valid", "DET", "SEG", "TRA", "LNK", "BC(0)"], threads=1)
    out.append({k: (None if r.get(k) is None else float(r[k])) for k in
                ["Valid", "DET", "SEG", "TRA", "LNK", "AOGM", "tp_div(0)", "fp_div(0)", "fn_div(0)"]})
print("JSON" + json.dumps(out))
"#;

/// py-ctcmetrics' measures of each result folder `d/F` against `gt`.
fn py_ctcmetrics(d: &Path, folders: &[&str], gt: &Path) -> Vec<serde_json::Value> {
    let mut args = vec!["-c".to_owned(), PY_CTC.to_owned()];
    for f in folders {
        args.push(d.join(f).display().to_string());
        args.push(gt.display().to_string());
    }
    let py = std::process::Command::new("python3")
        .args(&args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&py.stdout);
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let json = stdout
        .split("JSON")
        .nth(1)
        .expect("the oracle prints its results");
    serde_json::from_str(json.trim()).unwrap()
}

/// Our `eval --json` of result `f` gives py-ctcmetrics' `o` (to 1e-4; divisions exactly).
fn assert_same_measures(f: &str, ours: &serde_json::Value, o: &serde_json::Value) {
    assert_eq!(
        o["Valid"], 1.0,
        "{f}: py-ctcmetrics finds the result invalid"
    );
    let t = &ours["tracking"];
    let pairs = [
        ("DET", &t["det"]),
        ("TRA", &t["tra"]),
        ("LNK", &t["lnk"]),
        ("SEG", &ours["seg"]),
        ("AOGM", &t["aogm"]),
    ];
    for (name, v) in pairs {
        let (a, b) = (v.as_f64().unwrap(), o[name].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-4,
            "{f}: {name} ours {a}, py-ctcmetrics {b}"
        );
    }
    for (ours_key, theirs) in [
        ("tp", "tp_div(0)"),
        ("fp", "fp_div(0)"),
        ("fn_", "fn_div(0)"),
    ] {
        assert_eq!(
            t["divisions"][ours_key].as_f64(),
            o[theirs].as_f64(),
            "{f}: divisions {ours_key}"
        );
    }
    eprintln!("{f}: {t}");
}

/// 3D stacks: the measures agree with py-ctcmetrics on the CHO nuclei of
/// `../shared/data` (frames 0-5 of the reference 3D masks as ground truth, linked by
/// overlap; results: the tracker on those masks, and on them with objects dropped and
/// merged).
#[test]
fn ctc_measures_agree_with_py_ctcmetrics_on_3d_stacks() {
    if !have_py_ctcmetrics() {
        return;
    }
    let Some(cho) = shared("Fluo-N3DH-CHO/02_ERR_SEG") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let gt = d.join("gt");
    for sub in ["SEG", "TRA", "masks"] {
        std::fs::create_dir_all(gt.join(sub)).unwrap();
    }
    for t in 0..6 {
        let m = read_labels(&cho.join(format!("mask{t:03}.tif"))).unwrap();
        assert!(m.depth > 1, "CHO frames are 3D stacks");
        write_labels(&gt.join(format!("SEG/man_seg{t:03}.tif")), &m).unwrap();
        write_labels(&gt.join(format!("masks/mask{t:03}.tif")), &m).unwrap();
    }
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "track", "--linker", "overlap", "--masks", "gt/masks", "--out", "lineage",
        ],
    ));
    assert!(out.contains("tracked 6 frames"), "{out}");
    for t in 0..6 {
        std::fs::copy(
            d.join(format!("lineage/mask{t:03}.tif")),
            gt.join(format!("TRA/man_track{t:03}.tif")),
        )
        .unwrap();
    }
    std::fs::copy(
        d.join("lineage/res_track.txt"),
        gt.join("TRA/man_track.txt"),
    )
    .unwrap();
    std::fs::remove_dir_all(gt.join("masks")).unwrap();
    degrade(&gt.join("TRA"), &d.join("degraded-masks"));
    for (masks, out) in [("gt/SEG", "tracked"), ("degraded-masks", "degraded")] {
        let o = ok_stdout(&cellswarm(d, &["track", "--masks", masks, "--out", out]));
        assert!(o.contains("tracked 6 frames"), "{o}");
    }
    let folders = ["tracked", "degraded"];
    let oracle = py_ctcmetrics(d, &folders, &gt);
    for (f, o) in folders.iter().zip(&oracle) {
        assert_same_measures(f, &eval_json(d, f, "gt"), o);
    }
    let degraded = &eval_json(d, "degraded", "gt")["tracking"];
    assert!(
        degraded["counts"]["fn_"].as_u64().unwrap() > 0,
        "{degraded}"
    );
}

fn have_py_ctcmetrics() -> bool {
    crate::util::have_python_modules("ctc_metrics", "py-ctcmetrics")
}

#[test]
fn ctc_measures_agree_with_py_ctcmetrics() {
    if !have_py_ctcmetrics() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    synth(d, "dense", 24, 5);
    let gt = d.join("ds/01_GT");
    // 1: the tracker on exact masks; 2: exact lineage with deliberate errors;
    // 3: the tracker on masks with segmentation errors (merges, misses); 4: the truth.
    let out = ok_stdout(&cellswarm(
        d,
        &["track", "--masks", "ds/01_GT/TRA", "--out", "tracked"],
    ));
    assert!(out.contains("divisions"), "{out}");
    let mut damaged = Result::from_gt(&gt);
    assert_eq!(damaged.masks.len(), 24);
    damaged.miss_a_division();
    damaged.switch_identities(10);
    damaged.add_false_positive(3);
    damaged.add_false_positive(17);
    damaged.write(&d.join("damaged"));
    degrade(&gt.join("TRA"), &d.join("degraded-masks"));
    let out = ok_stdout(&cellswarm(
        d,
        &["track", "--masks", "degraded-masks", "--out", "degraded"],
    ));
    assert!(out.contains("tracked 24 frames"), "{out}");
    Result::from_gt(&gt).write(&d.join("truth"));
    let folders = ["tracked", "damaged", "degraded", "truth"];
    let oracle = py_ctcmetrics(d, &folders, &gt);
    for (f, o) in folders.iter().zip(&oracle) {
        assert_same_measures(f, &eval_json(d, f, "ds/01_GT"), o);
    }
    // The deliberate errors are visible: a missed division, a switch, two false positives.
    let dmg = &eval_json(d, "damaged", "ds/01_GT")["tracking"];
    assert_eq!(dmg["counts"]["fp"], 2);
    assert!(dmg["counts"]["ea"].as_u64().unwrap() >= 3, "{dmg}");
    assert!(dmg["divisions"]["fn_"].as_u64().unwrap() >= 1, "{dmg}");
    let truth = &eval_json(d, "truth", "ds/01_GT")["tracking"];
    assert_eq!(truth["tra"], 1.0);
    let degraded = &eval_json(d, "degraded", "ds/01_GT")["tracking"];
    assert!(degraded["counts"]["ns"].as_u64().unwrap() > 0, "{degraded}");
    assert!(
        degraded["counts"]["fn_"].as_u64().unwrap() > 0,
        "{degraded}"
    );
}

#[test]
fn track_reports_bad_input_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("gappy")).unwrap();
    let m = Labels::from_2d(4, 4, vec![0; 16]);
    write_labels(&d.join("gappy/mask000.tif"), &m).unwrap();
    write_labels(&d.join("gappy/mask002.tif"), &m).unwrap();
    let e = cellswarm(d, &["track", "--masks", "gappy", "--out", "o"]);
    assert!(!e.status.success());
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        err.contains("mask002.tif") && err.contains("contiguous"),
        "{err}"
    );
    let e = cellswarm(d, &["track", "--masks", "nowhere", "--out", "o"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("nowhere"));
    // A lineage that does not fit its masks is refused by eval with the reason.
    synth(d, "sparse", 4, 1);
    let mut r = Result::from_gt(&d.join("ds/01_GT"));
    r.tracks[0].end += 1;
    r.write(&d.join("bad"));
    let e = cellswarm(d, &["eval", "--pred", "bad", "--gt", "ds/01_GT"]);
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("invalid tracking result"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
}

/// `../shared/data/bacteria-trpL` beside the checkout, if present.
fn bacteria() -> Option<PathBuf> {
    shared("bacteria-trpL")
}

/// `../shared/data/NAME` beside the checkout, if present.
fn shared(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(name);
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipping: ../shared/data is not beside this checkout");
        None
    }
}

#[test]
fn bacteria_lineage_from_overlap_and_tracking_its_masks() {
    let Some(root) = bacteria() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let seg = root.join("01_GT/SEG");
    let seg = seg.to_str().unwrap();
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "track", "--linker", "overlap", "--masks", seg, "--out", "lineage",
        ],
    ));
    assert!(out.contains("tracked 20 frames"), "{out}");
    let lineage = read_tracks(&d.join("lineage/res_track.txt")).unwrap();
    // The colony grows from 2 to 17 cells by division.
    let mothers: HashSet<u32> = lineage
        .iter()
        .map(|t| t.parent)
        .filter(|&p| p != 0)
        .collect();
    assert!(mothers.len() >= 10, "{} divisions", mothers.len());
    assert!(lineage.iter().filter(|t| t.begin == 0).count() <= 3);
    // The tracker on the same masks, scored against that lineage.
    let out = ok_stdout(&cellswarm(
        d,
        &["track", "--masks", seg, "--out", "tracked"],
    ));
    assert!(out.contains("15 divisions"), "{out}");
    let v = eval_json_tra(
        d,
        "tracked",
        root.join("01_GT").to_str().unwrap(),
        "lineage",
    );
    let t = &v["tracking"];
    assert!(t["tra"].as_f64().unwrap() >= 0.95, "{t}");
    assert!(t["division_recall"].as_f64().unwrap() >= 0.8, "{t}");
}

fn eval_json_tra(dir: &Path, res: &str, gt: &str, tra: &str) -> serde_json::Value {
    let json = ok_stdout(&cellswarm(
        dir,
        &["eval", "--pred", res, "--gt", gt, "--tra", tra, "--json"],
    ));
    serde_json::from_str(&json).unwrap()
}
