//! The power-loss test: [`DiskStore`] on a simulated disk that keeps a live image (what
//! the running process sees) and a durable one (what survives losing power), and forgets
//! whatever was never synced, in the manner of redb's crash-consistency test.
//!
//! A workload drives the store as a node does (blobs, own-delta records, answered epochs,
//! round commits one at a time and in catch-up batches, a fork resolved by committing a
//! round again); power fails at a chosen write; the disk comes back with what was synced
//! and, at random, some of what was not (a rename that reached the disk without its
//! folder being synced, a file's first bytes, a database batch after the last flush);
//! the store reopens on it. Then head, records, audit lines and blobs must agree, `tmp/`
//! must hold no half-written file, and nothing the store acknowledged as durable (a
//! blob, a commit, an own delta or answered epoch flushed before it went to a peer) may
//! be missing.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cellswarm_common::envelope::{PayloadKind, seal};
use cellswarm_common::identity::Identity;
use rand::{RngExt as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use super::media::{Entries, Files, Fill, Kv, KvOp, Table};
use super::*;

/// One file's bytes: as the process sees them, and as the platter holds them (`None`:
/// never synced).
#[derive(Debug, Clone, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Option<Vec<u8>>,
}

type KvImage = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

/// The simulated disk: files and database, live and durable.
#[derive(Debug, Default)]
struct Disk {
    /// Writes so far (every mutating call counts one or more).
    writes: u64,
    /// The write at which power fails: it and every later one return an error.
    fail_at: Option<u64>,
    names_live: BTreeMap<PathBuf, usize>,
    /// Every change of a folder's entries, in order (a rename is one change of two
    /// entries): the file system journals them in this order.
    names_log: Vec<Vec<(PathBuf, Option<usize>)>>,
    /// Changes up to here are durable (a folder was synced after them).
    names_synced: usize,
    inodes: Vec<Inode>,
    kv_live: KvImage,
    kv_durable: KvImage,
    /// Batches applied since the last flush, oldest first.
    kv_unflushed: Vec<Vec<KvOp>>,
}

impl Disk {
    /// Counts a write; fails it (and every later one) once power is gone.
    fn write(&mut self) -> io::Result<()> {
        self.writes += 1;
        if self.fail_at.is_some_and(|at| self.writes >= at) {
            return Err(io::Error::other("power lost"));
        }
        Ok(())
    }

    fn apply(image: &mut KvImage, batch: &[KvOp]) {
        for op in batch {
            match op {
                KvOp::Put(t, k, v) => {
                    image.insert((*t, k.clone()), v.clone());
                }
                KvOp::Del(t, k) => {
                    image.remove(&(*t, k.clone()));
                }
            }
        }
    }

    /// The disk as it comes back after power returns: everything synced, and, drawn from
    /// `rng`, some of what was not.
    fn after_power_loss(&self, rng: &mut ChaCha8Rng) -> Self {
        // The journal reached the disk up to the last synced change at least, and
        // perhaps further: folder changes survive in the order they were made, whole.
        let reached = rng.random_range(self.names_synced..=self.names_log.len());
        let mut names = BTreeMap::new();
        for change in &self.names_log[..reached] {
            for (name, inode) in change {
                match inode {
                    Some(i) => names.insert(name.clone(), *i),
                    None => names.remove(name),
                };
            }
        }
        let names_log = vec![names.iter().map(|(n, &i)| (n.clone(), Some(i))).collect()];
        let inodes = self
            .inodes
            .iter()
            .map(|n| {
                let synced = n.durable.as_ref().is_some_and(|d| *d == n.live);
                let bytes = if synced {
                    n.live.clone()
                } else if rng.random_bool(0.5) {
                    n.durable.clone().unwrap_or_default()
                } else {
                    // Some of the unsynced bytes made it.
                    let cut = rng.random_range(0..=n.live.len());
                    n.live[..cut].to_vec()
                };
                Inode {
                    live: bytes.clone(),
                    durable: Some(bytes),
                }
            })
            .collect();
        // The database holds a prefix of the batches since its last flush.
        let mut kv = self.kv_durable.clone();
        let reached = rng.random_range(0..=self.kv_unflushed.len());
        for batch in &self.kv_unflushed[..reached] {
            Self::apply(&mut kv, batch);
        }
        Self {
            writes: 0,
            fail_at: None,
            names_live: names,
            names_synced: 1,
            names_log,
            inodes,
            kv_live: kv.clone(),
            kv_durable: kv,
            kv_unflushed: Vec::new(),
        }
    }
}

