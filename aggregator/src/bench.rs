//! Measurement helpers shared by `benches/merge.rs` and `cellswarm bench merge`: random
//! inputs, the merge, a plain parallel copy of the same bytes, and a naive merge, all
//! timed in the same process with the same rayon thread pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellswarm_common::delta::Delta;
use cellswarm_common::ids::{DeltaHash, ModelHash, RoundId, SignerKey};
use cellswarm_common::weights::{Layout, Weights};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::AggregateError;
use crate::kernels::CHUNK;
use crate::merger::Merger;
use crate::update::Update;

/// A base model and `k` updates of `p` random parameters.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The base model.
    pub base: Weights,
    /// Its hash.
    pub base_hash: ModelHash,
    /// The updates.
    pub updates: Vec<Update>,
}

/// Uniform values in [-scale, scale), reproducible from `seed`, generated in parallel.
#[must_use]
pub fn random_values(p: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut v = vec![0f32; p];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_word_pos((c * CHUNK) as u128);
        for x in chunk {
            *x = ((rng.next_u32() >> 8) as f32 / 16_777_216.0 * 2.0 - 1.0) * scale;
        }
    });
    v
}

/// A layout of `p` parameters split over 16 tensors (like a small network's layers).
///
/// # Panics
/// Never for `p` below 2^32 (the names are distinct, the shapes non-zero).
#[must_use]
pub fn layout(p: usize) -> Arc<Layout> {
    let parts = 16.min(p.max(1));
    let specs = (0..parts).map(|i| {
        let len = p / parts + usize::from(i < p % parts);
        (format!("layer{i:02}.weight"), vec![len.max(1)])
    });
    Arc::new(Layout::new(specs).expect("distinct names and non-zero shapes"))
}

/// Random base and updates (values about 1e-2, sample counts 100, 200, ...).
///
/// # Panics
/// Never: the values generated are finite and fit the layout.
#[must_use]
pub fn random_inputs(k: usize, p: usize, seed: u64) -> Inputs {
    let layout = layout(p);
    let base = Weights::from_flat(Arc::clone(&layout), random_values(p, seed, 0.1))
        .expect("finite values of the layout's length");
    let base_hash = base.hash();
    let updates = (0..k)
        .map(|i| {
            let values = random_values(p, seed + 1 + i as u64, 0.01);
            let delta = Delta::from_flat(Arc::clone(&layout), values).expect("finite values");
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Update::new(
                SignerKey(key),
                DeltaHash::of(&key),
                base_hash,
                100 * (i as u64 + 1),
                delta,
            )
        })
        .collect();
    Inputs {
        base,
        base_hash,
        updates,
    }
}

/// Median of `reps` timings of `f` (after one warm-up call).
pub fn median_time(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Copies every update's values into `dst` (same shapes), in parallel chunks.
pub fn parallel_copy(src: &[&[f32]], dst: &mut [Vec<f32>]) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        d.par_chunks_mut(CHUNK)
            .zip(s.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// The textbook FedAvg: allocate a weighted copy of every update, then sum the copies
/// (parallel, like the merge, so the comparison is about memory traffic, not threads).
#[must_use]
pub fn naive_fedavg(inputs: &Inputs) -> Vec<f32> {
    let total: f64 = inputs.updates.iter().map(|u| u.sample_count as f64).sum();
    let weighted: Vec<Vec<f32>> = inputs
        .updates
        .iter()
        .map(|u| {
            let w = (u.sample_count as f64 / total) as f32;
            u.values().par_iter().map(|&x| w * x).collect()
        })
        .collect();
    let mut acc = inputs.base.values().to_vec();
    for w in &weighted {
        acc.par_iter_mut()
            .zip(w.par_iter())
            .for_each(|(a, &x)| *a += x);
    }
    acc
}

/// Results of one measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Updates.
    pub k: usize,
    /// Parameters.
    pub p: usize,
    /// Rayon threads.
    pub threads: usize,
    /// Median merge time.
    pub merge: Duration,
    /// Median copy time (K x P x 4 bytes).
    pub copy: Duration,
    /// Median naive FedAvg time, when measured.
    pub naive: Option<Duration>,
}

impl Report {
    /// Input bytes (K x P x 4).
    #[must_use]
    pub fn input_bytes(&self) -> f64 {
        (self.k * self.p * 4) as f64
    }
    /// Input bytes read per second by the merge, in GB/s.
    #[must_use]
    pub fn merge_gbps(&self) -> f64 {
        self.input_bytes() / self.merge.as_secs_f64() / 1e9
    }
    /// Bytes read per second by the copy, in GB/s.
    #[must_use]
    pub fn copy_gbps(&self) -> f64 {
        self.input_bytes() / self.copy.as_secs_f64() / 1e9
    }
    /// The merge's memory traffic (K inputs read + 1 output written) per second over the
    /// copy's (bytes read + bytes written): `(X (K+1)/K) / (2 Y)`.
    #[must_use]
    pub fn traffic_ratio(&self) -> f64 {
        self.merge_gbps() * (self.k as f64 + 1.0) / self.k as f64 / (2.0 * self.copy_gbps())
    }
    /// How many times faster than the naive version.
    #[must_use]
    pub fn speedup_over_naive(&self) -> Option<f64> {
        self.naive
            .map(|n| n.as_secs_f64() / self.merge.as_secs_f64())
    }
}

/// One round as a node runs it: merge into a recycled output buffer, then commit the
/// new state (so an adaptive optimiser recycles its moment buffers).
///
/// # Errors
/// Whatever the merge refuses.
pub fn merge_and_commit(
    merger: &mut Merger,
    inputs: &Inputs,
    out: &mut Vec<f32>,
) -> Result<(), AggregateError> {
    let outcome = merger.merge_into(
        &inputs.base,
        inputs.base_hash,
        &inputs.updates,
        RoundId(1),
        out,
    )?;
    merger.commit(outcome.next_state);
    Ok(())
}

/// Measures `merger` on `inputs` against a copy of the same bytes (and the naive
/// FedAvg when `with_naive`), `reps` repetitions each. Each timed merge is
/// [`merge_and_commit`], the steady state of a node.
///
/// # Errors
/// Whatever the merge refuses.
pub fn measure(
    merger: &mut Merger,
    inputs: &Inputs,
    reps: usize,
    with_naive: bool,
) -> Result<Report, AggregateError> {
    let k = inputs.updates.len();
    let p = inputs.base.values().len();
    let mut out = Vec::with_capacity(p);
    merge_and_commit(merger, inputs, &mut out)?;
    let src: Vec<&[f32]> = inputs.updates.iter().map(Update::values).collect();
    let mut dst: Vec<Vec<f32>> = (0..k).map(|_| vec![1f32; p]).collect();
    // Interleave merge and copy repetitions so that both medians see the same machine
    // state (memory bandwidth on a shared host drifts between seconds).
    let mut merge_t = Vec::with_capacity(reps);
    let mut copy_t = Vec::with_capacity(reps);
    parallel_copy(&src, &mut dst);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        merge_and_commit(merger, inputs, &mut out)?;
        merge_t.push(t.elapsed());
        let t = Instant::now();
        parallel_copy(&src, &mut dst);
        std::hint::black_box(&dst);
        copy_t.push(t.elapsed());
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (merge, copy) = (median(merge_t), median(copy_t));
    let naive = with_naive.then(|| {
        median_time(reps, || {
            std::hint::black_box(naive_fedavg(inputs));
        })
    });
    Ok(Report {
        k,
        p,
        threads: rayon::current_num_threads(),
        merge,
        copy,
        naive,
    })
}
