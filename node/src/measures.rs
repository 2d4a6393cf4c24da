//! The Cell Tracking Challenge's tracking measures: DET, TRA and LNK (from the AOGM, the
//! cost of turning the result's acyclic oriented graph into the reference's), and
//! division counts. SEG is [`crate::metrics::SegMeasure`].
//!
//! Definitions (Matula et al., PLoS ONE 2015, as implemented by the challenge's Python
//! package `py-ctcmetrics`, which a test compares with these to 1e-4):
//!
//! - **Vertices** are the objects of every frame. A reference object is *detected* by the
//!   result object that covers more than half of its pixels (at most one can). Result
//!   objects detecting no reference object are false positives (FP), reference objects
//!   left undetected false negatives (FN); a result object detecting `k > 1` reference
//!   objects needs `k - 1` splits (NS).
//! - **Edges** join the same label in consecutive frames (track links) and a parent
//!   track's last object to each child's first object (parent links). Result edges
//!   between objects that each detect exactly one reference object are compared with
//!   the reference edges: a result edge with no reference counterpart is redundant (ED),
//!   a reference edge with none is missing (EA), a matched pair of different kinds has
//!   the wrong semantics (EC).
//! - `AOGM = 5 NS + 10 FN + 1 FP + 1 ED + 1.5 EA + 1 EC`;
//!   `TRA = 1 - min(AOGM, AOGM_0) / AOGM_0` with `AOGM_0 = 10 |V_ref| + 1.5 |E_ref|`;
//!   `DET` likewise from the vertex terms only (`AOGM_D0 = 10 |V_ref|`), and `LNK` from
//!   the edge terms only (`AOGM_A0 = 1.5 |E_ref|`).
//! - **Divisions**: a reference mother (a track with two or more children) is found when
//!   a result mother ends in the same frame, detects her there and only her, and each
//!   reference daughter is detected, in her first frame, by a result daughter that
//!   starts then (the challenge's branching correctness BC(0)).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::data::ctc::TrackRecord;
use crate::data::volume::Labels;
use crate::metrics::Overlaps;

/// What is wrong with a tracking result (a CTC `res_track.txt` with its masks).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeasureError {
    /// The lineage file and the masks disagree, or the lineage is not a forest.
    #[error("invalid tracking result: {0}")]
    Invalid(String),
    /// Reference and result differ in frame count or frame size.
    #[error("reference and result differ: {0}")]
    Mismatch(String),
}

/// Counts of graph operations and the reference graph's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AogmCounts {
    /// Vertex splits needed.
    pub ns: u64,
    /// Reference objects not detected.
    pub fn_: u64,
    /// Result objects detecting nothing.
    pub fp: u64,
    /// Redundant result edges.
    pub ed: u64,
    /// Missing reference edges.
    pub ea: u64,
    /// Edges of the wrong kind.
    pub ec: u64,
    /// Reference vertices.
    pub vertices: u64,
    /// Reference edges.
    pub edges: u64,
}

/// Weights of the AOGM: NS, FN, FP, ED, EA, EC.
pub const AOGM_WEIGHTS: [f64; 6] = [5.0, 10.0, 1.0, 1.0, 1.5, 1.0];

fn normalised(cost: f64, empty: f64) -> Option<f64> {
    (empty > 0.0).then(|| 1.0 - cost.min(empty) / empty)
}

impl AogmCounts {
    /// The vertex terms `5 NS + 10 FN + 1 FP`.
    #[must_use]
    pub fn aogm_d(&self) -> f64 {
        let w = AOGM_WEIGHTS;
        w[0] * self.ns as f64 + w[1] * self.fn_ as f64 + w[2] * self.fp as f64
    }

    /// The edge terms `1 ED + 1.5 EA + 1 EC`.
    #[must_use]
    pub fn aogm_a(&self) -> f64 {
        let w = AOGM_WEIGHTS;
        w[3] * self.ed as f64 + w[4] * self.ea as f64 + w[5] * self.ec as f64
    }

    /// The whole AOGM.
    #[must_use]
    pub fn aogm(&self) -> f64 {
        self.aogm_d() + self.aogm_a()
    }

    /// DET, or `None` without reference vertices.
    #[must_use]
    pub fn det(&self) -> Option<f64> {
        normalised(self.aogm_d(), AOGM_WEIGHTS[1] * self.vertices as f64)
    }

    /// TRA, or `None` for an empty reference.
    #[must_use]
    pub fn tra(&self) -> Option<f64> {
        normalised(
            self.aogm(),
            AOGM_WEIGHTS[1] * self.vertices as f64 + AOGM_WEIGHTS[4] * self.edges as f64,
        )
    }

