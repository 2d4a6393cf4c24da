//! Tracking by detection: instance masks of consecutive frames are linked into tracks,
//! with divisions and short gaps, and written as Cell Tracking Challenge results.
//!
//! The steps (docs/tracking.md explains each and when to change its parameters):
//!
//! 1. **Objects**: every label of every frame becomes an object with its area, centroid
//!    and whether it touches the field of view's border.
//! 2. **Frame-to-frame linking**: pairs whose IoU exceeds 0.5 are linked at once (such
//!    pairs are necessarily one-to-one). The remaining objects of frames `t` and `t + 1`
//!    are paired by an optimal assignment (Hungarian method, [`pathfinding`]) that
//!    minimises `(1 - IoU) + distance_weight * d / max_distance`, where `d` is the
//!    centroid distance; pairs that neither overlap nor lie within `max_distance` are
//!    never linked, and leaving an object unlinked costs `1` on each side, so a link is
//!    made only when it costs less than a death plus a birth. The problem is solved per
//!    connected group of candidate pairs, which keeps it small on crowded frames.
//! 3. **Divisions**: an object of frame `t` becomes a mother when two objects of frame
//!    `t + 1`, at least one of them otherwise unlinked, pass the plausibility rules
//!    ([`DivisionRules`]): similar daughter sizes, daughters together about the mother's
//!    size, and their midpoint within the mother's radius of her centroid. Candidates are
//!    taken best first; each object is mother or daughter at most once per frame pair.
//! 4. **Gap closing**: a track that ends away from the border (not a mother, not in the
//!    last frame) is continued by a track that starts away from the border without a
//!    parent up to `max_gap` frames later, again by an optimal assignment on distance and
//!    size. Following the CTC format, the continuation keeps its own label and names the
//!    interrupted track as its parent.
//! 5. **Output**: one label per track (1, 2, ... in order of appearance), relabelled masks
//!    and `L B E P` records.
//!
//! Objects touching the border start and end tracks freely: cells enter and leave the
//! field of view there, so such ends are never gap-closed.

use std::collections::{BTreeMap, HashMap};

use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;
use serde::{Deserialize, Serialize};

use crate::data::ctc::TrackRecord;
use crate::data::volume::Labels;

/// Plausibility rules for a division (one mother, two daughters).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DivisionRules {
    /// Smallest ratio of the smaller daughter's area to the larger's.
    pub min_daughter_ratio: f64,
    /// Range of (daughters' summed area) / (mother's area).
    pub area_ratio: (f64, f64),
    /// Largest distance between the mother's centroid and the daughters' midpoint, in
    /// mother radii (the radius of a disc, or ball in 3D, of the mother's area).
    pub max_offset: f64,
}

impl Default for DivisionRules {
    fn default() -> Self {
        Self {
            min_daughter_ratio: 0.4,
            area_ratio: (0.5, 2.0),
            max_offset: 1.0,
        }
    }
}

/// How masks are linked into tracks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrackOptions {
    /// Largest centroid displacement between consecutive frames for objects that do not
    /// overlap, in pixels.
    pub max_distance: f64,
    /// Weight of the distance term in the linking cost (the overlap term has weight 1).
    pub distance_weight: f64,
    /// Longest gap closed, in missing frames (0 disables gap closing).
    pub max_gap: u32,
    /// Division detection, or `None` to link one-to-one only.
    pub divisions: Option<DivisionRules>,
    /// Pixels from the edge within which an object counts as touching the border.
    pub border_margin: usize,
    /// Stage drift is compensated before linking: a global translation is searched
    /// within this many pixels of the foregrounds' centroid shift (0: no compensation).
    pub drift_radius: usize,
}

impl Default for TrackOptions {
    fn default() -> Self {
        Self {
            max_distance: 30.0,
            distance_weight: 1.0,
            max_gap: 2,
            divisions: Some(DivisionRules::default()),
            border_margin: 1,
            drift_radius: 12,
        }
    }
}

/// What went wrong tracking.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrackError {
    /// No frames were given.
    #[error("no frames to track")]
    NoFrames,
    /// Frames differ in size.
    #[error("frame {frame} has size {found:?}, frame 0 has {expected:?}")]
    SizeMismatch {
        /// The frame index.
        frame: usize,
        /// Its (depth, height, width).
        found: (usize, usize, usize),
        /// Frame 0's.
        expected: (usize, usize, usize),
    },
}

/// One object (label) of one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Its label in the input mask.
    pub label: u32,
    /// Voxels.
    pub area: u64,
    /// Centroid `(z, y, x)` in pixels.
    pub centroid: [f64; 3],
    /// Whether it touches the border (within the margin) of its plane.
    pub at_border: bool,
}

