//! Synthetic fluorescence movies with exact ground truth: the embedded default for the
//! demo and the tests.
//!
//! Nuclei are ellipses that move (a random walk with drift; they may touch but not
//! interpenetrate), grow,
//! divide into two daughters (after a short mitotic phase in which they round up and
//! brighten), and occasionally die (shrinking and dimming for a few frames). Pixels shared
//! by two ellipses go to the nearer one, so touching nuclei have clean borders. Frames are
//! rendered with texture, blur, photobleaching, Poisson shot noise and Gaussian read noise.
//!
//! [`SynthMovie::write_ctc`] writes the movie and its ground truth in CTC layout:
//! `NN/tTTT.tif`, `NN_GT/SEG/man_segTTT.tif`, `NN_GT/TRA/man_trackTTT.tif`,
//! `NN_GT/TRA/man_track.txt`, and `NN_GT/cell_states.csv` (`frame,label,state`).
//!
//! [`Profile`]s vary density, signal-to-noise, size and motion, so that sites can be made
//! non-IID. The `textured` profile also draws what other labs' nuclei show and plain
//! ellipses do not: rough outlines, coarse chromatin, dark nucleoli, a sixfold range of
//! brightness and an unevenly lit field (per-cell details come from a hash of the seed and
//! the cell's label, so the other profiles render exactly as before).

use std::fmt::Write as _;
use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Poisson};

use crate::data::DataError;
use crate::data::ctc::{TrackRecord, write_tracks};
use crate::data::tiff_io::{write_labels, write_u16};
use crate::data::volume::{Labels, Volume};

/// A cell's state, as emitted for the classification head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CellState {
    /// Growing between divisions.
    Interphase,
    /// Rounding up before division (the frames just before the daughters appear).
    Dividing,
    /// Shrinking and dimming before disappearing.
    Dying,
}

impl CellState {
    /// Every state, by class index.
    pub const ALL: [CellState; 3] = [Self::Interphase, Self::Dividing, Self::Dying];

    /// Class index (0, 1, 2).
    #[must_use]
    pub fn index(self) -> u8 {
        self as u8
    }

    /// Name in CSV files.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Interphase => "interphase",
            Self::Dividing => "dividing",
            Self::Dying => "dying",
        }
    }

    /// Parses a CSV name.
    #[must_use]
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// Settings of a synthetic site.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Profile name.
    pub name: &'static str,
    /// Frame height and width in pixels.
    pub size: usize,
    /// Nuclei in the first frame (for a 256 x 256 frame; scaled with the area).
    pub cells: usize,
    /// Radius at which a nucleus divides, in pixels.
    pub division_radius: f32,
    /// Largest elongation (major / minor axis).
    pub aspect: f32,
    /// Random-walk step (standard deviation, pixels per frame).
    pub step: f32,
    /// Drift (pixels per frame, x and y).
    pub drift: (f32, f32),
    /// Relative radius growth per frame.
    pub growth: f32,
    /// Nucleus brightness range (photons).
    pub brightness: (f32, f32),
    /// Background level (photons).
    pub background: f32,
    /// Gaussian blur sigma (pixels).
    pub blur: f32,
    /// Photons per grey level: lower means more shot noise.
    pub gain: f32,
    /// Read noise standard deviation (grey levels).
    pub read_noise: f32,
    /// Photobleaching rate per frame.
    pub bleach: f32,
    /// Probability per frame that a nucleus starts dying.
    pub death: f32,
    /// Roughness of the outline: amplitude of low-order radial harmonics (0: ellipses).
    pub irregular: f32,
    /// Amplitude of coarse chromatin texture, relative to the brightness (0: only the
    /// mild built-in ripple).
    pub chromatin: f32,
    /// Depth of the dark nucleoli (1 to 3 per nucleus; 0: none).
    pub nucleoli: f32,
    /// Uneven illumination: relative amplitude of a smooth gradient and vignette over the
    /// frame (0: flat).
    pub illumination: f32,
}

