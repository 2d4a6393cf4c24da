//! What the store writes to: files for blobs ([`Files`]) and an ordered key-value store
//! for metadata ([`Kv`]). [`OsFiles`] and [`SledKv`] are the real ones; the power-loss
//! test puts a simulated disk behind the same two traits, one that forgets whatever was
//! never synced.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sled::Transactional as _;

use super::StoreError;

/// Fills a blob file with its bytes.
pub(crate) type Fill<'a> = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + 'a>;

/// The file operations the store uses. Nothing written is durable until synced: a file's
/// bytes by [`Files::create_synced`], a folder's entries (a rename into it) by
/// [`Files::sync_dir`].
pub(crate) trait Files: Send + Sync + fmt::Debug {
    /// Creates a folder and its parents (durable at once: done when the store opens).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates a new file at `path`, fills it and syncs its bytes to disk.
    fn create_synced(&self, path: &Path, fill: Fill<'_>) -> io::Result<()>;
    /// Renames a file (durable once the target folder is synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes a folder's entries durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Whether a file exists.
    fn is_file(&self, path: &Path) -> bool;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// The files in a folder.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
}

/// The store's metadata tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Table {
    /// The head of the chain.
    Meta,
    /// Merge record envelopes by round.
    Records,
    /// Audit lines by round and signer.
    Audit,
    /// Peer addresses.
    Peers,
    /// Members' attestations by round and signer.
    Attest,
    /// Our own delta records.
    Own,
    /// Answered masking epochs.
    Answered,
}

impl Table {
    /// Every table, in the order [`SledKv`] opens them.
    pub(crate) const ALL: [Self; 7] = [
        Self::Meta,
        Self::Records,
        Self::Audit,
        Self::Peers,
        Self::Attest,
        Self::Own,
        Self::Answered,
    ];

    /// The sled tree name (kept from the stores written before this trait).
    fn name(self) -> &'static str {
        match self {
            Self::Meta => "meta",
            Self::Records => "records",
            Self::Audit => "audit",
            Self::Peers => "peers",
            Self::Attest => "attestations",
            Self::Own => "own_deltas",
            Self::Answered => "answered",
        }
    }
}

/// Keys and values, in key order.
pub(crate) type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// One change of a [`Kv::apply`] batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KvOp {
    /// Sets a key.
    Put(Table, Vec<u8>, Vec<u8>),
    /// Removes a key.
    Del(Table, Vec<u8>),
}

/// An ordered key-value store with atomic batches. A batch is atomic: after a crash
/// the store holds a prefix of the batches applied, at least up to the last
/// [`Kv::flush`].
pub(crate) trait Kv: Send + Sync + fmt::Debug {
    /// The value of a key.
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key with this prefix and its value, in key order.
    fn scan(&self, t: Table, prefix: &[u8]) -> Result<Entries, StoreError>;
    /// Applies a batch atomically.
    fn apply(&self, ops: Vec<KvOp>) -> Result<(), StoreError>;
    /// Sets a key that has no value yet; `false` (and no change) when it has one.
    fn insert_new(&self, t: Table, key: &[u8], value: &[u8]) -> Result<bool, StoreError>;
    /// Makes every batch applied so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// The sled database of a store.
pub(crate) struct SledKv {
    db: sled::Db,
    /// One tree per [`Table`], in [`Table::ALL`] order.
    trees: Vec<sled::Tree>,
}

impl fmt::Debug for SledKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledKv").finish_non_exhaustive()
    }
}

impl SledKv {
    /// Opens (or creates) the database at `path` with a cache of `cache_bytes`.
    pub(crate) fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let open_err = |e: sled::Error| StoreError::Open {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(500))
            .open()
            .map_err(open_err)?;
        let trees = Table::ALL
            .iter()
            .map(|t| db.open_tree(t.name()).map_err(open_err))
            .collect::<Result<_, _>>()?;
        Ok(Self { db, trees })
    }

    fn tree(&self, t: Table) -> &sled::Tree {
        &self.trees[t as usize]
    }
}

