//! A model's parameters as named f32 tensors in canonical order, and their content hash.
//!
//! [`Weights`] stores every tensor in one flat `Vec<f32>`, tensors laid end to end in
//! ascending byte order of their names, described by a shared [`Layout`]. The flat form
//! is what the aggregator streams over; the layout is what binds a delta to a model.
//!
//! # Canonical byte layout (version 1)
//!
//! All integers little-endian.
//!
//! ```text
//! magic    4 bytes   "CSWT"
//! version  u16       1
//! table:
//!   count  u32       number of tensors
//!   per tensor, names in strictly ascending byte order:
//!     name_len u16, name (UTF-8, 1..=512 bytes)
//!     ndim     u8   (0..=8)
//!     dims     ndim x u64
//! values   for each tensor in table order, numel x f32 (IEEE 754 binary32)
//! ```
//!
//! The [`ModelHash`] of a model is SHA-256 over exactly these bytes, so a model file in
//! this format can be checked with `sha256sum`. Values are hashed by their bits: `0.0`
//! and `-0.0` hash differently, and non-finite values are never admitted.

use std::fmt;
use std::io::{self, Write};
use std::sync::Arc;

use ring::digest;

use crate::bytes::{Reader, Truncated, hash_f32s, put_f32s, read_f32s_into};
use crate::ids::ModelHash;

/// Magic bytes that open a model in canonical layout.
pub const WEIGHTS_MAGIC: [u8; 4] = *b"CSWT";
/// Version of the canonical layout written by this crate.
pub const WEIGHTS_VERSION: u16 = 1;
/// Most dimensions a tensor may have.
pub const MAX_NDIM: usize = 8;
/// Longest tensor name in bytes.
pub const MAX_NAME_LEN: usize = 512;
/// Most parameters a layout may hold: flat indices must fit in a `u32` (top-k deltas).
pub const MAX_PARAMS: u64 = u32::MAX as u64;

/// What went wrong building or decoding weights.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightsError {
    /// Two tensors share a name.
    #[error("duplicate tensor name {0:?}")]
    DuplicateName(String),
    /// A tensor name is empty or longer than [`MAX_NAME_LEN`] bytes.
    #[error("tensor name {name:?} has {len} bytes; names must have 1..={MAX_NAME_LEN}")]
    BadName {
        /// The name (possibly shortened).
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A tensor has more than [`MAX_NDIM`] dimensions.
    #[error("tensor {name:?} has {ndim} dimensions; at most {MAX_NDIM} are allowed")]
    TooManyDims {
        /// The tensor.
        name: String,
        /// Its number of dimensions.
        ndim: usize,
    },
    /// A tensor has a zero-sized dimension or its element count overflows.
    #[error("tensor {name:?} has an invalid shape {shape:?}")]
    BadShape {
        /// The tensor.
        name: String,
        /// The offending shape.
        shape: Vec<u64>,
    },
    /// The values given for a tensor do not match its shape.
    #[error("tensor {name:?} with shape {shape:?} needs {expected} values, got {got}")]
    WrongValueCount {
        /// The tensor.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// `shape.iter().product()`.
        expected: usize,
        /// Values supplied.
        got: usize,
    },
    /// A value is NaN or infinite.
    #[error("tensor {name:?} holds a non-finite value {value} at index {index}")]
    NonFinite {
        /// The tensor.
        name: String,
        /// Index inside the tensor.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The model has more parameters or tensors than allowed.
    #[error("{what} {got} exceeds the limit of {max}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// The count found.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// The input ended early.
    #[error(transparent)]
    Truncated(#[from] Truncated),
    /// The input does not start with [`WEIGHTS_MAGIC`].
    #[error("not a cellswarm model: bad magic bytes {0:02x?}")]
    BadMagic([u8; 4]),
    /// The input has a layout version this build does not read.
    #[error("unsupported model layout version {0} (this build reads version {WEIGHTS_VERSION})")]
    UnsupportedVersion(u16),
    /// A tensor name is not valid UTF-8.
    #[error("tensor name at byte offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Offset of the name.
        offset: usize,
    },
    /// Tensor names in the input are not in strictly ascending order.
    #[error("tensor {name:?} is out of canonical order (names must be strictly ascending)")]
    NotCanonical {
        /// The first name out of order.
        name: String,
    },
    /// Bytes remained after the last value.
    #[error("{0} unexpected bytes after the last value")]
    TrailingBytes(usize),
    /// Two layouts differ.
    #[error("layout mismatch: {0}")]
    LayoutMismatch(String),
}

/// One tensor's place in a [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorEntry {
    name: String,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

impl TensorEntry {
    /// The tensor's name, e.g. `"enc1.conv1.weight"`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The tensor's shape.
    #[must_use]
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Index of its first element in the flat vector.
    #[must_use]
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the tensor has no elements (never true for a validated layout).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The element range in the flat vector.
    #[must_use]
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// Limits applied when decoding untrusted layouts and models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tensors a layout may name.
    pub max_tensors: u32,
    /// Most parameters in total.
    pub max_params: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tensors: 4096,
            max_params: 256 * 1024 * 1024,
        }
    }
}

