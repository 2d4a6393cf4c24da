//! Secure aggregation in the node: pairwise X25519 keys (ring's agreement API), masked
//! fixed-point updates, and the unmasked mean of a complete set of masked updates.
//!
//! Each masking epoch of a round, every participant makes one ephemeral X25519 key pair
//! for each other participant and gossips the public halves in a `KeyShare` envelope
//! signed by its identity key. Two participants agree on a 32-byte pair secret
//! (SHA-256 over a domain string, the X25519 output, the round, the epoch and both signer
//! keys in order), and [`cellswarm_aggregator::masking`] turns the secrets into masks that
//! cancel in the sum. The merge sees only the sum; the mean of the participants' updates
//! is merged as one update. See docs/security.md for the protocol and its limits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use cellswarm_aggregator::masking::{FixedPoint, apply_masks, sum};
use cellswarm_common::config::AggregationConfig;
use cellswarm_common::delta::Delta;
use cellswarm_common::ids::{ModelHash, RoundId, SignerKey};
use cellswarm_common::weights::Layout;
use ring::agreement::{EphemeralPrivateKey, UnparsedPublicKey, X25519, agree_ephemeral};

/// Domain string of the pair-secret derivation.
pub const PAIR_DOMAIN: &[u8] = b"cellswarm/secagg-pair/v1\0";

/// Domain string of a self-mask's keystream seed.
pub const SELF_DOMAIN: &[u8] = b"cellswarm/secagg-self/v1\0";

/// A fresh self-mask seed from the operating system's generator.
///
/// # Errors
/// The generator failed.
pub fn self_seed() -> Result<[u8; 32], String> {
    use ring::rand::SecureRandom as _;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| "the operating system's random generator failed".to_owned())?;
    Ok(seed)
}

/// Adds (or, with `subtract`, removes) the self-mask of `seed` for a round's epoch:
/// ChaCha20 words keyed by `SHA-256(SELF_DOMAIN | seed | round | epoch)`, modulo 2^32.
pub fn self_mask(words: &mut [u32], seed: &[u8; 32], round: RoundId, epoch: u32, subtract: bool) {
    use rand_chacha::ChaCha20Rng;
    use rand_core::{Rng as _, SeedableRng as _};
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut msg = Vec::with_capacity(SELF_DOMAIN.len() + 44);
    msg.extend_from_slice(SELF_DOMAIN);
    msg.extend_from_slice(seed);
    msg.extend_from_slice(&round.0.to_le_bytes());
    msg.extend_from_slice(&epoch.to_le_bytes());
    let key = *ModelHash::of(&msg).as_bytes();
    words
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = ChaCha20Rng::from_seed(key);
            rng.set_word_pos((c * CHUNK) as u128);
            for w in chunk {
                let m = rng.next_u32();
                *w = if subtract {
                    w.wrapping_sub(m)
                } else {
                    w.wrapping_add(m)
                };
            }
        });
}

/// Largest fixed-point fraction used (about 6e-8 resolution).
const MAX_FRAC_BITS: u32 = 24;

/// The per-coordinate bound of masked values: `aggregation.clip_norm` (required with
/// secure aggregation; no coordinate of a vector of norm C exceeds C).
#[must_use]
pub fn value_bound(cfg: &AggregationConfig) -> f32 {
    cfg.clip_norm.unwrap_or(cfg.max_update_norm) as f32
}

/// The fixed-point encoding for a consortium of `members`: the finest that cannot
/// overflow the 32-bit sum of all members' values.
///
/// # Errors
/// A bound so large that even integer resolution would overflow.
pub fn fixed_point(cfg: &AggregationConfig, members: usize) -> Result<FixedPoint, String> {
    let bound = value_bound(cfg);
    (0..=MAX_FRAC_BITS)
        .rev()
        .find_map(|f| FixedPoint::new(f, bound, members.max(1)).ok())
        .ok_or_else(|| {
            format!(
                "secure aggregation cannot encode values up to {bound} for {members} members in 32 \
                 bits; set aggregation.clip_norm"
            )
        })
}

/// This member's keys of one masking epoch.
#[derive(Debug)]
pub struct EpochKeys {
    privates: HashMap<SignerKey, EphemeralPrivateKey>,
    /// For each other participant, the public key to agree with.
    pub public: Vec<(SignerKey, [u8; 32])>,
}

