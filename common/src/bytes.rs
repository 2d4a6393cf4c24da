//! A bounds-checked little-endian reader for untrusted byte strings.
//!
//! Every read names the field it was reading, so that a decoder's error says what was
//! truncated and where, and nothing is allocated from a length that was not first
//! checked against the bytes actually present.

/// Not enough bytes were left to read a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("truncated input: {field} needs {needed} bytes at offset {offset}, only {available} left")]
pub struct Truncated {
    /// The field being read.
    pub field: &'static str,
    /// Byte offset of the field.
    pub offset: usize,
    /// Bytes the field needs.
    pub needed: usize,
    /// Bytes that were left.
    pub available: usize,
}

/// A cursor over untrusted bytes.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The rest of the input, consuming it.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Truncated> {
        if n > self.remaining() {
            return Err(Truncated {
                field,
                offset: self.pos,
                needed: n,
                available: self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], Truncated> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, Truncated> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, Truncated> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, Truncated> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, Truncated> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
}

/// Appends `values` as little-endian f32 bytes.
pub(crate) fn put_f32s(out: &mut Vec<u8>, values: &[f32]) {
    #[cfg(target_endian = "little")]
    out.extend_from_slice(bytemuck::cast_slice(values));
    #[cfg(not(target_endian = "little"))]
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Feeds `values` as little-endian f32 bytes into a running SHA-256.
pub(crate) fn hash_f32s(ctx: &mut ring::digest::Context, values: &[f32]) {
    #[cfg(target_endian = "little")]
    ctx.update(bytemuck::cast_slice(values));
    #[cfg(not(target_endian = "little"))]
    for chunk in values.chunks(4096) {
        let mut buf = Vec::with_capacity(chunk.len() * 4);
        put_f32s(&mut buf, chunk);
        ctx.update(&buf);
    }
}

/// Decodes little-endian f32 bytes (length a multiple of 4) into `out`.
pub(crate) fn read_f32s_into(bytes: &[u8], out: &mut Vec<f32>) {
    debug_assert_eq!(bytes.len() % 4, 0);
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reports_field_and_offset_on_truncation() {
        let mut r = Reader::new(&[1, 0, 2]);
        assert_eq!(r.u16("count").unwrap(), 1);
        let err = r.u32("length").unwrap_err();
        assert_eq!(
            err,
            Truncated {
                field: "length",
                offset: 2,
                needed: 4,
                available: 1
            }
        );
    }

    #[test]
    fn f32_bytes_round_trip() {
        let v = [1.5f32, -0.0, 3.25e-7];
        let mut b = Vec::new();
        put_f32s(&mut b, &v);
        assert_eq!(&b[..4], &1.5f32.to_le_bytes());
        let mut back = Vec::new();
        read_f32s_into(&b, &mut back);
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}
