//! Segmentation scores: instance matching and the CTC SEG measure.
//!
//! - [`match_instances`]: predicted and ground-truth objects are paired by an optimal
//!   assignment (Hungarian, maximising the summed IoU) among pairs with IoU at or above
//!   the threshold. TP = matched pairs, FP = unmatched predictions, FN = unmatched ground
//!   truth; precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean,
//!   AP = TP / (TP + FP + FN) (the "average precision" of the cell-segmentation
//!   literature at one threshold), and the mean IoU of matched pairs. For thresholds
//!   above 0.5 the matching is unique, so the assignment only matters below.
//! - [`SegMeasure`]: the Cell Tracking Challenge's SEG: each ground-truth object is
//!   paired with the predicted object covering more than half of it; its score is their
//!   Jaccard index (0 if no such object); SEG is the mean over all ground-truth objects of
//!   all frames.
//!
//! Both work on 2D or 3D label images and accumulate over frames.

use std::collections::HashMap;

use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;
use serde::Serialize;

use crate::data::volume::Labels;

/// Overlaps between the objects of two label images of the same shape.
#[derive(Debug, Clone, Default)]
pub struct Overlaps {
    /// Pixels per ground-truth label.
    pub gt_area: HashMap<u32, u64>,
    /// Pixels per predicted label.
    pub pred_area: HashMap<u32, u64>,
    /// Pixels per (ground truth, prediction) pair that overlaps.
    pub pairs: HashMap<(u32, u32), u64>,
}

impl Overlaps {
    /// Counts the overlaps of `gt` and `pred`.
    ///
    /// # Panics
    /// If the shapes differ (callers check; a programming error otherwise).
    #[must_use]
    pub fn new(gt: &Labels, pred: &Labels) -> Self {
        assert!(gt.same_shape(pred), "label images of different shapes");
        let mut o = Self::default();
        for (&g, &p) in gt.data.iter().zip(&pred.data) {
            if g != 0 {
                *o.gt_area.entry(g).or_default() += 1;
            }
            if p != 0 {
                *o.pred_area.entry(p).or_default() += 1;
            }
            if g != 0 && p != 0 {
                *o.pairs.entry((g, p)).or_default() += 1;
            }
        }
        o
    }

    /// Intersection over union of a pair.
    #[must_use]
    pub fn iou(&self, g: u32, p: u32) -> f64 {
        let inter = self.pairs.get(&(g, p)).copied().unwrap_or(0) as f64;
        let union = (self.gt_area[&g] + self.pred_area[&p]) as f64 - inter;
        if union > 0.0 { inter / union } else { 0.0 }
    }
}

/// Counts from instance matching, summable over frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MatchCounts {
    /// Matched pairs.
    pub tp: u64,
    /// Unmatched predictions.
    pub fp: u64,
    /// Unmatched ground-truth objects.
    pub fn_: u64,
    /// Sum of the IoU of matched pairs.
    pub iou_sum: f64,
}

impl std::ops::AddAssign for MatchCounts {
    fn add_assign(&mut self, o: Self) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.iou_sum += o.iou_sum;
    }
}

/// Scores derived from [`MatchCounts`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MatchScores {
    /// IoU threshold.
    pub threshold: f64,
    /// TP / (TP + FP).
    pub precision: f64,
    /// TP / (TP + FN).
    pub recall: f64,
    /// 2 TP / (2 TP + FP + FN).
    pub f1: f64,
    /// TP / (TP + FP + FN).
    pub ap: f64,
    /// Mean IoU of matched pairs.
    pub mean_matched_iou: f64,
    /// The counts.
    pub counts: MatchCounts,
}