impl EpochKeys {
    /// Fresh key pairs, one for each of `others`.
    ///
    /// # Errors
    /// The operating system's random generator failed.
    pub fn generate(others: impl IntoIterator<Item = SignerKey>) -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let mut privates = HashMap::new();
        let mut public = Vec::new();
        for peer in others {
            let key = EphemeralPrivateKey::generate(&X25519, &rng)
                .map_err(|_| "could not generate an X25519 key".to_owned())?;
            let pk = key
                .compute_public_key()
                .map_err(|_| "could not compute an X25519 public key".to_owned())?;
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(pk.as_ref());
            public.push((peer, bytes));
            privates.insert(peer, key);
        }
        Ok(Self { privates, public })
    }

    /// The pair secrets with every other participant, from the public key each made for
    /// us (`theirs`). Uses up this epoch's private keys.
    ///
    /// # Errors
    /// A participant without a key for us, or a key that does not agree.
    pub fn pair_secrets(
        &mut self,
        me: SignerKey,
        participants: &BTreeSet<SignerKey>,
        theirs: &BTreeMap<SignerKey, [u8; 32]>,
        round: RoundId,
        epoch: u32,
    ) -> Result<Vec<(SignerKey, [u8; 32])>, String> {
        let mut out = Vec::new();
        for peer in participants.iter().filter(|p| **p != me) {
            let public = theirs
                .get(peer)
                .ok_or_else(|| format!("no key from {peer} yet"))?;
            let private = self
                .privates
                .remove(peer)
                .ok_or_else(|| format!("no key of ours for {peer} in this epoch"))?;
            let (lo, hi) = if me < *peer { (me, *peer) } else { (*peer, me) };
            let secret = agree_ephemeral(private, &UnparsedPublicKey::new(&X25519, public), |dh| {
                let mut msg = Vec::with_capacity(PAIR_DOMAIN.len() + 32 + 12 + 64);
                msg.extend_from_slice(PAIR_DOMAIN);
                msg.extend_from_slice(dh);
                msg.extend_from_slice(&round.0.to_le_bytes());
                msg.extend_from_slice(&epoch.to_le_bytes());
                msg.extend_from_slice(lo.as_bytes());
                msg.extend_from_slice(hi.as_bytes());
                *ModelHash::of(&msg).as_bytes()
            })
            .map_err(|_| format!("the key of {peer} does not agree"))?;
            out.push((*peer, secret));
        }
        Ok(out)
    }
}

/// Encodes `values` in fixed point and adds this member's pairwise masks.
#[must_use]
pub fn mask(
    values: &[f32],
    fp: &FixedPoint,
    me: &SignerKey,
    secrets: &[(SignerKey, [u8; 32])],
    round: RoundId,
) -> Vec<u32> {
    let mut words = fp.encode(values);
    apply_masks(&mut words, me, secrets, round);
    words
}