impl Object {
    fn distance(&self, o: &Object) -> f64 {
        let d: f64 = (0..3)
            .map(|k| (self.centroid[k] - o.centroid[k]).powi(2))
            .sum();
        d.sqrt()
    }

    fn radius(&self, three_d: bool) -> f64 {
        let a = self.area as f64;
        if three_d {
            (3.0 * a / (4.0 * std::f64::consts::PI)).cbrt()
        } else {
            (a / std::f64::consts::PI).sqrt()
        }
    }
}

/// The objects of a label image, ascending by label.
#[must_use]
pub fn objects(l: &Labels, border_margin: usize) -> Vec<Object> {
    let mut acc: BTreeMap<u32, (u64, [f64; 3], bool)> = BTreeMap::new();
    let (h, w) = (l.height, l.width);
    let m = border_margin;
    for (i, &lab) in l.data.iter().enumerate() {
        if lab == 0 {
            continue;
        }
        let z = i / (h * w);
        let y = (i / w) % h;
        let x = i % w;
        let e = acc.entry(lab).or_insert((0, [0.0; 3], false));
        e.0 += 1;
        e.1[0] += z as f64;
        e.1[1] += y as f64;
        e.1[2] += x as f64;
        if y < m || x < m || y + m >= h || x + m >= w {
            e.2 = true;
        }
    }
    acc.into_iter()
        .map(|(label, (area, s, at_border))| Object {
            label,
            area,
            centroid: s.map(|v| v / area as f64),
            at_border,
        })
        .collect()
}

/// A global translation `(dy, dx)` of frame `t + 1` relative to frame `t` (stage drift).
pub type Shift = (isize, isize);

/// Estimates the drift between two frames: the translation that makes the most
/// foreground pixels of `b` land on foreground of `a`, searched within `radius` pixels
/// of the shift between the two foregrounds' centroids (coarse steps, then single
/// pixels). Planes of a 3D stack share one shift.
#[must_use]
pub fn estimate_shift(a: &Labels, b: &Labels, radius: isize) -> Shift {
    let (h, w) = (a.height as isize, a.width as isize);
    let fg = |l: &Labels| -> Vec<(usize, isize, isize)> {
        let plane = l.height * l.width;
        l.data
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0)
            .map(|(i, _)| {
                (
                    i / plane,
                    ((i % plane) / l.width) as isize,
                    (i % l.width) as isize,
                )
            })
            .collect()
    };
    let (pa, pb) = (fg(a), fg(b));
    if pa.is_empty() || pb.is_empty() {
        return (0, 0);
    }
    let centre = |p: &[(usize, isize, isize)]| {
        let n = p.len() as f64;
        (
            p.iter().map(|q| q.1 as f64).sum::<f64>() / n,
            p.iter().map(|q| q.2 as f64).sum::<f64>() / n,
        )
    };
    let (ca, cb) = (centre(&pa), centre(&pb));
    let guess = (
        (cb.0 - ca.0).round() as isize,
        (cb.1 - ca.1).round() as isize,
    );
    let plane = a.height * a.width;
    let score = |s: Shift| -> usize {
        pb.iter()
            .filter(|&&(z, y, x)| {
                let (yy, xx) = (y - s.0, x - s.1);
                yy >= 0
                    && xx >= 0
                    && yy < h
                    && xx < w
                    && a.data[z * plane + (yy * w + xx) as usize] != 0
            })
            .count()
    };
    let search = |centre: Shift, reach: isize, step: isize| -> Shift {
        let mut best = (score(centre), std::cmp::Reverse(0isize), centre);
        for dy in (-reach..=reach).step_by(step as usize) {
            for dx in (-reach..=reach).step_by(step as usize) {
                let s = (centre.0 + dy, centre.1 + dx);
                // Prefer the smaller correction among equally good shifts.
                let key = (score(s), std::cmp::Reverse(dy.abs() + dx.abs()), s);
                if (key.0, key.1) > (best.0, best.1) {
                    best = key;
                }
            }
        }
        best.2
    };
    let step = (radius / 4).max(1);
    let coarse = search(guess, radius, step);
    search(coarse, step, 1)
}

