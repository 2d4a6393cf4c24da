//! Object size: how wide cells are in an image, and resampling images to another scale.
//!
//! A consortium agrees on one cell width in pixels (`[model] diameter`). Each site
//! rescales its training movies from the width of their annotated cells to that one, and
//! inference rescales an image from its estimated cell width, so one network sees cells
//! of one size whatever the microscope, objective or binning (as Cellpose rescales to its
//! mean diameter). Width here is twice the largest inscribed radius of a cell region,
//! measured the same way on annotations and on a network's foreground: the diameter of a
//! round nucleus, the width (not the length) of a rod.

use crate::infer::{chamfer, components};

/// Width and area (pixels) of each 4-connected region of `mask` at least 3 pixels wide.
/// The width is twice the largest distance from a region pixel to the nearest pixel
/// outside it, less one (a 1-pixel line is 1 wide, a 7-pixel one 7; an even width reads
/// one less). Touching cells merged into one region still give about one cell's width,
/// since the widest point of two touching disks is each disk's centre.
#[must_use]
pub fn regions(mask: &[bool], height: usize, width: usize) -> Vec<(f32, usize)> {
    let (labels, count) = components(mask, height, width);
    let depth = chamfer(mask, height, width);
    let mut deepest = vec![(0f32, 0usize); count as usize + 1];
    for (&r, &d) in labels.iter().zip(&depth) {
        if r != 0 {
            let slot = &mut deepest[r as usize];
            slot.0 = slot.0.max(d);
            slot.1 += 1;
        }
    }
    deepest
        .into_iter()
        .skip(1)
        .map(|(d, area)| (2.0 * d - 1.0, area))
        .filter(|&(w, _)| w >= 3.0)
        .collect()
}

/// The typical cell width of regions `(width, area)`: the median width with each region
/// weighted by its area, so that a spray of specks (noise, debris, a network unsure of a
/// noisy image) does not outvote the cells; `None` without regions.
#[must_use]
pub fn typical_width(regions: &[(f32, usize)]) -> Option<f32> {
    let mut v: Vec<(f32, usize)> = regions.iter().copied().filter(|r| r.1 > 0).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: usize = v.iter().map(|r| r.1).sum();
    let mut seen = 0;
    for (w, area) in &v {
        seen += area;
        if 2 * seen >= total {
            return Some(*w);
        }
    }
    v.last().map(|r| r.0)
}

/// Smallest and largest factor by which an image is ever rescaled.
pub const SCALE_RANGE: (f32, f32) = (0.125, 4.0);

/// The factor that takes cells `observed` pixels wide to `target` pixels, within
/// [`SCALE_RANGE`]; exactly 1 when the two are within `tolerance` (a ratio above 1) of
/// each other, so nearly right images are not resampled.
#[must_use]
pub fn factor(target: f32, observed: f32, tolerance: f32) -> f32 {
    if !(observed.is_finite() && observed > 0.0 && target > 0.0) {
        return 1.0;
    }
    let s = (target / observed).clamp(SCALE_RANGE.0, SCALE_RANGE.1);
    if s.ln().abs() <= tolerance.ln() {
        1.0
    } else {
        s
    }
}

/// Most pixels a plane is enlarged to (16 Mi: about 450 MB of probabilities and
/// activations at inference); enlarging stops there.
pub const MAX_SCALED_PIXELS: usize = 1 << 24;

/// `s`, lowered where needed so that a `height x width` plane enlarged by it stays within
/// [`MAX_SCALED_PIXELS`] (a plane already larger is not enlarged at all).
#[must_use]
pub fn capped(s: f32, height: usize, width: usize) -> f32 {
    if s <= 1.0 {
        return s;
    }
    let room = (MAX_SCALED_PIXELS as f32 / (height * width).max(1) as f32).sqrt();
    s.min(room).max(1.0)
}

/// Size of a `height x width` plane rescaled by `s` (at least 1 x 1).
#[must_use]
pub fn scaled_size(height: usize, width: usize, s: f32) -> (usize, usize) {
    let side = |n: usize| ((n as f32 * s).round() as usize).max(1);
    (side(height), side(width))
}