impl Kv for SledKv {
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(t).get(key)?.map(|v| v.to_vec()))
    }

    fn scan(&self, t: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.tree(t)
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    fn apply(&self, ops: Vec<KvOp>) -> Result<(), StoreError> {
        if let [op] = ops.as_slice() {
            match op {
                KvOp::Put(t, k, v) => self.tree(*t).insert(k.as_slice(), v.as_slice())?,
                KvOp::Del(t, k) => self.tree(*t).remove(k.as_slice())?,
            };
            return Ok(());
        }
        self.trees[..]
            .transaction(|views| {
                for op in &ops {
                    match op {
                        KvOp::Put(t, k, v) => {
                            views[*t as usize].insert(k.as_slice(), v.as_slice())?;
                        }
                        KvOp::Del(t, k) => {
                            views[*t as usize].remove(k.as_slice())?;
                        }
                    }
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| StoreError::Db(format!("{e:?}")))
    }

    fn insert_new(&self, t: Table, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        Ok(self
            .tree(t)
            .compare_and_swap(key, None::<&[u8]>, Some(value))?
            .is_ok())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// The operating system's files. Where the file system supports it (probed when the
/// store opens), blobs are written with `O_DIRECT` (see [`BlobWriter`]).
#[derive(Debug)]
pub(crate) struct OsFiles {
    direct: bool,
}

impl OsFiles {
    /// Files whose blob writes go direct where a probe in `tmp` says they work.
    pub(crate) fn probing(tmp: &Path) -> Self {
        let direct = direct_writes_work(tmp);
        tracing::debug!(direct, "blob writes");
        Self { direct }
    }
}

impl Files for OsFiles {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn create_synced(&self, path: &Path, fill: Fill<'_>) -> io::Result<()> {
        let mut w = BlobWriter::create(path, self.direct)?;
        fill(&mut w)?;
        w.finish()?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        fs::File::open(dir)?.sync_all()
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn is_file(&self, path: &Path) -> bool {
        path.is_file()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(dir)?.map(|e| Ok(e?.path())).collect()
    }
}

/// Block size of direct writes: buffers, lengths and file offsets are multiples of it.
const DIRECT_BLOCK: usize = 4096;
/// Bytes a blob writer gathers before each write.
const DIRECT_PIECE: usize = 1 << 20;

/// A blob writer. Where the file system supports it (probed when the store opens), blobs
/// are written with `O_DIRECT` from a 4096-aligned 1 MiB buffer: the disk reads them
/// straight from it, instead of the CPU copying every byte into the page cache first (that
/// copy was a sixth of all CPU time in the round benchmark, more than Noise encryption);
/// a node writes two model-sized blobs a round, and reads them back only after a restart
/// or for a peer catching up. Elsewhere (tmpfs, other systems) writes go through the page
/// cache in 1 MiB pieces (one 32 MiB `write` measured 50 times slower than pieces).
struct BlobWriter {
    file: fs::File,
    direct: bool,
    /// `DIRECT_PIECE + DIRECT_BLOCK` bytes; the piece starts at `at` (4096-aligned).
    buf: Vec<u8>,
    at: usize,
    len: usize,
    written: u64,
}

impl BlobWriter {
    fn create(path: &Path, direct: bool) -> std::io::Result<Self> {
        let mut o = fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(target_os = "linux")]
        if direct {
            use std::os::unix::fs::OpenOptionsExt as _;
            o.custom_flags(O_DIRECT);
        }
        let file = o.open(path)?;
        let buf = vec![0u8; DIRECT_PIECE + DIRECT_BLOCK];
        let at = buf.as_ptr().align_offset(DIRECT_BLOCK);
        Ok(Self {
            file,
            direct,
            buf,
            at,
            len: 0,
            written: 0,
        })
    }

    /// Writes the gathered bytes: a full piece (a whole number of blocks), or the last,
    /// padded with zeros to a block when direct (`finish` cuts the file back).
    fn drain(&mut self) -> std::io::Result<()> {
        let n = if self.direct {
            self.len.next_multiple_of(DIRECT_BLOCK)
        } else {
            self.len
        };
        self.buf[self.at + self.len..self.at + n].fill(0);
        self.file.write_all(&self.buf[self.at..self.at + n])?;
        self.written += self.len as u64;
        self.len = 0;
        Ok(())
    }

    /// Flushes what is left and leaves the file exactly as long as what was written.
    fn finish(mut self) -> std::io::Result<fs::File> {
        self.drain()?;
        if self.direct {
            self.file.set_len(self.written)?;
        }
        Ok(self.file)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = bytes.len().min(DIRECT_PIECE - self.len);
        self.buf[self.at + self.len..self.at + self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        if self.len == DIRECT_PIECE {
            self.drain()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `O_DIRECT` on Linux (the value differs between architectures).
#[cfg(all(target_os = "linux", any(target_arch = "aarch64", target_arch = "arm")))]
const O_DIRECT: i32 = 0o200_000;
#[cfg(all(
    target_os = "linux",
    not(any(target_arch = "aarch64", target_arch = "arm"))
))]
const O_DIRECT: i32 = 0o40_000;

/// Whether direct writes work in `dir` (not on tmpfs, for one).
fn direct_writes_work(dir: &Path) -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    let probe = dir.join(format!("direct-probe.{}", std::process::id()));
    let ok = (|| {
        let mut w = BlobWriter::create(&probe, true)?;
        w.write_all(&[7u8; 3 * DIRECT_BLOCK / 2])?;
        let f = w.finish()?;
        f.sync_all()?;
        drop(f);
        let back = fs::read(&probe)?;
        Ok::<bool, std::io::Error>(
            back.len() == 3 * DIRECT_BLOCK / 2 && back.iter().all(|&b| b == 7),
        )
    })()
    .unwrap_or(false);
    let _ = fs::remove_file(&probe);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_writer_writes_exact_bytes_direct_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let direct = direct_writes_work(dir.path());
        for mode in [false, direct] {
            for len in [
                0,
                1,
                4095,
                4096,
                4097,
                DIRECT_PIECE,
                DIRECT_PIECE + 3,
                3 * DIRECT_PIECE + 4099,
            ] {
                let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let path = dir.path().join(format!("{mode}-{len}"));
                let mut w = BlobWriter::create(&path, mode).unwrap();
                // Odd-sized writes cross piece and block boundaries.
                for piece in bytes.chunks(777_777) {
                    w.write_all(piece).unwrap();
                }
                w.finish().unwrap().sync_all().unwrap();
                assert_eq!(fs::read(&path).unwrap(), bytes, "direct={mode} len={len}");
            }
        }
    }
}
