//! Secure-aggregation arithmetic: fixed-point encoding and pairwise masks that cancel
//! bit-exactly in the sum.
//!
//! In the style of Bonawitz et al. ("Practical Secure Aggregation for Privacy-Preserving
//! Machine Learning", CCS 2017), without dropout recovery: each pair of members (a, b)
//! shares a 32-byte secret (agreed by the node with X25519). For round r, the pair's
//! mask is the ChaCha20 keystream keyed by `SHA-256("cellswarm/secagg-mask/v1" 0x00 ||
//! secret || r)`, read as little-endian `u32` words. The member with the lower signer key
//! adds the mask, the other subtracts it, both modulo 2^32. Summed over all members, every
//! mask appears once with each sign and cancels exactly, leaving the sum of the encoded
//! updates; a single masked update is uniformly distributed and reveals nothing.
//!
//! Values are encoded as fixed point: `q = round(clamp(x, -clip, clip) * 2^frac_bits)` as a
//! two's-complement `i32`. [`FixedPoint::new`] refuses parameters for which the sum over
//! the largest allowed number of members could leave the `i32` range, so decoding the
//! wrapped sum is always exact. A member that drops out after sending leaves its masks
//! uncancelled: the round must restart without it (no partial unmasking).

use cellswarm_common::ids::{ModelHash, RoundId, SignerKey};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::AggregateError;
use crate::kernels::CHUNK;

/// Domain string of the per-round mask seed.
pub const MASK_DOMAIN: &[u8] = b"cellswarm/secagg-mask/v1\0";

/// Fixed-point encoding parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    frac_bits: u32,
    clip: f32,
    max_members: usize,
}

impl FixedPoint {
    /// Encoding with `frac_bits` fractional bits, values clamped to `[-clip, clip]`, safe
    /// for sums of up to `max_members` updates.
    ///
    /// # Errors
    /// [`AggregateError::InvalidConfig`] when `max_members * clip * 2^frac_bits` could
    /// overflow an `i32`, or for a non-positive clip.
    pub fn new(frac_bits: u32, clip: f32, max_members: usize) -> Result<Self, AggregateError> {
        if !(clip.is_finite() && clip > 0.0) || frac_bits > 30 || max_members == 0 {
            return Err(AggregateError::InvalidConfig(format!(
                "fixed point needs clip > 0, frac_bits <= 30 and at least one member; got clip {clip}, frac_bits {frac_bits}"
            )));
        }
        // Each encoded value is at most round(clip * 2^f) <= clip * 2^f + 1 in magnitude.
        let per_member = f64::from(clip) * f64::from(1u32 << frac_bits) + 1.0;
        if per_member * max_members as f64 >= f64::from(i32::MAX) {
            return Err(AggregateError::InvalidConfig(format!(
                "{max_members} members x clip {clip} x 2^{frac_bits} overflows the 32-bit fixed-point sum; \
                 lower frac_bits or clip"
            )));
        }
        Ok(Self {
            frac_bits,
            clip,
            max_members,
        })
    }

    /// The scale `2^frac_bits`.
    #[must_use]
    pub fn scale(&self) -> f64 {
        f64::from(1u32 << self.frac_bits)
    }

    /// Encodes values (clamped to the clip range) as wrapping `u32`s.
    #[must_use]
    pub fn encode(&self, values: &[f32]) -> Vec<u32> {
        let s = self.scale();
        values
            .par_iter()
            .with_min_len(CHUNK)
            .map(|&x| {
                let c = f64::from(x.clamp(-self.clip, self.clip));
                ((c * s).round() as i32).cast_unsigned()
            })
            .collect()
    }

    /// Decodes a sum of at most `max_members` encodings.
    #[must_use]
    pub fn decode(&self, sum: &[u32]) -> Vec<f32> {
        let s = self.scale();
        sum.par_iter()
            .with_min_len(CHUNK)
            .map(|&q| (f64::from(q.cast_signed()) / s) as f32)
            .collect()
    }

    /// The clamp bound of encoded values.
    #[must_use]
    pub fn clip(&self) -> f32 {
        self.clip
    }

    /// Largest number of members whose sum is guaranteed exact.
    #[must_use]
    pub fn max_members(&self) -> usize {
        self.max_members
    }
}

/// The keystream seed of a pair's mask for one round.
#[must_use]
pub fn mask_seed(pair_secret: &[u8; 32], round: RoundId) -> [u8; 32] {
    let mut msg = Vec::with_capacity(MASK_DOMAIN.len() + 40);
    msg.extend_from_slice(MASK_DOMAIN);
    msg.extend_from_slice(pair_secret);
    msg.extend_from_slice(&round.0.to_le_bytes());
    *ModelHash::of(&msg).as_bytes()
}

/// Adds this member's pairwise masks to its encoded update, in place.
///
/// `peers` lists every other member of the round with the secret shared with it. For
/// each, the mask is added if `me < peer` and subtracted otherwise (modulo 2^32).
pub fn apply_masks(
    encoded: &mut [u32],
    me: &SignerKey,
    peers: &[(SignerKey, [u8; 32])],
    round: RoundId,
) {
    for (peer, secret) in peers {
        let seed = mask_seed(secret, round);
        let add = me < peer;
        encoded
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut rng = ChaCha20Rng::from_seed(seed);
                rng.set_word_pos((c * CHUNK) as u128);
                for q in chunk {
                    let m = rng.next_u32();
                    *q = if add {
                        q.wrapping_add(m)
                    } else {
                        q.wrapping_sub(m)
                    };
                }
            });
    }
}

