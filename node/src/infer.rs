//! Inference over whole frames of any size, and instance extraction.
//!
//! A frame is cut into overlapping tiles (padded by mirroring where the frame is smaller
//! than a tile); tiles go through the network in batches; their class probabilities are
//! blended with weights that ramp down over the overlap, so tile seams vanish.
//! [`instances`] turns the probabilities into labelled cells: regions of likely interior
//! are seeds, split where their shape has a neck (two cores deeper than the neck between
//! them, as a watershed of the distance transform splits touching nuclei), and grown into
//! the foreground (interior or boundary) highest interior probability first; foreground
//! left without a seed becomes its own object; objects smaller than `min_size` pixels are
//! removed; labels are renumbered 1..n in scan order. A model with a distance head seeds
//! at the peaks of its predicted distance instead, split at necks the same way, and grows
//! highest distance first (see [`instances`]).

use burn::prelude::*;
use burn::tensor::activation::softmax;
use std::collections::VecDeque;

use crate::data::normalize::{
    BACKGROUND, CLASSES, HIGH_PERCENTILE, INTERIOR, LOW_PERCENTILE, normalize,
};
use crate::data::volume::{Image, Labels, Volume};
use crate::model::{UNet, UNetConfig};
use crate::scale;

/// Tiling and post-processing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InferOptions {
    /// Tile side (rounded up to a multiple of 2^depth).
    pub tile: usize,
    /// Overlap between neighbouring tiles.
    pub overlap: usize,
    /// Tiles per forward pass.
    pub batch: usize,
    /// Smallest object kept, in pixels of the network's input (at a model's training
    /// width; in an image rescaled by `s` it is `min_size / s^2` of the image's pixels).
    pub min_size: usize,
    /// Drop objects touching the frame's border (for annotation conventions that leave
    /// cells cut by the border unlabelled; see [`border_objects`]).
    pub exclude_border: bool,
    /// Interior probability a pixel needs to belong to a seed region (growth then
    /// recovers the rest of each cell); boundary models only.
    pub seed_threshold: f32,
    /// Pixels (of the network's input, as `min_size`) by which each of two touching
    /// cells' cores must be deeper (farther from the seed region's edge) than the neck
    /// between them for the region to be split; lower values split more readily.
    pub split_depth: f32,
    /// Cell width in the images, in pixels (see [`crate::scale`]); with a model trained
    /// at another width the images are rescaled to it. `None`: estimated from a first
    /// pass at the images' own scale (see [`estimate_width`]).
    pub diameter: Option<f32>,
}

impl Default for InferOptions {
    fn default() -> Self {
        Self {
            tile: 256,
            overlap: 32,
            batch: 4,
            min_size: 10,
            exclude_border: false,
            seed_threshold: 0.5,
            split_depth: 1.5,
            diameter: None,
        }
    }
}

/// How many annotated objects touch the frame border, out of how many.
///
/// Used to hint that annotations may leave cells cut by the border unlabelled (as the
/// CTC reference segmentation of Fluo-N2DL-HeLa does). Statistics alone cannot tell that
/// convention from cells that happen to stay away from the border, so the choice is the
/// operator's (`cellswarm train --exclude-border`).
#[must_use]
pub fn border_objects(labels: &[&Labels]) -> (u64, u64) {
    let (mut touching, mut objects) = (0u64, 0u64);
    for l in labels {
        let (h, w) = (l.height, l.width);
        for z in 0..l.depth {
            let mut on_border = std::collections::HashSet::new();
            let mut all = std::collections::HashSet::new();
            for (i, &lab) in l.plane(z).iter().enumerate() {
                if lab == 0 {
                    continue;
                }
                all.insert(lab);
                let (y, x) = (i / w, i % w);
                if y == 0 || x == 0 || y + 1 == h || x + 1 == w {
                    on_border.insert(lab);
                }
            }
            touching += on_border.len() as u64;
            objects += all.len() as u64;
        }
    }
    (touching, objects)
}

/// Sets objects that touch the plane's border to 0.
fn drop_border(labels: &mut [u32], height: usize, width: usize) {
    let mut touching = std::collections::HashSet::new();
    for x in 0..width {
        touching.insert(labels[x]);
        touching.insert(labels[(height - 1) * width + x]);
    }
    for y in 0..height {
        touching.insert(labels[y * width]);
        touching.insert(labels[y * width + width - 1]);
    }
    touching.remove(&0);
    for l in labels.iter_mut() {
        if touching.contains(l) {
            *l = 0;
        }
    }
}

/// Gives every region a single cell encloses to that cell: holes (background the cell
/// surrounds, such as a dark nucleolus) and anything drawn inside them (a nucleolus or a
/// bright speck taken for a cell of its own; a nucleus drawn as a ring around a second
/// object is one nucleus). A region is enclosed by cell `L` when it cannot reach the
/// plane's border without crossing `L`. Two cells side by side are never merged: neither
/// encloses the other.
pub fn fill_enclosed(labels: &mut [u32], height: usize, width: usize) {
    if labels.len() != height * width || labels.is_empty() {
        return;
    }
    // Bounding boxes (rows y0..=y1, columns x0..=x1) of every label.
    let mut boxes: std::collections::BTreeMap<u32, (usize, usize, usize, usize)> =
        std::collections::BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        if l == 0 {
            continue;
        }
        let (y, x) = (i / width, i % width);
        let b = boxes.entry(l).or_insert((y, y, x, x));
        b.0 = b.0.min(y);
        b.1 = b.1.max(y);
        b.2 = b.2.min(x);
        b.3 = b.3.max(x);
    }
    let mut open = Vec::new();
    let mut stack = Vec::new();
    for (&cell, &(y0, y1, x0, x1)) in &boxes {
        // One pixel of margin, so that whatever is outside the cell's box is reachable.
        let (y0, x0) = (y0.saturating_sub(1), x0.saturating_sub(1));
        let (y1, x1) = ((y1 + 1).min(height - 1), (x1 + 1).min(width - 1));
        let (bh, bw) = (y1 - y0 + 1, x1 - x0 + 1);
        open.clear();
        open.resize(bh * bw, false);
        let at = |by: usize, bx: usize| (y0 + by) * width + x0 + bx;
        // Flood from the box's edge through everything that is not the cell.
        for by in 0..bh {
            for bx in 0..bw {
                let edge = by == 0 || bx == 0 || by + 1 == bh || bx + 1 == bw;
                if edge && labels[at(by, bx)] != cell {
                    open[by * bw + bx] = true;
                    stack.push((by, bx));
                }
            }
        }
        while let Some((by, bx)) = stack.pop() {
            let mut go = |ny: usize, nx: usize| {
                let k = ny * bw + nx;
                if !open[k] && labels[at(ny, nx)] != cell {
                    open[k] = true;
                    stack.push((ny, nx));
                }
            };
            if by > 0 {
                go(by - 1, bx);
            }
            if by + 1 < bh {
                go(by + 1, bx);
            }
            if bx > 0 {
                go(by, bx - 1);
            }
            if bx + 1 < bw {
                go(by, bx + 1);
            }
        }
        for by in 0..bh {
            for bx in 0..bw {
                if !open[by * bw + bx] {
                    labels[at(by, bx)] = cell;
                }
            }
        }
    }
}

/// Per-pixel probabilities of one 2D plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Probabilities {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `classes x height x width` (background, interior, boundary).
    pub classes: Vec<f32>,
    /// `states x height x width`, if the model has a state head.
    pub states: Option<Vec<f32>>,
    /// Number of state classes.
    pub state_count: usize,
    /// Predicted normalised distance to the cell's edge per pixel (0..1), if the model
    /// has a distance head.
    pub distance: Option<Vec<f32>>,
    /// Pixels the network saw per pixel of this plane (the image was rescaled by this
    /// before inference and the probabilities back after it); 1 at the image's own scale.
    pub scale: f32,
}

