//! The round state machine (see `docs/protocol.md`).
//!
//! One task owns a node's protocol state. Everything that can block (training, merging,
//! store reads for peers) runs elsewhere and reports back through a channel; the engine
//! reacts to network events, to those reports, and to a periodic tick that checks the
//! deadlines.
//!
//! Round r, from a member's point of view:
//! 1. **Train** from M(r-1) on a blocking thread (cancellable).
//! 2. **Propose**: frame `{consortium, r, H(r-1), samples, metrics}` with the encoded
//!    delta, sign it, store it and record it as our delta for r (so a restart re-announces
//!    the same delta instead of training a different one), then announce its hash.
//! 3. **Collect** every member's delta: fetch announced ones over request-response and
//!    verify them (member, signature, hash, consortium, round, base, layout, finite
//!    values, norm bound, not a replay, one delta per member).
//! 4. **Merge**: collection is complete when every connected member has a delta in, or
//!    `collect_timeout` after the round started, once the quorum is met. Candidates are
//!    the contributors ordered by SHA-256(signer ‖ r); candidate `a` merges
//!    `a × merge_timeout` after completion unless a record arrived. The merger publishes
//!    its signed record, then commits.
//! 5. **Verify**: every member recomputes the record's merge from the same deltas
//!    (fetching those it lacks) and commits M(r) only if its hash matches.
//!
//! A member that is behind (peers' heartbeats show a later round) fetches the chain of
//! records, checks each by the rules of a live round and recomputes its merge from the
//! deltas it names (`super::catchup`), and rejoins. The rules themselves live in the
//! `cellswarm-round` crate.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cellswarm_aggregator::dp::{RdpAccountant, privatize};
use cellswarm_aggregator::masking::FixedPoint;
use cellswarm_aggregator::{AggregateError, Merged, Merger, MergerState, Update};
use cellswarm_common::config::{Config, EncodingKind};
use cellswarm_common::delta::{Delta, DeltaEncoding, DeltaLimits};
use cellswarm_common::envelope::{
    ENVELOPE_HEADER_LEN, MemberKeys, PayloadKind, UnverifiedEnvelope, seal, seal_hashed,
    seal_in_place,
};
use cellswarm_common::identity::{Identity, signer_key_from_peer_id};
use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};
use cellswarm_common::weights::{Layout, Limits, Weights};
use cellswarm_common::wire::{
    Announcement, Contribution, DeltaHeader, LocalMetrics, MaskMessage, MergeRecord, Request,
    ResponseHeader, decode_control, encode_control, encode_frame,
};
use libp2p::PeerId;
use libp2p::gossipsub::MessageAcceptance;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::catchup::{self, Rewind, SyncOutcome, SyncSetup};
use super::codec::SyncResponse;
use super::local::{LocalTrainer, RoundError, TrainedRound};
use super::network::{NetClient, NetError, NetEvent};
use super::secagg::{self, EpochKeys};
use super::status::{Metrics, RejectReason, Status};
use super::verify::{self, Checked, CheckedRecord, DeltaCheck, Gossip, MAX_RECORD_BYTES};
use crate::store::{BlobKind, Head, RoundCommit, Store, StoreError};
use cellswarm_common::records::{Answered, OwnDelta};
use cellswarm_round::{ChainCheck, OwnedRules, Position, Rules, Turns};

/// What stops a node.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The consortium names no genesis model.
    #[error(
        "the consortium file names no genesis model: run `cellswarm genesis --config FILE` at one member, \
         put the printed hash in consortium.toml as `genesis = \"...\"`, and share the file"
    )]
    NoGenesis,
    /// A stored model does not fit this node's model.
    #[error("the stored model does not fit the configured model: {0}")]
    Layout(String),
    /// The aggregator could not be configured or restored.
    #[error("aggregator: {0}")]
    Aggregator(#[from] AggregateError),
    /// Secure aggregation cannot run with the consortium's settings.
    #[error(transparent)]
    SecAgg(#[from] secagg::SecAggError),
}

/// Where a node is in its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the starting model (genesis or catching up).
    Syncing,
    /// Training locally.
    Training,
    /// Collecting deltas.
    Collecting,
    /// Merging (as the round's merger) or verifying a merge record.
    Merging,
    /// Finished `rounds.max_rounds`.
    Done,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Syncing => "syncing",
            Self::Training => "training",
            Self::Collecting => "collecting",
            Self::Merging => "merging",
            Self::Done => "done",
        }
    }
}

/// A verified delta in a round's pool.
#[derive(Debug, Clone)]
struct Pooled {
    hash: DeltaHash,
    content: Checked,
    /// When it was pooled.
    at: Instant,
}

impl Pooled {
    fn new(hash: DeltaHash, content: Checked) -> Self {
        Self {
            hash,
            content,
            at: Instant::now(),
        }
    }

    fn plain(&self) -> Option<&Update> {
        match &self.content {
            Checked::Plain(u) => Some(u),
            Checked::Masked { .. } => None,
        }
    }

    fn masked(&self) -> Option<(&[u32], u32, u64)> {
        match &self.content {
            Checked::Masked {
                words,
                epoch,
                samples,
            } => Some((words, *epoch, *samples)),
            Checked::Plain(_) => None,
        }
    }

    fn sample_count(&self) -> u64 {
        match &self.content {
            Checked::Plain(u) => u.sample_count,
            Checked::Masked { samples, .. } => *samples,
        }
    }
}

/// Key shares of one masking epoch: by sender, the public key it made for each recipient.
type KeyBook = BTreeMap<SignerKey, BTreeMap<SignerKey, [u8; 32]>>;

/// Seed shares of one masking epoch: by sender, the commitment to its self-mask seed and
/// the share it sealed for us (sealed 32 bytes and tag), if any.
type ShareBook = BTreeMap<SignerKey, ([u8; 32], Option<([u8; 32], [u8; 16])>)>;

/// What a member keeps of an epoch it left for a restart after sending its masked delta
/// in it, to answer that epoch's seal should a member with a complete view send one.
#[derive(Debug)]
struct PastEpoch {
    participants: BTreeSet<SignerKey>,
    seed: [u8; 32],
    own_hash: DeltaHash,
    pairs: Vec<(SignerKey, [u8; 32])>,
}

/// Secure aggregation's state in a round: the masking epoch and who takes part.
#[derive(Debug)]
struct MaskRound {
    epoch: u32,
    participants: BTreeSet<SignerKey>,
    epoch_started: Instant,
    /// Our keys of this epoch (used up when we mask).
    keys: Option<EpochKeys>,
    /// Our clipped (and, under local DP, noised) update, kept to mask again after a restart.
    plain: Option<(Vec<f32>, u64, LocalMetrics)>,
    /// The epoch whose masked delta we sent.
    sent_epoch: Option<u32>,
    /// When the collection of this epoch timed out (restart turns are counted from it).
    timed_out_at: Option<Instant>,
    /// A restart received before this member's own epoch timed out, kept until it may
    /// be adopted: (signer, epoch, participants).
    pending_restart: Option<(SignerKey, u32, BTreeSet<SignerKey>)>,
    /// The signed restart that began this epoch, repeated every heartbeat.
    restart_envelope: Option<Vec<u8>>,
    /// Our self-mask seed of the epoch we sent (double masking).
    self_seed: Option<[u8; 32]>,
    /// The epoch's seal: every participant's masked delta, by hash.
    seal: Option<Vec<(SignerKey, DeltaHash)>>,
    /// Self-mask seeds of the sealed epoch: revealed by their owners or rebuilt from
    /// shares.
    reveals: BTreeMap<SignerKey, [u8; 32]>,
    /// Shares of participants' seeds revealed for the sealed epoch: owner -> x -> y.
    revealed_shares: BTreeMap<SignerKey, BTreeMap<u8, [u8; 32]>>,
    /// Our pair secrets of this epoch (kept after masking to open the seed shares sealed
    /// for us).
    pairs: Vec<(SignerKey, [u8; 32])>,
    /// Our seed shares, seal and answer of this epoch, repeated every heartbeat.
    seal_envelopes: Vec<Vec<u8>>,
    /// The one epoch of this round we answered (revealed our seed and shares for); kept
    /// across epochs, and in the store across restarts.
    answered: Option<u32>,
    /// The participants of the epoch we answered (unknown after a restart of this node).
    answered_set: Option<BTreeSet<SignerKey>>,
    /// Epochs of this round we sent a masked delta in and then left for a restart.
    past: BTreeMap<u32, PastEpoch>,
    /// Epochs whose complete unmasked sum we computed ourselves and found not to cancel
    /// (inconsistent keys): nothing can be learnt from them, so answering a later epoch
    /// among the same participants is allowed after one.
    burned: BTreeSet<u32>,
    /// An epoch whose unmasked mean was refused for its norm (not computed again).
    refused: Option<u32>,
}

impl MaskRound {
    /// Whether we may still answer an epoch of this round among `participants`: never
    /// answered, or only an epoch whose sum was found not to cancel and among the very
    /// same participants (so that no two epochs' sums over different sets can both be
    /// unmasked, even when a malicious member forces a burn).
    fn may_answer_with(&self, participants: &BTreeSet<SignerKey>) -> bool {
        match self.answered {
            None => true,
            Some(e) => self.burned.contains(&e) && self.answered_set.as_ref() == Some(participants),
        }
    }
}

/// The state of the round being worked on.
#[derive(Debug)]
struct RoundState {
    id: RoundId,
    started: Instant,
    pool: BTreeMap<SignerKey, Pooled>,
    fetching: HashSet<DeltaHash>,
    bad: HashSet<DeltaHash>,
    ready_at: Option<Instant>,
    merging: bool,
    verifying: Option<RecordHash>,
    seen_records: HashSet<RecordHash>,
    last_list_request: HashMap<PeerId, Instant>,
    /// Size of our own delta envelope (announced with it).
    own_bytes: u64,
    /// Our own delta envelope, served to peers from memory (one buffer for all).
    own_env: Option<(DeltaHash, bytes::Bytes)>,
    /// Secure aggregation, when on.
    mask: Option<MaskRound>,
    /// Records of this round accepted on a commit certificate over our own view of the
    /// round: recomputed and committed, but not attested by us.
    certified: HashSet<RecordHash>,
}

impl RoundState {
    fn new(id: RoundId) -> Self {
        Self {
            mask: None,
            id,
            started: Instant::now(),
            pool: BTreeMap::new(),
            fetching: HashSet::new(),
            bad: HashSet::new(),
            ready_at: None,
            merging: false,
            verifying: None,
            seen_records: HashSet::new(),
            last_list_request: HashMap::new(),
            own_bytes: 0,
            own_env: None,
            certified: HashSet::new(),
        }
    }
}

enum Internal {
    Trained {
        round: RoundId,
        trainer: Box<dyn LocalTrainer>,
        result: Result<TrainedRound, RoundError>,
    },
    Fetched {
        round: RoundId,
        hash: DeltaHash,
        peer: PeerId,
        result: Result<SyncResponse, NetError>,
    },
    RecordFetched {
        round: RoundId,
        expected: Option<RecordHash>,
        peer: PeerId,
        result: Result<SyncResponse, NetError>,
    },
    List {
        round: RoundId,
        peer: PeerId,
        result: Result<SyncResponse, NetError>,
    },
    Merged {
        round: RoundId,
        record: Box<MergeRecord>,
        result: Result<Merged, AggregateError>,
        /// The base model, when the merge did not write over it.
        base: Option<Arc<Weights>>,
    },
    Verified {
        round: RoundId,
        hash: RecordHash,
        envelope: Vec<u8>,
        record: Box<MergeRecord>,
        result: Result<Merged, AggregateError>,
        /// The base model, when the merge did not write over it.
        base: Option<Arc<Weights>>,
    },
    Synced(Result<SyncOutcome, catchup::CatchUpError>),
    GenesisFetched(Result<(Weights, Option<Vec<u8>>), String>),
    Evaluated(Option<f32>),
}

pub use cellswarm_round::merger_order;

/// Everything the engine needs to start.
pub struct EngineParts {
    /// Site and consortium configuration.
    pub config: Config,
    /// This node's key.
    pub identity: Arc<Identity>,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// The network.
    pub net: NetClient,
    /// Network events.
    pub events: mpsc::Receiver<NetEvent>,
    /// Local training.
    pub trainer: Box<dyn LocalTrainer>,
    /// The model's layout.
    pub layout: Arc<Layout>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Where status snapshots go.
    pub status: watch::Sender<Status>,
    /// Stops the engine.
    pub cancel: CancellationToken,
    /// Tracks the engine's helper tasks (fetches, merges, training), so that a stopping
    /// node waits for them.
    pub tracker: TaskTracker,
}

impl std::fmt::Debug for EngineParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineParts").finish_non_exhaustive()
    }
}

/// The round state machine of one node.
pub struct Engine {
    config: Config,
    digest: [u8; 32],
    identity: Arc<Identity>,
    me: SignerKey,
    members: MemberKeys,
    peer_of: BTreeMap<SignerKey, PeerId>,
    signer_of: HashMap<PeerId, SignerKey>,
    store: Arc<dyn Store>,
    net: NetClient,
    events: mpsc::Receiver<NetEvent>,
    /// In a mutex only so that the engine is `Sync` (its futures hold `&self`); only
    /// the engine task touches it, through `get_mut`.
    trainer: std::sync::Mutex<Option<Box<dyn LocalTrainer>>>,
    train_cancel: Arc<AtomicBool>,
    merger: Merger,
    layout: Arc<Layout>,
    head: Option<Head>,
    model: Option<Arc<Weights>>,
    round: Option<RoundState>,
    phase: Phase,
    connected: HashSet<PeerId>,
    peer_rounds: HashMap<PeerId, (RoundId, ModelHash)>,
    syncing: bool,
    /// Our attestation of the head round, repeated with every heartbeat.
    last_attestation: Option<Vec<u8>>,
    /// The head a catch-up in flight started from.
    sync_head: Option<Head>,
    last_record: Option<MergeRecord>,
    metrics: Arc<Metrics>,
    status: watch::Sender<Status>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    last_heartbeat: Instant,
    heartbeat: Duration,
    limits: DeltaLimits,
    merged_hashes: HashSet<DeltaHash>,
    pending_records: Vec<(Vec<u8>, Option<RecordHash>, PeerId)>,
    fetching_genesis: bool,
    restart_when_trainer_returns: bool,
    ahead_since: Option<Instant>,
    last_record_request: Option<Instant>,
    published: Option<(RoundId, Vec<u8>)>,
    /// Local-DP accounting: the privatized deltas this node has released (from the store).
    dp_spent: RdpAccountant,
    /// Secure aggregation: the fixed-point encoding, when on.
    fixed_point: Option<FixedPoint>,
    /// Secure aggregation: keys received, by (round, epoch), sender, then recipient.
    mask_keys: BTreeMap<(RoundId, u32), KeyBook>,
    /// The head model is lent to a merge in flight (see `spawn_merge`).
    model_lent: bool,
    /// The head model's hash when it was lent (it comes back only to the same head).
    lent_head: Option<ModelHash>,
    /// Seed shares received, by (round, epoch).
    mask_shares: BTreeMap<(RoundId, u32), ShareBook>,
    /// Shares that rebuild a participant's self-mask seed (from the member count).
    share_threshold: usize,
    /// `testing.ignore_deltas_from`, as signer keys.
    ignore_deltas_from: BTreeSet<SignerKey>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("phase", &self.phase)
            .field("round", &self.round.as_ref().map(|r| r.id))
            .finish_non_exhaustive()
    }
}

