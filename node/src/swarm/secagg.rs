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

/// What went wrong in a secure-aggregation step.
#[derive(Debug, thiserror::Error)]
pub enum SecAggError {
    /// The operating system's random generator failed.
    #[error("the operating system's random generator failed")]
    Random,
    /// A seed cannot be shared with this threshold among these participants.
    #[error(
        "no threshold {threshold} of {participants} participants (it lies between 2 and the participants)"
    )]
    Threshold {
        /// The threshold asked for.
        threshold: usize,
        /// The participants.
        participants: usize,
    },
    /// More participants than Shamir shares over GF(256) can serve.
    #[error("{0} participants; secure aggregation serves at most 255")]
    TooMany(usize),
    /// No pair secret was agreed with a participant.
    #[error("no pair secret with {0}")]
    NoPairSecret(SignerKey),
    /// Sealing a share failed.
    #[error("could not seal a share for {0}")]
    Seal(SignerKey),
    /// A sealed share does not open with the pair secret, recipient and place.
    #[error("the seed share from {0} does not open")]
    Open(SignerKey),
    /// The consortium's bound on values cannot be encoded in 32-bit sums.
    #[error(
        "secure aggregation cannot encode values up to {bound} for {members} members in 32 \
         bits; set aggregation.clip_norm"
    )]
    Encoding {
        /// The per-coordinate bound.
        bound: f32,
        /// The members.
        members: usize,
    },
    /// A masked delta's body has the wrong length.
    #[error("masked delta of {bytes} bytes, the model needs {} ({params} parameters)", 4 * *.params as u64)]
    Length {
        /// Its length.
        bytes: usize,
        /// The model's parameters.
        params: usize,
    },
    /// The masked inputs could not be summed (none, or of different lengths).
    #[error("masked sum: {0}")]
    Sum(#[from] cellswarm_aggregator::AggregateError),
    /// The unmasked sum is beyond what the participants can send.
    #[error(
        "the masks did not cancel (coordinate {coordinate} sums to {value:.3e}, beyond what \
         {participants} participants can send)"
    )]
    NotCancelled {
        /// The first coordinate out of range.
        coordinate: usize,
        /// Its value.
        value: f64,
        /// The participants.
        participants: usize,
    },
    /// The mean does not fit the model's layout.
    #[error("unmasked mean: {0}")]
    Layout(#[from] cellswarm_common::delta::DeltaError),
    /// An X25519 private key could not be made.
    #[error("could not generate an X25519 key")]
    KeyGeneration,
    /// The public half of an X25519 key could not be computed.
    #[error("could not compute an X25519 public key")]
    PublicKey,
}

/// Domain string of the pair-secret derivation.
pub const PAIR_DOMAIN: &[u8] = b"cellswarm/secagg-pair/v1\0";

/// Domain string of a self-mask's keystream seed.
pub const SELF_DOMAIN: &[u8] = b"cellswarm/secagg-self/v1\0";

/// A fresh self-mask seed from the operating system's generator.
///
/// # Errors
/// The generator failed.
pub fn self_seed() -> Result<[u8; 32], SecAggError> {
    use ring::rand::SecureRandom as _;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| SecAggError::Random)?;
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

/// Domain string of a self-mask seed's commitment.
pub const COMMIT_DOMAIN: &[u8] = b"cellswarm/secagg-commit/v1\0";

/// Domain string of the key that seals a seed share for one recipient.
pub const SHARE_DOMAIN: &[u8] = b"cellswarm/secagg-share/v1\0";

/// Shares of a participant's self-mask seed needed to rebuild it, for a consortium of
/// `members`: more than half of `members + 1`, so that two epochs of one round can never
/// both be unmasked when every honest member answers at most one of them, even with one
/// curious member's own shares counted for both (see docs/security.md).
#[must_use]
pub fn share_threshold(members: usize) -> usize {
    members.div_ceil(2) + 1
}

