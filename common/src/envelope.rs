//! Signed envelopes: payload bytes, the signer's Ed25519 public key and a signature.
//!
//! The API is *verify-then-read*. Bytes from the network or disk are parsed into an
//! [`UnverifiedEnvelope`], which exposes the claimed signer and the kind but has no way
//! to reach the payload. Only [`UnverifiedEnvelope::verify`] (signature checked with
//! ring, signer checked against a [`SignerPolicy`]) turns it into a
//! [`VerifiedEnvelope`], whose payload can be read.
//!
//! # Wire layout (version 1)
//!
//! ```text
//! magic        4 bytes  "CSEV"
//! version      u8       1
//! kind         u8       PayloadKind
//! reserved     u16      0
//! signer       32 bytes Ed25519 public key
//! signature    64 bytes Ed25519 signature over the signed message below
//! payload_len  u64 LE
//! payload      payload_len bytes
//! ```
//!
//! # Signed message (domain separation)
//!
//! ```text
//! "cellswarm/envelope/v1" 0x00 | kind u8 | payload_len u64 LE | SHA-256(payload)
//! ```
//!
//! The domain string keeps these signatures from being valid for any other protocol,
//! the kind byte keeps a delta signature from passing as a merge record, and signing the
//! payload's digest lets a 256 MiB payload be hashed once (the digest is also its
//! [`DeltaHash`](crate::ids::DeltaHash) or [`RecordHash`](crate::ids::RecordHash)).

use std::collections::BTreeSet;
use std::fmt;

use ring::digest;
use ring::signature::{ED25519, UnparsedPublicKey};

use crate::bytes::{Reader, Truncated};
use crate::identity::Identity;
use crate::ids::SignerKey;

/// Magic bytes that open an envelope.
pub const ENVELOPE_MAGIC: [u8; 4] = *b"CSEV";
/// Envelope layout version.
pub const ENVELOPE_VERSION: u8 = 1;
/// Size of the fixed header before the payload.
pub const ENVELOPE_HEADER_LEN: usize = 4 + 1 + 1 + 2 + 32 + 64 + 8;
/// Domain-separation prefix of every signed message.
pub const SIGNING_DOMAIN: &[u8] = b"cellswarm/envelope/v1\0";

/// What an envelope carries; part of the signed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum PayloadKind {
    /// A member's model update for a round ([`crate::wire::DeltaMessage`]).
    Delta = 1,
    /// A merger's record of a round ([`crate::wire::MergeRecord`]).
    MergeRecord = 2,
    /// A small gossip announcement ([`crate::wire::Announcement`]).
    Announcement = 3,
    /// A member's key-agreement share for secure aggregation.
    KeyShare = 4,
}

impl PayloadKind {
    /// Parses a kind byte.
    #[must_use]
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Delta,
            2 => Self::MergeRecord,
            3 => Self::Announcement,
            4 => Self::KeyShare,
            _ => return None,
        })
    }
}

/// What went wrong parsing or verifying an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The input ended early.
    #[error(transparent)]
    Truncated(#[from] Truncated),
    /// The declared payload exceeds the limit.
    #[error("envelope payload of {got} bytes exceeds the limit of {max}")]
    Oversized {
        /// Declared payload length.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// Not an envelope.
    #[error("not a cellswarm envelope: bad magic bytes {0:02x?}")]
    BadMagic([u8; 4]),
    /// Unsupported version.
    #[error("unsupported envelope version {0} (this build reads version {ENVELOPE_VERSION})")]
    UnsupportedVersion(u8),
    /// Unknown payload kind.
    #[error("unknown envelope kind {0}")]
    UnknownKind(u8),
    /// Reserved bytes were not zero.
    #[error("reserved envelope bytes are {0:#06x}, must be 0")]
    Reserved(u16),
    /// Bytes after the payload.
    #[error("{0} unexpected bytes after the envelope payload")]
    TrailingBytes(u64),
    /// The envelope is of another kind than expected.
    #[error("expected a {expected:?} envelope, got {got:?}")]
    WrongKind {
        /// What the caller expected.
        expected: PayloadKind,
        /// What the envelope says.
        got: PayloadKind,
    },
    /// The signer is not allowed by the policy (e.g. not a consortium member).
    #[error("signer {0} is not a consortium member")]
    NotAMember(SignerKey),
    /// The signature does not verify.
    #[error("bad signature from {0}")]
    BadSignature(SignerKey),
}

/// Decides which signers are acceptable, checked before the signature.
pub trait SignerPolicy {
    /// Whether `signer` may sign envelopes.
    fn allows(&self, signer: &SignerKey) -> bool;
}

/// Accepts any signer whose signature verifies (tests, tools reading their own files).
#[derive(Debug, Clone, Copy, Default)]
pub struct AnySigner;

impl SignerPolicy for AnySigner {
    fn allows(&self, _: &SignerKey) -> bool {
        true
    }
}

/// Accepts exactly the listed signers: a consortium's members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberKeys(BTreeSet<SignerKey>);

impl MemberKeys {
    /// A policy allowing `keys`.
    pub fn new(keys: impl IntoIterator<Item = SignerKey>) -> Self {
        Self(keys.into_iter().collect())
    }
    /// The members, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &SignerKey> {
        self.0.iter()
    }
    /// Number of members.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl SignerPolicy for MemberKeys {
    fn allows(&self, signer: &SignerKey) -> bool {
        self.0.contains(signer)
    }
}

