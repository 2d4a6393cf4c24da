//! Newtype identifiers shared by every crate: rounds, content hashes and signer keys.
//!
//! Hashes serialise as lowercase hex in human-readable formats (TOML, JSON) and as raw
//! 32-byte arrays in binary formats (bincode), so a consortium file can name a genesis
//! hash as text while control messages stay compact.

use std::fmt;
use std::str::FromStr;

use ring::digest;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A swarm round number. Round 0 is the genesis model; training starts at round 1.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct RoundId(pub u64);

impl RoundId {
    /// The round after this one.
    #[must_use]
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for RoundId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Error parsing a hex-encoded 32-byte hash or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected 64 hexadecimal characters, got {got:?}")]
pub struct HexError {
    got: String,
}

fn parse_hex32(s: &str) -> Result<[u8; 32], HexError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).map_err(|_| HexError {
        got: s.chars().take(80).collect(),
    })?;
    Ok(out)
}

macro_rules! hash_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// SHA-256 of `bytes`.
            #[must_use]
            pub fn of(bytes: &[u8]) -> Self {
                Self::from_digest(digest::digest(&digest::SHA256, bytes))
            }

            /// Wraps a finished ring SHA-256 digest.
            ///
            /// # Panics
            /// Never for SHA-256 digests (always 32 bytes); other algorithms are a
            /// programming error.
            #[must_use]
            pub fn from_digest(d: digest::Digest) -> Self {
                let mut out = [0u8; 32];
                out.copy_from_slice(d.as_ref());
                Self(out)
            }

            /// The raw 32 bytes.
            #[must_use]
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The first 12 hex characters, for logs and tables.
            #[must_use]
            pub fn short(&self) -> String {
                hex::encode(&self.0[..6])
            }

            /// The full lowercase hex form.
            #[must_use]
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = HexError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32(s).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(D::Error::custom)
                } else {
                    <[u8; 32]>::deserialize(d).map(Self)
                }
            }
        }
    };
}

hash_newtype!(
    /// SHA-256 of a model's canonical bytes (see [`crate::weights`]).
    ModelHash
);
hash_newtype!(
    /// SHA-256 of a signed delta envelope's payload: names one member's update.
    DeltaHash
);
hash_newtype!(
    /// SHA-256 of a signed merge record's payload: links the chain of rounds.
    RecordHash
);
hash_newtype!(
    /// An Ed25519 public key (32 bytes) that signs envelopes; one per member.
    SignerKey
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_hex_round_trip_and_short_prefix() {
        let h = ModelHash::of(b"cellswarm");
        let parsed: ModelHash = h.to_hex().parse().unwrap();
        assert_eq!(parsed, h);
        assert_eq!(h.short().len(), 12);
        assert!(h.to_hex().starts_with(&h.short()));
        assert!("abc".parse::<ModelHash>().is_err());
    }

    #[test]
    fn hashes_are_text_in_toml_and_bytes_in_bincode() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Doc {
            genesis: ModelHash,
        }
        let doc = Doc {
            genesis: ModelHash::of(b"x"),
        };
        let text = toml::to_string(&doc).unwrap();
        assert!(text.contains(&doc.genesis.to_hex()));
        assert_eq!(toml::from_str::<Doc>(&text).unwrap(), doc);
        let bin = bincode::serde::encode_to_vec(&doc, bincode::config::standard()).unwrap();
        assert_eq!(bin.len(), 32);
    }
}
