//! Versioned wire messages.
//!
//! Two kinds of bytes cross the network:
//!
//! - **Control messages** ([`Announcement`], [`MergeRecord`], [`Request`],
//!   [`ResponseHeader`], [`DeltaHeader`]): a `u16` little-endian wire version, then the
//!   message in bincode 2.0.1's standard configuration (varint integers, little-endian)
//!   through serde. Decoding checks the size against [`CONTROL_LIMIT`] first, passes the
//!   same limit to bincode so no allocation can exceed it, and refuses trailing bytes.
//!   bincode is used only in this module, so a later switch touches one file.
//! - **Tensor payloads**: models in the canonical layout of [`crate::weights`] and deltas
//!   in the layout of [`crate::delta`], raw little-endian values behind a length-prefixed
//!   header. These are the bytes that are hashed and signed.
//!
//! A message that carries both (a delta message, a response) is a **frame**:
//!
//! ```text
//! header_len u32 LE | header (a control message, as above) | body (raw bytes)
//! ```
//!
//! See `docs/wire-format.md` for every layout.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::bytes::{Reader, Truncated};
use crate::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};

/// Version of the control-message encoding.
pub const WIRE_VERSION: u16 = 1;
/// Largest control message (header) accepted, in bytes.
pub const CONTROL_LIMIT: usize = 1 << 20;

/// What went wrong encoding or decoding a wire message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended early.
    #[error(transparent)]
    Truncated(#[from] Truncated),
    /// A control message larger than [`CONTROL_LIMIT`].
    #[error("control message of {got} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Its size.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A wire version this build does not speak.
    #[error("unsupported wire version {0} (this build speaks version {WIRE_VERSION})")]
    UnsupportedVersion(u16),
    /// bincode refused the bytes.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// Bytes after the message.
    #[error("{0} unexpected bytes after the control message")]
    TrailingBytes(usize),
    /// A sync-stream message whose length prefix is over the limit.
    #[error("{what} of {got} bytes exceeds the limit of {max}")]
    StreamTooLarge {
        /// `request` or `response`.
        what: &'static str,
        /// The declared length.
        got: u64,
        /// The limit.
        max: u64,
    },
}

/// Encodes a control message: wire version, then bincode.
///
/// # Errors
/// [`WireError::TooLarge`] if the encoding exceeds [`CONTROL_LIMIT`].
pub fn encode_control<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut out = WIRE_VERSION.to_le_bytes().to_vec();
    let body = bincode::serde::encode_to_vec(msg, bincode::config::standard())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    out.extend_from_slice(&body);
    if out.len() > CONTROL_LIMIT {
        return Err(WireError::TooLarge {
            got: out.len(),
            max: CONTROL_LIMIT,
        });
    }
    Ok(out)
}

/// Decodes a control message from untrusted bytes.
///
/// # Errors
/// Oversize input, another wire version, malformed bincode or trailing bytes.
pub fn decode_control<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > CONTROL_LIMIT {
        return Err(WireError::TooLarge {
            got: bytes.len(),
            max: CONTROL_LIMIT,
        });
    }
    let mut r = Reader::new(bytes);
    let version = r.u16("wire version")?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let body = r.rest();
    let config = bincode::config::standard().with_limit::<CONTROL_LIMIT>();
    let (msg, used) = bincode::serde::decode_from_slice::<T, _>(body, config)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(WireError::TrailingBytes(body.len() - used));
    }
    Ok(msg)
}

/// Builds a frame: `header_len u32 | control header | body`.
///
/// # Errors
/// As [`encode_control`].
pub fn encode_frame<T: Serialize>(header: &T, body: &[u8]) -> Result<Vec<u8>, WireError> {
    let head = encode_control(header)?;
    let mut out = Vec::with_capacity(4 + head.len() + body.len());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    Ok(out)
}

