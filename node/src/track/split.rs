//! Cells the segmenter merged as they came to touch: split before linking.
//!
//! A fresh daughter is small and lies against her sister and her neighbours, and a
//! segmenter that sees one blob where a daughter touches a neighbour hands the tracker a
//! neighbour that suddenly grew; the daughter never appears, and her division is lost.
//! The frames themselves say what happened: the object grew by half or more over the
//! object it continues, that object lies mostly inside it, no other object of the frame
//! before does (two cells that were apart and now touch are left alone, and so is a
//! cut nucleus whole again), the new mass came from where another object was (the
//! mother), and it is at least as large as the frame's median object (a fresh daughter
//! that grows fast is not). Such an object is cut in two by 2-means on its pixel
//! coordinates, one centre on the part that continues the old object and one on the new
//! part; a cut is kept only when the continuing part is about as large as the object it
//! continues and the new part is a plausible cell (a quarter of it at least). A merge
//! lasts as long as the two cells touch, so a cut made in one frame is made again in the
//! next one wherever one object holds most of both parts, this time with the parts'
//! centroids as centres.

use std::collections::HashMap;

use super::{TrackOptions, estimate_shift, objects, overlaps, shifted};
use crate::data::volume::Labels;

/// Least share of the old object's area that the continuing part must have.
const KEEP_MIN: f64 = 0.6;
/// Most share of the old object's area that the continuing part may have.
const KEEP_MAX: f64 = 1.5;
/// Least size of a part, against the old object (a new merge) or the whole (a merge
/// carried on).
const PART_MIN: f64 = 0.25;

/// Why an object is cut, and around which centres.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// A merge first seen here: the object continues `old` (index in the frame before).
    New { old: usize },
    /// A cut of the frame before carried on: centres are those parts' centroids.
    Carried { centres: [[f64; 3]; 2] },
}

