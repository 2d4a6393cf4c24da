//! Random training patches with augmentation, seeded and reproducible.
//!
//! Each patch comes from a random annotated plane; with probability
//! [`SamplerConfig::foreground_bias`] it is centred on a random cell pixel, so sparse
//! movies (a small colony in a large field) still train. Augmentations, chosen so that a
//! model trained at one site travels to another site's microscope: a random zoom (cells of
//! other sizes), a random 90-degree rotation, horizontal and vertical flips, Gaussian blur
//! (other optics and focus), intensity scaling and shifting (other exposure), and additive
//! Gaussian noise (other cameras). The same seed gives the same batches.

use rand::RngExt;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::normalize::BACKGROUND;
use super::stream::{PlaneStream, Streamer};

/// Label value meaning "no cell-state label here" (ignored by the state loss).
pub const NO_STATE: u8 = u8::MAX;

/// One annotated plane ready for sampling.
#[derive(Debug, Clone)]
pub struct TrainPlane {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Normalised intensities.
    pub image: Vec<f32>,
    /// Pixel classes (background, interior, boundary).
    pub classes: Vec<u8>,
    /// Cell-state class per pixel, [`NO_STATE`] where unknown.
    pub states: Vec<u8>,
    /// Target of the distance head ([`super::normalize::distance_target`]); empty
    /// unless added by [`TrainPlane::with_distance`] (models without the head).
    pub distance: Vec<f32>,
    /// Indices of cell pixels (a subsample), for foreground-biased sampling.
    foreground: Vec<u32>,
}

impl TrainPlane {
    /// Wraps a plane; `states` defaults to unknown.
    ///
    /// # Panics
    /// If the lengths do not match `height * width` (a programming error).
    #[must_use]
    pub fn new(
        height: usize,
        width: usize,
        image: Vec<f32>,
        classes: Vec<u8>,
        states: Option<Vec<u8>>,
    ) -> Self {
        let n = height * width;
        assert_eq!(image.len(), n, "image length");
        assert_eq!(classes.len(), n, "classes length");
        let states = states.unwrap_or_else(|| vec![NO_STATE; n]);
        assert_eq!(states.len(), n, "states length");
        let fg: Vec<u32> = classes
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != BACKGROUND)
            .map(|(i, _)| i as u32)
            .collect();
        // Keep at most 4096 evenly spread foreground pixels.
        let step = fg.len().div_ceil(4096).max(1);
        let foreground = fg.into_iter().step_by(step).collect();
        Self {
            height,
            width,
            image,
            classes,
            states,
            distance: Vec::new(),
            foreground,
        }
    }

    /// The plane with the distance head's target added.
    #[must_use]
    pub fn with_distance(mut self) -> Self {
        self.distance = super::normalize::distance_target(&self.classes, self.height, self.width);
        self
    }

    /// Class frequencies (background, interior, boundary).
    #[must_use]
    pub fn class_counts(&self) -> [u64; 3] {
        let mut c = [0u64; 3];
        for &k in &self.classes {
            if let Some(slot) = c.get_mut(k as usize) {
                *slot += 1;
            }
        }
        c
    }
}

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Side of a square patch.
    pub patch: usize,
    /// Probability of centring a patch on a cell pixel.
    pub foreground_bias: f64,
    /// Random rotations and flips.
    pub geometric: bool,
    /// Intensity scale range `1 +- this`.
    pub intensity_scale: f32,
    /// Intensity shift range `+- this`.
    pub intensity_shift: f32,
    /// Zoom range: patches are resampled by a factor drawn log-uniformly from
    /// `1/zoom..zoom` (1: off), so objects are seen at other sizes.
    pub zoom: f32,
    /// Largest Gaussian blur sigma in pixels, applied to half the patches (0: off).
    pub blur: f32,
    /// Largest standard deviation of additive Gaussian noise in normalised intensity
    /// units, applied to half the patches (0: off).
    pub noise: f32,
}

impl SamplerConfig {
    /// Geometry only: no zoom, blur, noise or intensity change (tests that need exact
    /// source pixels).
    #[must_use]
    pub fn plain(patch: usize) -> Self {
        Self {
            patch,
            intensity_scale: 0.0,
            intensity_shift: 0.0,
            zoom: 1.0,
            blur: 0.0,
            noise: 0.0,
            ..Self::default()
        }
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            patch: 128,
            foreground_bias: 0.7,
            geometric: true,
            intensity_scale: 0.25,
            intensity_shift: 0.1,
            zoom: 1.25,
            blur: 1.5,
            noise: 0.1,
        }
    }
}