/// Splits a frame into its decoded header and its body (borrowed, not copied).
///
/// # Errors
/// A header length beyond [`CONTROL_LIMIT`] or the input, or a bad header.
pub fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8]), WireError> {
    let mut r = Reader::new(bytes);
    let len = r.u32("frame header length")? as usize;
    if len > CONTROL_LIMIT {
        return Err(WireError::TooLarge {
            got: len,
            max: CONTROL_LIMIT,
        });
    }
    let head = r.take(len, "frame header")?;
    Ok((decode_control(head)?, r.rest()))
}

/// The frame header length a frame of `frame_len` bytes declares in its first four
/// bytes, if within [`CONTROL_LIMIT`] and the frame (read before the header is).
///
/// # Errors
/// [`WireError::TooLarge`], or [`WireError::StreamTooLarge`] for a header longer than
/// the frame.
pub fn frame_head_len(prefix: [u8; 4], frame_len: usize) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > CONTROL_LIMIT {
        return Err(WireError::TooLarge {
            got: len,
            max: CONTROL_LIMIT,
        });
    }
    if len.saturating_add(4) > frame_len {
        return Err(WireError::StreamTooLarge {
            what: "frame header",
            got: len as u64,
            max: frame_len.saturating_sub(4) as u64,
        });
    }
    Ok(len)
}

/// Largest request accepted on a sync stream, in bytes.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// The length a sync request's `u32 LE` prefix declares, if within [`MAX_REQUEST_BYTES`].
///
/// # Errors
/// [`WireError::StreamTooLarge`] (checked before anything is allocated).
pub fn request_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u64::from(u32::from_le_bytes(prefix));
    if len > MAX_REQUEST_BYTES {
        return Err(WireError::StreamTooLarge {
            what: "request",
            got: len,
            max: MAX_REQUEST_BYTES,
        });
    }
    Ok(len as usize)
}

/// The length a sync response's `u64 LE` prefix declares, if within `max`
/// (`net.max_message_bytes`).
///
/// # Errors
/// [`WireError::StreamTooLarge`] (checked before anything is allocated).
pub fn response_len(prefix: [u8; 8], max: u64) -> Result<usize, WireError> {
    let len = u64::from_le_bytes(prefix);
    match usize::try_from(len) {
        Ok(n) if len <= max => Ok(n),
        _ => Err(WireError::StreamTooLarge {
            what: "response",
            got: len,
            max,
        }),
    }
}

/// Decodes a whole request stream as it arrives (`len u32 LE | control message`), the
/// way the sync codec reads it.
///
/// # Errors
/// A length over the limit, a stream that ends early or goes on, a bad request.
pub fn decode_request_stream(bytes: &[u8]) -> Result<Request, WireError> {
    let mut r = Reader::new(bytes);
    let len = request_len(r.array("request length")?)?;
    let body = r.take(len, "request")?;
    let rest = r.rest();
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    decode_control(body)
}

/// Decodes a whole response stream as it arrives (`len u64 LE | frame`), the way the
/// sync codec reads it.
///
/// # Errors
/// A length over `max`, a stream that ends early or goes on, a bad frame.
pub fn decode_response_stream(
    bytes: &[u8],
    max: u64,
) -> Result<(ResponseHeader, &[u8]), WireError> {
    let mut r = Reader::new(bytes);
    let len = response_len(r.array("response length")?, max)?;
    let frame = r.take(len, "response")?;
    let rest = r.rest();
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    decode_frame(frame)
}

/// Deserializes a sequence without trusting its declared length for preallocation.
///
/// serde's own `Vec` visitor reserves up to 1 MiB from the declared length alone, so a
/// 300-byte message could make the node allocate 1 MiB. Growing the vector as elements
/// actually decode keeps every allocation within about twice the bytes received.
///
/// # Errors
/// As the element's deserializer.
pub fn grown_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(Grow::<T>(usize::MAX, std::marker::PhantomData))
}

/// Grows a sequence as its elements decode, refusing more than `.0` of them.
struct Grow<T>(usize, std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Grow<T> {
    type Value = Vec<T>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a sequence of at most {} elements", self.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(x) = seq.next_element()? {
            if out.len() == self.0 {
                return Err(serde::de::Error::custom(format!(
                    "more than {} elements",
                    self.0
                )));
            }
            out.push(x);
        }
        Ok(out)
    }
}

