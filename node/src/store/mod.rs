//! A node's durable state, behind the narrow [`Store`] trait.
//!
//! [`DiskStore`] keeps metadata in sled (the head of the chain, every round's merge
//! record, the audit log of who contributed which delta to which round, peer records)
//! and bulk data as content-addressed files beside it:
//!
//! ```text
//! STORE/meta.sled/            sled database
//! STORE/blobs/models/<hash>   canonical model bytes (hash = ModelHash)
//! STORE/blobs/deltas/<hash>   delta envelopes (hash = SHA-256 of the payload = DeltaHash)
//! STORE/blobs/states/<hash>   aggregator state after a merge (hash = SHA-256 of the bytes)
//! STORE/quarantine/           blobs whose content did not match their name
//! ```
//!
//! Blobs are written to a temporary file, fsynced, renamed into place and the folder
//! fsynced, so a blob either exists whole or not at all. A round is committed in one sled
//! transaction (record, audit entries, head) followed by a flush; only then is it
//! acknowledged to the rest of the node. Every read of a blob checks its hash, and
//! [`DiskStore::check`] verifies what the head points to when the node starts.
//!
//! The store reaches the disk through two narrow traits (`media::Files` and
//! `media::Kv`), so that the power-loss test (`power_loss.rs`) can put a disk behind it
//! that forgets whatever was never synced.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use cellswarm_common::envelope::{PayloadKind, UnverifiedEnvelope};
use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId};
use cellswarm_common::records::{Answered, OwnDelta, PeerRecord, decode_record, encode_record};
use cellswarm_common::weights::Weights;
use serde::Serialize;

mod media;
#[cfg(test)]
mod power_loss;

use media::{Files, Fill, Kv, KvOp, OsFiles, SledKv, Table};

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The sled database could not be opened.
    #[error(
        "cannot open the store's database at {}: {message}. If the disk was damaged, restore the \
         store from a backup, or move it away to start afresh and resync from the consortium",
        path.display()
    )]
    Open {
        /// The database folder.
        path: PathBuf,
        /// sled's message.
        message: String,
    },
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A database operation failed.
    #[error("store database: {0}")]
    Db(String),
    /// Stored metadata could not be decoded.
    #[error("corrupt store metadata ({what}): {message}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// Bytes offered under a hash do not have that hash.
    #[error("{kind} blob offered as {expected} hashes to {actual}")]
    HashMismatch {
        /// Blob kind.
        kind: &'static str,
        /// The hash it was offered as.
        expected: String,
        /// Its actual hash.
        actual: String,
    },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        Self::Db(e.to_string())
    }
}

pub use cellswarm_common::records::{AuditEntry, Head};

/// Everything committed when a round is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundCommit {
    /// The new head.
    pub head: Head,
    /// The merge record envelope.
    pub record_envelope: Vec<u8>,
    /// The audit entries of the round.
    pub audit: Vec<AuditEntry>,
}

impl RoundCommit {
    /// The commit of an accepted merge record: head, record envelope and audit entries.
    #[must_use]
    pub fn of_record(
        record: &cellswarm_common::wire::MergeRecord,
        hash: RecordHash,
        envelope: Vec<u8>,
    ) -> Self {
        Self {
            head: Head {
                round: record.round,
                record: Some(hash),
                model: record.model,
                state: record.state,
            },
            record_envelope: envelope,
            audit: record
                .contributions
                .iter()
                .map(|c| AuditEntry {
                    round: record.round,
                    signer: c.signer,
                    delta: c.delta,
                    sample_count: c.sample_count,
                })
                .collect(),
        }
    }
}

/// What [`DiskStore::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Blobs that did not match their names, moved to `quarantine/`.
    pub quarantined: Vec<PathBuf>,
    /// Whether the head's model is present and intact.
    pub head_model_ok: bool,
    /// Whether the head's aggregator state is present and intact.
    pub head_state_ok: bool,
}

/// Kinds of content-addressed blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// Canonical model bytes.
    Model,
    /// Delta envelopes.
    Delta,
    /// Aggregator state.
    State,
}

impl BlobKind {
    fn dir(self) -> &'static str {
        match self {
            Self::Model => "models",
            Self::Delta => "deltas",
            Self::State => "states",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Delta => "delta",
            Self::State => "state",
        }
    }

    /// The content hash of a blob of this kind.
    fn hash(self, bytes: &[u8]) -> Option<[u8; 32]> {
        match self {
            Self::Model | Self::State => Some(*ModelHash::of(bytes).as_bytes()),
            Self::Delta => {
                // Envelopes are named by their payload's hash; parse without verifying
                // (verification against members happens where they are used).
                let env = UnverifiedEnvelope::parse(bytes.to_vec(), u64::MAX).ok()?;
                if env.kind() != PayloadKind::Delta {
                    return None;
                }
                let len = bytes.len() - cellswarm_common::envelope::ENVELOPE_HEADER_LEN;
                Some(*ModelHash::of(&bytes[bytes.len() - len..]).as_bytes())
            }
        }
    }
}

