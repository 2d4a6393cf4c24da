//! A node's identity: one 32-byte Ed25519 seed, from which both the ring signing key and
//! the libp2p key pair (and so the PeerId) are derived. A PeerId therefore names the key
//! that signs the node's envelopes, and [`signer_key_from_peer_id`] recovers it.
//!
//! # Key file
//!
//! A text file created with mode `0600`:
//!
//! ```text
//! cellswarm-ed25519-seed-v1
//! <64 lowercase hex characters: the 32-byte RFC 8032 seed>
//! ```
//!
//! Loading refuses a key file that group or others can access, and says how to fix it.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p_identity::{Keypair, PeerId, PublicKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use zeroize::Zeroizing;

use crate::ids::SignerKey;

/// First line of a key file.
pub const KEY_FILE_HEADER: &str = "cellswarm-ed25519-seed-v1";

/// What went wrong creating, loading or using an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key file already exists where a new one was to be created.
    #[error("key file {0} already exists; refusing to overwrite a node's identity")]
    Exists(PathBuf),
    /// The key file can be read by group or others.
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); \
         restrict it with `chmod 600 {path}`"
    )]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not in the expected format.
    #[error("key file {path} is malformed: {problem}")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The seed was rejected by ring or libp2p.
    #[error("invalid Ed25519 seed: {0}")]
    BadSeed(String),
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// A PeerId does not embed an Ed25519 public key.
    #[error("PeerId {0} does not embed an Ed25519 public key")]
    NotEd25519(PeerId),
}

/// A node's key material. Both keys come from the same seed.
pub struct Identity {
    seed: Zeroizing<[u8; 32]>,
    signing: Ed25519KeyPair,
    keypair: Keypair,
    peer_id: PeerId,
    signer: SignerKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self::from_seed(*self.seed).expect("a seed that built an identity builds it again")
    }
}

impl Identity {
    /// Builds an identity from a 32-byte RFC 8032 seed.
    ///
    /// # Errors
    /// If ring or libp2p rejects the seed, or the two derive different public keys.
    pub fn from_seed(seed: [u8; 32]) -> Result<Self, IdentityError> {
        let seed = Zeroizing::new(seed);
        // libp2p zeroizes the buffer it is given: hand it a copy.
        let keypair = Keypair::ed25519_from_bytes(*seed)
            .map_err(|e| IdentityError::BadSeed(e.to_string()))?;
        let public = keypair
            .public()
            .try_into_ed25519()
            .map_err(|e| IdentityError::BadSeed(e.to_string()))?
            .to_bytes();
        // Checks that ring derives the same public key from the seed.
        let signing = Ed25519KeyPair::from_seed_and_public_key(seed.as_ref(), &public)
            .map_err(|e| IdentityError::BadSeed(e.to_string()))?;
        let peer_id = keypair.public().to_peer_id();
        Ok(Self {
            seed,
            signing,
            keypair,
            peer_id,
            signer: SignerKey(public),
        })
    }

    /// A fresh identity from the system's secure random generator.
    ///
    /// # Errors
    /// If the system random generator fails.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(seed.as_mut())
            .map_err(|_| IdentityError::Random)?;
        Self::from_seed(*seed)
    }

    /// Generates an identity and writes it to a new key file with mode 0600.
    ///
    /// Refuses to overwrite an existing file. The file and its directory are fsynced.
    ///
    /// # Errors
    /// [`IdentityError::Exists`] or I/O errors.
    pub fn create_key_file(path: &Path) -> Result<Self, IdentityError> {
        let id = Self::generate()?;
        id.write_key_file(path)?;
        Ok(id)
    }

    /// Writes this identity's seed to a new key file with mode 0600.
    ///
    /// # Errors
    /// [`IdentityError::Exists`] or I/O errors.
    pub fn write_key_file(&self, path: &Path) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = match opts.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(IdentityError::Exists(path.to_owned()));
            }
            Err(e) => return Err(io(e)),
        };
        let text = Zeroizing::new(format!("{KEY_FILE_HEADER}\n{}\n", hex::encode(*self.seed)));
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    /// Loads an identity from a key file, refusing files readable by group or others.
    ///
    /// # Errors
    /// I/O errors, [`IdentityError::InsecurePermissions`] or [`IdentityError::Malformed`].
    pub fn load_key_file(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::InsecurePermissions {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let malformed = |problem: &str| IdentityError::Malformed {
            path: path.to_owned(),
            problem: problem.to_owned(),
        };
        if meta.len() > 4096 {
            return Err(malformed("file is larger than a key file can be"));
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(io)?);
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(KEY_FILE_HEADER) {
            return Err(malformed(&format!(
                "first line must be `{KEY_FILE_HEADER}`"
            )));
        }
        let hex_seed = lines
            .next()
            .map(str::trim)
            .ok_or_else(|| malformed("the seed line is missing"))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(malformed("unexpected text after the seed line"));
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_seed, seed.as_mut())
            .map_err(|_| malformed("the seed must be 64 hexadecimal characters"))?;
        Self::from_seed(*seed)
    }

    /// The libp2p PeerId.
    #[must_use]
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The Ed25519 public key that verifies this node's signatures.
    #[must_use]
    pub fn signer_key(&self) -> SignerKey {
        self.signer
    }

    /// The libp2p key pair (for the swarm's transport security and gossipsub).
    #[must_use]
    pub fn libp2p_keypair(&self) -> Keypair {
        self.keypair.clone()
    }

    /// Signs `msg` with ring (deterministic RFC 8032 Ed25519).
    #[must_use]
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.signing.sign(msg).as_ref());
        out
    }

    /// The ring key pair's public key bytes (equal to [`Self::signer_key`]).
    #[must_use]
    pub fn ring_public_key(&self) -> &[u8] {
        self.signing.public_key().as_ref()
    }

    /// Derives a 32-byte secret for `purpose` from the seed (HMAC-SHA256 keyed by the
    /// seed), e.g. a secure-aggregation key-agreement seed. Never the seed itself.
    #[must_use]
    pub fn derive_secret(&self, purpose: &[u8]) -> Zeroizing<[u8; 32]> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.seed.as_ref());
        let tag = ring::hmac::sign(&key, purpose);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// Recovers the Ed25519 signing key embedded in a PeerId.
