//! Gaussian noise for differential privacy, reproducible bit for bit, and an RDP
//! accountant.
//!
//! # The noise generator
//!
//! Noise for a merge is drawn from a 32-byte seed ([`noise_seed`]: SHA-256 over a domain
//! string, the round, the base model hash and the included delta hashes, all public to
//! the members), so every member adds the same noise and reaches the same model hash:
//!
//! 1. The keystream is ChaCha20 (the original 64-bit-counter variant, stream 0) keyed by
//!    the seed, read as little-endian `u32` words `w[0], w[1], ...` (as `rand_chacha`
//!    0.10 produces it; a known-answer test pins it).
//! 2. Coordinates come in pairs: pair `j` (coordinates `2j`, `2j+1`) uses the words
//!    `w[4j..4j+4]` as two `u64`s, `a = w[4j] | w[4j+1] << 32` and `b` likewise.
//! 3. `u1 = ((a >> 11) + 1) * 2^-53` (in (0, 1]), `u2 = (b >> 11) * 2^-53` (in [0, 1)).
//! 4. Box-Muller: `r = sqrt(-2 ln u1)`, `z[2j] = r cos(2 pi u2)`, `z[2j+1] = r sin(2 pi u2)`,
//!    in f64 with `libm`'s pure-Rust `log`, `cos` and `sin` (the same bits on every
//!    platform), then `noise = (std * z) as f32`.
//!
//! Because pair `j` depends only on its own words, any chunk can be generated on its own
//! (by seeking the keystream), so the noise does not depend on the number of threads.
//!
//! Caveat: whoever knows the seed can regenerate the noise and subtract it, and every
//! member can. Central DP here protects a released model against *outsiders* only;
//! against curious members use local DP (noise drawn from a secret seed on each site).
//!
//! # The accountant
//!
//! Each round is one Gaussian mechanism with noise multiplier `z` (noise standard
//! deviation divided by L2 sensitivity) over all members' data (no subsampling). Its
//! Rényi DP (Mironov, "Rényi Differential Privacy", CSF 2017) at order `alpha` is
//! `alpha / (2 z^2)`; rounds compose by adding. The (epsilon, delta) reported is the
//! minimum over a fixed grid of orders of the conversion of Balle et al. ("Hypothesis
//! Testing Interpretations and Renyi Differential Privacy", AISTATS 2020, Theorem 21):
//! `eps = rdp + ln((alpha - 1) / alpha) - (ln delta + ln alpha) / (alpha - 1)`.

use cellswarm_common::ids::{DeltaHash, ModelHash, RoundId};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// Domain string of the central-DP noise seed.
pub const NOISE_DOMAIN: &[u8] = b"cellswarm/central-dp-noise/v1\0";

/// The public seed of a round's central-DP noise.
#[must_use]
pub fn noise_seed(round: RoundId, base: &ModelHash, included: &[DeltaHash]) -> [u8; 32] {
    let mut msg = Vec::with_capacity(NOISE_DOMAIN.len() + 8 + 32 * (1 + included.len()));
    msg.extend_from_slice(NOISE_DOMAIN);
    msg.extend_from_slice(&round.0.to_le_bytes());
    msg.extend_from_slice(base.as_bytes());
    for id in included {
        msg.extend_from_slice(id.as_bytes());
    }
    *ModelHash::of(&msg).as_bytes()
}

/// A reproducible stream of standard normal values (see the module documentation).
#[derive(Debug, Clone)]
pub struct GaussianStream {
    seed: [u8; 32],
}

const TWO_POW_M53: f64 = 1.0 / 9_007_199_254_740_992.0;

impl GaussianStream {
    /// The stream for `seed`.
    #[must_use]
    pub fn new(seed: [u8; 32]) -> Self {
        Self { seed }
    }