/// A handle on the simulated disk, as files and as database.
#[derive(Debug, Clone, Default)]
struct SimDisk(Arc<Mutex<Disk>>);

impl SimDisk {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, path.display().to_string())
}

fn db_err(e: io::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

impl Files for SimDisk {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn create_synced(&self, path: &Path, fill: Fill<'_>) -> io::Result<()> {
        let i = {
            let mut d = self.lock();
            d.write()?;
            if d.names_live.contains_key(path) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    path.display().to_string(),
                ));
            }
            d.inodes.push(Inode::default());
            let i = d.inodes.len() - 1;
            d.names_live.insert(path.to_owned(), i);
            d.names_log.push(vec![(path.to_owned(), Some(i))]);
            i
        };
        let mut bytes = Vec::new();
        fill(&mut bytes)?;
        let mut d = self.lock();
        d.write()?;
        d.inodes[i].live = bytes;
        d.write()?;
        d.inodes[i].durable = Some(d.inodes[i].live.clone());
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.write()?;
        let i = d.names_live.remove(from).ok_or_else(|| not_found(from))?;
        d.names_live.insert(to.to_owned(), i);
        d.names_log
            .push(vec![(from.to_owned(), None), (to.to_owned(), Some(i))]);
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        // Syncing a folder commits the journal: every change so far (ext4 and XFS
        // journal folder changes in order; syncing one folder gives no more promise
        // than this about the others, and the store syncs each folder it changed).
        let mut d = self.lock();
        d.write()?;
        d.names_synced = d.names_log.len();
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let d = self.lock();
        let &i = d.names_live.get(path).ok_or_else(|| not_found(path))?;
        Ok(d.inodes[i].live.clone())
    }

    fn is_file(&self, path: &Path) -> bool {
        self.lock().names_live.contains_key(path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.write()?;
        d.names_live.remove(path).ok_or_else(|| not_found(path))?;
        d.names_log.push(vec![(path.to_owned(), None)]);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        Ok(self
            .lock()
            .names_live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect())
    }
}

