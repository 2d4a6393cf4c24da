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

/// Maps each plane's `lo`..`hi` percentiles to 0..1 (values outside are kept, not clipped).
#[must_use]
pub fn normalize(img: &Image, lo: f32, hi: f32) -> Image {
    let mut out = img.clone();
    for z in 0..img.depth {
        let (a, b) = percentiles(img.plane(z), lo, hi);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::Volume;

    #[test]
    fn percentiles_and_normalisation() {
        let v: Vec<f32> = (0..=1000).map(|i| i as f32).collect();
        assert_eq!(percentiles(&v, 1.0, 99.8), (10.0, 998.0));
        let img = Volume::from_2d(1, 1001, v);
        let n = normalize(&img, 1.0, 99.8);
        assert_eq!(n.data[10], 0.0);
        assert!((n.data[998] - 1.0).abs() < 1e-6);
        let flat = normalize(&Volume::from_2d(1, 3, vec![5.0; 3]), 1.0, 99.8);
        assert_eq!(flat.data, vec![0.0; 3]);
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