/// Rounds whose deltas a member keeps and serves to members catching up (the state
/// machine's `HISTORY`: the rounds it can replace).
const KEPT_ROUNDS: u64 = cellswarm_round::machine::HISTORY as u64;

/// Most masking epochs of one round (restarts beyond it are refused).
const MAX_MASK_EPOCHS: u32 = 16;

/// Clips `delta` to norm `clip` and adds Gaussian noise (`noise_multiplier * clip`) from a
/// fresh secret seed of the operating system's generator.
fn privatize_delta(delta: Delta, clip: f64, noise_multiplier: f64) -> Result<Delta, String> {
    use ring::rand::SecureRandom as _;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    ring::rand::SystemRandom::new()
        .fill(seed.as_mut())
        .map_err(|_| "the operating system's random generator failed".to_owned())?;
    let layout = Arc::clone(delta.layout());
    let mut values = delta.into_values();
    privatize(&mut values, clip, noise_multiplier, *seed);
    Delta::from_flat(layout, values).map_err(|e| e.to_string())
}

/// Why a masked round's sum gave no update to merge.
#[derive(Debug, thiserror::Error)]
enum MaskedError {
    /// A plain delta among the masked ones.
    #[error("an unmasked delta in a masked round")]
    Unmasked,
    /// Nothing to sum.
    #[error("no masked deltas")]
    Empty,
    /// Summing or unmasking failed: mostly masks that did not cancel (see
    /// [`secagg::unmask_mean`]).
    #[error(transparent)]
    Cancel(#[from] secagg::SecAggError),
    /// The unmasked mean is longer than `clip_norm` allows: a participant sent an update
    /// it had not clipped (which no one can tell from its masked words).
    #[error(
        "the unmasked mean's L2 norm is {norm:.6}, over clip_norm {clip}: a participant sent an update it had not clipped"
    )]
    Norm {
        /// The mean's L2 norm.
        norm: f64,
        /// `aggregation.clip_norm`.
        clip: f64,
    },
}

/// The mean of a masked round's deltas, unmasked with every self-mask seed. Each member
/// clips its update to `clip_norm` before masking, so the mean of honest updates is no
/// longer than that (plus the fixed-point rounding): a longer one is refused.
#[allow(clippy::too_many_arguments)]
fn masked_update(
    fp: &FixedPoint,
    layout: &Arc<Layout>,
    entries: &[(SignerKey, &Pooled)],
    self_seeds: &[[u8; 32]],
    round: RoundId,
    epoch: u32,
    base: ModelHash,
    clip_norm: Option<f64>,
) -> Result<Update, MaskedError> {
    let mut words = Vec::new();
    let mut ids = Vec::new();
    let mut samples = 0u64;
    for (_, p) in entries {
        let (w, _, n) = p.masked().ok_or(MaskedError::Unmasked)?;
        words.push(w);
        ids.extend_from_slice(p.hash.as_bytes());
        samples = samples.saturating_add(n);
    }
    let first = entries.first().map(|(s, _)| *s).ok_or(MaskedError::Empty)?;
    let mean = secagg::unmask_mean(fp, &words, self_seeds, round, epoch, layout)?;
    if let Some(clip) = clip_norm {
        let v = mean.values();
        let norm = v
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        // Each coordinate of the mean is within one fixed-point step of the true mean.
        let rounding = (v.len() as f64).sqrt() / fp.scale();
        if norm > clip * (1.0 + 1e-6) + rounding {
            return Err(MaskedError::Norm { norm, clip });
        }
    }
    Ok(Update::new(
        first,
        DeltaHash(sha(&ids)),
        base,
        samples.max(1),
        mean,
    ))
}

/// SHA-256 of `bytes` (aggregator states are named by it).
pub(super) fn sha(bytes: &[u8]) -> [u8; 32] {
    *ModelHash::of(bytes).as_bytes()
}

/// A model from `store` by hash, on `layout` (shared, so merges take the pointer-equality
/// fast path); `None` if the store lacks it.
///
/// # Errors
/// Store errors, and a stored model of another layout.
pub(super) fn read_model(
    store: &dyn Store,
    layout: &Arc<Layout>,
    limits: Limits,
    hash: &ModelHash,
) -> Result<Option<Weights>, EngineError> {
    let Some(bytes) = store.blob(BlobKind::Model, hash.as_bytes())? else {
        return Ok(None);
    };
    let layout_err = |e: &dyn std::fmt::Display| EngineError::Layout(e.to_string());
    let w = Weights::from_bytes(&bytes, &limits).map_err(|e| layout_err(&e))?;
    layout.ensure_same(w.layout()).map_err(|e| layout_err(&e))?;
    Ok(Some(
        Weights::from_flat(Arc::clone(layout), w.into_values()).map_err(|e| layout_err(&e))?,
    ))
}

impl Engine {
    /// Builds the engine.
    ///
    /// # Errors
    /// An aggregator configuration the consortium file should have refused.
    pub fn new(p: EngineParts) -> Result<Self, EngineError> {
        let merger = Merger::from_config(&p.config.consortium.aggregation)?;
        let mut peer_of = BTreeMap::new();
        let mut signer_of = HashMap::new();
        for m in &p.config.consortium.members {
            if let Ok(k) = signer_key_from_peer_id(&m.peer_id) {
                peer_of.insert(k, m.peer_id);
                signer_of.insert(m.peer_id, k);
            }
        }
        let members = MemberKeys::new(peer_of.keys().copied());
        let fixed_point = if p.config.consortium.aggregation.secure_aggregation {
            Some(secagg::fixed_point(
                &p.config.consortium.aggregation,
                peer_of.len(),
            )?)
        } else {
            None
        };
        let (internal_tx, internal_rx) = mpsc::channel(256);
        let merge_timeout = p.config.consortium.rounds.merge_timeout;
        let max = p.config.node.net.max_message_bytes;
        let share_threshold = secagg::share_threshold(peer_of.len());
        let ignore_deltas_from = peer_of
            .iter()
            .filter(|(_, id)| {
                p.config
                    .node
                    .testing
                    .ignore_deltas_from
                    .contains(&id.to_string())
            })
            .map(|(k, _)| *k)
            .collect();
        Ok(Self {
            digest: p.config.consortium.agreement_digest(),
            me: p.identity.signer_key(),
            config: p.config,
            identity: p.identity,
            members,
            peer_of,
            signer_of,
            store: p.store,
            net: p.net,
            events: p.events,
            trainer: std::sync::Mutex::new(Some(p.trainer)),
            train_cancel: Arc::new(AtomicBool::new(false)),
            merger,
            limits: DeltaLimits {
                max_bytes: max,
                layout: Limits {
                    max_tensors: 4096,
                    max_params: p.layout.total() as u64,
                },
            },
            layout: p.layout,
            head: None,
            model: None,
            round: None,
            phase: Phase::Syncing,
            connected: HashSet::new(),
            peer_rounds: HashMap::new(),
            syncing: false,
            last_attestation: None,
            sync_head: None,
            last_record: None,
            metrics: p.metrics,
            status: p.status,
            internal_tx,
            internal_rx,
            cancel: p.cancel,
            tracker: p.tracker,
            last_heartbeat: Instant::now(),
            heartbeat: (merge_timeout / 4)
                .clamp(Duration::from_millis(250), Duration::from_secs(5)),
            merged_hashes: HashSet::new(),
            pending_records: Vec::new(),
            fetching_genesis: false,
            restart_when_trainer_returns: false,
            ahead_since: None,
            last_record_request: None,
            published: None,
            dp_spent: RdpAccountant::default(),
            fixed_point,
            mask_keys: BTreeMap::new(),
            mask_shares: BTreeMap::new(),
            model_lent: false,
            lent_head: None,
            share_threshold,
            ignore_deltas_from,
        })
    }