impl Profile {
    /// Names of the built-in profiles.
    pub const NAMES: [&'static str; 6] =
        ["balanced", "dense", "sparse", "noisy", "fast", "textured"];

    /// A built-in profile.
    #[must_use]
    pub fn named(name: &str) -> Option<Self> {
        let balanced = Self {
            name: "balanced",
            size: 256,
            cells: 24,
            division_radius: 11.0,
            aspect: 1.35,
            step: 1.2,
            drift: (0.3, 0.1),
            growth: 0.02,
            brightness: (600.0, 1000.0),
            background: 120.0,
            blur: 1.2,
            gain: 0.5,
            read_noise: 20.0,
            bleach: 0.01,
            death: 0.004,
            irregular: 0.0,
            chromatin: 0.0,
            nucleoli: 0.0,
            illumination: 0.0,
        };
        Some(match name {
            "balanced" => balanced,
            "dense" => Self {
                name: "dense",
                cells: 55,
                division_radius: 8.5,
                aspect: 1.2,
                step: 0.8,
                drift: (0.0, 0.0),
                brightness: (800.0, 1300.0),
                read_noise: 15.0,
                ..balanced
            },
            "sparse" => Self {
                name: "sparse",
                cells: 10,
                division_radius: 14.0,
                aspect: 1.5,
                step: 1.5,
                drift: (-0.2, 0.4),
                ..balanced
            },
            "noisy" => Self {
                name: "noisy",
                brightness: (350.0, 550.0),
                background: 150.0,
                blur: 1.6,
                gain: 0.2,
                read_noise: 45.0,
                ..balanced
            },
            "fast" => Self {
                name: "fast",
                step: 3.0,
                drift: (1.5, 0.6),
                growth: 0.03,
                ..balanced
            },
            // Nuclei as another lab's microscope shows them: irregular outlines, coarse
            // chromatin and dark nucleoli, dim and bright nuclei side by side (a sixfold
            // range), an unevenly lit field.
            "textured" => Self {
                name: "textured",
                cells: 22,
                division_radius: 12.0,
                aspect: 1.5,
                brightness: (160.0, 1000.0),
                blur: 1.4,
                irregular: 0.12,
                chromatin: 0.8,
                nucleoli: 0.6,
                illumination: 0.35,
                ..balanced
            },
            _ => return None,
        })
    }
}

/// A generated movie and its exact ground truth.
#[derive(Debug, Clone)]
pub struct SynthMovie {
    /// Rendered frames (16-bit).
    pub frames: Vec<Volume<u16>>,
    /// Instance masks (labels are track labels).
    pub labels: Vec<Labels>,
    /// Lineage.
    pub tracks: Vec<TrackRecord>,
    /// `(frame, label, state)` for every nucleus in every frame.
    pub states: StateRows,
}

#[derive(Debug, Clone)]
struct Cell {
    label: u32,
    x: f32,
    y: f32,
    r: f32,
    aspect: f32,
    angle: f32,
    brightness: f32,
    phase: [f32; 4],
    divide_at: f32,
    mitosis: Option<u32>,
    dying: Option<u32>,
}

impl Cell {
    fn state(&self) -> CellState {
        if self.dying.is_some() {
            CellState::Dying
        } else if self.mitosis.is_some() {
            CellState::Dividing
        } else {
            CellState::Interphase
        }
    }