/// Source coordinate of the centre of target pixel `i` when `from` pixels become `to`.
fn source(i: usize, from: usize, to: usize) -> f32 {
    (i as f32 + 0.5) * from as f32 / to as f32 - 0.5
}

/// Bilinear value of `plane` at fractional source position `(y, x)`, clamped to the plane.
fn bilinear(plane: &[f32], height: usize, width: usize, y: f32, x: f32) -> f32 {
    let y = y.clamp(0.0, (height - 1) as f32);
    let x = x.clamp(0.0, (width - 1) as f32);
    let (y0, x0) = (y.floor() as usize, x.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(height - 1), (x0 + 1).min(width - 1));
    let (fy, fx) = (y - y0 as f32, x - x0 as f32);
    let top = plane[y0 * width + x0] * (1.0 - fx) + plane[y0 * width + x1] * fx;
    let bottom = plane[y1 * width + x0] * (1.0 - fx) + plane[y1 * width + x1] * fx;
    top * (1.0 - fy) + bottom * fy
}

/// `plane` (`height x width`) resampled to `to_height x to_width`: bilinear when
/// enlarging; when shrinking, each target pixel averages a grid of bilinear samples over
/// the source pixels it covers, so fine texture does not alias.
#[must_use]
pub fn resample(
    plane: &[f32],
    height: usize,
    width: usize,
    to_height: usize,
    to_width: usize,
) -> Vec<f32> {
    if (height, width) == (to_height, to_width) {
        return plane.to_vec();
    }
    if height == 0 || width == 0 {
        return vec![0.0; to_height * to_width];
    }
    let (ry, rx) = (
        height as f32 / to_height as f32,
        width as f32 / to_width as f32,
    );
    // Samples per target pixel along each axis.
    let (ky, kx) = (ry.ceil().max(1.0) as usize, rx.ceil().max(1.0) as usize);
    let mut out = Vec::with_capacity(to_height * to_width);
    for ty in 0..to_height {
        for tx in 0..to_width {
            let mut sum = 0.0;
            for a in 0..ky {
                let y = (ty as f32 + (a as f32 + 0.5) / ky as f32) * ry - 0.5;
                for b in 0..kx {
                    let x = (tx as f32 + (b as f32 + 0.5) / kx as f32) * rx - 0.5;
                    sum += bilinear(plane, height, width, y, x);
                }
            }
            out.push(sum / (ky * kx) as f32);
        }
    }
    out
}