/// Most attestations one response carries (one per member; no consortium has more).
pub const MAX_ATTESTATIONS: usize = 4096;

/// Like [`grown_vec`], refusing more than [`MAX_ATTESTATIONS`] elements, so that a
/// response of empty entries cannot make the reader hold millions of them.
///
/// # Errors
/// A malformed sequence, or too many elements.
pub fn attestation_list<'de, D>(d: D) -> Result<Vec<Vec<u8>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    d.deserialize_seq(Grow::<Vec<u8>>(MAX_ATTESTATIONS, std::marker::PhantomData))
}

/// What a member reports about its local training with its delta.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct LocalMetrics {
    /// Mean training loss over the round's steps.
    pub train_loss: f32,
    /// F1 at IoU 0.5 on the site's held-out frames, if measured.
    pub val_f1: Option<f32>,
    /// Optimiser steps taken.
    pub steps: u32,
    /// Local-DP epsilon spent so far, if local DP is on.
    pub epsilon: Option<f64>,
}

/// Header of a delta message (the payload of a [`PayloadKind::Delta`] envelope is
/// a frame of this header and an encoded [`crate::delta::Delta`]).
///
/// [`PayloadKind::Delta`]: crate::envelope::PayloadKind::Delta
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DeltaHeader {
    /// [`crate::config::ConsortiumConfig::agreement_digest`] of the sender.
    pub consortium: [u8; 32],
    /// The round the delta is for.
    pub round: RoundId,
    /// Hash of the model M(r-1) it was trained from.
    pub base: ModelHash,
    /// Training samples (patches) seen, the FedAvg weight.
    pub sample_count: u64,
    /// Local metrics.
    pub metrics: LocalMetrics,
    /// Whether the values are secure-aggregation masked (the body is then `P` wrapping
    /// `u32` words, little-endian, instead of an encoded delta).
    pub masked: bool,
    /// The masking epoch of the round (0, then one more per restart); 0 when not masked.
    pub mask_epoch: u32,
}

/// A secure-aggregation message, gossiped in a [`PayloadKind::KeyShare`] envelope signed
/// by the member's identity key.
///
/// [`PayloadKind::KeyShare`]: crate::envelope::PayloadKind::KeyShare
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaskMessage {
    /// The sender's X25519 public keys for one masking epoch of a round: one fresh key for
    /// each other member (ring's ephemeral keys agree once each).
    Keys {
        /// [`crate::config::ConsortiumConfig::agreement_digest`] of the sender.
        consortium: [u8; 32],
        /// The round.
        round: RoundId,
        /// The masking epoch.
        epoch: u32,
        /// For each other member, the public key to agree with.
        #[serde(deserialize_with = "grown_vec")]
        keys: Vec<(SignerKey, [u8; 32])>,
    },
    /// The round restarts its masking without the members that did not deliver: a new
    /// epoch with fresh keys among `participants`.
    Restart {
        /// [`crate::config::ConsortiumConfig::agreement_digest`] of the sender.
        consortium: [u8; 32],
        /// The round.
        round: RoundId,
        /// The new epoch.
        epoch: u32,
        /// Who takes part in the new epoch (sorted).
        #[serde(deserialize_with = "grown_vec")]
        participants: Vec<SignerKey>,
    },
    /// The merger's statement that an epoch is complete: every participant's masked delta,
    /// by hash. Only for a sealed epoch does a participant reveal its self-mask seed.
    Seal {
        /// [`crate::config::ConsortiumConfig::agreement_digest`] of the sender.
        consortium: [u8; 32],
        /// The round.
        round: RoundId,
        /// The epoch sealed.
        epoch: u32,
        /// Every participant and the hash of its masked delta (sorted by signer).
        #[serde(deserialize_with = "grown_vec")]
        deltas: Vec<(SignerKey, DeltaHash)>,
    },
    /// A participant's answer to a sealed epoch (double masking: without every
    /// participant's seed the epoch's sum stays masked): its own self-mask seed, and its
    /// share of every other listed participant's seed, so that a participant that dropped
    /// out after its delta was sealed does not hold the epoch up. A member answers at most
    /// one epoch per round.
    Reveal {
        /// [`crate::config::ConsortiumConfig::agreement_digest`] of the sender.
        consortium: [u8; 32],
        /// The round.
        round: RoundId,
        /// The epoch.
        epoch: u32,
        /// The seed of the sender's self-mask in that epoch.
        seed: [u8; 32],
        /// For other participants of the seal, the sender's share (its y bytes; the x
        /// coordinate is the sender's place among the participants) of their seeds.
        #[serde(deserialize_with = "grown_vec")]
        shares: Vec<(SignerKey, [u8; 32])>,
    },
    /// A participant's self-mask seed of an epoch, split into Shamir shares: its public
    /// commitment, and each other participant's share sealed for that participant alone
    /// (ChaCha20-Poly1305 under a key derived from their pair secret).
    Shares {
        /// [`crate::config::ConsortiumConfig::agreement_digest`] of the sender.
        consortium: [u8; 32],
        /// The round.
        round: RoundId,
        /// The epoch.
        epoch: u32,
        /// SHA-256 commitment to the seed (secagg `seed_commitment`).
        commitment: [u8; 32],
        /// For each other participant: the sealed 32-byte share and its 16-byte tag.
        #[serde(deserialize_with = "grown_vec")]
        boxes: Vec<(SignerKey, [u8; 32], [u8; 16])>,
    },
}

