//! The difference between two models, and its wire encodings.
//!
//! A [`Delta`] is `updated - base` for two [`Weights`] of the same [`Layout`], kept as one
//! flat f32 vector. [`Delta::encode`] turns it into bytes in one of four
//! [`DeltaEncoding`]s; [`Delta::decode`] checks untrusted bytes against the layout the
//! receiver expects and against [`DeltaLimits`] before it allocates anything.
//!
//! # Encoded layout (version 1)
//!
//! All integers little-endian.
//!
//! ```text
//! magic     4 bytes  "CSDT"
//! version   u16      1
//! encoding  u8       0 = F32, 1 = F16, 2 = Int8, 3 = TopK
//! reserved  u8       0
//! table              the tensor table of the base model's layout (see crate::weights)
//! body, by encoding (P = parameters in the layout, T = tensors):
//!   F32   P x f32
//!   F16   P x u16 (IEEE 754 binary16)
//!   Int8  T x f32 scales (finite, >= 0), then P x i8 in -127..=127
//!   TopK  k u64, k x u32 flat indices (strictly ascending, < P), k x f32 values
//! ```
//!
//! # Error bounds (checked by property tests)
//!
//! For an input value `x` and its decoded value `y`:
//! - `F32`: exact (`y == x` bit for bit).
//! - `F16`: `|y - x| <= max(|x| * 2^-11, 2^-25)`; values with `|x| > 65504` cannot be
//!   encoded ([`DeltaError::F16Overflow`]).
//! - `Int8`: with `m` the tensor's largest magnitude, `|y - x| <= m / 254 + m * 2^-22`
//!   (half a quantisation step, plus f32 rounding of the product `q * scale`).
//! - `TopK`: the `k` largest magnitudes over the whole delta are exact (ties go to the
//!   lower index); every other value decodes to 0, so `|y - x| <= tau`, where `tau` is
//!   the k-th largest magnitude. Senders usually keep the residual for the next round.

use std::sync::Arc;

use half::f16;

use crate::bytes::{Reader, Truncated, put_f32s, read_f32s_into};
use crate::weights::{Layout, Limits, Weights, WeightsError, first_non_finite};

/// Magic bytes that open an encoded delta.
pub const DELTA_MAGIC: [u8; 4] = *b"CSDT";
/// Version of the delta layout written by this crate.
pub const DELTA_VERSION: u16 = 1;
/// Largest magnitude the F16 encoding accepts.
pub const F16_MAX: f32 = 65504.0;

/// How a delta's values are written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaEncoding {
    /// 4 bytes a value, exact.
    F32,
    /// 2 bytes a value, IEEE binary16.
    F16,
    /// 1 byte a value plus one f32 scale a tensor.
    Int8,
    /// The `k` largest magnitudes with their flat indices (8 bytes each).
    TopK {
        /// How many values to keep (clamped to `1..=P` when encoding).
        k: usize,
    },
}

impl DeltaEncoding {
    /// Top-k keeping `fraction` of `total` values, at least one.
    #[must_use]
    pub fn top_k_fraction(fraction: f64, total: usize) -> Self {
        let k = (fraction.clamp(0.0, 1.0) * total as f64).ceil() as usize;
        Self::TopK {
            k: k.clamp(1, total.max(1)),
        }
    }

    /// The tag byte written on the wire.
    #[must_use]
    pub fn tag(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Int8 => 2,
            Self::TopK { .. } => 3,
        }
    }

    /// A short name for logs and reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8 => "int8",
            Self::TopK { .. } => "topk",
        }
    }
}

/// Limits applied when decoding untrusted deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaLimits {
    /// Largest encoded delta accepted, in bytes.
    pub max_bytes: u64,
    /// Limits on the embedded tensor table.
    pub layout: Limits,
}

impl Default for DeltaLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            layout: Limits::default(),
        }
    }
}