/// The wrapping sum of encoded (masked or not) updates.
///
/// # Errors
/// [`AggregateError::LayoutMismatch`]-style refusal when lengths differ, and
/// [`AggregateError::NoUpdates`] for an empty input.
pub fn sum(inputs: &[&[u32]]) -> Result<Vec<u32>, AggregateError> {
    let first = inputs.first().ok_or(AggregateError::NoUpdates)?;
    if inputs.iter().any(|x| x.len() != first.len()) {
        return Err(AggregateError::InvalidConfig(
            "masked updates have different lengths".into(),
        ));
    }
    let mut out = first.to_vec();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let start = c * CHUNK;
        let end = start + o.len();
        for x in &inputs[1..] {
            for (a, &b) in o.iter_mut().zip(&x[start..end]) {
                *a = a.wrapping_add(b);
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(b: u8) -> SignerKey {
        SignerKey([b; 32])
    }

    fn pseudo_update(seed: u8, n: usize) -> Vec<f32> {
        let mut rng = ChaCha20Rng::from_seed([seed; 32]);
        (0..n)
            .map(|_| ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.2)
            .collect()
    }

    /// A member's key and the secret it shares with each peer.
    type Member = (SignerKey, Vec<(SignerKey, [u8; 32])>);

    /// Three members with pairwise secrets.
    fn members() -> Vec<Member> {
        let keys = [signer(3), signer(1), signer(2)];
        let secret = |a: &SignerKey, b: &SignerKey| {
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            let mut s = [0u8; 32];
            s[0] = lo.0[0];
            s[1] = hi.0[0];
            s
        };
        keys.iter()
            .map(|k| {
                let peers = keys
                    .iter()
                    .filter(|p| *p != k)
                    .map(|p| (*p, secret(k, p)))
                    .collect();
                (*k, peers)
            })
            .collect()
    }

    #[test]
    fn masked_sum_equals_plain_sum_bit_exactly() {
        let fp = FixedPoint::new(20, 1.0, 64).unwrap();
        let n = 3 * CHUNK + 17;
        let updates: Vec<Vec<f32>> = (0..3).map(|i| pseudo_update(i, n)).collect();
        let plain: Vec<Vec<u32>> = updates.iter().map(|u| fp.encode(u)).collect();
        let mut masked = plain.clone();
        for ((me, peers), q) in members().iter().zip(masked.iter_mut()) {
            apply_masks(q, me, peers, RoundId(7));
        }
        assert_ne!(masked[0], plain[0]);
        fn refs(v: &[Vec<u32>]) -> Vec<&[u32]> {
            v.iter().map(Vec::as_slice).collect()
        }
        let plain_sum = sum(&refs(&plain)).unwrap();
        let masked_sum = sum(&refs(&masked)).unwrap();
        assert_eq!(masked_sum, plain_sum);
        // And the decoded sum is the true sum to within the fixed-point resolution.
        let decoded = fp.decode(&masked_sum);
        for i in 0..n {
            let truth: f64 = updates.iter().map(|u| f64::from(u[i])).sum();
            assert!((f64::from(decoded[i]) - truth).abs() <= 3.0 / fp.scale() + 1e-7);
        }
    }

    #[test]
    fn a_masked_update_is_uncorrelated_with_the_update() {
        let fp = FixedPoint::new(20, 1.0, 64).unwrap();
        let n = 1 << 20;
        let update = pseudo_update(9, n);
        let mut q = fp.encode(&update);
        let (me, peers) = &members()[0];
        apply_masks(&mut q, me, peers, RoundId(1));
        let seen: Vec<f64> = q.iter().map(|&x| f64::from(x.cast_signed())).collect();
        let truth: Vec<f64> = update.iter().map(|&x| f64::from(x)).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (ms, mt) = (mean(&seen), mean(&truth));
        let (mut sst, mut sss, mut sts) = (0f64, 0f64, 0f64);
        for (s, t) in seen.iter().zip(&truth) {
            sst += (s - ms) * (t - mt);
            sss += (s - ms) * (s - ms);
            sts += (t - mt) * (t - mt);
        }
        let corr = sst / (sss.sqrt() * sts.sqrt());
        assert!(corr.abs() < 0.01, "correlation {corr}");
        // Unmasked, the encoding is of course almost perfectly correlated.
        let plain: Vec<f64> = fp
            .encode(&update)
            .iter()
            .map(|&x| f64::from(x.cast_signed()))
            .collect();
        let mp = mean(&plain);
        let c: f64 = plain
            .iter()
            .zip(&truth)
            .map(|(p, t)| (p - mp) * (t - mt))
            .sum::<f64>()
            / (plain
                .iter()
                .map(|p| (p - mp) * (p - mp))
                .sum::<f64>()
                .sqrt()
                * sts.sqrt());
        assert!(c > 0.999, "{c}");
    }

    #[test]
    fn masks_differ_by_round() {
        let (me, peers) = &members()[0];
        let mut a = vec![0u32; 64];
        let mut b = vec![0u32; 64];
        apply_masks(&mut a, me, peers, RoundId(1));
        apply_masks(&mut b, me, peers, RoundId(2));
        assert_ne!(a, b);
    }

    #[test]
    fn overflowing_parameters_are_refused() {
        assert!(FixedPoint::new(24, 1.0, 127).is_ok());
        assert!(FixedPoint::new(24, 1.0, 128).is_err());
        assert!(FixedPoint::new(16, 0.0, 3).is_err());
        let fp = FixedPoint::new(16, 2.0, 3).unwrap();
        assert_eq!(
            fp.decode(&fp.encode(&[5.0, -5.0, 0.5])),
            vec![2.0, -2.0, 0.5]
        );
    }
}