    /// Runs until cancelled; on cancellation abandons the round, flushes the store and
    /// returns.
    ///
    /// # Errors
    /// A store that fails, or a missing genesis model.
    pub async fn run(mut self) -> Result<(), EngineError> {
        self.bootstrap().await?;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => break,
                ev = self.events.recv() => match ev {
                    Some(ev) => self.on_net(ev).await,
                    None => break,
                },
                Some(msg) = self.internal_rx.recv() => self.on_internal(msg).await?,
                _ = tick.tick() => self.on_tick().await?,
            }
        }
        self.train_cancel.store(true, Ordering::Relaxed);
        self.store.flush()?;
        self.publish_status(true);
        tracing::info!("engine stopped; store flushed");
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Start-up
    // ---------------------------------------------------------------------------------

    async fn bootstrap(&mut self) -> Result<(), EngineError> {
        self.restore_dp_accounting()?;
        if let Some(head) = self.store.head()? {
            self.restore_merged_hashes(head.round)?;
            let model = self.load_model(&head.model)?;
            let state = self.store.blob(BlobKind::State, &head.state)?;
            match (model, state) {
                (Some(m), Some(s)) => {
                    self.merger.load_state(&s, &self.layout)?;
                    self.adopt_head(head, m);
                    self.last_record = self.load_record(head.round)?;
                    tracing::info!(round = %head.round, model = %head.model.short(), "resumed from the store");
                    self.start_round().await;
                }
                _ => {
                    tracing::warn!(round = %head.round, "the store's head model or state is missing or damaged; fetching it from peers");
                    self.head = Some(head);
                    self.phase = Phase::Syncing;
                }
            }
            return Ok(());
        }
        let Some(genesis) = self.config.consortium.genesis else {
            return Err(EngineError::NoGenesis);
        };
        if let Some(m) = self.load_model(&genesis)? {
            self.commit_genesis(m)?;
            self.start_round().await;
            return Ok(());
        }
        // Many models (the test-vector model, a seeded U-Net) can be rebuilt locally.
        if let Some(t) = self.trainer_slot().as_mut() {
            let w = t.genesis(0);
            if w.hash() == genesis {
                self.store
                    .put_blob(BlobKind::Model, genesis.as_bytes(), &w.to_bytes())?;
                self.commit_genesis(w)?;
                self.start_round().await;
                return Ok(());
            }
        }
        tracing::info!(model = %genesis.short(), "waiting for a peer to send the genesis model");
        self.phase = Phase::Syncing;
        self.publish_status(false);
        Ok(())
    }

    fn trainer_slot(&mut self) -> &mut Option<Box<dyn LocalTrainer>> {
        self.trainer
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn commit_genesis(&mut self, model: Weights) -> Result<(), EngineError> {
        let state = self.merger.save_state(&self.layout);
        let state_hash = sha(&state);
        self.store.put_blob(BlobKind::State, &state_hash, &state)?;
        let head = self.store.init_genesis(model.hash(), state_hash)?;
        self.adopt_head(head, model);
        Ok(())
    }

    fn restore_merged_hashes(&mut self, up_to: RoundId) -> Result<(), EngineError> {
        for r in 1..=up_to.0 {
            for a in self.store.audit(RoundId(r))? {
                self.merged_hashes.insert(a.delta);
            }
        }
        Ok(())
    }

    fn load_model(&self, hash: &ModelHash) -> Result<Option<Weights>, EngineError> {
        read_model(&*self.store, &self.layout, self.limits.layout, hash)
    }

    /// The head model: held, or (while a merge writes over the lent one, or after a
    /// merge that wrote over it was not accepted) read back from the store.
    fn base_model(&mut self) -> Option<Arc<Weights>> {
        if let Some(m) = &self.model {
            return Some(Arc::clone(m));
        }
        let head = self.head?;
        match self.load_model(&head.model) {
            Ok(Some(w)) => {
                let w = Arc::new(w);
                if !self.model_lent {
                    self.model = Some(Arc::clone(&w));
                }
                Some(w)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(model = %head.model.short(), error = %e, "could not read the head model back");
                None
            }
        }
    }

    /// A lent model comes back: held again unless the head moved on meanwhile (a sync).
    fn take_back(&mut self, base: Option<Arc<Weights>>) {
        self.model_lent = false;
        if self.model.is_none() && self.head.map(|h| h.model) == self.lent_head.take() {
            self.model = base;
        }
    }

    /// After a merge came back: the head model is held again (read back from the store
    /// if the merge wrote over it and its result was not committed).
    fn ensure_model(&mut self) {
        if self.model.is_none() && !self.model_lent && self.head.is_some() {
            let _ = self.base_model();
        }
    }

    fn load_record(&self, round: RoundId) -> Result<Option<MergeRecord>, EngineError> {
        Ok(self.store.record(round)?.and_then(|env| {
            let u = UnverifiedEnvelope::parse(env, MAX_RECORD_BYTES).ok()?;
            let v = u.verify(PayloadKind::MergeRecord, &self.members).ok()?;
            decode_control(v.payload()).ok()
        }))
    }

    fn adopt_head(&mut self, head: Head, model: Weights) {
        self.head = Some(head);
        self.model = Some(Arc::new(model));
    }

    // ---------------------------------------------------------------------------------
    // Rounds
    // ---------------------------------------------------------------------------------

    fn current(&self) -> RoundId {
        self.head.map_or(RoundId(1), |h| h.round.next())
    }

    async fn start_round(&mut self) {
        let r = self.current();
        if let Some(max) = self.config.consortium.rounds.max_rounds
            && r.0 > max
        {
            {
                self.phase = Phase::Done;
                self.round = None;
                tracing::info!(rounds = max, "finished the configured number of rounds");
                self.publish_status(false);
                return;
            }
        }
        self.round = Some(RoundState::new(r));
        if self.fixed_point.is_some() {
            self.mask_keys.retain(|(round, _), _| *round >= r);
            self.mask_shares.retain(|(round, _), _| *round >= r);
            let everyone: BTreeSet<SignerKey> = self.peer_of.keys().copied().collect();
            self.begin_epoch(0, everyone).await;
        }
        // A delta this node already proposed for r (before a restart) is re-announced
        // rather than trained again: one delta per member per round.
        if let Ok(Some(own)) = self.own_delta(r) {
            tracing::info!(round = %r, delta = %own.short(), "re-announcing the delta proposed before the restart");
            self.phase = Phase::Collecting;
            if let Ok(Some(env)) = self.store.blob(BlobKind::Delta, own.as_bytes()) {
                let bytes = env.len() as u64;
                let seed = self.own_self_seed(r);
                if let Some(rs) = self.round.as_mut() {
                    rs.own_bytes = bytes;
                    // A masked delta of this epoch: its seed lets us answer its seal.
                    if let (Some(m), Some((epoch, seed))) = (rs.mask.as_mut(), seed)
                        && m.epoch == epoch
                    {
                        m.sent_epoch = Some(epoch);
                        m.self_seed = Some(seed);
                    }
                }
                self.accept_envelope(r, own, env, None);
                self.announce_delta(r, own, bytes).await;
            }
            self.publish_status(false);
            self.heartbeat_now().await;
            return;
        }
        self.phase = Phase::Training;
        self.publish_status(false);
        self.heartbeat_now().await;
        // Faster peers may have announced their deltas for this round while we were
        // still finishing the last one: ask for what they hold.
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        for p in peers {
            self.ask_for_deltas(p);
        }
        // The model first: a trainer taken out of its slot and then dropped would never
        // train again.
        let Some(model) = self.base_model() else {
            return;
        };
        let Some(mut trainer) = self.trainer_slot().take() else {
            return;
        };
        let cancel = Arc::new(AtomicBool::new(false));
        self.train_cancel = Arc::clone(&cancel);
        let tx = self.internal_tx.clone();
        tracing::info!(round = %r, model = %self.head.map(|h| h.model.short()).unwrap_or_default(), "training");
        self.tracker.spawn_blocking(move || {
            let result = trainer.train_round(&model, r, &cancel);
            let _ = tx.blocking_send(Internal::Trained {
                round: r,
                trainer,
                result,
            });
        });
    }

    // ---------------------------------------------------------------------------------
    // Secure aggregation
    // ---------------------------------------------------------------------------------

    /// Starts masking epoch `epoch` of the current round among `participants`: fresh
    /// keys, published; then masks our update if everything is there.
    async fn begin_epoch(&mut self, epoch: u32, participants: BTreeSet<SignerKey>) {
        let me = self.me;
        let answered = self.round.as_ref().and_then(|r| self.stored_answer(r.id));
        // After a restart of this node within the round: the seed of the masked delta it
        // sent in this epoch, to answer the epoch's seal.
        let stored_seed = self
            .round
            .as_ref()
            .and_then(|r| self.own_self_seed(r.id))
            .filter(|(e, _)| *e == epoch);
        let Some(rs) = self.round.as_mut() else {
            return;
        };
        let round = rs.id;
        let keys = if participants.contains(&me) {
            match EpochKeys::generate(participants.iter().copied().filter(|p| *p != me)) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::error!(round = %round, error = %e, "secure aggregation: no keys");
                    None
                }
            }
        } else {
            None
        };
        let public = keys.as_ref().map(|k| k.public.clone());
        match rs.mask.as_mut() {
            Some(m) => {
                // Keep what answering the epoch we leave needs, if we sent a delta in it.
                if let (Some(sent), Some(seed), Some(own)) =
                    (m.sent_epoch, m.self_seed, rs.pool.get(&me))
                    && sent == m.epoch
                    && m.epoch < epoch
                {
                    m.past.insert(
                        sent,
                        PastEpoch {
                            participants: m.participants.clone(),
                            seed,
                            own_hash: own.hash,
                            pairs: std::mem::take(&mut m.pairs),
                        },
                    );
                }
                m.epoch = epoch;
                m.participants = participants.clone();
                m.epoch_started = Instant::now();
                m.keys = keys;
                m.timed_out_at = None;
                m.pending_restart = None;
                m.self_seed = None;
                m.seal = None;
                m.reveals.clear();
                m.revealed_shares.clear();
                m.pairs.clear();
                m.seal_envelopes.clear();
            }
            None => {
                rs.mask = Some(MaskRound {
                    epoch,
                    participants: participants.clone(),
                    epoch_started: Instant::now(),
                    keys,
                    plain: None,
                    sent_epoch: None,
                    timed_out_at: None,
                    pending_restart: None,
                    restart_envelope: None,
                    self_seed: None,
                    seal: None,
                    reveals: BTreeMap::new(),
                    revealed_shares: BTreeMap::new(),
                    pairs: Vec::new(),
                    seal_envelopes: Vec::new(),
                    answered,
                    answered_set: None,
                    past: BTreeMap::new(),
                    burned: BTreeSet::new(),
                    refused: None,
                });
            }
        }
        if let (Some(m), Some((e, seed))) = (rs.mask.as_mut(), stored_seed)
            && m.sent_epoch.is_none_or(|s| s < e)
            && m.plain.is_none()
        {
            m.sent_epoch = Some(e);
            m.self_seed = Some(seed);
        }
        rs.ready_at = None;
        // Deltas of an abandoned epoch are dropped and never accepted again.
        rs.pool
            .retain(|_, p| p.masked().is_none_or(|(_, e, _)| e >= epoch));
        tracing::info!(round = %round, epoch, participants = participants.len(), "secure aggregation: masking epoch begins");
        if let Some(public) = public {
            self.mask_keys
                .entry((round, epoch))
                .or_default()
                .entry(me)
                .or_insert_with(|| public.iter().copied().collect());
            self.publish_keys(round, epoch, public).await;
        }
        self.try_mask().await;
    }

    async fn publish_keys(&self, round: RoundId, epoch: u32, keys: Vec<(SignerKey, [u8; 32])>) {
        let msg = MaskMessage::Keys {
            consortium: self.digest,
            round,
            epoch,
            keys,
        };
        let _ = self.publish_mask(&msg).await;
    }

    async fn publish_mask(&self, msg: &MaskMessage) -> Option<Vec<u8>> {
        let payload = encode_control(msg).ok()?;
        let env = seal(&self.identity, PayloadKind::KeyShare, &payload);
        if let Err(e) = self.net.publish(env.clone()).await {
            tracing::debug!(error = %e, "key share not published (no peers yet?)");
        }
        Some(env)
    }

    /// Our trained update under secure aggregation: privatized if local DP is on,
    /// clipped to `aggregation.clip_norm`, kept, and masked as soon as the keys are in.
    async fn on_trained_masked(
        &mut self,
        round: RoundId,
        base: &Weights,
        trained: TrainedRound,
        epsilon_after: Option<f64>,
    ) {
        let local_dp = self.config.node.privacy.local_dp;
        let clip = self.config.consortium.aggregation.clip_norm;
        let built = (|| -> Result<Vec<f32>, String> {
            let mut delta = Delta::between(base, &trained.weights).map_err(|e| e.to_string())?;
            if let Some(dp) = local_dp {
                delta = privatize_delta(delta, dp.clip_norm, dp.noise_multiplier)?;
            }
            let norm = delta.l2_norm();
            let mut values = delta.into_values();
            if let Some(c) = clip
                && norm > c
            {
                let scale = c / norm;
                for v in &mut values {
                    *v = (f64::from(*v) * scale) as f32;
                }
            }
            Ok(values)
        })();
        let values = match built {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(round = %round, error = %e, "could not build our update");
                self.phase = Phase::Collecting;
                return;
            }
        };
        let metrics = LocalMetrics {
            epsilon: epsilon_after,
            ..trained.metrics
        };
        self.phase = Phase::Collecting;
        if let Some(m) = self.round.as_mut().and_then(|r| r.mask.as_mut()) {
            m.plain = Some((values, trained.samples, metrics));
        }
        self.try_mask().await;
        self.publish_status(false);
    }

    /// Masks and sends our update for the current epoch once we have it and the keys of
    /// every other participant.
    async fn try_mask(&mut self) {
        let me = self.me;
        let Some(fp) = self.fixed_point else { return };
        let Some(rs) = self.round.as_mut() else {
            return;
        };
        let round = rs.id;
        let Some(m) = rs.mask.as_mut() else { return };
        let epoch = m.epoch;
        if m.sent_epoch == Some(epoch) || !m.participants.contains(&me) || m.plain.is_none() {
            return;
        }
        let theirs: BTreeMap<SignerKey, [u8; 32]> = m
            .participants
            .iter()
            .filter(|p| **p != me)
            .filter_map(|p| {
                self.mask_keys
                    .get(&(round, epoch))
                    .and_then(|by| by.get(p))
                    .and_then(|keys| keys.get(&me))
                    .map(|k| (*p, *k))
            })
            .collect();
        if theirs.len() + 1 < m.participants.len() {
            return;
        }
        let Some(keys) = m.keys.as_mut() else { return };
        let secrets = match keys.pair_secrets(me, &m.participants, &theirs, round, epoch) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(round = %round, epoch, error = %e, "secure aggregation: cannot mask yet");
                return;
            }
        };
        let Some((values, samples, metrics)) = m.plain.as_ref() else {
            return;
        };
        let mut words = secagg::mask(values, &fp, &me, &secrets, round);
        // Double masking: a self-mask only this member can remove, revealed for this
        // epoch only once the epoch is sealed complete.
        let Ok(own_seed) = secagg::self_seed() else {
            tracing::error!(round = %round, "secure aggregation: no self-mask seed");
            return;
        };
        // Its Shamir shares, one sealed for each other participant, so that the sealed
        // epoch completes even if we drop out before answering. With fewer participants
        // than the threshold the seed is only ever revealed by us.
        let threshold = self.share_threshold;
        let shares = if m.participants.len() >= threshold {
            match secagg::deal_seed(&own_seed, threshold, &me, &m.participants, &secrets) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::error!(round = %round, epoch, error = %e, "secure aggregation: could not share our seed");
                    return;
                }
            }
        } else {
            None
        };
        m.pairs = secrets;
        secagg::self_mask(&mut words, &own_seed, round, epoch, false);
        let header = DeltaHeader {
            consortium: self.digest,
            round,
            base: self.head.map(|h| h.model).unwrap_or_default(),
            sample_count: *samples,
            metrics: *metrics,
            masked: true,
            mask_epoch: epoch,
        };
        let Ok(payload) = encode_frame(&header, &secagg::words_to_bytes(&words)) else {
            return;
        };
        // One release per round for the DP accountant, whatever the epoch it goes out
        // in (a restart masks the same noised update again).
        let first_release = m.sent_epoch.is_none();
        let samples = *samples;
        let (env, digest) = seal_hashed(&self.identity, PayloadKind::Delta, &payload);
        let hash = DeltaHash(digest);
        if let Err(e) = self.store_own_delta(round, hash, &env, Some((epoch, &own_seed))) {
            tracing::error!(round = %round, error = %e, "could not store our masked delta");
            return;
        }
        // The shares go out before the delta, so that whoever holds the delta can expect
        // them; repeated every heartbeat with the seal and answers.
        let shares_env = match shares {
            Some(boxes) => {
                let msg = MaskMessage::Shares {
                    consortium: self.digest,
                    round,
                    epoch,
                    commitment: secagg::seed_commitment(&own_seed, round, epoch, &me),
                    boxes,
                };
                self.publish_mask(&msg).await
            }
            None => None,
        };
        let bytes = env.len() as u64;
        if let Some(rs) = self.round.as_mut() {
            if let Some(m) = rs.mask.as_mut() {
                m.sent_epoch = Some(epoch);
                m.self_seed = Some(own_seed);
                m.seal_envelopes.extend(shares_env);
            }
            rs.own_bytes = bytes;
            rs.own_env = Some((hash, env.into()));
            rs.pool.insert(
                me,
                Pooled::new(
                    hash,
                    Checked::Masked {
                        words: Arc::new(words),
                        epoch,
                        samples,
                    },
                ),
            );
        }
        self.publish_status(false);
        if first_release {
            self.account_dp_release(round, hash);
        }
        tracing::info!(round = %round, epoch, delta = %hash.short(), bytes, "proposing our masked delta");
        self.announce_delta(round, hash, bytes).await;
    }

    /// A key share or restart from a member.
    async fn on_mask_message(&mut self, signer: SignerKey, msg: MaskMessage) {
        let current = self.current();
        match msg {
            MaskMessage::Keys {
                round, epoch, keys, ..
            } => {
                // Only this round and the next, and a bounded number of epochs: a member
                // cannot make the node hold unbounded key material.
                if round < current
                    || round.0 > current.0 + 1
                    || epoch > MAX_MASK_EPOCHS
                    || keys.len() > self.peer_of.len()
                {
                    return;
                }
                // The first key set a member sends for an epoch is the one that counts.
                self.mask_keys
                    .entry((round, epoch))
                    .or_default()
                    .entry(signer)
                    .or_insert_with(|| keys.into_iter().collect());
                if round == current {
                    self.try_mask().await;
                }
            }
            MaskMessage::Restart {
                round,
                epoch,
                participants,
                ..
            } => {
                let quorum = self.quorum();
                let Some(m) = self
                    .round
                    .as_mut()
                    .filter(|r| r.id == round)
                    .and_then(|r| r.mask.as_mut())
                else {
                    return;
                };
                let next: BTreeSet<SignerKey> = participants.iter().copied().collect();
                let valid = epoch > m.epoch
                    && epoch <= MAX_MASK_EPOCHS
                    && m.participants.contains(&signer)
                    && next.contains(&signer)
                    && next.is_subset(&m.participants)
                    && next.len() == participants.len()
                    && next.len() >= quorum;
                if !valid {
                    self.reject(
                        RejectReason::BadRecord,
                        round,
                        self.peer_of.get(&signer).copied(),
                        "-",
                        "an invalid secure-aggregation restart",
                    );
                    return;
                }
                // Adopted on the next check, once this member's own epoch has timed out
                // too (a member cannot cut an epoch short for everyone).
                if m.pending_restart
                    .as_ref()
                    .is_none_or(|(_, e, _)| epoch > *e)
                {
                    m.pending_restart = Some((signer, epoch, next));
                }
                self.check_merge().await;
            }
            MaskMessage::Seal {
                round,
                epoch,
                deltas,
                ..
            } => {
                self.on_seal(signer, round, epoch, deltas).await;
                self.check_merge().await;
            }
            MaskMessage::Shares {
                round,
                epoch,
                commitment,
                boxes,
                ..
            } => {
                if round < current
                    || round.0 > current.0 + 1
                    || epoch > MAX_MASK_EPOCHS
                    || boxes.len() > self.peer_of.len()
                {
                    return;
                }
                let mine = boxes
                    .iter()
                    .find(|(to, _, _)| *to == self.me)
                    .map(|(_, sealed, tag)| (*sealed, *tag));
                // The first set a member sends for an epoch is the one that counts.
                self.mask_shares
                    .entry((round, epoch))
                    .or_default()
                    .entry(signer)
                    .or_insert((commitment, mine));
                self.fill_seeds();
                self.retry_pending_records().await;
                self.check_merge().await;
            }
            MaskMessage::Reveal {
                round,
                epoch,
                seed,
                shares,
                ..
            } => {
                if let Some(m) = self
                    .round
                    .as_mut()
                    .filter(|r| r.id == round)
                    .and_then(|r| r.mask.as_mut())
                    .filter(|m| m.epoch == epoch && m.participants.contains(&signer))
                    && let Some(x) = secagg::share_x(&m.participants, &signer)
                {
                    // A seed that does not match the commitment its owner sent with its
                    // shares is refused (it would make the sum fail to cancel: a burn).
                    let committed = self
                        .mask_shares
                        .get(&(round, epoch))
                        .and_then(|b| b.get(&signer))
                        .map(|(c, _)| *c);
                    if committed
                        .is_some_and(|c| secagg::seed_commitment(&seed, round, epoch, &signer) != c)
                    {
                        tracing::warn!(round = %round, epoch, peer = %self.peer_of.get(&signer).map(ToString::to_string).unwrap_or_default(), "secure aggregation: a revealed seed does not match its commitment; ignored");
                        return;
                    }
                    m.reveals.entry(signer).or_insert(seed);
                    for (owner, y) in shares {
                        if owner != signer && m.participants.contains(&owner) {
                            m.revealed_shares
                                .entry(owner)
                                .or_default()
                                .entry(x)
                                .or_insert(y);
                        }
                    }
                }
                self.fill_seeds();
                // A record may be waiting for this seed.
                self.retry_pending_records().await;
                self.check_merge().await;
            }
        }
    }

    /// A seal of an epoch of this round: if it lists every participant and our own delta
    /// as sent, we answer (our self-mask seed and our seed shares), at most one epoch per
    /// round. A seal of an epoch we already left for a restart is answered too, from what
    /// we kept of it, when we have answered nothing yet: a member whose view was complete
    /// sealed it while ours was not, and only our answer lets it complete.
    async fn on_seal(
        &mut self,
        signer: SignerKey,
        round: RoundId,
        epoch: u32,
        deltas: Vec<(SignerKey, DeltaHash)>,
    ) {
        let me = self.me;
        let digest = self.digest;
        let Some(rs) = self.round.as_mut().filter(|r| r.id == round) else {
            return;
        };
        let own_hash = rs.pool.get(&me).map(|p| p.hash);
        let Some(m) = rs.mask.as_mut() else {
            return;
        };
        let current = m.epoch == epoch;
        let (participants, self_seed, own_hash, pairs) = if current {
            (
                m.participants.clone(),
                m.self_seed,
                own_hash,
                m.pairs.clone(),
            )
        } else if let Some(p) = m.past.get(&epoch) {
            (
                p.participants.clone(),
                Some(p.seed),
                Some(p.own_hash),
                p.pairs.clone(),
            )
        } else {
            return;
        };
        let listed: BTreeSet<SignerKey> = deltas.iter().map(|(s, _)| *s).collect();
        let valid = participants.contains(&signer)
            && listed == participants
            && listed.len() == deltas.len()
            && deltas.windows(2).all(|w| w[0].0 < w[1].0);
        if !valid {
            self.reject(
                RejectReason::BadRecord,
                round,
                self.peer_of.get(&signer).copied(),
                "-",
                "an invalid secure-aggregation seal",
            );
            return;
        }
        if current && m.seal.is_none() {
            m.seal = Some(deltas.clone());
        }
        let ours_listed = deltas.iter().any(|(s, h)| *s == me && Some(*h) == own_hash);
        let Some(seed) = self_seed.filter(|_| ours_listed) else {
            return;
        };
        // At most one epoch per round (the same one again after a restart of this node).
        let answered_here = if current {
            m.reveals.contains_key(&me)
        } else {
            m.answered == Some(epoch)
        };
        if answered_here || !(m.may_answer_with(&participants) || m.answered == Some(epoch)) {
            return;
        }
        // Our answer: our own seed, and our share of every other listed participant's
        // seed (opened with our pair secret), so that the epoch completes without a
        // participant that dropped out after its delta was sealed.
        let Some(x) = secagg::share_x(&participants, &me) else {
            return;
        };
        let book = self.mask_shares.get(&(round, epoch));
        let mut shares = Vec::new();
        for (owner, _) in deltas.iter().filter(|(o, _)| *o != me) {
            let sealed = book
                .and_then(|b| b.get(owner))
                .and_then(|(_, b)| b.as_ref());
            let pair = pairs.iter().find(|(p, _)| p == owner).map(|(_, s)| s);
            if let (Some((sealed, tag)), Some(pair)) = (sealed, pair) {
                match secagg::open_share(sealed, tag, x, pair, owner, &me) {
                    Ok(y) => shares.push((*owner, y)),
                    Err(e) => {
                        tracing::warn!(round = %round, epoch, error = %e, "secure aggregation: a seed share does not open");
                    }
                }
            }
        }
        // Recorded durably first: after a crash this node must still know it answered.
        if let Err(e) = self
            .store
            .put_answered(Answered { round, epoch })
            .and_then(|()| self.store.flush())
        {
            tracing::error!(round = %round, error = %e, "secure aggregation: could not record our answer; not answering");
            return;
        }
        let Some(m) = self.round.as_mut().and_then(|r| r.mask.as_mut()) else {
            return;
        };
        m.answered = Some(epoch);
        m.answered_set = Some(participants);
        if current {
            m.reveals.insert(me, seed);
            for (owner, y) in &shares {
                m.revealed_shares.entry(*owner).or_default().insert(x, *y);
            }
        }
        if self.config.node.testing.withhold_answer {
            tracing::warn!(round = %round, epoch, "testing: withholding our answer to the sealed epoch");
            return;
        }
        let msg = MaskMessage::Reveal {
            consortium: digest,
            round,
            epoch,
            seed,
            shares,
        };
        if current {
            tracing::info!(round = %round, epoch, "secure aggregation: the epoch is sealed; answering with our self-mask seed and seed shares");
        } else {
            tracing::warn!(round = %round, epoch, now = self.round.as_ref().and_then(|r| r.mask.as_ref()).map_or(0, |m| m.epoch), "secure aggregation: an epoch we had left was sealed by a member with a complete view; answering it (this round's later epochs stay unanswered)");
        }
        if let Some(env) = self.publish_mask(&msg).await
            && let Some(m) = self.round.as_mut().and_then(|r| r.mask.as_mut())
        {
            m.seal_envelopes.push(env);
        }
        self.fill_seeds();
    }

    /// The epoch this node answered in `round` before a restart, if any.
    fn stored_answer(&self, round: RoundId) -> Option<u32> {
        self.store.answered(round).ok()?
    }

    /// Rebuilds, from the shares revealed by the others, the seed of every participant of
    /// the sealed epoch that has not revealed its own (dropped out after its delta was
    /// sealed), checked against the commitment it sent with its shares.
    fn fill_seeds(&mut self) {
        let threshold = self.share_threshold;
        let Some(rs) = self.round.as_mut() else {
            return;
        };
        let round = rs.id;
        let Some(m) = rs.mask.as_mut().filter(|m| m.seal.is_some()) else {
            return;
        };
        let book = self.mask_shares.get(&(round, m.epoch));
        let missing: Vec<SignerKey> = m
            .participants
            .iter()
            .filter(|p| !m.reveals.contains_key(p))
            .copied()
            .collect();
        for owner in missing {
            let (Some(shares), Some((commitment, _))) = (
                m.revealed_shares.get(&owner),
                book.and_then(|b| b.get(&owner)),
            ) else {
                continue;
            };
            if let Some(seed) =
                secagg::recover_seed(threshold, shares, commitment, round, m.epoch, &owner)
            {
                tracing::warn!(round = %round, epoch = m.epoch, peer = %self.peer_of.get(&owner).map(ToString::to_string).unwrap_or_default(), shares = shares.len(), "secure aggregation: rebuilt the self-mask seed of a participant that did not answer from the others' shares");
                m.reveals.insert(owner, seed);
                self.metrics.seeds_rebuilt.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The merge under secure aggregation: when every participant of the epoch has
    /// delivered its masked delta, the merger sums them; when the epoch times out, the
    /// round restarts its masking among those who can still take part.
    async fn check_masked_merge(&mut self) {
        self.fill_seeds();
        let quorum = self.quorum();
        let collect = self.config.consortium.rounds.collect_timeout;
        let merge_timeout = self.config.consortium.rounds.merge_timeout;
        let me = self.me;
        let Some(rs) = self.round.as_mut() else {
            return;
        };
        let round = rs.id;
        let Some(m) = rs.mask.as_mut() else { return };
        let epoch = m.epoch;
        let delivered: BTreeSet<SignerKey> = rs
            .pool
            .iter()
            .filter(|(s, p)| {
                m.participants.contains(*s) && p.masked().is_some_and(|(_, e, _)| e == epoch)
            })
            .map(|(s, _)| *s)
            .collect();
        if delivered.len() == m.participants.len() && delivered.len() >= quorum {
            let ready = *rs.ready_at.get_or_insert_with(Instant::now);
            let order = merger_order(round, delivered.iter().copied());
            let attempt =
                (ready.elapsed().as_secs_f64() / merge_timeout.as_secs_f64().max(1e-3)) as usize;
            let my_turn = order.get(attempt % order.len()) == Some(&me);
            if m.seal.is_none() {
                if my_turn && ready.elapsed() >= self.config.node.testing.seal_delay {
                    let deltas: Vec<(SignerKey, DeltaHash)> = delivered
                        .iter()
                        .filter_map(|s| rs.pool.get(s).map(|p| (*s, p.hash)))
                        .collect();
                    let msg = MaskMessage::Seal {
                        consortium: self.digest,
                        round,
                        epoch,
                        deltas: deltas.clone(),
                    };
                    tracing::info!(round = %round, epoch, "secure aggregation: sealing the epoch");
                    let env = self.publish_mask(&msg).await;
                    if let (Some(env), Some(m)) =
                        (env, self.round.as_mut().and_then(|r| r.mask.as_mut()))
                    {
                        m.seal_envelopes.push(env);
                    }
                    self.on_seal(me, round, epoch, deltas).await;
                }
                return;
            }
            // Sealed: every participant's seed, revealed or rebuilt from shares, is needed.
            // A sealed epoch is never restarted for a missing answer (the answers already
            // given would let this epoch's sum be unmasked once the straggler answered,
            // and the next epoch's sum minus it is the straggler's update): it waits for
            // the answer or for enough shares.
            if m.participants.iter().any(|p| !m.reveals.contains_key(p)) {
                return;
            }
            // (A member that withholds its answer stands in for one that dropped out at
            // the seal: it does not merge either.)
            if !my_turn || m.refused == Some(epoch) || self.config.node.testing.withhold_answer {
                return;
            }
            let seeds: Vec<[u8; 32]> = m.reveals.values().copied().collect();
            let entries: Vec<(SignerKey, &Pooled)> = delivered
                .iter()
                .filter_map(|s| rs.pool.get(s).map(|p| (*s, p)))
                .collect();
            let (Some(fp), Some(head), Some(base)) =
                (self.fixed_point, self.head, self.model.clone())
            else {
                return;
            };
            let update = match masked_update(
                &fp,
                &self.layout,
                &entries,
                &seeds,
                round,
                epoch,
                head.model,
                self.config.consortium.aggregation.clip_norm,
            ) {
                Ok(u) => u,
                Err(e @ MaskedError::Norm { .. }) => {
                    // Masking again gives the same sum: the round waits for the next.
                    m.refused = Some(epoch);
                    tracing::error!(round = %round, epoch, error = %e, "secure aggregation: the round's sum is refused");
                    return;
                }
                Err(e) => {
                    // Every seed is in and the sum still does not cancel: a participant
                    // masked with other keys (it restarted and made new ones). Nothing can
                    // be learnt from this epoch, so answering a fresh one is safe.
                    m.burned.insert(epoch);
                    tracing::error!(round = %round, epoch, error = %e, "secure aggregation: restarting the masking with fresh keys");
                    if epoch >= MAX_MASK_EPOCHS {
                        tracing::error!(round = %round, epoch, "secure aggregation: the masks keep failing to cancel; a participant sends inconsistent keys or masks (the round waits for the next)");
                        return;
                    }
                    let msg = MaskMessage::Restart {
                        consortium: self.digest,
                        round,
                        epoch: epoch + 1,
                        participants: delivered.iter().copied().collect(),
                    };
                    let envelope = self.publish_mask(&msg).await;
                    self.begin_epoch(epoch + 1, delivered).await;
                    if let Some(m) = self.round.as_mut().and_then(|r| r.mask.as_mut()) {
                        m.restart_envelope = envelope;
                    }
                    return;
                }
            };
            let contributions: Vec<Contribution> = entries
                .iter()
                .map(|(s, p)| Contribution {
                    signer: *s,
                    delta: p.hash,
                    sample_count: p.sample_count(),
                })
                .collect();
            rs.merging = true;
            self.phase = Phase::Merging;
            self.publish_status(false);
            tracing::info!(round = %round, attempt, epoch, deltas = contributions.len(), "merging as the round's merger");
            self.spawn_own_merge(base, head, vec![update], contributions, round, attempt);
            return;
        }
        if m.epoch_started.elapsed() < collect {
            return;
        }
        // A restart from another participant, now that our own epoch timed out too. It is
        // refused if it leaves out a member whose masked delta of this epoch we hold: the
        // sum of this epoch minus the next one's would then reveal that member's update.
        if let Some((signer, next_epoch, next)) = m.pending_restart.take() {
            let excludes_delivered = delivered.iter().any(|d| !next.contains(d));
            if !m.may_answer_with(&next) && m.answered != Some(next_epoch) {
                tracing::warn!(round = %round, epoch = next_epoch, "secure aggregation: refusing a restart: we answered a sealed epoch of this round");
            } else if excludes_delivered {
                tracing::warn!(round = %round, epoch = next_epoch, "secure aggregation: refusing a restart that leaves out a member whose masked delta we hold");
            } else {
                tracing::warn!(round = %round, epoch = next_epoch, participants = next.len(), from = %self.peer_of.get(&signer).map(ToString::to_string).unwrap_or_default(), "secure aggregation: the round restarts its masking without the members that did not deliver");
                self.begin_epoch(next_epoch, next).await;
                return;
            }
        }
        // Timed out: restart among those who delivered (a member that dropped out after
        // its keys went out), or else among those whose keys arrived (nobody could mask
        // against a member that never sent keys). Never a partial unmasking.
        let with_keys: BTreeSet<SignerKey> = m
            .participants
            .iter()
            .copied()
            .filter(|p| {
                *p == me
                    || self
                        .mask_keys
                        .get(&(round, epoch))
                        .and_then(|by| by.get(p))
                        .is_some_and(|keys| keys.contains_key(&me))
            })
            .collect();
        let next = if delivered.len() >= quorum {
            delivered
        } else {
            with_keys
        };
        // A sealed epoch is never restarted, nor any epoch once we answered one; and never
        // past the epoch cap.
        if m.seal.is_some()
            || !m.may_answer_with(&next)
            || epoch >= MAX_MASK_EPOCHS
            || next.len() < quorum
            || next == m.participants
            || !next.contains(&me)
        {
            return;
        }
        let since = *m.timed_out_at.get_or_insert_with(Instant::now);
        let turn = (since.elapsed().as_secs_f64() / merge_timeout.as_secs_f64().max(1e-3)) as usize;
        let order = merger_order(round, next.iter().copied());
        if order.get(turn % order.len()) != Some(&me) {
            return;
        }
        let msg = MaskMessage::Restart {
            consortium: self.digest,
            round,
            epoch: epoch + 1,
            participants: next.iter().copied().collect(),
        };
        tracing::warn!(round = %round, epoch = epoch + 1, participants = next.len(), missing = m.participants.len() - next.len(), "secure aggregation: restarting the round's masking without the members that did not deliver");
        let envelope = self.publish_mask(&msg).await;
        self.begin_epoch(epoch + 1, next).await;
        if let Some(m) = self.round.as_mut().and_then(|r| r.mask.as_mut()) {
            m.restart_envelope = envelope;
        }
    }

    /// Rebuilds the local-DP accountant from the own-delta records of the store: every
    /// delta this node stored (and so may have sent) under local DP is one Gaussian
    /// mechanism with the noise multiplier recorded beside it.
    fn restore_dp_accounting(&mut self) -> Result<(), EngineError> {
        let mut acc = RdpAccountant::default();
        for own in self.store.own_deltas()? {
            if let Some(z) = own.local_dp_noise.filter(|z| z.is_finite() && *z > 0.0) {
                acc.step(z);
            }
        }
        self.dp_spent = acc;
        if let Some(dp) = self.config.node.privacy.local_dp {
            let eps = acc.epsilon(dp.delta);
            self.metrics.set_last(None, None, Some(eps));
            tracing::info!(
                released = acc.rounds,
                epsilon = eps,
                delta = dp.delta,
                "local DP: privacy spent so far"
            );
        }
        Ok(())
    }

    /// The local-DP epsilon spent so far, if local DP is on.
    fn local_epsilon(&self) -> Option<f64> {
        self.config
            .node
            .privacy
            .local_dp
            .map(|dp| self.dp_spent.epsilon(dp.delta))
    }

    /// Stores our delta envelope of `round` durably, before it is announced. Under local
    /// DP the own-delta record also marks the release for the accountant, so a restart
    /// cannot forget privacy already spent.
    fn store_own_delta(
        &self,
        round: RoundId,
        hash: DeltaHash,
        env: &[u8],
        self_seed: Option<(u32, &[u8; 32])>,
    ) -> Result<(), StoreError> {
        let own = OwnDelta {
            round,
            delta: hash,
            self_seed: self_seed.map(|(epoch, seed)| (epoch, *seed)),
            local_dp_noise: self
                .config
                .node
                .privacy
                .local_dp
                .map(|dp| dp.noise_multiplier),
        };
        self.store
            .put_blob_hashed(BlobKind::Delta, hash.as_bytes(), env)
            .and_then(|()| self.store.put_own_delta(&own))
            .and_then(|()| self.store.flush())
    }

    /// Counts one local-DP release (our delta of `round` went out) in the accountant.
    fn account_dp_release(&mut self, round: RoundId, hash: DeltaHash) {
        let Some(dp) = self.config.node.privacy.local_dp else {
            return;
        };
        self.dp_spent.step(dp.noise_multiplier);
        let eps = self.dp_spent.epsilon(dp.delta);
        self.metrics.set_last(None, None, Some(eps));
        tracing::info!(round = %round, delta = %hash.short(), epsilon = eps, delta_dp = dp.delta, clip_norm = dp.clip_norm, noise_multiplier = dp.noise_multiplier, released = self.dp_spent.rounds, "local DP: clipped and noised our delta");
    }

    /// The self-mask seed (and its epoch) stored with our masked delta of `round`.
    fn own_self_seed(&self, round: RoundId) -> Option<(u32, [u8; 32])> {
        self.store.own_delta(round).ok()??.self_seed
    }

    fn own_delta(&self, round: RoundId) -> Result<Option<DeltaHash>, StoreError> {
        Ok(self.store.own_delta(round)?.map(|o| o.delta))
    }

    fn encoding(&self) -> DeltaEncoding {
        match self.config.consortium.aggregation.encoding {
            EncodingKind::F32 => DeltaEncoding::F32,
            EncodingKind::F16 => DeltaEncoding::F16,
            EncodingKind::Int8 => DeltaEncoding::Int8,
            EncodingKind::TopK => DeltaEncoding::top_k_fraction(
                self.config.consortium.aggregation.topk_fraction,
                self.layout.total(),
            ),
        }
    }

    async fn on_trained(&mut self, round: RoundId, result: Result<TrainedRound, RoundError>) {
        let Some(rs) = self.round.as_ref() else {
            return;
        };
        if rs.id != round {
            return;
        }
        let trained = match result {
            Ok(t) => t,
            Err(e) => {
                if !self.cancel.is_cancelled() {
                    tracing::error!(round = %round, error = %e, "local training failed; this round goes on without our delta");
                }
                self.phase = Phase::Collecting;
                return;
            }
        };
        self.metrics
            .set_last(Some(trained.metrics.train_loss), None, None);
        let Some(base) = self.base_model() else {
            return;
        };
        // The head names the model's hash: no need to hash 4P bytes again.
        let base_hash = self.head.map(|h| h.model).unwrap_or_default();
        let local_dp = self.config.node.privacy.local_dp;
        let epsilon_after =
            local_dp.map(|dp| self.dp_spent.after(dp.noise_multiplier).epsilon(dp.delta));
        if self.fixed_point.is_some() {
            self.on_trained_masked(round, &base, trained, epsilon_after)
                .await;
            return;
        }
        let built = (|| -> Result<(DeltaHash, bytes::Bytes, Update), String> {
            let mut delta =
                Delta::from_updated(&base, trained.weights).map_err(|e| e.to_string())?;
            if let Some(dp) = local_dp {
                delta = privatize_delta(delta, dp.clip_norm, dp.noise_multiplier)?;
            }
            let header = DeltaHeader {
                consortium: self.digest,
                round,
                base: base_hash,
                sample_count: trained.samples,
                metrics: LocalMetrics {
                    epsilon: epsilon_after,
                    ..trained.metrics
                },
                masked: false,
                mask_epoch: 0,
            };
            // The envelope is built in its final buffer: reserved envelope header, frame
            // header, encoded delta, then signed in place (no copy of the 4P bytes). An
            // f32 delta is the envelope's last 4P bytes; 0-3 bytes of padding before the
            // envelope put them on a 4-aligned address, so that the update we merge reads
            // them in place and the trained buffer is freed.
            let encoding = self.encoding();
            let head = encode_control(&header).map_err(|e| e.to_string())?;
            let total = ENVELOPE_HEADER_LEN + 4 + head.len() + delta.encoded_len(encoding);
            let f32_bytes = 4 * self.layout.total();
            let mut buf = Vec::with_capacity(total + 3);
            let pad = if encoding == DeltaEncoding::F32 {
                (4 - (buf.as_ptr() as usize + total - f32_bytes) % 4) % 4
            } else {
                0
            };
            buf.resize(pad + ENVELOPE_HEADER_LEN, 0);
            buf.extend_from_slice(&(head.len() as u32).to_le_bytes());
            buf.extend_from_slice(&head);
            let body_at = buf.len();
            delta
                .encode_into(encoding, &mut buf)
                .map_err(|e| e.to_string())?;
            let digest = seal_in_place(&self.identity, PayloadKind::Delta, &mut buf[pad..]);
            let bytes = bytes::Bytes::from(buf);
            // What the others will merge is what they decode: an f32 delta is the encoded
            // bytes themselves; a lossy encoding (f16, int8, top-k) is decoded back. The
            // trained buffer is freed first.
            drop(delta);
            let decoded = if encoding == DeltaEncoding::F32 {
                Delta::view_f32(
                    bytes.clone(),
                    pad + total - f32_bytes,
                    Arc::clone(&self.layout),
                )
            } else {
                Delta::decode(&bytes[body_at..], &self.layout, &self.limits)
            }
            .map_err(|e| e.to_string())?;
            let hash = DeltaHash(digest);
            let update = Update::new(self.me, hash, base_hash, trained.samples.max(1), decoded);
            Ok((hash, bytes.slice(pad..), update))
        })();
        let (hash, env, update) = match built {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(round = %round, error = %e, "could not encode our delta");
                self.phase = Phase::Collecting;
                return;
            }
        };
        if let Err(e) = self.store_own_delta(round, hash, &env, None) {
            tracing::error!(round = %round, error = %e, "could not store our delta");
            return;
        }
        self.account_dp_release(round, hash);
        tracing::info!(round = %round, delta = %hash.short(), bytes = env.len(), loss = trained.metrics.train_loss, "proposing our delta");
        self.phase = Phase::Collecting;
        let bytes = env.len() as u64;
        if let Some(rs) = self.round.as_mut() {
            rs.own_bytes = bytes;
            rs.own_env = Some((hash, env));
            rs.pool
                .insert(self.me, Pooled::new(hash, Checked::Plain(update)));
            self.metrics.deltas_accepted.fetch_add(1, Ordering::Relaxed);
        }
        self.announce_delta(round, hash, bytes).await;
        self.publish_status(false);
    }

    /// Attests a round we checked ourselves (made or recomputed) and committed: kept in
    /// our store, served on request and sent to everyone (`cellswarm_round::cert`).
    async fn attest(
        &mut self,
        round: RoundId,
        record: RecordHash,
        model: ModelHash,
        state: [u8; 32],
    ) {
        let a = Announcement::Committed {
            round,
            record,
            model,
            state,
        };
        let Ok(payload) = encode_control(&a) else {
            return;
        };
        let env = seal(&self.identity, PayloadKind::Announcement, &payload);
        if let Err(e) = self.store.put_attestation(round, &self.me.0, &env) {
            tracing::warn!(round = %round, error = %e, "could not keep our attestation");
        }
        self.last_attestation = Some(env.clone());
        if let Err(e) = self.net.publish(env).await {
            tracing::debug!(error = %e, "attestation not published (no peers yet?)");
        }
    }

    /// Attestations needed for a commit certificate.
    fn cert_threshold(&self) -> usize {
        cellswarm_round::threshold(
            self.peer_of.len(),
            self.config.consortium.aggregation.byzantine,
        )
    }

    /// Whether our store holds a commit certificate for `model` and `state` as the
    /// outcome of `round`.
    fn certified(&self, round: RoundId, model: ModelHash, state: [u8; 32]) -> bool {
        let Ok(envs) = self.store.attestations(round) else {
            return false;
        };
        let atts: Vec<cellswarm_round::Attestation> = envs
            .into_iter()
            .filter_map(|e| verify::attestation(e, &self.members))
            .collect();
        cellswarm_round::certified(
            round,
            model,
            state,
            &atts,
            &self.member_set(),
            self.cert_threshold(),
        )
    }

    async fn announce(&self, a: &Announcement) {
        let Ok(payload) = encode_control(a) else {
            return;
        };
        let env = seal(&self.identity, PayloadKind::Announcement, &payload);
        if let Err(e) = self.net.publish(env).await {
            tracing::debug!(error = %e, "announcement not published (no peers yet?)");
        }
    }

    async fn announce_delta(&self, round: RoundId, delta: DeltaHash, bytes: u64) {
        let Some(base) = self.head.map(|h| h.model) else {
            return;
        };
        self.announce(&Announcement::DeltaReady {
            round,
            base,
            delta,
            bytes,
        })
        .await;
    }

    async fn heartbeat_now(&mut self) {
        self.last_heartbeat = Instant::now();
        if let Some(h) = self.head {
            self.announce(&Announcement::Heartbeat {
                round: h.round.next(),
                model: h.model,
            })
            .await;
        }
        // Gossip reaches only those connected (and a busy peer may drop it): our
        // attestation of the head round is repeated, like the heartbeat.
        if let Some(env) = self.last_attestation.clone()
            && let Err(e) = self.net.publish(env).await
        {
            tracing::debug!(error = %e, "attestation not repeated");
        }
    }

    // ---------------------------------------------------------------------------------
    // Validation of deltas
    // ---------------------------------------------------------------------------------

    fn reject(
        &self,
        reason: RejectReason,
        round: RoundId,
        peer: Option<PeerId>,
        hash: &str,
        detail: &str,
    ) {
        self.metrics.reject(reason);
        tracing::warn!(
            round = %round,
            peer = %peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            hash,
            reason = reason.as_str(),
            detail,
            "rejected"
        );
    }

    /// Verifies a delta envelope for `round` expected to have payload hash `hash`, and
    /// adds it to the pool. Returns whether it was accepted.
    fn accept_envelope(
        &mut self,
        round: RoundId,
        hash: DeltaHash,
        env: Vec<u8>,
        from: Option<PeerId>,
    ) -> bool {
        match self.check_delta(round, hash, env) {
            Ok((signer, _)) if self.ignore_deltas_from.contains(&signer) => false,
            Ok((signer, content)) => {
                let Some(rs) = self.round.as_mut() else {
                    return false;
                };
                if let (Some(m), Checked::Masked { epoch, .. }) = (rs.mask.as_ref(), &content)
                    && *epoch < m.epoch
                {
                    // An abandoned epoch's delta is never pooled again.
                    return false;
                }
                if let Some(existing) = rs.pool.get(&signer) {
                    // Under secure aggregation a member sends one masked delta per epoch:
                    // a later epoch replaces an earlier one.
                    let newer = match (existing.masked(), &content) {
                        (Some((_, old, _)), Checked::Masked { epoch, .. }) => *epoch > old,
                        _ => false,
                    };
                    if newer {
                        rs.pool.insert(signer, Pooled::new(hash, content));
                        self.metrics.deltas_accepted.fetch_add(1, Ordering::Relaxed);
                        return true;
                    }
                    let same_epoch = match (existing.masked(), &content) {
                        (Some((_, old, _)), Checked::Masked { epoch, .. }) => *epoch == old,
                        _ => true,
                    };
                    if existing.hash != hash && same_epoch {
                        let (r, p) = (rs.id, from);
                        self.reject(
                            RejectReason::Equivocation,
                            r,
                            p,
                            &hash.short(),
                            "a second, different delta from the same member this round",
                        );
                    }
                    return false;
                }
                // Others' deltas are held decoded for the round; a fetched one's envelope
                // is also kept in the store for the rounds a member keeps (served to
                // members catching up), and the audit log keeps every merged hash.
                rs.pool.insert(signer, Pooled::new(hash, content));
                self.metrics.deltas_accepted.fetch_add(1, Ordering::Relaxed);
                self.publish_status(false);
                tracing::info!(round = %round, peer = %self.peer_of.get(&signer).map(ToString::to_string).unwrap_or_default(), delta = %hash.short(), pool = self.round.as_ref().map_or(0, |r| r.pool.len()), "accepted a delta");
                true
            }
            Err((reason, detail)) => {
                if let Some(rs) = self.round.as_mut() {
                    rs.bad.insert(hash);
                }
                self.reject(reason, round, from, &hash.short(), &detail);
                false
            }
        }
    }

    fn check_delta(
        &self,
        round: RoundId,
        hash: DeltaHash,
        env: Vec<u8>,
    ) -> Result<(SignerKey, Checked), (RejectReason, String)> {
        DeltaCheck {
            members: &self.members,
            consortium: self.digest,
            round,
            base: self.head.map(|h| h.model).unwrap_or_default(),
            layout: &self.layout,
            limits: &self.limits,
            max_norm: self.config.consortium.aggregation.max_update_norm,
            merged: &self.merged_hashes,
            secure_aggregation: self.fixed_point.is_some(),
        }
        .check(hash, env)
    }

    fn fetch_delta(&mut self, hash: DeltaHash, primary: PeerId) {
        let Some(rs) = self.round.as_mut() else {
            return;
        };
        if rs.fetching.contains(&hash)
            || rs.bad.contains(&hash)
            || rs.pool.values().any(|p| p.hash == hash)
        {
            return;
        }
        rs.fetching.insert(hash);
        let round = rs.id;
        let mut peers = vec![primary];
        peers.extend(self.connected.iter().copied().filter(|p| *p != primary));
        let net = self.net.clone();
        let tx = self.internal_tx.clone();
        self.tracker.spawn(async move {
            let mut last = Err(NetError::Closed);
            for peer in peers {
                last = net.request(peer, Request::Delta(hash)).await;
                if matches!(&last, Ok(r) if r.header == ResponseHeader::Delta) {
                    let _ = tx
                        .send(Internal::Fetched {
                            round,
                            hash,
                            peer,
                            result: last,
                        })
                        .await;
                    return;
                }
            }
            let _ = tx
                .send(Internal::Fetched {
                    round,
                    hash,
                    peer: primary,
                    result: last,
                })
                .await;
        });
    }

    // ---------------------------------------------------------------------------------
    // Merging
    // ---------------------------------------------------------------------------------

    fn quorum(&self) -> usize {
        self.config.consortium.rounds.min_peers as usize
    }

    async fn check_merge(&mut self) {
        let quorum = self.quorum();
        let collect = self.config.consortium.rounds.collect_timeout;
        let merge_timeout = self.config.consortium.rounds.merge_timeout;
        let connected_members: HashSet<SignerKey> = self
            .connected
            .iter()
            .filter_map(|p| self.signer_of.get(p))
            .copied()
            .collect();
        let Some(rs) = self.round.as_mut() else {
            return;
        };
        if rs.merging || rs.verifying.is_some() || self.phase == Phase::Syncing {
            return;
        }
        if rs.mask.is_some() {
            self.check_masked_merge().await;
            return;
        }
        if rs.ready_at.is_none() && rs.pool.len() >= quorum {
            let everyone_in = rs.pool.contains_key(&self.me)
                && connected_members.iter().all(|s| rs.pool.contains_key(s));
            if everyone_in || rs.started.elapsed() >= collect {
                rs.ready_at = Some(Instant::now());
                tracing::info!(round = %rs.id, deltas = rs.pool.len(), "collection complete");
            }
        }
        let Some(ready) = rs.ready_at else { return };
        let order = merger_order(rs.id, rs.pool.keys().copied());
        let attempt = Turns::new(collect, merge_timeout).attempt_at(ready.elapsed()) as usize;
        let Some(position) = order.iter().position(|s| *s == self.me) else {
            return;
        };
        // After every candidate had its turn, the turns start again (never stall).
        if position != attempt % order.len() {
            return;
        }
        rs.merging = true;
        let round = rs.id;
        let updates: Vec<Update> = rs
            .pool
            .values()
            .filter_map(|p| p.plain().cloned())
            .collect();
        let mut contributions: Vec<Contribution> = rs
            .pool
            .iter()
            .map(|(s, p)| Contribution {
                signer: *s,
                delta: p.hash,
                sample_count: p.sample_count(),
            })
            .collect();
        contributions.sort();
        self.phase = Phase::Merging;
        self.publish_status(false);
        tracing::info!(round = %round, attempt, deltas = updates.len(), "merging as the round's merger");
        let Some(base) = self.base_model() else {
            if let Some(rs) = self.round.as_mut() {
                rs.merging = false;
            }
            return;
        };
        let Some(head) = self.head else { return };
        self.spawn_own_merge(base, head, updates, contributions, round, attempt);
    }

    /// Our merge as the round's merger: the record to fill in with the result, and the
    /// merge on a blocking thread.
    fn spawn_own_merge(
        &mut self,
        base: Arc<Weights>,
        head: Head,
        updates: Vec<Update>,
        contributions: Vec<Contribution>,
        round: RoundId,
        attempt: usize,
    ) {
        let record = MergeRecord {
            consortium: self.digest,
            round,
            base: head.model,
            prev: cellswarm_round::link(&head),
            strategy: self.merger.name().to_owned(),
            contributions,
            model: ModelHash::default(),
            state: [0; 32],
            attempt: attempt as u32,
        };
        let delay = self.config.node.testing.merge_delay;
        self.spawn_merge(base, updates, round, record, delay, None);
    }

    /// Runs a merge on a blocking thread and reports it: as our own merge (`verify` is
    /// None) or as the verification of a received record.
    fn spawn_merge(
        &mut self,
        base: Arc<Weights>,
        updates: Vec<Update>,
        round: RoundId,
        record: MergeRecord,
        delay: Duration,
        verify: Option<(RecordHash, Vec<u8>)>,
    ) {
        // The merger is rebuilt from its saved state on the blocking thread: the
        // engine keeps its own and commits only when the result is accepted.
        let state = self.merger.save_state(&self.layout);
        let cfg = self.config.consortium.aggregation.clone();
        let layout = Arc::clone(&self.layout);
        let tx = self.internal_tx.clone();
        let head_hash = self.head.map(|h| h.model).unwrap_or_default();
        let cancel = self.cancel.clone();
        let store = Arc::clone(&self.store);
        // The head model is lent to the merge: when nothing else holds it (no training or
        // evaluation in flight), the new model is written over it, and a node holds one
        // model-sized buffer fewer while merging. It comes back with the result; if the
        // merge wrote over it and the result is not accepted, it is read back from the
        // store (`ensure_model`).
        self.model = None;
        self.model_lent = true;
        self.lent_head = self.head.map(|h| h.model);
        self.tracker.spawn_blocking(move || {
            let start = Instant::now();
            while start.elapsed() < delay && !cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(10));
            }
            let merger = Merger::from_config(&cfg)
                .and_then(|mut m| m.load_state(&state, &layout).map(|()| m));
            let (result, base) = match merger {
                Err(e) => (Err(e), Some(base)),
                Ok(m) => match Arc::try_unwrap(base) {
                    Ok(owned) => (m.merge_owned(owned, head_hash, &updates, round), None),
                    Err(shared) => (m.merge(&shared, head_hash, &updates, round), Some(shared)),
                },
            };
            drop(updates);
            // Write the candidate model here, off the event loop; it is only referenced
            // once the round commits (and is named by its hash, so a stray file is harmless).
            if let Ok(m) = &result
                && let Err(e) = store.put_model(&m.hash, &m.weights)
            {
                tracing::error!(round = %round, error = %e, "could not store the merged model");
            }
            let msg = match verify {
                None => Internal::Merged {
                    round,
                    record: Box::new(record),
                    result,
                    base,
                },
                Some((hash, envelope)) => Internal::Verified {
                    round,
                    hash,
                    envelope,
                    record: Box::new(record),
                    result,
                    base,
                },
            };
            let _ = tx.blocking_send(msg);
        });
    }

    async fn on_merged(
        &mut self,
        round: RoundId,
        mut record: MergeRecord,
        result: Result<Merged, AggregateError>,
    ) -> Result<(), EngineError> {
        let Some(rs) = self.round.as_mut() else {
            return Ok(());
        };
        if rs.id != round {
            return Ok(());
        }
        rs.merging = false;
        let merged = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(round = %round, error = %e, "merge failed");
                self.phase = Phase::Collecting;
                return Ok(());
            }
        };
        if self.cancel.is_cancelled() {
            return Ok(());
        }
        let state = self.merger_state_bytes(&merged.outcome.next_state);
        record.model = merged.hash;
        record.state = sha(&state);
        let payload = match encode_control(&record) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "could not encode the merge record");
                return Ok(());
            }
        };
        let hash = RecordHash::of(&payload);
        let envelope = seal(&self.identity, PayloadKind::MergeRecord, &payload);
        // Commit, then publish: what we announce is durable first, so a record a member
        // adopted is never one its merger lost in a crash. A merger that dies in between
        // holds a record nobody saw; the next candidate takes over, and on restart the
        // merger replaces its head by the consortium's record (catch-up's rewind, checked
        // like any record).
        self.published = Some((round, envelope.clone()));
        let (model, state_hash) = (merged.hash, record.state);
        self.commit(record, hash, envelope, merged, &state)?;
        self.announce(&Announcement::MergeReady {
            round,
            record: hash,
            model,
        })
        .await;
        tracing::info!(round = %round, model = %model.short(), record = %hash.short(), "published the merge record");
        self.attest(round, hash, model, state_hash).await;
        Ok(())
    }

    fn merger_state_bytes(&self, next: &MergerState) -> Vec<u8> {
        let mut m = Merger::from_config(&self.config.consortium.aggregation)
            .unwrap_or_else(|_| unreachable!("validated at start"));
        m.commit(next.clone());
        m.save_state(&self.layout)
    }

    /// Commits an accepted round (ours or verified) and starts the next.
    fn commit(
        &mut self,
        record: MergeRecord,
        hash: RecordHash,
        envelope: Vec<u8>,
        merged: Merged,
        state: &[u8],
    ) -> Result<(), EngineError> {
        let round = record.round;
        if !self.store.has_blob(BlobKind::Model, merged.hash.as_bytes()) {
            self.store.put_model(&merged.hash, &merged.weights)?;
        }
        self.store.put_blob(BlobKind::State, &record.state, state)?;
        let commit = RoundCommit::of_record(&record, hash, envelope);
        let head = commit.head;
        self.store.commit_round(&commit)?;
        self.forget_old_deltas(round);
        self.merger.commit(merged.outcome.next_state.clone());
        for c in &record.contributions {
            self.merged_hashes.insert(c.delta);
        }
        let seconds = self
            .round
            .as_ref()
            .map_or(0.0, |r| r.started.elapsed().as_secs_f64());
        self.metrics.observe_round(seconds);
        self.metrics
            .rounds_completed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            round = %round,
            model = %merged.hash,
            record = %hash.short(),
            deltas = record.contributions.len(),
            seconds,
            "round committed"
        );
        self.last_record = Some(record);
        self.adopt_head(head, merged.weights);
        self.round = None;
        self.ahead_since = None;
        // Score the new model on held-out frames, off the event loop.
        if let (Some(mut t), Some(m)) = (self.trainer_slot().take(), self.model.clone()) {
            let tx = self.internal_tx.clone();
            self.tracker.spawn_blocking(move || {
                let f1 = t.evaluate(&m);
                let _ = tx.blocking_send(Internal::Evaluated(f1));
                let _ = tx.blocking_send(Internal::Trained {
                    round: RoundId(0),
                    trainer: t,
                    // Round 0 is no round: this only hands the trainer back.
                    result: Err(RoundError::Cancelled),
                });
            });
        }
        Ok(())
    }

    /// Deletes, off the event loop, the others' deltas of the round that falls out of
    /// the rounds a member keeps once `round` is committed.
    fn forget_old_deltas(&self, round: RoundId) {
        let Some(old) = round.0.checked_sub(KEPT_ROUNDS).filter(|r| *r > 0) else {
            return;
        };
        let store = Arc::clone(&self.store);
        self.tracker
            .spawn_blocking(move || match store.forget_deltas(RoundId(old)) {
                Ok(n) if n > 0 => {
                    tracing::debug!(round = old, deltas = n, "forgot the deltas of an old round");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(round = old, error = %e, "could not forget old deltas"),
            });
    }

    // ---------------------------------------------------------------------------------
    // Records from other mergers
    // ---------------------------------------------------------------------------------

    /// Sends `request` to `peer` off the event loop and reports the answer as `report`.
    fn request_then(
        &self,
        peer: PeerId,
        request: Request,
        report: impl FnOnce(Result<SyncResponse, NetError>) -> Internal + Send + 'static,
    ) {
        let net = self.net.clone();
        let tx = self.internal_tx.clone();
        self.tracker.spawn(async move {
            let result = net.request(peer, request).await;
            let _ = tx.send(report(result)).await;
        });
    }

    fn fetch_record(&self, round: RoundId, expected: Option<RecordHash>, peer: PeerId) {
        self.request_then(peer, Request::Record(round), move |result| {
            Internal::RecordFetched {
                round,
                expected,
                peer,
                result,
            }
        });
    }

    fn check_record(&self, envelope: Vec<u8>) -> Result<CheckedRecord, (RejectReason, String)> {
        verify::record(envelope, &self.members, self.digest)
    }

    /// The agreed merger turns.
    fn turns(&self) -> Turns {
        let r = &self.config.consortium.rounds;
        Turns::new(r.collect_timeout, r.merge_timeout)
    }

    /// The members' signing keys.
    fn member_set(&self) -> BTreeSet<SignerKey> {
        self.peer_of.keys().copied().collect()
    }

    /// What we hold of the current round, for the rule that a record leaves out no
    /// delta an honest merger must have held ([`cellswarm_round::Pooled::binds`]). Under
    /// secure aggregation only the current epoch's deltas count (an earlier epoch's are
    /// superseded by the restart).
    fn held(&self, now: Instant) -> Vec<cellswarm_round::Pooled> {
        let Some(rs) = self.round.as_ref() else {
            return Vec::new();
        };
        let epoch = rs.mask.as_ref().map(|m| m.epoch);
        // Our own delta binds no merger: we may have pooled it before anyone could fetch
        // it (after a restart); members who fetched it hold the merger to it.
        let connected: HashSet<SignerKey> = self
            .connected
            .iter()
            .filter_map(|p| self.signer_of.get(p))
            .copied()
            .filter(|s| *s != self.me)
            .collect();
        rs.pool
            .iter()
            .filter(|(_, p)| epoch.is_none() || p.masked().map(|m| m.1) == epoch)
            .map(|(s, p)| cellswarm_round::Pooled {
                signer: *s,
                delta: p.hash,
                age: now.saturating_duration_since(p.at),
                at: p.at.saturating_duration_since(rs.started),
                connected: connected.contains(s),
            })
            .collect()
    }

    /// The rules every record of the current round must pass before it is recomputed
    /// (`cellswarm_round::check_live`).
    fn check_round_rules(
        &self,
        record: &MergeRecord,
        signer: SignerKey,
    ) -> Result<(), cellswarm_round::RuleError> {
        let (Some(head), Some(rs)) = (self.head, self.round.as_ref()) else {
            return Err(cellswarm_round::RuleError::WrongRound {
                expected: self.current(),
                got: record.round,
            });
        };
        let members = self.member_set();
        let rules = Rules {
            consortium: self.digest,
            strategy: self.merger.name(),
            quorum: self.quorum(),
            members: &members,
        };
        let at = Position {
            round: rs.id,
            base: head.model,
            prev: cellswarm_round::link(&head),
        };
        let now = Instant::now();
        cellswarm_round::check_live(
            &rules,
            &at,
            record,
            signer,
            |d| self.merged_hashes.contains(d),
            &self.turns(),
            now.saturating_duration_since(rs.started),
            &self.held(now),
        )
    }

    async fn on_record(&mut self, envelope: Vec<u8>, expected: Option<RecordHash>, peer: PeerId) {
        let (record, hash, signer, envelope) = match self.check_record(envelope) {
            Ok(x) => x,
            Err((reason, detail)) => {
                self.reject(reason, self.current(), Some(peer), "-", &detail);
                return;
            }
        };
        if expected.is_some_and(|e| e != hash) {
            self.reject(
                RejectReason::HashMismatch,
                record.round,
                Some(peer),
                &hash.short(),
                "record does not hash to the announcement",
            );
            return;
        }
        let current = self.current();
        if record.round > current && self.phase != Phase::Done {
            self.begin_sync(peer);
            return;
        }
        if record.round != current {
            return;
        }
        {
            let Some(rs) = self.round.as_mut() else {
                return;
            };
            if !rs.seen_records.insert(hash) || rs.verifying.is_some() {
                return;
            }
        }
        let checked = match self.check_round_rules(&record, signer) {
            // What only our view of the round says against it is overruled by a commit
            // certificate: enough members checked it and committed it.
            Err(
                cellswarm_round::RuleError::TooEarly { .. }
                | cellswarm_round::RuleError::Omitted { .. },
            ) if self.certified(record.round, record.model, record.state) => {
                tracing::info!(round = %record.round, record = %hash.short(), "a record our view of the round refused is certified by the members' attestations");
                if let Some(rs) = self.round.as_mut() {
                    rs.certified.insert(hash);
                }
                Ok(())
            }
            other => other,
        };
        if let Err(rule) = checked {
            if matches!(
                rule,
                cellswarm_round::RuleError::TooEarly { .. }
                    | cellswarm_round::RuleError::Omitted { .. }
            ) && let Some(rs) = self.round.as_mut()
            {
                // Looked at again if it comes again (its turn came, or it got certified).
                rs.seen_records.remove(&hash);
            }
            let detail = rule.to_string();
            self.reject(
                RejectReason::BadRecord,
                record.round,
                Some(peer),
                &hash.short(),
                &detail,
            );
            return;
        }
        // Every contributed delta must be in our pool (fetch what is missing first).
        let missing: Vec<DeltaHash> = {
            let Some(rs) = self.round.as_ref() else {
                return;
            };
            record
                .contributions
                .iter()
                .filter(|c| rs.pool.get(&c.signer).is_none_or(|p| p.hash != c.delta))
                .map(|c| c.delta)
                .collect()
        };
        if !missing.is_empty() {
            for c in record
                .contributions
                .iter()
                .filter(|c| missing.contains(&c.delta))
            {
                let from = self.peer_of.get(&c.signer).copied().unwrap_or(peer);
                let primary = if self.connected.contains(&from) {
                    from
                } else {
                    peer
                };
                self.fetch_delta(c.delta, primary);
            }
            if let Some(rs) = self.round.as_mut() {
                rs.seen_records.remove(&hash);
            }
            // Retried when the deltas arrive (the announcement is re-requested on tick).
            self.pending_records.push((envelope, Some(hash), peer));
            return;
        }
        // Under secure aggregation every contributor's self-mask seed must have been
        // revealed for the sealed epoch before the sum can be unmasked.
        let seeds_missing = self
            .round
            .as_ref()
            .and_then(|r| r.mask.as_ref())
            .is_some_and(|m| {
                record
                    .contributions
                    .iter()
                    .any(|c| !m.reveals.contains_key(&c.signer))
            });
        if seeds_missing {
            if let Some(rs) = self.round.as_mut() {
                rs.seen_records.remove(&hash);
            }
            self.pending_records.push((envelope, Some(hash), peer));
            return;
        }
        let Some(rs) = self.round.as_mut() else {
            return;
        };
        rs.verifying = Some(hash);
        let updates: Vec<Update> = if let Some(m) = rs.mask.as_ref() {
            let seeds: Vec<[u8; 32]> = record
                .contributions
                .iter()
                .filter_map(|c| m.reveals.get(&c.signer).copied())
                .collect();
            let epoch = m.epoch;
            let entries: Vec<(SignerKey, &Pooled)> = record
                .contributions
                .iter()
                .filter_map(|c| rs.pool.get(&c.signer).map(|p| (c.signer, p)))
                .collect();
            match self.fixed_point.as_ref().map(|fp| {
                masked_update(
                    fp,
                    &self.layout,
                    &entries,
                    &seeds,
                    record.round,
                    epoch,
                    record.base,
                    self.config.consortium.aggregation.clip_norm,
                )
            }) {
                Some(Ok(u)) => vec![u],
                Some(Err(e)) => {
                    rs.verifying = None;
                    let round = record.round;
                    self.reject(
                        RejectReason::BadRecord,
                        round,
                        Some(peer),
                        &hash.short(),
                        &e.to_string(),
                    );
                    return;
                }
                None => return,
            }
        } else {
            record
                .contributions
                .iter()
                .filter_map(|c| rs.pool.get(&c.signer).and_then(|p| p.plain().cloned()))
                .collect()
        };
        self.phase = Phase::Merging;
        tracing::info!(round = %record.round, record = %hash.short(), merger = %self.peer_of.get(&signer).map(ToString::to_string).unwrap_or_default(), "verifying a merge record");
        let Some(base) = self.base_model() else {
            if let Some(rs) = self.round.as_mut() {
                rs.verifying = None;
            }
            return;
        };
        let round = record.round;
        self.spawn_merge(
            base,
            updates,
            round,
            record,
            Duration::ZERO,
            Some((hash, envelope)),
        );
    }

    async fn on_verified(
        &mut self,
        round: RoundId,
        hash: RecordHash,
        envelope: Vec<u8>,
        record: MergeRecord,
        result: Result<Merged, AggregateError>,
    ) -> Result<(), EngineError> {
        let Some(rs) = self.round.as_mut() else {
            return Ok(());
        };
        if rs.id != round || rs.verifying != Some(hash) {
            return Ok(());
        }
        rs.verifying = None;
        self.phase = Phase::Collecting;
        let merged = match result {
            Ok(m) => m,
            Err(e) => {
                self.reject(
                    RejectReason::BadRecord,
                    round,
                    None,
                    &hash.short(),
                    &e.to_string(),
                );
                return Ok(());
            }
        };
        let state = self.merger_state_bytes(&merged.outcome.next_state);
        if merged.hash != record.model || sha(&state) != record.state {
            self.reject(
                RejectReason::MergeMismatch,
                round,
                None,
                &hash.short(),
                &format!(
                    "recomputed model {} but the record says {}",
                    merged.hash.short(),
                    record.model.short()
                ),
            );
            return Ok(());
        }
        // If we were about to merge, stand down.
        if let Some(rs) = self.round.as_mut() {
            rs.merging = false;
        }
        let (model, state_hash) = (merged.hash, record.state);
        // A record we took on a certificate over our own view is not ours to vouch for.
        let vouch = self
            .round
            .as_ref()
            .is_none_or(|r| !r.certified.contains(&hash));
        self.commit(record, hash, envelope, merged, &state)?;
        if vouch {
            self.attest(round, hash, model, state_hash).await;
        }
        self.publish_status(false);
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Catching up
    // ---------------------------------------------------------------------------------

    /// A member is in a later round. One round ahead while we are in the round, it has
    /// most likely committed the record we are about to receive: ask for that record (a
    /// few hundred bytes, verified by recomputing the merge) rather than download the
    /// model. Further ahead, or still ahead after two heartbeats, catch up on the chain.
    fn peer_ahead(&mut self, round: RoundId, from: PeerId) {
        if self.phase == Phase::Done {
            return;
        }
        let current = self.current();
        let now = Instant::now();
        if round.0 == current.0 + 1 && self.round.is_some() {
            // Catch-up adopts the newest record only on a certificate, so the record of
            // the round we are in is always asked for, and checked like a live one.
            let verifying = self.round.as_ref().is_some_and(|r| r.verifying.is_some());
            let recent = self
                .last_record_request
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(500));
            if !verifying && !recent {
                self.last_record_request = Some(now);
                self.fetch_record(current, None, from);
            }
            // Still behind after two heartbeats, and not recomputing the record of this
            // round already: our head may be a dead branch.
            let since = *self.ahead_since.get_or_insert(now);
            if verifying || now.duration_since(since) < self.heartbeat * 2 {
                return;
            }
        }
        self.begin_sync(from);
    }

    /// Starts a verified catch-up from `peer` (`catchup::sync_from`). Training goes on
    /// meanwhile: a claim to be ahead is believed only once records check and recompute
    /// (`on_synced`).
    fn begin_sync(&mut self, peer: PeerId) {
        if self.syncing {
            return;
        }
        let Some(head) = self.head else { return };
        // Catch-up recomputes every merge from our head, so it needs the head model.
        let Some(base) = self.base_model() else {
            tracing::debug!("catching up waits for the head model");
            return;
        };
        self.syncing = true;
        self.sync_head = Some(head);
        let rules = OwnedRules {
            consortium: self.digest,
            strategy: self.merger.name().to_owned(),
            quorum: self.quorum(),
            members: self.member_set(),
        };
        let at = Position {
            round: head.round.next(),
            base: head.model,
            prev: cellswarm_round::link(&head),
        };
        // The pool of the round we were collecting is not held against the chain's
        // record of it: our round may have started late (a restart), and refusing the
        // consortium's record on such a view would strand us for good.
        let check = ChainCheck::new(rules, at, catchup::MAX_SYNC_RECORDS);
        let rewind = match (&self.last_record, head.record) {
            (Some(r), Some(ours)) if r.round == head.round && head.round.0 >= 1 => {
                let before = RoundId(head.round.0 - 1);
                let state_before = if before.0 == 0 {
                    None
                } else {
                    self.load_record(before).ok().flatten().map(|r| r.state)
                };
                Some(Rewind {
                    state_before,
                    ours,
                    before: Position {
                        round: r.round,
                        base: r.base,
                        prev: r.prev,
                    },
                    contributions: r.contributions.iter().map(|c| c.delta).collect(),
                })
            }
            _ => None,
        };
        let setup = SyncSetup {
            net: self.net.clone(),
            peer,
            members: self.members.clone(),
            digest: self.digest,
            check,
            merged: self.merged_hashes.clone(),
            base,
            store: Arc::clone(&self.store),
            state: head.state,
            aggregation: self.config.consortium.aggregation.clone(),
            layout: Arc::clone(&self.layout),
            limits: self.limits,
            holders: self.peer_of.clone(),
            member_set: self.member_set(),
            threshold: self.cert_threshold(),
            connected: self.connected.iter().copied().collect(),
            rewind,
        };
        let tx = self.internal_tx.clone();
        tracing::info!(peer = %peer, from = %head.round, "catching up with a peer that is ahead");
        self.tracker.spawn(async move {
            let r = catchup::sync_from(setup).await;
            let _ = tx.send(Internal::Synced(r)).await;
        });
    }

    async fn on_synced(
        &mut self,
        outcome: Result<SyncOutcome, catchup::CatchUpError>,
    ) -> Result<(), EngineError> {
        self.syncing = false;
        let began = self.sync_head.take();
        let o = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "catching up failed; will retry");
                return Ok(());
            }
        };
        if began != self.head {
            // A round committed while we caught up: the chain was checked from an older
            // head. The next heartbeat from a peer ahead starts another catch-up.
            tracing::info!("the head moved while catching up; the catch-up is dropped");
            return Ok(());
        }
        let Some((last, last_hash, _)) = o.records.last().cloned() else {
            return Ok(());
        };
        self.store.put_model(&last.model, &o.model)?;
        self.store
            .put_blob(BlobKind::State, &last.state, &o.state)?;
        // One transaction for the whole chain: committed one by one, a crash between two
        // records would leave a head whose model (only the last one is fetched) is not
        // in the store.
        let commits: Vec<RoundCommit> = o
            .records
            .iter()
            .map(|(record, hash, envelope)| RoundCommit::of_record(record, *hash, envelope.clone()))
            .collect();
        self.store.commit_rounds(&commits)?;
        for (record, _, _) in &o.records {
            self.forget_old_deltas(record.round);
            for c in &record.contributions {
                self.merged_hashes.insert(c.delta);
            }
        }
        if o.rewound {
            // The replaced round's deltas are no longer merged ones.
            self.merged_hashes.clear();
            self.restore_merged_hashes(last.round)?;
        }
        self.merger.load_state(&o.state, &self.layout)?;
        let head = RoundCommit::of_record(&last, last_hash, Vec::new()).head;
        // The rounds we were in are over: a training still running for one is cancelled.
        self.train_cancel.store(true, Ordering::Relaxed);
        tracing::info!(round = %last.round, model = %last.model.short(), records = o.records.len(), "caught up");
        self.last_record = Some(last);
        self.ahead_since = None;
        self.adopt_head(head, o.model);
        self.round = None;
        if self.trainer_slot().is_some() {
            self.start_round().await;
        } else {
            self.restart_when_trainer_returns = true;
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Events
    // ---------------------------------------------------------------------------------

    async fn on_internal(&mut self, msg: Internal) -> Result<(), EngineError> {
        match msg {
            Internal::Trained {
                round,
                trainer,
                result,
            } => {
                *self.trainer_slot() = Some(trainer);
                if round == RoundId(0) || self.restart_when_trainer_returns {
                    // The trainer came back from an evaluation or a cancelled round.
                    if self.restart_when_trainer_returns || self.round.is_none() {
                        self.restart_when_trainer_returns = false;
                        if self.phase != Phase::Syncing || self.model.is_some() || self.model_lent {
                            self.start_round().await;
                        }
                    }
                    return Ok(());
                }
                self.on_trained(round, result).await;
            }
            Internal::Fetched {
                round,
                hash,
                peer,
                result,
            } => {
                if let Some(rs) = self.round.as_mut() {
                    rs.fetching.remove(&hash);
                }
                if self.round.as_ref().is_none_or(|r| r.id != round) {
                    return Ok(());
                }
                match result {
                    Ok(r) if r.header == ResponseHeader::Delta => {
                        let env: Vec<u8> = r.body.into();
                        // A plain delta is kept and served for the rounds a member keeps:
                        // a member catching up recomputes a round from any member that
                        // pooled its deltas, not only from their signers (docs/protocol.md,
                        // "Catching up").
                        let keep = self.fixed_point.is_none().then(|| env.clone());
                        if self.accept_envelope(round, hash, env, Some(peer))
                            && let Some(env) = keep
                        {
                            let store = Arc::clone(&self.store);
                            self.tracker.spawn_blocking(move || {
                                if let Err(e) =
                                    store.put_blob_hashed(BlobKind::Delta, hash.as_bytes(), &env)
                                {
                                    tracing::warn!(round = %round, delta = %hash.short(), error = %e, "could not keep a fetched delta");
                                }
                            });
                        }
                        self.retry_pending_records().await;
                    }
                    Ok(r) => {
                        tracing::debug!(peer = %peer, delta = %hash.short(), answer = ?r.header, "delta not available")
                    }
                    Err(e) => {
                        tracing::debug!(peer = %peer, delta = %hash.short(), error = %e, "fetching a delta failed")
                    }
                }
            }
            Internal::RecordFetched {
                round,
                expected,
                peer,
                result,
            } => match result {
                Ok(r) if r.header == ResponseHeader::Record => {
                    self.on_record(r.body.into(), expected, peer).await
                }
                Ok(_) => tracing::debug!(round = %round, peer = %peer, "record not available"),
                Err(e) => {
                    tracing::debug!(round = %round, peer = %peer, error = %e, "fetching a record failed")
                }
            },
            Internal::List {
                round,
                peer,
                result,
            } => {
                if let Ok(SyncResponse {
                    header: ResponseHeader::DeltaList(list),
                    ..
                }) = result
                    && self.round.as_ref().is_some_and(|r| r.id == round)
                {
                    {
                        for (signer, hash) in list {
                            if self.members.iter().any(|m| *m == signer) {
                                let from = self
                                    .peer_of
                                    .get(&signer)
                                    .copied()
                                    .filter(|p| self.connected.contains(p))
                                    .unwrap_or(peer);
                                self.fetch_delta(hash, from);
                            }
                        }
                    }
                }
            }
            Internal::Merged {
                round,
                record,
                result,
                base,
            } => {
                self.take_back(base);
                self.on_merged(round, *record, result).await?;
                self.ensure_model();
            }
            Internal::Verified {
                round,
                hash,
                envelope,
                record,
                result,
                base,
            } => {
                self.take_back(base);
                self.on_verified(round, hash, envelope, *record, result)
                    .await?;
                self.ensure_model();
            }
            Internal::Synced(r) => self.on_synced(r).await?,
            Internal::GenesisFetched(r) => match r {
                Ok((w, state)) => {
                    let genesis = w.hash();
                    self.store
                        .put_blob(BlobKind::Model, genesis.as_bytes(), &w.to_bytes())?;
                    if let (Some(st), Some(h)) = (state, self.head) {
                        self.store.put_blob(BlobKind::State, &h.state, &st)?;
                    }
                    self.fetching_genesis = false;
                    if self.head.is_none() {
                        self.commit_genesis(
                            Weights::from_flat(Arc::clone(&self.layout), w.into_values())
                                .map_err(|e| EngineError::Layout(e.to_string()))?,
                        )?;
                    } else if let Some(h) = self.head {
                        // The head's model was missing from the store: restored now.
                        let m = self
                            .load_model(&h.model)?
                            .ok_or(EngineError::Layout("refetched model vanished".into()))?;
                        if let Some(s) = self.store.blob(BlobKind::State, &h.state)? {
                            self.merger.load_state(&s, &self.layout)?;
                        }
                        self.adopt_head(h, m);
                    }
                    tracing::info!(model = %genesis.short(), "received the starting model");
                    self.start_round().await;
                }
                Err(e) => {
                    self.fetching_genesis = false;
                    tracing::debug!(error = %e, "fetching the starting model failed; will retry");
                }
            },
            Internal::Evaluated(f1) => {
                if let Some(f) = f1 {
                    tracing::info!(round = %self.head.map(|h| h.round).unwrap_or_default(), f1 = f, "held-out F1 of the merged model");
                }
                self.metrics.set_last(None, f1, None);
            }
        }
        self.publish_status(false);
        Ok(())
    }

    async fn retry_pending_records(&mut self) {
        let pending = std::mem::take(&mut self.pending_records);
        for (env, expected, peer) in pending {
            self.on_record(env, expected, peer).await;
        }
    }

    async fn on_net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Connected(p) => {
                self.connected.insert(p);
                self.heartbeat_now().await;
                self.ask_for_deltas(p);
            }
            NetEvent::Disconnected(p) => {
                self.connected.remove(&p);
            }
            NetEvent::Listening(_) => {}
            NetEvent::Gossip { source, id, data } => {
                let accept = self.on_gossip(source, data).await;
                self.net.validate(id, source, accept).await;
            }
            NetEvent::Inbound {
                peer,
                request,
                channel,
            } => self.serve(peer, request, channel),
        }
        self.publish_status(false);
    }

    fn ask_for_deltas(&mut self, peer: PeerId) {
        let Some(rs) = self.round.as_mut() else {
            return;
        };
        if rs.pool.len() >= self.peer_of.len() {
            return;
        }
        let now = Instant::now();
        if rs
            .last_list_request
            .get(&peer)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(2))
        {
            return;
        }
        rs.last_list_request.insert(peer, now);
        let round = rs.id;
        self.request_then(peer, Request::Deltas(round), move |result| Internal::List {
            round,
            peer,
            result,
        });
    }

    async fn on_gossip(&mut self, source: PeerId, data: Vec<u8>) -> MessageAcceptance {
        let current = self.current();
        let (signer, a, attestation) = match verify::gossip(
            data,
            super::network::MAX_GOSSIP_BYTES as u64,
            &self.members,
            self.digest,
        ) {
            Ok((signer, Gossip::Announcement(a))) => (signer, a, None),
            Ok((signer, Gossip::Attestation(a, envelope))) => (signer, a, Some(envelope)),
            Ok((signer, Gossip::Mask(m))) => {
                if self.fixed_point.is_none() {
                    return MessageAcceptance::Ignore;
                }
                self.on_mask_message(signer, m).await;
                return MessageAcceptance::Accept;
            }
            Err((reason, detail)) => {
                self.reject(reason, current, Some(source), "-", &detail);
                return MessageAcceptance::Reject;
            }
        };
        let signer_peer = self.peer_of.get(&signer).copied().unwrap_or(source);
        let from = if self.connected.contains(&signer_peer) {
            signer_peer
        } else {
            source
        };
        match a {
            Announcement::DeltaReady { round, delta, .. } => {
                if round == current && self.round.is_some() {
                    self.fetch_delta(delta, from);
                } else if round > current {
                    self.peer_ahead(round, from);
                }
            }
            Announcement::MergeReady { round, record, .. } => {
                if round == current {
                    self.fetch_record(round, Some(record), from);
                } else if round > current {
                    self.peer_ahead(round, from);
                }
            }
            Announcement::Committed {
                round,
                record,
                model,
                state,
            } => {
                if round > current {
                    self.peer_ahead(round, from);
                } else {
                    // Kept (one per member and round, for rounds we have reached): served
                    // to nodes that catch up, and for the round we are in, enough of them
                    // let us adopt a record our own view of the round refused.
                    if let Some(env) = &attestation
                        && let Err(e) = self.store.put_attestation(round, &signer.0, env)
                    {
                        tracing::warn!(round = %round, error = %e, "could not keep an attestation");
                    }
                    if round == current
                        && self.round.is_some()
                        && self.certified(round, model, state)
                    {
                        if let Some(rs) = self.round.as_mut() {
                            rs.seen_records.remove(&record);
                        }
                        self.fetch_record(round, Some(record), from);
                    }
                }
            }
            Announcement::Heartbeat { round, model } => {
                self.peer_rounds.insert(signer_peer, (round, model));
                if round > current {
                    self.peer_ahead(round, from);
                } else if round == current && self.head.is_some_and(|h| h.model != model) {
                    tracing::error!(round = %round, peer = %signer_peer, theirs = %model.short(), ours = %self.head.map(|h| h.model.short()).unwrap_or_default(), "a member started this round from another model (the chain has forked)");
                } else if round == current {
                    self.ask_for_deltas(from);
                }
            }
        }
        MessageAcceptance::Accept
    }

    /// Answers a peer's request from the store, off the event loop.
    fn serve(
        &self,
        peer: PeerId,
        request: Request,
        channel: libp2p::request_response::ResponseChannel<SyncResponse>,
    ) {
        let net = self.net.clone();
        if !self.signer_of.contains_key(&peer) {
            tracing::warn!(peer = %peer, "refusing to serve a non-member");
            self.tracker.spawn(async move {
                net.respond(
                    channel,
                    SyncResponse::empty(ResponseHeader::Refused("not a member".into())),
                )
                .await;
            });
            return;
        }
        let store = Arc::clone(&self.store);
        let head = self.head;
        let list: Option<(RoundId, Vec<(SignerKey, DeltaHash)>)> = self
            .round
            .as_ref()
            .map(|r| (r.id, r.pool.iter().map(|(s, p)| (*s, p.hash)).collect()));
        let published = self.published.clone();
        let own = self.round.as_ref().and_then(|r| r.own_env.clone());
        self.tracker.spawn(async move {
            let response =
                tokio::task::spawn_blocking(move || -> Result<SyncResponse, StoreError> {
                    let blob = |kind,
                                h: &[u8; 32],
                                header: ResponseHeader|
                     -> Result<SyncResponse, StoreError> {
                        Ok(match store.blob_for_peer(kind, h)? {
                            Some(body) => SyncResponse {
                                header,
                                body: body.into(),
                            },
                            None => SyncResponse::empty(ResponseHeader::NotFound),
                        })
                    };
                    let record = |round: RoundId| -> Result<SyncResponse, StoreError> {
                        let stored = match store.record(round)? {
                            Some(b) => Some(b),
                            None => published
                                .clone()
                                .filter(|(r, _)| *r == round)
                                .map(|(_, b)| b),
                        };
                        Ok(match stored {
                            Some(body) => SyncResponse {
                                header: ResponseHeader::Record,
                                body: body.into(),
                            },
                            None => SyncResponse::empty(ResponseHeader::NotFound),
                        })
                    };
                    match request {
                        Request::Delta(h) => match own {
                            Some((mine, body)) if mine == h => Ok(SyncResponse {
                                header: ResponseHeader::Delta,
                                body,
                            }),
                            _ => blob(BlobKind::Delta, h.as_bytes(), ResponseHeader::Delta),
                        },
                        Request::Model(h) => {
                            blob(BlobKind::Model, h.as_bytes(), ResponseHeader::Model)
                        }
                        Request::State(h) => blob(BlobKind::State, &h, ResponseHeader::State),
                        Request::Record(r) => record(r),
                        Request::Latest => match head.filter(|h| h.record.is_some()) {
                            Some(h) => record(h.round),
                            None => Ok(SyncResponse::empty(ResponseHeader::NotFound)),
                        },
                        Request::Deltas(r) => Ok(match list {
                            Some((round, l)) if round == r => {
                                SyncResponse::empty(ResponseHeader::DeltaList(l))
                            }
                            _ => SyncResponse::empty(ResponseHeader::DeltaList(Vec::new())),
                        }),
                        Request::Attestations(r) => Ok(SyncResponse::empty(
                            ResponseHeader::Attestations(store.attestations(r)?),
                        )),
                    }
                })
                .await;
            let response = match response {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "store error while serving a peer");
                    SyncResponse::empty(ResponseHeader::NotFound)
                }
                Err(_) => SyncResponse::empty(ResponseHeader::NotFound),
            };
            net.respond(channel, response).await;
        });
    }

    async fn on_tick(&mut self) -> Result<(), EngineError> {
        if self.last_heartbeat.elapsed() >= self.heartbeat {
            self.heartbeat_now().await;
            // Re-announce our delta and ask peers for theirs: gossip is only the fast path.
            if let Some(rs) = &self.round {
                let own = rs.pool.get(&self.me).map(|p| p.hash);
                let (round, bytes) = (rs.id, rs.own_bytes);
                // Gossip reaches only those connected when it is sent: key shares are
                // repeated too (the first set a member sends per epoch is the one kept).
                let keys = rs.mask.as_ref().and_then(|m| {
                    self.mask_keys
                        .get(&(round, m.epoch))
                        .and_then(|by| by.get(&self.me))
                        .map(|k| (m.epoch, k.iter().map(|(p, k)| (*p, *k)).collect::<Vec<_>>()))
                });
                if let Some(h) = own {
                    self.announce_delta(round, h, bytes).await;
                }
                if let Some((epoch, keys)) = keys {
                    self.publish_keys(round, epoch, keys).await;
                }
                // Seals and reveals too (a verifier needs every seed).
                let sealed: Vec<Vec<u8>> = self
                    .round
                    .as_ref()
                    .and_then(|r| r.mask.as_ref())
                    .map(|m| m.seal_envelopes.clone())
                    .unwrap_or_default();
                for env in sealed {
                    let _ = self.net.publish(env).await;
                }
                // A restart reaches members that were away when it was first sent.
                let restart = self
                    .round
                    .as_ref()
                    .and_then(|r| r.mask.as_ref())
                    .and_then(|m| m.restart_envelope.clone());
                if let Some(env) = restart
                    && let Err(e) = self.net.publish(env).await
                {
                    tracing::debug!(error = %e, "restart not republished");
                }
                let peers: Vec<PeerId> = self.connected.iter().copied().collect();
                for p in peers {
                    self.ask_for_deltas(p);
                }
            }
            if self.model.is_none() && !self.model_lent && !self.fetching_genesis {
                self.fetch_missing_model();
            }
        }
        self.check_merge().await;
        Ok(())
    }

    fn fetch_missing_model(&mut self) {
        let wanted = match self.head {
            Some(h) => h.model,
            None => match self.config.consortium.genesis {
                Some(g) => g,
                None => return,
            },
        };
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        if peers.is_empty() {
            return;
        }
        self.fetching_genesis = true;
        let net = self.net.clone();
        let tx = self.internal_tx.clone();
        let limits = self.limits.layout;
        // The head's aggregator state, when the store lost it too.
        let want_state = self
            .head
            .map(|h| h.state)
            .filter(|st| !matches!(self.store.blob(BlobKind::State, st), Ok(Some(_))));
        self.tracker.spawn(async move {
            let mut result = Err("no peer had the model".to_owned());
            for p in &peers {
                if let Ok(r) = net.request(*p, Request::Model(wanted)).await
                    && r.header == ResponseHeader::Model
                    && ModelHash::of(&r.body) == wanted
                {
                    result = Weights::from_bytes(&r.body, &limits).map_err(|e| e.to_string());
                    if result.is_ok() {
                        break;
                    }
                }
            }
            let mut state = None;
            if let Some(st) = want_state {
                for p in &peers {
                    if let Ok(r) = net.request(*p, Request::State(st)).await
                        && r.header == ResponseHeader::State
                        && sha(&r.body) == st
                    {
                        state = Some(r.body.into());
                        break;
                    }
                }
                if state.is_none() && result.is_ok() {
                    result = Err("no peer had the aggregator state".to_owned());
                }
            }
            let _ = tx
                .send(Internal::GenesisFetched(result.map(|w| (w, state))))
                .await;
        });
    }

    fn publish_status(&self, stopped: bool) {
        let s = Status {
            peer_id: self.identity.peer_id().to_string(),
            round: self.round.as_ref().map_or_else(|| self.current(), |r| r.id),
            phase: self.phase.name().to_owned(),
            model: self.head.map(|h| h.model),
            head_round: self.head.map(|h| h.round).unwrap_or_default(),
            connected: self.connected.iter().map(ToString::to_string).collect(),
            deltas: self.round.as_ref().map_or(0, |r| r.pool.len()),
            last_record: self.last_record.clone(),
            rounds_completed: self.metrics.rounds_completed.load(Ordering::Relaxed),
            seeds_rebuilt: self.metrics.seeds_rebuilt.load(Ordering::Relaxed),
            epsilon: self.local_epsilon(),
            dp_delta: self.config.node.privacy.local_dp.map(|dp| dp.delta),
            stopped: stopped || self.phase == Phase::Done,
        };
        self.status.send_if_modified(|old| {
            if *old == s {
                false
            } else {
                *old = s;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15, hole 6: the unmasked mean of a secure-aggregation round was never checked
    /// against `clip_norm`, so a participant that skipped clipping moved the model as far
    /// as the fixed-point range allowed.
    #[test]
    fn an_unmasked_mean_longer_than_clip_norm_is_refused() {
        let layout = Arc::new(Layout::new(vec![("w", vec![16])]).unwrap());
        let fp = FixedPoint::new(16, 1.0, 2).unwrap();
        let me = SignerKey([1; 32]);
        let (round, epoch, seed) = (RoundId(3), 0, [9u8; 32]);
        let pooled = |values: &[f32]| {
            let mut words = secagg::mask(values, &fp, &me, &[], round);
            secagg::self_mask(&mut words, &seed, round, epoch, false);
            Pooled::new(
                DeltaHash::of(&secagg::words_to_bytes(&words)),
                Checked::Masked {
                    words: Arc::new(words),
                    epoch,
                    samples: 10,
                },
            )
        };
        // Clipped to norm 0.4: merged. Unclipped (every coordinate 0.9, norm 3.6): refused.
        let honest = pooled(&[0.1; 16]);
        let mean = masked_update(
            &fp,
            &layout,
            &[(me, &honest)],
            &[seed],
            round,
            epoch,
            ModelHash::default(),
            Some(0.5),
        );
        assert!(mean.is_ok(), "{mean:?}");
        let liar = pooled(&[0.9; 16]);
        let refused = masked_update(
            &fp,
            &layout,
            &[(me, &liar)],
            &[seed],
            round,
            epoch,
            ModelHash::default(),
            Some(0.5),
        );
        assert!(
            matches!(refused, Err(MaskedError::Norm { .. })),
            "{refused:?}"
        );
        // Without clip_norm (plain rounds never reach here) nothing is checked.
        assert!(
            masked_update(
                &fp,
                &layout,
                &[(me, &liar)],
                &[seed],
                round,
                epoch,
                ModelHash::default(),
                None
            )
            .is_ok()
        );
    }
}