/// A small signed gossip message ([`PayloadKind::Announcement`]).
///
/// [`PayloadKind::Announcement`]: crate::envelope::PayloadKind::Announcement
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Announcement {
    /// A member has a delta for `round`; fetch it with [`Request::Delta`].
    DeltaReady {
        /// The round.
        round: RoundId,
        /// Its base model.
        base: ModelHash,
        /// SHA-256 of the delta envelope's payload.
        delta: DeltaHash,
        /// Size of the envelope in bytes.
        bytes: u64,
    },
    /// A merger has published a merge record; fetch it with [`Request::Record`].
    MergeReady {
        /// The round.
        round: RoundId,
        /// SHA-256 of the record envelope's payload.
        record: RecordHash,
        /// The merged model's hash.
        model: ModelHash,
    },
    /// A member's current position, sent when it (re)joins and periodically.
    Heartbeat {
        /// The round it is in.
        round: RoundId,
        /// The model it starts that round from.
        model: ModelHash,
    },
    /// A member's attestation: it checked the record of `round` (recomputed its merge, or
    /// made it) and committed it. Enough of them, from distinct members, make a commit
    /// certificate, which lets a node adopt a record it cannot recompute itself.
    Committed {
        /// The round.
        round: RoundId,
        /// The committed record's hash.
        record: RecordHash,
        /// The model it gives.
        model: ModelHash,
        /// The aggregator state after it.
        state: [u8; 32],
    },
}

/// One member's delta included in a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub struct Contribution {
    /// The member's signing key.
    pub signer: SignerKey,
    /// SHA-256 of its delta envelope's payload.
    pub delta: DeltaHash,
    /// Its sample count.
    pub sample_count: u64,
}

/// The merger's signed account of a round ([`PayloadKind::MergeRecord`]).
///
/// [`PayloadKind::MergeRecord`]: crate::envelope::PayloadKind::MergeRecord
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecord {
    /// Agreement digest of the consortium configuration.
    pub consortium: [u8; 32],
    /// The round merged.
    pub round: RoundId,
    /// Hash of M(r-1).
    pub base: ModelHash,
    /// The previous round's outcome: a hash of its round, model and aggregator state
    /// (`cellswarm_round::link`; none for round 1).
    pub prev: Option<RecordHash>,
    /// The strategy's config name.
    pub strategy: String,
    /// Included deltas, sorted by signer.
    #[serde(deserialize_with = "grown_vec")]
    pub contributions: Vec<Contribution>,
    /// Hash of M(r).
    pub model: ModelHash,
    /// SHA-256 of the aggregator state after the merge (optimiser moments, DP
    /// accountant), so a rejoining member can fetch and check it.
    pub state: [u8; 32],
    /// Which merger candidate (0 = first choice) produced the record.
    pub attempt: u32,
}

