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
        // A declared string length of 2^60 is refused, not allocated.
        assert!(decode_record::<PeerRecord>(&[1, 0xff, 0, 0, 0, 0, 0, 0, 0x10, 0]).is_err());
    }
}
