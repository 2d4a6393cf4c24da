//! Percentile normalisation and the three-class training targets.

use super::volume::{Image, Labels};

/// Default low and high percentiles.
pub const LOW_PERCENTILE: f32 = 1.0;
/// Default high percentile.
pub const HIGH_PERCENTILE: f32 = 99.8;

/// The values at percentiles `lo` and `hi` (0-100) of `values` (NaNs ignored).
#[must_use]
pub fn percentiles(values: &[f32], lo: f32, hi: f32) -> (f32, f32) {
    let mut v: Vec<f32> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    let rank = |p: f32| {
        (((p / 100.0).clamp(0.0, 1.0) * (v.len() - 1) as f32).round() as usize).min(v.len() - 1)
    };
    let (i, j) = (rank(lo), rank(hi));
    let a = *v.select_nth_unstable_by(i, f32::total_cmp).1;
    let b = *v.select_nth_unstable_by(j, f32::total_cmp).1;
    (a, b)
}

/// Radius of the box mean whose percentiles [`normalize`] takes: a 5 x 5 mean lowers
/// pixel noise fivefold, so a noisy frame's percentiles sit where a clean frame's do.
pub const SMOOTHING_RADIUS: usize = 2;

/// Radius of the box mean whose percentiles normalise training frames: 0, the raw
/// pixels (docs/training.md, "Normalisation": smoothed percentiles read unseen images
/// better, raw ones train better models).
pub const TRAINING_SMOOTHING_RADIUS: usize = 0;

/// Mean of each pixel's `(2r+1)`-square neighbourhood, clipped at the plane's edges,
/// taken as a separable filter: the mean along each row's window, then the mean of
/// those along each column's window. Non-finite pixels (NaN, infinities) are left out
/// of both means; a pixel with no finite value in reach gets NaN, which [`percentiles`]
/// ignores.
#[must_use]
pub fn box_mean(plane: &[f32], height: usize, width: usize, r: usize) -> Vec<f32> {
    debug_assert_eq!(plane.len(), height * width);
    // Running sums (f64, so long rows lose nothing) of the finite values and their
    // count; one buffer serves every row and column.
    let mut prefix = vec![(0f64, 0u32); height.max(width) + 1];
    let mut mean_1d = |get: &dyn Fn(usize) -> f32, n: usize, put: &mut dyn FnMut(usize, f32)| {
        for i in 0..n {
            let v = get(i);
            let (s, c) = prefix[i];
            prefix[i + 1] = if v.is_finite() {
                (s + f64::from(v), c + 1)
            } else {
                (s, c)
            };
        }
        for i in 0..n {
            let (a, b) = (i.saturating_sub(r), (i + r + 1).min(n));
            let count = prefix[b].1 - prefix[a].1;
            put(
                i,
                if count == 0 {
                    f32::NAN
                } else {
                    ((prefix[b].0 - prefix[a].0) / f64::from(count)) as f32
                },
            );
        }
    };
    let mut rows = vec![0f32; plane.len()];
    for y in 0..height {
        let base = y * width;
        mean_1d(&|x| plane[base + x], width, &mut |x, v| rows[base + x] = v);
    }
    let mut out = vec![0f32; plane.len()];
    for x in 0..width {
        mean_1d(&|y| rows[y * width + x], height, &mut |y, v| {
            out[y * width + x] = v;
        });
    }
    out
}

/// Maps each plane's `lo`..`hi` percentiles to 0..1 (values outside are kept, not
/// clipped). The percentiles are those of the plane's [`box_mean`] of radius
/// [`SMOOTHING_RADIUS`], so pixel noise does not move them: taken of the raw pixels, the
/// low percentile of a noisy frame lies some two noise deviations below its background,
/// which lifts the normalised background (0.18 against 0.06 on the synthetic `noisy` and
/// `balanced` profiles) and a model trained on clean sites misreads it
/// (docs/training.md, "Normalisation").
#[must_use]
pub fn normalize(img: &Image, lo: f32, hi: f32) -> Image {
    normalize_smoothed(img, lo, hi, SMOOTHING_RADIUS)
}

/// [`normalize`] with the percentiles taken of each plane's box mean of `radius`
/// (0: of the raw pixels).
#[must_use]
pub fn normalize_smoothed(img: &Image, lo: f32, hi: f32, radius: usize) -> Image {
    let mut out = img.clone();
    for z in 0..img.depth {
        // At radius 0 the box mean is the plane with its non-finite pixels as NaN, which
        // the percentiles leave out.
        let smooth = box_mean(img.plane(z), img.height, img.width, radius);
        let (a, b) = percentiles(&smooth, lo, hi);
        let scale = if b > a { 1.0 / (b - a) } else { 1.0 };
        for v in out.plane_mut(z) {
            *v = (*v - a) * scale;
        }
    }
    out
}