    /// Semi-axes and orientation as rendered (round and bright during mitosis).
    fn shape(&self) -> (f32, f32, f32) {
        let aspect = if self.mitosis.is_some() {
            1.0
        } else {
            self.aspect
        };
        let a = self.r * aspect.sqrt();
        let b = self.r / aspect.sqrt();
        (a, b, self.angle)
    }
}

struct Sim<'a> {
    p: &'a Profile,
    rng: ChaCha8Rng,
    cells: Vec<Cell>,
    next_label: u32,
    tracks: Vec<TrackRecord>,
    size: f32,
    /// Seed of the per-cell shapes and textures and of the illumination field (hashed,
    /// never drawn from `rng`, so profiles without them render as before).
    seed: u64,
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A number in `[0, 1)` fixed by `(seed, a, b)`.
fn unit(seed: u64, a: u64, b: u64) -> f32 {
    (mix(seed ^ mix(a.wrapping_mul(0x1_0000_0001) ^ mix(b))) >> 40) as f32 / (1u64 << 24) as f32
}

/// Smooth value noise in `[-1, 1]` on a lattice of spacing 1 (bilinear, smoothstep).
fn value_noise(seed: u64, label: u64, x: f32, y: f32) -> f32 {
    let (fx, fy) = (x.floor(), y.floor());
    let (tx, ty) = (x - fx, y - fy);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let at = |i: f32, j: f32| {
        let key = ((i as i64 as u64) << 32) ^ (j as i64 as u64 & 0xFFFF_FFFF);
        2.0 * unit(seed, label, key) - 1.0
    };
    let top = at(fx, fy) * (1.0 - sx) + at(fx + 1.0, fy) * sx;
    let bottom = at(fx, fy + 1.0) * (1.0 - sx) + at(fx + 1.0, fy + 1.0) * sx;
    top * (1.0 - sy) + bottom * sy
}

/// How far a cell's outline reaches in direction `phi` (cell frame), relative to its
/// ellipse: 1 plus harmonics 2..=5 of random phase, total amplitude `irregular`.
fn outline(seed: u64, label: u32, irregular: f32, phi: f32) -> f32 {
    if irregular <= 0.0 {
        return 1.0;
    }
    let l = u64::from(label);
    let mut s = 0.0;
    for k in 2..=5u64 {
        let w = (0.5 + unit(seed, l, 100 + k)) / k as f32;
        let psi = unit(seed, l, 200 + k) * std::f32::consts::TAU;
        s += w * (k as f32 * phi + psi).cos();
    }
    1.0 + irregular * s
}

impl Sim<'_> {
    fn new_cell(&mut self, x: f32, y: f32, r: f32) -> Cell {
        let label = self.next_label;
        self.next_label += 1;
        let p = self.p;
        Cell {
            label,
            x,
            y,
            r,
            aspect: self.rng.random_range(1.0..=p.aspect.max(1.0)),
            angle: self.rng.random_range(0.0..std::f32::consts::PI),
            brightness: self.rng.random_range(p.brightness.0..=p.brightness.1),
            phase: [
                self.rng.random_range(0.0..6.3),
                self.rng.random_range(0.0..6.3),
                self.rng.random_range(0.0..6.3),
                self.rng.random_range(0.0..6.3),
            ],
            divide_at: p.division_radius * self.rng.random_range(0.9..1.1),
            mitosis: None,
            dying: None,
        }
    }

    fn crowded(&self, x: f32, y: f32, r: f32, skip: Option<u32>, slack: f32) -> bool {
        self.cells
            .iter()
            .filter(|c| Some(c.label) != skip)
            .any(|c| (c.x - x).hypot(c.y - y) < slack * (c.r + r))
    }

    fn seed_cells(&mut self) {
        let area = (self.size * self.size) / (256.0 * 256.0);
        let n = ((self.p.cells as f32) * area).round().max(1.0) as usize;
        let mut tries = 0;
        while self.cells.len() < n && tries < 200 * n {
            tries += 1;
            let r = self.p.division_radius * self.rng.random_range(0.72..1.0);
            // Anywhere in the frame: some nuclei are cut by the border, as in real movies.
            let x = self.rng.random_range(0.0..self.size);
            let y = self.rng.random_range(0.0..self.size);
            if !self.crowded(x, y, r, None, 1.05) {
                let c = self.new_cell(x, y, r);
                self.tracks.push(TrackRecord {
                    label: c.label,
                    begin: 0,
                    end: 0,
                    parent: 0,
                });
                self.cells.push(c);
            }
        }
    }