/// The names, shapes and flat offsets of a model's tensors, in canonical order.
#[derive(Clone, PartialEq, Eq)]
pub struct Layout {
    entries: Vec<TensorEntry>,
    total: usize,
    table: Vec<u8>,
}

impl fmt::Debug for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layout")
            .field("tensors", &self.entries.len())
            .field("params", &self.total)
            .finish()
    }
}

fn check_name(name: &str) -> Result<(), WeightsError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(WeightsError::BadName {
            name: name.chars().take(64).collect(),
            len: name.len(),
        });
    }
    Ok(())
}

fn numel(name: &str, shape: &[u64]) -> Result<u64, WeightsError> {
    let bad = || WeightsError::BadShape {
        name: name.to_owned(),
        shape: shape.to_vec(),
    };
    if shape.len() > MAX_NDIM {
        return Err(WeightsError::TooManyDims {
            name: name.to_owned(),
            ndim: shape.len(),
        });
    }
    let mut n: u64 = 1;
    for &d in shape {
        if d == 0 {
            return Err(bad());
        }
        n = n.checked_mul(d).ok_or_else(bad)?;
    }
    if n > MAX_PARAMS {
        return Err(bad());
    }
    Ok(n)
}

impl Layout {
    /// Builds a layout from `(name, shape)` pairs in any order.
    ///
    /// # Errors
    /// Duplicate or malformed names, zero-sized or overflowing shapes, or more than
    /// [`MAX_PARAMS`] parameters in total.
    pub fn new<I, S>(specs: I) -> Result<Self, WeightsError>
    where
        I: IntoIterator<Item = (S, Vec<usize>)>,
        S: Into<String>,
    {
        let mut specs: Vec<(String, Vec<usize>)> =
            specs.into_iter().map(|(n, s)| (n.into(), s)).collect();
        specs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for pair in specs.windows(2) {
            if pair[0].0 == pair[1].0 {
                return Err(WeightsError::DuplicateName(pair[0].0.clone()));
            }
        }
        Self::from_sorted(specs)
    }

    fn from_sorted(specs: Vec<(String, Vec<usize>)>) -> Result<Self, WeightsError> {
        let mut entries = Vec::with_capacity(specs.len());
        let mut total: u64 = 0;
        for (name, shape) in specs {
            check_name(&name)?;
            let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            let n = numel(&name, &dims)?;
            let offset = total;
            total = total.checked_add(n).filter(|t| *t <= MAX_PARAMS).ok_or(
                WeightsError::TooLarge {
                    what: "parameter count",
                    got: total.saturating_add(n),
                    max: MAX_PARAMS,
                },
            )?;
            entries.push(TensorEntry {
                name,
                shape,
                // Both fit in usize: bounded by MAX_PARAMS (u32::MAX).
                offset: offset as usize,
                len: n as usize,
            });
        }
        let mut table = Vec::new();
        table.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in &entries {
            table.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            table.extend_from_slice(e.name.as_bytes());
            table.push(e.shape.len() as u8);
            for &d in &e.shape {
                table.extend_from_slice(&(d as u64).to_le_bytes());
            }
        }
        Ok(Self {
            entries,
            total: total as usize,
            table,
        })
    }