/// What went wrong encoding or decoding a delta.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeltaError {
    /// The encoded delta is larger than allowed.
    #[error("encoded delta has {got} bytes; the limit is {max}")]
    TooLarge {
        /// Size of the input.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// The input does not start with [`DELTA_MAGIC`].
    #[error("not a cellswarm delta: bad magic bytes {0:02x?}")]
    BadMagic([u8; 4]),
    /// Unsupported layout version.
    #[error("unsupported delta version {0} (this build reads version {DELTA_VERSION})")]
    UnsupportedVersion(u16),
    /// Unknown encoding tag.
    #[error("unknown delta encoding tag {0}")]
    UnknownEncoding(u8),
    /// The reserved byte was not zero.
    #[error("reserved header byte is {0}, must be 0")]
    Reserved(u8),
    /// The input ended early.
    #[error(transparent)]
    Truncated(#[from] Truncated),
    /// The embedded tensor table is malformed or does not match the expected layout.
    #[error("tensor table: {0}")]
    Layout(#[from] WeightsError),
    /// The body has the wrong length for its encoding.
    #[error("{encoding} body has {got} bytes, expected {expected}")]
    WrongLength {
        /// The encoding.
        encoding: &'static str,
        /// Bytes expected.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// A decoded value, scale or f16 pattern is NaN or infinite.
    #[error("non-finite {what} in tensor {name:?} at index {index}")]
    NonFinite {
        /// A value or a scale.
        what: &'static str,
        /// The tensor.
        name: String,
        /// Index inside the tensor.
        index: usize,
    },
    /// An Int8 scale is negative, or a quantised value is -128.
    #[error("invalid int8 data in tensor {name:?}: {problem}")]
    BadQuantisation {
        /// The tensor.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A TopK index is out of range or not strictly ascending.
    #[error(
        "top-k index {index} at position {position} is out of range or not ascending (params: {total})"
    )]
    BadIndex {
        /// Position in the index list.
        position: u64,
        /// The index.
        index: u32,
        /// Parameters in the layout.
        total: usize,
    },
    /// TopK declares more values than parameters.
    #[error("top-k declares {k} values for {total} parameters")]
    BadK {
        /// Declared k.
        k: u64,
        /// Parameters in the layout.
        total: usize,
    },
    /// A value is too large for F16.
    #[error(
        "value {value} in tensor {name:?} at index {index} exceeds the f16 range (|x| <= 65504)"
    )]
    F16Overflow {
        /// The tensor.
        name: String,
        /// Index inside the tensor.
        index: usize,
        /// The value.
        value: f32,
    },
}

/// `updated - base` for two models of one layout, as one flat vector of finite values.
#[derive(Clone)]
pub struct Delta {
    layout: Arc<Layout>,
    values: Values,
}

/// Where a delta's values live: its own vector, or (f32 deltas received or sent) the
/// envelope buffer they arrived or left in, read in place without a copy.
#[derive(Clone)]
enum Values {
    Owned(Vec<f32>),
    /// `len` little-endian f32 at byte `start` of `bytes`; `bytes.as_ptr() + start` is
    /// 4-aligned (checked when built), so the bytes are read as `&[f32]` directly.
    Shared {
        bytes: ::bytes::Bytes,
        start: usize,
        len: usize,
    },
}

impl Values {
    fn as_slice(&self) -> &[f32] {
        match self {
            Self::Owned(v) => v,
            Self::Shared { bytes, start, len } => {
                bytemuck::cast_slice(&bytes[*start..*start + 4 * *len])
            }
        }
    }
}

impl PartialEq for Delta {
    fn eq(&self, other: &Self) -> bool {
        self.layout == other.layout && self.values() == other.values()
    }
}

impl std::fmt::Debug for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delta")
            .field("params", &self.values().len())
            .finish_non_exhaustive()
    }
}

/// `len` little-endian f32 values at byte `start` of `bytes` (the caller checked the
/// length), viewed in place when they are 4-aligned in memory (always, after
/// [`align_f32_tail`] on a little-endian machine), else copied out.
fn shared_f32(bytes: ::bytes::Bytes, start: usize, len: usize) -> Values {
    let aligned = (bytes.as_ptr() as usize + start).is_multiple_of(4);
    if cfg!(target_endian = "little") && aligned {
        Values::Shared { bytes, start, len }
    } else {
        let mut v = Vec::with_capacity(len);
        read_f32s_into(&bytes[start..start + 4 * len], &mut v);
        Values::Owned(v)
    }
}

/// Moves `buf[start..start + n]` down by 0-3 bytes so that it starts 4-aligned in memory;
/// returns the new start. The bytes before `start` (headers, already read) are overwritten.
fn align_f32_tail(buf: &mut [u8], start: usize, n: usize) -> usize {
    let misalign = (buf.as_ptr() as usize + start) % 4;
    if misalign == 0 || start < misalign {
        return start;
    }
    buf.copy_within(start..start + n, start - misalign);
    start - misalign
}