impl Probabilities {
    /// Probability of class `c` at pixel `i`.
    #[must_use]
    pub fn class(&self, c: usize, i: usize) -> f32 {
        self.classes[c * self.height * self.width + i]
    }

    /// Class probabilities (`classes x height x width`) of a network without a state head.
    fn without_states(height: usize, width: usize, classes: Vec<f32>) -> Self {
        Self {
            height,
            width,
            classes,
            states: None,
            state_count: 0,
            distance: None,
            scale: 1.0,
        }
    }

    /// Certainties: probability 1 for each pixel's class in `classes`, 0 for the others.
    fn one_hot(height: usize, width: usize, classes: &[u8]) -> Self {
        let n = height * width;
        let mut p = vec![0f32; CLASSES * n];
        for (i, &c) in classes.iter().enumerate() {
            p[c as usize * n + i] = 1.0;
        }
        Self::without_states(height, width, p)
    }
}

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Tile start positions along one axis of length `len` with tiles of `tile`.
fn starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let stride = (tile - overlap).max(1);
    let mut s: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|&p| p + tile < len)
        .collect();
    s.push(len - tile);
    s
}

/// Mirrors an index into `0..len`.
fn mirror(i: isize, len: usize) -> usize {
    let n = len as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// Blending weight of position `i` in a tile of `n` with `overlap`.
fn ramp(i: usize, n: usize, overlap: usize) -> f32 {
    if overlap == 0 {
        return 1.0;
    }
    let o = overlap as f32;
    let a = (i as f32 + 0.5) / o;
    let b = (n as f32 - i as f32 - 0.5) / o;
    a.min(b).clamp(1e-3, 1.0)
}

/// Class (and state, and distance) probabilities of a normalised 2D plane.
#[must_use]
pub fn predict_plane(
    model: &UNet,
    config: &UNetConfig,
    device: &Device,
    plane: &[f32],
    height: usize,
    width: usize,
    opts: &InferOptions,
) -> Probabilities {
    let g = config.granule();
    let tile = round_up(opts.tile.max(g), g);
    let (th, tw) = (tile.min(round_up(height, g)), tile.min(round_up(width, g)));
    let overlap = opts.overlap.min(th / 2).min(tw / 2);
    let ys = starts(height, th, overlap);
    let xs = starts(width, tw, overlap);
    let positions: Vec<(usize, usize)> = ys
        .iter()
        .flat_map(|&y| xs.iter().map(move |&x| (y, x)))
        .collect();
    let c = config.classes;
    let s = config.cell_states;
    let n = height * width;
    let mut acc = vec![0f32; c * n];
    let mut acc_states = vec![0f32; s * n];
    let mut acc_distance = vec![0f32; if config.distance { n } else { 0 }];
    let mut wsum = vec![0f32; n];
    let weights: Vec<f32> = (0..th * tw)
        .map(|k| ramp(k / tw, th, overlap) * ramp(k % tw, tw, overlap))
        .collect();
    for group in positions.chunks(opts.batch.max(1)) {
        let b = group.len();
        let mut input = Vec::with_capacity(b * th * tw);
        for &(y0, x0) in group {
            for y in 0..th {
                let sy = mirror((y0 + y) as isize, height);
                for x in 0..tw {
                    let sx = mirror((x0 + x) as isize, width);
                    input.push(plane[sy * width + sx]);
                }
            }
        }
        let x = Tensor::<4>::from_data(TensorData::new(input, [b, 1, th, tw]), device);
        let out = model.forward(x);
        let probs = softmax(out.classes, 1)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        let sprobs = out.states.map(|t| {
            softmax(t, 1)
                .into_data()
                .try_into_vec::<f32>()
                .unwrap_or_default()
        });
        let dprobs = out.distance.map(|t| {
            burn::tensor::activation::sigmoid(t)
                .into_data()
                .try_into_vec::<f32>()
                .unwrap_or_default()
        });
        for (k, &(y0, x0)) in group.iter().enumerate() {
            for y in 0..th {
                let gy = y0 + y;
                if gy >= height {
                    break;
                }
                for x in 0..tw {
                    let gx = x0 + x;
                    if gx >= width {
                        break;
                    }
                    let w = weights[y * tw + x];
                    let i = gy * width + gx;
                    wsum[i] += w;
                    for ch in 0..c {
                        acc[ch * n + i] += w * probs[((k * c + ch) * th + y) * tw + x];
                    }
                    if let Some(sp) = &sprobs {
                        for ch in 0..s {
                            acc_states[ch * n + i] += w * sp[((k * s + ch) * th + y) * tw + x];
                        }
                    }
                    if let (Some(dp), Some(a)) = (&dprobs, acc_distance.get_mut(i)) {
                        *a += w * dp[(k * th + y) * tw + x];
                    }
                }
            }
        }
    }
    for ch in 0..c {
        for i in 0..n {
            acc[ch * n + i] /= wsum[i];
        }
    }
    for ch in 0..s {
        for i in 0..n {
            acc_states[ch * n + i] /= wsum[i];
        }
    }
    for (a, w) in acc_distance.iter_mut().zip(&wsum) {
        *a /= w;
    }
    Probabilities {
        height,
        width,
        classes: acc,
        states: (s > 0).then_some(acc_states),
        state_count: s,
        distance: config.distance.then_some(acc_distance),
        scale: 1.0,
    }
}

/// 4-connected components of `mask`, labelled 1.. in scan order (0 outside the mask).
pub(crate) fn components(mask: &[bool], height: usize, width: usize) -> (Vec<u32>, u32) {
    let mut labels = vec![0u32; mask.len()];
    let mut next = 0u32;
    let mut queue = VecDeque::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        next += 1;
        labels[start] = next;
        queue.push_back(start);
        while let Some(i) = queue.pop_front() {
            for j in neighbours(i, height, width) {
                if mask[j] && labels[j] == 0 {
                    labels[j] = next;
                    queue.push_back(j);
                }
            }
        }
    }
    (labels, next)
}

fn neighbours(i: usize, height: usize, width: usize) -> impl Iterator<Item = usize> {
    let (y, x) = (i / width, i % width);
    [
        (y > 0).then(|| i - width),
        (y + 1 < height).then(|| i + width),
        (x > 0).then(|| i - 1),
        (x + 1 < width).then(|| i + 1),
    ]
    .into_iter()
    .flatten()
}

/// Distance levels (pixels) at which [`instances`] looks for necks between touching cells.
const LEVEL_STEP: f32 = 0.5;

/// Pixels of `set` that are 4-connected to each other, as separate lists (in the order of
/// their first pixel in `set`). `stamp` is scratch space of one entry per pixel, all
/// different from `mark` and `mark + 1` on entry.
fn components_of(
    set: &[usize],
    height: usize,
    width: usize,
    stamp: &mut [u32],
    mark: u32,
) -> Vec<Vec<usize>> {
    for &i in set {
        stamp[i] = mark;
    }
    let mut out = Vec::new();
    let mut queue = VecDeque::new();
    for &start in set {
        if stamp[start] != mark {
            continue;
        }
        stamp[start] = mark + 1;
        queue.push_back(start);
        let mut comp = Vec::new();
        while let Some(i) = queue.pop_front() {
            comp.push(i);
            for j in neighbours(i, height, width) {
                if stamp[j] == mark {
                    stamp[j] = mark + 1;
                    queue.push_back(j);
                }
            }
        }
        out.push(comp);
    }
    out
}