    /// Parses a tensor table (the `table` part of the canonical layout).
    ///
    /// Counts and lengths are checked against `limits` and the bytes present before
    /// anything is allocated.
    pub(crate) fn read_table(r: &mut Reader<'_>, limits: &Limits) -> Result<Self, WeightsError> {
        let count = r.u32("tensor count")?;
        if count > limits.max_tensors {
            return Err(WeightsError::TooLarge {
                what: "tensor count",
                got: u64::from(count),
                max: u64::from(limits.max_tensors),
            });
        }
        // Each entry takes at least 4 bytes (name_len, one name byte, ndim).
        if count as usize > r.remaining() / 4 {
            return Err(Truncated {
                field: "tensor table",
                offset: r.offset(),
                needed: count as usize * 4,
                available: r.remaining(),
            }
            .into());
        }
        let mut specs: Vec<(String, Vec<usize>)> = Vec::with_capacity(count as usize);
        let mut total: u64 = 0;
        for _ in 0..count {
            let name_len = r.u16("tensor name length")? as usize;
            let at = r.offset();
            let name_bytes = r.take(name_len, "tensor name")?;
            let name = std::str::from_utf8(name_bytes)
                .map_err(|_| WeightsError::InvalidUtf8 { offset: at })?
                .to_owned();
            check_name(&name)?;
            if let Some((prev, _)) = specs.last()
                && prev.as_bytes() >= name.as_bytes()
            {
                return Err(WeightsError::NotCanonical { name });
            }
            let ndim = r.u8("tensor rank")? as usize;
            if ndim > MAX_NDIM {
                return Err(WeightsError::TooManyDims { name, ndim });
            }
            let mut dims = Vec::with_capacity(ndim);
            for _ in 0..ndim {
                dims.push(r.u64("tensor dimension")?);
            }
            let n = numel(&name, &dims)?;
            total = total.saturating_add(n);
            if total > limits.max_params {
                return Err(WeightsError::TooLarge {
                    what: "parameter count",
                    got: total,
                    max: limits.max_params,
                });
            }
            specs.push((name, dims.into_iter().map(|d| d as usize).collect()));
        }
        Self::from_sorted(specs)
    }

    /// The tensors in canonical order.
    #[must_use]
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    /// Total number of parameters.
    #[must_use]
    pub fn total(&self) -> usize {
        self.total
    }

    /// The tensor table in canonical bytes (as embedded in models and deltas).
    #[must_use]
    pub fn table_bytes(&self) -> &[u8] {
        &self.table
    }

    /// Finds a tensor by name.
    #[must_use]
    pub fn find(&self, name: &str) -> Option<&TensorEntry> {
        self.entries
            .binary_search_by(|e| e.name.as_bytes().cmp(name.as_bytes()))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The tensor holding flat index `i`.
    #[must_use]
    pub fn entry_at(&self, i: usize) -> Option<&TensorEntry> {
        let pos = self.entries.partition_point(|e| e.offset + e.len <= i);
        self.entries.get(pos).filter(|e| e.range().contains(&i))
    }

    /// Checks that `other` has the same tensors and shapes, naming the first difference.
    ///
    /// # Errors
    /// [`WeightsError::LayoutMismatch`] describing the first differing tensor.
    pub fn ensure_same(&self, other: &Layout) -> Result<(), WeightsError> {
        if self.table == other.table {
            return Ok(());
        }
        for (a, b) in self.entries.iter().zip(&other.entries) {
            if a.name != b.name {
                return Err(WeightsError::LayoutMismatch(format!(
                    "expected tensor {:?}, found {:?}",
                    a.name, b.name
                )));
            }
            if a.shape != b.shape {
                return Err(WeightsError::LayoutMismatch(format!(
                    "tensor {:?} has shape {:?}, expected {:?}",
                    a.name, b.shape, a.shape
                )));
            }
        }
        Err(WeightsError::LayoutMismatch(format!(
            "expected {} tensors, found {}",
            self.entries.len(),
            other.entries.len()
        )))
    }
}

/// A model's parameters: finite f32 values in one flat vector, described by a [`Layout`].
#[derive(Clone, PartialEq)]
pub struct Weights {
    layout: Arc<Layout>,
    values: Vec<f32>,
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Weights")
            .field("tensors", &self.layout.entries.len())
            .field("params", &self.layout.total)
            .finish_non_exhaustive()
    }
}