/// Sum of squares in f64 with a fixed summation order, so every machine gets the same
/// bits: value `i` goes to lane `i mod 8`, each lane sums in index order, and the lanes
/// are added in order 0..8. The independent lanes let the compiler vectorise the loop.
#[must_use]
pub fn sum_squares(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (lane, &v) in lanes.iter_mut().zip(c) {
            let v = f64::from(v);
            *lane += v * v;
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(rest) {
        let v = f64::from(v);
        *lane += v * v;
    }
    lanes.iter().fold(0.0, |acc, l| acc + l)
}

fn name_at(layout: &Layout, i: usize) -> (String, usize) {
    layout.entry_at(i).map_or((String::new(), i), |e| {
        (e.name().to_owned(), i - e.offset())
    })
}

impl Delta {
    /// `updated - base`.
    ///
    /// # Errors
    /// Different layouts, or a difference that overflows to infinity.
    pub fn between(base: &Weights, updated: &Weights) -> Result<Self, DeltaError> {
        base.layout().ensure_same(updated.layout())?;
        let values = updated
            .values()
            .iter()
            .zip(base.values())
            .map(|(u, b)| u - b)
            .collect();
        Self::from_flat(base.layout().clone(), values)
    }

    /// `updated - base`, computed in `updated`'s own buffer (no new allocation).
    ///
    /// # Errors
    /// Layouts that differ, or a non-finite difference.
    pub fn from_updated(base: &Weights, updated: Weights) -> Result<Self, DeltaError> {
        base.layout().ensure_same(updated.layout())?;
        let layout = Arc::clone(base.layout());
        let mut values = updated.into_values();
        for (u, b) in values.iter_mut().zip(base.values()) {
            *u -= b;
        }
        Self::from_flat(layout, values)
    }

    /// Wraps a flat vector laid out as `layout`.
    ///
    /// # Errors
    /// A length that differs from the layout, or a non-finite value.
    pub fn from_flat(layout: Arc<Layout>, values: Vec<f32>) -> Result<Self, DeltaError> {
        if values.len() != layout.total() {
            return Err(WeightsError::LayoutMismatch(format!(
                "layout has {} parameters, delta has {}",
                layout.total(),
                values.len()
            ))
            .into());
        }
        if let Some(e) = first_non_finite(&layout, &values) {
            return Err(e.into());
        }
        Ok(Self {
            layout,
            values: Values::Owned(values),
        })
    }

    /// The layout the delta applies to.
    #[must_use]
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The flat values.
    #[must_use]
    pub fn values(&self) -> &[f32] {
        self.values.as_slice()
    }

    /// Takes the flat values out (a copy when they are read in place from a buffer).
    #[must_use]
    pub fn into_values(self) -> Vec<f32> {
        match self.values {
            Values::Owned(v) => v,
            shared @ Values::Shared { .. } => shared.as_slice().to_vec(),
        }
    }

    /// Euclidean norm, `sqrt(sum_squares(values))` (deterministic).
    #[must_use]
    pub fn l2_norm(&self) -> f64 {
        sum_squares(self.values()).sqrt()
    }

    /// `base + self`.
    ///
    /// # Errors
    /// Different layouts, or a sum that overflows to infinity.
    pub fn apply(&self, base: &Weights) -> Result<Weights, WeightsError> {
        self.layout.ensure_same(base.layout())?;
        let values = base
            .values()
            .iter()
            .zip(self.values())
            .map(|(b, d)| b + d)
            .collect();
        Weights::from_flat(base.layout().clone(), values)
    }

    /// Size in bytes of this delta encoded as `encoding`.
    #[must_use]
    pub fn encoded_len(&self, encoding: DeltaEncoding) -> usize {
        let p = self.values().len();
        8 + self.layout.table_bytes().len()
            + match encoding {
                DeltaEncoding::F32 => 4 * p,
                DeltaEncoding::F16 => 2 * p,
                DeltaEncoding::Int8 => 4 * self.layout.entries().len() + p,
                DeltaEncoding::TopK { k } => 8 + 8 * k.clamp(1, p.max(1)).min(p),
            }
    }

    /// Encodes the delta.
    ///
    /// # Errors
    /// [`DeltaError::F16Overflow`] when F16 is asked for a value beyond its range.
    pub fn encode(&self, encoding: DeltaEncoding) -> Result<Vec<u8>, DeltaError> {
        let mut out = Vec::with_capacity(self.encoded_len(encoding));
        self.encode_into(encoding, &mut out)?;
        Ok(out)
    }

    /// Appends the encoding to `out` (reserve [`Delta::encoded_len`] first to avoid
    /// reallocation), so a sender can build a whole message in one buffer.
    ///
    /// # Errors
    /// As [`Delta::encode`]; `out` may then hold a partial encoding.
    pub fn encode_into(
        &self,
        encoding: DeltaEncoding,
        out: &mut Vec<u8>,
    ) -> Result<(), DeltaError> {
        out.extend_from_slice(&DELTA_MAGIC);
        out.extend_from_slice(&DELTA_VERSION.to_le_bytes());
        out.push(encoding.tag());
        out.push(0);
        out.extend_from_slice(self.layout.table_bytes());
        let values = self.values();
        match encoding {
            DeltaEncoding::F32 => put_f32s(out, values),
            DeltaEncoding::F16 => {
                for (i, &v) in values.iter().enumerate() {
                    if v.abs() > F16_MAX {
                        let (name, index) = name_at(&self.layout, i);
                        return Err(DeltaError::F16Overflow {
                            name,
                            index,
                            value: v,
                        });
                    }
                    out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
                }
            }
            DeltaEncoding::Int8 => {
                let scales: Vec<f32> = self
                    .layout
                    .entries()
                    .iter()
                    .map(|e| {
                        let m = values[e.range()].iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        m / 127.0
                    })
                    .collect();
                put_f32s(out, &scales);
                for (e, &s) in self.layout.entries().iter().zip(&scales) {
                    for &v in &values[e.range()] {
                        let q = if s > 0.0 {
                            (v / s).round().clamp(-127.0, 127.0) as i8
                        } else {
                            0
                        };
                        out.push(q.to_le_bytes()[0]);
                    }
                }
            }
            DeltaEncoding::TopK { k } => {
                let p = values.len();
                let k = k.clamp(1, p.max(1)).min(p);
                let mut idx: Vec<u32> = (0..p as u32).collect();
                // Total order: larger magnitude first, then lower index.
                let key = |&i: &u32| (std::cmp::Reverse(values[i as usize].abs().to_bits()), i);
                if k < p {
                    idx.select_nth_unstable_by_key(k, key);
                    idx.truncate(k);
                }
                idx.sort_unstable();
                out.extend_from_slice(&(k as u64).to_le_bytes());
                for &i in &idx {
                    out.extend_from_slice(&i.to_le_bytes());
                }
                for &i in &idx {
                    out.extend_from_slice(&values[i as usize].to_le_bytes());
                }
            }
        }
        Ok(())
    }

    /// Reads the encoding tag of an encoded delta without decoding it.
    ///
    /// # Errors
    /// A header that is truncated or not a delta.
    pub fn peek_encoding(bytes: &[u8]) -> Result<u8, DeltaError> {
        let mut r = Reader::new(bytes);
        let magic = r.array::<4>("magic")?;
        if magic != DELTA_MAGIC {
            return Err(DeltaError::BadMagic(magic));
        }
        r.u16("version")?;
        Ok(r.u8("encoding")?)
    }

    /// Checks an encoded delta's size, magic, version, encoding and tensor table against
    /// `expected`; returns the encoding tag and the body after the header.
    fn header<'a>(
        bytes: &'a [u8],
        expected: &Arc<Layout>,
        limits: &DeltaLimits,
    ) -> Result<(u8, &'a [u8]), DeltaError> {
        if bytes.len() as u64 > limits.max_bytes {
            return Err(DeltaError::TooLarge {
                got: bytes.len() as u64,
                max: limits.max_bytes,
            });
        }
        let mut r = Reader::new(bytes);
        let magic = r.array::<4>("magic")?;
        if magic != DELTA_MAGIC {
            return Err(DeltaError::BadMagic(magic));
        }
        let version = r.u16("version")?;
        if version != DELTA_VERSION {
            return Err(DeltaError::UnsupportedVersion(version));
        }
        let tag = r.u8("encoding")?;
        let reserved = r.u8("reserved")?;
        if reserved != 0 {
            return Err(DeltaError::Reserved(reserved));
        }
        if tag > 3 {
            return Err(DeltaError::UnknownEncoding(tag));
        }
        let table = Layout::read_table(&mut r, &limits.layout)?;
        expected.ensure_same(&table)?;
        Ok((tag, r.rest()))
    }

    /// Decodes untrusted bytes against the layout the receiver expects.
    ///
    /// Sizes are checked against `limits` and the input length, and the tensor table
    /// against `expected`, before the output is allocated.
    ///
    /// # Errors
    /// Any [`DeltaError`]; never panics.
    pub fn decode(
        bytes: &[u8],
        expected: &Arc<Layout>,
        limits: &DeltaLimits,
    ) -> Result<Self, DeltaError> {
        let (tag, body) = Self::header(bytes, expected, limits)?;
        let p = expected.total();
        let t = expected.entries().len();
        let check_len = |encoding: &'static str, expected: u64| {
            if body.len() as u64 == expected {
                Ok(())
            } else {
                Err(DeltaError::WrongLength {
                    encoding,
                    expected,
                    got: body.len() as u64,
                })
            }
        };
        let non_finite = |what: &'static str, i: usize| {
            let (name, index) = name_at(expected, i);
            DeltaError::NonFinite { what, name, index }
        };
        let mut values: Vec<f32>;
        match tag {
            0 => {
                check_len("f32", 4 * p as u64)?;
                values = Vec::with_capacity(p);
                read_f32s_into(body, &mut values);
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(non_finite("value", i));
                }
            }
            1 => {
                check_len("f16", 2 * p as u64)?;
                values = Vec::with_capacity(p);
                for (i, c) in body.chunks_exact(2).enumerate() {
                    let h = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                    if !h.is_finite() {
                        return Err(non_finite("value", i));
                    }
                    values.push(h.to_f32());
                }
            }
            2 => {
                check_len("int8", 4 * t as u64 + p as u64)?;
                let (scale_bytes, q) = body.split_at(4 * t);
                let mut scales = Vec::with_capacity(t);
                read_f32s_into(scale_bytes, &mut scales);
                values = Vec::with_capacity(p);
                for (e, &s) in expected.entries().iter().zip(&scales) {
                    if !s.is_finite() {
                        return Err(non_finite("scale", e.offset()));
                    }
                    if s < 0.0 {
                        return Err(DeltaError::BadQuantisation {
                            name: e.name().to_owned(),
                            problem: format!("negative scale {s}"),
                        });
                    }
                    for &b in &q[e.range()] {
                        let qi = i8::from_le_bytes([b]);
                        if qi == i8::MIN {
                            return Err(DeltaError::BadQuantisation {
                                name: e.name().to_owned(),
                                problem: "quantised value -128 (valid range is -127..=127)".into(),
                            });
                        }
                        values.push(f32::from(qi) * s);
                    }
                }
                // A huge scale times 127 can overflow to infinity.
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(non_finite("value", i));
                }
            }
            _ => {
                let mut head = Reader::new(body);
                let k = head.u64("top-k count")?;
                if k > p as u64 {
                    return Err(DeltaError::BadK { k, total: p });
                }
                check_len("topk", 8 + 8 * k)?;
                let k = k as usize;
                let (idx_bytes, val_bytes) = body[8..].split_at(4 * k);
                let mut prev: Option<u32> = None;
                for (pos, c) in idx_bytes.chunks_exact(4).enumerate() {
                    let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if i as usize >= p || prev.is_some_and(|q| i <= q) {
                        return Err(DeltaError::BadIndex {
                            position: pos as u64,
                            index: i,
                            total: p,
                        });
                    }
                    prev = Some(i);
                }
                values = vec![0.0; p];
                for (ci, cv) in idx_bytes.chunks_exact(4).zip(val_bytes.chunks_exact(4)) {
                    let i = u32::from_le_bytes([ci[0], ci[1], ci[2], ci[3]]) as usize;
                    let v = f32::from_le_bytes([cv[0], cv[1], cv[2], cv[3]]);
                    if !v.is_finite() {
                        return Err(non_finite("value", i));
                    }
                    values[i] = v;
                }
            }
        }
        Ok(Self {
            layout: expected.clone(),
            values: Values::Owned(values),
        })
    }

    /// A delta whose `layout.total()` little-endian f32 values are the bytes of `bytes`
    /// from `start` on, read in place when 4-aligned: an envelope this node encoded from
    /// a checked [`Delta`] (so the values are not checked for finiteness again; bytes
    /// from elsewhere go through [`Delta::decode_owned`]).
    ///
    /// # Errors
    /// A length that does not match the layout.
    pub fn view_f32(
        bytes: ::bytes::Bytes,
        start: usize,
        layout: Arc<Layout>,
    ) -> Result<Self, DeltaError> {
        let p = layout.total();
        let have = bytes.len().saturating_sub(start) as u64;
        if have != 4 * p as u64 {
            return Err(DeltaError::WrongLength {
                encoding: "f32",
                expected: 4 * p as u64,
                got: have,
            });
        }
        let values = shared_f32(bytes, start, p);
        Ok(Self { layout, values })
    }

    /// Decodes the encoded delta at `body` of `buf`, which the caller hands over (a
    /// verified envelope): an f32 delta is then read in place, its values moved by at most
    /// three bytes to a 4-aligned address, instead of being copied into a new vector. Other
    /// encodings decode as [`Delta::decode`].
    ///
    /// # Errors
    /// As [`Delta::decode`]; never panics.
    pub fn decode_owned(
        mut buf: Vec<u8>,
        body: std::ops::Range<usize>,
        expected: &Arc<Layout>,
        limits: &DeltaLimits,
    ) -> Result<Self, DeltaError> {
        let body = body.start.min(buf.len())..body.end.min(buf.len());
        let bytes = &buf[body.clone()];
        let p = expected.total();
        let (tag, values) = Self::header(bytes, expected, limits)?;
        if tag != DeltaEncoding::F32.tag() || cfg!(target_endian = "big") {
            return Self::decode(bytes, expected, limits);
        }
        if values.len() as u64 != 4 * p as u64 {
            return Err(DeltaError::WrongLength {
                encoding: "f32",
                expected: 4 * p as u64,
                got: values.len() as u64,
            });
        }
        // An f32 body is the last 4P bytes of the encoding.
        let start = align_f32_tail(&mut buf, body.end - 4 * p, 4 * p);
        let values = shared_f32(::bytes::Bytes::from(buf), start, p);
        if let Some(e) = first_non_finite(expected, values.as_slice()) {
            return Err(match e {
                WeightsError::NonFinite { name, index, .. } => DeltaError::NonFinite {
                    what: "value",
                    name,
                    index,
                },
                other => other.into(),
            });
        }
        Ok(Self {
            layout: Arc::clone(expected),
            values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout(sizes: &[usize]) -> Arc<Layout> {
        Arc::new(
            Layout::new(
                sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| (format!("t{i:02}"), vec![n])),
            )
            .unwrap(),
        )
    }

    fn delta(sizes: &[usize], values: Vec<f32>) -> Delta {
        Delta::from_flat(layout(sizes), values).unwrap()
    }

    fn round_trip(d: &Delta, enc: DeltaEncoding) -> Delta {
        let bytes = d.encode(enc).unwrap();
        assert_eq!(bytes.len(), d.encoded_len(enc), "{enc:?}");
        Delta::decode(&bytes, d.layout(), &DeltaLimits::default()).unwrap()
    }

    /// Splits `values` into up to three tensors so per-tensor scales are exercised.
    fn split_sizes(n: usize) -> Vec<usize> {
        match n {
            0..=2 => vec![n.max(1)],
            _ => vec![n / 3, n / 3, n - 2 * (n / 3)],
        }
    }

    proptest! {
        #[test]
        fn f32_is_exact(values in proptest::collection::vec(-1e30f32..1e30, 1..200)) {
            let d = delta(&split_sizes(values.len()), values);
            prop_assert_eq!(round_trip(&d, DeltaEncoding::F32), d);
        }

        #[test]
        fn f16_within_bound(values in proptest::collection::vec(-65504f32..65504.0, 1..200)) {
            let d = delta(&split_sizes(values.len()), values);
            let back = round_trip(&d, DeltaEncoding::F16);
            for (x, y) in d.values().iter().zip(back.values()) {
                let bound = (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
                prop_assert!((x - y).abs() <= bound, "x={x} y={y} bound={bound}");
            }
        }

        #[test]
        fn f16_within_bound_for_tiny_values(values in proptest::collection::vec(-1e-4f32..1e-4, 1..200)) {
            let d = delta(&split_sizes(values.len()), values);
            let back = round_trip(&d, DeltaEncoding::F16);
            for (x, y) in d.values().iter().zip(back.values()) {
                let bound = (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
                prop_assert!((x - y).abs() <= bound, "x={x} y={y} bound={bound}");
            }
        }

        #[test]
        fn int8_within_bound(values in proptest::collection::vec(-1e3f32..1e3, 1..300)) {
            let sizes = split_sizes(values.len());
            let d = delta(&sizes, values);
            let back = round_trip(&d, DeltaEncoding::Int8);
            for e in d.layout().entries() {
                let m = d.values()[e.range()].iter().fold(0f32, |m, v| m.max(v.abs()));
                let bound = m / 254.0 + m * 2f32.powi(-22);
                for i in e.range() {
                    let (x, y) = (d.values()[i], back.values()[i]);
                    prop_assert!((x - y).abs() <= bound, "x={x} y={y} bound={bound}");
                }
            }
        }

        #[test]
        fn topk_keeps_the_largest_exactly(
            values in proptest::collection::vec(-1e3f32..1e3, 1..300),
            frac in 0.0f64..1.0,
        ) {
            let n = values.len();
            let d = delta(&split_sizes(n), values);
            let enc = DeltaEncoding::top_k_fraction(frac, n);
            let DeltaEncoding::TopK { k } = enc else { unreachable!() };
            let back = round_trip(&d, enc);
            let mut mags: Vec<f32> = d.values().iter().map(|v| v.abs()).collect();
            mags.sort_by(|a, b| b.total_cmp(a));
            let tau = mags[k - 1];
            let kept = back.values().iter().zip(d.values()).filter(|(y, x)| y == x && **x != 0.0).count();
            prop_assert!(kept <= k);
            for (x, y) in d.values().iter().zip(back.values()) {
                prop_assert!(*y == 0.0 || y == x);
                prop_assert!((x - y).abs() <= tau, "x={x} y={y} tau={tau}");
                if x.abs() > tau { prop_assert_eq!(x, y); }
            }
        }

        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let l = layout(&[3, 4]);
            let _ = Delta::decode(&bytes, &l, &DeltaLimits::default());
        }
    }

    fn sample() -> Delta {
        delta(&[3, 2], vec![0.5, -1.5, 2.0, 0.25, -0.125])
    }

    fn limits() -> DeltaLimits {
        DeltaLimits::default()
    }

    #[test]
    fn between_and_apply_are_inverse() {
        let base = Weights::from_tensors([("a", vec![2], vec![1.0, 2.0])]).unwrap();
        let upd = Weights::from_tensors([("a", vec![2], vec![1.5, 1.0])]).unwrap();
        let d = Delta::between(&base, &upd).unwrap();
        assert_eq!(d.values(), &[0.5, -1.0]);
        assert_eq!(d.apply(&base).unwrap(), upd);
        assert!((d.l2_norm() - 1.25f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn rejects_wrong_lengths() {
        let d = sample();
        for enc in [
            DeltaEncoding::F32,
            DeltaEncoding::F16,
            DeltaEncoding::Int8,
            DeltaEncoding::TopK { k: 2 },
        ] {
            let mut bytes = d.encode(enc).unwrap();
            bytes.push(0);
            assert!(
                matches!(
                    Delta::decode(&bytes, d.layout(), &limits()),
                    Err(DeltaError::WrongLength { .. })
                ),
                "{enc:?} with an extra byte"
            );
            bytes.truncate(bytes.len() - 2);
            assert!(
                Delta::decode(&bytes, d.layout(), &limits()).is_err(),
                "{enc:?} with a missing byte"
            );
        }
    }

    #[test]
    fn rejects_shape_and_name_mismatches() {
        let d = sample();
        let bytes = d.encode(DeltaEncoding::F32).unwrap();
        let other_shape = Arc::new(Layout::new([("t00", vec![2]), ("t01", vec![3])]).unwrap());
        let err = Delta::decode(&bytes, &other_shape, &limits()).unwrap_err();
        assert!(
            matches!(err, DeltaError::Layout(WeightsError::LayoutMismatch(_))),
            "{err}"
        );
        assert!(err.to_string().contains("t00"), "{err}");
        let other_name = Arc::new(Layout::new([("t00", vec![3]), ("u01", vec![2])]).unwrap());
        assert!(matches!(
            Delta::decode(&bytes, &other_name, &limits()),
            Err(DeltaError::Layout(WeightsError::LayoutMismatch(_)))
        ));
        let fewer = Arc::new(Layout::new([("t00", vec![3])]).unwrap());
        assert!(Delta::decode(&bytes, &fewer, &limits()).is_err());
    }

    #[test]
    fn decoding_in_place_matches_decoding_a_copy() {
        let d = sample();
        for enc in [
            DeltaEncoding::F32,
            DeltaEncoding::F16,
            DeltaEncoding::Int8,
            DeltaEncoding::top_k_fraction(0.5, 5),
        ] {
            let body = d.encode(enc).unwrap();
            let want = Delta::decode(&body, d.layout(), &limits()).unwrap();
            // Every misalignment of the body inside the handed-over buffer.
            for prefix in 0..9 {
                let mut buf = vec![0xAB; prefix];
                buf.extend_from_slice(&body);
                let end = buf.len();
                let got = Delta::decode_owned(buf, prefix..end, d.layout(), &limits()).unwrap();
                assert_eq!(got, want, "{} at offset {prefix}", enc.name());
                assert!(matches!(
                    (&got.values, enc),
                    (Values::Shared { .. }, DeltaEncoding::F32) | (Values::Owned(_), _)
                ));
            }
        }
    }

    #[test]
    fn decoding_in_place_refuses_what_decode_refuses() {
        let d = sample();
        let mut body = d.encode(DeltaEncoding::F32).unwrap();
        let n = body.len();
        // A NaN in the last value, a short body, a wrong layout.
        body[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        let err = Delta::decode_owned(body.clone(), 0..n, d.layout(), &limits()).unwrap_err();
        assert!(matches!(err, DeltaError::NonFinite { .. }), "{err}");
        let err = Delta::decode_owned(body.clone(), 0..n - 4, d.layout(), &limits()).unwrap_err();
        assert!(matches!(err, DeltaError::WrongLength { .. }), "{err}");
        let other = layout(&[5]);
        let err = Delta::decode_owned(body, 0..n, &other, &limits()).unwrap_err();
        assert!(matches!(err, DeltaError::Layout(_)), "{err}");
        // A range past the end is clamped, never a panic.
        assert!(Delta::decode_owned(vec![1, 2, 3], 2..99, d.layout(), &limits()).is_err());
    }

    #[test]
    fn rejects_non_finite_values() {
        let d = sample();
        let l = d.layout();
        let table = l.table_bytes().len();
        // F32: overwrite the third value with NaN.
        let mut b = d.encode(DeltaEncoding::F32).unwrap();
        let at = 8 + table + 8;
        b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let err = Delta::decode(&b, l, &limits()).unwrap_err();
        assert_eq!(
            err,
            DeltaError::NonFinite {
                what: "value",
                name: "t00".into(),
                index: 2
            }
        );
        // F16: +inf bit pattern.
        let mut b = d.encode(DeltaEncoding::F16).unwrap();
        let at = 8 + table;
        b[at..at + 2].copy_from_slice(&f16::INFINITY.to_bits().to_le_bytes());
        assert!(matches!(
            Delta::decode(&b, l, &limits()),
            Err(DeltaError::NonFinite { .. })
        ));
        // Int8: NaN scale; then a scale so large that q * scale overflows.
        let mut b = d.encode(DeltaEncoding::Int8).unwrap();
        let at = 8 + table;
        b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            Delta::decode(&b, l, &limits()),
            Err(DeltaError::NonFinite { what: "scale", .. })
        ));
        b[at..at + 4].copy_from_slice(&f32::MAX.to_le_bytes());
        assert!(matches!(
            Delta::decode(&b, l, &limits()),
            Err(DeltaError::NonFinite { what: "value", .. })
        ));
        // TopK: infinite value.
        let mut b = d.encode(DeltaEncoding::TopK { k: 2 }).unwrap();
        let n = b.len();
        b[n - 4..].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert!(matches!(
            Delta::decode(&b, l, &limits()),
            Err(DeltaError::NonFinite { .. })
        ));
    }

    #[test]
    fn rejects_bad_int8_data() {
        let d = sample();
        let l = d.layout();
        let table = l.table_bytes().len();
        let mut b = d.encode(DeltaEncoding::Int8).unwrap();
        let at = 8 + table;
        b[at..at + 4].copy_from_slice(&(-1.0f32).to_le_bytes());
        assert!(matches!(
            Delta::decode(&b, l, &limits()),
            Err(DeltaError::BadQuantisation { .. })
        ));
        let mut b = d.encode(DeltaEncoding::Int8).unwrap();
        let n = b.len();
        b[n - 1] = 0x80;
        assert!(matches!(
            Delta::decode(&b, l, &limits()),
            Err(DeltaError::BadQuantisation { .. })
        ));
    }

    #[test]
    fn rejects_bad_topk_indices() {
        let d = sample();
        let l = d.layout();
        let table = l.table_bytes().len();
        let idx_at = 8 + table + 8;
        // Out of range.
        let mut b = d.encode(DeltaEncoding::TopK { k: 2 }).unwrap();
        b[idx_at + 4..idx_at + 8].copy_from_slice(&5u32.to_le_bytes());
        assert!(matches!(
            Delta::decode(&b, l, &limits()),
            Err(DeltaError::BadIndex { index: 5, .. })
        ));
        // Duplicate (not strictly ascending).
        let mut b = d.encode(DeltaEncoding::TopK { k: 2 }).unwrap();
        let first: [u8; 4] = b[idx_at..idx_at + 4].try_into().unwrap();
        b[idx_at + 4..idx_at + 8].copy_from_slice(&first);
        assert!(matches!(
            Delta::decode(&b, l, &limits()),
            Err(DeltaError::BadIndex { position: 1, .. })
        ));
        // k larger than the layout, with a body too short to back it: rejected before allocating.
        let mut b = d.encode(DeltaEncoding::TopK { k: 2 }).unwrap();
        b[8 + table..8 + table + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Delta::decode(&b, l, &limits()),
            Err(DeltaError::BadK { .. })
        ));
    }

    #[test]
    fn rejects_oversize_input_before_parsing() {
        let d = sample();
        let b = d.encode(DeltaEncoding::F32).unwrap();
        let tight = DeltaLimits {
            max_bytes: b.len() as u64 - 1,
            ..DeltaLimits::default()
        };
        assert_eq!(
            Delta::decode(&b, d.layout(), &tight),
            Err(DeltaError::TooLarge {
                got: b.len() as u64,
                max: b.len() as u64 - 1
            })
        );
        // A table claiming more tensors than allowed.
        let small = DeltaLimits {
            layout: Limits {
                max_tensors: 1,
                max_params: 1 << 20,
            },
            ..DeltaLimits::default()
        };
        assert!(matches!(
            Delta::decode(&b, d.layout(), &small),
            Err(DeltaError::Layout(WeightsError::TooLarge { .. }))
        ));
    }

    #[test]
    fn rejects_bad_headers() {
        let d = sample();
        let good = d.encode(DeltaEncoding::F32).unwrap();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            Delta::decode(&b, d.layout(), &limits()),
            Err(DeltaError::BadMagic(_))
        ));
        let mut b = good.clone();
        b[4] = 9;
        assert!(matches!(
            Delta::decode(&b, d.layout(), &limits()),
            Err(DeltaError::UnsupportedVersion(9))
        ));
        let mut b = good.clone();
        b[6] = 7;
        assert!(matches!(
            Delta::decode(&b, d.layout(), &limits()),
            Err(DeltaError::UnknownEncoding(7))
        ));
        let mut b = good;
        b[7] = 1;
        assert!(matches!(
            Delta::decode(&b, d.layout(), &limits()),
            Err(DeltaError::Reserved(1))
        ));
        assert_eq!(
            Delta::peek_encoding(&d.encode(DeltaEncoding::Int8).unwrap()),
            Ok(2)
        );
    }

    #[test]
    fn f16_refuses_out_of_range_values() {
        let d = delta(&[2], vec![1.0, 70000.0]);
        assert!(matches!(
            d.encode(DeltaEncoding::F16),
            Err(DeltaError::F16Overflow { index: 1, .. })
        ));
    }

    #[test]
    fn topk_breaks_ties_by_lower_index() {
        let d = delta(&[4], vec![1.0, -2.0, 2.0, 2.0]);
        let back = round_trip(&d, DeltaEncoding::TopK { k: 2 });
        assert_eq!(back.values(), &[0.0, -2.0, 2.0, 0.0]);
    }

    #[test]
    fn compressed_encodings_are_smaller() {
        let d = delta(&[1000], (0..1000).map(|i| (i as f32).sin()).collect());
        let header = 8 + d.layout().table_bytes().len();
        let body = |enc| d.encoded_len(enc) - header;
        assert_eq!(body(DeltaEncoding::F32), 4000);
        assert_eq!(body(DeltaEncoding::F16), 2000);
        assert_eq!(body(DeltaEncoding::Int8), 1004);
        assert_eq!(body(DeltaEncoding::top_k_fraction(0.05, 1000)), 8 + 50 * 8);
    }
}
