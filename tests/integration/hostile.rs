//! Hostile bytes: a deterministic mutation test through the node's real decode-and-verify
//! paths (the same functions the engine and the sync codec call), with every allocation
//! of the checking thread measured.
//!
//! 100,000 mutated frames by default; set `CELLSWARM_MUTATIONS` (for example to
//! 1000000) for a longer run. The seed is fixed, so a failure names the frame that
//! caused it and reproduces.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::Arc;

use cellswarm_aggregator::Merger;
use cellswarm_common::config::{AggregationConfig, StrategyKind};
use cellswarm_common::delta::{Delta, DeltaEncoding, DeltaLimits};
use cellswarm_common::envelope::{ENVELOPE_HEADER_LEN, MemberKeys, PayloadKind, seal};
use cellswarm_common::identity::Identity;
use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId};
use cellswarm_common::records::{AuditEntry, Head, PeerRecord, decode_record, encode_record};
use cellswarm_common::weights::{Layout, Limits, Weights};
use cellswarm_common::wire::{
    Announcement, Contribution, DeltaHeader, LocalMetrics, MaskMessage, MergeRecord, Request,
    ResponseHeader, decode_request_stream, decode_response_stream, encode_control, encode_frame,
};
use cellswarm_node::swarm::verify::{self, DeltaCheck};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------
// Allocation accounting for the checking thread
// ---------------------------------------------------------------------------------------

/// The system allocator, counting what the current thread allocates while tracking is on.
struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let live = LIVE.with(|l| {
                l.set(l.get() + size as i64);
                l.get()
            });
            PEAK.with(|p| p.set(p.get().max(live)));
            LARGEST.with(|m| m.set(m.get().max(size)));
        }
    });
}