/// Finds the first non-finite value in `values`, reported by tensor.
pub(crate) fn first_non_finite(layout: &Layout, values: &[f32]) -> Option<WeightsError> {
    let i = values.iter().position(|v| !v.is_finite())?;
    let (name, index) = layout
        .entry_at(i)
        .map_or((String::new(), i), |e| (e.name.clone(), i - e.offset));
    Some(WeightsError::NonFinite {
        name,
        index,
        value: values[i],
    })
}

impl Weights {
    /// Builds weights from `(name, shape, values)` triples in any order.
    ///
    /// # Errors
    /// As [`Layout::new`], plus a value count that does not match a shape, or a NaN or
    /// infinite value.
    pub fn from_tensors<I, S>(tensors: I) -> Result<Self, WeightsError>
    where
        I: IntoIterator<Item = (S, Vec<usize>, Vec<f32>)>,
        S: Into<String>,
    {
        let mut items: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
            .into_iter()
            .map(|(n, s, v)| (n.into(), s, v))
            .collect();
        items.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (name, shape, values) in &items {
            let expected = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            if expected != Some(values.len()) {
                return Err(WeightsError::WrongValueCount {
                    name: name.clone(),
                    shape: shape.clone(),
                    expected: expected.unwrap_or(usize::MAX),
                    got: values.len(),
                });
            }
        }
        let layout = Layout::new(items.iter().map(|(n, s, _)| (n.clone(), s.clone())))?;
        let mut flat = Vec::with_capacity(layout.total);
        for (_, _, values) in items {
            flat.extend_from_slice(&values);
        }
        Self::from_flat(Arc::new(layout), flat)
    }

    /// Wraps a flat vector laid out as `layout`.
    ///
    /// # Errors
    /// A length that differs from `layout.total()`, or a non-finite value.
    pub fn from_flat(layout: Arc<Layout>, values: Vec<f32>) -> Result<Self, WeightsError> {
        if values.len() != layout.total {
            return Err(WeightsError::LayoutMismatch(format!(
                "layout has {} parameters, got {} values",
                layout.total,
                values.len()
            )));
        }
        if let Some(e) = first_non_finite(&layout, &values) {
            return Err(e);
        }
        Ok(Self { layout, values })
    }

    /// All-zero weights of the given layout.
    #[must_use]
    pub fn zeros(layout: Arc<Layout>) -> Self {
        let values = vec![0.0; layout.total];
        Self { layout, values }
    }