/// The operations a node needs from durable storage.
pub trait Store: Send + Sync + fmt::Debug {
    /// Stores a blob under its content hash (idempotent). Durable on return.
    ///
    /// # Errors
    /// I/O errors, or bytes that do not hash to `hash`.
    fn put_blob(&self, kind: BlobKind, hash: &[u8; 32], bytes: &[u8]) -> Result<(), StoreError>;

    /// Stores bytes whose hash the caller has just computed from these very bytes (for
    /// example when sealing an envelope): like [`Store::put_blob`] without hashing them
    /// again.
    ///
    /// # Errors
    /// As [`Store::put_blob`].
    fn put_blob_hashed(
        &self,
        kind: BlobKind,
        hash: &[u8; 32],
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.put_blob(kind, hash, bytes)
    }

    /// Stores a model under its hash, like [`Store::put_blob`] with its canonical bytes
    /// (a store may stream them instead of building a copy in memory).
    ///
    /// # Errors
    /// As [`Store::put_blob`].
    fn put_model(&self, hash: &ModelHash, model: &Weights) -> Result<(), StoreError> {
        self.put_blob(BlobKind::Model, hash.as_bytes(), &model.to_bytes())
    }

    /// Reads a blob, checking its hash; a mismatch quarantines the file and returns `None`.
    ///
    /// # Errors
    /// I/O errors other than absence.
    fn blob(&self, kind: BlobKind, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Whether a blob file exists (without checking it).
    fn has_blob(&self, kind: BlobKind, hash: &[u8; 32]) -> bool;

    /// Reads a blob to send to a peer, without checking its hash here: the peer verifies
    /// the signature and hash of what it receives, and a damaged file is caught by
    /// [`Store::blob`] or the start-up check.
    ///
    /// # Errors
    /// I/O errors other than absence.
    fn blob_for_peer(&self, kind: BlobKind, hash: &[u8; 32])
    -> Result<Option<Vec<u8>>, StoreError>;

    /// The head of the chain, if any.
    ///
    /// # Errors
    /// Database errors or corrupt metadata.
    fn head(&self) -> Result<Option<Head>, StoreError>;

    /// Sets the head to the genesis model (round 0), if there is no head yet.
    ///
    /// # Errors
    /// Database errors.
    fn init_genesis(&self, model: ModelHash, state: [u8; 32]) -> Result<Head, StoreError>;

    /// Commits an accepted round atomically and flushes it to disk.
    ///
    /// # Errors
    /// Database errors.
    fn commit_round(&self, commit: &RoundCommit) -> Result<(), StoreError> {
        self.commit_rounds(std::slice::from_ref(commit))
    }

    /// Commits consecutive accepted rounds (a catch-up's chain) in one transaction:
    /// every round's record and audit lines, and the head of the last, flushed once. A
    /// crash leaves all of them or none, never a head whose model was not yet stored
    /// (only the last round's model and state are stored by a catch-up).
    ///
    /// # Errors
    /// Database errors.
    fn commit_rounds(&self, commits: &[RoundCommit]) -> Result<(), StoreError>;

    /// Deletes the delta blobs that round `round`'s audit lines name, except our own
    /// delta of that round (the local-DP ledger and a restart need it). Returns how many
    /// files it removed. Others' deltas are kept only while a peer catching up may ask
    /// for them (the rounds a member keeps): see `docs/protocol.md`, "Catching up".
    ///
    /// # Errors
    /// Database or I/O errors.
    fn forget_deltas(&self, round: RoundId) -> Result<usize, StoreError>;

    /// The merge record envelope of a round.
    ///
    /// # Errors
    /// Database errors.
    fn record(&self, round: RoundId) -> Result<Option<Vec<u8>>, StoreError>;

    /// The audit entries of a round.
    ///
    /// # Errors
    /// Database errors or corrupt entries.
    fn audit(&self, round: RoundId) -> Result<Vec<AuditEntry>, StoreError>;

    /// Remembers a peer's last known addresses.
    ///
    /// # Errors
    /// Database errors.
    fn put_peer(&self, peer: &str, addresses: &[String]) -> Result<(), StoreError>;

    /// Known peers and their addresses.
    ///
    /// # Errors
    /// Database errors.
    fn peers(&self) -> Result<Vec<(String, Vec<String>)>, StoreError>;

    /// The record stored under `peer`, if any.
    ///
    /// # Errors
    /// Database errors.
    fn peer(&self, peer: &str) -> Result<Option<Vec<String>>, StoreError>;

    /// Keeps a member's signed attestation of a round (`Announcement::Committed`): the
    /// first one per member and round is kept, later ones are ignored.
    ///
    /// # Errors
    /// Database errors.
    fn put_attestation(
        &self,
        round: RoundId,
        signer: &[u8; 32],
        envelope: &[u8],
    ) -> Result<(), StoreError>;

    /// The attestation envelopes kept for a round, one per member at most.
    ///
    /// # Errors
    /// Database errors.
    fn attestations(&self, round: RoundId) -> Result<Vec<Vec<u8>>, StoreError>;

    /// Keeps our own delta record of a round (replacing one of the same round).
    ///
    /// # Errors
    /// Database errors.
    fn put_own_delta(&self, own: &OwnDelta) -> Result<(), StoreError>;

    /// Our own delta record of a round, if any.
    ///
    /// # Errors
    /// Database errors or a corrupt record.
    fn own_delta(&self, round: RoundId) -> Result<Option<OwnDelta>, StoreError>;

    /// Every own delta record, oldest round first (the local-DP ledger).
    ///
    /// # Errors
    /// Database errors or a corrupt record.
    fn own_deltas(&self) -> Result<Vec<OwnDelta>, StoreError>;

    /// Records the masking epoch we answered in a round.
    ///
    /// # Errors
    /// Database errors.
    fn put_answered(&self, answered: Answered) -> Result<(), StoreError>;

    /// The masking epoch we answered in `round`, if any.
    ///
    /// # Errors
    /// Database errors or a corrupt record.
    fn answered(&self, round: RoundId) -> Result<Option<u32>, StoreError>;

    /// Flushes everything to disk.
    ///
    /// # Errors
    /// Database errors.
    fn flush(&self) -> Result<(), StoreError>;
}

/// Distinguishes temporary files of concurrent writers.
static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The sled + files implementation of [`Store`].
pub struct DiskStore {
    root: PathBuf,
    files: Box<dyn Files>,
    kv: Box<dyn Kv>,
}

impl fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

const HEAD_KEY: &[u8] = b"head";

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    encode_record(v)
}