/// A batch of `n` patches, `n x p x p` each (images, classes, states and distance
/// targets).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Patches.
    pub n: usize,
    /// Patch side.
    pub patch: usize,
    /// Intensities.
    pub images: Vec<f32>,
    /// Pixel classes.
    pub classes: Vec<u8>,
    /// Cell states ([`NO_STATE`] where unknown).
    pub states: Vec<u8>,
    /// Distance-head targets (empty if the planes carry none).
    pub distance: Vec<f32>,
}

/// The planes a trainer draws from: all in memory, or streamed from their movies.
#[derive(Debug)]
pub enum PlaneSet {
    /// Every plane in memory.
    Resident(Vec<TrainPlane>),
    /// Frames read a few at a time ([`super::stream`]).
    Streamed(PlaneStream),
}

impl From<Vec<TrainPlane>> for PlaneSet {
    fn from(planes: Vec<TrainPlane>) -> Self {
        Self::Resident(planes)
    }
}

/// Draws augmented patches from annotated planes.
#[derive(Debug)]
pub struct PatchSampler {
    /// The planes held (all of them, or a streamed movie's frames held now).
    planes: Vec<TrainPlane>,
    stream: Option<Streamer>,
    config: SamplerConfig,
    rng: ChaCha8Rng,
}

impl PatchSampler {
    /// A sampler over `planes` (at least one) seeded with `seed`.
    ///
    /// # Panics
    /// If `planes` is empty (a programming error: callers check for annotated frames).
    #[must_use]
    pub fn new(planes: Vec<TrainPlane>, config: SamplerConfig, seed: u64) -> Self {
        assert!(!planes.is_empty(), "a sampler needs at least one plane");
        Self {
            planes,
            stream: None,
            config,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A sampler over a streamed movie: holds its first frames and swaps frames in as
    /// batches are drawn ([`super::stream`]).
    ///
    /// # Errors
    /// The first frames cannot be read.
    pub fn streamed(
        stream: PlaneStream,
        config: SamplerConfig,
        seed: u64,
    ) -> Result<Self, super::DataError> {
        let (planes, streamer) = stream.start(seed)?;
        Ok(Self {
            planes,
            stream: Some(streamer),
            config,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Frames swapped in so far when streaming (0 otherwise).
    #[must_use]
    pub fn swaps(&self) -> u64 {
        self.stream.as_ref().map_or(0, Streamer::swaps)
    }

    /// The planes held now.
    #[must_use]
    pub fn planes(&self) -> &[TrainPlane] {
        &self.planes
    }

    /// Draws `n` patches.
    pub fn batch(&mut self, n: usize) -> Batch {
        if let Some(s) = self.stream.as_mut() {
            s.before_batch(&mut self.planes);
        }
        let p = self.config.patch;
        let mut b = Batch {
            n,
            patch: p,
            images: Vec::with_capacity(n * p * p),
            classes: Vec::with_capacity(n * p * p),
            states: Vec::with_capacity(n * p * p),
            distance: Vec::new(),
        };
        for _ in 0..n {
            self.one(&mut b);
        }
        b
    }

    fn one(&mut self, b: &mut Batch) {
        let p = self.config.patch;
        let plane = &self.planes[self.rng.random_range(0..self.planes.len())];
        let (h, w) = (plane.height, plane.width);
        // Zoom z: output pixel k reads source offset floor((k + 0.5) * z), so the patch
        // covers a source window of side `span`; z > 1 shrinks objects, z < 1 enlarges.
        let z = if self.config.zoom > 1.0 {
            let l = self.config.zoom.ln();
            self.rng.random_range(-l..l).exp()
        } else {
            1.0
        };
        let span = ((p as f32 * z).ceil() as usize).max(1);
        // Top-left corner; planes smaller than the window are padded with background.
        let pick = |rng: &mut ChaCha8Rng, len: usize, centre: Option<usize>| -> isize {
            if len <= span {
                return -(((span - len) / 2) as isize);
            }
            let max = (len - span) as i64;
            (match centre {
                Some(c) => (c as i64 - (span / 2) as i64).clamp(0, max),
                None => rng.random_range(0..=max),
            }) as isize
        };
        let centre = (!plane.foreground.is_empty()
            && self.rng.random_bool(self.config.foreground_bias))
        .then(|| plane.foreground[self.rng.random_range(0..plane.foreground.len())] as usize);
        let y0 = pick(&mut self.rng, h, centre.map(|i| i / w));
        let x0 = pick(&mut self.rng, w, centre.map(|i| i % w));
        let (rot, flip_y, flip_x) = if self.config.geometric {
            (
                self.rng.random_range(0..4u8),
                self.rng.random_bool(0.5),
                self.rng.random_bool(0.5),
            )
        } else {
            (0, false, false)
        };
        let s = self.config.intensity_scale;
        let scale = if s > 0.0 {
            self.rng.random_range(1.0 - s..1.0 + s)
        } else {
            1.0
        };
        let t = self.config.intensity_shift;
        let shift = if t > 0.0 {
            self.rng.random_range(-t..t)
        } else {
            0.0
        };
        let blur = if self.config.blur > 0.0 && self.rng.random_bool(0.5) {
            self.rng.random_range(0.0..self.config.blur)
        } else {
            0.0
        };
        let noise = if self.config.noise > 0.0 && self.rng.random_bool(0.5) {
            self.rng.random_range(0.0..self.config.noise)
        } else {
            0.0
        };
        let src = |k: usize| -> isize {
            if z == 1.0 {
                k as isize
            } else {
                (((k as f32 + 0.5) * z) as usize).min(span - 1) as isize
            }
        };
        let start = b.images.len();
        let with_distance = !plane.distance.is_empty();
        for i in 0..p {
            for j in 0..p {
                // Output pixel (i, j) reads source pixel (u, v) of the transformed patch.
                let (mut u, mut v) = match rot {
                    0 => (i, j),
                    1 => (j, p - 1 - i),
                    2 => (p - 1 - i, p - 1 - j),
                    _ => (p - 1 - j, i),
                };
                if flip_y {
                    u = p - 1 - u;
                }
                if flip_x {
                    v = p - 1 - v;
                }
                let (y, x) = (y0 + src(u), x0 + src(v));
                if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                    b.images.push(0.0);
                    b.classes.push(BACKGROUND);
                    b.states.push(NO_STATE);
                    if with_distance {
                        b.distance.push(0.0);
                    }
                } else {
                    let k = y as usize * w + x as usize;
                    b.images.push(plane.image[k]);
                    b.classes.push(plane.classes[k]);
                    b.states.push(plane.states[k]);
                    if with_distance {
                        b.distance.push(plane.distance[k]);
                    }
                }
            }
        }
        let img = &mut b.images[start..];
        if blur > 0.05 {
            crate::synth::blur(img, p, blur);
        }
        for v in img.iter_mut() {
            *v = *v * scale + shift;
        }
        if noise > 0.0 {
            let normal = rand_distr::Normal::new(0.0f32, noise)
                .unwrap_or_else(|_| unreachable!("a positive, finite sigma"));
            for v in img.iter_mut() {
                *v += rand_distr::Distribution::sample(&normal, &mut self.rng);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(h: usize, w: usize) -> TrainPlane {
        let image: Vec<f32> = (0..h * w).map(|i| i as f32).collect();
        let classes: Vec<u8> = (0..h * w).map(|i| (i % 3) as u8).collect();
        TrainPlane::new(h, w, image, classes, None)
    }

    #[test]
    fn batches_are_reproducible_from_the_seed() {
        let cfg = SamplerConfig {
            patch: 8,
            ..SamplerConfig::default()
        };
        let mut a = PatchSampler::new(vec![plane(20, 30)], cfg, 7);
        let mut b = PatchSampler::new(vec![plane(20, 30)], cfg, 7);
        let mut c = PatchSampler::new(vec![plane(20, 30)], cfg, 8);
        let (x, y, z) = (a.batch(4), b.batch(4), c.batch(4));
        assert_eq!(x, y);
        assert_ne!(x, z);
        assert_eq!(x.images.len(), 4 * 64);
    }

    #[test]
    fn geometry_keeps_image_and_classes_aligned() {
        let cfg = SamplerConfig::plain(6);
        let pl = plane(10, 10).with_distance();
        let mut s = PatchSampler::new(vec![pl.clone()], cfg, 1);
        for _ in 0..50 {
            let b = s.batch(1);
            assert_eq!(b.distance.len(), b.images.len());
            for ((v, c), d) in b.images.iter().zip(&b.classes).zip(&b.distance) {
                // Pixel value i has class i % 3 in the source plane, and the distance
                // target of source pixel i.
                assert_eq!((*v as usize) % 3, *c as usize);
                assert_eq!(*d, pl.distance[*v as usize]);
            }
            // A patch is a permutation of a 6x6 window: its values are distinct.
            let mut vals: Vec<i64> = b.images.iter().map(|v| *v as i64).collect();
            vals.sort_unstable();
            vals.dedup();
            assert_eq!(vals.len(), 36);
        }
        // Planes without distance targets (models without the head) give none.
        let mut s = PatchSampler::new(vec![plane(10, 10)], cfg, 1);
        assert!(s.batch(2).distance.is_empty());
    }

    #[test]
    fn small_planes_are_padded_with_background() {
        let cfg = SamplerConfig {
            geometric: false,
            foreground_bias: 0.0,
            ..SamplerConfig::plain(8)
        };
        let mut s = PatchSampler::new(vec![plane(4, 4)], cfg, 3);
        let b = s.batch(1);
        assert!(b.classes.iter().filter(|&&c| c == BACKGROUND).count() >= 64 - 16);
        assert_eq!(b.images.iter().filter(|&&v| v != 0.0).count(), 15);
    }

    #[test]
    fn foreground_bias_finds_sparse_cells() {
        let (h, w) = (200, 200);
        let mut classes = vec![0u8; h * w];
        classes[150 * w + 40] = 1;
        let pl = TrainPlane::new(h, w, vec![0.0; h * w], classes, None);
        let cfg = SamplerConfig {
            foreground_bias: 1.0,
            ..SamplerConfig::plain(16)
        };
        let mut s = PatchSampler::new(vec![pl], cfg, 5);
        let b = s.batch(10);
        assert_eq!(b.classes.iter().filter(|&&c| c == 1).count(), 10);
    }

    #[test]
    fn zoom_resamples_image_and_classes_together() {
        let cfg = SamplerConfig {
            zoom: 2.0,
            ..SamplerConfig::plain(8)
        };
        let pl = plane(40, 40);
        let mut s = PatchSampler::new(vec![pl], cfg, 2);
        let mut spans = Vec::new();
        for _ in 0..50 {
            let b = s.batch(1);
            for (v, c) in b.images.iter().zip(&b.classes) {
                assert_eq!((*v as usize) % 3, *c as usize);
            }
            // The window's extent in source rows tells the zoom that was drawn.
            let rows: Vec<usize> = b.images.iter().map(|v| *v as usize / 40).collect();
            spans.push(rows.iter().max().unwrap() - rows.iter().min().unwrap());
        }
        assert!(
            spans.iter().any(|&s| s < 6),
            "some patches enlarge: {spans:?}"
        );
        assert!(
            spans.iter().any(|&s| s > 8),
            "some patches shrink: {spans:?}"
        );
    }

    #[test]
    fn blur_and_noise_change_intensities_only() {
        let (h, w) = (32, 32);
        let image: Vec<f32> = (0..h * w)
            .map(|i| if (i / w) % 8 < 4 { 1.0 } else { 0.0 })
            .collect();
        let classes: Vec<u8> = image.iter().map(|&v| u8::from(v > 0.5)).collect();
        let pl = TrainPlane::new(h, w, image, classes, None);
        let cfg = SamplerConfig {
            blur: 2.0,
            noise: 0.2,
            ..SamplerConfig::plain(16)
        };
        let mut s = PatchSampler::new(vec![pl], cfg, 9);
        let b = s.batch(40);
        let px = 16 * 16;
        let mut changed = 0;
        for k in 0..40 {
            let img = &b.images[k * px..(k + 1) * px];
            let cls = &b.classes[k * px..(k + 1) * px];
            // Classes stay binary stripes, whatever happened to the intensities.
            assert!(cls.iter().all(|&c| c <= 1));
            if img.iter().any(|&v| v != 0.0 && v != 1.0) {
                changed += 1;
            }
            // Blur and zero-mean noise keep the patch's mean near the stripes' mean.
            let mean_img = img.iter().sum::<f32>() / px as f32;
            let mean_cls = cls.iter().map(|&c| f32::from(c)).sum::<f32>() / px as f32;
            assert!(
                (mean_img - mean_cls).abs() < 0.1,
                "{mean_img} vs {mean_cls}"
            );
        }
        assert!(
            changed > 10 && changed < 40,
            "about 3 in 4 patches change: {changed}"
        );
    }
}