    /// Calls `f(i, z_i)` for the standard normal values of coordinates `start..start+len`.
    ///
    /// # Panics
    /// If `start` is odd (chunks always start at even coordinates).
    pub fn for_each(&self, start: usize, len: usize, mut f: impl FnMut(usize, f64)) {
        assert!(
            start.is_multiple_of(2),
            "noise chunks start at an even coordinate"
        );
        let mut rng = ChaCha20Rng::from_seed(self.seed);
        rng.set_word_pos(2 * start as u128);
        let mut i = 0;
        while i < len {
            let a = rng.next_u64();
            let b = rng.next_u64();
            let u1 = ((a >> 11) + 1) as f64 * TWO_POW_M53;
            let u2 = (b >> 11) as f64 * TWO_POW_M53;
            let r = libm::sqrt(-2.0 * libm::log(u1));
            let theta = 2.0 * std::f64::consts::PI * u2;
            f(i, r * libm::cos(theta));
            if i + 1 < len {
                f(i + 1, r * libm::sin(theta));
            }
            i += 2;
        }
    }

    /// Adds `std * z_i` (rounded to f32) to `out[i - start]` for a chunk starting at `start`.
    pub fn add_to(&self, start: usize, std: f64, out: &mut [f32]) {
        self.for_each(start, out.len(), |i, z| out[i] += (std * z) as f32);
    }
}

/// Local differential privacy for one update: scales `values` down to L2 norm at most
/// `clip`, then adds Gaussian noise of standard deviation `noise_multiplier * clip` drawn
/// from `seed` (which must be secret to the site: whoever knows it can remove the noise).
/// Returns the norm before clipping.
pub fn privatize(values: &mut [f32], clip: f64, noise_multiplier: f64, seed: [u8; 32]) -> f64 {
    let norm = cellswarm_common::delta::sum_squares(values).sqrt();
    if norm > clip && norm > 0.0 {
        let scale = clip / norm;
        for v in values.iter_mut() {
            *v = (f64::from(*v) * scale) as f32;
        }
    }
    GaussianStream::new(seed).add_to(0, noise_multiplier * clip, values);
    norm
}

/// The noise standard deviation at which Gaussian noise of `params` coordinates has the
/// expected L2 norm of about `noise_multiplier * clip * sqrt(params)`: the norm a
/// privatized update has, which peers must accept under `max_update_norm`.
#[must_use]
pub fn expected_noise_norm(params: usize, clip: f64, noise_multiplier: f64) -> f64 {
    noise_multiplier * clip * (params as f64).sqrt()
}

/// Orders alpha at which RDP is tracked: 1.1, 1.2, ..., 10.9, then 12..=63, 128, 256, 512.
#[must_use]
pub fn rdp_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((12..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0]);
    orders
}

/// Rényi-DP accountant for repeated Gaussian mechanisms (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RdpAccountant {
    /// Rounds accounted.
    pub rounds: u64,
    /// Sum over rounds of `1 / z^2`.
    pub sum_inv_z2: f64,
}

impl RdpAccountant {
    /// Accounts one round with noise multiplier `z` (must be positive).
    pub fn step(&mut self, z: f64) {
        self.rounds += 1;
        self.sum_inv_z2 += 1.0 / (z * z);
    }

    /// The accountant after one more round with multiplier `z`.
    #[must_use]
    pub fn after(mut self, z: f64) -> Self {
        self.step(z);
        self
    }

    /// Total RDP at order `alpha`.
    #[must_use]
    pub fn rdp(&self, alpha: f64) -> f64 {
        alpha / 2.0 * self.sum_inv_z2
    }

