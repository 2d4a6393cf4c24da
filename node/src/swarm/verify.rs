//! The checks every byte from a peer goes through before the engine acts on it, as pure
//! functions of the bytes and the node's current view (no I/O), so that the mutation
//! test and the fuzz targets drive exactly the code the engine runs.
//!
//! Each check returns the first reason to refuse, as a [`Rejection`] (reason and detail),
//! and never panics on any input.

use std::collections::HashSet;
use std::sync::Arc;

use cellswarm_aggregator::Update;
use cellswarm_common::delta::{Delta, DeltaError, DeltaLimits};
use cellswarm_common::envelope::{EnvelopeError, MemberKeys, PayloadKind, UnverifiedEnvelope};
use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};
use cellswarm_common::weights::Layout;
use cellswarm_common::wire::{
    Announcement, DeltaHeader, MaskMessage, MergeRecord, decode_control, decode_frame,
};

use super::status::RejectReason;

/// Why bytes were refused, and the detail logged with it.
pub type Rejection = (RejectReason, String);

/// Largest merge-record envelope accepted (records list one contribution per member).
pub const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Maps an envelope error to its rejection reason.
#[must_use]
pub fn envelope_rejection(e: EnvelopeError) -> Rejection {
    let reason = match e {
        EnvelopeError::Oversized { .. } => RejectReason::Oversize,
        EnvelopeError::NotAMember(_) => RejectReason::NotMember,
        EnvelopeError::BadSignature(_) => RejectReason::BadSignature,
        _ => RejectReason::Malformed,
    };
    (reason, e.to_string())
}

/// What a delta of the current round must agree with.
#[derive(Debug)]
pub struct DeltaCheck<'a> {
    /// The consortium's members.
    pub members: &'a MemberKeys,
    /// The consortium agreement digest.
    pub consortium: [u8; 32],
    /// The round being collected.
    pub round: RoundId,
    /// The model the round starts from.
    pub base: ModelHash,
    /// The model's layout.
    pub layout: &'a Arc<Layout>,
    /// Size limits (checked before allocating).
    pub limits: &'a DeltaLimits,
    /// `aggregation.max_update_norm`.
    pub max_norm: f64,
    /// Deltas merged in earlier rounds (replays).
    pub merged: &'a HashSet<DeltaHash>,
    /// `aggregation.secure_aggregation`: masked deltas only (else plain ones only).
    pub secure_aggregation: bool,
}

/// A verified delta: a plain update, or a masked one (secure aggregation).
#[derive(Debug, Clone)]
pub enum Checked {
    /// A decoded update, checked for shapes, finiteness and norm.
    Plain(Update),
    /// Masked fixed-point words (their norm cannot be checked: only the sum is visible).
    Masked {
        /// `P` wrapping words.
        words: Arc<Vec<u32>>,
        /// The masking epoch.
        epoch: u32,
        /// The sender's sample count.
        samples: u64,
    },
}

impl DeltaCheck<'_> {
    /// Verifies a delta envelope announced as `announced` and decodes it into an update.
    ///
    /// # Errors
    /// The first rule the bytes break: size, envelope, signature, membership, announced
    /// hash, replay, consortium, round, base, masking, shapes, finiteness, norm.
    pub fn check(
        &self,
        announced: DeltaHash,
        envelope: Vec<u8>,
    ) -> Result<(SignerKey, Checked), Rejection> {
        let env = UnverifiedEnvelope::parse(envelope, self.limits.max_bytes)
            .map_err(envelope_rejection)?;
        let v = env
            .verify(PayloadKind::Delta, self.members)
            .map_err(envelope_rejection)?;
        let hash = DeltaHash(v.payload_digest());
        if hash != announced {
            return Err((
                RejectReason::HashMismatch,
                "payload does not hash to the announced hash".into(),
            ));
        }
        if self.merged.contains(&hash) {
            return Err((
                RejectReason::Replayed,
                "this delta was merged in an earlier round".into(),
            ));
        }
        let (header, body): (DeltaHeader, &[u8]) =
            decode_frame(v.payload()).map_err(|e| (RejectReason::Malformed, e.to_string()))?;
        if header.consortium != self.consortium {
            return Err((
                RejectReason::WrongConsortium,
                "sent by a member with another consortium file".into(),
            ));
        }
        if header.round != self.round {
            return Err((
                RejectReason::WrongRound,
                format!(
                    "delta for round {}, this round is {}",
                    header.round, self.round
                ),
            ));
        }
        if header.base != self.base {
            return Err((
                RejectReason::WrongBase,
                format!(
                    "trained from {}, this round starts from {}",
                    header.base.short(),
                    self.base.short()
                ),
            ));
        }
        if header.masked != self.secure_aggregation {
            return Err((
                RejectReason::Malformed,
                if header.masked {
                    "masked delta but secure aggregation is off".into()
                } else {
                    "unmasked delta but the consortium uses secure aggregation".into()
                },
            ));
        }
        if header.masked {
            let words = super::secagg::words_from_bytes(body, self.layout.total())
                .map_err(|e| (RejectReason::WrongShape, e.to_string()))?;
            return Ok((
                v.signer(),
                Checked::Masked {
                    words: Arc::new(words),
                    epoch: header.mask_epoch,
                    samples: header.sample_count.max(1),
                },
            ));
        }
        // The verified envelope is handed over: an f32 delta is read in place (no copy).
        let at = body.as_ptr() as usize - v.as_bytes().as_ptr() as usize;
        let body = at..at + body.len();
        let (sample_count, signer) = (header.sample_count, v.signer());
        let delta = Delta::decode_owned(v.into_bytes(), body, self.layout, self.limits).map_err(
            |e| match e {
                DeltaError::NonFinite { .. } => (RejectReason::NonFinite, e.to_string()),
                DeltaError::Layout(_) => (RejectReason::WrongShape, e.to_string()),
                DeltaError::TooLarge { .. } => (RejectReason::Oversize, e.to_string()),
                _ => (RejectReason::Malformed, e.to_string()),
            },
        )?;
        let update = Update::new(signer, hash, self.base, sample_count.max(1), delta);
        if update.norm() > self.max_norm {
            return Err((
                RejectReason::NormTooLarge,
                format!(
                    "L2 norm {:.4} exceeds max_update_norm {}",
                    update.norm(),
                    self.max_norm
                ),
            ));
        }
        Ok((signer, Checked::Plain(update)))
    }
}