impl MatchCounts {
    /// The scores at `threshold`. Empty ratios (no predictions, no objects) count as 1
    /// when nothing was there to find and nothing was predicted, else 0.
    #[must_use]
    pub fn scores(&self, threshold: f64) -> MatchScores {
        let (tp, fp, fn_) = (self.tp as f64, self.fp as f64, self.fn_ as f64);
        let ratio = |num: f64, den: f64| {
            if den > 0.0 {
                num / den
            } else if self.fp + self.fn_ == 0 {
                1.0
            } else {
                0.0
            }
        };
        MatchScores {
            threshold,
            precision: ratio(tp, tp + fp),
            recall: ratio(tp, tp + fn_),
            f1: ratio(2.0 * tp, 2.0 * tp + fp + fn_),
            ap: ratio(tp, tp + fp + fn_),
            mean_matched_iou: if self.tp > 0 { self.iou_sum / tp } else { 0.0 },
            counts: *self,
        }
    }
}

/// Matches the objects of one frame at an IoU threshold.
#[must_use]
pub fn match_counts(o: &Overlaps, threshold: f64) -> MatchCounts {
    let mut gts: Vec<u32> = o.gt_area.keys().copied().collect();
    let mut preds: Vec<u32> = o.pred_area.keys().copied().collect();
    gts.sort_unstable();
    preds.sort_unstable();
    // Candidate pairs; only objects with a candidate enter the assignment.
    let candidates: Vec<(u32, u32, f64)> = o
        .pairs
        .keys()
        .map(|&(g, p)| (g, p, o.iou(g, p)))
        .filter(|&(_, _, iou)| iou >= threshold && iou > 0.0)
        .collect();
    let mut cg: Vec<u32> = candidates.iter().map(|c| c.0).collect();
    let mut cp: Vec<u32> = candidates.iter().map(|c| c.1).collect();
    cg.sort_unstable();
    cg.dedup();
    cp.sort_unstable();
    cp.dedup();
    let (mut tp, mut iou_sum) = (0u64, 0f64);
    if !candidates.is_empty() {
        // Rows must not outnumber columns.
        let transpose = cg.len() > cp.len();
        let (rows, cols) = if transpose { (&cp, &cg) } else { (&cg, &cp) };
        let mut m = Matrix::new(rows.len(), cols.len(), 0i64);
        for &(g, p, iou) in &candidates {
            let (r, c) = if transpose { (p, g) } else { (g, p) };
            let (Ok(ri), Ok(ci)) = (rows.binary_search(&r), cols.binary_search(&c)) else {
                continue;
            };
            // Weight 1 + IoU scaled: any valid pair beats none; among those, more IoU wins.
            m[(ri, ci)] = 1_000_000_000 + (iou * 1e6).round() as i64;
        }
        let (_, assignment) = kuhn_munkres(&m);
        for (ri, &ci) in assignment.iter().enumerate() {
            if m[(ri, ci)] > 0 {
                tp += 1;
                let (g, p) = if transpose {
                    (cols[ci], rows[ri])
                } else {
                    (rows[ri], cols[ci])
                };
                iou_sum += o.iou(g, p);
            }
        }
    }
    MatchCounts {
        tp,
        fp: preds.len() as u64 - tp,
        fn_: gts.len() as u64 - tp,
        iou_sum,
    }
}

/// Matches one frame's objects and returns its scores.
#[must_use]
pub fn match_instances(gt: &Labels, pred: &Labels, threshold: f64) -> MatchScores {
    match_counts(&Overlaps::new(gt, pred), threshold).scores(threshold)
}

/// The CTC SEG measure accumulated over frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SegMeasure {
    /// Sum of the per-object Jaccard indices.
    pub jaccard_sum: f64,
    /// Ground-truth objects seen.
    pub objects: u64,
}

impl SegMeasure {
    /// Adds one frame.
    pub fn add(&mut self, o: &Overlaps) {
        for (&g, &area) in &o.gt_area {
            self.objects += 1;
            // At most one prediction can cover more than half of g.
            let best = o
                .pairs
                .iter()
                .filter(|((gg, _), inter)| *gg == g && 2 * **inter > area)
                .map(|((_, p), _)| o.iou(g, *p))
                .next();
            self.jaccard_sum += best.unwrap_or(0.0);
        }
    }