/// The public commitment to a self-mask seed, sent with its shares so that a seed rebuilt
/// from shares is checked before it is used.
#[must_use]
pub fn seed_commitment(seed: &[u8; 32], round: RoundId, epoch: u32, owner: &SignerKey) -> [u8; 32] {
    let mut msg = Vec::with_capacity(COMMIT_DOMAIN.len() + 76);
    msg.extend_from_slice(COMMIT_DOMAIN);
    msg.extend_from_slice(seed);
    msg.extend_from_slice(&round.0.to_le_bytes());
    msg.extend_from_slice(&epoch.to_le_bytes());
    msg.extend_from_slice(owner.as_bytes());
    *ModelHash::of(&msg).as_bytes()
}

/// The x coordinate of a participant's share: its 1-based place among the sorted
/// participants (at most 255 participants; consortia are far smaller).
#[must_use]
pub fn share_x(participants: &BTreeSet<SignerKey>, who: &SignerKey) -> Option<u8> {
    participants
        .iter()
        .position(|p| p == who)
        .and_then(|i| u8::try_from(i + 1).ok())
}

fn share_key(pair_secret: &[u8; 32], from: &SignerKey, to: &SignerKey) -> ring::aead::LessSafeKey {
    let mut msg = Vec::with_capacity(SHARE_DOMAIN.len() + 96);
    msg.extend_from_slice(SHARE_DOMAIN);
    msg.extend_from_slice(pair_secret);
    msg.extend_from_slice(from.as_bytes());
    msg.extend_from_slice(to.as_bytes());
    let key = ModelHash::of(&msg);
    let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key.as_bytes())
        .expect("a 32-byte ChaCha20-Poly1305 key");
    ring::aead::LessSafeKey::new(unbound)
}

/// A seed share sealed for one participant: (recipient, sealed 32 bytes, tag).
pub type SealedShare = (SignerKey, [u8; 32], [u8; 16]);

/// Splits this member's self-mask seed into one Shamir share (over GF(256), `blahaj`)
/// per participant, `threshold` of which rebuild it, and seals each other participant's
/// share for it alone: ChaCha20-Poly1305 under a key derived from the pair secret and the
/// direction (each key seals one message, so a zero nonce is safe). Returns, for each other
/// participant, the sealed 32-byte share and its tag.
///
/// # Errors
/// Fewer participants than the threshold, more than 255, or a missing pair secret.
pub fn deal_seed(
    seed: &[u8; 32],
    threshold: usize,
    me: &SignerKey,
    participants: &BTreeSet<SignerKey>,
    secrets: &[(SignerKey, [u8; 32])],
) -> Result<Vec<SealedShare>, SecAggError> {
    use rand_core::SeedableRng as _;
    let t = u8::try_from(threshold)
        .ok()
        .filter(|t| *t >= 2 && usize::from(*t) <= participants.len())
        .ok_or(SecAggError::Threshold {
            threshold,
            participants: participants.len(),
        })?;
    if participants.len() > 255 {
        return Err(SecAggError::TooMany(participants.len()));
    }
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(self_seed()?);
    let shares: Vec<blahaj::Share> = blahaj::Sharks(t)
        .dealer_rng(seed, &mut rng)
        .take(participants.len())
        .collect();
    let mut out = Vec::new();
    for (p, share) in participants.iter().zip(&shares) {
        if p == me {
            continue;
        }
        let secret = secrets
            .iter()
            .find(|(q, _)| q == p)
            .map(|(_, s)| s)
            .ok_or(SecAggError::NoPairSecret(*p))?;
        let bytes = Vec::from(share);
        let mut y = [0u8; 32];
        y.copy_from_slice(&bytes[1..]);
        let tag = share_key(secret, me, p)
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key([0; 12]),
                ring::aead::Aad::from(&bytes[..1]),
                &mut y,
            )
            .map_err(|_| SecAggError::Seal(*p))?;
        let mut t16 = [0u8; 16];
        t16.copy_from_slice(tag.as_ref());
        out.push((*p, y, t16));
    }
    Ok(out)
}

