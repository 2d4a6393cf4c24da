//! Chunk kernels. Every merge walks the parameter vector in fixed chunks of [`CHUNK`]
//! values; rayon spreads the chunks over threads, and every value's result depends only
//! on its own chunk, computed in one fixed order. So the output bytes do not depend on
//! the number of threads, and each input byte is read from memory once.

use rayon::prelude::*;

/// Values per chunk: 128 KiB of f32, so a chunk of the output stays in L2 while the K
/// inputs stream past it. Part of the determinism contract: Krum's distances are summed
/// per chunk, so changing it changes Krum's bits (and needs a protocol version bump).
pub const CHUNK: usize = 32768;

/// `out = sum_j coeffs[j] * inputs[j]` (then `add[i] + out[i]` when `add` is given),
/// accumulated in f32 in index order of `j`: `((c0*x0 + c1*x1) + c2*x2) + ...`.
/// Returns whether every value written is finite.
///
/// Multiplications and additions are separate IEEE operations (Rust never fuses them),
/// so the result is the same on every machine. Inputs are folded in up to eight at a
/// time per pass over `out` (register blocking), with `add` and the finiteness check
/// folded into the last pass: the same additions in the same order as one pass per
/// input, with far fewer loads and stores of `out` and fewer concurrent memory streams.
pub fn linear_combine(
    inputs: &[&[f32]],
    coeffs: &[f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) -> bool {
    debug_assert_eq!(inputs.len(), coeffs.len());
    let n = out.len();
    if inputs.is_empty() {
        match add {
            Some(a) => out.copy_from_slice(&a[..n]),
            None => out.fill(0.0),
        }
        return all_finite(out);
    }
    let groups = inputs.len().div_ceil(FOLD);
    let mut finite = true;
    for (g, (xs, cs)) in inputs.chunks(FOLD).zip(coeffs.chunks(FOLD)).enumerate() {
        let pass = Pass {
            init: g == 0,
            last: g + 1 == groups,
            add: add.map(|a| &a[..n]),
        };
        finite = match xs.len() {
            1 => fold::<1>(out, xs, cs, &pass),
            2 => fold::<2>(out, xs, cs, &pass),
            3 => fold::<3>(out, xs, cs, &pass),
            4 => fold::<4>(out, xs, cs, &pass),
            5 => fold::<5>(out, xs, cs, &pass),
            6 => fold::<6>(out, xs, cs, &pass),
            7 => fold::<7>(out, xs, cs, &pass),
            _ => fold::<FOLD>(out, xs, cs, &pass),
        };
    }
    finite
}

/// Inputs folded per pass over the output.
const FOLD: usize = 8;

/// IEEE 754 binary32 exponent bits: all set means infinity or NaN.
const EXP_MASK: u32 = 0x7f80_0000;

struct Pass<'a> {
    init: bool,
    last: bool,
    add: Option<&'a [f32]>,
}

/// One pass over `out` folding in `N` inputs. Only the last pass adds `add` and checks
/// finiteness (tracking the largest exponent seen, which vectorises, unlike an early exit).
#[inline]
fn fold<const N: usize>(out: &mut [f32], xs: &[&[f32]], cs: &[f32], pass: &Pass<'_>) -> bool {
    let n = out.len();
    let x: [&[f32]; N] = std::array::from_fn(|j| &xs[j][..n]);
    let c: [f32; N] = std::array::from_fn(|j| cs[j]);
    let sum = |i: usize, start: f32| {
        let mut s = start;
        for j in 1..N {
            s += c[j] * x[j][i];
        }
        s
    };
    if !pass.last {
        if pass.init {
            (0..n).for_each(|i| out[i] = sum(i, c[0] * x[0][i]));
        } else {
            (0..n).for_each(|i| out[i] = sum(i, out[i] + c[0] * x[0][i]));
        }
        return true;
    }
    let mut exp = 0u32;
    match (pass.init, pass.add) {
        (true, None) => (0..n).for_each(|i| {
            let v = sum(i, c[0] * x[0][i]);
            exp = exp.max(v.to_bits() & EXP_MASK);
            out[i] = v;
        }),
        (false, None) => (0..n).for_each(|i| {
            let v = sum(i, out[i] + c[0] * x[0][i]);
            exp = exp.max(v.to_bits() & EXP_MASK);
            out[i] = v;
        }),
        (true, Some(a)) => (0..n).for_each(|i| {
            let v = a[i] + sum(i, c[0] * x[0][i]);
            exp = exp.max(v.to_bits() & EXP_MASK);
            out[i] = v;
        }),
        (false, Some(a)) => (0..n).for_each(|i| {
            let v = a[i] + sum(i, out[i] + c[0] * x[0][i]);
            exp = exp.max(v.to_bits() & EXP_MASK);
            out[i] = v;
        }),
    }
    exp != EXP_MASK
}