    /// SEG: the mean Jaccard index over all ground-truth objects (0 when there are none).
    #[must_use]
    pub fn value(&self) -> f64 {
        if self.objects == 0 {
            0.0
        } else {
            self.jaccard_sum / self.objects as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::Volume;

    fn img(rows: &[&[u32]]) -> Labels {
        let h = rows.len();
        let w = rows[0].len();
        Volume::from_2d(h, w, rows.iter().flat_map(|r| r.iter().copied()).collect())
    }

    #[test]
    fn perfect_prediction_with_other_label_values() {
        let gt = img(&[&[1, 1, 0, 2], &[1, 1, 0, 2]]);
        let pred = img(&[&[7, 7, 0, 3], &[7, 7, 0, 3]]);
        let s = match_instances(&gt, &pred, 0.5);
        assert_eq!((s.counts.tp, s.counts.fp, s.counts.fn_), (2, 0, 0));
        assert_eq!(
            (s.precision, s.recall, s.f1, s.ap, s.mean_matched_iou),
            (1.0, 1.0, 1.0, 1.0, 1.0)
        );
        let mut seg = SegMeasure::default();
        seg.add(&Overlaps::new(&gt, &pred));
        assert_eq!(seg.value(), 1.0);
    }

    #[test]
    fn known_answers_for_partial_overlap_split_and_miss() {
        // GT: object 1 (4 px), object 2 (4 px), object 3 (2 px, missed).
        // Pred: A covers object 1 plus 2 extra px (IoU 4/6); B and C split object 2 in halves;
        // D is a false positive.
        let gt = img(&[
            &[1, 1, 0, 2, 2, 0, 3],
            &[1, 1, 0, 2, 2, 0, 3],
            &[0, 0, 0, 0, 0, 0, 0],
        ]);
        let pred = img(&[
            &[1, 1, 1, 2, 3, 0, 0],
            &[1, 1, 1, 2, 3, 0, 0],
            &[0, 0, 0, 0, 0, 0, 4],
        ]);
        let s = match_instances(&gt, &pred, 0.5);
        // Only (1, A) reaches IoU 0.5; B and C each have IoU 0.5 with object 2 exactly.
        assert_eq!(s.counts.tp, 2, "{s:?}");
        assert_eq!((s.counts.fp, s.counts.fn_), (2, 1));
        assert!((s.precision - 0.5).abs() < 1e-12);
        assert!((s.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.f1 - 4.0 / 7.0).abs() < 1e-12);
        assert!((s.ap - 0.4).abs() < 1e-12);
        assert!((s.mean_matched_iou - (4.0 / 6.0 + 0.5) / 2.0).abs() < 1e-12);
        let strict = match_instances(&gt, &pred, 0.6);
        assert_eq!(
            (strict.counts.tp, strict.counts.fp, strict.counts.fn_),
            (1, 3, 2)
        );
        // SEG: object 1 -> A (J = 4/6); object 2: no prediction covers more than half; object 3: none.
        let mut seg = SegMeasure::default();
        seg.add(&Overlaps::new(&gt, &pred));
        assert!((seg.value() - (4.0 / 6.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn low_thresholds_use_an_optimal_assignment() {
        // IoU(g1, p1) = 7/13, IoU(g1, p2) = 3/10, IoU(g2, p1) = 3/13. Greedy by IoU takes
        // (g1, p1) and leaves g2 and p2 unmatched; the optimal assignment matches both.
        let gt = img(&[&[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]]);
        let pred = img(&[&[2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]]);
        let s = match_instances(&gt, &pred, 0.2);
        assert_eq!((s.counts.tp, s.counts.fp, s.counts.fn_), (2, 0, 0), "{s:?}");
        let strict = match_instances(&gt, &pred, 0.5);
        assert_eq!(strict.counts.tp, 1);
    }

    #[test]
    fn empty_images() {
        let e = img(&[&[0, 0]]);
        let one = img(&[&[0, 1]]);
        assert_eq!(match_instances(&e, &e, 0.5).f1, 1.0);
        assert_eq!(match_instances(&e, &one, 0.5).f1, 0.0);
        assert_eq!(match_instances(&one, &e, 0.5).recall, 0.0);
        let mut seg = SegMeasure::default();
        seg.add(&Overlaps::new(&e, &one));
        assert_eq!(seg.value(), 0.0);
    }
}