/// Opens the share of `from`'s seed sealed for `to` (this member, at place `x`).
///
/// # Errors
/// A share that was not sealed with this pair secret, for this recipient and place.
pub fn open_share(
    sealed: &[u8; 32],
    tag: &[u8; 16],
    x: u8,
    pair_secret: &[u8; 32],
    from: &SignerKey,
    to: &SignerKey,
) -> Result<[u8; 32], SecAggError> {
    let mut buf = [0u8; 48];
    buf[..32].copy_from_slice(sealed);
    buf[32..].copy_from_slice(tag);
    let plain = share_key(pair_secret, from, to)
        .open_in_place(
            ring::aead::Nonce::assume_unique_for_key([0; 12]),
            ring::aead::Aad::from([x]),
            &mut buf,
        )
        .map_err(|_| SecAggError::Open(*from))?;
    let mut y = [0u8; 32];
    y.copy_from_slice(plain);
    Ok(y)
}

/// Rebuilds `owner`'s seed from shares `(x, y)` when at least `threshold` distinct ones
/// are given and the result matches its commitment.
#[must_use]
pub fn recover_seed(
    threshold: usize,
    shares: &BTreeMap<u8, [u8; 32]>,
    commitment: &[u8; 32],
    round: RoundId,
    epoch: u32,
    owner: &SignerKey,
) -> Option<[u8; 32]> {
    let t = u8::try_from(threshold).ok()?;
    if shares.len() < threshold || t < 2 {
        return None;
    }
    let parsed: Vec<blahaj::Share> = shares
        .iter()
        .filter_map(|(x, y)| {
            let mut b = Vec::with_capacity(33);
            b.push(*x);
            b.extend_from_slice(y);
            blahaj::Share::try_from(b.as_slice()).ok()
        })
        .collect();
    let attempt = |subset: Vec<&blahaj::Share>| {
        let secret = blahaj::Sharks(t).recover(subset).ok()?;
        let seed: [u8; 32] = secret.try_into().ok()?;
        (seed_commitment(&seed, round, epoch, owner) == *commitment).then_some(seed)
    };
    // The first t shares; if one of them is bad (and more arrived), t of the others.
    attempt(parsed.iter().take(threshold).collect()).or_else(|| {
        (0..parsed.len().min(threshold)).find_map(|skip| {
            let rest: Vec<&blahaj::Share> = parsed
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, s)| s)
                .take(threshold)
                .collect();
            if rest.len() == threshold {
                attempt(rest)
            } else {
                None
            }
        })
    })
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
pub fn fixed_point(cfg: &AggregationConfig, members: usize) -> Result<FixedPoint, SecAggError> {
    let bound = value_bound(cfg);
    (0..=MAX_FRAC_BITS)
        .rev()
        .find_map(|f| FixedPoint::new(f, bound, members.max(1)).ok())
        .ok_or(SecAggError::Encoding { bound, members })
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
    pub fn generate(others: impl IntoIterator<Item = SignerKey>) -> Result<Self, SecAggError> {
        let rng = ring::rand::SystemRandom::new();
        let mut privates = HashMap::new();
        let mut public = Vec::new();
        for peer in others {
            let key = EphemeralPrivateKey::generate(&X25519, &rng)
                .map_err(|_| SecAggError::KeyGeneration)?;
            let pk = key
                .compute_public_key()
                .map_err(|_| SecAggError::PublicKey)?;
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
pub fn words_from_bytes(body: &[u8], params: usize) -> Result<Vec<u32>, SecAggError> {
    if body.len() as u64 != 4 * params as u64 {
        return Err(SecAggError::Length {
            bytes: body.len(),
            params,
        });
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
) -> Result<Delta, SecAggError> {
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
) -> Result<Delta, SecAggError> {
    let mut total = sum(inputs)?;
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
            return Err(SecAggError::NotCancelled {
                coordinate: i,
                value: v,
                participants: inputs.len(),
            });
        }
        values.push((v / k) as f32);
    }
    Ok(Delta::from_flat(Arc::clone(layout), values)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellswarm_common::identity::Identity;

    #[test]
    fn thresholds_exceed_half_of_members_plus_one() {
        for (n, t) in [(2, 2), (3, 3), (4, 3), (5, 4), (6, 4), (8, 5), (16, 9)] {
            assert_eq!(share_threshold(n), t, "{n} members");
            // Two disjoint sets of answers plus one curious member cannot both reach it.
            assert!(2 * t - 1 > n, "{n} members");
        }
    }

    #[test]
    fn seed_shares_open_only_for_their_recipient_and_any_threshold_rebuild_the_seed() {
        // Six members: the threshold is 4 of the dealer's 5 shares for the others.
        let ids: Vec<SignerKey> = (1..=6u8)
            .map(|i| Identity::from_seed([i; 32]).unwrap().signer_key())
            .collect();
        let all: BTreeSet<SignerKey> = ids.iter().copied().collect();
        let dealer = ids[0];
        // Pair secrets between the dealer and each other member (any 32 bytes here).
        let pairs: Vec<(SignerKey, [u8; 32])> = ids[1..]
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, [i as u8 + 40; 32]))
            .collect();
        let seed = self_seed().unwrap();
        let round = RoundId(7);
        let commitment = seed_commitment(&seed, round, 2, &dealer);
        let t = share_threshold(ids.len());
        let boxes = deal_seed(&seed, t, &dealer, &all, &pairs).unwrap();
        assert_eq!(boxes.len(), 5);
        let mut opened = BTreeMap::new();
        for (to, sealed, tag) in &boxes {
            let pair = &pairs.iter().find(|(p, _)| p == to).unwrap().1;
            let x = share_x(&all, to).unwrap();
            let y = open_share(sealed, tag, x, pair, &dealer, to).unwrap();
            // Not for another recipient, place or pair secret.
            let other = ids.iter().find(|p| *p != to && **p != dealer).unwrap();
            assert!(open_share(sealed, tag, x, pair, &dealer, other).is_err());
            assert!(open_share(sealed, tag, x ^ 1, pair, &dealer, to).is_err());
            assert!(open_share(sealed, tag, x, &[0; 32], &dealer, to).is_err());
            opened.insert(x, y);
        }
        // Any t of the five shares rebuild the seed; t - 1 do not; a wrong share or
        // commitment is caught.
        let xs: Vec<u8> = opened.keys().copied().collect();
        for skip in &xs {
            let some: BTreeMap<u8, [u8; 32]> = opened
                .iter()
                .filter(|(x, _)| *x != skip)
                .map(|(x, y)| (*x, *y))
                .take(t)
                .collect();
            assert_eq!(
                recover_seed(t, &some, &commitment, round, 2, &dealer),
                Some(seed)
            );
            let fewer: BTreeMap<u8, [u8; 32]> =
                some.iter().take(t - 1).map(|(x, y)| (*x, *y)).collect();
            assert_eq!(
                recover_seed(t, &fewer, &commitment, round, 2, &dealer),
                None
            );
        }
        // One bad share among t + 1: the others still rebuild it; among t: not.
        let mut bad = opened.clone();
        bad.values_mut().next().unwrap()[0] ^= 1;
        assert_eq!(
            recover_seed(t, &bad, &commitment, round, 2, &dealer),
            Some(seed)
        );
        let bad_t: BTreeMap<u8, [u8; 32]> = bad.into_iter().take(t).collect();
        assert_eq!(
            recover_seed(t, &bad_t, &commitment, round, 2, &dealer),
            None
        );
        assert_eq!(
            recover_seed(t, &opened, &commitment, round, 3, &dealer),
            None
        );
        // Fewer participants than the threshold: nothing is dealt.
        assert!(deal_seed(&seed, 7, &dealer, &all, &pairs).is_err());
    }

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
        assert!(matches!(err, SecAggError::NotCancelled { .. }), "{err}");

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
        assert!(matches!(err, SecAggError::NotCancelled { .. }), "{err}");
        let err = unmask_mean(&fp, &drefs, &seeds[..2], RoundId(4), 0, &layout).unwrap_err();
        assert!(matches!(err, SecAggError::NotCancelled { .. }), "{err}");
        let mean2 = unmask_mean(&fp, &drefs, &seeds, RoundId(4), 0, &layout).unwrap();
        assert_eq!(mean2.values(), unmasked.values());
    }
}