/// Masked words as sent: `P` little-endian `u32`s.
#[must_use]
pub fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Reads `params` masked words.
///
/// # Errors
/// A body that is not exactly `4 * params` bytes.
pub fn words_from_bytes(body: &[u8], params: usize) -> Result<Vec<u32>, String> {
    if body.len() as u64 != 4 * params as u64 {
        return Err(format!(
            "masked delta of {} bytes, the model needs {} ({} parameters)",
            body.len(),
            4 * params as u64,
            params
        ));
    }
    Ok(body
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The mean of the updates whose masked encodings are `inputs` (all participants of an
/// epoch, so that the masks cancel).
///
/// # Errors
/// Masks that did not cancel (a participant masked with other keys than the others, or
/// one is missing): the unmasked sum is then out of the range the participants' values
/// can reach.
pub fn masked_mean(
    fp: &FixedPoint,
    inputs: &[&[u32]],
    layout: &Arc<Layout>,
) -> Result<Delta, String> {
    unmask_mean(fp, inputs, &[], RoundId(0), 0, layout)
}

/// Like [`masked_mean`] for double-masked inputs: the self-masks of `self_seeds` (every
/// participant's, revealed for this sealed epoch) are removed from the sum first.
///
/// # Errors
/// As [`masked_mean`] (a wrong or missing seed leaves the sum out of range).
pub fn unmask_mean(
    fp: &FixedPoint,
    inputs: &[&[u32]],
    self_seeds: &[[u8; 32]],
    round: RoundId,
    epoch: u32,
    layout: &Arc<Layout>,
) -> Result<Delta, String> {
    let mut total = sum(inputs).map_err(|e| e.to_string())?;
    for seed in self_seeds {
        self_mask(&mut total, seed, round, epoch, true);
    }
    let k = inputs.len() as f64;
    let bound = f64::from(fp.clip()) * k + k / fp.scale();
    let s = fp.scale();
    let mut values = Vec::with_capacity(total.len());
    for (i, q) in total.iter().enumerate() {
        let v = f64::from(q.cast_signed()) / s;
        if v.abs() > bound {
            return Err(format!(
                "the masks did not cancel (coordinate {i} sums to {v:.3e}, beyond what {k} \
                 participants can send)"
            ));
        }
        values.push((v / k) as f32);
    }
    Delta::from_flat(Arc::clone(layout), values).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellswarm_common::identity::Identity;

    #[test]
    fn pairwise_keys_agree_and_masks_cancel_to_the_plain_mean() {
        let ids: Vec<SignerKey> = (1..=3u8)
            .map(|i| Identity::from_seed([i; 32]).unwrap().signer_key())
            .collect();
        let all: BTreeSet<SignerKey> = ids.iter().copied().collect();
        let mut keys: Vec<EpochKeys> = ids
            .iter()
            .map(|me| EpochKeys::generate(ids.iter().copied().filter(|p| p != me)).unwrap())
            .collect();
        // What each member received: for each sender, the key it made for the receiver.
        let received = |me: &SignerKey, keys: &[EpochKeys]| -> BTreeMap<SignerKey, [u8; 32]> {
            ids.iter()
                .zip(keys)
                .filter(|(s, _)| *s != me)
                .map(|(s, k)| (*s, k.public.iter().find(|(p, _)| p == me).unwrap().1))
                .collect()
        };
        let theirs: Vec<_> = ids.iter().map(|me| received(me, &keys)).collect();
        let layout = Arc::new(Layout::new([("w".to_owned(), vec![500])]).unwrap());
        let cfg = AggregationConfig {
            clip_norm: Some(2.0),
            ..AggregationConfig::default()
        };
        let fp = fixed_point(&cfg, 3).unwrap();
        let plain: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                (0..500)
                    .map(|j| ((i * 500 + j) as f32 * 0.37).sin())
                    .collect()
            })
            .collect();
        let mut masked = Vec::new();
        for i in 0..3 {
            let secrets = keys[i]
                .pair_secrets(ids[i], &all, &theirs[i], RoundId(4), 0)
                .unwrap();
            masked.push(mask(&plain[i], &fp, &ids[i], &secrets, RoundId(4)));
        }
        let refs: Vec<&[u32]> = masked.iter().map(Vec::as_slice).collect();
        let mean = masked_mean(&fp, &refs, &layout).unwrap();
        let enc: Vec<Vec<u32>> = plain.iter().map(|p| fp.encode(p)).collect();
        let enc_refs: Vec<&[u32]> = enc.iter().map(Vec::as_slice).collect();
        let unmasked = masked_mean(&fp, &enc_refs, &layout).unwrap();
        assert_eq!(mean.values(), unmasked.values(), "masking changes nothing");
        // Two of three: the masks do not cancel, and it is noticed.
        let err = masked_mean(&fp, &refs[..2], &layout).unwrap_err();
        assert!(err.contains("did not cancel"), "{err}");

        // Double masking: with self-masks added, even the complete set's sum stays masked
        // until every participant's seed is revealed; then it is the same mean.
        let seeds: Vec<[u8; 32]> = (0..3).map(|_| self_seed().unwrap()).collect();
        let doubled: Vec<Vec<u32>> = masked
            .iter()
            .zip(&seeds)
            .map(|(w, seed)| {
                let mut w = w.clone();
                self_mask(&mut w, seed, RoundId(4), 0, false);
                w
            })
            .collect();
        let drefs: Vec<&[u32]> = doubled.iter().map(Vec::as_slice).collect();
        let err = masked_mean(&fp, &drefs, &layout).unwrap_err();
        assert!(err.contains("did not cancel"), "{err}");
        let err = unmask_mean(&fp, &drefs, &seeds[..2], RoundId(4), 0, &layout).unwrap_err();
        assert!(err.contains("did not cancel"), "{err}");
        let mean2 = unmask_mean(&fp, &drefs, &seeds, RoundId(4), 0, &layout).unwrap();
        assert_eq!(mean2.values(), unmasked.values());
    }
}