/// The message that is signed for a payload of `kind`.
fn signed_message(kind: PayloadKind, payload_len: u64, payload_digest: &[u8; 32]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_DOMAIN.len() + 1 + 8 + 32);
    msg.extend_from_slice(SIGNING_DOMAIN);
    msg.push(kind as u8);
    msg.extend_from_slice(&payload_len.to_le_bytes());
    msg.extend_from_slice(payload_digest);
    msg
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Signs `payload` as `kind` and returns the envelope's wire bytes.
#[must_use]
pub fn seal(identity: &Identity, kind: PayloadKind, payload: &[u8]) -> Vec<u8> {
    seal_hashed(identity, kind, payload).0
}

/// As [`seal`], also returning SHA-256 of the payload (the payload's
/// [`DeltaHash`](crate::ids::DeltaHash) or [`RecordHash`](crate::ids::RecordHash)), so that
/// large payloads are hashed once.
#[must_use]
pub fn seal_hashed(identity: &Identity, kind: PayloadKind, payload: &[u8]) -> (Vec<u8>, [u8; 32]) {
    let digest = sha256(payload);
    let sig = identity.sign(&signed_message(kind, payload.len() as u64, &digest));
    let mut out = Vec::with_capacity(ENVELOPE_HEADER_LEN + payload.len());
    out.extend_from_slice(&ENVELOPE_MAGIC);
    out.push(ENVELOPE_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(identity.signer_key().as_bytes());
    out.extend_from_slice(&sig);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    (out, digest)
}

/// Seals the payload that `buf` holds after [`ENVELOPE_HEADER_LEN`] reserved bytes, in
/// place: the header is written into the reserved bytes, so a large payload built in
/// its final buffer is never copied. Returns the payload's SHA-256.
///
/// # Panics
/// If `buf` is shorter than [`ENVELOPE_HEADER_LEN`] (a caller's bug).
pub fn seal_in_place(identity: &Identity, kind: PayloadKind, buf: &mut [u8]) -> [u8; 32] {
    assert!(
        buf.len() >= ENVELOPE_HEADER_LEN,
        "the buffer must start with ENVELOPE_HEADER_LEN reserved bytes"
    );
    let (head, payload) = buf.split_at_mut(ENVELOPE_HEADER_LEN);
    let digest = sha256(payload);
    let sig = identity.sign(&signed_message(kind, payload.len() as u64, &digest));
    head[0..4].copy_from_slice(&ENVELOPE_MAGIC);
    head[4] = ENVELOPE_VERSION;
    head[5] = kind as u8;
    head[6..8].copy_from_slice(&0u16.to_le_bytes());
    head[8..40].copy_from_slice(identity.signer_key().as_bytes());
    head[40..104].copy_from_slice(&sig);
    head[104..112].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    digest
}

/// A parsed envelope whose signature has not been checked. Its payload is unreachable.
pub struct UnverifiedEnvelope {
    kind: PayloadKind,
    signer: SignerKey,
    signature: [u8; 64],
    bytes: Vec<u8>,
}

impl fmt::Debug for UnverifiedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnverifiedEnvelope")
            .field("kind", &self.kind)
            .field("claimed_signer", &self.signer)
            .field("payload_len", &(self.bytes.len() - ENVELOPE_HEADER_LEN))
            .finish()
    }
}