/// Splits merges in `frames` (see the module documentation), frame after frame, in
/// place. Returns how many objects were cut.
pub(super) fn split_merges(frames: &mut [Labels], opts: &TrackOptions) -> usize {
    if opts.split_growth <= 0.0 {
        return 0;
    }
    let mut cut_before: Vec<(u32, u32)> = Vec::new();
    let mut count = 0;
    for t in 1..frames.len() {
        let (done, rest) = frames.split_at_mut(t);
        let (a, b) = (&done[t - 1], &mut rest[0]);
        let shift = if opts.drift_radius > 0 {
            estimate_shift(a, b, opts.drift_radius as isize)
        } else {
            (0, 0)
        };
        let oa = shifted(&objects(a, opts.border_margin), shift);
        let ob = objects(b, opts.border_margin);
        let inter = overlaps(a, b, &oa, &ob, shift);
        let mut into: Vec<Vec<(usize, u64)>> = vec![Vec::new(); ob.len()];
        for (&(i, j), &x) in &inter {
            into[j].push((i, x));
        }
        let index_of: HashMap<u32, usize> =
            oa.iter().enumerate().map(|(k, o)| (o.label, k)).collect();
        // Two cells merged are larger than a typical cell of the frame; a fresh daughter
        // that grew fast is not.
        let mut sizes: Vec<u64> = ob.iter().map(|o| o.area).collect();
        sizes.sort_unstable();
        let typical = sizes.get(sizes.len() / 2).copied().unwrap_or(0);
        let mut cuts: HashMap<u32, Cut> = HashMap::new();
        for (j, o) in ob.iter().enumerate() {
            if o.at_border {
                continue;
            }
            let mut from = std::mem::take(&mut into[j]);
            from.sort_unstable_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
            let inside: Vec<usize> = from
                .iter()
                .filter(|&&(i, x)| 2 * x > oa[i].area)
                .map(|&(i, _)| i)
                .collect();
            let carried = cut_before.iter().find_map(|&(l1, l2)| {
                let (p, q) = (*index_of.get(&l1)?, *index_of.get(&l2)?);
                (inside.contains(&p) && inside.contains(&q)).then_some([p, q])
            });
            if let Some([p, q]) = carried {
                let centres = [oa[p].centroid, oa[q].centroid];
                cuts.insert(o.label, Cut::Carried { centres });
                continue;
            }
            let Some(&(old, _)) = from.first() else {
                continue;
            };
            let grew =
                o.area as f64 >= opts.split_growth * oa[old].area as f64 && o.area >= typical;
            if inside == [old] && from.len() >= 2 && grew && !oa[old].at_border {
                cuts.insert(o.label, Cut::New { old });
            }
        }
        if cuts.is_empty() {
            cut_before.clear();
            continue;
        }
        // The pixels of each object to cut, and for a new merge whether each lies on
        // the old object.
        let mut pixels: HashMap<u32, Vec<(usize, bool)>> = HashMap::new();
        let (h, w) = (b.height, b.width);
        let plane = h * w;
        for (k, &lab) in b.data.iter().enumerate() {
            let Some(cut) = cuts.get(&lab) else { continue };
            let on_old = match *cut {
                Cut::New { old } => {
                    let (z, y, x) = (k / plane, (k % plane) / w, k % w);
                    let (yy, xx) = (y as isize - shift.0, x as isize - shift.1);
                    (0..h as isize).contains(&yy)
                        && (0..w as isize).contains(&xx)
                        && a.data[z * plane + yy as usize * w + xx as usize] == oa[old].label
                }
                Cut::Carried { .. } => false,
            };
            pixels.entry(lab).or_default().push((k, on_old));
        }
        let mut next_label = ob.last().map_or(1, |o| o.label + 1);
        let mut cut_here = Vec::new();
        let mut labels: Vec<u32> = cuts.keys().copied().collect();
        labels.sort_unstable();
        for lab in labels {
            let px = &pixels[&lab];
            let coords: Vec<[f64; 3]> = px.iter().map(|&(k, _)| coords_of(k, h, w)).collect();
            let (centres, bounds) = match cuts[&lab] {
                Cut::New { old } => {
                    let on: Vec<[f64; 3]> = px
                        .iter()
                        .zip(&coords)
                        .filter(|((_, on), _)| *on)
                        .map(|(_, c)| *c)
                        .collect();
                    let off: Vec<[f64; 3]> = px
                        .iter()
                        .zip(&coords)
                        .filter(|((_, on), _)| !*on)
                        .map(|(_, c)| *c)
                        .collect();
                    let (Some(c1), Some(c2)) = (mean(&on), mean(&off)) else {
                        continue;
                    };
                    let area = oa[old].area as f64;
                    (
                        [c1, c2],
                        [
                            (KEEP_MIN * area, KEEP_MAX * area),
                            (PART_MIN * area, f64::MAX),
                        ],
                    )
                }
                Cut::Carried { centres } => {
                    let min = PART_MIN * px.len() as f64;
                    (centres, [(min, f64::MAX), (min, f64::MAX)])
                }
            };
            let Some(side) = two_means(&coords, centres) else {
                continue;
            };
            let second = side.iter().filter(|s| **s).count() as f64;
            let first = side.len() as f64 - second;
            if !(bounds[0].0..=bounds[0].1).contains(&first)
                || !(bounds[1].0..=bounds[1].1).contains(&second)
            {
                continue;
            }
            for (&(k, _), _) in px.iter().zip(&side).filter(|(_, s)| **s) {
                b.data[k] = next_label;
            }
            cut_here.push((lab, next_label));
            next_label += 1;
            count += 1;
        }
        cut_before = cut_here;
    }
    count
}

/// `(z, y, x)` of voxel `k` of a `h × w` plane stack.
fn coords_of(k: usize, h: usize, w: usize) -> [f64; 3] {
    let plane = h * w;
    [(k / plane) as f64, ((k % plane) / w) as f64, (k % w) as f64]
}

/// The mean of points, or `None` for none.
fn mean(points: &[[f64; 3]]) -> Option<[f64; 3]> {
    if points.is_empty() {
        return None;
    }
    let n = points.len() as f64;
    Some(std::array::from_fn(|d| {
        points.iter().map(|p| p[d]).sum::<f64>() / n
    }))
}