/// Seeds, one per cell: the connected regions of `mask`, each split further where raising
/// the level of `values` through `levels` (ascending) separates it into two or more
/// regions of at least `min_seed` pixels whose peaks stand at least `dynamic` above that
/// level (a saddle between two cells). A region that never splits is one seed.
fn level_seeds(
    values: &[f32],
    mask: &[bool],
    height: usize,
    width: usize,
    levels: &[f32],
    dynamic: f32,
    min_seed: usize,
) -> Vec<Vec<usize>> {
    let mut stamp = vec![0u32; values.len()];
    let mut mark = 1u32;
    let base: Vec<usize> = (0..values.len()).filter(|&i| mask[i]).collect();
    // Each region with the index of the first level still to try on it.
    let mut work: Vec<(Vec<usize>, usize)> = components_of(&base, height, width, &mut stamp, mark)
        .into_iter()
        .map(|c| (c, 0))
        .collect();
    mark += 2;
    let mut seeds = Vec::new();
    while let Some((region, next)) = work.pop() {
        let mut split = None;
        for (j, &t) in levels.iter().enumerate().skip(next) {
            let above: Vec<usize> = region.iter().copied().filter(|&i| values[i] >= t).collect();
            let parts: Vec<Vec<usize>> = components_of(&above, height, width, &mut stamp, mark)
                .into_iter()
                .filter(|c| c.len() >= min_seed && c.iter().any(|&i| values[i] >= t + dynamic))
                .collect();
            mark += 2;
            match parts.len() {
                0 => break,
                1 => {}
                _ => {
                    split = Some((parts, j));
                    break;
                }
            }
        }
        match split {
            Some((parts, j)) => work.extend(parts.into_iter().map(|p| (p, j + 1))),
            None => seeds.push(region),
        }
    }
    // Scan order of each seed's first pixel, so labels do not depend on the work order.
    for s in &mut seeds {
        s.sort_unstable();
    }
    seeds.sort_unstable_by_key(|s| s[0]);
    seeds
}

/// Distance of every pixel of `mask` to the nearest pixel outside it (4-neighbour steps 1,
/// diagonal steps 1.414; the frame's edge does not count as outside); 0 outside.
pub(crate) fn chamfer(mask: &[bool], height: usize, width: usize) -> Vec<f32> {
    const D: f32 = std::f32::consts::SQRT_2;
    let big = (height + width) as f32;
    let mut d: Vec<f32> = mask.iter().map(|&m| if m { big } else { 0.0 }).collect();
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            if !mask[i] {
                continue;
            }
            let mut v = d[i];
            if x > 0 {
                v = v.min(d[i - 1] + 1.0);
            }
            if y > 0 {
                v = v.min(d[i - width] + 1.0);
                if x > 0 {
                    v = v.min(d[i - width - 1] + D);
                }
                if x + 1 < width {
                    v = v.min(d[i - width + 1] + D);
                }
            }
            d[i] = v;
        }
    }
    for y in (0..height).rev() {
        for x in (0..width).rev() {
            let i = y * width + x;
            if !mask[i] {
                continue;
            }
            let mut v = d[i];
            if x + 1 < width {
                v = v.min(d[i + 1] + 1.0);
            }
            if y + 1 < height {
                v = v.min(d[i + width] + 1.0);
                if x + 1 < width {
                    v = v.min(d[i + width + 1] + D);
                }
                if x > 0 {
                    v = v.min(d[i + width - 1] + D);
                }
            }
            d[i] = v;
        }
    }
    d
}

/// Seeds from the interior probability: the regions where it is at least
/// `seed_threshold`, split at necks `split_depth` pixels shallower than the cores on
/// both sides. The split looks at the region's shape (its distance transform), not at the
/// probability's fine structure, so a textured nucleus whose interior probability wavers
/// between 0.95 and 0.99 stays one cell while two round nuclei pressed together part.
fn split_seeds(
    interior: &[f32],
    foreground: &[bool],
    height: usize,
    width: usize,
    seed_threshold: f32,
    split_depth: f32,
    min_size: usize,
) -> Vec<Vec<usize>> {
    let mask: Vec<bool> = interior
        .iter()
        .zip(foreground)
        .map(|(&v, &f)| f && v >= seed_threshold)
        .collect();
    let depth = chamfer(&mask, height, width);
    let top = depth.iter().copied().fold(0f32, f32::max);
    // From 1 px up (0.5 px from the edge is the region itself).
    let levels: Vec<f32> = (0..)
        .map(|k| 1.0 + k as f32 * LEVEL_STEP)
        .take_while(|&l| l <= top)
        .collect();
    let min_seed = (min_size / 2).max(3);
    level_seeds(&depth, &mask, height, width, &levels, split_depth, min_seed)
}

/// Normalised distance (of a distance head) a pixel needs to belong to a seed region:
/// the seeds of two touching cells are then parted by the pixels within a fifth of a
/// cell's radius of the boundary between them.
pub const DISTANCE_SEED_LEVEL: f32 = 0.2;
/// Rise of the normalised distance above a saddle that makes two peaks two cells.
pub const DISTANCE_DYNAMIC: f32 = 0.2;
/// Steps of the normalised distance at which [`instances`] looks for saddles.
const DISTANCE_STEP: f32 = 0.05;

/// Seeds from a distance head's output: the regions of the foreground where the
/// normalised distance is at least [`DISTANCE_SEED_LEVEL`], split where raising the
/// level parts them into peaks [`DISTANCE_DYNAMIC`] above the saddle between them.
fn distance_seeds(
    distance: &[f32],
    foreground: &[bool],
    height: usize,
    width: usize,
    min_size: usize,
) -> Vec<Vec<usize>> {
    let mask: Vec<bool> = distance
        .iter()
        .zip(foreground)
        .map(|(&d, &f)| f && d >= DISTANCE_SEED_LEVEL)
        .collect();
    let levels: Vec<f32> = (1..)
        .map(|k| DISTANCE_SEED_LEVEL + k as f32 * DISTANCE_STEP)
        .take_while(|&l| l < 1.0)
        .collect();
    let min_seed = (min_size / 4).max(3);
    level_seeds(
        distance,
        &mask,
        height,
        width,
        &levels,
        DISTANCE_DYNAMIC,
        min_seed,
    )
}