impl UnverifiedEnvelope {
    /// Parses envelope bytes, taking ownership so the payload is never copied.
    ///
    /// The declared payload length is checked against `max_payload` and against the
    /// bytes present before anything else.
    ///
    /// # Errors
    /// Truncated, oversized or malformed envelopes, and trailing bytes.
    pub fn parse(bytes: Vec<u8>, max_payload: u64) -> Result<Self, EnvelopeError> {
        let mut r = Reader::new(&bytes);
        let magic = r.array::<4>("envelope magic")?;
        if magic != ENVELOPE_MAGIC {
            return Err(EnvelopeError::BadMagic(magic));
        }
        let version = r.u8("envelope version")?;
        if version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(version));
        }
        let kind_byte = r.u8("envelope kind")?;
        let kind = PayloadKind::from_u8(kind_byte).ok_or(EnvelopeError::UnknownKind(kind_byte))?;
        let reserved = r.u16("envelope reserved")?;
        if reserved != 0 {
            return Err(EnvelopeError::Reserved(reserved));
        }
        let signer = SignerKey(r.array::<32>("signer key")?);
        let signature = r.array::<64>("signature")?;
        let len = r.u64("payload length")?;
        if len > max_payload {
            return Err(EnvelopeError::Oversized {
                got: len,
                max: max_payload,
            });
        }
        let available = r.remaining() as u64;
        if len > available {
            return Err(Truncated {
                field: "payload",
                offset: r.offset(),
                needed: usize::try_from(len).unwrap_or(usize::MAX),
                available: r.remaining(),
            }
            .into());
        }
        if available > len {
            return Err(EnvelopeError::TrailingBytes(available - len));
        }
        Ok(Self {
            kind,
            signer,
            signature,
            bytes,
        })
    }

    /// The kind the envelope claims.
    #[must_use]
    pub fn kind(&self) -> PayloadKind {
        self.kind
    }

    /// The key that claims to have signed it (not yet checked).
    #[must_use]
    pub fn claimed_signer(&self) -> SignerKey {
        self.signer
    }

    /// Checks the kind, the policy and the signature, in that order, and opens the payload.
    ///
    /// # Errors
    /// [`EnvelopeError::WrongKind`], [`EnvelopeError::NotAMember`] or
    /// [`EnvelopeError::BadSignature`].
    pub fn verify(
        self,
        expected: PayloadKind,
        policy: &impl SignerPolicy,
    ) -> Result<VerifiedEnvelope, EnvelopeError> {
        if self.kind != expected {
            return Err(EnvelopeError::WrongKind {
                expected,
                got: self.kind,
            });
        }
        if !policy.allows(&self.signer) {
            return Err(EnvelopeError::NotAMember(self.signer));
        }
        let payload = &self.bytes[ENVELOPE_HEADER_LEN..];
        let digest = sha256(payload);
        let msg = signed_message(self.kind, payload.len() as u64, &digest);
        UnparsedPublicKey::new(&ED25519, self.signer.as_bytes())
            .verify(&msg, &self.signature)
            .map_err(|_| EnvelopeError::BadSignature(self.signer))?;
        Ok(VerifiedEnvelope {
            kind: self.kind,
            signer: self.signer,
            digest,
            bytes: self.bytes,
        })
    }
}

/// An envelope whose signature verified against an allowed signer.
pub struct VerifiedEnvelope {
    kind: PayloadKind,
    signer: SignerKey,
    digest: [u8; 32],
    bytes: Vec<u8>,
}

impl fmt::Debug for VerifiedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedEnvelope")
            .field("kind", &self.kind)
            .field("signer", &self.signer)
            .field("payload_len", &self.payload().len())
            .finish()
    }
}