/// 2-means from `centres`: for each point, whether it belongs to the second cluster.
/// `None` when a cluster empties.
fn two_means(points: &[[f64; 3]], mut centres: [[f64; 3]; 2]) -> Option<Vec<bool>> {
    let dist = |p: &[f64; 3], c: &[f64; 3]| -> f64 { (0..3).map(|d| (p[d] - c[d]).powi(2)).sum() };
    let mut side: Vec<bool> = Vec::new();
    for _ in 0..16 {
        let next: Vec<bool> = points
            .iter()
            .map(|p| dist(p, &centres[1]) < dist(p, &centres[0]))
            .collect();
        if next == side {
            break;
        }
        side = next;
        let pick = |s: bool| -> Vec<[f64; 3]> {
            points
                .iter()
                .zip(&side)
                .filter(|(_, x)| **x == s)
                .map(|(p, _)| *p)
                .collect()
        };
        centres = [mean(&pick(false))?, mean(&pick(true))?];
    }
    Some(side)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with filled rectangles `(label, y0, y1, x0, x1)` (ends exclusive).
    fn frame(h: usize, w: usize, boxes: &[(u32, usize, usize, usize, usize)]) -> Labels {
        let mut data = vec![0u32; h * w];
        for &(l, y0, y1, x0, x1) in boxes {
            for y in y0..y1 {
                for x in x0..x1 {
                    data[y * w + x] = l;
                }
            }
        }
        Labels::from_2d(h, w, data)
    }

    fn opts() -> TrackOptions {
        TrackOptions {
            drift_radius: 0,
            ..TrackOptions::default()
        }
    }

    /// A neighbour (label 1) and a mother (label 2) at frame 0; at frame 1 one daughter
    /// is merged with the neighbour (label 1 grows), the other is apart (label 2); the
    /// merge lasts one more frame.
    fn daughter_merged_into_a_neighbour() -> Vec<Labels> {
        vec![
            frame(40, 60, &[(1, 10, 20, 5, 15), (2, 10, 20, 18, 30)]),
            frame(40, 60, &[(1, 10, 20, 5, 22), (2, 10, 20, 24, 32)]),
            frame(40, 60, &[(1, 10, 20, 5, 22), (2, 10, 20, 25, 33)]),
        ]
    }

    #[test]
    fn a_daughter_merged_into_a_neighbour_is_cut_out_and_the_cut_carried_on() {
        let mut f = daughter_merged_into_a_neighbour();
        assert_eq!(split_merges(&mut f, &opts()), 2);
        for (t, m) in f.iter().enumerate().skip(1) {
            let ids = m.ids();
            assert_eq!(ids.len(), 3, "frame {t}: {ids:?}");
            // The neighbour keeps its label where it was; the new part is the daughter.
            assert_eq!(m.at(0, 15, 8), 1);
            assert_ne!(m.at(0, 15, 20), 1);
            assert_ne!(m.at(0, 15, 20), 2);
        }
        // The tracker then finds the division.
        let mut frames = daughter_merged_into_a_neighbour();
        frames.insert(0, frames[0].clone());
        let r = super::super::track(&frames, &opts()).unwrap();
        assert_eq!(r.divisions, 1);
        assert_eq!(r.merges_split, 2);
    }

    #[test]
    fn growth_without_new_mass_from_another_object_is_not_cut() {
        // A nucleus seen whole after a frame in which only part of it was found.
        let mut f = vec![
            frame(40, 60, &[(1, 10, 20, 5, 12)]),
            frame(40, 60, &[(1, 10, 20, 5, 20)]),
        ];
        let before = f.clone();
        assert_eq!(split_merges(&mut f, &opts()), 0);
        assert!(f == before);
    }

    #[test]
    fn a_small_cell_that_grows_fast_is_not_cut() {
        // A fresh daughter (label 1) grows by 60 % beside her sister (label 2); the
        // frame's typical cells (3 and 4) are far larger than she is.
        let big = [(3, 25, 39, 5, 20), (4, 25, 39, 30, 45)];
        let mut f = vec![
            frame(
                40,
                60,
                &[&[(1, 10, 15, 5, 15), (2, 10, 20, 16, 26)], &big[..]].concat(),
            ),
            frame(
                40,
                60,
                &[&[(1, 10, 18, 5, 18), (2, 10, 20, 19, 29)], &big[..]].concat(),
            ),
        ];
        let before = f.clone();
        assert_eq!(split_merges(&mut f, &opts()), 0);
        assert!(f == before);
    }

    #[test]
    fn two_cells_that_come_to_touch_or_a_cut_nucleus_whole_again_are_not_cut() {
        // Both objects of frame 0 lie mostly inside the one object of frame 1.
        let mut f = vec![
            frame(40, 60, &[(1, 10, 20, 5, 15), (2, 10, 20, 16, 26)]),
            frame(40, 60, &[(1, 10, 20, 5, 26)]),
        ];
        assert_eq!(split_merges(&mut f, &opts()), 0);
        assert_eq!(f[1].ids(), vec![1]);
    }

    #[test]
    fn switched_off_nothing_changes() {
        let mut f = daughter_merged_into_a_neighbour();
        let before = f.clone();
        let off = TrackOptions {
            split_growth: 0.0,
            ..opts()
        };
        assert_eq!(split_merges(&mut f, &off), 0);
        assert!(f == before);
    }
}