/// Labelled cells from a plane's probabilities (see the module documentation). With a
/// distance head, seeds are the peaks of the predicted distance ([`distance_seeds`]),
/// split further at necks `split_depth` deep, and grow highest distance first;
/// `seed_threshold` then does not apply.
#[must_use]
pub fn instances(
    p: &Probabilities,
    min_size: usize,
    seed_threshold: f32,
    split_depth: f32,
) -> Vec<u32> {
    let (h, w) = (p.height, p.width);
    let n = h * w;
    let foreground: Vec<bool> = (0..n).map(|i| p.class(0, i) < 0.5).collect();
    let (seeds, height_map): (_, &[f32]) = match &p.distance {
        Some(d) => {
            // Peaks of the distance, then necks in their shape: a network that has not
            // yet learnt to part two cells with a valley may still have drawn a waist.
            let mut peaks = vec![0f32; n];
            for seed in distance_seeds(d, &foreground, h, w, min_size) {
                for i in seed {
                    peaks[i] = 1.0;
                }
            }
            let seeds = split_seeds(&peaks, &foreground, h, w, 0.5, split_depth, min_size);
            (seeds, d)
        }
        None => {
            // A seed pixel is one whose most likely class is the interior.
            let interior: Vec<f32> = (0..n)
                .map(|i| {
                    let v = p.class(1, i);
                    if v >= p.class(2, i) && v >= p.class(0, i) {
                        v
                    } else {
                        0.0
                    }
                })
                .collect();
            let seeds = split_seeds(
                &interior,
                &foreground,
                h,
                w,
                seed_threshold,
                split_depth,
                min_size,
            );
            (
                seeds,
                &p.classes[INTERIOR as usize * n..(INTERIOR as usize + 1) * n],
            )
        }
    };
    let mut labels = vec![0u32; n];
    let mut count = seeds.len() as u32;
    // Grow the seeds into the foreground, highest interior probability (or distance)
    // first, a watershed, so that touching cells part where the network is least sure a
    // pixel is interior (or nearest an edge); ties in the order pixels were reached.
    let mut heap = std::collections::BinaryHeap::new();
    let mut order = 0u64;
    let key = |i: usize| (height_map[i].clamp(0.0, 1.0) * 65_535.0) as u32;
    for (k, s) in seeds.iter().enumerate() {
        for &i in s {
            labels[i] = k as u32 + 1;
        }
    }
    for (k, s) in seeds.iter().enumerate() {
        for &i in s {
            for j in neighbours(i, h, w) {
                if foreground[j] && labels[j] == 0 {
                    labels[j] = k as u32 + 1;
                    heap.push((key(j), std::cmp::Reverse(order), j));
                    order += 1;
                }
            }
        }
    }
    while let Some((_, _, i)) = heap.pop() {
        for j in neighbours(i, h, w) {
            if foreground[j] && labels[j] == 0 {
                labels[j] = labels[i];
                heap.push((key(j), std::cmp::Reverse(order), j));
                order += 1;
            }
        }
    }
    // Foreground no seed reached (small cells predicted as all boundary).
    let rest: Vec<bool> = (0..n).map(|i| foreground[i] && labels[i] == 0).collect();
    let (extra, _) = components(&rest, h, w);
    for i in 0..n {
        if extra[i] != 0 {
            labels[i] = count + extra[i];
        }
    }
    count += extra.iter().copied().max().unwrap_or(0);
    // Remove small objects and renumber in scan order.
    let mut size = vec![0usize; count as usize + 1];
    for &l in &labels {
        size[l as usize] += 1;
    }
    let mut new = vec![0u32; count as usize + 1];
    let mut next = 0;
    for l in &mut labels {
        if *l == 0 {
            continue;
        }
        if size[*l as usize] < min_size {
            *l = 0;
            continue;
        }
        if new[*l as usize] == 0 {
            next += 1;
            new[*l as usize] = next;
        }
        *l = new[*l as usize];
    }
    labels
}

/// Ratio within which a cell width counts as the model's own, in training (a movie is
/// not resampled) as in inference (an image is not): the zoom augmentation covers it, a
/// second pass would cost a whole inference, and training and inference must agree, or
/// a movie just outside it in training would be seen at another scale in inference.
pub const WIDTH_TOLERANCE: f32 = 1.2;

/// Probabilities of every plane of a normalised frame with the planes rescaled by `s`
/// first and the probabilities rescaled back after.
fn predict_scaled(
    model: &UNet,
    config: &UNetConfig,
    device: &Device,
    norm: &Image,
    s: f32,
    opts: &InferOptions,
) -> Vec<Probabilities> {
    let (h, w) = (norm.height, norm.width);
    let wanted = s;
    let s = scale::capped(s, h, w);
    if s < wanted {
        tracing::warn!(
            wanted,
            used = s,
            height = h,
            width = w,
            "cells this narrow would enlarge the frame past the pixel cap; enlarging less"
        );
    }
    (0..norm.depth)
        .map(|z| {
            if s == 1.0 {
                return predict_plane(model, config, device, norm.plane(z), h, w, opts);
            }
            let (sh, sw) = scale::scaled_size(h, w, s);
            let small = scale::resample(norm.plane(z), h, w, sh, sw);
            let p = predict_plane(model, config, device, &small, sh, sw, opts);
            let back = |planes: &[f32], count: usize| -> Vec<f32> {
                (0..count)
                    .flat_map(|c| {
                        scale::resample(&planes[c * sh * sw..(c + 1) * sh * sw], sh, sw, h, w)
                    })
                    .collect()
            };
            Probabilities {
                height: h,
                width: w,
                classes: back(&p.classes, config.classes),
                states: p.states.as_ref().map(|st| back(st, p.state_count)),
                state_count: p.state_count,
                distance: p.distance.as_ref().map(|d| back(d, 1)),
                scale: sh as f32 / h as f32,
            }
        })
        .collect()
}

/// Cell width of planes' probabilities: the typical width of the regions the network
/// calls foreground (see [`scale::typical_width`]; regions wider than a quarter of the
/// plane are not cells), in the planes' pixels; `None` if it found no cell.
#[must_use]
pub fn foreground_width(planes: &[Probabilities]) -> Option<f32> {
    let regions: Vec<(f32, usize)> = planes
        .iter()
        .flat_map(|p| {
            let mask: Vec<bool> = (0..p.height * p.width)
                .map(|i| p.class(0, i) < 0.5)
                .collect();
            // A region wider than a quarter of the plane is not a cell but background
            // the network took for foreground (an image unlike its training data).
            let widest = p.height.min(p.width) as f32 / 4.0;
            scale::regions(&mask, p.height, p.width)
                .into_iter()
                .filter(move |r| r.0 <= widest)
        })
        .collect();
    scale::typical_width(&regions)
}

/// Downscales probed besides the frame's own scale when estimating the cell width.
const PROBE_SCALES: [f32; 2] = [0.5, 0.25];

/// How much nearer the training width a downscaled probe must see the cells than the
/// frame's own scale did before it is believed (as |ln(width / target)|).
const PROBE_MARGIN: f32 = 0.1;

/// The estimated cell width of a normalised frame for a model trained `target` pixels
/// wide, and the probabilities at the scale that width asks for.
///
/// A first pass at the frame's own scale gives the width of the network's foreground.
/// Cells much larger than the training width fool that pass: the network cuts each into
/// pieces about as wide as the cells it was trained on, and the pieces' width is what it
/// reports. So the frame is also seen at half and a quarter of its size, and a probe
/// whose cells come out clearly nearer the training width (by [`PROBE_MARGIN`]) replaces
/// the first pass's estimate. If the estimate asks for a rescale, the rescaled pass is
/// kept only if its cells come out nearer the training width than the pass the estimate
/// came from: a first pass misled by noise or debris then costs time, not cells. The
/// width returned is the one the kept pass stands for (`None`: no cell found, or the
/// rescale did not hold).
fn estimated_pass(
    model: &UNet,
    config: &UNetConfig,
    device: &Device,
    norm: &Image,
    target: f32,
    opts: &InferOptions,
) -> (Vec<Probabilities>, Option<f32>, f32) {
    // How far from the training width a pass saw the cells, in the network's pixels.
    let off = |w: Option<f32>, k: f32| w.map_or(f32::INFINITY, |w| (w * k / target).ln().abs());
    let first = predict_scaled(model, config, device, norm, 1.0, opts);
    let own = foreground_width(&first);
    // The probe that saw the cells nearest the training width, if clearly nearer than the
    // first pass: (pass, its scale, the width it saw in the frame's pixels, how far off).
    // (pass, the scale asked for, the scale it saw at, the width it saw in the frame's
    // pixels, how far off).
    let mut probe: Option<(Vec<Probabilities>, f32, f32, f32, f32)> = None;
    let mut bar = off(own, 1.0) - PROBE_MARGIN;
    for k in PROBE_SCALES {
        let pass = predict_scaled(model, config, device, norm, k, opts);
        let seen = pass.first().map_or(k, |p| p.scale);
        let Some(w) = foreground_width(&pass) else {
            continue;
        };
        let d = off(Some(w), seen);
        if d < bar {
            bar = d;
            probe = Some((pass, k, seen, w, d));
        }
    }
    let (pass, asked, seen, width, d) = match (probe, own) {
        (Some(p), _) => p,
        (None, Some(w)) => (first, 1.0, 1.0, w, off(own, 1.0)),
        (None, None) => return (first, None, 1.0),
    };
    let s = scale::factor(target, width, WIDTH_TOLERANCE);
    if (s / seen).ln().abs() <= WIDTH_TOLERANCE.ln() {
        // The pass that gave the width already saw the cells near the training width.
        return (pass, Some(width), asked);
    }
    let second = predict_scaled(model, config, device, norm, s, opts);
    let k = second.first().map_or(s, |p| p.scale);
    if off(foreground_width(&second), k) <= d {
        (second, Some(width), s)
    } else if seen < 1.0 {
        // Keep the probe, and the width for which the probe's scale is the right one.
        tracing::debug!(
            width,
            "a rescaled pass did not confirm the probe's cell width"
        );
        (pass, Some(target / seen), asked)
    } else {
        tracing::debug!(
            width,
            "a rescaled pass did not confirm the estimated cell width"
        );
        // `pass` is the first pass here.
        (pass, None, asked)
    }
}