impl VerifiedEnvelope {
    /// The kind.
    #[must_use]
    pub fn kind(&self) -> PayloadKind {
        self.kind
    }
    /// The verified signer.
    #[must_use]
    pub fn signer(&self) -> SignerKey {
        self.signer
    }
    /// SHA-256 of the payload (the content hash of deltas and merge records).
    #[must_use]
    pub fn payload_digest(&self) -> [u8; 32] {
        self.digest
    }
    /// The payload.
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        &self.bytes[ENVELOPE_HEADER_LEN..]
    }
    /// The whole envelope as received, for storing or forwarding.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Takes the whole envelope bytes out.
    #[must_use]
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(b: u8) -> Identity {
        Identity::from_seed([b; 32]).unwrap()
    }

    const MAX: u64 = 1 << 20;

    #[test]
    fn sealed_envelope_verifies_and_opens() {
        let id = ident(1);
        let bytes = seal(&id, PayloadKind::Delta, b"hello");
        assert_eq!(bytes.len(), ENVELOPE_HEADER_LEN + 5);
        let env = UnverifiedEnvelope::parse(bytes.clone(), MAX).unwrap();
        assert_eq!(env.claimed_signer(), id.signer_key());
        let members = MemberKeys::new([id.signer_key()]);
        let v = env.verify(PayloadKind::Delta, &members).unwrap();
        assert_eq!(v.payload(), b"hello");
        assert_eq!(v.signer(), id.signer_key());
        assert_eq!(v.payload_digest(), sha256(b"hello"));
        assert_eq!(v.as_bytes(), &bytes[..]);
    }

    #[test]
    fn sealing_in_place_gives_the_same_bytes() {
        let id = ident(3);
        let mut buf = vec![0u8; ENVELOPE_HEADER_LEN];
        buf.extend_from_slice(b"a large payload");
        let digest = seal_in_place(&id, PayloadKind::Delta, &mut buf);
        let (sealed, d2) = seal_hashed(&id, PayloadKind::Delta, b"a large payload");
        assert_eq!(buf, sealed);
        assert_eq!(digest, d2);
    }

    fn verify(bytes: Vec<u8>, members: &MemberKeys) -> Result<VerifiedEnvelope, EnvelopeError> {
        UnverifiedEnvelope::parse(bytes, MAX)?.verify(PayloadKind::Delta, members)
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let id = ident(1);
        let members = MemberKeys::new([id.signer_key()]);
        let good = seal(&id, PayloadKind::Delta, b"payload bytes");
        for i in ENVELOPE_HEADER_LEN..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x01;
            assert_eq!(
                verify(b, &members).unwrap_err(),
                EnvelopeError::BadSignature(id.signer_key()),
                "flipped payload byte {i}"
            );
        }
    }

    #[test]
    fn tampered_signature_is_rejected() {
        let id = ident(1);
        let members = MemberKeys::new([id.signer_key()]);
        let good = seal(&id, PayloadKind::Delta, b"payload");
        for i in 40..104 {
            let mut b = good.clone();
            b[i] ^= 0x80;
            assert_eq!(
                verify(b, &members).unwrap_err(),
                EnvelopeError::BadSignature(id.signer_key()),
                "flipped signature byte {i}"
            );
        }
    }

    #[test]
    fn wrong_key_is_rejected() {
        let (a, b) = (ident(1), ident(2));
        let mut bytes = seal(&a, PayloadKind::Delta, b"payload");
        // Claim the envelope was signed by b, a member: the signature cannot verify.
        bytes[8..40].copy_from_slice(b.signer_key().as_bytes());
        let members = MemberKeys::new([a.signer_key(), b.signer_key()]);
        assert_eq!(
            verify(bytes, &members).unwrap_err(),
            EnvelopeError::BadSignature(b.signer_key())
        );
        // A valid envelope from a non-member is refused before its signature is checked.
        let outsider = seal(&ident(3), PayloadKind::Delta, b"payload");
        assert_eq!(
            verify(outsider, &members).unwrap_err(),
            EnvelopeError::NotAMember(ident(3).signer_key())
        );
    }

    #[test]
    fn kind_is_bound_by_the_signature() {
        let id = ident(1);
        let members = MemberKeys::new([id.signer_key()]);
        let mut bytes = seal(&id, PayloadKind::MergeRecord, b"record");
        assert!(matches!(
            verify(bytes.clone(), &members),
            Err(EnvelopeError::WrongKind { .. })
        ));
        // Relabelling a merge record as a delta breaks the signature.
        bytes[5] = PayloadKind::Delta as u8;
        assert_eq!(
            verify(bytes, &members).unwrap_err(),
            EnvelopeError::BadSignature(id.signer_key())
        );
    }

    #[test]
    fn truncated_envelopes_are_rejected() {
        let id = ident(1);
        let good = seal(&id, PayloadKind::Delta, b"some payload");
        for cut in 0..good.len() {
            let err = UnverifiedEnvelope::parse(good[..cut].to_vec(), MAX).unwrap_err();
            assert!(
                matches!(err, EnvelopeError::Truncated(_)),
                "cut at {cut}: {err}"
            );
        }
        let mut extra = good;
        extra.push(0);
        assert_eq!(
            UnverifiedEnvelope::parse(extra, MAX).unwrap_err(),
            EnvelopeError::TrailingBytes(1)
        );
    }

    #[test]
    fn oversized_envelopes_are_rejected_from_the_header() {
        let id = ident(1);
        let good = seal(&id, PayloadKind::Delta, &[7u8; 100]);
        assert_eq!(
            UnverifiedEnvelope::parse(good.clone(), 99).unwrap_err(),
            EnvelopeError::Oversized { got: 100, max: 99 }
        );
        // A header declaring an enormous payload is refused without reading further.
        let mut header = good[..ENVELOPE_HEADER_LEN].to_vec();
        header[104..112].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            UnverifiedEnvelope::parse(header, MAX).unwrap_err(),
            EnvelopeError::Oversized { .. }
        ));
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let id = ident(1);
        let good = seal(&id, PayloadKind::Delta, b"x");
        let cases: [(usize, u8); 4] = [(0, b'X'), (4, 2), (5, 99), (6, 1)];
        for (at, v) in cases {
            let mut b = good.clone();
            b[at] = v;
            assert!(
                UnverifiedEnvelope::parse(b, MAX).is_err(),
                "byte {at} = {v}"
            );
        }
    }

    #[test]
    fn signed_message_is_domain_separated() {
        let msg = signed_message(PayloadKind::Delta, 3, &sha256(b"abc"));
        assert!(msg.starts_with(b"cellswarm/envelope/v1\0"));
        assert_eq!(msg.len(), SIGNING_DOMAIN.len() + 1 + 8 + 32);
    }
}