/// A verified gossip message.
#[derive(Debug, Clone)]
pub enum Gossip {
    /// A round announcement.
    Announcement(Announcement),
    /// An attestation (`Announcement::Committed`), with its signed envelope to keep.
    Attestation(Announcement, Vec<u8>),
    /// A secure-aggregation message of this consortium.
    Mask(MaskMessage),
}

/// Verifies a gossip message of at most `max_bytes` (an announcement, or a
/// secure-aggregation key share) and decodes it.
///
/// # Errors
/// Size, envelope, signature, membership, another kind, an undecodable message, or a
/// key share of another consortium.
pub fn gossip(
    bytes: Vec<u8>,
    max_bytes: u64,
    members: &MemberKeys,
    consortium: [u8; 32],
) -> Result<(SignerKey, Gossip), Rejection> {
    let env = UnverifiedEnvelope::parse(bytes, max_bytes)
        .map_err(|e| (RejectReason::Malformed, e.to_string()))?;
    if env.kind() != PayloadKind::KeyShare {
        let v = env
            .verify(PayloadKind::Announcement, members)
            .map_err(envelope_rejection)?;
        let a = decode_control::<Announcement>(v.payload()).map_err(|e| {
            (
                RejectReason::Malformed,
                format!("undecodable announcement: {e}"),
            )
        })?;
        let signer = v.signer();
        if matches!(a, Announcement::Committed { .. }) {
            return Ok((signer, Gossip::Attestation(a, v.into_bytes())));
        }
        return Ok((signer, Gossip::Announcement(a)));
    }
    let v = env
        .verify(PayloadKind::KeyShare, members)
        .map_err(envelope_rejection)?;
    let m = decode_control::<MaskMessage>(v.payload()).map_err(|e| {
        (
            RejectReason::Malformed,
            format!("undecodable key share: {e}"),
        )
    })?;
    let (MaskMessage::Keys { consortium: c, .. }
    | MaskMessage::Restart { consortium: c, .. }
    | MaskMessage::Seal { consortium: c, .. }
    | MaskMessage::Reveal { consortium: c, .. }
    | MaskMessage::Shares { consortium: c, .. }) = &m;
    if *c != consortium {
        return Err((
            RejectReason::WrongConsortium,
            "key share from another consortium configuration".into(),
        ));
    }
    Ok((v.signer(), Gossip::Mask(m)))
}

/// A verified merge record: the record, its hash, its signer and the envelope bytes.
pub type CheckedRecord = (MergeRecord, RecordHash, SignerKey, Vec<u8>);

/// A member's attestation (`Announcement::Committed`) from its signed envelope; `None`
/// for anything else or anything that does not verify.
#[must_use]
pub fn attestation(
    envelope: Vec<u8>,
    members: &MemberKeys,
) -> Option<cellswarm_round::Attestation> {
    let v = UnverifiedEnvelope::parse(envelope, MAX_ATTESTATION_BYTES)
        .ok()?
        .verify(PayloadKind::Announcement, members)
        .ok()?;
    match decode_control::<Announcement>(v.payload()).ok()? {
        Announcement::Committed {
            round,
            record,
            model,
            state,
        } => Some(cellswarm_round::Attestation {
            signer: v.signer(),
            round,
            record,
            model,
            state,
        }),
        _ => None,
    }
}

/// Largest attestation envelope accepted.
pub const MAX_ATTESTATION_BYTES: u64 = 4096;

/// Verifies a merge-record envelope of this consortium and decodes it.
///
/// # Errors
/// Size, envelope, signature, membership, an undecodable record, another consortium.
pub fn record(
    envelope: Vec<u8>,
    members: &MemberKeys,
    consortium: [u8; 32],
) -> Result<CheckedRecord, Rejection> {
    let env = UnverifiedEnvelope::parse(envelope, MAX_RECORD_BYTES).map_err(envelope_rejection)?;
    let v = env
        .verify(PayloadKind::MergeRecord, members)
        .map_err(envelope_rejection)?;
    let record: MergeRecord =
        decode_control(v.payload()).map_err(|e| (RejectReason::Malformed, e.to_string()))?;
    if record.consortium != consortium {
        return Err((
            RejectReason::WrongConsortium,
            "record from another consortium configuration".into(),
        ));
    }
    Ok((
        record,
        RecordHash(v.payload_digest()),
        v.signer(),
        v.into_bytes(),
    ))
}
