//! Verified catch-up, the driver's half: fetch a peer's records and the deltas each one
//! names, recompute every merge, and keep the records whose merge gives the model they
//! name. The rules (chain links, quorum, members, replays, merger turns) are
//! `cellswarm_round::ChainCheck`'s, the same as a live round's.
//!
//! A node catches up from its own head: it needs no model from the peer, only records
//! and deltas, so a peer cannot hand it a model of its choosing. Each member serves its
//! own deltas and the plain deltas it fetched, for the newest rounds it keeps (the state
//! machine's `HISTORY`), from its store; a delta is asked of its signer first, then of
//! the peer the node catches up from, then of every connected member.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use cellswarm_aggregator::Merger;
use cellswarm_common::config::AggregationConfig;
use cellswarm_common::delta::DeltaLimits;
use cellswarm_common::envelope::MemberKeys;
use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};
use cellswarm_common::weights::{Layout, Weights};
use cellswarm_common::wire::{MergeRecord, Request, ResponseHeader};
use cellswarm_round::{ChainCheck, Position};
use libp2p::PeerId;

use super::engine::{read_model, sha};
use super::network::NetClient;
use super::verify::{self, Checked, DeltaCheck};
use crate::store::{BlobKind, Store};

/// The most records one catch-up checks and commits; a node further behind catches up
/// in several steps.
pub const MAX_SYNC_RECORDS: usize = 1024;

/// A record confirmed by recomputation: the record, its hash and its signed envelope.
pub(super) type Confirmed = (MergeRecord, RecordHash, Vec<u8>);

/// What a catch-up needs, taken from the engine when it begins.
pub(super) struct SyncSetup {
    /// The network handle.
    pub net: NetClient,
    /// The peer that is ahead.
    pub peer: PeerId,
    /// The members' keys (envelope signatures).
    pub members: MemberKeys,
    /// The consortium agreement digest.
    pub digest: [u8; 32],
    /// The rules, from our head.
    pub check: ChainCheck,
    /// Deltas merged up to our head.
    pub merged: HashSet<DeltaHash>,
    /// Our head model.
    pub base: Arc<Weights>,
    /// Our store (aggregator states, and models a rewind starts from).
    pub store: Arc<dyn Store>,
    /// Our aggregator state at the head, by hash (read in the catch-up's task).
    pub state: [u8; 32],
    /// The agreed aggregation settings.
    pub aggregation: AggregationConfig,
    /// The model layout.
    pub layout: Arc<Layout>,
    /// Delta size limits.
    pub limits: DeltaLimits,
    /// Who serves each member's deltas, and who else is connected.
    pub holders: BTreeMap<SignerKey, PeerId>,
    /// Connected peers.
    pub connected: Vec<PeerId>,
    /// The members' signing keys.
    pub member_set: BTreeSet<SignerKey>,
    /// Attestations a commit certificate needs.
    pub threshold: usize,
    /// Our head record, when our head round may be a dead branch to replace: its round,
    /// hash and the position before it, the model and state before it, and the deltas it
    /// merged (no longer merged if it is replaced).
    pub rewind: Option<Rewind>,
}

impl std::fmt::Debug for SyncSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSetup")
            .field("peer", &self.peer)
            .field("at", &self.check.position())
            .finish_non_exhaustive()
    }
}

/// Our head round, replaceable by the consortium's record of it.
pub(super) struct Rewind {
    /// Our head record's hash.
    pub ours: RecordHash,
    /// The position our head record continued.
    pub before: Position,
    /// The deltas our head record merged.
    pub contributions: Vec<DeltaHash>,
    /// The aggregator state hash before our head round (none before round 1: a fresh
    /// aggregator's), to fetch it if the store lacks it.
    pub state_before: Option<[u8; 32]>,
}