/// Estimated cell width of a raw frame in pixels: the width of the cells the model finds
/// at the frame's own scale, confirmed by a pass at the scale it asks for. `None` if the
/// model was not trained at a fixed width, found no cell, or the rescaled pass did not
/// confirm the width. Segmenting a movie, estimate once and pass the width as
/// [`InferOptions::diameter`], so every frame is seen at the same scale.
#[must_use]
pub fn estimate_width(
    model: &UNet,
    config: &UNetConfig,
    device: &Device,
    frame: &Image,
    opts: &InferOptions,
) -> Option<f32> {
    let target = config.diameter? as f32;
    let norm = normalize(frame, LOW_PERCENTILE, HIGH_PERCENTILE);
    estimated_pass(model, config, device, &norm, target, opts).1
}

/// [`estimate_width`], and the probabilities of the frame that [`predict_frame`] gives at
/// the width a movie is then segmented at (the estimate, else the training width) where
/// the estimate's last pass already saw the frame at that scale: segmenting the frame the
/// width was estimated on then costs no second pass. `None` for the width where
/// [`estimate_width`] gives `None`; `None` for the probabilities where another pass is
/// needed (or the model was not trained at a fixed width).
#[must_use]
pub fn estimate_width_with_pass(
    model: &UNet,
    config: &UNetConfig,
    device: &Device,
    frame: &Image,
    opts: &InferOptions,
) -> (Option<f32>, Option<Vec<Probabilities>>) {
    let Some(target) = config.diameter.map(|d| d as f32) else {
        return (None, None);
    };
    let norm = normalize(frame, LOW_PERCENTILE, HIGH_PERCENTILE);
    let (planes, width, asked) = estimated_pass(model, config, device, &norm, target, opts);
    // predict_frame at diameter w asks predict_scaled for this scale; the same scale of
    // the same normalised frame gives the same probabilities.
    let wanted = scale::factor(target, width.unwrap_or(target), WIDTH_TOLERANCE);
    (width, (wanted == asked).then_some(planes))
}

/// Class (and state, and distance) probabilities of every plane of a raw frame: normalised, rescaled so
/// that its cells are as wide as the model's training width ([`UNetConfig::diameter`];
/// the width is [`InferOptions::diameter`], else estimated by a first pass), predicted,
/// and rescaled back to the frame's pixels.
#[must_use]
pub fn predict_frame(
    model: &UNet,
    config: &UNetConfig,
    device: &Device,
    frame: &Image,
    opts: &InferOptions,
) -> Vec<Probabilities> {
    let norm = normalize(frame, LOW_PERCENTILE, HIGH_PERCENTILE);
    let Some(target) = config.diameter else {
        return predict_scaled(model, config, device, &norm, 1.0, opts);
    };
    let target = target as f32;
    match opts.diameter {
        Some(width) => {
            let s = scale::factor(target, width, WIDTH_TOLERANCE);
            predict_scaled(model, config, device, &norm, s, opts)
        }
        None => estimated_pass(model, config, device, &norm, target, opts).0,
    }
}

/// Labelled cells from a frame's per-plane probabilities; in a 3D stack the planes' cells
/// are joined into 3D cells ([`link_planes`]).
#[must_use]
pub fn labels_from(planes: &[Probabilities], opts: &InferOptions) -> Labels {
    let (h, w) = planes.first().map_or((0, 0), |p| (p.height, p.width));
    let mut out: Labels = Volume::new(planes.len(), h, w);
    let mut offset = 0u32;
    for (z, probs) in planes.iter().enumerate() {
        // Sizes are in the network's pixels; this plane's pixels are 1/scale of them.
        let s = probs.scale;
        let min_size = ((opts.min_size as f32 / (s * s)).round() as usize).max(1);
        let mut labels = instances(probs, min_size, opts.seed_threshold, opts.split_depth / s);
        fill_enclosed(&mut labels, h, w);
        if opts.exclude_border {
            drop_border(&mut labels, h, w);
        }
        let max = labels.iter().copied().max().unwrap_or(0);
        for (o, l) in out.plane_mut(z).iter_mut().zip(labels) {
            *o = if l == 0 { 0 } else { l + offset };
        }
        offset += max;
    }
    if planes.len() > 1 {
        link_planes(&mut out);
    }
    out
}

/// Joins a stack's per-plane cells into 3D cells: a cell in one plane and a cell in the
/// next become one when each is the other's largest overlap and the overlap covers at
/// least half of the smaller of the two (a nucleus's cross-sections in neighbouring
/// planes overlap far more than two neighbouring nuclei do). Labels are renumbered
/// 1, 2, ... in order of first appearance.
pub fn link_planes(labels: &mut Labels) {
    use std::collections::HashMap;
    let max = labels.data.iter().copied().max().unwrap_or(0) as usize;
    if max == 0 {
        return;
    }
    let mut size = vec![0u64; max + 1];
    for &l in &labels.data {
        size[l as usize] += 1;
    }
    // Union-find over the per-plane labels.
    let mut parent: Vec<u32> = (0..=max as u32).collect();
    fn root(parent: &mut [u32], mut x: u32) -> u32 {
        while parent[x as usize] != x {
            let up = parent[parent[x as usize] as usize];
            parent[x as usize] = up;
            x = up;
        }
        x
    }
    for z in 0..labels.depth.saturating_sub(1) {
        let mut overlap: HashMap<(u32, u32), u64> = HashMap::new();
        for (&a, &b) in labels.plane(z).iter().zip(labels.plane(z + 1)) {
            if a != 0 && b != 0 {
                *overlap.entry((a, b)).or_default() += 1;
            }
        }
        // Each cell's largest overlap in the other plane (ties: the lower label).
        let mut best_down: HashMap<u32, (u64, u32)> = HashMap::new();
        let mut best_up: HashMap<u32, (u64, u32)> = HashMap::new();
        for (&(a, b), &n) in &overlap {
            let d = best_down.entry(a).or_insert((n, b));
            if (n, std::cmp::Reverse(b)) > (d.0, std::cmp::Reverse(d.1)) {
                *d = (n, b);
            }
            let u = best_up.entry(b).or_insert((n, a));
            if (n, std::cmp::Reverse(a)) > (u.0, std::cmp::Reverse(u.1)) {
                *u = (n, a);
            }
        }
        for (&a, &(n, b)) in &best_down {
            let mutual = best_up.get(&b).is_some_and(|&(_, back)| back == a);
            let smaller = size[a as usize].min(size[b as usize]);
            if mutual && 2 * n >= smaller {
                let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
                if ra != rb {
                    parent[ra.max(rb) as usize] = ra.min(rb);
                }
            }
        }
    }
    let mut renumber: HashMap<u32, u32> = HashMap::new();
    for l in &mut labels.data {
        if *l != 0 {
            let r = root(&mut parent, *l);
            let next = renumber.len() as u32 + 1;
            *l = *renumber.entry(r).or_insert(next);
        }
    }
}