fn note_free(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            LIVE.with(|l| l.set(l.get() - size as i64));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping
// touches only const-initialised thread-locals (no allocation, no re-entry).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        note_free(layout.size());
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` with allocation tracking; returns its result, the largest single allocation
/// and the peak of live bytes it caused, and the bytes still live after it.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, i64, i64) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|m| m.set(0));
    TRACK.with(|t| t.set(true));
    let out = f();
    TRACK.with(|t| t.set(false));
    let largest = LARGEST.with(Cell::get);
    let peak = PEAK.with(Cell::get);
    let live = LIVE.with(Cell::get);
    (out, largest, peak, live)
}

// ---------------------------------------------------------------------------------------
// The corpus: one valid message of every kind that arrives from peers or from disk
// ---------------------------------------------------------------------------------------

/// The configured frame limit of this test's node: no decode may allocate more.
const FRAME_LIMIT: u64 = 256 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    DeltaEnvelope,
    MaskedDelta,
    KeyShare,
    Announcement,
    RecordEnvelope,
    RequestStream,
    ResponseStream,
    Model,
    MergerState,
    StoreHead,
    StoreAudit,
    StorePeer,
}

struct World {
    member: Identity,
    members: MemberKeys,
    consortium: [u8; 32],
    base: ModelHash,
    layout: Arc<Layout>,
    limits: DeltaLimits,
    merged: HashSet<DeltaHash>,
    corpus: Vec<(Kind, Vec<u8>)>,
    /// Payloads of the signed messages, to mutate and re-sign (a malicious member).
    payloads: Vec<(PayloadKind, Vec<u8>)>,
}

fn world() -> World {
    let member = Identity::from_seed([9; 32]).expect("a seed");
    let members = MemberKeys::new([member.signer_key()]);
    let layout = Arc::new(
        Layout::new([
            ("enc.w".to_owned(), vec![8, 3, 3, 3]),
            ("enc.b".to_owned(), vec![8]),
            ("head.w".to_owned(), vec![600]),
        ])
        .expect("a layout"),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let base_w = Weights::from_flat(
        Arc::clone(&layout),
        (0..layout.total())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect(),
    )
    .expect("weights");
    let base = base_w.hash();
    let consortium = [7u8; 32];
    let limits = DeltaLimits {
        max_bytes: FRAME_LIMIT,
        layout: Limits {
            max_tensors: 64,
            max_params: layout.total() as u64,
        },
    };
    let mut corpus = Vec::new();
    let mut payloads = Vec::new();
    let delta = Delta::from_flat(
        Arc::clone(&layout),
        (0..layout.total())
            .map(|_| rng.random_range(-0.01..0.01))
            .collect(),
    )
    .expect("a delta");
    let header = DeltaHeader {
        consortium,
        round: RoundId(3),
        base,
        sample_count: 40,
        metrics: LocalMetrics {
            train_loss: 0.5,
            val_f1: Some(0.8),
            steps: 10,
            epsilon: None,
        },
        masked: false,
        mask_epoch: 0,
    };
    for enc in [
        DeltaEncoding::F32,
        DeltaEncoding::F16,
        DeltaEncoding::Int8,
        DeltaEncoding::top_k_fraction(0.1, layout.total()),
    ] {
        let payload = encode_frame(&header, &delta.encode(enc).expect("encodes")).expect("frame");
        let env = seal(&member, PayloadKind::Delta, &payload);
        corpus.push((Kind::DeltaEnvelope, env.clone()));
        let resp = encode_frame(&ResponseHeader::Delta, &env).expect("frame");
        let mut stream = (resp.len() as u64).to_le_bytes().to_vec();
        stream.extend_from_slice(&resp);
        corpus.push((Kind::ResponseStream, stream));
        payloads.push((PayloadKind::Delta, payload));
    }
    // A masked delta (secure aggregation) and the key shares and restarts of its protocol.
    let masked_header = DeltaHeader {
        masked: true,
        mask_epoch: 2,
        ..header
    };
    let words: Vec<u8> = (0..layout.total() as u32)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    let payload = encode_frame(&masked_header, &words).expect("frame");
    corpus.push((
        Kind::MaskedDelta,
        seal(&member, PayloadKind::Delta, &payload),
    ));
    payloads.push((PayloadKind::Delta, payload));
    for m in [
        MaskMessage::Keys {
            consortium,
            round: RoundId(3),
            epoch: 0,
            keys: vec![(member.signer_key(), [9; 32]); 4],
        },
        MaskMessage::Restart {
            consortium,
            round: RoundId(3),
            epoch: 1,
            participants: vec![member.signer_key(); 3],
        },
        MaskMessage::Seal {
            consortium,
            round: RoundId(3),
            epoch: 1,
            deltas: vec![(member.signer_key(), DeltaHash([5; 32])); 3],
        },
        MaskMessage::Reveal {
            consortium,
            round: RoundId(3),
            epoch: 1,
            seed: [6; 32],
            shares: vec![(member.signer_key(), [8; 32]); 3],
        },
        MaskMessage::Shares {
            consortium,
            round: RoundId(3),
            epoch: 1,
            commitment: [4; 32],
            boxes: vec![(member.signer_key(), [3; 32], [2; 16]); 3],
        },
    ] {
        let payload = encode_control(&m).expect("encodes");
        corpus.push((
            Kind::KeyShare,
            seal(&member, PayloadKind::KeyShare, &payload),
        ));
        payloads.push((PayloadKind::KeyShare, payload));
    }
    for a in [
        Announcement::DeltaReady {
            round: RoundId(3),
            base,
            delta: DeltaHash([1; 32]),
            bytes: 12345,
        },
        Announcement::MergeReady {
            round: RoundId(3),
            record: RecordHash([2; 32]),
            model: base,
        },
        Announcement::Heartbeat {
            round: RoundId(4),
            model: base,
        },
    ] {
        let payload = encode_control(&a).expect("encodes");
        corpus.push((
            Kind::Announcement,
            seal(&member, PayloadKind::Announcement, &payload),
        ));
        payloads.push((PayloadKind::Announcement, payload));
    }
    let record = MergeRecord {
        consortium,
        round: RoundId(3),
        base,
        prev: Some(RecordHash([3; 32])),
        strategy: "fedavg".into(),
        contributions: (0..5)
            .map(|i| Contribution {
                signer: member.signer_key(),
                delta: DeltaHash([i; 32]),
                sample_count: 10 + u64::from(i),
            })
            .collect(),
        model: base,
        state: [4; 32],
        attempt: 1,
    };
    let payload = encode_control(&record).expect("encodes");
    let env = seal(&member, PayloadKind::MergeRecord, &payload);
    corpus.push((Kind::RecordEnvelope, env.clone()));
    payloads.push((PayloadKind::MergeRecord, payload));
    let resp = encode_frame(&ResponseHeader::Record, &env).expect("frame");
    let mut stream = (resp.len() as u64).to_le_bytes().to_vec();
    stream.extend_from_slice(&resp);
    corpus.push((Kind::ResponseStream, stream));
    for req in [
        Request::Delta(DeltaHash([5; 32])),
        Request::Model(base),
        Request::Record(RoundId(9)),
        Request::Latest,
        Request::State([6; 32]),
        Request::Deltas(RoundId(2)),
    ] {
        let body = encode_control(&req).expect("encodes");
        let mut stream = (body.len() as u32).to_le_bytes().to_vec();
        stream.extend_from_slice(&body);
        corpus.push((Kind::RequestStream, stream));
    }
    let list = ResponseHeader::DeltaList(vec![(member.signer_key(), DeltaHash([8; 32])); 3]);
    let resp = encode_frame(&list, &[]).expect("frame");
    let mut stream = (resp.len() as u64).to_le_bytes().to_vec();
    stream.extend_from_slice(&resp);
    corpus.push((Kind::ResponseStream, stream));
    corpus.push((Kind::Model, base_w.to_bytes()));
    for strategy in [StrategyKind::FedAvg, StrategyKind::FedAdam] {
        let merger = Merger::from_config(&AggregationConfig {
            strategy,
            ..AggregationConfig::default()
        })
        .expect("a merger");
        corpus.push((Kind::MergerState, merger.save_state(&layout)));
    }
    corpus.push((
        Kind::StoreHead,
        encode_record(&Head {
            round: RoundId(3),
            record: Some(RecordHash([1; 32])),
            model: base,
            state: [2; 32],
        }),
    ));
    corpus.push((
        Kind::StoreAudit,
        encode_record(&AuditEntry {
            round: RoundId(3),
            signer: member.signer_key(),
            delta: DeltaHash([3; 32]),
            sample_count: 99,
        }),
    ));
    let peer = PeerRecord(vec![
        "/ip4/127.0.0.1/tcp/7070".into(),
        "local-dp:z=0.5".into(),
    ]);
    corpus.push((Kind::StorePeer, encode_record(&peer)));
    World {
        member,
        members,
        consortium,
        base,
        layout,
        limits,
        merged: HashSet::from([DeltaHash([1; 32])]),
        corpus,
        payloads,
    }
}

// ---------------------------------------------------------------------------------------
// The mutator
// ---------------------------------------------------------------------------------------

const INTERESTING_U32: [u32; 8] = [0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0x8000_0000, u32::MAX];
const INTERESTING_U64: [u64; 5] = [0, 1, 1 << 31, 1 << 60, u64::MAX];

/// One to four random edits: bit flips, random or interesting values (at any offset, as
/// u8/u32/u64 little-endian), insertions, deletions, duplications, truncation, splices.
fn mutate(rng: &mut ChaCha8Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = b.len();
        let at = if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..9) {
            0 if len > 0 => b[at] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => b[at] = rng.random(),
            2 if len >= 4 => {
                let at = at.min(len - 4);
                let v = INTERESTING_U32[rng.random_range(0..INTERESTING_U32.len())];
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 if len >= 8 => {
                let at = at.min(len - 8);
                let v = INTERESTING_U64[rng.random_range(0..INTERESTING_U64.len())];
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            4 => {
                let n = rng.random_range(1..=16);
                let ins: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.splice(at..at, ins);
            }
            5 if len > 0 => {
                let n = rng.random_range(1..=(len - at).min(64));
                b.drain(at..at + n);
            }
            6 if len > 0 => {
                let n = rng.random_range(1..=(len - at).min(64));
                let chunk = b[at..at + n].to_vec();
                b.splice(at..at, chunk);
            }
            7 => b.truncate(at),
            _ if !other.is_empty() => {
                let cut = rng.random_range(0..other.len());
                b.truncate(at);
                b.extend_from_slice(&other[cut..]);
            }
            _ => {}
        }
    }
    b
}

// ---------------------------------------------------------------------------------------
// The real paths
// ---------------------------------------------------------------------------------------

/// Pushes `bytes` of `kind` through the path the node uses for it; returns whether they
/// were accepted.
fn check(w: &World, kind: Kind, bytes: Vec<u8>, announced: DeltaHash) -> bool {
    let delta_check = DeltaCheck {
        members: &w.members,
        consortium: w.consortium,
        round: RoundId(3),
        base: w.base,
        layout: &w.layout,
        limits: &w.limits,
        max_norm: 1e6,
        merged: &w.merged,
        secure_aggregation: false,
    };
    let masked_check = DeltaCheck {
        secure_aggregation: true,
        ..delta_check
    };
    match kind {
        Kind::DeltaEnvelope => delta_check.check(announced, bytes).is_ok(),
        Kind::MaskedDelta => masked_check.check(announced, bytes).is_ok(),
        Kind::Announcement => matches!(
            verify::gossip(bytes, 16 << 10, &w.members, w.consortium),
            Ok((_, verify::Gossip::Announcement(_)))
        ),
        Kind::KeyShare => verify::gossip(bytes, 16 << 10, &w.members, w.consortium).is_ok(),
        Kind::RecordEnvelope => verify::record(bytes, &w.members, w.consortium).is_ok(),
        Kind::RequestStream => decode_request_stream(&bytes).is_ok(),
        Kind::ResponseStream => match decode_response_stream(&bytes, FRAME_LIMIT) {
            Ok((ResponseHeader::Delta, body)) => {
                // The requester asked for the hash the body claims (or it is refused
                // at once as a mismatch, which the other frames cover).
                delta_check.check(payload_hash(body), body.to_vec()).is_ok()
            }
            Ok((ResponseHeader::Record, body)) => {
                verify::record(body.to_vec(), &w.members, w.consortium).is_ok()
            }
            Ok((ResponseHeader::Model, body)) => {
                Weights::from_bytes(body, &w.limits.layout).is_ok()
            }
            Ok(_) => true,
            Err(_) => false,
        },
        Kind::Model => Weights::from_bytes(&bytes, &w.limits.layout).is_ok(),
        Kind::MergerState => [StrategyKind::FedAvg, StrategyKind::FedAdam]
            .into_iter()
            .any(|strategy| {
                let mut m = Merger::from_config(&AggregationConfig {
                    strategy,
                    ..AggregationConfig::default()
                })
                .expect("a merger");
                m.load_state(&bytes, &w.layout).is_ok()
            }),
        Kind::StoreHead => decode_record::<Head>(&bytes).is_ok(),
        Kind::StoreAudit => decode_record::<AuditEntry>(&bytes).is_ok(),
        Kind::StorePeer => decode_record::<PeerRecord>(&bytes).is_ok(),
    }
}

/// The payload hash a delta envelope announces (as its sender's DeltaReady would).
fn payload_hash(envelope: &[u8]) -> DeltaHash {
    envelope
        .get(ENVELOPE_HEADER_LEN..)
        .map_or(DeltaHash([0; 32]), |p| {
            DeltaHash(*ModelHash::of(p).as_bytes())
        })
}

#[test]
fn mutated_frames_through_every_decoder_never_panic_nor_overallocate() {
    let frames: u64 = std::env::var("CELLSWARM_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let w = world();
    // The unmutated corpus is accepted: the paths are real, not trivially refusing.
    for (i, (kind, bytes)) in w.corpus.iter().enumerate() {
        let announced = payload_hash(bytes);
        assert!(
            check(&w, *kind, bytes.clone(), announced),
            "corpus item {i} ({kind:?}) was refused"
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let mut accepted = 0u64;
    let mut resigned = 0u64;
    let mut worst_one = 0usize;
    let mut worst_peak = 0i64;
    for n in 0..frames {
        // Two thirds: any bytes from the network or disk. One third: a malicious member
        // mutates a payload and signs it, so the decoders behind the signature run.
        let (kind, bytes, announced) = if n % 3 == 2 {
            let (pk, payload) = &w.payloads[rng.random_range(0..w.payloads.len())];
            let other = &w.payloads[rng.random_range(0..w.payloads.len())].1;
            let m = mutate(&mut rng, payload, other);
            let env = seal(&w.member, *pk, &m);
            let announced = DeltaHash(*ModelHash::of(&m).as_bytes());
            let kind = match pk {
                PayloadKind::Delta if n % 2 == 0 => Kind::DeltaEnvelope,
                PayloadKind::Delta => Kind::MaskedDelta,
                PayloadKind::Announcement => Kind::Announcement,
                PayloadKind::KeyShare => Kind::KeyShare,
                _ => Kind::RecordEnvelope,
            };
            resigned += 1;
            (kind, env, announced)
        } else {
            let (kind, input) = &w.corpus[rng.random_range(0..w.corpus.len())];
            let other = &w.corpus[rng.random_range(0..w.corpus.len())].1;
            let m = mutate(&mut rng, input, other);
            let announced = if rng.random_bool(0.5) {
                payload_hash(&m)
            } else {
                payload_hash(input)
            };
            (*kind, m, announced)
        };
        let input_len = bytes.len();
        let keep = bytes.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            measured(|| check(&w, kind, bytes, announced))
        }));
        let Ok((ok, largest, peak, live)) = result else {
            panic!(
                "frame {n} ({kind:?}, {input_len} bytes) panicked; input: {}",
                hex::encode(&keep)
            );
        };
        accepted += u64::from(ok);
        // The input itself is moved in, so it does not count; no decode may allocate
        // more than the frame limit at once, or hold more than twice it, or leak.
        assert!(
            largest as u64 <= FRAME_LIMIT,
            "frame {n} ({kind:?}): one allocation of {largest} bytes; input {}",
            hex::encode(&keep)
        );
        assert!(
            peak as u64 <= 2 * FRAME_LIMIT,
            "frame {n} ({kind:?}): {peak} bytes live at once"
        );
        assert!(live <= 0, "frame {n} ({kind:?}): {live} bytes leaked");
        worst_one = worst_one.max(largest);
        worst_peak = worst_peak.max(peak);
    }
    eprintln!(
        "{frames} mutated frames ({resigned} re-signed by a member): {accepted} accepted, \
         largest allocation {worst_one} B, peak {worst_peak} B (limit {FRAME_LIMIT} B)"
    );
    // The mutations reach past the outer checks: some mutated frames still decode.
    assert!(accepted > 0, "no mutated frame was ever accepted");
}