/// The outcome of catching up with a peer.
#[derive(Debug)]
pub(super) struct SyncOutcome {
    /// Records confirmed, oldest first.
    pub records: Vec<Confirmed>,
    /// Our head round was replaced by the peer's record of it (a fork resolved).
    pub rewound: bool,
    /// The model after the last record.
    pub model: Weights,
    /// The aggregator state after the last record.
    pub state: Vec<u8>,
}

/// Why a catch-up stopped without committing anything.
#[derive(Debug, thiserror::Error)]
pub(super) enum CatchUpError {
    /// A request to a peer failed.
    #[error("request: {0}")]
    Request(#[from] super::network::NetError),
    /// A record's envelope did not verify.
    #[error("record: {0}")]
    Envelope(String),
    /// The peer has no record at all.
    #[error("the peer has no merge record yet")]
    NoRecord,
    /// The peer's newest record is older than our position.
    #[error("the peer is not ahead of us")]
    NotAhead,
    /// The peer's record of our head round continues another chain.
    #[error("the peer's record of round {0} forks earlier than our head")]
    ForksEarlier(RoundId),
    /// The peer does not serve a record it claims to be past.
    #[error("the peer lacks the record of round {0}")]
    MissingRecord(u64),
    /// Nothing is left to commit.
    #[error("nothing to catch up")]
    Nothing,
    /// The only record checked is the peer's newest and nothing certifies it.
    #[error("the peer's newest record has no round on top of it yet; the live round decides it")]
    Uncertified,
    /// A record broke the chain's rules, or its merge did not give what it says.
    #[error(transparent)]
    Chain(#[from] cellswarm_round::ChainError),
    /// The aggregator could not be made, restored or run.
    #[error("aggregator: {0}")]
    Aggregator(#[from] cellswarm_aggregator::AggregateError),
    /// The merge of a record failed.
    #[error("round {round}: the merge fails: {source}")]
    Merge {
        /// The record's round.
        round: RoundId,
        /// Why.
        source: cellswarm_aggregator::AggregateError,
    },
    /// A record of a plain round names a masked delta.
    #[error("a masked delta outside secure aggregation")]
    MaskedDelta,
    /// No peer served a delta the record names, as the record names it.
    #[error("round {round}: delta {}: {why}", .delta.short())]
    Delta {
        /// The record's round.
        round: RoundId,
        /// The delta.
        delta: DeltaHash,
        /// What the last peer asked answered.
        why: String,
    },
    /// No peer served a model.
    #[error("no peer served model {}", .0.short())]
    Model(ModelHash),
    /// A served model does not fit our layout.
    #[error("model: {0}")]
    Layout(#[from] cellswarm_common::weights::WeightsError),
    /// No peer served an aggregator state.
    #[error("no peer served the aggregator state")]
    State,
    /// A blocking task panicked or was cancelled.
    #[error("background task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The rounds to ask for: from `from` on, at most `limit` of them, up to `latest`.
pub(super) fn sync_rounds(from: u64, latest: u64, limit: usize) -> std::ops::RangeInclusive<u64> {
    from..=latest.min(from.saturating_add(limit.max(1) as u64 - 1))
}

/// The merge state a catch-up carries from record to record.
struct Chain {
    check: ChainCheck,
    merger: Merger,
    base: Arc<Weights>,
    state: Vec<u8>,
    merged: HashSet<DeltaHash>,
    /// The model and state before the last confirmed record.
    before: Option<(Arc<Weights>, Vec<u8>)>,
}

/// Catches up with `s.peer`: see the module documentation.
pub(super) async fn sync_from(s: SyncSetup) -> Result<SyncOutcome, CatchUpError> {
    let members = s.members.clone();
    let open = |body: Vec<u8>| {
        verify::record(body, &members, s.digest).map_err(|(_, e)| CatchUpError::Envelope(e))
    };
    let latest = s.net.request(s.peer, Request::Latest).await?;
    if latest.header != ResponseHeader::Record {
        return Err(CatchUpError::NoRecord);
    }
    let (latest, _, _, _) = open(latest.body.into())?;
    let from = s.check.position().round.0;
    if latest.round.0 < from {
        return Err(CatchUpError::NotAhead);
    }
    let ctx = Ctx {
        net: &s.net,
        peer: s.peer,
        holders: &s.holders,
        connected: &s.connected,
        members: &s.members,
        digest: s.digest,
        layout: &s.layout,
        limits: &s.limits,
        aggregation: &s.aggregation,
        member_set: &s.member_set,
        threshold: s.threshold,
        store: &s.store,
    };
    let state = stored_state(&ctx, s.state).await?;
    let mut merger = Merger::from_config(&s.aggregation)?;
    merger.load_state(&state, &s.layout)?;
    let mut chain = Chain {
        check: s.check,
        merger,
        base: s.base,
        state,
        merged: s.merged,
        before: None,
    };
    let mut records = Vec::new();
    let mut rewound = false;
    // Our head round may be a dead branch: a merger that committed its own record while
    // the others committed another one for that round (a restarted node can race them).
    // If the peer holds another record for our head round that continues the same
    // position and recomputes, it is the consortium's: replace ours.
    if let Some(rw) = s.rewind
        && let Ok(resp) = s
            .net
            .request(s.peer, Request::Record(rw.before.round))
            .await
        && resp.header == ResponseHeader::Record
    {
        let (rec, hash, signer, env) = open(resp.body.into())?;
        if hash != rw.ours && rec.round == rw.before.round {
            if rec.base != rw.before.base || rec.prev != rw.before.prev {
                return Err(CatchUpError::ForksEarlier(rw.before.round));
            }
            // From our store, else (a catch-up keeps only its last model) from the peers
            // by the hashes our own records name; before round 1, a fresh aggregator's.
            let model = stored_model(&ctx, rw.before.base).await?;
            let state = match rw.state_before {
                Some(h) => stored_state(&ctx, h).await?,
                None => Merger::from_config(&s.aggregation)?.save_state(&s.layout),
            };
            tracing::warn!(round = %rw.before.round, ours = %rw.ours.short(), theirs = %hash.short(), "our last round is not the one the peer committed; checking the peer's record of it");
            let mut merger = Merger::from_config(&s.aggregation)?;
            merger.load_state(&state, &s.layout)?;
            for d in &rw.contributions {
                chain.merged.remove(d);
            }
            chain.check = chain.check.restart_at(rw.before);
            chain.merger = merger;
            chain.base = Arc::new(model);
            chain.state = state;
            records.push(verify_one(&mut chain, &ctx, rec, hash, signer, env).await?);
            rewound = true;
        }
    }
    let from = chain.check.position().round.0;
    let rounds = sync_rounds(from, latest.round.0, MAX_SYNC_RECORDS - records.len());
    if *rounds.end() < latest.round.0 {
        tracing::info!(
            from,
            until = *rounds.end(),
            latest = latest.round.0,
            "far behind: catching up in steps"
        );
    }
    for r in rounds {
        let resp = s.net.request(s.peer, Request::Record(RoundId(r))).await?;
        if resp.header != ResponseHeader::Record {
            if records.is_empty() {
                return Err(CatchUpError::MissingRecord(r));
            }
            break;
        }
        let (rec, hash, signer, env) = open(resp.body.into())?;
        match verify_one(&mut chain, &ctx, rec, hash, signer, env).await {
            Ok(c) => records.push(c),
            // What was confirmed before stays confirmed: commit it, report the rest.
            Err(e) if !records.is_empty() => {
                tracing::warn!(round = r, error = %e, "catch-up stopped at a record that does not check");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    // The newest record confirmed has no round on top of it, so nothing shows that the
    // other members adopted it: its deltas and its merge check out, but its merger may
    // have chosen them (a subset of the round's deltas, refused by the members who saw
    // the round). Without a commit certificate it is left to the live round, whose rules
    // see that. Every earlier record is followed by one whose deltas, signed by a quorum
    // of members, start from its model: while fewer members lie than
    // `rounds.min_peers`, an honest member adopted it.
    let newest_certified = match records.last() {
        Some((r, _, _)) => certificate(&ctx, r).await,
        None => false,
    };
    let (base, state) = if newest_certified {
        (chain.base, chain.state)
    } else {
        if records.pop().is_none() {
            return Err(CatchUpError::Nothing);
        }
        drop(chain.base);
        chain.before.take().ok_or(CatchUpError::Nothing)?
    };
    if records.is_empty() {
        return Err(CatchUpError::Uncertified);
    }
    let model = Arc::try_unwrap(base).unwrap_or_else(|shared| (*shared).clone());
    Ok(SyncOutcome {
        records,
        rewound,
        model,
        state,
    })
}

/// What fetching and checking a record's deltas needs.
struct Ctx<'a> {
    net: &'a NetClient,
    peer: PeerId,
    holders: &'a BTreeMap<SignerKey, PeerId>,
    connected: &'a [PeerId],
    members: &'a MemberKeys,
    digest: [u8; 32],
    layout: &'a Arc<Layout>,
    limits: &'a DeltaLimits,
    aggregation: &'a AggregationConfig,
    member_set: &'a BTreeSet<SignerKey>,
    threshold: usize,
    store: &'a Arc<dyn Store>,
}

/// Checks one record by the rules, fetches its deltas, recomputes its merge and, if the
/// merge gives the record's model and state, moves the chain on.
async fn verify_one(
    chain: &mut Chain,
    ctx: &Ctx<'_>,
    record: MergeRecord,
    hash: RecordHash,
    signer: SignerKey,
    envelope: Vec<u8>,
) -> Result<Confirmed, CatchUpError> {
    let merged = &chain.merged;
    let record = chain
        .check
        .check(record, hash, signer, |d| merged.contains(d))?
        .clone();
    if ctx.aggregation.secure_aggregation {
        // Masked deltas cannot be summed without the round's revealed seeds, which are
        // not kept: a record of a secure-aggregation round is checked by the rules and its
        // signed deltas, and adopted only with a successor or a commit certificate
        // (docs/security.md).
        tracing::warn!(round = %record.round, record = %hash.short(), "secure aggregation: catch-up checks this record's rules and deltas but cannot recompute its merge");
        let gone = fetch_all(ctx, &record, true)
            .await
            .into_iter()
            .find_map(Result::err);
        if let Some(e) = gone
            && !certificate(ctx, &record).await
        {
            return Err(e);
        }
        return adopt_unrecomputed(chain, ctx, record, hash, envelope).await;
    }
    let mut updates = Vec::with_capacity(record.contributions.len());
    let mut gone = None;
    for checked in fetch_all(ctx, &record, false).await {
        match checked {
            Ok(Checked::Plain(u)) => updates.push(u),
            Ok(Checked::Masked { .. }) => {
                return Err(CatchUpError::MaskedDelta);
            }
            Err(e) => {
                gone = Some(e);
                break;
            }
        }
    }
    if let Some(e) = gone {
        // A delta no reachable member serves (its signer left, or lied): only a commit
        // certificate can vouch for the record now.
        if certificate(ctx, &record).await {
            tracing::info!(round = %record.round, record = %hash.short(), "a record whose deltas are gone is adopted on its commit certificate");
            drop(updates);
            return adopt_unrecomputed(chain, ctx, record, hash, envelope).await;
        }
        return Err(e);
    }
    // The merge runs off the async threads; the merger and base travel with it.
    let base = Arc::clone(&chain.base);
    let merger = std::mem::replace(&mut chain.merger, Merger::from_config(ctx.aggregation)?);
    let layout = Arc::clone(ctx.layout);
    let round = record.round;
    let base_hash = record.base;
    let (merger, result) = tokio::task::spawn_blocking(move || {
        let mut merger = merger;
        let result = merger.merge(&base, base_hash, &updates, round).map(|m| {
            merger.commit(m.outcome.next_state.clone());
            let state = merger.save_state(&layout);
            (m, state)
        });
        (merger, result)
    })
    .await?;
    chain.merger = merger;
    let (merged, state) = result.map_err(|source| CatchUpError::Merge { round, source })?;
    chain.check.confirm(merged.hash, sha(&state))?;
    chain
        .merged
        .extend(record.contributions.iter().map(|c| c.delta));
    let old = std::mem::replace(&mut chain.base, Arc::new(merged.weights));
    chain.before = Some((old, std::mem::replace(&mut chain.state, state)));
    Ok((record, hash, envelope))
}

/// Moves the chain on over a record whose merge is not recomputed (a secure-aggregation
/// round, or one adopted on its certificate): the model and state are fetched by the
/// hashes the record names.
async fn adopt_unrecomputed(
    chain: &mut Chain,
    ctx: &Ctx<'_>,
    record: MergeRecord,
    hash: RecordHash,
    envelope: Vec<u8>,
) -> Result<Confirmed, CatchUpError> {
    chain.check.confirm(record.model, record.state)?;
    let state = fetch_state(ctx, record.state).await?;
    let model = fetch_model(ctx, record.model).await?;
    chain.merger.load_state(&state, ctx.layout)?;
    let old = std::mem::replace(&mut chain.base, Arc::new(model));
    chain.before = Some((old, std::mem::replace(&mut chain.state, state)));
    chain
        .merged
        .extend(record.contributions.iter().map(|c| c.delta));
    Ok((record, hash, envelope))
}

/// Whether the members' attestations, asked of the peer and of everyone connected,
/// certify `record`'s model and state as its round's outcome (`cellswarm_round::cert`).
async fn certificate(ctx: &Ctx<'_>, record: &MergeRecord) -> bool {
    let mut atts = Vec::new();
    for p in sources(ctx, None) {
        let Ok(resp) = ctx
            .net
            .request(p, Request::Attestations(record.round))
            .await
        else {
            continue;
        };
        let ResponseHeader::Attestations(envs) = resp.header else {
            continue;
        };
        atts.extend(
            envs.into_iter()
                .take(ctx.member_set.len())
                .filter_map(|e| verify::attestation(e, ctx.members)),
        );
        if cellswarm_round::certified(
            record.round,
            record.model,
            record.state,
            &atts,
            ctx.member_set,
            ctx.threshold,
        ) {
            return true;
        }
    }
    false
}

/// Peers to ask for something `signer` made: the signer, the peer we catch up from,
/// then everyone connected.
fn sources(ctx: &Ctx<'_>, signer: Option<SignerKey>) -> Vec<PeerId> {
    let mut v = Vec::new();
    if let Some(p) = signer.and_then(|s| ctx.holders.get(&s))
        && ctx.connected.contains(p)
    {
        v.push(*p);
    }
    for p in std::iter::once(ctx.peer).chain(ctx.connected.iter().copied()) {
        if !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

/// Fetches and checks every delta a record names, all at once.
async fn fetch_all(
    ctx: &Ctx<'_>,
    record: &MergeRecord,
    masked: bool,
) -> Vec<Result<Checked, CatchUpError>> {
    futures::future::join_all(
        record
            .contributions
            .iter()
            .map(|c| fetch_checked(ctx, record, c.signer, c.delta, c.sample_count, masked)),
    )
    .await
}

/// Fetches and checks one delta a record names: signed by its contributor, for the
/// record's round and base, with the sample count the record gives it.
async fn fetch_checked(
    ctx: &Ctx<'_>,
    record: &MergeRecord,
    signer: SignerKey,
    delta: DeltaHash,
    samples: u64,
    masked: bool,
) -> Result<Checked, CatchUpError> {
    let none = HashSet::new();
    let check = DeltaCheck {
        members: ctx.members,
        consortium: ctx.digest,
        round: record.round,
        base: record.base,
        layout: ctx.layout,
        limits: ctx.limits,
        max_norm: ctx.aggregation.max_update_norm,
        // Replays were refused by the chain's rules before any delta was fetched.
        merged: &none,
        secure_aggregation: masked,
    };
    let mut last = "no peer served it".to_owned();
    for p in sources(ctx, Some(signer)) {
        let Ok(resp) = ctx.net.request(p, Request::Delta(delta)).await else {
            continue;
        };
        if resp.header != ResponseHeader::Delta {
            continue;
        }
        match check.check(delta, resp.body.into()) {
            Ok((s, Checked::Plain(u))) if s == signer && u.sample_count == samples => {
                return Ok(Checked::Plain(u));
            }
            Ok((s, m @ Checked::Masked { samples: n, .. })) if s == signer && n == samples => {
                return Ok(m);
            }
            Ok(_) => {
                last = format!("not {}'s with {samples} samples", signer.short());
            }
            Err((_, e)) => last = e,
        }
    }
    Err(CatchUpError::Delta {
        round: record.round,
        delta,
        why: last,
    })
}

/// A model from our store, else from the peers.
async fn stored_model(ctx: &Ctx<'_>, hash: ModelHash) -> Result<Weights, CatchUpError> {
    let (store, layout, limits) = (
        Arc::clone(ctx.store),
        Arc::clone(ctx.layout),
        ctx.limits.layout,
    );
    let stored =
        tokio::task::spawn_blocking(move || read_model(&*store, &layout, limits, &hash)).await;
    match stored {
        Ok(Ok(Some(w))) => Ok(w),
        _ => fetch_model(ctx, hash).await,
    }
}

/// Aggregator state bytes from our store, else from the peers.
async fn stored_state(ctx: &Ctx<'_>, hash: [u8; 32]) -> Result<Vec<u8>, CatchUpError> {
    let store = Arc::clone(ctx.store);
    let stored = tokio::task::spawn_blocking(move || store.blob(BlobKind::State, &hash)).await;
    match stored {
        Ok(Ok(Some(b))) => Ok(b),
        _ => fetch_state(ctx, hash).await,
    }
}

async fn fetch_model(ctx: &Ctx<'_>, hash: ModelHash) -> Result<Weights, CatchUpError> {
    let limits = ctx.limits.layout;
    for p in sources(ctx, None) {
        if let Ok(r) = ctx.net.request(p, Request::Model(hash)).await
            && r.header == ResponseHeader::Model
            && ModelHash::of(&r.body) == hash
            && let Ok(w) = Weights::from_bytes(&r.body, &limits)
            && ctx.layout.ensure_same(w.layout()).is_ok()
        {
            return Ok(Weights::from_flat(Arc::clone(ctx.layout), w.into_values())?);
        }
    }
    Err(CatchUpError::Model(hash))
}

async fn fetch_state(ctx: &Ctx<'_>, hash: [u8; 32]) -> Result<Vec<u8>, CatchUpError> {
    for p in sources(ctx, None) {
        if let Ok(r) = ctx.net.request(p, Request::State(hash)).await
            && r.header == ResponseHeader::State
            && sha(&r.body) == hash
        {
            return Ok(r.body.into());
        }
    }
    Err(CatchUpError::State)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catch_up_fetches_a_bounded_number_of_records() {
        assert_eq!(sync_rounds(1, 5, 1024), 1..=5);
        assert_eq!(sync_rounds(7, 7, 1024), 7..=7);
        // A member claiming a round without end is followed a step at a time.
        let far = sync_rounds(10, u64::MAX, MAX_SYNC_RECORDS);
        assert_eq!(*far.start(), 10);
        assert_eq!(*far.end(), 10 + MAX_SYNC_RECORDS as u64 - 1);
        assert_eq!(*sync_rounds(u64::MAX - 1, u64::MAX, 8).end(), u64::MAX);
    }
}