/// Pixels shared by object `i` of `a` and object `j` of `b` once `a` is moved by
/// `shift`, keyed by object indices.
fn overlaps(
    a: &Labels,
    b: &Labels,
    oa: &[Object],
    ob: &[Object],
    shift: Shift,
) -> HashMap<(usize, usize), u64> {
    let ia: HashMap<u32, usize> = oa.iter().enumerate().map(|(k, o)| (o.label, k)).collect();
    let ib: HashMap<u32, usize> = ob.iter().enumerate().map(|(k, o)| (o.label, k)).collect();
    let mut out = HashMap::new();
    let (h, w) = (a.height as isize, a.width as isize);
    let plane = a.height * a.width;
    let mut last = (0u32, 0u32, usize::MAX, usize::MAX);
    for (i, &y) in b.data.iter().enumerate() {
        if y == 0 {
            continue;
        }
        let (z, r, c) = (
            i / plane,
            ((i % plane) / a.width) as isize,
            (i % a.width) as isize,
        );
        let (rr, cc) = (r - shift.0, c - shift.1);
        if rr < 0 || cc < 0 || rr >= h || cc >= w {
            continue;
        }
        let x = a.data[z * plane + (rr * w + cc) as usize];
        if x == 0 {
            continue;
        }
        if (x, y) != (last.0, last.1) {
            last = (x, y, ia[&x], ib[&y]);
        }
        *out.entry((last.2, last.3)).or_insert(0) += 1;
    }
    out
}

/// Objects moved by `shift` (centroids only).
fn shifted(objs: &[Object], shift: Shift) -> Vec<Object> {
    objs.iter()
        .map(|o| {
            let mut o = o.clone();
            o.centroid[1] += shift.0 as f64;
            o.centroid[2] += shift.1 as f64;
            o
        })
        .collect()
}

/// Links of frame `t` to frame `t + 1`, by object index.
#[derive(Debug, Clone, Default, PartialEq)]
struct FrameLinks {
    /// The same cell in the next frame.
    next: Vec<Option<usize>>,
    /// Daughters in the next frame (empty unless the object divides).
    children: Vec<Vec<usize>>,
}