    /// Advances from frame `t - 1` to frame `t`.
    fn step(&mut self, t: u32) {
        let step = Normal::new(0.0f32, self.p.step.max(1e-3)).unwrap_or_else(|_| unreachable!());
        let mut next: Vec<Cell> = Vec::with_capacity(self.cells.len() + 4);
        let cells = std::mem::take(&mut self.cells);
        // Movement uses the positions of cells already moved this frame and those not yet.
        self.cells = cells.clone();
        for mut c in cells {
            // Death.
            if let Some(left) = c.dying {
                if left == 0 {
                    self.cells.retain(|o| o.label != c.label);
                    continue;
                }
                c.dying = Some(left - 1);
                c.r *= 0.85;
                c.brightness *= 0.75;
            } else if c.mitosis.is_none() && self.rng.random_bool(f64::from(self.p.death)) {
                c.dying = Some(2);
            }
            // Division.
            if let Some(left) = c.mitosis {
                if left == 0 {
                    let axis = self.rng.random_range(0.0..std::f32::consts::PI);
                    let r = c.r / std::f32::consts::SQRT_2;
                    // Side by side without overlap: centres 1.5 r apart, radii r / sqrt(2).
                    let (dx, dy) = (axis.cos() * c.r * 0.75, axis.sin() * c.r * 0.75);
                    self.cells.retain(|o| o.label != c.label);
                    for s in [-1.0f32, 1.0] {
                        let d = self.new_cell(c.x + s * dx, c.y + s * dy, r);
                        self.tracks.push(TrackRecord {
                            label: d.label,
                            begin: t,
                            end: t,
                            parent: c.label,
                        });
                        self.cells.push(d.clone());
                        next.push(d);
                    }
                    continue;
                }
                c.mitosis = Some(left - 1);
            } else if c.dying.is_none() {
                c.r *= 1.0 + self.p.growth;
                if c.r >= c.divide_at {
                    c.mitosis = Some(1);
                }
            }
            // Movement: a few tries to find a step that does not crowd a neighbour.
            for _ in 0..4 {
                let nx = c.x + self.p.drift.0 + step.sample(&mut self.rng);
                let ny = c.y + self.p.drift.1 + step.sample(&mut self.rng);
                // Nuclei may touch but not interpenetrate.
                if !self.crowded(nx, ny, c.r, Some(c.label), 0.95) {
                    c.x = nx;
                    c.y = ny;
                    break;
                }
            }
            c.angle += self.rng.random_range(-0.1..0.1);
            // Leaving the field of view ends the track.
            let m = c.r;
            if c.x < -m || c.y < -m || c.x > self.size + m || c.y > self.size + m {
                self.cells.retain(|o| o.label != c.label);
                continue;
            }
            if let Some(o) = self.cells.iter_mut().find(|o| o.label == c.label) {
                *o = c.clone();
            }
            next.push(c);
        }
        next.sort_by_key(|c| c.label);
        self.cells = next;
    }