impl Kv for SimDisk {
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().kv_live.get(&(t, key.to_vec())).cloned())
    }

    fn scan(&self, t: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
        Ok(self
            .lock()
            .kv_live
            .range((t, prefix.to_vec())..)
            .take_while(|((tt, k), _)| *tt == t && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, ops: Vec<KvOp>) -> Result<(), StoreError> {
        let mut d = self.lock();
        d.write().map_err(db_err)?;
        Disk::apply(&mut d.kv_live, &ops);
        d.kv_unflushed.push(ops);
        Ok(())
    }

    fn insert_new(&self, t: Table, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        if self.get(t, key)?.is_some() {
            return Ok(false);
        }
        self.apply(vec![KvOp::Put(t, key.to_vec(), value.to_vec())])?;
        Ok(true)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut d = self.lock();
        d.write().map_err(db_err)?;
        d.kv_durable = d.kv_live.clone();
        d.kv_unflushed.clear();
        Ok(())
    }
}

const ROOT: &str = "/store";

fn open(disk: &SimDisk) -> Result<DiskStore, StoreError> {
    DiskStore::open_on(
        Path::new(ROOT),
        Box::new(disk.clone()),
        Box::new(disk.clone()),
    )
}

/// What the store promised to keep: every call that returned `Ok` with a durability
/// promise, and every commit it was asked for (acknowledged or not).
#[derive(Debug, Default)]
struct Promised {
    blobs: Vec<(BlobKind, [u8; 32])>,
    genesis: Option<Head>,
    /// The head of the last acknowledged commit.
    head: Option<Head>,
    /// Every commit attempted per round (a round committed again replaces the first).
    tried: BTreeMap<u64, Vec<RoundCommit>>,
    own: Vec<OwnDelta>,
    answered: Vec<Answered>,
}

fn blob_bytes(kind: BlobKind, id: &Identity, tag: &str) -> ([u8; 32], Vec<u8>) {
    match kind {
        BlobKind::Delta => {
            let payload = format!("delta {tag}").into_bytes();
            let env = seal(id, PayloadKind::Delta, &payload);
            (*DeltaHash::of(&payload).as_bytes(), env)
        }
        BlobKind::Model | BlobKind::State => {
            let bytes = format!("{kind:?} {tag}").repeat(40).into_bytes();
            (*ModelHash::of(&bytes).as_bytes(), bytes)
        }
    }
}

/// Drives the store as a node does until the workload ends or a call fails (power is
/// gone). Every choice comes from `seed`.
fn workload(s: &DiskStore, seed: u64, members: &[Identity], p: &mut Promised) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let put = |kind: BlobKind, tag: &str, p: &mut Promised| -> Option<[u8; 32]> {
        let (h, bytes) = blob_bytes(kind, &members[0], tag);
        s.put_blob(kind, &h, &bytes).ok()?;
        p.blobs.push((kind, h));
        Some(h)
    };
    let Some(g) = put(BlobKind::Model, "genesis", p) else {
        return;
    };
    let Some(gs) = put(BlobKind::State, "genesis", p) else {
        return;
    };
    let Ok(head) = s.init_genesis(ModelHash(g), gs) else {
        return;
    };
    p.genesis = Some(head);
    let mut batch: Vec<RoundCommit> = Vec::new();
    let mut round = 0u64;
    for step in 0..rng.random_range(3..9u32) {
        round += 1;
        let r = RoundId(round);
        // Our delta: stored, its record flushed, only then sent to peers.
        let Some(d) = put(BlobKind::Delta, &format!("own {round}"), p) else {
            return;
        };
        let own = OwnDelta {
            round: r,
            delta: DeltaHash(d),
            self_seed: rng.random_bool(0.3).then_some((step, [step as u8; 32])),
            local_dp_noise: None,
        };
        if s.put_own_delta(&own).and_then(|()| s.flush()).is_err() {
            return;
        }
        p.own.push(own);
        if rng.random_bool(0.3) {
            let a = Answered {
                round: r,
                epoch: step,
            };
            if s.put_answered(a).and_then(|()| s.flush()).is_err() {
                return;
            }
            p.answered.push(a);
        }
        // What peers send: their deltas, addresses and attestations (no promise).
        let mut audit = vec![AuditEntry {
            round: r,
            signer: members[0].signer_key(),
            delta: DeltaHash(d),
            sample_count: 1,
        }];
        for (k, m) in members.iter().enumerate().skip(1) {
            if rng.random_bool(0.7) {
                let (h, bytes) = blob_bytes(BlobKind::Delta, m, &format!("{k} {round}"));
                if s.put_blob(BlobKind::Delta, &h, &bytes).is_err() {
                    return;
                }
                p.blobs.push((BlobKind::Delta, h));
                audit.push(AuditEntry {
                    round: r,
                    signer: m.signer_key(),
                    delta: DeltaHash(h),
                    sample_count: k as u64,
                });
            }
        }
        if s.put_peer(
            &format!("peer-{step}"),
            &[format!("/ip4/127.0.0.1/tcp/{step}")],
        )
        .is_err()
            || s.put_attestation(r, &[step as u8; 32], b"attestation")
                .is_err()
        {
            return;
        }
        // The merged model and state, then the commit.
        let Some(m) = put(BlobKind::Model, &format!("merged {round}"), p) else {
            return;
        };
        let Some(st) = put(BlobKind::State, &format!("merged {round}"), p) else {
            return;
        };
        let commit = |audit: Vec<AuditEntry>, tag: &str| RoundCommit {
            head: Head {
                round: r,
                record: Some(RecordHash::of(format!("record {round} {tag}").as_bytes())),
                model: ModelHash(m),
                state: st,
            },
            record_envelope: seal(
                &members[0],
                PayloadKind::MergeRecord,
                format!("record {round} {tag}").as_bytes(),
            ),
            audit,
        };
        let c = commit(audit.clone(), "first");
        p.tried.entry(round).or_default().push(c.clone());
        batch.push(c);
        // A catch-up commits several rounds in one step; a live round commits at once.
        if rng.random_bool(0.3) && step % 4 != 3 {
            continue;
        }
        if s.commit_rounds(&batch).is_err() {
            return;
        }
        p.head = batch.last().map(|c| c.head);
        batch.clear();
        // A fork resolved in favour of the peers' record of this round: committed again
        // with other contributors, whose audit lines replace the first record's.
        if rng.random_bool(0.2) {
            let fewer: Vec<AuditEntry> = audit.iter().skip(1).copied().collect();
            let again = commit(fewer, "again");
            p.tried.entry(round).or_default().push(again.clone());
            if s.commit_round(&again).is_err() {
                return;
            }
            p.head = Some(again.head);
        }
    }
}