/// A request over the sync protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A delta envelope by hash.
    Delta(DeltaHash),
    /// A model's canonical bytes by hash.
    Model(ModelHash),
    /// The merge record envelope of a round.
    Record(RoundId),
    /// The newest merge record the peer holds.
    Latest,
    /// Aggregator state bytes by hash.
    State([u8; 32]),
    /// The deltas the peer holds for a round (signer and hash of each).
    Deltas(RoundId),
    /// The attestations (signed [`Announcement::Committed`] envelopes) the peer holds for
    /// a round.
    Attestations(RoundId),
}

/// Header of a response frame; the body carries the bytes named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseHeader {
    /// Body: a delta envelope.
    Delta,
    /// Body: canonical model bytes.
    Model,
    /// Body: a merge-record envelope.
    Record,
    /// Body: aggregator state bytes.
    State,
    /// No body: the deltas held for the round asked about.
    DeltaList(#[serde(deserialize_with = "grown_vec")] Vec<(SignerKey, DeltaHash)>),
    /// The peer does not have it.
    NotFound,
    /// The peer refuses (the reason is for logs).
    Refused(String),
    /// No body: attestation envelopes of the round asked about (at most one per member).
    Attestations(#[serde(deserialize_with = "attestation_list")] Vec<Vec<u8>>),
}

impl ResponseHeader {
    /// The header's kind, for messages.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Delta => "Delta",
            Self::Model => "Model",
            Self::Record => "Record",
            Self::State => "State",
            Self::DeltaList(_) => "DeltaList",
            Self::NotFound => "NotFound",
            Self::Refused(_) => "Refused",
            Self::Attestations(_) => "Attestations",
        }
    }

    /// The most body bytes a response with this header may carry under a transport
    /// limit of `transport` bytes: a merge-record envelope is a control message (at most
    /// [`CONTROL_LIMIT`] plus its envelope header), a header-only answer carries none,
    /// and deltas, models and states are bounded by the transport (each is checked
    /// against its own limits when decoded). A peer asked for a record cannot make a node
    /// read a model-sized body.
    #[must_use]
    pub fn body_limit(&self, transport: u64) -> u64 {
        let limit = match self {
            Self::Delta | Self::Model | Self::State => transport,
            Self::Record => (CONTROL_LIMIT + crate::envelope::ENVELOPE_HEADER_LEN) as u64,
            Self::DeltaList(_) | Self::NotFound | Self::Refused(_) | Self::Attestations(_) => 0,
        };
        limit.min(transport)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> MergeRecord {
        MergeRecord {
            consortium: [7; 32],
            round: RoundId(3),
            base: ModelHash::of(b"m2"),
            prev: Some(RecordHash::of(b"r2")),
            strategy: "fedavg".into(),
            contributions: vec![Contribution {
                signer: SignerKey([1; 32]),
                delta: DeltaHash::of(b"d"),
                sample_count: 64,
            }],
            model: ModelHash::of(b"m3"),
            state: [5; 32],
            attempt: 0,
        }
    }

    #[test]
    fn control_messages_round_trip() {
        let r = record();
        assert_eq!(
            decode_control::<MergeRecord>(&encode_control(&r).unwrap()).unwrap(),
            r
        );
        for a in [
            Announcement::DeltaReady {
                round: RoundId(1),
                base: ModelHash::of(b"a"),
                delta: DeltaHash::of(b"b"),
                bytes: 99,
            },
            Announcement::Heartbeat {
                round: RoundId(2),
                model: ModelHash::of(b"c"),
            },
            Announcement::Committed {
                round: RoundId(3),
                record: RecordHash::of(b"r"),
                model: ModelHash::of(b"d"),
                state: [5; 32],
            },
        ] {
            assert_eq!(
                decode_control::<Announcement>(&encode_control(&a).unwrap()).unwrap(),
                a
            );
        }
        for q in [
            Request::Latest,
            Request::Record(RoundId(5)),
            Request::Model(ModelHash::of(b"x")),
            Request::Attestations(RoundId(4)),
        ] {
            assert_eq!(
                decode_control::<Request>(&encode_control(&q).unwrap()).unwrap(),
                q
            );
        }
        let h = ResponseHeader::Attestations(vec![vec![1, 2, 3], vec![4]]);
        assert_eq!(
            decode_control::<ResponseHeader>(&encode_control(&h).unwrap()).unwrap(),
            h
        );
        let many = ResponseHeader::Attestations(vec![Vec::new(); MAX_ATTESTATIONS + 1]);
        assert!(decode_control::<ResponseHeader>(&encode_control(&many).unwrap()).is_err());
    }

    #[test]
    fn frame_headers_are_bounded_before_they_are_read() {
        let frame = encode_frame(&7u32, b"body").unwrap();
        let prefix: [u8; 4] = frame[..4].try_into().unwrap();
        let head = frame_head_len(prefix, frame.len()).unwrap();
        assert_eq!(&frame[4 + head..], b"body");
        // Longer than the frame, or than any control message: refused.
        assert!(frame_head_len(prefix, 4 + head - 1).is_err());
        assert!(frame_head_len((CONTROL_LIMIT as u32 + 1).to_le_bytes(), usize::MAX).is_err());
        assert!(frame_head_len(u32::MAX.to_le_bytes(), 3).is_err());
    }

    #[test]
    fn control_messages_are_versioned() {
        let mut b = encode_control(&Request::Latest).unwrap();
        assert_eq!(&b[..2], &WIRE_VERSION.to_le_bytes());
        b[0] = 2;
        assert_eq!(
            decode_control::<Request>(&b),
            Err(WireError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn control_decoding_rejects_trailing_oversize_and_garbage() {
        let mut b = encode_control(&Request::Latest).unwrap();
        b.push(0);
        assert_eq!(
            decode_control::<Request>(&b),
            Err(WireError::TrailingBytes(1))
        );
        let huge = vec![0u8; CONTROL_LIMIT + 1];
        assert!(matches!(
            decode_control::<Request>(&huge),
            Err(WireError::TooLarge { .. })
        ));
        // A record claiming 2^60 contributions: bincode's limit stops the allocation.
        // bincode writes structs as their fields in order, so this tuple is a record
        // prefix whose contribution list claims 2^60 entries.
        let r = record();
        let lie = encode_control(&(
            r.consortium,
            r.round,
            r.base,
            r.prev,
            r.strategy,
            1u64 << 60,
        ))
        .unwrap();
        assert!(matches!(
            decode_control::<MergeRecord>(&lie),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode_control::<MergeRecord>(&[1, 0]),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn frames_split_header_and_body() {
        let h = DeltaHeader {
            consortium: [0; 32],
            round: RoundId(4),
            base: ModelHash::of(b"b"),
            sample_count: 10,
            metrics: LocalMetrics {
                train_loss: 0.5,
                val_f1: Some(0.9),
                steps: 20,
                epsilon: None,
            },
            masked: false,
            mask_epoch: 0,
        };
        let f = encode_frame(&h, b"tensor bytes").unwrap();
        let (back, body): (DeltaHeader, &[u8]) = decode_frame(&f).unwrap();
        assert_eq!(back, h);
        assert_eq!(body, b"tensor bytes");
        let mut lie = f.clone();
        lie[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame::<DeltaHeader>(&lie),
            Err(WireError::TooLarge { .. })
        ));
        lie[..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            decode_frame::<DeltaHeader>(&lie),
            Err(WireError::Truncated(_))
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_control::<MergeRecord>(&bytes);
            let _ = decode_control::<Announcement>(&bytes);
            let _ = decode_control::<Request>(&bytes);
            let _ = decode_frame::<DeltaHeader>(&bytes);
            let _ = decode_frame::<ResponseHeader>(&bytes);
        }
    }
}