    /// The epsilon spent so far for a given `delta` (0 before any round).
    #[must_use]
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.rounds == 0 {
            return 0.0;
        }
        rdp_orders()
            .into_iter()
            .map(|a| self.rdp(a) + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0))
            .fold(f64::INFINITY, f64::min)
            .max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chacha20_keystream_known_answer() {
        // RFC 7539 section 2.3.2-style check of the ChaCha20 block function through
        // rand_chacha with an all-zero key and nonce: the first keystream words of the
        // original ChaCha20 (djb) with counter 0.
        let mut rng = ChaCha20Rng::from_seed([0u8; 32]);
        let w0 = rng.next_u32();
        let w1 = rng.next_u32();
        // Keystream bytes 76 b8 e0 ad a0 f1 3d 90 ... (ChaCha20, zero key, zero nonce).
        assert_eq!(w0.to_le_bytes(), [0x76, 0xb8, 0xe0, 0xad]);
        assert_eq!(w1.to_le_bytes(), [0xa0, 0xf1, 0x3d, 0x90]);
    }

    #[test]
    fn privatize_clips_then_adds_noise_of_the_configured_scale() {
        // An update of norm 10 clipped to 2, with sigma = 0.5: the noise is N(0, 1).
        let n = 200_000;
        let mut v = vec![10.0 / (n as f32).sqrt(); n];
        let clipped: Vec<f64> = v.iter().map(|x| f64::from(*x) * 0.2).collect();
        let before = privatize(&mut v, 2.0, 0.5, [7; 32]);
        assert!((before - 10.0).abs() < 1e-3, "{before}");
        let noise: Vec<f64> = v
            .iter()
            .zip(&clipped)
            .map(|(x, c)| f64::from(*x) - c)
            .collect();
        let mean = noise.iter().sum::<f64>() / n as f64;
        let std = (noise.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((std - 1.0).abs() < 0.01, "std {std}");
        // An update already inside the ball is not scaled; another seed, other noise.
        let mut a = vec![0.001f32; 1000];
        let mut b = a.clone();
        privatize(&mut a, 2.0, 1e-9, [1; 32]);
        privatize(&mut b, 2.0, 1e-9, [2; 32]);
        assert!(a.iter().all(|x| (x - 0.001).abs() < 1e-6));
        assert_ne!(a, b);
        assert!((expected_noise_norm(10_000, 2.0, 0.5) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn chunks_generate_the_same_values_as_one_pass() {
        let g = GaussianStream::new([7; 32]);
        let mut whole = vec![0f64; 1001];
        g.for_each(0, 1001, |i, z| whole[i] = z);
        let mut pieces = vec![0f64; 1001];
        for start in (0..1001).step_by(100) {
            let len = 100.min(1001 - start);
            g.for_each(start, len, |i, z| pieces[start + i] = z);
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn noise_is_standard_normal() {
        let g = GaussianStream::new([3; 32]);
        let n = 200_000;
        let (mut s1, mut s2, mut s4) = (0f64, 0f64, 0f64);
        g.for_each(0, n, |_, z| {
            s1 += z;
            s2 += z * z;
            s4 += z * z * z * z;
        });
        let nf = n as f64;
        let mean = s1 / nf;
        let var = s2 / nf - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        assert!((s4 / nf - 3.0).abs() < 0.05, "kurtosis {}", s4 / nf);
    }

    #[test]
    fn different_rounds_give_different_seeds() {
        let b = ModelHash::of(b"base");
        let ids = [DeltaHash::of(b"a")];
        assert_ne!(
            noise_seed(RoundId(1), &b, &ids),
            noise_seed(RoundId(2), &b, &ids)
        );
        assert_ne!(
            noise_seed(RoundId(1), &b, &ids),
            noise_seed(RoundId(1), &b, &[])
        );
    }

    #[test]
    fn accountant_matches_known_values() {
        let mut acc = RdpAccountant::default();
        assert_eq!(acc.epsilon(1e-5), 0.0);
        acc.step(1.0);
        // Reference values computed independently (Python, same order grid and the
        // Balle et al. 2020 conversion): z = 1 for 1 and 3 rounds, z = 4 for 1 round.
        let e1 = acc.epsilon(1e-5);
        assert!((e1 - 4.728_507_067).abs() < 1e-6, "{e1}");
        let e3 = acc.after(1.0).after(1.0).epsilon(1e-5);
        assert!((e3 - 9.009_958_992).abs() < 1e-6, "{e3}");
        let quiet = RdpAccountant::default().after(4.0).epsilon(1e-5);
        assert!((quiet - 1.012_550_628).abs() < 1e-6, "{quiet}");
    }
}