    /// LNK, or `None` without reference edges.
    #[must_use]
    pub fn lnk(&self) -> Option<f64> {
        normalised(self.aogm_a(), AOGM_WEIGHTS[4] * self.edges as f64)
    }
}

/// Divisions found, made up and missed (BC(0)'s counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DivisionCounts {
    /// Reference divisions found.
    pub tp: u64,
    /// Result divisions with no reference counterpart.
    pub fp: u64,
    /// Reference divisions missed.
    pub fn_: u64,
}

impl DivisionCounts {
    /// Share of reference divisions found, or `None` if there are none.
    #[must_use]
    pub fn recall(&self) -> Option<f64> {
        let n = self.tp + self.fn_;
        (n > 0).then(|| self.tp as f64 / n as f64)
    }
}

/// A vertex: (frame, label).
type Vertex = (usize, u32);

/// Checks what the challenge's validator checks: positive unique labels, every parent
/// listed and ending before its child begins, and each label present in exactly the
/// frames `B..=E` of its record.
///
/// # Errors
/// [`MeasureError::Invalid`] naming the first problem.
pub fn validate(masks: &[Labels], tracks: &[TrackRecord]) -> Result<(), MeasureError> {
    let bad = |m: String| Err(MeasureError::Invalid(m));
    let mut by_label: HashMap<u32, &TrackRecord> = HashMap::new();
    for t in tracks {
        if t.label == 0 || t.end < t.begin {
            return bad(format!(
                "track {} {} {} {}: label must be positive and B <= E",
                t.label, t.begin, t.end, t.parent
            ));
        }
        if by_label.insert(t.label, t).is_some() {
            return bad(format!("label {} is listed twice", t.label));
        }
    }
    for t in tracks {
        if t.parent != 0 {
            let Some(p) = by_label.get(&t.parent) else {
                return bad(format!(
                    "track {} names parent {}, which is not listed",
                    t.label, t.parent
                ));
            };
            if p.end >= t.begin {
                return bad(format!(
                    "parent {} ends in frame {}, not before its child {} begins (frame {})",
                    p.label, p.end, t.label, t.begin
                ));
            }
        }
    }
    for (f, m) in masks.iter().enumerate() {
        let present: HashSet<u32> = m.ids().into_iter().collect();
        for l in &present {
            match by_label.get(l) {
                Some(t) if (t.begin as usize..=t.end as usize).contains(&f) => {}
                Some(t) => {
                    return bad(format!(
                        "label {l} is in frame {f}'s mask but its track spans {}..={}",
                        t.begin, t.end
                    ));
                }
                None => {
                    return bad(format!(
                        "label {l} is in frame {f}'s mask but not in the lineage file"
                    ));
                }
            }
        }
        for t in tracks {
            if (t.begin as usize..=t.end as usize).contains(&f) && !present.contains(&t.label) {
                return bad(format!(
                    "track {} spans frame {f} but its label is not in that frame's mask",
                    t.label
                ));
            }
        }
    }
    if let Some(t) = tracks.iter().find(|t| t.end as usize >= masks.len()) {
        return bad(format!(
            "track {} ends in frame {}, after the last mask ({})",
            t.label,
            t.end,
            masks.len().saturating_sub(1)
        ));
    }
    Ok(())
}

/// Edges of a tracking graph, with their kind (`false`: track link, `true`: parent link).
fn edges(labels: &[Vec<u32>], tracks: &[TrackRecord]) -> BTreeMap<(Vertex, Vertex), bool> {
    let mut out = BTreeMap::new();
    for t in 0..labels.len().saturating_sub(1) {
        let next: HashSet<u32> = labels[t + 1].iter().copied().collect();
        for &l in &labels[t] {
            if next.contains(&l) {
                out.insert(((t, l), (t + 1, l)), false);
            }
        }
    }
    let by_label: HashMap<u32, &TrackRecord> = tracks.iter().map(|t| (t.label, t)).collect();
    for t in tracks {
        if let Some(p) = by_label.get(&t.parent) {
            out.insert(
                ((p.end as usize, p.label), (t.begin as usize, t.label)),
                true,
            );
        }
    }
    out
}

/// Mothers (labels with two or more children), with their children.
fn mothers(tracks: &[TrackRecord]) -> BTreeMap<u32, Vec<&TrackRecord>> {
    let mut out: BTreeMap<u32, Vec<&TrackRecord>> = BTreeMap::new();
    for t in tracks.iter().filter(|t| t.parent != 0) {
        out.entry(t.parent).or_default().push(t);
    }
    out.retain(|_, c| c.len() > 1);
    out
}