/// Segments a raw frame (2D, or 3D plane by plane): normalise, predict, extract cells.
/// In a 3D stack the planes' cells are joined into 3D cells.
#[must_use]
pub fn segment(
    model: &UNet,
    config: &UNetConfig,
    device: &Device,
    frame: &Image,
    opts: &InferOptions,
) -> Labels {
    labels_from(&predict_frame(model, config, device, frame, opts), opts)
}

/// Otsu's threshold of values in [0, 1] (256 bins): the cut that maximises the variance
/// between the two sides.
fn otsu(values: &[f32]) -> f32 {
    let mut hist = [0u64; 256];
    for &v in values {
        hist[(v.clamp(0.0, 1.0) * 255.0) as usize] += 1;
    }
    let total = values.len().max(1) as f64;
    let sum: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &c)| i as f64 * c as f64)
        .sum();
    let (mut below, mut below_sum, mut best, mut cut) = (0f64, 0f64, -1f64, 0usize);
    for (i, &c) in hist.iter().enumerate() {
        below += c as f64;
        below_sum += i as f64 * c as f64;
        let above = total - below;
        if below == 0.0 || above == 0.0 {
            continue;
        }
        let d = below_sum / below - (sum - below_sum) / above;
        let between = below * above * d * d;
        if between > best {
            best = between;
            cut = i;
        }
    }
    (cut as f32 + 0.5) / 255.0
}

/// The classical baseline, no network: each plane normalised, thresholded by Otsu's
/// method (objects are the smaller side of the threshold, so dark cells on a bright
/// phase-contrast background work too), and the mask cut into cells at necks and grown
/// back as [`instances`] does with a network's interior (a distance-transform
/// watershed).
#[must_use]
pub fn classical_segment(frame: &Image, opts: &InferOptions) -> Labels {
    let norm = normalize(frame, LOW_PERCENTILE, HIGH_PERCENTILE);
    let (h, w) = (frame.height, frame.width);
    let planes: Vec<Probabilities> = (0..frame.depth)
        .map(|z| {
            let plane = norm.plane(z);
            let t = otsu(plane);
            let above = plane.iter().filter(|&&v| v > t).count();
            let bright = above * 2 <= plane.len();
            let classes: Vec<u8> = plane
                .iter()
                .map(|&v| {
                    if (v > t) == bright {
                        INTERIOR
                    } else {
                        BACKGROUND
                    }
                })
                .collect();
            Probabilities::one_hot(h, w, &classes)
        })
        .collect();
    labels_from(&planes, opts)
}

/// The cell state of one object.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct InstanceState {
    /// The object's label.
    pub label: u32,
    /// Index of the most probable state.
    pub class: usize,
    /// Its probability: the state probability averaged over the object's pixels.
    pub probability: f32,
    /// Every state's probability averaged over the object's pixels.
    pub mean: Vec<f32>,
}

