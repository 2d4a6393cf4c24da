//! Records a node keeps in its store's metadata database (sled): the head of the chain,
//! audit-log entries and peer records, in bincode 2.0.1's standard configuration.
//!
//! They live here, beside the other decoders of untrusted bytes, so that the fuzz
//! targets reach them without the node's dependencies. A stolen or damaged disk is an
//! input like any other: decoding is bounded by [`RECORD_LIMIT`] and refuses trailing
//! bytes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};

/// Largest metadata record decoded, in bytes.
pub const RECORD_LIMIT: usize = 1 << 20;

/// The newest accepted round: the head of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The last merged round (0: only the genesis model).
    pub round: RoundId,
    /// Its merge record (none for round 0).
    pub record: Option<RecordHash>,
    /// The model M(round).
    pub model: ModelHash,
    /// The aggregator state after that merge.
    pub state: [u8; 32],
}

/// One line of the audit log: `signer` contributed `delta` to `round`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// The round.
    pub round: RoundId,
    /// The contributing member.
    pub signer: SignerKey,
    /// Its delta.
    pub delta: DeltaHash,
    /// Its sample count.
    pub sample_count: u64,
}

/// A peer record: addresses (or, for the node's own deltas, the hash and markers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerRecord(#[serde(deserialize_with = "crate::wire::grown_vec")] pub Vec<String>);

/// This node's own delta of a round, kept durably before it is announced. After a crash
/// the node announces it again rather than train a second one (one delta per member per
/// round); under secure aggregation the self-mask seed it masked with answers that
/// epoch's seal; under local differential privacy these records are the ledger of what
/// was released, so a restart cannot forget privacy already spent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OwnDelta {
    /// The round.
    pub round: RoundId,
    /// The delta (its envelope is in the store's delta blobs).
    pub delta: DeltaHash,
    /// Under secure aggregation: the masking epoch and the self-mask seed.
    pub self_seed: Option<(u32, [u8; 32])>,
    /// Under local DP: the noise multiplier it was released with.
    pub local_dp_noise: Option<f64>,
}

/// The one masking epoch this node answered (revealed its self-mask seed and seed shares
/// for) in a round: recorded before the answer is sent, so that a restarted node never
/// answers a second epoch of the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answered {
    /// The round.
    pub round: RoundId,
    /// The epoch.
    pub epoch: u32,
}

/// A metadata record that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecordError(pub String);

/// Encodes a metadata record.
#[must_use]
pub fn encode_record<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap_or_default()
}

/// Decodes a metadata record from untrusted bytes.
///
/// # Errors
/// Malformed bytes, a record over [`RECORD_LIMIT`], or bytes after the record.
pub fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() > RECORD_LIMIT {
        return Err(RecordError(format!(
            "{} bytes, over the limit of {RECORD_LIMIT}",
            bytes.len()
        )));
    }
    let cfg = bincode::config::standard().with_limit::<RECORD_LIMIT>();
    let (v, used) =
        bincode::serde::decode_from_slice(bytes, cfg).map_err(|e| RecordError(e.to_string()))?;
    if used != bytes.len() {
        return Err(RecordError(format!(
            "{} unexpected bytes after the record",
            bytes.len() - used
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_trailing_bytes() {
        let h = Head {
            round: RoundId(7),
            record: Some(RecordHash([3; 32])),
            model: ModelHash([4; 32]),
            state: [5; 32],
        };
        let mut b = encode_record(&h);
        assert_eq!(decode_record::<Head>(&b), Ok(h));
        b.push(0);
        assert!(decode_record::<Head>(&b).is_err());
        let p = PeerRecord(vec!["/ip4/127.0.0.1/tcp/1".into()]);
        assert_eq!(decode_record::<PeerRecord>(&encode_record(&p)), Ok(p));
        let own = OwnDelta {
            round: RoundId(3),
            delta: DeltaHash([9; 32]),
            self_seed: Some((2, [8; 32])),
            local_dp_noise: Some(1.1),
        };
        assert_eq!(decode_record::<OwnDelta>(&encode_record(&own)), Ok(own));
        // A declared string length of 2^60 is refused, not allocated.
        assert!(decode_record::<PeerRecord>(&[1, 0xff, 0, 0, 0, 0, 0, 0, 0x10, 0]).is_err());
    }
}