/// `plane` resampled to `to_height x to_width` by nearest neighbour (labels, classes).
#[must_use]
pub fn resample_nearest<T: Copy + Default>(
    plane: &[T],
    height: usize,
    width: usize,
    to_height: usize,
    to_width: usize,
) -> Vec<T> {
    if height == 0 || width == 0 {
        return vec![T::default(); to_height * to_width];
    }
    let pick = |i: usize, from: usize, to: usize| {
        (source(i, from, to).round().max(0.0) as usize).min(from - 1)
    };
    let cols: Vec<usize> = (0..to_width).map(|x| pick(x, width, to_width)).collect();
    let mut out = Vec::with_capacity(to_height * to_width);
    for ty in 0..to_height {
        let row = pick(ty, height, to_height) * width;
        out.extend(cols.iter().map(|&c| plane[row + c]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The widths of [`regions`].
    fn region_widths(mask: &[bool], height: usize, width: usize) -> Vec<f32> {
        regions(mask, height, width)
            .into_iter()
            .map(|r| r.0)
            .collect()
    }

    fn disks(height: usize, width: usize, centres: &[(f32, f32, f32)]) -> Vec<bool> {
        (0..height * width)
            .map(|i| {
                let (y, x) = ((i / width) as f32, (i % width) as f32);
                centres
                    .iter()
                    .any(|&(cy, cx, r)| (y - cy).powi(2) + (x - cx).powi(2) <= r * r)
            })
            .collect()
    }

    #[test]
    fn widths_are_cell_diameters_and_rod_widths() {
        // Disks of radius 10 (21 pixels across), two of them touching.
        let m = disks(
            80,
            80,
            &[(20.0, 20.0, 10.0), (20.0, 39.0, 10.0), (60.0, 60.0, 10.0)],
        );
        let w = region_widths(&m, 80, 80);
        assert_eq!(w.len(), 2, "the touching pair is one region");
        for v in &w {
            assert!((19.0..=23.0).contains(v), "width {v}");
        }
        // A rod 7 pixels wide and 40 long is 7 wide.
        let rod: Vec<bool> = (0..50 * 50)
            .map(|i| (10..17).contains(&(i / 50)) && (5..45).contains(&(i % 50)))
            .collect();
        assert_eq!(region_widths(&rod, 50, 50), vec![7.0]);
        // Specks narrower than 3 pixels are not cells.
        let mut speck = vec![false; 100];
        speck[55] = true;
        assert!(region_widths(&speck, 10, 10).is_empty());
    }

    #[test]
    fn specks_do_not_outvote_cells() {
        // Two cells 21 px wide among forty 3 px specks.
        let mut m = disks(120, 120, &[(30.0, 30.0, 10.0), (80.0, 80.0, 10.0)]);
        for k in 0..40 {
            let (y, x) = (2 + (k / 8) * 4, 60 + (k % 8) * 6);
            for (dy, dx) in [
                (0, 0),
                (0, 1),
                (0, 2),
                (1, 0),
                (1, 1),
                (1, 2),
                (2, 0),
                (2, 1),
                (2, 2),
            ] {
                m[(y + dy) * 120 + x + dx] = true;
            }
        }
        let r = regions(&m, 120, 120);
        assert_eq!(r.len(), 42);
        // Counted region by region, the specks are the middle of the widths.
        let mut widths = region_widths(&m, 120, 120);
        widths.sort_by(f32::total_cmp);
        assert_eq!(widths[widths.len() / 2], 3.0);
        let w = typical_width(&r).unwrap();
        assert!((19.0..=23.0).contains(&w), "{w}");
        assert_eq!(typical_width(&[]), None);
    }

    #[test]
    fn factors_stay_within_range_and_leave_near_matches_alone() {
        assert_eq!(factor(20.0, 21.0, 1.2), 1.0);
        assert!((factor(20.0, 40.0, 1.2) - 0.5).abs() < 1e-6);
        assert_eq!(factor(20.0, 1000.0, 1.2), SCALE_RANGE.0);
        assert_eq!(factor(20.0, 0.5, 1.2), SCALE_RANGE.1);
        assert_eq!(factor(20.0, f32::NAN, 1.2), 1.0);
    }

    #[test]
    fn resampling_keeps_means_shapes_and_labels() {
        // A horizontal ramp keeps its mean and its slope direction either way.
        let (h, w) = (30, 40);
        let ramp: Vec<f32> = (0..h * w).map(|i| (i % w) as f32 / w as f32).collect();
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        for (th, tw) in [(15, 20), (60, 80), (7, 9)] {
            let r = resample(&ramp, h, w, th, tw);
            assert_eq!(r.len(), th * tw);
            assert!((mean(&r) - mean(&ramp)).abs() < 0.02, "{th}x{tw}");
            assert!(r[tw - 1] > r[0]);
        }
        assert_eq!(resample(&ramp, h, w, h, w), ramp);
        // Disk widths scale with the image.
        let m = disks(60, 60, &[(30.0, 30.0, 12.0)]);
        let labels: Vec<u32> = m.iter().map(|&b| u32::from(b) * 7).collect();
        let big = resample_nearest(&labels, 60, 60, 120, 120);
        assert!(big.iter().all(|&l| l == 0 || l == 7));
        let wide: Vec<bool> = big.iter().map(|&l| l != 0).collect();
        let (before, after) = (
            region_widths(&m, 60, 60)[0],
            region_widths(&wide, 120, 120)[0],
        );
        assert!((after / before - 2.0).abs() < 0.1, "{before} -> {after}");
        assert_eq!(scaled_size(700, 1100, 0.5), (350, 550));
        assert_eq!(scaled_size(3, 3, 0.01), (1, 1));
        assert_eq!(resample(&[], 0, 0, 2, 2), vec![0.0; 4]);
        assert_eq!(capped(4.0, 100, 100), 4.0);
        assert!((capped(4.0, 2048, 2048) - 2.0).abs() < 1e-6);
        assert_eq!(capped(4.0, 8192, 8192), 1.0);
        assert_eq!(capped(0.5, 8192, 8192), 0.5);
    }
}