/// Minimum-cost assignment of `n` sources to `m` targets over `edges` `(i, j, cost)`,
/// where leaving a source or a target unassigned costs `unassigned` each. Solved per
/// connected component. Returns the target of each source.
fn assign(
    n: usize,
    m: usize,
    edges: &[(usize, usize, f64)],
    unassigned: f64,
) -> Vec<Option<usize>> {
    let mut parent: Vec<usize> = (0..n + m).collect();
    fn find(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    for &(i, j, _) in edges {
        let (a, b) = (find(&mut parent, i), find(&mut parent, n + j));
        if a != b {
            parent[a] = b;
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (k, &(i, _, _)) in edges.iter().enumerate() {
        let root = find(&mut parent, i);
        groups.entry(root).or_default().push(k);
    }
    let mut out = vec![None; n];
    for ks in groups.values() {
        if let [k] = ks[..] {
            let (i, j, c) = edges[k];
            if c < 2.0 * unassigned {
                out[i] = Some(j);
            }
            continue;
        }
        let mut rows: Vec<usize> = ks.iter().map(|&k| edges[k].0).collect();
        let mut cols: Vec<usize> = ks.iter().map(|&k| edges[k].1).collect();
        rows.sort_unstable();
        rows.dedup();
        cols.sort_unstable();
        cols.dedup();
        let (r, c) = (rows.len(), cols.len());
        // Rows: sources, then one "birth" row per target. Columns: targets, then one
        // "death" column per source. Births and deaths pair up freely at zero cost.
        let size = r + c;
        const FORBIDDEN: i64 = -(1 << 40);
        let scale = |cost: f64| -((cost * 1e6).round() as i64);
        let mut mat = Matrix::new(size, size, FORBIDDEN);
        for &k in ks {
            let (i, j, cost) = edges[k];
            let ri = rows.binary_search(&i).unwrap_or_default();
            let cj = cols.binary_search(&j).unwrap_or_default();
            mat[(ri, cj)] = scale(cost);
        }
        for ri in 0..r {
            mat[(ri, c + ri)] = scale(unassigned);
        }
        for cj in 0..c {
            mat[(r + cj, cj)] = scale(unassigned);
            for ri in 0..r {
                mat[(r + cj, c + ri)] = 0;
            }
        }
        let (_, assignment) = kuhn_munkres(&mat);
        for (ri, &col) in assignment.iter().enumerate().take(r) {
            if col < c && mat[(ri, col)] != FORBIDDEN {
                out[rows[ri]] = Some(cols[col]);
            }
        }
    }
    out
}

/// Links two frames (steps 2 and 3 of the module documentation).
fn link_frames(
    a: &Labels,
    b: &Labels,
    oa: &[Object],
    ob: &[Object],
    opts: &TrackOptions,
) -> FrameLinks {
    let shift = if opts.drift_radius > 0 {
        estimate_shift(a, b, opts.drift_radius as isize)
    } else {
        (0, 0)
    };
    let moved = shifted(oa, shift);
    let oa = &moved[..];
    let inter = overlaps(a, b, oa, ob, shift);
    let iou = |i: usize, j: usize| {
        inter
            .get(&(i, j))
            .map_or(0.0, |&x| x as f64 / (oa[i].area + ob[j].area - x) as f64)
    };
    let mut next = vec![None; oa.len()];
    let mut taken = vec![false; ob.len()];
    for &(i, j) in inter.keys().filter(|&&(i, j)| iou(i, j) > 0.5) {
        next[i] = Some(j);
        taken[j] = true;
    }
    // Candidates among the objects left.
    let mut edges = Vec::new();
    let maxd = opts.max_distance.max(1e-9);
    for (i, o) in oa.iter().enumerate().filter(|(i, _)| next[*i].is_none()) {
        for (j, p) in ob.iter().enumerate().filter(|(j, _)| !taken[*j]) {
            let d = o.distance(p);
            let overlapping = inter.contains_key(&(i, j));
            if overlapping || d <= maxd {
                edges.push((i, j, (1.0 - iou(i, j)) + opts.distance_weight * d / maxd));
            }
        }
    }
    for (i, j) in assign(oa.len(), ob.len(), &edges, 1.0)
        .into_iter()
        .enumerate()
        .filter_map(|(i, j)| Some((i, j?)))
    {
        next[i] = Some(j);
        taken[j] = true;
    }
    let mut children = vec![Vec::new(); oa.len()];
    if let Some(rules) = opts.divisions {
        let three_d = a.depth > 1;
        let mut prev = vec![None; ob.len()];
        for (i, n) in next.iter().enumerate() {
            if let Some(j) = n {
                prev[*j] = Some(i);
            }
        }
        // A daughter is free, the mother's own link, or linked to another cell it does
        // not overlap while it overlaps the mother (the assignment gave a newborn
        // daughter to a neighbour that vanished).
        let free =
            |i: usize, d: usize, next: &[Option<usize>], prev: &[Option<usize>]| match prev[d] {
                None => true,
                Some(x) => {
                    x == i
                        || (next[x] == Some(d)
                            && inter.contains_key(&(i, d))
                            && !inter.contains_key(&(x, d)))
                }
            };
        let mut cands: Vec<(f64, usize, usize, usize)> = Vec::new();
        for (i, mother) in oa.iter().enumerate() {
            let near: Vec<usize> = ob
                .iter()
                .enumerate()
                .filter(|&(j, p)| {
                    free(i, j, &next, &prev)
                        && (inter.contains_key(&(i, j)) || mother.distance(p) <= maxd)
                })
                .map(|(j, _)| j)
                .collect();
            for (x, &j) in near.iter().enumerate() {
                for &k in &near[x + 1..] {
                    // At least one daughter is new (not the mother's own continuation).
                    if next[i] == Some(j) && prev[k].is_some()
                        || next[i] == Some(k) && prev[j].is_some()
                    {
                        continue;
                    }
                    if let Some(score) = division_score(mother, &ob[j], &ob[k], &rules, three_d) {
                        cands.push((score, i, j, k));
                    }
                }
            }
        }
        cands.sort_by(|x, y| {
            x.0.total_cmp(&y.0)
                .then((x.1, x.2, x.3).cmp(&(y.1, y.2, y.3)))
        });
        let mut mother_used = vec![false; oa.len()];
        let mut daughter_used = vec![false; ob.len()];
        for (_, i, j, k) in cands {
            if mother_used[i] || daughter_used[j] || daughter_used[k] {
                continue;
            }
            if !free(i, j, &next, &prev) || !free(i, k, &next, &prev) {
                continue;
            }
            mother_used[i] = true;
            daughter_used[j] = true;
            daughter_used[k] = true;
            for d in [j, k] {
                if let Some(x) = prev[d] {
                    next[x] = None;
                    prev[d] = None;
                }
            }
            next[i] = None;
            taken[j] = true;
            taken[k] = true;
            children[i] = vec![j, k];
        }
    }
    FrameLinks { next, children }
}

/// A division's cost if mother -> (d1, d2) is plausible under `rules`.
fn division_score(
    mother: &Object,
    d1: &Object,
    d2: &Object,
    rules: &DivisionRules,
    three_d: bool,
) -> Option<f64> {
    let (s, l) = if d1.area <= d2.area {
        (d1, d2)
    } else {
        (d2, d1)
    };
    let ratio = s.area as f64 / l.area.max(1) as f64;
    // A daughter cut by the border shows only part of her area: skip the size rule.
    if ratio < rules.min_daughter_ratio && !d1.at_border && !d2.at_border {
        return None;
    }
    let total = (d1.area + d2.area) as f64 / mother.area.max(1) as f64;
    if !(rules.area_ratio.0..=rules.area_ratio.1).contains(&total) {
        return None;
    }
    let mid: [f64; 3] = std::array::from_fn(|k| 0.5 * (d1.centroid[k] + d2.centroid[k]));
    let offset = (0..3)
        .map(|k| (mid[k] - mother.centroid[k]).powi(2))
        .sum::<f64>()
        .sqrt()
        / mother.radius(three_d).max(1e-9);
    if offset > rules.max_offset {
        return None;
    }
    Some(offset + (1.0 - ratio) + total.ln().abs())
}

/// Tracks, relabelled masks and statistics.
#[derive(Debug, Clone)]
pub struct Tracking {
    /// One mask per input frame, each object labelled with its track.
    pub masks: Vec<Labels>,
    /// One record per track.
    pub tracks: Vec<TrackRecord>,
    /// Divisions found.
    pub divisions: usize,
    /// Gaps closed.
    pub gaps_closed: usize,
}

/// A piece of a track: a chain of objects in consecutive frames.
#[derive(Debug, Clone)]
struct Segment {
    begin: u32,
    end: u32,
    parent: Option<usize>,
    first: usize,
    last: usize,
    children: usize,
}

/// Tracks the instance masks of consecutive frames (see the module documentation).
///
/// # Errors
/// No frames, or frames of different sizes.
pub fn track(frames: &[Labels], opts: &TrackOptions) -> Result<Tracking, TrackError> {
    check_frames(frames)?;
    let objs: Vec<Vec<Object>> = frames
        .iter()
        .map(|f| objects(f, opts.border_margin))
        .collect();
    let links: Vec<FrameLinks> = (0..frames.len() - 1)
        .map(|t| link_frames(&frames[t], &frames[t + 1], &objs[t], &objs[t + 1], opts))
        .collect();
    Ok(assemble(frames, &objs, &links, opts))
}

/// The lineage of masks that cover every cell in every frame, by overlap alone: each
/// object continues the object of the previous frame that shares most of its pixels
/// (at least `min_overlap` of its area); an object continued by two or more divides.
/// This is how ground truth is derived for movies such as `bacteria-trpL`, whose masks
/// are complete but whose labels are not linked.
///
/// # Errors
/// No frames, or frames of different sizes.
pub fn lineage_by_overlap(
    frames: &[Labels],
    min_overlap: f64,
    drift_radius: usize,
) -> Result<Tracking, TrackError> {
    check_frames(frames)?;
    let objs: Vec<Vec<Object>> = frames.iter().map(|f| objects(f, 1)).collect();
    let links = (0..frames.len() - 1)
        .map(|t| {
            let (oa, ob) = (&objs[t], &objs[t + 1]);
            let shift = estimate_shift(&frames[t], &frames[t + 1], drift_radius as isize);
            let inter = overlaps(&frames[t], &frames[t + 1], oa, ob, shift);
            let mut best: Vec<Option<(u64, usize)>> = vec![None; ob.len()];
            for (&(i, j), &x) in &inter {
                if (x as f64) < min_overlap * ob[j].area as f64 {
                    continue;
                }
                if best[j]
                    .is_none_or(|(bx, bi)| (x, std::cmp::Reverse(i)) > (bx, std::cmp::Reverse(bi)))
                {
                    best[j] = Some((x, i));
                }
            }
            let mut succ = vec![Vec::new(); oa.len()];
            for (j, b) in best.iter().enumerate() {
                if let Some((_, i)) = b {
                    succ[*i].push(j);
                }
            }
            let mut l = FrameLinks {
                next: vec![None; oa.len()],
                children: vec![Vec::new(); oa.len()],
            };
            for (i, s) in succ.into_iter().enumerate() {
                match s.len() {
                    0 => {}
                    1 => l.next[i] = Some(s[0]),
                    _ => l.children[i] = s,
                }
            }
            l
        })
        .collect::<Vec<_>>();
    let opts = TrackOptions {
        max_gap: 0,
        ..TrackOptions::default()
    };
    Ok(assemble(frames, &objs, &links, &opts))
}

fn check_frames(frames: &[Labels]) -> Result<(), TrackError> {
    let first = frames.first().ok_or(TrackError::NoFrames)?;
    for (k, f) in frames.iter().enumerate() {
        if !f.same_shape(first) {
            return Err(TrackError::SizeMismatch {
                frame: k,
                found: f.shape(),
                expected: first.shape(),
            });
        }
    }
    Ok(())
}

/// Builds segments from links, closes gaps, relabels (steps 4 and 5).
fn assemble(
    frames: &[Labels],
    objs: &[Vec<Object>],
    links: &[FrameLinks],
    opts: &TrackOptions,
) -> Tracking {
    let n = frames.len();
    let mut segs: Vec<Segment> = Vec::new();
    let mut seg_of: Vec<Vec<usize>> = objs.iter().map(|o| vec![usize::MAX; o.len()]).collect();
    let mut divisions = 0;
    for (k, _) in objs[0].iter().enumerate() {
        seg_of[0][k] = segs.len();
        segs.push(Segment {
            begin: 0,
            end: 0,
            parent: None,
            first: k,
            last: k,
            children: 0,
        });
    }
    for t in 0..n - 1 {
        let l = &links[t];
        let t1 = t as u32 + 1;
        for (i, nx) in l.next.iter().enumerate() {
            if let Some(j) = *nx {
                let s = seg_of[t][i];
                seg_of[t + 1][j] = s;
                segs[s].end = t1;
                segs[s].last = j;
            }
        }
        for (i, ch) in l.children.iter().enumerate() {
            if ch.is_empty() {
                continue;
            }
            divisions += 1;
            let mother = seg_of[t][i];
            segs[mother].children = ch.len();
            for &j in ch {
                seg_of[t + 1][j] = segs.len();
                segs.push(Segment {
                    begin: t1,
                    end: t1,
                    parent: Some(mother),
                    first: j,
                    last: j,
                    children: 0,
                });
            }
        }
        for (j, s) in seg_of[t + 1].iter_mut().enumerate() {
            if *s == usize::MAX {
                *s = segs.len();
                segs.push(Segment {
                    begin: t1,
                    end: t1,
                    parent: None,
                    first: j,
                    last: j,
                    children: 0,
                });
            }
        }
    }
    let gaps_closed = close_gaps(&mut segs, objs, n, opts);
    // Labels in order of appearance (segments are created in that order).
    let label_of: Vec<u32> = (1..=segs.len() as u32).collect();
    let tracks = segs
        .iter()
        .enumerate()
        .map(|(s, seg)| TrackRecord {
            label: label_of[s],
            begin: seg.begin,
            end: seg.end,
            parent: seg.parent.map_or(0, |p| label_of[p]),
        })
        .collect();
    let masks = frames
        .iter()
        .enumerate()
        .map(|(t, f)| {
            let map: HashMap<u32, u32> = objs[t]
                .iter()
                .enumerate()
                .map(|(k, o)| (o.label, label_of[seg_of[t][k]]))
                .collect();
            let mut out = f.clone();
            for v in &mut out.data {
                if *v != 0 {
                    *v = map[v];
                }
            }
            out
        })
        .collect();
    Tracking {
        masks,
        tracks,
        divisions,
        gaps_closed,
    }
}

/// Step 4: continues tracks across up to `max_gap` missing frames. Returns gaps closed.
fn close_gaps(segs: &mut [Segment], objs: &[Vec<Object>], n: usize, opts: &TrackOptions) -> usize {
    if opts.max_gap == 0 {
        return 0;
    }
    let ends: Vec<usize> = (0..segs.len())
        .filter(|&s| {
            let g = &segs[s];
            (g.end as usize) + 1 < n && g.children == 0 && !objs[g.end as usize][g.last].at_border
        })
        .collect();
    let starts: Vec<usize> = (0..segs.len())
        .filter(|&s| {
            let g = &segs[s];
            g.begin > 0 && g.parent.is_none() && !objs[g.begin as usize][g.first].at_border
        })
        .collect();
    let maxd = opts.max_distance.max(1e-9);
    let mut edges = Vec::new();
    for (a, &e) in ends.iter().enumerate() {
        let ge = &segs[e];
        let oe = &objs[ge.end as usize][ge.last];
        for (b, &s) in starts.iter().enumerate() {
            let gs = &segs[s];
            let gap = i64::from(gs.begin) - i64::from(ge.end);
            if gap < 2 || gap > i64::from(opts.max_gap) + 1 {
                continue;
            }
            let os = &objs[gs.begin as usize][gs.first];
            let reach = maxd * gap as f64;
            let d = oe.distance(os);
            let size = (os.area as f64 / oe.area.max(1) as f64).ln().abs();
            if d <= reach && size <= std::f64::consts::LN_2 {
                edges.push((a, b, d / reach + size));
            }
        }
    }
    let mut closed = 0;
    for (a, b) in assign(ends.len(), starts.len(), &edges, 0.5)
        .into_iter()
        .enumerate()
        .filter_map(|(a, b)| Some((a, b?)))
    {
        segs[starts[b]].parent = Some(ends[a]);
        segs[ends[a]].children = 1;
        closed += 1;
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::Volume;

    /// A 2D frame with filled rectangles `(label, y0, x0, h, w)`.
    fn frame(h: usize, w: usize, boxes: &[(u32, usize, usize, usize, usize)]) -> Labels {
        let mut v = Volume::new(1, h, w);
        for &(l, y0, x0, bh, bw) in boxes {
            for y in y0..y0 + bh {
                for x in x0..x0 + bw {
                    v.data[y * w + x] = l;
                }
            }
        }
        v
    }

    fn rec(label: u32, begin: u32, end: u32, parent: u32) -> TrackRecord {
        TrackRecord::new(label, begin, end, parent)
    }

    #[test]
    fn moving_cells_keep_one_label_and_labels_follow_appearance() {
        // Two cells moving right by 3 px a frame; input labels change every frame.
        let frames: Vec<Labels> = (0..4)
            .map(|t| {
                frame(
                    40,
                    60,
                    &[
                        (10 + t as u32, 5, 5 + 3 * t, 8, 8),
                        (90 - t as u32, 25, 30 + 3 * t, 8, 8),
                    ],
                )
            })
            .collect();
        let r = track(&frames, &TrackOptions::default()).unwrap();
        assert_eq!(r.tracks, vec![rec(1, 0, 3, 0), rec(2, 0, 3, 0)]);
        for (t, m) in r.masks.iter().enumerate() {
            assert_eq!(m.data[6 * 60 + 6 + 3 * t], 1);
            assert_eq!(m.data[26 * 60 + 31 + 3 * t], 2);
        }
        assert_eq!((r.divisions, r.gaps_closed), (0, 0));
    }

    #[test]
    fn assignment_beats_greedy_when_cells_cross_paths() {
        // Frame 0: A at x=10, B at x=24. Frame 1: objects at x=17 and x=31 (both moved
        // +7). Greedy nearest-first would give the x=17 object to B (distance 7 from 24,
        // but also 7 from 10): the optimum keeps both moves consistent.
        let f0 = frame(20, 50, &[(1, 5, 10, 4, 4), (2, 5, 24, 4, 4)]);
        let f1 = frame(20, 50, &[(5, 5, 17, 4, 4), (6, 5, 31, 4, 4)]);
        let r = track(&[f0, f1], &TrackOptions::default()).unwrap();
        assert_eq!(r.tracks, vec![rec(1, 0, 1, 0), rec(2, 0, 1, 0)]);
        assert_eq!(r.masks[1].data[5 * 50 + 17], 1);
        assert_eq!(r.masks[1].data[5 * 50 + 31], 2);
    }

    #[test]
    fn a_division_gives_two_daughters_with_the_mother_as_parent() {
        let f0 = frame(40, 40, &[(1, 15, 10, 10, 20)]);
        let f1 = frame(40, 40, &[(1, 15, 8, 10, 11), (2, 15, 21, 10, 11)]);
        let f2 = frame(40, 40, &[(4, 15, 7, 10, 11), (3, 15, 22, 10, 11)]);
        let r = track(&[f0, f1, f2], &TrackOptions::default()).unwrap();
        assert_eq!(r.divisions, 1);
        assert_eq!(
            r.tracks,
            vec![rec(1, 0, 0, 0), rec(2, 1, 2, 1), rec(3, 1, 2, 1)]
        );
        // Without division rules the mother continues as one daughter.
        let plain = TrackOptions {
            divisions: None,
            ..TrackOptions::default()
        };
        let frames = [
            frame(40, 40, &[(1, 15, 10, 10, 20)]),
            frame(40, 40, &[(1, 15, 8, 10, 11), (2, 15, 21, 10, 11)]),
        ];
        let r = track(&frames, &plain).unwrap();
        assert_eq!(r.divisions, 0);
        assert_eq!(r.tracks.iter().filter(|t| t.parent != 0).count(), 0);
    }

    #[test]
    fn implausible_divisions_are_refused() {
        // A tiny object appears beside a big cell: sizes differ too much.
        let f0 = frame(40, 40, &[(1, 10, 10, 12, 12)]);
        let f1 = frame(40, 40, &[(1, 10, 11, 12, 12), (2, 10, 24, 2, 2)]);
        let r = track(&[f0, f1], &TrackOptions::default()).unwrap();
        assert_eq!(r.divisions, 0);
        assert_eq!(r.tracks, vec![rec(1, 0, 1, 0), rec(2, 1, 1, 0)]);
    }

    #[test]
    fn gaps_are_closed_with_a_parent_link_and_border_ends_are_not() {
        // Cell 1 vanishes in frame 1 (a missed detection) and reappears in frame 2.
        // Cell 2 leaves through the border in frame 0; a new cell enters there in frame 2.
        let f0 = frame(40, 40, &[(1, 15, 15, 6, 6), (2, 0, 30, 5, 5)]);
        let f1 = frame(40, 40, &[]);
        let f2 = frame(40, 40, &[(7, 15, 16, 6, 6), (8, 0, 31, 5, 5)]);
        let r = track(
            &[f0.clone(), f1.clone(), f2.clone()],
            &TrackOptions::default(),
        )
        .unwrap();
        assert_eq!(r.gaps_closed, 1);
        assert_eq!(
            r.tracks,
            vec![
                rec(1, 0, 0, 0),
                rec(2, 0, 0, 0),
                rec(3, 2, 2, 1),
                rec(4, 2, 2, 0)
            ]
        );
        let no_gaps = TrackOptions {
            max_gap: 0,
            ..TrackOptions::default()
        };
        let r = track(&[f0, f1, f2], &no_gaps).unwrap();
        assert_eq!(r.gaps_closed, 0);
        assert!(r.tracks.iter().all(|t| t.parent == 0));
    }

    #[test]
    fn lineage_by_overlap_follows_complete_masks() {
        let f0 = frame(30, 40, &[(3, 10, 10, 8, 16)]);
        let f1 = frame(30, 40, &[(1, 10, 9, 8, 8), (2, 10, 19, 8, 8)]);
        let f2 = frame(30, 40, &[(2, 10, 8, 8, 9), (1, 10, 19, 8, 9)]);
        let r = lineage_by_overlap(&[f0, f1, f2], 0.3, 0).unwrap();
        assert_eq!(r.divisions, 1);
        assert_eq!(
            r.tracks,
            vec![rec(1, 0, 0, 0), rec(2, 1, 2, 1), rec(3, 1, 2, 1)]
        );
        assert_eq!(r.masks[2].data[10 * 40 + 8], 2);
    }

    #[test]
    fn drift_is_compensated() {
        // Three cells, the whole field moved by (7, -40) between frames: far beyond
        // max_distance, yet the same cells.
        let boxes = [(1, 30, 60, 8, 8), (2, 50, 90, 8, 8), (3, 70, 70, 8, 8)];
        let f0 = frame(120, 160, &boxes);
        let moved: Vec<_> = boxes
            .iter()
            .map(|&(l, y, x, h, w)| (l + 10, y + 7, x - 40, h, w))
            .collect();
        let f1 = frame(120, 160, &moved);
        assert_eq!(estimate_shift(&f0, &f1, 12), (7, -40));
        let r = track(&[f0.clone(), f1.clone()], &TrackOptions::default()).unwrap();
        assert_eq!(
            r.tracks,
            vec![rec(1, 0, 1, 0), rec(2, 0, 1, 0), rec(3, 0, 1, 0)]
        );
        let r = lineage_by_overlap(&[f0, f1], 0.3, 12).unwrap();
        assert_eq!(r.tracks.len(), 3);
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        assert_eq!(
            track(&[], &TrackOptions::default()).unwrap_err(),
            TrackError::NoFrames
        );
        let e = track(
            &[frame(4, 4, &[]), frame(4, 5, &[])],
            &TrackOptions::default(),
        );
        assert!(matches!(e, Err(TrackError::SizeMismatch { frame: 1, .. })));
    }
}

#[cfg(test)]
mod synthetic {
    use super::*;
    use crate::measures::compare;
    use crate::synth::{Profile, generate};

    /// Scrambles labels frame by frame, so the tracker cannot lean on them.
    fn scramble(l: &Labels, t: u32) -> Labels {
        let mut out = l.clone();
        for v in &mut out.data {
            if *v != 0 {
                *v = (*v * 7919 + t * 104_729) % 1_000_003 + 1;
            }
        }
        out
    }

    /// The quality bar of docs/benchmarks.md on exact masks: TRA >= 0.98 on every
    /// profile and at least 90 % of all divisions found.
    #[test]
    fn synthetic_movies_track_with_divisions() {
        let (mut found, mut all) = (0, 0);
        for name in Profile::NAMES {
            let p = Profile::named(name).unwrap();
            let m = generate(&p, 40, 11);
            let input: Vec<Labels> = m
                .labels
                .iter()
                .enumerate()
                .map(|(t, l)| scramble(l, t as u32))
                .collect();
            let r = track(&input, &TrackOptions::default()).unwrap();
            let (c, d) = compare((&m.labels, &m.tracks), (&r.masks, &r.tracks)).unwrap();
            let tra = c.tra().unwrap();
            assert!(tra >= 0.98, "{name}: TRA {tra} {c:?}");
            assert!(
                d.tp + d.fn_ >= 10,
                "{name}: too few divisions to judge: {d:?}"
            );
            assert_eq!(d.fp, 0, "{name}: made-up divisions {d:?}");
            found += d.tp;
            all += d.tp + d.fn_;
        }
        assert!(found * 10 >= all * 9, "{found} of {all} divisions found");
    }
}