/// Each object's state from the state head's per-pixel probabilities: the state with
/// the highest mean probability over the object's pixels. Empty when the model has no
/// state head. Objects are in ascending label order.
#[must_use]
pub fn instance_states(planes: &[Probabilities], labels: &Labels) -> Vec<InstanceState> {
    let Some(s) = planes.first().map(|p| p.state_count).filter(|&s| s > 0) else {
        return Vec::new();
    };
    let mut sums: std::collections::BTreeMap<u32, (Vec<f64>, u64)> = Default::default();
    for (z, p) in planes.iter().enumerate() {
        let Some(st) = &p.states else { continue };
        let n = p.height * p.width;
        for (i, &l) in labels.plane(z).iter().enumerate() {
            if l == 0 {
                continue;
            }
            let e = sums.entry(l).or_insert_with(|| (vec![0.0; s], 0));
            for (c, acc) in e.0.iter_mut().enumerate() {
                *acc += f64::from(st[c * n + i]);
            }
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(label, (acc, count))| {
            let (class, best) = acc
                .iter()
                .enumerate()
                .fold((0, f64::MIN), |b, (c, &v)| if v > b.1 { (c, v) } else { b });
            let n = count.max(1) as f64;
            InstanceState {
                label,
                class,
                probability: (best / n) as f32,
                mean: acc.iter().map(|&v| (v / n) as f32).collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws a disc of `label` into plane `z` of `v`.
    fn disc(v: &mut Labels, z: usize, (cy, cx): (f32, f32), r: f32, label: u32) {
        let w = v.width;
        for (i, l) in v.plane_mut(z).iter_mut().enumerate() {
            let (y, x) = ((i / w) as f32, (i % w) as f32);
            if (y - cy).hypot(x - cx) <= r {
                *l = label;
            }
        }
    }

    #[test]
    fn what_one_cell_encloses_becomes_part_of_it() {
        let (h, w) = (20, 30);
        let mut l = vec![0u32; h * w];
        let mut fill = |y0: usize, y1: usize, x0: usize, x1: usize, v: u32| {
            for y in y0..y1 {
                for x in x0..x1 {
                    l[y * w + x] = v;
                }
            }
        };
        // Cell 1 with a hole (rows 5-9, columns 5-9) and cell 3 inside the hole.
        fill(2, 13, 2, 13, 1);
        fill(5, 10, 5, 10, 0);
        fill(6, 8, 6, 8, 3);
        // Cell 2 beside cell 1, touching it; a notch of background between the two
        // (surrounded by both) stays background.
        fill(2, 13, 13, 24, 2);
        fill(6, 8, 12, 14, 0);
        // Cell 4 touches the border with a hole that opens onto the border: kept open.
        fill(15, 20, 0, 6, 4);
        fill(17, 20, 2, 4, 0);
        let before = l.clone();
        fill_enclosed(&mut l, h, w);
        for y in 2..13 {
            for x in 2..12 {
                assert_eq!(l[y * w + x], 1, "({y}, {x})");
            }
        }
        for i in 0..h * w {
            let (y, x) = (i / w, i % w);
            if !(2..13).contains(&y) || !(2..12).contains(&x) {
                assert_eq!(l[i], before[i], "({y}, {x}) changed");
            }
        }
        assert!(!l.contains(&3));
    }

    #[test]
    fn stacked_cross_sections_join_into_3d_cells_and_neighbours_do_not() {
        let mut v: Labels = Volume::new(4, 40, 60);
        // Nucleus one: planes 0-3, drifting a little, smaller at the ends.
        disc(&mut v, 0, (20.0, 15.0), 5.0, 1);
        disc(&mut v, 1, (20.0, 16.0), 8.0, 2);
        disc(&mut v, 2, (21.0, 16.0), 8.0, 3);
        disc(&mut v, 3, (21.0, 17.0), 4.0, 4);
        // Nucleus two, touching one's widest sections: planes 1-2 only.
        disc(&mut v, 1, (20.0, 31.0), 7.0, 5);
        disc(&mut v, 2, (20.0, 31.0), 7.0, 6);
        // A third that only grazes nucleus two's edge in the next plane: kept apart.
        disc(&mut v, 3, (20.0, 42.0), 6.0, 7);
        link_planes(&mut v);
        let at = |z: usize, y: usize, x: usize| v.plane(z)[y * 60 + x];
        let one = at(0, 20, 15);
        assert!(one != 0);
        for (z, x) in [(1, 16), (2, 16), (3, 17)] {
            assert_eq!(at(z, 20, x), one, "plane {z}");
        }
        let two = at(1, 20, 31);
        assert!(two != 0 && two != one);
        assert_eq!(at(2, 20, 31), two);
        let three = at(3, 20, 42);
        assert!(three != 0 && three != two && three != one);
        assert_eq!(v.ids().len(), 3, "{:?}", v.ids());
        // Renumbered 1, 2, 3 in order of first appearance.
        assert_eq!((one, two, three), (1, 2, 3));
    }

    fn probs_from_classes(h: usize, w: usize, cls: &[u8]) -> Probabilities {
        Probabilities::one_hot(h, w, cls)
    }

    #[test]
    fn boundaries_split_touching_cells_and_small_objects_go() {
        #[rustfmt::skip]
        let cls = [
            2, 2, 2, 2, 2, 2, 0, 0,
            2, 1, 1, 2, 1, 2, 0, 2,
            2, 1, 1, 2, 1, 2, 0, 0,
            2, 2, 2, 2, 2, 2, 0, 0,
        ];
        let p = probs_from_classes(4, 8, &cls);
        let l = instances(&p, 2, 0.5, 1.5);
        // Two cells (left seed 2x2, right seed 1x2) share the boundary pixels between them;
        // the lone boundary pixel at (1, 7) is smaller than min_size and removed.
        let ids: std::collections::BTreeSet<u32> = l.iter().copied().filter(|&x| x != 0).collect();
        assert_eq!(ids.len(), 2, "{l:?}");
        assert_eq!(l[9], 1);
        assert_eq!(l[12], 2);
        assert_eq!(l[15], 0);
        assert!(
            l.iter()
                .zip(&cls)
                .all(|(&lab, &c)| (lab == 0) == (c == 0) || (c == 2 && lab == 0))
        );
    }

    #[test]
    fn instance_states_average_each_objects_pixels() {
        let mut p = probs_from_classes(1, 4, &[1, 1, 1, 0]);
        p.state_count = 2;
        // State 0 plane, then state 1 plane.
        p.states = Some(vec![0.9, 0.2, 0.1, 0.5, 0.1, 0.8, 0.9, 0.5]);
        let labels = Volume::from_2d(1, 4, vec![3, 3, 5, 0]);
        let s = instance_states(&[p.clone()], &labels);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].label, s[0].class), (3, 0));
        assert!((s[0].probability - 0.55).abs() < 1e-6);
        assert_eq!((s[1].label, s[1].class), (5, 1));
        assert!((s[1].probability - 0.9).abs() < 1e-6);
        p.state_count = 0;
        p.states = None;
        assert!(instance_states(&[p], &labels).is_empty());
    }

    /// Interior probabilities `int` (background 0 where `int` is 0, the rest boundary).
    fn probs_from_interior(h: usize, w: usize, int: &[f32]) -> Probabilities {
        let n = h * w;
        let mut classes = vec![0f32; 3 * n];
        for (i, &v) in int.iter().enumerate() {
            if v == 0.0 {
                classes[i] = 1.0;
            } else {
                classes[n + i] = v;
                classes[2 * n + i] = 1.0 - v;
            }
        }
        Probabilities::without_states(h, w, classes)
    }

    /// Interior probability `v` inside the discs `(cy, cx, r)`, 0 (background) elsewhere.
    fn discs(h: usize, w: usize, discs: &[(f32, f32, f32)], v: impl Fn(usize) -> f32) -> Vec<f32> {
        (0..h * w)
            .map(|i| {
                let (y, x) = ((i / w) as f32, (i % w) as f32);
                let inside = discs
                    .iter()
                    .any(|&(cy, cx, r)| (y - cy).powi(2) + (x - cx).powi(2) <= r * r);
                if inside { v(i) } else { 0.0 }
            })
            .collect()
    }

    #[test]
    fn touching_cells_split_at_a_neck_and_textured_cells_stay_whole() {
        // Two discs of radius 6 overlapping by 1 pixel: one interior region with a neck
        // about 5 pixels wide.
        for confidence in [0.99f32, 0.6] {
            let int = discs(16, 28, &[(8.0, 8.0, 6.0), (8.0, 19.0, 6.0)], |_| confidence);
            let l = instances(&probs_from_interior(16, 28, &int), 10, 0.5, 1.5);
            let (left, right) = (l[8 * 28 + 6], l[8 * 28 + 21]);
            assert!(
                left != 0 && right != 0 && left != right,
                "{confidence}: {l:?}"
            );
            assert_eq!(l.iter().copied().max(), Some(2));
        }
        // One disc whose interior probability wavers between 0.9 and 0.999 pixel by
        // pixel (a textured nucleus) stays one cell.
        let int = discs(20, 20, &[(10.0, 10.0, 8.0)], |i| {
            if (i * 7919) % 5 < 2 { 0.9 } else { 0.999 }
        });
        let l = instances(&probs_from_interior(20, 20, &int), 10, 0.5, 1.5);
        assert_eq!(l.iter().copied().max(), Some(1), "{l:?}");
        // A flat interior at 0.6 (a network not yet sure) is still a cell, not left
        // unseeded.
        let int = discs(20, 20, &[(10.0, 10.0, 5.0)], |_| 0.6);
        let l = instances(&probs_from_interior(20, 20, &int), 10, 0.5, 1.5);
        assert_eq!(l.iter().copied().max(), Some(1));
        assert_eq!(
            l.iter().filter(|&&v| v == 1).count(),
            int.iter().filter(|&&v| v > 0.0).count()
        );
        // Raising the split depth above the cores' depth keeps the pair together.
        let int = discs(16, 28, &[(8.0, 8.0, 6.0), (8.0, 19.0, 6.0)], |_| 0.99);
        let l = instances(&probs_from_interior(16, 28, &int), 10, 0.5, 8.0);
        assert_eq!(l.iter().copied().max(), Some(1));
    }

    /// Probabilities of a distance-head model: foreground where `dist` > 0, the distance
    /// head's output `dist`, and interior probabilities that know nothing (0.5).
    fn probs_from_distance(h: usize, w: usize, dist: &[f32]) -> Probabilities {
        let int: Vec<f32> = dist
            .iter()
            .map(|&d| if d > 0.0 { 0.5 } else { 0.0 })
            .collect();
        let mut p = probs_from_interior(h, w, &int);
        p.distance = Some(dist.to_vec());
        p
    }

    /// Normalised distance of discs `(cy, cx, r)` (1 at the centre, falling to 0 at the
    /// edge; where discs overlap, the nearer centre's).
    fn disc_distance(h: usize, w: usize, discs: &[(f32, f32, f32)]) -> Vec<f32> {
        (0..h * w)
            .map(|i| {
                let (y, x) = ((i / w) as f32, (i % w) as f32);
                discs
                    .iter()
                    .map(|&(cy, cx, r)| 1.0 - ((y - cy).powi(2) + (x - cx).powi(2)).sqrt() / r)
                    .fold(0f32, f32::max)
                    .max(0.0)
            })
            .collect()
    }

    #[test]
    fn distance_peaks_part_touching_cells_and_rods_stay_whole() {
        // Two discs of radius 7 with centres 7 apart: their waist is barely narrower than
        // either (no neck for the boundary extraction), but the distance dips to 0.5
        // between peaks of 1.
        let d = disc_distance(18, 30, &[(9.0, 9.0, 7.0), (9.0, 16.0, 7.0)]);
        let l = instances(&probs_from_distance(18, 30, &d), 10, 0.5, 1.5);
        let (left, right) = (l[9 * 30 + 6], l[9 * 30 + 19]);
        assert!(left != 0 && right != 0 && left != right, "{l:?}");
        assert_eq!(l.iter().copied().max(), Some(2));
        // Every foreground pixel went to one of them.
        assert_eq!(
            l.iter().filter(|&&v| v != 0).count(),
            d.iter().filter(|&&v| v > 0.0).count()
        );
        // A rod 5 pixels wide and 40 long (a bacterium): its ridge is flat, one cell.
        let (h, w) = (9, 48);
        let rod: Vec<f32> = (0..h * w)
            .map(|i| {
                let (y, x) = ((i / w) as f32, (i % w) as f32);
                let across = 1.0 - (y - 4.0).abs() / 3.5;
                let along = ((x - 3.0).min(45.0 - x) / 3.5).min(1.0);
                across.min(along).max(0.0)
            })
            .collect();
        let l = instances(&probs_from_distance(h, w, &rod), 10, 0.5, 1.5);
        assert_eq!(l.iter().copied().max(), Some(1), "{l:?}");
        // The same pair without a distance head is split only at a deep neck: here the
        // boundary extraction sees one cell, which is what the head is for.
        let int: Vec<f32> = d
            .iter()
            .map(|&v| if v > 0.0 { 0.99 } else { 0.0 })
            .collect();
        let l = instances(&probs_from_interior(18, 30, &int), 10, 0.5, 1.5);
        assert_eq!(l.iter().copied().max(), Some(1), "{l:?}");
    }

    #[test]
    fn classical_baseline_finds_bright_and_dark_cells() {
        let int = discs(24, 40, &[(8.0, 8.0, 5.0), (16.0, 28.0, 6.0)], |_| 1.0);
        for bright in [true, false] {
            let data: Vec<f32> = int
                .iter()
                .map(|&v| if (v > 0.0) == bright { 900.0 } else { 100.0 })
                .collect();
            let img = Volume::from_2d(24, 40, data);
            let l = classical_segment(&img, &InferOptions::default());
            assert_eq!(l.ids().len(), 2, "bright {bright}");
            assert_ne!(l.data[8 * 40 + 8], 0);
            assert_ne!(l.data[16 * 40 + 28], 0);
            assert_eq!(l.data[0], 0);
        }
    }

    #[test]
    fn unseeded_foreground_becomes_an_object() {
        let cls = [2, 2, 0, 0, 2, 2, 0, 0];
        let l = instances(&probs_from_classes(2, 4, &cls), 1, 0.5, 1.5);
        assert_eq!(l, vec![1, 1, 0, 0, 1, 1, 0, 0]);
    }

    #[test]
    fn border_objects_are_counted_and_dropped() {
        let v = Volume::from_2d(3, 3, vec![1, 0, 0, 0, 2, 0, 3, 3, 0]);
        assert_eq!(border_objects(&[&v]), (2, 3));
        let mut l = v.data.clone();
        drop_border(&mut l[..], 3, 3);
        assert_eq!(l, vec![0, 0, 0, 0, 2, 0, 0, 0, 0]);
    }

    #[test]
    fn tiles_cover_any_size() {
        assert_eq!(starts(100, 256, 32), vec![0]);
        assert_eq!(starts(700, 256, 32), vec![0, 224, 444]);
        assert_eq!(mirror(-1, 5), 1);
        assert_eq!(mirror(5, 5), 3);
        assert_eq!(mirror(12, 5), 4);
    }

    #[test]
    fn frames_are_seen_at_the_training_width_and_answered_in_their_own_pixels() {
        let device = crate::model::default_device();
        device.seed(5);
        let cfg = UNetConfig::new()
            .with_depth(2)
            .with_base_channels(4)
            .with_diameter(Some(20));
        let model = cfg.init(&device);
        let (h, w) = (48, 60);
        let frame = Volume::from_2d(h, w, (0..h * w).map(|i| (i * 13 % 29) as f32).collect());
        let at = |width: f32| {
            predict_frame(
                &model,
                &cfg,
                &device,
                &frame,
                &InferOptions {
                    diameter: Some(width),
                    ..InferOptions::default()
                },
            )
        };
        // Cells 40 px wide: the frame is halved for the network, the answer is full size.
        let halved = at(40.0);
        assert_eq!((halved[0].height, halved[0].width), (h, w));
        assert!((halved[0].scale - 0.5).abs() < 1e-6, "{}", halved[0].scale);
        assert_eq!(halved[0].classes.len(), 3 * h * w);
        let sum: f32 = (0..3).map(|c| halved[0].class(c, 100)).sum();
        assert!(
            (sum - 1.0).abs() < 1e-4,
            "probabilities still sum to 1: {sum}"
        );
        // Within the tolerance nothing is resampled: the frame's own-scale pass.
        let same = at(22.0);
        assert_eq!(same[0].scale, 1.0);
        let plain = predict_frame(
            &model,
            &cfg.clone().with_diameter(None),
            &device,
            &frame,
            &InferOptions::default(),
        );
        assert_eq!(same, plain);
        // Sizes follow the scale: 10 pixels of area for the network are 40 of the frame.
        let labels = labels_from(&halved, &InferOptions::default());
        assert_eq!(labels.shape(), (1, h, w));
    }

    #[test]
    fn the_width_estimates_pass_is_the_one_segmenting_at_that_width_computes() {
        let device = crate::model::default_device();
        device.seed(11);
        let (h, w) = (48, 60);
        let frame = Volume::from_2d(h, w, (0..h * w).map(|i| (i * 17 % 31) as f32).collect());
        let mut reused = 0;
        for diameter in [4, 20, 60] {
            let cfg = UNetConfig::new()
                .with_depth(2)
                .with_base_channels(4)
                .with_diameter(Some(diameter));
            let model = cfg.init(&device);
            let opts = InferOptions::default();
            let (width, planes) = estimate_width_with_pass(&model, &cfg, &device, &frame, &opts);
            assert_eq!(width, estimate_width(&model, &cfg, &device, &frame, &opts));
            if let Some(planes) = planes {
                let at = InferOptions {
                    diameter: Some(width.unwrap_or(diameter as f32)),
                    ..opts
                };
                assert_eq!(planes, predict_frame(&model, &cfg, &device, &frame, &at));
                reused += 1;
            }
        }
        assert!(reused > 0, "no estimate's pass was reusable");
    }

    #[test]
    fn tiled_prediction_matches_one_big_tile() {
        let device = crate::model::default_device();
        device.seed(3);
        let cfg = UNetConfig::new().with_depth(2).with_base_channels(4);
        let model = cfg.init(&device);
        let (h, w) = (40, 52);
        let plane: Vec<f32> = (0..h * w)
            .map(|i| ((i * 37 % 101) as f32) / 101.0)
            .collect();
        let whole = predict_plane(
            &model,
            &cfg,
            &device,
            &plane,
            h,
            w,
            &InferOptions {
                tile: 64,
                overlap: 0,
                batch: 1,
                ..InferOptions::default()
            },
        );
        let tiled = predict_plane(
            &model,
            &cfg,
            &device,
            &plane,
            h,
            w,
            &InferOptions {
                tile: 32,
                overlap: 8,
                batch: 3,
                ..InferOptions::default()
            },
        );
        // Probabilities sum to one everywhere, and tiling changes them only near seams.
        for i in 0..h * w {
            let s: f32 = (0..3).map(|c| tiled.class(c, i)).sum();
            assert!((s - 1.0).abs() < 1e-4);
        }
        let diff: f32 = whole
            .classes
            .iter()
            .zip(&tiled.classes)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / whole.classes.len() as f32;
        assert!(diff < 0.05, "mean difference {diff}");
    }
}