/// Checks a store reopened after power loss against what it promised.
fn check_after(s: &DiskStore, p: &Promised, disk: &SimDisk, what: &str) {
    let tmp = Path::new(ROOT).join("tmp");
    let left = disk.list(&tmp).unwrap();
    assert!(
        left.iter()
            .all(|f| f.extension().is_none_or(|x| x != "partial")),
        "{what}: tmp/ still holds {left:?}"
    );
    for (kind, h) in &p.blobs {
        assert!(
            s.blob(*kind, h).unwrap().is_some(),
            "{what}: acknowledged {kind:?} blob {} lost",
            hex::encode(&h[..6])
        );
    }
    for own in &p.own {
        assert_eq!(
            s.own_delta(own.round).unwrap().as_ref(),
            Some(own),
            "{what}: acknowledged own delta lost"
        );
    }
    for a in &p.answered {
        assert_eq!(
            s.answered(a.round).unwrap(),
            Some(a.epoch),
            "{what}: acknowledged answered epoch of round {} lost",
            a.round
        );
    }
    let head = s.head().unwrap();
    let Some(head) = head else {
        assert!(p.genesis.is_none(), "{what}: acknowledged genesis lost");
        return;
    };
    let acked = p.head.or(p.genesis).map_or(0, |h| h.round.0);
    assert!(
        head.round.0 >= acked,
        "{what}: head at round {} but round {acked} was acknowledged",
        head.round
    );
    let report = s.check().unwrap();
    assert!(
        report.head_model_ok && report.head_state_ok && report.quarantined.is_empty(),
        "{what}: head {head:?} does not check: {report:?}"
    );
    // Every round up to the head has the record and exactly the audit lines of one of
    // the commits tried for it; none beyond the head has either.
    for r in 1..=head.round.0 + 2 {
        let record = s.record(RoundId(r)).unwrap();
        let mut audit = s.audit(RoundId(r)).unwrap();
        audit.sort_by_key(|a| a.signer);
        if r > head.round.0 {
            assert!(
                record.is_none() && audit.is_empty(),
                "{what}: round {r} stored beyond the head (round {})",
                head.round
            );
            continue;
        }
        let record = record.unwrap_or_else(|| panic!("{what}: round {r} has no record"));
        let c = p.tried[&r]
            .iter()
            .find(|c| c.record_envelope == record)
            .unwrap_or_else(|| panic!("{what}: round {r}'s record was never committed"));
        let mut want = c.audit.clone();
        want.sort_by_key(|a| a.signer);
        assert_eq!(audit, want, "{what}: round {r}'s audit lines");
        if r == head.round.0 {
            assert_eq!(c.head, head, "{what}: the head and its record disagree");
        }
    }
    // The store goes on working: one more round commits.
    let next = RoundId(head.round.0 + 1);
    let commit = RoundCommit {
        head: Head {
            round: next,
            record: Some(RecordHash::of(b"after")),
            ..head
        },
        record_envelope: b"after".to_vec(),
        audit: Vec::new(),
    };
    s.commit_round(&commit).unwrap();
    assert_eq!(
        s.head().unwrap(),
        Some(commit.head),
        "{what}: commit after reopening"
    );
}