fn dec<T: serde::de::DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, StoreError> {
    decode_record(b).map_err(|e| StoreError::Corrupt {
        what,
        message: e.to_string(),
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The folders of a store, below its root.
const FOLDERS: [&str; 5] = [
    "blobs/models",
    "blobs/deltas",
    "blobs/states",
    "tmp",
    "quarantine",
];

impl DiskStore {
    /// Opens (or creates) a store at `root` with a sled cache of `cache_bytes`.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the database cannot be opened (damaged disk), with what
    /// to do; I/O errors creating the folders.
    pub fn open(root: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        // The probe for direct writes needs `tmp/`; `open_on` creates the other folders.
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let kv = SledKv::open(&root.join("meta.sled"), cache_bytes)?;
        let files = OsFiles::probing(&tmp);
        Self::open_on(root, Box::new(files), Box::new(kv))
    }

    /// Opens a store on the given files and database (the power-loss test's simulated
    /// disk, or the real ones): creates the folders, removes what a crash left in `tmp/`
    /// and moves legacy records.
    pub(crate) fn open_on(
        root: &Path,
        files: Box<dyn Files>,
        kv: Box<dyn Kv>,
    ) -> Result<Self, StoreError> {
        for d in FOLDERS {
            let p = root.join(d);
            files.create_dir_all(&p).map_err(io(&p))?;
        }
        // The database is open, so this process alone uses the store: a temporary blob
        // file is what a crash left between writing a blob and renaming it into place.
        let tmp = root.join("tmp");
        let mut cleaned = 0usize;
        for path in files.list(&tmp).map_err(io(&tmp))? {
            let stale = path.extension().is_some_and(|x| x == "partial")
                || path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("direct-probe."));
            if stale {
                files.remove_file(&path).map_err(io(&path))?;
                cleaned += 1;
            }
        }
        if cleaned > 0 {
            files.sync_dir(&tmp).map_err(io(&tmp))?;
            tracing::info!(
                files = cleaned,
                "removed blob files a crash left half-written"
            );
        }
        let store = Self {
            root: root.to_owned(),
            files,
            kv,
        };
        store.migrate_legacy_records()?;
        Ok(store)
    }

    /// Stores written before typed records kept our own deltas and answered epochs as
    /// strings in the peer table (`own-delta-N`: hash, `secagg-seed:E:HEX`,
    /// `local-dp:z=Z`; `secagg-answered-N`: epoch). They move to their typed trees once,
    /// in one transaction per record, and leave the peer table.
    fn migrate_legacy_records(&self) -> Result<(), StoreError> {
        let mut moved = 0usize;
        for (k, v) in self.kv.scan(Table::Peers, b"")? {
            let key = String::from_utf8_lossy(&k).into_owned();
            let PeerRecord(values) = dec("peer", &v)?;
            let corrupt = || StoreError::Corrupt {
                what: "legacy own-delta record",
                message: format!("{key}: {values:?}"),
            };
            if let Some(round) = key.strip_prefix("own-delta-") {
                let round = RoundId(round.parse().map_err(|_| corrupt())?);
                let delta: DeltaHash = values
                    .first()
                    .and_then(|h| h.parse().ok())
                    .ok_or_else(corrupt)?;
                let self_seed = values.iter().find_map(|v| {
                    let (epoch, seed) = v.strip_prefix("secagg-seed:")?.split_once(':')?;
                    let seed: [u8; 32] = hex::decode(seed).ok()?.try_into().ok()?;
                    Some((epoch.parse().ok()?, seed))
                });
                let local_dp_noise = values
                    .iter()
                    .find_map(|v| v.strip_prefix("local-dp:z="))
                    .and_then(|z| z.parse::<f64>().ok());
                if self.own_delta(round)?.is_none() {
                    self.put_own_delta(&OwnDelta {
                        round,
                        delta,
                        self_seed,
                        local_dp_noise,
                    })?;
                }
            } else if let Some(round) = key.strip_prefix("secagg-answered-") {
                let round = RoundId(round.parse().map_err(|_| corrupt())?);
                let epoch = values
                    .first()
                    .and_then(|e| e.parse().ok())
                    .ok_or_else(corrupt)?;
                if self.answered(round)?.is_none() {
                    self.put_answered(Answered { round, epoch })?;
                }
            } else {
                continue;
            }
            self.kv.apply(vec![KvOp::Del(Table::Peers, k)])?;
            moved += 1;
        }
        if moved > 0 {
            self.kv.flush()?;
            tracing::info!(
                records = moved,
                "moved own-delta and answered-epoch records to their typed trees"
            );
        }
        Ok(())
    }

    /// The store folder.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, kind: BlobKind, hash: &[u8; 32]) -> PathBuf {
        self.root
            .join("blobs")
            .join(kind.dir())
            .join(hex::encode(hash))
    }

    /// Writes a blob to a temporary file, fsyncs it, renames it into place and fsyncs
    /// the folder: a blob exists whole or not at all. A blob already present is kept.
    fn write_atomically(
        &self,
        kind: BlobKind,
        hash: &[u8; 32],
        fill: Fill<'_>,
    ) -> Result<(), StoreError> {
        let path = self.blob_path(kind, hash);
        if self.files.is_file(&path) {
            return Ok(());
        }
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{}.partial",
            hex::encode(&hash[..8]),
            std::process::id(),
            TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = self.files.remove_file(&tmp);
        self.files.create_synced(&tmp, fill).map_err(io(&tmp))?;
        self.files.rename(&tmp, &path).map_err(io(&path))?;
        let dir = path.parent().unwrap_or(&self.root);
        self.files.sync_dir(dir).map_err(io(dir))
    }

    fn quarantine(&self, path: &Path) -> Result<PathBuf, StoreError> {
        let name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let to = self.root.join("quarantine").join(name);
        self.files.rename(path, &to).map_err(io(path))?;
        let dir = self.root.join("quarantine");
        self.files.sync_dir(&dir).map_err(io(&dir))?;
        Ok(to)
    }

    /// Verifies what the head points to, quarantining blobs whose content does not match
    /// their name (they will be fetched again from peers).
    ///
    /// # Errors
    /// Database errors or corrupt metadata (the store must then be restored or removed).
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        let mut report = CheckReport::default();
        let Some(head) = self.head()? else {
            return Ok(report);
        };
        for (kind, hash, ok) in [
            (
                BlobKind::Model,
                *head.model.as_bytes(),
                &mut report.head_model_ok,
            ),
            (BlobKind::State, head.state, &mut report.head_state_ok),
        ] {
            let path = self.blob_path(kind, &hash);
            match self.files.read(&path) {
                Ok(bytes) if kind.hash(&bytes) == Some(hash) => *ok = true,
                Ok(_) => report.quarantined.push(self.quarantine(&path)?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        if let Some(rec) = head.record {
            let bytes = self.record(head.round)?.ok_or(StoreError::Corrupt {
                what: "head record",
                message: format!(
                    "the head names round {} but its record is missing",
                    head.round
                ),
            })?;
            let len = bytes
                .len()
                .saturating_sub(cellswarm_common::envelope::ENVELOPE_HEADER_LEN);
            if RecordHash::of(&bytes[bytes.len() - len..]) != rec {
                return Err(StoreError::Corrupt {
                    what: "head record",
                    message: format!(
                        "the record of round {} does not hash to the head's record hash",
                        head.round
                    ),
                });
            }
        }
        Ok(report)
    }
}

impl Store for DiskStore {
    fn put_blob(&self, kind: BlobKind, hash: &[u8; 32], bytes: &[u8]) -> Result<(), StoreError> {
        let actual = kind.hash(bytes);
        if actual != Some(*hash) {
            return Err(StoreError::HashMismatch {
                kind: kind.name(),
                expected: hex::encode(hash),
                actual: actual.map_or_else(|| "(not a valid blob)".into(), hex::encode),
            });
        }
        self.write_atomically(kind, hash, Box::new(|f| f.write_all(bytes)))
    }

    fn put_blob_hashed(
        &self,
        kind: BlobKind,
        hash: &[u8; 32],
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.write_atomically(kind, hash, Box::new(|f| f.write_all(bytes)))
    }

    fn put_model(&self, hash: &ModelHash, model: &Weights) -> Result<(), StoreError> {
        // The hash was computed from these weights: stream their canonical bytes
        // instead of building (and hashing again) a copy of the whole model.
        self.write_atomically(
            BlobKind::Model,
            hash.as_bytes(),
            Box::new(|f| model.write_to(f)),
        )
    }

    fn blob(&self, kind: BlobKind, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.blob_path(kind, hash);
        match self.files.read(&path) {
            Ok(bytes) if kind.hash(&bytes) == Some(*hash) => Ok(Some(bytes)),
            Ok(_) => {
                let to = self.quarantine(&path)?;
                tracing::error!(blob = %hex::encode(hash), moved_to = %to.display(), "stored {} does not match its hash; quarantined", kind.name());
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn has_blob(&self, kind: BlobKind, hash: &[u8; 32]) -> bool {
        self.files.is_file(&self.blob_path(kind, hash))
    }

    fn blob_for_peer(
        &self,
        kind: BlobKind,
        hash: &[u8; 32],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.blob_path(kind, hash);
        match self.files.read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn head(&self) -> Result<Option<Head>, StoreError> {
        self.kv
            .get(Table::Meta, HEAD_KEY)?
            .map(|b| dec("head", &b))
            .transpose()
    }

    fn init_genesis(&self, model: ModelHash, state: [u8; 32]) -> Result<Head, StoreError> {
        if let Some(h) = self.head()? {
            return Ok(h);
        }
        let head = Head {
            round: RoundId(0),
            record: None,
            model,
            state,
        };
        self.kv
            .apply(vec![KvOp::Put(Table::Meta, HEAD_KEY.to_vec(), enc(&head))])?;
        self.kv.flush()?;
        Ok(head)
    }

    fn commit_rounds(&self, commits: &[RoundCommit]) -> Result<(), StoreError> {
        let Some(last) = commits.last() else {
            return Ok(());
        };
        // A round committed again (a fork resolved in favour of the peers' record) must
        // not keep audit lines of the record it replaces; they go in the same batch as
        // the new ones, so a crash never leaves a round without its lines.
        let mut ops = Vec::new();
        for c in commits {
            for (key, _) in self.kv.scan(Table::Audit, &c.head.round.0.to_be_bytes())? {
                ops.push(KvOp::Del(Table::Audit, key));
            }
        }
        for c in commits {
            let round_key = c.head.round.0.to_be_bytes();
            ops.push(KvOp::Put(
                Table::Records,
                round_key.to_vec(),
                c.record_envelope.clone(),
            ));
            for a in &c.audit {
                let mut key = round_key.to_vec();
                key.extend_from_slice(a.signer.as_bytes());
                // A deletion of the same key earlier in the batch is overridden here.
                ops.push(KvOp::Put(Table::Audit, key, enc(a)));
            }
        }
        ops.push(KvOp::Put(Table::Meta, HEAD_KEY.to_vec(), enc(&last.head)));
        self.kv.apply(ops)?;
        self.kv.flush()
    }

    fn forget_deltas(&self, round: RoundId) -> Result<usize, StoreError> {
        let own = self.own_delta(round)?.map(|o| o.delta);
        let mut removed = 0;
        for entry in self.audit(round)? {
            if Some(entry.delta) == own {
                continue;
            }
            let path = self.blob_path(BlobKind::Delta, entry.delta.as_bytes());
            match self.files.remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(removed)
    }

    fn record(&self, round: RoundId) -> Result<Option<Vec<u8>>, StoreError> {
        self.kv.get(Table::Records, &round.0.to_be_bytes())
    }

    fn audit(&self, round: RoundId) -> Result<Vec<AuditEntry>, StoreError> {
        self.kv
            .scan(Table::Audit, &round.0.to_be_bytes())?
            .iter()
            .map(|(_, v)| dec("audit entry", v))
            .collect()
    }

    fn put_peer(&self, peer: &str, addresses: &[String]) -> Result<(), StoreError> {
        self.kv.apply(vec![KvOp::Put(
            Table::Peers,
            peer.as_bytes().to_vec(),
            enc(&PeerRecord(addresses.to_vec())),
        )])
    }

    fn peers(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.kv
            .scan(Table::Peers, b"")?
            .iter()
            .map(|(k, v)| {
                let PeerRecord(addresses) = dec("peer", v)?;
                Ok((String::from_utf8_lossy(k).into_owned(), addresses))
            })
            .collect()
    }

    fn peer(&self, peer: &str) -> Result<Option<Vec<String>>, StoreError> {
        self.kv
            .get(Table::Peers, peer.as_bytes())?
            .map(|v| dec("peer", &v).map(|PeerRecord(values)| values))
            .transpose()
    }

    fn put_attestation(
        &self,
        round: RoundId,
        signer: &[u8; 32],
        envelope: &[u8],
    ) -> Result<(), StoreError> {
        let mut key = round.0.to_be_bytes().to_vec();
        key.extend_from_slice(signer);
        // First one wins: a member that attests two records of a round is a liar, and
        // its second word changes nothing.
        self.kv.insert_new(Table::Attest, &key, envelope)?;
        Ok(())
    }

    fn attestations(&self, round: RoundId) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .kv
            .scan(Table::Attest, &round.0.to_be_bytes())?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    fn put_own_delta(&self, own: &OwnDelta) -> Result<(), StoreError> {
        self.kv.apply(vec![KvOp::Put(
            Table::Own,
            own.round.0.to_be_bytes().to_vec(),
            enc(own),
        )])
    }

    fn own_delta(&self, round: RoundId) -> Result<Option<OwnDelta>, StoreError> {
        self.kv
            .get(Table::Own, &round.0.to_be_bytes())?
            .map(|v| dec("own delta", &v))
            .transpose()
    }

    fn own_deltas(&self) -> Result<Vec<OwnDelta>, StoreError> {
        self.kv
            .scan(Table::Own, b"")?
            .iter()
            .map(|(_, v)| dec("own delta", v))
            .collect()
    }

    fn put_answered(&self, answered: Answered) -> Result<(), StoreError> {
        self.kv.apply(vec![KvOp::Put(
            Table::Answered,
            answered.round.0.to_be_bytes().to_vec(),
            enc(&answered),
        )])
    }

    fn answered(&self, round: RoundId) -> Result<Option<u32>, StoreError> {
        self.kv
            .get(Table::Answered, &round.0.to_be_bytes())?
            .map(|v| dec("answered epoch", &v).map(|a: Answered| a.epoch))
            .transpose()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.kv.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellswarm_common::envelope::seal;
    use cellswarm_common::identity::Identity;

    fn store() -> (tempfile::TempDir, DiskStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
        (dir, s)
    }

    #[test]
    fn own_deltas_and_answered_epochs_are_typed_and_legacy_strings_move_to_them() {
        let (dir, s) = store();
        // A store written before typed records: strings in the peer table.
        let h = DeltaHash([7; 32]);
        s.put_peer(
            "own-delta-3",
            &[
                h.to_hex(),
                format!("secagg-seed:2:{}", hex::encode([5u8; 32])),
                "local-dp:z=1.5".into(),
            ],
        )
        .unwrap();
        s.put_peer("secagg-answered-3", &["2".into()]).unwrap();
        s.put_peer("12D3KooWpeer", &["/ip4/127.0.0.1/tcp/1".into()])
            .unwrap();
        s.flush().unwrap();
        drop(s);
        let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
        let own = s.own_delta(RoundId(3)).unwrap().expect("moved");
        assert_eq!(
            own,
            OwnDelta {
                round: RoundId(3),
                delta: h,
                self_seed: Some((2, [5; 32])),
                local_dp_noise: Some(1.5),
            }
        );
        assert_eq!(s.answered(RoundId(3)).unwrap(), Some(2));
        // Only the peer's addresses stay in the peer table.
        let peers: Vec<String> = s.peers().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(peers, vec!["12D3KooWpeer".to_owned()]);
        // Typed from then on.
        let next = OwnDelta {
            round: RoundId(4),
            delta: DeltaHash([8; 32]),
            self_seed: None,
            local_dp_noise: None,
        };
        s.put_own_delta(&next).unwrap();
        assert_eq!(s.own_deltas().unwrap(), vec![own, next]);
        assert_eq!(s.answered(RoundId(4)).unwrap(), None);
    }

    #[test]
    fn blobs_are_content_addressed_and_checked() {
        let (_d, s) = store();
        let bytes = b"model bytes".to_vec();
        let h = *ModelHash::of(&bytes).as_bytes();
        assert!(matches!(
            s.put_blob(BlobKind::Model, &[0; 32], &bytes),
            Err(StoreError::HashMismatch { .. })
        ));
        s.put_blob(BlobKind::Model, &h, &bytes).unwrap();
        s.put_blob(BlobKind::Model, &h, &bytes).unwrap();
        assert_eq!(s.blob(BlobKind::Model, &h).unwrap().unwrap(), bytes);
        assert!(s.has_blob(BlobKind::Model, &h));
        // A corrupted file is quarantined, not served.
        fs::write(s.blob_path(BlobKind::Model, &h), b"bit rot").unwrap();
        assert_eq!(s.blob(BlobKind::Model, &h).unwrap(), None);
        assert!(!s.has_blob(BlobKind::Model, &h));
        assert_eq!(
            fs::read_dir(s.root().join("quarantine")).unwrap().count(),
            1
        );
        // Deltas are named by their envelope payload's hash.
        let id = Identity::from_seed([1; 32]).unwrap();
        let env = seal(&id, PayloadKind::Delta, b"delta payload");
        let dh = *DeltaHash::of(b"delta payload").as_bytes();
        s.put_blob(BlobKind::Delta, &dh, &env).unwrap();
        assert_eq!(s.blob(BlobKind::Delta, &dh).unwrap().unwrap(), env);
        assert!(
            s.put_blob(BlobKind::Delta, &dh, b"not an envelope")
                .is_err()
        );
    }

    #[test]
    fn a_rounds_deltas_are_forgotten_but_our_own() {
        let (_d, s) = store();
        let (me, other) = (
            Identity::from_seed([1; 32]).unwrap(),
            Identity::from_seed([2; 32]).unwrap(),
        );
        let put = |id: &Identity, payload: &[u8]| {
            let env = seal(id, PayloadKind::Delta, payload);
            let h = DeltaHash::of(payload);
            s.put_blob(BlobKind::Delta, h.as_bytes(), &env).unwrap();
            AuditEntry {
                round: RoundId(1),
                signer: id.signer_key(),
                delta: h,
                sample_count: 1,
            }
        };
        let (ours, theirs) = (put(&me, b"ours"), put(&other, b"theirs"));
        s.init_genesis(ModelHash::of(b"genesis"), [3; 32]).unwrap();
        s.put_own_delta(&OwnDelta {
            round: RoundId(1),
            delta: ours.delta,
            self_seed: None,
            local_dp_noise: None,
        })
        .unwrap();
        s.commit_round(&RoundCommit {
            head: Head {
                round: RoundId(1),
                record: Some(RecordHash::of(b"record")),
                model: ModelHash::of(b"model"),
                state: [4; 32],
            },
            record_envelope: seal(&me, PayloadKind::MergeRecord, b"record"),
            audit: vec![ours, theirs],
        })
        .unwrap();
        assert_eq!(s.forget_deltas(RoundId(1)).unwrap(), 1);
        assert!(s.has_blob(BlobKind::Delta, ours.delta.as_bytes()));
        assert!(!s.has_blob(BlobKind::Delta, theirs.delta.as_bytes()));
        // Again, or for a round with no audit lines: nothing to do.
        assert_eq!(s.forget_deltas(RoundId(1)).unwrap(), 0);
        assert_eq!(s.forget_deltas(RoundId(9)).unwrap(), 0);
    }

    #[test]
    fn a_caught_up_chain_commits_in_one_step_with_the_last_head() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::from_seed([4; 32]).unwrap();
        let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
        s.init_genesis(ModelHash::of(b"genesis"), [3; 32]).unwrap();
        s.commit_rounds(&[]).unwrap();
        assert_eq!(s.head().unwrap().unwrap().round, RoundId(0));
        let commits: Vec<RoundCommit> = (1..=3u64)
            .map(|r| RoundCommit {
                head: Head {
                    round: RoundId(r),
                    record: Some(RecordHash::of(&r.to_le_bytes())),
                    model: ModelHash::of(&[r as u8; 4]),
                    state: [r as u8; 32],
                },
                record_envelope: seal(&id, PayloadKind::MergeRecord, &r.to_le_bytes()),
                audit: vec![AuditEntry {
                    round: RoundId(r),
                    signer: id.signer_key(),
                    delta: DeltaHash::of(&r.to_le_bytes()),
                    sample_count: r,
                }],
            })
            .collect();
        s.commit_rounds(&commits).unwrap();
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.head().unwrap(), Some(commits[2].head));
        for c in &commits {
            assert_eq!(
                s.record(c.head.round).unwrap(),
                Some(c.record_envelope.clone())
            );
            assert_eq!(s.audit(c.head.round).unwrap(), c.audit);
        }
    }

    /// Opens a store whose previous handle was just dropped in this process: sled's
    /// flusher thread lets go of the database lock a moment after the last handle goes
    /// (a restarted node is a new process, whose lock is free at once). Bounded.
    fn reopen(path: &Path) -> DiskStore {
        for _ in 0..500 {
            match DiskStore::open(path, 1 << 20) {
                Err(StoreError::Open { message, .. }) if message.contains("acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
        panic!("the store stayed locked 5 s after its handle was dropped");
    }

    #[test]
    fn rounds_commit_atomically_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::from_seed([2; 32]).unwrap();
        let record = seal(&id, PayloadKind::MergeRecord, b"record 1");
        let rec_hash = RecordHash::of(b"record 1");
        let model = b"model 1".to_vec();
        let mh = ModelHash::of(&model);
        {
            let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(s.head().unwrap(), None);
            let g = s.init_genesis(ModelHash::of(b"genesis"), [3; 32]).unwrap();
            assert_eq!(g.round, RoundId(0));
            s.put_blob(BlobKind::Model, mh.as_bytes(), &model).unwrap();
            s.put_blob(
                BlobKind::State,
                ModelHash::of(b"state").as_bytes(),
                b"state",
            )
            .unwrap();
            let head = Head {
                round: RoundId(1),
                record: Some(rec_hash),
                model: mh,
                state: *ModelHash::of(b"state").as_bytes(),
            };
            let audit = vec![AuditEntry {
                round: RoundId(1),
                signer: id.signer_key(),
                delta: DeltaHash::of(b"d"),
                sample_count: 5,
            }];
            s.commit_round(&RoundCommit {
                head,
                record_envelope: record.clone(),
                audit: audit.clone(),
            })
            .unwrap();
            s.put_peer("peer-a", &["/ip4/127.0.0.1/tcp/1".into()])
                .unwrap();
        }
        let s = reopen(dir.path());
        let head = s.head().unwrap().unwrap();
        assert_eq!(
            (head.round, head.record, head.model),
            (RoundId(1), Some(rec_hash), mh)
        );
        assert_eq!(s.record(RoundId(1)).unwrap().unwrap(), record);
        assert_eq!(s.audit(RoundId(1)).unwrap().len(), 1);
        assert!(s.audit(RoundId(2)).unwrap().is_empty());
        assert_eq!(s.peers().unwrap()[0].0, "peer-a");
        let report = s.check().unwrap();
        assert!(report.head_model_ok && report.head_state_ok && report.quarantined.is_empty());
        // Damage the head's model: the check quarantines it for a refetch.
        fs::write(s.blob_path(BlobKind::Model, mh.as_bytes()), b"damaged").unwrap();
        let report = s.check().unwrap();
        assert!(!report.head_model_ok);
        assert_eq!(report.quarantined.len(), 1);
    }

    #[test]
    fn half_written_blobs_of_a_crash_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
        let h = ModelHash::of(b"whole");
        s.put_blob(BlobKind::Model, h.as_bytes(), b"whole").unwrap();
        drop(s);
        let tmp = dir.path().join("tmp");
        fs::write(tmp.join("0102030405060708.99.3.partial"), b"half").unwrap();
        fs::write(tmp.join("keep.txt"), b"not ours").unwrap();
        let s = reopen(dir.path());
        let left: Vec<_> = fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("keep.txt")]);
        assert!(s.has_blob(BlobKind::Model, h.as_bytes()));
    }

    #[test]
    fn an_unopenable_database_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path()).unwrap();
        // A file where the database folder should be.
        fs::write(dir.path().join("meta.sled"), b"garbage").unwrap();
        let err = DiskStore::open(dir.path(), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("restore the store from a backup"), "{err}");
    }
}