    /// Labels and clean intensities (photons) of the current frame.
    fn render(&self) -> (Vec<u32>, Vec<f32>) {
        let n = self.size as usize;
        let mut labels = vec![0u32; n * n];
        let mut best = vec![f32::INFINITY; n * n];
        let mut owner = vec![usize::MAX; n * n];
        for (ci, c) in self.cells.iter().enumerate() {
            let (a, b, th) = c.shape();
            let (s, co) = th.sin_cos();
            let reach = a.max(b) * (1.0 + 2.0 * self.p.irregular) + 1.0;
            let x0 = ((c.x - reach).floor().max(0.0)) as usize;
            let x1 = ((c.x + reach).ceil().min(self.size - 1.0)).max(0.0) as usize;
            let y0 = ((c.y - reach).floor().max(0.0)) as usize;
            let y1 = ((c.y + reach).ceil().min(self.size - 1.0)).max(0.0) as usize;
            for y in y0..=y1 {
                for x in x0..=x1 {
                    let (dx, dy) = (x as f32 + 0.5 - c.x, y as f32 + 0.5 - c.y);
                    let u = (dx * co + dy * s) / a;
                    let v = (-dx * s + dy * co) / b;
                    let mut d2 = u * u + v * v;
                    if self.p.irregular > 0.0 && c.mitosis.is_none() {
                        let reach = outline(self.seed, c.label, self.p.irregular, v.atan2(u));
                        d2 /= reach * reach;
                    }
                    let k = y * n + x;
                    if d2 <= 1.0 && d2 < best[k] {
                        best[k] = d2;
                        owner[k] = ci;
                        labels[k] = c.label;
                    }
                }
            }
        }
        let mut intensity = vec![self.p.background; n * n];
        for k in 0..n * n {
            let Some(c) = self.cells.get(owner[k]) else {
                continue;
            };
            let (x, y) = ((k % n) as f32, (k / n) as f32);
            let texture = 0.08 * (0.31 * x + c.phase[0]).sin() * (0.27 * y + c.phase[1]).cos()
                + 0.06 * (0.53 * (x + y) + c.phase[2]).sin()
                + 0.05 * (0.41 * (x - y) + c.phase[3]).cos();
            let bright = if c.mitosis.is_some() { 1.6 } else { 1.0 };
            let detail = if c.mitosis.is_none() {
                self.chromatin_and_nucleoli(c, x, y)
            } else {
                1.0
            };
            intensity[k] +=
                c.brightness * bright * (1.0 - 0.35 * best[k]) * (1.0 + texture) * detail;
        }
        if self.p.illumination > 0.0 {
            // A linear gradient in a direction fixed by the seed, and a vignette.
            let theta = unit(self.seed, 0, 1) * std::f32::consts::TAU;
            let (gs, gc) = theta.sin_cos();
            let a = self.p.illumination;
            for (k, v) in intensity.iter_mut().enumerate() {
                let x = (k % n) as f32 / n as f32 - 0.5;
                let y = (k / n) as f32 / n as f32 - 0.5;
                let field = 1.0 + a * (0.7 * (x * gc + y * gs) - 1.2 * (x * x + y * y) + 0.2);
                *v *= field.max(0.05);
            }
        }
        (labels, intensity)
    }

    /// Multiplicative detail of an interphase nucleus at pixel `(x, y)`: coarse chromatin
    /// (two octaves of value noise in the cell's own frame, so it moves and turns with
    /// the cell) and dark nucleoli. 1 where the profile has neither.
    fn chromatin_and_nucleoli(&self, c: &Cell, x: f32, y: f32) -> f32 {
        let p = self.p;
        if p.chromatin <= 0.0 && p.nucleoli <= 0.0 {
            return 1.0;
        }
        let (s, co) = c.angle.sin_cos();
        let (dx, dy) = (x + 0.5 - c.x, y + 0.5 - c.y);
        let (u, v) = (dx * co + dy * s, -dx * s + dy * co);
        let l = u64::from(c.label);
        let mut f = 1.0;
        if p.chromatin > 0.0 {
            let grain = (c.r / 4.0).max(1.5);
            let n = 0.7 * value_noise(self.seed, l, u / grain, v / grain)
                + 0.3 * value_noise(self.seed, l ^ 0x5555, 2.0 * u / grain, 2.0 * v / grain);
            f *= 1.0 + p.chromatin * n;
        }
        if p.nucleoli > 0.0 {
            let count = 1 + (unit(self.seed, l, 300) * 3.0) as u64;
            for i in 0..count {
                let rho = 0.55 * c.r * unit(self.seed, l, 310 + i).sqrt();
                let phi = unit(self.seed, l, 320 + i) * std::f32::consts::TAU;
                let sigma = c.r * (0.12 + 0.1 * unit(self.seed, l, 330 + i));
                let (nu, nv) = (rho * phi.cos(), rho * phi.sin());
                let d2 = (u - nu).powi(2) + (v - nv).powi(2);
                f *= 1.0 - p.nucleoli * (-d2 / (2.0 * sigma * sigma)).exp();
            }
        }
        f.max(0.05)
    }
}