    /// The layout.
    #[must_use]
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// All values, tensors end to end in canonical order.
    #[must_use]
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Takes the flat values out.
    #[must_use]
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    /// The values of one tensor.
    #[must_use]
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        self.layout.find(name).map(|e| &self.values[e.range()])
    }

    /// Every tensor with its values, in canonical order.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorEntry, &[f32])> {
        self.layout
            .entries
            .iter()
            .map(|e| (e, &self.values[e.range()]))
    }

    /// Size of the canonical bytes.
    #[must_use]
    pub fn canonical_len(&self) -> usize {
        6 + self.layout.table.len() + 4 * self.values.len()
    }

    /// The content hash: SHA-256 over the canonical bytes, computed without building them.
    #[must_use]
    pub fn hash(&self) -> ModelHash {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&WEIGHTS_MAGIC);
        ctx.update(&WEIGHTS_VERSION.to_le_bytes());
        ctx.update(&self.layout.table);
        hash_f32s(&mut ctx, &self.values);
        ModelHash::from_digest(ctx.finish())
    }

    /// The canonical bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.canonical_len());
        out.extend_from_slice(&WEIGHTS_MAGIC);
        out.extend_from_slice(&WEIGHTS_VERSION.to_le_bytes());
        out.extend_from_slice(&self.layout.table);
        put_f32s(&mut out, &self.values);
        out
    }

    /// Streams the canonical bytes to `w` in bounded chunks.
    ///
    /// # Errors
    /// Any error from `w`.
    pub fn write_to(&self, mut w: impl Write) -> io::Result<()> {
        w.write_all(&WEIGHTS_MAGIC)?;
        w.write_all(&WEIGHTS_VERSION.to_le_bytes())?;
        w.write_all(&self.layout.table)?;
        let mut buf = Vec::with_capacity(1 << 20);
        for chunk in self.values.chunks(1 << 18) {
            buf.clear();
            put_f32s(&mut buf, chunk);
            w.write_all(&buf)?;
        }
        Ok(())
    }

    /// Decodes canonical bytes from an untrusted source.
    ///
    /// # Errors
    /// Any structural problem, limit breach, trailing byte or non-finite value.
    pub fn from_bytes(bytes: &[u8], limits: &Limits) -> Result<Self, WeightsError> {
        let mut r = Reader::new(bytes);
        let magic = r.array::<4>("magic")?;
        if magic != WEIGHTS_MAGIC {
            return Err(WeightsError::BadMagic(magic));
        }
        let version = r.u16("version")?;
        if version != WEIGHTS_VERSION {
            return Err(WeightsError::UnsupportedVersion(version));
        }
        let layout = Layout::read_table(&mut r, limits)?;
        let need = layout.total * 4;
        let body = r.take(need, "tensor values")?;
        if r.remaining() != 0 {
            return Err(WeightsError::TrailingBytes(r.remaining()));
        }
        let mut values = Vec::with_capacity(layout.total);
        read_f32s_into(body, &mut values);
        Self::from_flat(Arc::new(layout), values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
        vec![
            (
                "enc.weight",
                vec![2, 3],
                vec![0.5, -1.0, 2.0, 3.5, 0.0, 1e-3],
            ),
            ("enc.bias", vec![2], vec![0.25, -0.25]),
            ("head.weight", vec![1, 2, 1, 1], vec![1.0, 2.0]),
        ]
    }

    #[test]
    fn canonical_order_is_by_name() {
        let w = Weights::from_tensors(sample()).unwrap();
        let names: Vec<_> = w.layout().entries().iter().map(TensorEntry::name).collect();
        assert_eq!(names, ["enc.bias", "enc.weight", "head.weight"]);
        assert_eq!(w.tensor("enc.bias").unwrap(), &[0.25, -0.25]);
        assert_eq!(w.layout().entry_at(2).unwrap().name(), "enc.weight");
        assert_eq!(w.layout().entry_at(8).unwrap().name(), "head.weight");
        assert!(w.layout().entry_at(10).is_none());
    }

    #[test]
    fn hash_ignores_insertion_order() {
        let a = Weights::from_tensors(sample()).unwrap();
        let mut rev = sample();
        rev.reverse();
        let b = Weights::from_tensors(rev).unwrap();
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.to_bytes(), b.to_bytes());
    }

    #[test]
    fn hash_is_sha256_of_canonical_bytes() {
        let w = Weights::from_tensors(sample()).unwrap();
        assert_eq!(w.hash(), ModelHash::of(&w.to_bytes()));
        assert_eq!(w.to_bytes().len(), w.canonical_len());
        let mut streamed = Vec::new();
        w.write_to(&mut streamed).unwrap();
        assert_eq!(streamed, w.to_bytes());
    }

    #[test]
    fn hash_changes_with_any_single_value() {
        let base = Weights::from_tensors(sample()).unwrap();
        let h0 = base.hash();
        for i in 0..base.values().len() {
            let mut v = base.values().to_vec();
            v[i] = f32::from_bits(v[i].to_bits() ^ 1);
            let w = Weights::from_flat(base.layout().clone(), v).unwrap();
            assert_ne!(
                w.hash(),
                h0,
                "flipping the last bit of value {i} must change the hash"
            );
        }
    }

    #[test]
    fn hash_changes_with_a_name_or_a_shape() {
        let h0 = Weights::from_tensors(sample()).unwrap().hash();
        let mut renamed = sample();
        renamed[1].0 = "enc.biaz";
        assert_ne!(Weights::from_tensors(renamed).unwrap().hash(), h0);
        let mut reshaped = sample();
        reshaped[0].1 = vec![3, 2];
        assert_ne!(Weights::from_tensors(reshaped).unwrap().hash(), h0);
        let mut flattened = sample();
        flattened[2].1 = vec![2];
        assert_ne!(Weights::from_tensors(flattened).unwrap().hash(), h0);
    }

    #[test]
    fn rejects_bad_tensors() {
        let mut dup = sample();
        dup[2].0 = "enc.bias";
        dup[2].2 = vec![0.0, 0.0];
        dup[2].1 = vec![2];
        assert!(matches!(
            Weights::from_tensors(dup),
            Err(WeightsError::DuplicateName(_))
        ));
        let mut count = sample();
        count[0].2.pop();
        assert!(matches!(
            Weights::from_tensors(count),
            Err(WeightsError::WrongValueCount { .. })
        ));
        let mut nan = sample();
        nan[0].2[4] = f32::NAN;
        match Weights::from_tensors(nan) {
            Err(WeightsError::NonFinite { name, index, .. }) => {
                assert_eq!((name.as_str(), index), ("enc.weight", 4));
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        let zero_dim = vec![("a", vec![0usize, 3], vec![])];
        assert!(matches!(
            Weights::from_tensors(zero_dim),
            Err(WeightsError::BadShape { .. })
        ));
        let empty_name = vec![("", vec![1usize], vec![1.0f32])];
        assert!(matches!(
            Weights::from_tensors(empty_name),
            Err(WeightsError::BadName { .. })
        ));
    }

    #[test]
    fn decode_rejects_malformed_bytes() {
        let w = Weights::from_tensors(sample()).unwrap();
        let bytes = w.to_bytes();
        let lim = Limits::default();
        assert_eq!(Weights::from_bytes(&bytes, &lim).unwrap(), w);
        for cut in [0, 3, 5, 9, 20, bytes.len() - 1] {
            assert!(
                Weights::from_bytes(&bytes[..cut], &lim).is_err(),
                "cut at {cut}"
            );
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            Weights::from_bytes(&trailing, &lim),
            Err(WeightsError::TrailingBytes(1))
        );
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(matches!(
            Weights::from_bytes(&magic, &lim),
            Err(WeightsError::BadMagic(_))
        ));
        let mut nan = bytes.clone();
        let at = nan.len() - 4;
        nan[at..].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert!(matches!(
            Weights::from_bytes(&nan, &lim),
            Err(WeightsError::NonFinite { .. })
        ));
        let small = Limits {
            max_tensors: 2,
            ..Limits::default()
        };
        assert!(matches!(
            Weights::from_bytes(&bytes, &small),
            Err(WeightsError::TooLarge {
                what: "tensor count",
                ..
            })
        ));
        let few = Limits {
            max_params: 4,
            ..Limits::default()
        };
        assert!(matches!(
            Weights::from_bytes(&bytes, &few),
            Err(WeightsError::TooLarge {
                what: "parameter count",
                ..
            })
        ));
    }

    #[test]
    fn decode_rejects_unsorted_and_huge_counts_without_allocating() {
        // A table claiming 4 billion tensors in a 20-byte input.
        let mut huge = Vec::new();
        huge.extend_from_slice(&WEIGHTS_MAGIC);
        huge.extend_from_slice(&WEIGHTS_VERSION.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 10]);
        let lim = Limits {
            max_tensors: u32::MAX,
            max_params: u64::MAX,
        };
        assert!(matches!(
            Weights::from_bytes(&huge, &lim),
            Err(WeightsError::Truncated(_))
        ));
        // A tensor with dims multiplying past u32::MAX.
        let mut big = Vec::new();
        big.extend_from_slice(&WEIGHTS_MAGIC);
        big.extend_from_slice(&WEIGHTS_VERSION.to_le_bytes());
        big.extend_from_slice(&1u32.to_le_bytes());
        big.extend_from_slice(&1u16.to_le_bytes());
        big.push(b'a');
        big.push(2);
        big.extend_from_slice(&(1u64 << 20).to_le_bytes());
        big.extend_from_slice(&(1u64 << 20).to_le_bytes());
        assert!(matches!(
            Weights::from_bytes(&big, &lim),
            Err(WeightsError::BadShape { .. })
        ));
    }

    proptest! {
        #[test]
        fn canonical_bytes_round_trip(values in proptest::collection::vec(-1e6f32..1e6, 1..64)) {
            let n = values.len();
            let w = Weights::from_tensors([("t", vec![n], values)]).unwrap();
            let back = Weights::from_bytes(&w.to_bytes(), &Limits::default()).unwrap();
            prop_assert_eq!(back.hash(), w.hash());
            prop_assert_eq!(back, w);
        }
    }
}