fn members() -> Vec<Identity> {
    (1..=4u8)
        .map(|i| Identity::from_seed([i; 32]).unwrap())
        .collect()
}

/// Runs `seed`'s workload with power failing at write `fail_at` (`None`: never), brings
/// the disk back with unsynced writes drawn from `seed`, reopens and checks.
fn crash_and_check(seed: u64, fail_at: Option<u64>, members: &[Identity]) -> u64 {
    let disk = SimDisk::default();
    disk.lock().fail_at = fail_at;
    let mut p = Promised::default();
    {
        let s = open(&disk).unwrap();
        workload(&s, seed, members, &mut p);
    }
    let writes = disk.lock().writes;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fail_at.unwrap_or(0).rotate_left(32));
    let back = SimDisk(Arc::new(Mutex::new(disk.lock().after_power_loss(&mut rng))));
    let what = format!("seed {seed}, power lost at write {fail_at:?}");
    let s = open(&back).unwrap_or_else(|e| panic!("{what}: the store does not reopen: {e}"));
    check_after(&s, &p, &back, &what);
    writes
}

#[test]
fn power_loss_at_every_write_keeps_the_store_consistent() {
    let members = members();
    // Every write of a few workloads, then random writes of many more.
    let mut crashes = 0u64;
    for seed in 0..4 {
        let total = crash_and_check(seed, None, &members);
        assert!(total > 50, "the workload writes ({total})");
        for at in 1..=total {
            crash_and_check(seed, Some(at), &members);
            crashes += 1;
        }
    }
    for seed in 4..400 {
        let total = crash_and_check(seed, None, &members);
        let at = ChaCha8Rng::seed_from_u64(seed).random_range(1..=total);
        crash_and_check(seed, Some(at), &members);
        crashes += 1;
    }
    assert!(crashes > 400);
}

#[test]
fn the_simulated_disk_forgets_what_was_never_synced() {
    // The test's disk must be able to lose things, or the test above proves nothing.
    let disk = SimDisk::default();
    let dir = Path::new("/d");
    let (a, b) = (dir.join("a"), dir.join("b"));
    disk.create_synced(&a, Box::new(|w| w.write_all(b"synced")))
        .unwrap();
    disk.sync_dir(dir).unwrap();
    disk.rename(&a, &b).unwrap();
    disk.apply(vec![KvOp::Put(Table::Meta, b"k".to_vec(), b"v".to_vec())])
        .unwrap();
    let mut lost_rename = false;
    let mut lost_batch = false;
    for seed in 0..64 {
        let back = disk
            .lock()
            .after_power_loss(&mut ChaCha8Rng::seed_from_u64(seed));
        lost_rename |= back.names_live.contains_key(&a);
        lost_batch |= back.kv_live.is_empty();
        // Whichever name survived, its bytes were synced.
        let i = back.names_live.get(&a).or(back.names_live.get(&b)).unwrap();
        assert_eq!(back.inodes[*i].live, b"synced");
    }
    assert!(lost_rename && lost_batch);
}