/// Separable Gaussian blur of an `n x n` image in place (edges clamped; also the
/// training patches' blur augmentation).
pub(crate) fn blur(img: &mut [f32], n: usize, sigma: f32) {
    if sigma <= 0.0 {
        return;
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let mut tmp = vec![0f32; n * n];
    let clamp = |i: isize| i.clamp(0, n as isize - 1) as usize;
    for y in 0..n {
        for x in 0..n {
            tmp[y * n + x] = kernel
                .iter()
                .enumerate()
                .map(|(j, k)| k * img[y * n + clamp(x as isize + j as isize - radius)])
                .sum();
        }
    }
    for y in 0..n {
        for x in 0..n {
            img[y * n + x] = kernel
                .iter()
                .enumerate()
                .map(|(j, k)| k * tmp[clamp(y as isize + j as isize - radius) * n + x])
                .sum();
        }
    }
}

/// Generates `frames` frames of profile `p` from `seed`.
#[must_use]
pub fn generate(p: &Profile, frames: usize, seed: u64) -> SynthMovie {
    let mut sim = Sim {
        p,
        rng: ChaCha8Rng::seed_from_u64(seed),
        cells: Vec::new(),
        next_label: 1,
        tracks: Vec::new(),
        size: p.size as f32,
        seed: mix(seed ^ 0x7465_7874_7572_6564),
    };
    sim.seed_cells();
    let n = p.size;
    let read = Normal::new(0.0f32, p.read_noise.max(1e-3)).unwrap_or_else(|_| unreachable!());
    let mut movie = SynthMovie {
        frames: Vec::with_capacity(frames),
        labels: Vec::with_capacity(frames),
        tracks: Vec::new(),
        states: Vec::new(),
    };
    for t in 0..frames as u32 {
        if t > 0 {
            sim.step(t);
        }
        let (labels, mut intensity) = sim.render();
        // Tracks end at the last frame a cell still has pixels in.
        let present: std::collections::BTreeSet<u32> =
            labels.iter().copied().filter(|&l| l != 0).collect();
        for tr in &mut sim.tracks {
            if present.contains(&tr.label) {
                tr.end = t;
            }
        }
        // A nucleus with no visible pixel (out of the field, or hidden by nearer ones)
        // ends its track here, so tracks never have gaps.
        sim.cells.retain(|c| present.contains(&c.label));
        for c in &sim.cells {
            movie.states.push((t, c.label, c.state()));
        }
        blur(&mut intensity, n, p.blur);
        let bleach = (-p.bleach * t as f32).exp();
        let pixels: Vec<u16> = intensity
            .iter()
            .map(|&photons| {
                let lambda = f64::from((photons * bleach * p.gain).max(1e-3));
                let shot = Poisson::new(lambda).map_or(lambda, |d| d.sample(&mut sim.rng)) as f32;
                let grey = 100.0 + shot / p.gain + read.sample(&mut sim.rng);
                grey.round().clamp(0.0, 65535.0) as u16
            })
            .collect();
        movie.frames.push(Volume::from_2d(n, n, pixels));
        movie.labels.push(Volume::from_2d(n, n, labels));
    }
    // Keep only tracks that were ever visible, with begin adjusted to the first frame seen.
    let mut first_seen = std::collections::BTreeMap::new();
    for (t, l, _) in &movie.states {
        first_seen.entry(*l).or_insert(*t);
    }
    movie.tracks = sim
        .tracks
        .into_iter()
        .filter_map(|mut tr| {
            let b = *first_seen.get(&tr.label)?;
            tr.begin = b;
            tr.end = tr.end.max(b);
            Some(tr)
        })
        .collect();
    // A parent that never showed a pixel cannot be a parent.
    let known: std::collections::BTreeSet<u32> = movie.tracks.iter().map(|t| t.label).collect();
    for tr in &mut movie.tracks {
        if !known.contains(&tr.parent) {
            tr.parent = 0;
        }
    }
    movie
}

impl SynthMovie {
    /// Writes the movie in CTC layout under `out` as sequence `seq` (e.g. `"01"`).
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn write_ctc(&self, out: &Path, seq: &str) -> Result<(), DataError> {
        let mk = |d: &Path| {
            std::fs::create_dir_all(d).map_err(|source| DataError::Io {
                path: d.to_owned(),
                source,
            })
        };
        let frames_dir = out.join(seq);
        let gt = out.join(format!("{seq}_GT"));
        mk(&frames_dir)?;
        mk(&gt.join("SEG"))?;
        mk(&gt.join("TRA"))?;
        for (t, (f, l)) in self.frames.iter().zip(&self.labels).enumerate() {
            write_u16(&frames_dir.join(format!("t{t:03}.tif")), f)?;
            write_labels(&gt.join(format!("SEG/man_seg{t:03}.tif")), l)?;
            write_labels(&gt.join(format!("TRA/man_track{t:03}.tif")), l)?;
        }
        write_tracks(&gt.join("TRA/man_track.txt"), &self.tracks)?;
        let mut csv = String::from("frame,label,state\n");
        for (t, l, s) in &self.states {
            let _ = writeln!(csv, "{t},{l},{}", s.name());
        }
        let p = gt.join("cell_states.csv");
        std::fs::write(&p, csv).map_err(|source| DataError::Io { path: p, source })
    }
}

/// `(frame, label, state)` rows of a `cell_states.csv` file.
pub type StateRows = Vec<(u32, u32, CellState)>;

/// Reads `NN_GT/cell_states.csv` beside a sequence folder, if present.
///
/// # Errors
/// I/O errors or malformed lines, naming the file.
pub fn read_states(seq_dir: &Path) -> Result<Option<StateRows>, DataError> {
    let name = seq_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let path = seq_dir
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(format!("{name}_GT"))
        .join("cell_states.csv");
    if !path.is_file() {
        return Ok(None);
    }
    read_state_file(&path).map(Some)
}

/// Reads a `frame,label,state` CSV file (the first line is a header).
///
/// # Errors
/// I/O errors or malformed lines, naming the file and line.
pub fn read_state_file(path: &Path) -> Result<StateRows, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || DataError::BadTrackFile {
            path: path.to_owned(),
            line: i + 1,
            problem: "expected `frame,label,state`".into(),
        };
        let mut f = line.split(',');
        let (Some(t), Some(l), Some(s)) = (f.next(), f.next(), f.next()) else {
            return Err(bad());
        };
        out.push((
            t.trim().parse().map_err(|_| bad())?,
            l.trim().parse().map_err(|_| bad())?,
            CellState::from_name(s.trim()).ok_or_else(bad)?,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ctc::Movie;

    #[test]
    fn generation_is_reproducible_and_profiles_differ() {
        let p = Profile::named("balanced").unwrap();
        let a = generate(&p, 5, 1);
        let b = generate(&p, 5, 1);
        assert_eq!(a.frames, b.frames);
        assert_eq!(a.labels, b.labels);
        assert_ne!(generate(&p, 5, 2).frames, a.frames);
        let dense = generate(&Profile::named("dense").unwrap(), 1, 1);
        let sparse = generate(&Profile::named("sparse").unwrap(), 1, 1);
        assert!(dense.labels[0].ids().len() > 2 * sparse.labels[0].ids().len());
        assert!(Profile::named("nope").is_none());
    }

    /// Mean coefficient of variation of the pixels inside each nucleus, and the ratio of
    /// the brightest nucleus's mean to the dimmest's, on the first frame.
    fn texture_and_range(m: &SynthMovie) -> (f64, f64) {
        let (f, l) = (&m.frames[0], &m.labels[0]);
        let mut per: std::collections::BTreeMap<u32, Vec<f64>> = Default::default();
        for (&v, &id) in f.data.iter().zip(&l.data) {
            if id != 0 {
                per.entry(id).or_default().push(f64::from(v) - 100.0);
            }
        }
        let (mut cv, mut means) = (0.0, Vec::new());
        let big: Vec<&Vec<f64>> = per.values().filter(|v| v.len() >= 50).collect();
        for v in &big {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
            cv += var.sqrt() / mean;
            means.push(mean);
        }
        let hi = means.iter().copied().fold(f64::MIN, f64::max);
        let lo = means.iter().copied().fold(f64::MAX, f64::min);
        (cv / big.len() as f64, hi / lo)
    }

    #[test]
    fn textured_nuclei_vary_inside_and_in_brightness() {
        let p = Profile::named("textured").unwrap();
        let textured = generate(&p, 1, 4);
        // The same cells and light without chromatin and nucleoli: the details never
        // draw from the movie's random stream, so the masks are the same.
        let smooth = generate(
            &Profile {
                chromatin: 0.0,
                nucleoli: 0.0,
                ..p.clone()
            },
            1,
            4,
        );
        assert_eq!(smooth.labels, textured.labels);
        let (cv_smooth, _) = texture_and_range(&smooth);
        let (cv_tex, range_tex) = texture_and_range(&textured);
        assert!(
            cv_tex > cv_smooth + 0.01,
            "texture: {cv_tex:.3} against {cv_smooth:.3}"
        );
        let (_, range_plain) =
            texture_and_range(&generate(&Profile::named("balanced").unwrap(), 1, 4));
        assert!(
            range_tex > 2.0 * range_plain && range_tex > 3.0,
            "brightness range: {range_tex:.2} against {range_plain:.2}"
        );
        // Same seed, same movie.
        assert_eq!(
            generate(&Profile::named("textured").unwrap(), 2, 4).frames,
            generate(&Profile::named("textured").unwrap(), 2, 4).frames
        );
    }

    #[test]
    fn lineage_is_consistent_with_the_masks() {
        let p = Profile {
            growth: 0.06,
            death: 0.02,
            ..Profile::named("balanced").unwrap()
        };
        let m = generate(&p, 30, 3);
        let divisions = m.tracks.iter().filter(|t| t.parent != 0).count();
        assert!(
            divisions >= 4,
            "expected divisions in 30 frames, got {divisions}"
        );
        for tr in &m.tracks {
            for t in 0..m.labels.len() as u32 {
                let present = m.labels[t as usize].data.contains(&tr.label);
                assert_eq!(
                    present,
                    (tr.begin..=tr.end).contains(&t),
                    "track {tr:?} at frame {t}"
                );
            }
            if tr.parent != 0 {
                let parent = m.tracks.iter().find(|p| p.label == tr.parent).unwrap();
                assert_eq!(parent.end + 1, tr.begin, "daughter {tr:?} of {parent:?}");
            }
        }
        let states: std::collections::BTreeSet<CellState> = m.states.iter().map(|s| s.2).collect();
        assert!(
            states.contains(&CellState::Dividing) && states.contains(&CellState::Dying),
            "{states:?}"
        );
    }

    #[test]
    fn writes_a_ctc_movie_that_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let m = generate(&Profile::named("noisy").unwrap(), 4, 9);
        m.write_ctc(dir.path(), "01").unwrap();
        let movie = Movie::open(&dir.path().join("01")).unwrap();
        assert_eq!(movie.len(), 4);
        assert_eq!(movie.annotated_frames(), vec![0, 1, 2, 3]);
        let f = movie.frame(3).unwrap();
        assert_eq!(movie.seg_mask(3, &f).unwrap().unwrap(), m.labels[3]);
        assert_eq!(movie.tracks().unwrap().unwrap().len(), m.tracks.len());
        let states = read_states(&dir.path().join("01")).unwrap().unwrap();
        assert_eq!(states, m.states);
    }
}