/// Background, cell interior and cell boundary: what the network predicts per pixel.
pub const BACKGROUND: u8 = 0;
/// Cell interior.
pub const INTERIOR: u8 = 1;
/// Cell boundary: instance pixels with a 4-neighbour of another label (in-plane).
pub const BOUNDARY: u8 = 2;
/// Number of pixel classes.
pub const CLASSES: usize = 3;

/// The per-pixel classes of a label image (each plane on its own).
#[must_use]
pub fn classes(labels: &Labels) -> Vec<u8> {
    let (d, h, w) = labels.shape();
    let mut out = vec![BACKGROUND; d * h * w];
    for z in 0..d {
        let p = labels.plane(z);
        let o = &mut out[z * h * w..(z + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let l = p[y * w + x];
                if l == 0 {
                    continue;
                }
                let differs = |yy: usize, xx: usize| p[yy * w + xx] != l;
                let edge = (y > 0 && differs(y - 1, x))
                    || (y + 1 < h && differs(y + 1, x))
                    || (x > 0 && differs(y, x - 1))
                    || (x + 1 < w && differs(y, x + 1));
                o[y * w + x] = if edge { BOUNDARY } else { INTERIOR };
            }
        }
    }
    out
}

/// The distance head's target from a plane's pixel classes: each interior pixel's
/// distance to the nearest pixel outside its cell's interior, divided by the largest such
/// distance in that cell (so every cell peaks at 1 whatever its size); 0 on boundary and
/// background pixels. Boundaries part touching cells, so the target dips to 0 between
/// them.
#[must_use]
pub fn distance_target(classes: &[u8], height: usize, width: usize) -> Vec<f32> {
    let interior: Vec<bool> = classes.iter().map(|&c| c == INTERIOR).collect();
    let depth = crate::infer::chamfer(&interior, height, width);
    let (cells, count) = crate::infer::components(&interior, height, width);
    let mut peak = vec![0f32; count as usize + 1];
    for (&c, &d) in cells.iter().zip(&depth) {
        peak[c as usize] = peak[c as usize].max(d);
    }
    cells
        .iter()
        .zip(&depth)
        .map(|(&c, &d)| if c == 0 { 0.0 } else { d / peak[c as usize] })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::Volume;

    #[test]
    fn percentiles_and_normalisation() {
        let v: Vec<f32> = (0..=1000).map(|i| i as f32).collect();
        assert_eq!(percentiles(&v, 1.0, 99.8), (10.0, 998.0));
        // A linear ramp: the box mean is the ramp itself except within 2 pixels of
        // either end, so the percentiles 10 and 998 stay where they were.
        let img = Volume::from_2d(1, 1001, v);
        let n = normalize(&img, 1.0, 99.8);
        assert_eq!(n.data[10], 0.0);
        assert!((n.data[998] - 1.0).abs() < 1e-6);
        let flat = normalize(&Volume::from_2d(1, 3, vec![5.0; 3]), 1.0, 99.8);
        assert_eq!(flat.data, vec![0.0; 3]);
    }

    #[test]
    fn the_box_mean_averages_the_clipped_neighbourhood() {
        // 3 x 4 plane, radius 1: a corner averages its 2 x 2 block, an edge pixel its
        // 2 x 3 block, the middle its 3 x 3.
        let p: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let m = box_mean(&p, 3, 4, 1);
        assert_eq!(m[0], (0.0 + 1.0 + 4.0 + 5.0) / 4.0);
        assert_eq!(m[11], (6.0 + 7.0 + 10.0 + 11.0) / 4.0);
        assert_eq!(m[1], (0.0 + 1.0 + 2.0 + 4.0 + 5.0 + 6.0) / 6.0);
        let middle: f32 = [0, 1, 2, 4, 5, 6, 8, 9, 10].iter().map(|&i| i as f32).sum();
        assert_eq!(m[5], middle / 9.0);
        assert_eq!(box_mean(&p, 3, 4, 0), p);
    }

    #[test]
    fn non_finite_pixels_stay_out_of_the_box_mean() {
        let mut p = vec![1.0f32; 25];
        p[12] = f32::NAN;
        p[0] = f32::INFINITY;
        let m = box_mean(&p, 5, 5, 1);
        assert!(m.iter().all(|&v| v == 1.0), "{m:?}");
        // A lone NaN pixel has no finite neighbour at radius 0.
        assert!(box_mean(&p, 5, 5, 0)[12].is_nan());
        let img = Volume::from_2d(5, 5, p);
        let n = normalize(&img, 1.0, 99.8);
        assert!(n.data.iter().filter(|v| v.is_finite()).all(|&v| v == 0.0));
        // Training frames too: an infinite pixel is not taken for the high percentile.
        let mut ramp: Vec<f32> = (0..25).map(|i| i as f32).collect();
        ramp[24] = f32::INFINITY;
        let n = normalize_smoothed(
            &Volume::from_2d(5, 5, ramp),
            1.0,
            99.8,
            TRAINING_SMOOTHING_RADIUS,
        );
        assert_eq!((n.data[0], n.data[23]), (0.0, 1.0));
    }

    #[test]
    fn noise_does_not_move_the_normalised_background() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        // Background 100 with bright cells on a 16-pixel grid; one copy with Gaussian
        // pixel noise of sd 30 (6 % of the cells' contrast).
        let (h, w) = (128, 128);
        let clean: Vec<f32> = (0..h * w)
            .map(|i| {
                if (i / w) % 16 < 6 && (i % w) % 16 < 6 {
                    600.0
                } else {
                    100.0
                }
            })
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let noise = Normal::new(0.0f32, 30.0).expect("a normal distribution");
        let noisy: Vec<f32> = clean.iter().map(|&v| v + noise.sample(&mut rng)).collect();
        let bg_at = |img: Vec<f32>, radius: usize| {
            let n = normalize_smoothed(
                &Volume::from_2d(h, w, img),
                LOW_PERCENTILE,
                HIGH_PERCENTILE,
                radius,
            );
            let vals: Vec<f32> = n
                .data
                .iter()
                .zip(&clean)
                .filter(|(_, c)| **c < 200.0)
                .map(|(v, _)| *v)
                .collect();
            vals.iter().sum::<f32>() / vals.len() as f32
        };
        let bg = |img: Vec<f32>| bg_at(img, SMOOTHING_RADIUS);
        // Training frames keep the raw percentiles: there the noise lifts the
        // background, and the network learns that a background may sit there.
        let raw = bg_at(noisy.clone(), TRAINING_SMOOTHING_RADIUS);
        assert!(
            raw > 0.08,
            "raw-percentile background of the noisy copy at {raw}"
        );
        let (b_clean, b_noisy) = (bg(clean.clone()), bg(noisy));
        assert!(b_clean.abs() < 0.01, "clean background at {b_clean}");
        // Percentiles of the raw pixels put it 2.33 sd above 0 (about 0.11 here); of
        // the 5 x 5 mean, a fifth of that.
        assert!(
            (b_noisy - b_clean).abs() < 0.04,
            "noisy background at {b_noisy}, clean at {b_clean}"
        );
    }

    #[test]
    fn the_distance_target_peaks_at_one_in_every_cell() {
        // A 9-wide cell and a 5-wide cell touching it, on a 7-row plane.
        let mut labels = Volume::from_2d(7, 16, vec![0u32; 7 * 16]);
        for y in 0..7 {
            for x in 0..9 {
                labels.data[y * 16 + x] = 1;
            }
            if (1..6).contains(&y) {
                for x in 9..14 {
                    labels.data[y * 16 + x] = 2;
                }
            }
        }
        let cls = classes(&labels);
        let d = distance_target(&cls, 7, 16);
        let max_in = |xs: std::ops::Range<usize>| {
            (0..7)
                .flat_map(|y| xs.clone().map(move |x| y * 16 + x))
                .map(|i| d[i])
                .fold(0f32, f32::max)
        };
        assert_eq!(max_in(0..9), 1.0);
        assert_eq!(max_in(9..16), 1.0);
        for (i, &c) in cls.iter().enumerate() {
            match c {
                INTERIOR => assert!(d[i] > 0.0 && d[i] <= 1.0, "pixel {i}: {}", d[i]),
                _ => assert_eq!(d[i], 0.0, "pixel {i}"),
            }
        }
        // The boundary between the cells is a valley: 0 on it, rising on both sides.
        assert_eq!(d[3 * 16 + 8], 0.0);
        assert!(d[3 * 16 + 4] > d[3 * 16 + 7]);
    }

    #[test]
    fn boundaries_separate_touching_instances() {
        #[rustfmt::skip]
        let labels = Volume::from_2d(3, 6, vec![
            1, 1, 1, 2, 2, 2,
            1, 1, 1, 2, 2, 2,
            1, 1, 1, 2, 2, 0,
        ]);
        #[rustfmt::skip]
        let expected = vec![
            1, 1, 2, 2, 1, 1,
            1, 1, 2, 2, 1, 2,
            1, 1, 2, 2, 2, 0,
        ];
        assert_eq!(classes(&labels), expected);
    }
}