///
/// # Errors
/// [`IdentityError::NotEd25519`] for PeerIds that hash their key (code != identity) or
/// embed another key type.
pub fn signer_key_from_peer_id(peer: &PeerId) -> Result<SignerKey, IdentityError> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return Err(IdentityError::NotEd25519(*peer));
    }
    let key = PublicKey::try_decode_protobuf(mh.digest())
        .ok()
        .and_then(|k| k.try_into_ed25519().ok())
        .ok_or(IdentityError::NotEd25519(*peer))?;
    Ok(SignerKey(key.to_bytes()))
}

/// The PeerId of the node whose signing key is `key`.
///
/// # Errors
/// If `key` is not a valid Ed25519 point encoding.
pub fn peer_id_from_signer_key(key: &SignerKey) -> Result<PeerId, IdentityError> {
    let pk = libp2p_identity::ed25519::PublicKey::try_from_bytes(key.as_bytes())
        .map_err(|e| IdentityError::BadSeed(e.to_string()))?;
    Ok(PublicKey::from(pk).to_peer_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ED25519, UnparsedPublicKey};

    #[test]
    fn ring_signature_verifies_against_key_recovered_from_peer_id() {
        let id = Identity::generate().unwrap();
        let msg = b"round 7 delta";
        let sig = id.sign(msg);
        // A peer knows only our PeerId (from the consortium file).
        let peer: PeerId = id.peer_id().to_base58().parse().unwrap();
        let key = signer_key_from_peer_id(&peer).unwrap();
        assert_eq!(key, id.signer_key());
        assert_eq!(key.as_bytes(), id.ring_public_key());
        UnparsedPublicKey::new(&ED25519, key.as_bytes())
            .verify(msg, &sig)
            .unwrap();
        // libp2p verifies the same ring signature, and signs identically (RFC 8032).
        assert!(id.libp2p_keypair().public().verify(msg, &sig));
        assert_eq!(id.libp2p_keypair().sign(msg).unwrap(), sig.to_vec());
        assert_eq!(peer_id_from_signer_key(&key).unwrap(), peer);
    }

    #[test]
    fn same_seed_same_identity() {
        let a = Identity::from_seed([9; 32]).unwrap();
        let b = Identity::from_seed([9; 32]).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(a.sign(b"x"), b.sign(b"x"));
        assert_ne!(a.peer_id(), Identity::from_seed([8; 32]).unwrap().peer_id());
        assert_ne!(*a.derive_secret(b"one"), *a.derive_secret(b"two"));
        assert_ne!(a.derive_secret(b"one").as_ref(), &[9u8; 32]);
    }

    #[test]
    fn non_ed25519_peer_ids_are_refused() {
        // A PeerId whose multihash is SHA-256 (as for RSA keys) embeds no key.
        let mut bytes = vec![0x12, 0x20];
        bytes.extend_from_slice(&[0xab; 32]);
        let hashed = PeerId::from_bytes(&bytes).unwrap();
        assert!(matches!(
            signer_key_from_peer_id(&hashed),
            Err(IdentityError::NotEd25519(_))
        ));
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_private_and_round_trips() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let id = Identity::create_key_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = Identity::load_key_file(&path).unwrap();
        assert_eq!(loaded.peer_id(), id.peer_id());
        assert!(matches!(
            Identity::create_key_file(&path),
            Err(IdentityError::Exists(_))
        ));
        assert_eq!(
            Identity::load_key_file(&path).unwrap().peer_id(),
            id.peer_id(),
            "not overwritten"
        );
    }

    #[cfg(unix)]
    #[test]
    fn readable_key_file_is_refused_with_a_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        Identity::create_key_file(&path).unwrap();
        for mode in [0o640, 0o604, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = Identity::load_key_file(&path).unwrap_err();
            assert!(
                matches!(err, IdentityError::InsecurePermissions { .. }),
                "{mode:o}"
            );
            let msg = err.to_string();
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn malformed_key_files_are_refused() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        for (i, text) in [
            "",
            "cellswarm-ed25519-seed-v1\n",
            "cellswarm-ed25519-seed-v1\nzz\n",
            "wrong-header\n0000000000000000000000000000000000000000000000000000000000000000\n",
            "cellswarm-ed25519-seed-v1\n0000000000000000000000000000000000000000000000000000000000000000\nextra\n",
        ]
        .iter()
        .enumerate()
        {
            let path = dir.path().join(format!("k{i}"));
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
            f.write_all(text.as_bytes()).unwrap();
            assert!(
                matches!(Identity::load_key_file(&path), Err(IdentityError::Malformed { .. })),
                "{text:?}"
            );
        }
    }
}