/// Compares a tracking result with the reference: AOGM counts and division counts.
/// `reference` masks are the TRA ground truth (markers or full masks), one per frame,
/// aligned with `result`'s.
///
/// # Errors
/// Different frame counts or sizes, or an invalid result (see [`validate`]).
pub fn compare(
    reference: (&[Labels], &[TrackRecord]),
    result: (&[Labels], &[TrackRecord]),
) -> Result<(AogmCounts, DivisionCounts), MeasureError> {
    let (ref_masks, ref_tracks) = reference;
    let (res_masks, res_tracks) = result;
    if ref_masks.len() != res_masks.len() {
        return Err(MeasureError::Mismatch(format!(
            "{} reference frames, {} result frames",
            ref_masks.len(),
            res_masks.len()
        )));
    }
    validate(res_masks, res_tracks)?;
    let mut c = AogmCounts::default();
    let mut ref_labels = Vec::with_capacity(ref_masks.len());
    let mut res_labels = Vec::with_capacity(ref_masks.len());
    // Detection test: reference vertex -> result vertex, and detections per result vertex.
    let mut detected_by: HashMap<Vertex, Vertex> = HashMap::new();
    let mut detections: HashMap<Vertex, u64> = HashMap::new();
    for (f, (g, r)) in ref_masks.iter().zip(res_masks).enumerate() {
        if !g.same_shape(r) {
            return Err(MeasureError::Mismatch(format!(
                "frame {f}: reference size {:?}, result size {:?}",
                g.shape(),
                r.shape()
            )));
        }
        let o = Overlaps::new(g, r);
        for (&(gl, rl), &inter) in &o.pairs {
            if 2 * inter > o.gt_area[&gl] {
                detected_by.insert((f, gl), (f, rl));
                *detections.entry((f, rl)).or_default() += 1;
            }
        }
        let gl = g.ids();
        let rl = r.ids();
        c.vertices += gl.len() as u64;
        c.fn_ += gl
            .iter()
            .filter(|&&l| !detected_by.contains_key(&(f, l)))
            .count() as u64;
        for &l in &rl {
            match detections.get(&(f, l)).copied().unwrap_or(0) {
                0 => c.fp += 1,
                k => c.ns += k - 1,
            }
        }
        ref_labels.push(gl);
        res_labels.push(rl);
    }
    // Result vertices detecting exactly one reference vertex, mapped to it.
    let to_ref: HashMap<Vertex, Vertex> = detected_by
        .iter()
        .filter(|(_, r)| detections[r] == 1)
        .map(|(g, r)| (*r, *g))
        .collect();
    let ref_edges = edges(&ref_labels, ref_tracks);
    let res_edges = edges(&res_labels, res_tracks);
    c.edges = ref_edges.len() as u64;
    let mut found = HashSet::new();
    for ((a, b), kind) in &res_edges {
        let (Some(ra), Some(rb)) = (to_ref.get(a), to_ref.get(b)) else {
            continue;
        };
        match ref_edges.get(&(*ra, *rb)) {
            Some(k) => {
                found.insert((*ra, *rb));
                if k != kind {
                    c.ec += 1;
                }
            }
            None => c.ed += 1,
        }
    }
    c.ea = c.edges - found.len() as u64;
    // Divisions.
    let ref_mothers = mothers(ref_tracks);
    let res_mothers = mothers(res_tracks);
    let res_by_label: HashMap<u32, &TrackRecord> =
        res_tracks.iter().map(|t| (t.label, t)).collect();
    let ref_by_label: HashMap<u32, &TrackRecord> =
        ref_tracks.iter().map(|t| (t.label, t)).collect();
    let mut tp = 0u64;
    for (rm, rkids) in &res_mothers {
        let Some(rmt) = res_by_label.get(rm) else {
            continue;
        };
        let f = rmt.end as usize;
        let Some(&gm) = to_ref.get(&(f, *rm)) else {
            continue;
        };
        let Some(gkids) = ref_mothers.get(&gm.1) else {
            continue;
        };
        if ref_by_label.get(&gm.1).is_none_or(|t| t.end as usize != f) || gkids.len() != rkids.len()
        {
            continue;
        }
        let all = gkids.iter().all(|gk| {
            rkids.iter().any(|rk| {
                rk.begin == gk.begin
                    && to_ref.get(&(rk.begin as usize, rk.label))
                        == Some(&(gk.begin as usize, gk.label))
            })
        });
        if all {
            tp += 1;
        }
    }
    let d = DivisionCounts {
        tp,
        fp: res_mothers.len() as u64 - tp,
        fn_: ref_mothers.len() as u64 - tp,
    };
    Ok((c, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::Volume;

    fn rec(label: u32, begin: u32, end: u32, parent: u32) -> TrackRecord {
        TrackRecord::new(label, begin, end, parent)
    }

    fn row(v: &[u32]) -> Labels {
        Volume::from_2d(1, v.len(), v.to_vec())
    }

    /// Reference: cell 1 in frames 0-1 divides into 2 and 3 (frames 2-3).
    fn reference() -> (Vec<Labels>, Vec<TrackRecord>) {
        (
            vec![
                row(&[1, 1, 1, 1, 0, 0, 0, 0]),
                row(&[1, 1, 1, 1, 0, 0, 0, 0]),
                row(&[2, 2, 0, 3, 3, 0, 0, 0]),
                row(&[2, 2, 0, 3, 3, 0, 0, 0]),
            ],
            vec![rec(1, 0, 1, 0), rec(2, 2, 3, 1), rec(3, 2, 3, 1)],
        )
    }

    #[test]
    fn a_perfect_result_scores_one() {
        let (m, t) = reference();
        let (c, d) = compare((&m, &t), (&m, &t)).unwrap();
        assert_eq!(
            c,
            AogmCounts {
                vertices: 6,
                edges: 5,
                ..AogmCounts::default()
            }
        );
        assert_eq!(
            (c.det(), c.tra(), c.lnk()),
            (Some(1.0), Some(1.0), Some(1.0))
        );
        assert_eq!(
            d,
            DivisionCounts {
                tp: 1,
                fp: 0,
                fn_: 0
            }
        );
    }

    #[test]
    fn known_errors_have_known_costs() {
        let (m, t) = reference();
        // The result misses the division (daughter 3 starts a new track without parent),
        // adds a false positive in frame 3, and switches cell 1's label in frame 1.
        let res = vec![
            row(&[1, 1, 1, 1, 0, 0, 0, 0]),
            row(&[4, 4, 4, 4, 0, 0, 0, 0]),
            row(&[2, 2, 0, 3, 3, 0, 0, 0]),
            row(&[2, 2, 0, 3, 3, 0, 5, 5]),
        ];
        let tracks = vec![
            rec(1, 0, 0, 0),
            rec(4, 1, 1, 0),
            rec(2, 2, 3, 4),
            rec(3, 2, 3, 0),
            rec(5, 3, 3, 0),
        ];
        let (c, d) = compare((&m, &t), (&res, &tracks)).unwrap();
        // Vertices all detected; one FP. Edges: ref 1->1 (track link) missing (EA),
        // 1->3 parent link missing (EA), 1->2 present as a parent link (ok).
        assert_eq!((c.ns, c.fn_, c.fp, c.ed, c.ea, c.ec), (0, 0, 1, 0, 2, 0));
        assert_eq!(c.aogm(), 1.0 + 3.0);
        assert!((c.tra().unwrap() - (1.0 - 4.0 / (60.0 + 7.5))).abs() < 1e-12);
        assert_eq!(
            d,
            DivisionCounts {
                tp: 0,
                fp: 0,
                fn_: 1
            }
        );
    }

    #[test]
    fn a_merged_object_needs_a_split() {
        let g = vec![row(&[1, 1, 0, 2, 2])];
        let r = vec![row(&[7, 7, 7, 7, 7])];
        let (c, _) = compare(
            (&g, &[rec(1, 0, 0, 0), rec(2, 0, 0, 0)]),
            (&r, &[rec(7, 0, 0, 0)]),
        )
        .unwrap();
        assert_eq!((c.ns, c.fn_, c.fp), (1, 0, 0));
        assert_eq!(c.det(), Some(1.0 - 5.0 / 20.0));
        assert_eq!(c.lnk(), None);
    }

    #[test]
    fn invalid_results_are_refused_with_a_reason() {
        let (m, t) = reference();
        let mut bad = t.clone();
        bad[1].parent = 9;
        assert!(
            matches!(compare((&m, &t), (&m, &bad)), Err(MeasureError::Invalid(e)) if e.contains("parent 9"))
        );
        let mut bad = t.clone();
        bad[0].end = 2;
        assert!(compare((&m, &t), (&m, &bad)).is_err());
        assert!(matches!(
            compare((&m, &t), (&m[..2], &t[..1])),
            Err(MeasureError::Mismatch(_))
        ));
    }
}