/// Whether every value is finite (vectorised: no early exit).
#[must_use]
pub fn all_finite(values: &[f32]) -> bool {
    values
        .iter()
        .fold(0u32, |m, v| m.max(v.to_bits() & EXP_MASK))
        != EXP_MASK
}

/// `out = onto + out` when `onto` is given (IEEE addition is commutative, so this equals
/// the fused form of [`linear_combine`]).
pub fn add_onto(onto: Option<&[f32]>, out: &mut [f32]) {
    if let Some(b) = onto {
        for (o, &x) in out.iter_mut().zip(b) {
            *o += x;
        }
    }
}

/// Maps an f32 to an i32 whose integer order is the IEEE total order of the floats
/// (the order of [`f32::total_cmp`]): negative values have their magnitude bits flipped.
#[inline]
fn sort_key(x: f32) -> i32 {
    let b = x.to_bits().cast_signed();
    b ^ (((b >> 31).cast_unsigned()) >> 1).cast_signed()
}

/// The inverse of [`sort_key`].
#[inline]
fn from_key(k: i32) -> f32 {
    f32::from_bits((k ^ (((k >> 31).cast_unsigned()) >> 1).cast_signed()).cast_unsigned())
}

/// Comparators of Batcher's odd-even merge sort for `n` elements: the network for the
/// next power of two, without the comparators that touch padding (padding acts as +inf
/// at the end, which no comparator would move).
#[must_use]
pub fn sorting_network(n: usize) -> Vec<(usize, usize)> {
    let size = n.next_power_of_two();
    let mut pairs = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < size {
                for i in 0..k.min(size - j - k) {
                    let (a, b) = (i + j, i + j + k);
                    if a / (2 * p) == b / (2 * p) && b < n {
                        pairs.push((a, b));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    pairs
}

/// Values sorted per coordinate in blocks this long (K blocks of i32 stay in L1).
const SORT_BLOCK: usize = 1024;

/// Sorts `scales[j] * inputs[j][i]` over `j` for every coordinate `i`, many coordinates
/// at a time: the values become integer keys, and a sorting network runs as element-wise
/// min/max over whole blocks (which vectorises). Calls `reduce(start, sorted)` per block,
/// where `sorted[j][i]` is the `j`-th smallest key of coordinate `start + i`.
fn sort_coordinates(
    inputs: &[&[f32]],
    scales: &[f32],
    out: &mut [f32],
    mut reduce: impl FnMut(&[Vec<i32>], &mut [f32]),
) {
    let k = inputs.len();
    let network = sorting_network(k);
    let mut keys: Vec<Vec<i32>> = vec![vec![0; SORT_BLOCK]; k];
    for (b, o) in out.chunks_mut(SORT_BLOCK).enumerate() {
        let start = b * SORT_BLOCK;
        let len = o.len();
        for ((kv, x), &s) in keys.iter_mut().zip(inputs).zip(scales) {
            kv.truncate(len);
            kv.resize(len, 0);
            for (kk, &v) in kv.iter_mut().zip(&x[start..start + len]) {
                *kk = sort_key(s * v);
            }
        }
        for &(a, c) in &network {
            let (lo, hi) = keys.split_at_mut(c);
            let (x, y) = (&mut lo[a], &mut hi[0]);
            for (p, q) in x.iter_mut().zip(y.iter_mut()) {
                let (mn, mx) = ((*p).min(*q), (*p).max(*q));
                *p = mn;
                *q = mx;
            }
        }
        reduce(&keys, o);
    }
}

/// Coordinate-wise median; for an even count, `0.5 * a + 0.5 * b` of the two middle
/// values (in IEEE total order).
pub fn median_chunk(inputs: &[&[f32]], scales: &[f32], out: &mut [f32]) {
    let n = inputs.len();
    sort_coordinates(inputs, scales, out, |sorted, o| {
        if n % 2 == 1 {
            for (v, &k) in o.iter_mut().zip(&sorted[n / 2]) {
                *v = from_key(k);
            }
        } else {
            for ((v, &a), &b) in o.iter_mut().zip(&sorted[n / 2 - 1]).zip(&sorted[n / 2]) {
                *v = 0.5 * from_key(a) + 0.5 * from_key(b);
            }
        }
    });
}

/// Coordinate-wise trimmed mean: drop `trim` values at each end, average the rest
/// (summed in f64 in ascending order).
pub fn trimmed_mean_chunk(inputs: &[&[f32]], scales: &[f32], trim: usize, out: &mut [f32]) {
    let n = inputs.len();
    let kept = (n - 2 * trim) as f64;
    sort_coordinates(inputs, scales, out, |sorted, o| {
        let mut acc = vec![0f64; o.len()];
        for row in &sorted[trim..n - trim] {
            for (a, &k) in acc.iter_mut().zip(row) {
                *a += f64::from(from_key(k));
            }
        }
        for (v, a) in o.iter_mut().zip(&acc) {
            *v = (a / kept) as f32;
        }
    });
}

/// Squared distance between `sa * a` and `sb * b` over one chunk: f32 differences, summed
/// in 8 f32 lanes (value `i` in lane `i mod 8`), lanes added in order in f64.
fn sq_dist(a: &[f32], sa: f32, b: &[f32], sb: f32) -> f64 {
    let mut lanes = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            let d = sa * x[j] - sb * y[j];
            lanes[j] += d * d;
        }
    }
    for (j, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        let d = sa * x - sb * y;
        lanes[j] += d * d;
    }
    lanes.iter().fold(0f64, |acc, &l| acc + f64::from(l))
}

/// All pairwise squared distances between the scaled inputs, as a dense `n x n` matrix.
///
/// Each chunk's partial matrix is computed independently (in parallel) and the partials
/// are added in chunk order, so the result is the same for any number of threads.
#[must_use]
pub fn pairwise_sq_distances(inputs: &[&[f32]], scales: &[f32]) -> Vec<f64> {
    let n = inputs.len();
    let p = inputs.first().map_or(0, |x| x.len());
    let chunks = p.div_ceil(CHUNK);
    let partials: Vec<Vec<f64>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let r = c * CHUNK..((c + 1) * CHUNK).min(p);
            let mut m = vec![0f64; n * n];
            for a in 0..n {
                for b in a + 1..n {
                    m[a * n + b] = sq_dist(
                        &inputs[a][r.clone()],
                        scales[a],
                        &inputs[b][r.clone()],
                        scales[b],
                    );
                }
            }
            m
        })
        .collect();
    let mut total = vec![0f64; n * n];
    for part in &partials {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    for a in 0..n {
        for b in a + 1..n {
            total[b * n + a] = total[a * n + b];
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_combine_weights_each_input() {
        let (a, b) = ([1.0f32, 2.0, 3.0], [10.0f32, 20.0, 30.0]);
        let mut out = [0f32; 3];
        assert!(linear_combine(&[&a, &b], &[0.5, 0.25], None, &mut out));
        assert_eq!(out, [3.0, 6.0, 9.0]);
        let huge = [f32::MAX, 1.0, 1.0];
        assert!(
            !linear_combine(&[&huge, &huge], &[1.0, 1.0], None, &mut out),
            "overflow is reported"
        );
        assert!(all_finite(&[1.0, -0.0, f32::MAX]));
        assert!(!all_finite(&[1.0, f32::NAN]));
        assert!(!all_finite(&[f32::NEG_INFINITY]));
    }

    #[test]
    fn blocked_combination_equals_one_pass_per_input() {
        for k in 1..=11 {
            let inputs: Vec<Vec<f32>> = (0..k)
                .map(|j| {
                    (0..37)
                        .map(|i| ((i * 7 + j * 13) % 17) as f32 * 0.37 - 2.9)
                        .collect()
                })
                .collect();
            let coeffs: Vec<f32> = (0..k).map(|j| 0.1 + j as f32 * 0.013).collect();
            let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let mut blocked = vec![0f32; 37];
            assert!(linear_combine(&refs, &coeffs, None, &mut blocked));
            let base: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut onto = vec![0f32; 37];
            assert!(linear_combine(&refs, &coeffs, Some(&base), &mut onto));
            let mut sequential = vec![0f32; 37];
            for (j, x) in inputs.iter().enumerate() {
                for (o, &v) in sequential.iter_mut().zip(x) {
                    *o = if j == 0 {
                        coeffs[0] * v
                    } else {
                        *o + coeffs[j] * v
                    };
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&blocked), bits(&sequential), "k = {k}");
            let plus: Vec<f32> = sequential.iter().zip(&base).map(|(s, b)| s + b).collect();
            assert_eq!(bits(&onto), bits(&plus), "k = {k} onto a base");
        }
    }

    #[test]
    fn sort_keys_follow_total_order() {
        let vals = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            2.0,
            f32::MAX,
        ];
        for w in vals.windows(2) {
            assert!(sort_key(w[0]) < sort_key(w[1]), "{} < {}", w[0], w[1]);
        }
        for v in vals {
            assert_eq!(from_key(sort_key(v)).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn sorting_networks_sort_every_input_of_small_sizes() {
        // 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 inputs.
        for n in 1..=12usize {
            let net = sorting_network(n);
            for mask in 0u32..(1 << n) {
                let mut v: Vec<u32> = (0..n).map(|i| (mask >> i) & 1).collect();
                for &(a, b) in &net {
                    if v[a] > v[b] {
                        v.swap(a, b);
                    }
                }
                assert!(
                    v.windows(2).all(|w| w[0] <= w[1]),
                    "n = {n}, input {mask:b}"
                );
            }
        }
        assert_eq!(sorting_network(8).len(), 19);
    }

    #[test]
    fn network_median_equals_sorting_each_coordinate() {
        for k in 1..=17usize {
            let p = 2 * SORT_BLOCK + 13;
            let inputs: Vec<Vec<f32>> = (0..k)
                .map(|j| {
                    (0..p)
                        .map(|i| (((i * 31 + j * 17) % 23) as f32 - 11.0) * 0.7)
                        .collect()
                })
                .collect();
            let scales: Vec<f32> = (0..k).map(|j| 1.0 - j as f32 * 0.01).collect();
            let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let mut med = vec![0f32; p];
            median_chunk(&refs, &scales, &mut med);
            let trim = k / 4;
            let mut tm = vec![0f32; p];
            trimmed_mean_chunk(&refs, &scales, trim, &mut tm);
            for i in 0..p {
                let mut col: Vec<f32> = (0..k).map(|j| scales[j] * inputs[j][i]).collect();
                col.sort_by(f32::total_cmp);
                let m = if k % 2 == 1 {
                    col[k / 2]
                } else {
                    0.5 * col[k / 2 - 1] + 0.5 * col[k / 2]
                };
                assert_eq!(med[i].to_bits(), m.to_bits(), "k = {k}, i = {i}");
                let s: f64 = col[trim..k - trim].iter().map(|&x| f64::from(x)).sum();
                assert_eq!(
                    tm[i].to_bits(),
                    ((s / (k - 2 * trim) as f64) as f32).to_bits()
                );
            }
        }
    }

    #[test]
    fn median_and_trimmed_mean_on_known_values() {
        let cols: [[f32; 2]; 5] = [
            [1.0, -1.0],
            [100.0, 5.0],
            [3.0, 0.0],
            [2.0, 2.0],
            [-50.0, 1.0],
        ];
        let inputs: Vec<&[f32]> = cols.iter().map(|c| &c[..]).collect();
        let ones = [1.0f32; 5];
        let mut out = [0f32; 2];
        median_chunk(&inputs, &ones, &mut out);
        assert_eq!(out, [2.0, 1.0]);
        trimmed_mean_chunk(&inputs, &ones, 1, &mut out);
        assert_eq!(out, [2.0, 1.0]);
        median_chunk(&inputs[..4], &ones[..4], &mut out);
        assert_eq!(out, [2.5, 1.0]);
        // Scales apply before sorting.
        median_chunk(&inputs[..3], &[1.0, 0.01, 1.0], &mut out);
        assert_eq!(out, [1.0, 0.0]);
    }

    #[test]
    fn pairwise_distances_are_symmetric_and_exact_on_small_integers() {
        let a = vec![0f32; CHUNK + 3];
        let b = vec![1f32; CHUNK + 3];
        let c = vec![2f32; CHUNK + 3];
        let d = pairwise_sq_distances(&[&a, &b, &c], &[1.0, 1.0, 0.5]);
        let n = (CHUNK + 3) as f64;
        assert_eq!(d[1], n);
        assert_eq!(d[3], n);
        assert_eq!(d[2], n, "c scaled by 0.5 is all ones");
        assert_eq!(d[5], 0.0);
        assert_eq!(d[0], 0.0);
    }
}
