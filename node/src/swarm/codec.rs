//! The `/cellswarm/sync/1` request-response codec.
//!
//! ```text
//! request   len u32 LE (<= 64 KiB)              | control message (wire::Request)
//! response  len u64 LE (<= net.max_message_bytes) | frame (ResponseHeader + body)
//! ```
//!
//! Lengths are checked against the limits before anything is allocated, and a stream
//! that ends early is an error. Bytes read and written are counted for the metrics.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellswarm_common::wire::{
    Request, ResponseHeader, decode_control, encode_control, frame_head_len, request_len,
    response_len,
};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;

pub use cellswarm_common::wire::MAX_REQUEST_BYTES;

/// A response: a control header and raw bytes (an envelope or a model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncResponse {
    /// What the body holds.
    pub header: ResponseHeader,
    /// The bytes (shared, so a node can serve one buffer to many peers).
    pub body: bytes::Bytes,
}

impl SyncResponse {
    /// A response without a body.
    #[must_use]
    pub fn empty(header: ResponseHeader) -> Self {
        Self {
            header,
            body: bytes::Bytes::new(),
        }
    }
}

/// Bytes moved through the codec.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Bytes sent.
    pub bytes_out: AtomicU64,
    /// Messages refused for being over a limit.
    pub oversize: AtomicU64,
    /// Peers disconnected for repeated protocol violations.
    pub abusive_disconnects: AtomicU64,
    /// Gossip messages and requests dropped because the engine's queue was full.
    pub events_dropped: AtomicU64,
    capture: Option<Mutex<std::fs::File>>,
}

/// What a captured message was (the first byte of its capture record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Sent {
    /// A request, as written to the stream.
    Request = 1,
    /// A response, as written to the stream.
    Response = 2,
    /// A gossip announcement (the signed envelope handed to gossipsub).
    Gossip = 3,
}

impl Traffic {
    /// Counters that also append every message sent to `path` (`net.capture_sent`):
    /// records of `kind u8 | len u64 LE | bytes`.
    ///
    /// # Errors
    /// The file cannot be created or opened for appending.
    pub fn with_capture(path: &std::path::Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            capture: Some(Mutex::new(file)),
            ..Self::default()
        })
    }

    /// Appends one sent message to the capture file, if capturing.
    pub fn capture(&self, kind: Sent, parts: &[&[u8]]) {
        use std::io::Write as _;
        let Some(file) = &self.capture else {
            return;
        };
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut rec = Vec::with_capacity(9 + len);
        rec.push(kind as u8);
        rec.extend_from_slice(&(len as u64).to_le_bytes());
        for p in parts {
            rec.extend_from_slice(p);
        }
        let mut f = file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = f.write_all(&rec) {
            tracing::error!(error = %e, "could not append to net.capture_sent");
        }
    }
}

/// The codec, with its limits and traffic counters.
#[derive(Debug, Clone)]
pub struct SyncCodec {
    max_response: u64,
    traffic: Arc<Traffic>,
}

impl SyncCodec {
    /// A codec accepting responses up to `max_response` bytes.
    #[must_use]
    pub fn new(max_response: u64, traffic: Arc<Traffic>) -> Self {
        Self {
            max_response,
            traffic,
        }
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Buffer reserved up front for a message; the rest grows as bytes actually arrive, so a
/// peer that declares a large message and sends it slowly (or never) costs no more memory
/// than it has sent.
const PREALLOC: usize = 1 << 20;

async fn read_exact_counted<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    len: usize,
    traffic: &Traffic,
) -> io::Result<Vec<u8>> {
    // Grows (doubling, never past `len`) only as bytes arrive, so the final buffer has
    // exactly the declared size and a stalled sender holds at most twice what it sent.
    let mut buf: Vec<u8> = Vec::new();
    let mut filled = 0usize;
    while filled < len {
        if filled == buf.len() {
            let grow = buf.len().max(PREALLOC).min(len - filled);
            buf.resize(filled + grow, 0);
        }
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            traffic.bytes_in.fetch_add(filled as u64, Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the stream ended after {filled} of {len} declared bytes"),
            ));
        }
        filled += n;
    }
    traffic.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
    Ok(buf)
}

/// A request as read from an inbound stream: the request, or how the peer broke the
/// protocol. Violations are handed to the network layer (which knows the peer, unlike
/// the codec) so that it can count them and disconnect an abusive peer; the stream is
/// dropped unanswered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A well-formed request.
    Request(Request),
    /// Oversized, malformed, or not sent within [`REQUEST_READ_TIMEOUT`].
    Violation(String),
}

/// Time a peer has to send a whole request (at most 64 KiB) once it opened a stream.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);

impl SyncCodec {
    async fn read_request_inner<T>(&self, io: &mut T) -> io::Result<Inbound>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut prefix = [0u8; 4];
        io.read_exact(&mut prefix).await?;
        let len = match request_len(prefix) {
            Ok(len) => len,
            Err(e) => {
                self.traffic.oversize.fetch_add(1, Ordering::Relaxed);
                return Ok(Inbound::Violation(e.to_string()));
            }
        };
        let bytes = read_exact_counted(io, len, &self.traffic).await?;
        Ok(match decode_control(&bytes) {
            Ok(r) => Inbound::Request(r),
            Err(e) => Inbound::Violation(format!("malformed request: {e}")),
        })
    }
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = Inbound;
    type Response = SyncResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Inbound>
    where
        T: AsyncRead + Unpin + Send,
    {
        // Under the node's tokio runtime a slow sender is cut off; elsewhere (unit
        // tests on a plain executor) there is no timer to do so.
        if tokio::runtime::Handle::try_current().is_ok() {
            match tokio::time::timeout(REQUEST_READ_TIMEOUT, self.read_request_inner(io)).await {
                Ok(r) => r,
                Err(_) => Ok(Inbound::Violation(format!(
                    "request not sent within {REQUEST_READ_TIMEOUT:?}"
                ))),
            }
        } else {
            self.read_request_inner(io).await
        }
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut prefix = [0u8; 8];
        io.read_exact(&mut prefix).await?;
        let len = response_len(prefix, self.max_response).map_err(|e| {
            self.traffic.oversize.fetch_add(1, Ordering::Relaxed);
            invalid(format!("{e} (net.max_message_bytes)"))
        })?;
        // The frame's header first, then its body straight into a buffer of its own
        // (no copy to drop the header from the front of a body that may be a model).
        let mut head_prefix = [0u8; 4];
        if len < head_prefix.len() {
            return Err(invalid(format!(
                "a response of {len} bytes has no frame header"
            )));
        }
        io.read_exact(&mut head_prefix).await?;
        self.traffic.bytes_in.fetch_add(4, Ordering::Relaxed);
        let head_len = frame_head_len(head_prefix, len).map_err(|e| invalid(e.to_string()))?;
        let head = read_exact_counted(io, head_len, &self.traffic).await?;
        let header: ResponseHeader = decode_control(&head).map_err(|e| invalid(e.to_string()))?;
        let body_len = len - 4 - head_len;
        let limit = header.body_limit(self.max_response);
        if body_len as u64 > limit {
            self.traffic.oversize.fetch_add(1, Ordering::Relaxed);
            return Err(invalid(format!(
                "a {} response declares a body of {body_len} bytes, the most it may carry is {limit}",
                header.kind()
            )));
        }
        let body = read_exact_counted(io, body_len, &self.traffic).await?;
        Ok(SyncResponse {
            header,
            body: body.into(),
        })
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Inbound,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let Inbound::Request(req) = req else {
            return Err(invalid("a protocol violation is not a request to send"));
        };
        let bytes = encode_control(&req).map_err(|e| invalid(e.to_string()))?;
        let len = (bytes.len() as u32).to_le_bytes();
        self.traffic.capture(Sent::Request, &[&len, &bytes]);
        io.write_all(&len).await?;
        io.write_all(&bytes).await?;
        self.traffic
            .bytes_out
            .fetch_add(4 + bytes.len() as u64, Ordering::Relaxed);
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: SyncResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        // The frame (`u32 header length | header | body`) is written in parts: the body,
        // often a whole model or delta, is not copied into a new buffer.
        let head = encode_control(&res.header).map_err(|e| invalid(e.to_string()))?;
        let head_len = (head.len() as u32).to_le_bytes();
        let frame_len = 4 + head.len() as u64 + res.body.len() as u64;
        let len = frame_len.to_le_bytes();
        self.traffic
            .capture(Sent::Response, &[&len, &head_len, &head, &res.body]);
        io.write_all(&len).await?;
        io.write_all(&head_len).await?;
        io.write_all(&head).await?;
        io.write_all(&res.body).await?;
        self.traffic
            .bytes_out
            .fetch_add(8 + frame_len, Ordering::Relaxed);
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellswarm_common::ids::RoundId;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

    fn proto() -> StreamProtocol {
        StreamProtocol::new(cellswarm_common::protocol::SYNC_PROTOCOL)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let mut c = SyncCodec::new(1 << 20, Arc::default());
        let mut buf = Cursor::new(Vec::new());
        block_on(c.write_request(
            &proto(),
            &mut buf,
            Inbound::Request(Request::Record(RoundId(4))),
        ))
        .unwrap();
        let mut rd = Cursor::new(buf.into_inner());
        assert_eq!(
            block_on(c.read_request(&proto(), &mut rd)).unwrap(),
            Inbound::Request(Request::Record(RoundId(4)))
        );
        let resp = SyncResponse {
            header: ResponseHeader::Model,
            body: vec![7; 1000].into(),
        };
        let mut buf = Cursor::new(Vec::new());
        block_on(c.write_response(&proto(), &mut buf, resp.clone())).unwrap();
        let mut rd = Cursor::new(buf.into_inner());
        assert_eq!(block_on(c.read_response(&proto(), &mut rd)).unwrap(), resp);
    }

    #[test]
    fn oversize_and_truncated_frames_are_refused_before_allocating() {
        let traffic = Arc::new(Traffic::default());
        let mut c = SyncCodec::new(1000, traffic.clone());
        // A response header declaring 2^60 bytes.
        let mut rd = Cursor::new((1u64 << 60).to_le_bytes().to_vec());
        let err = block_on(c.read_response(&proto(), &mut rd)).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        let mut rd = Cursor::new(u32::MAX.to_le_bytes().to_vec());
        assert!(matches!(
            block_on(c.read_request(&proto(), &mut rd)),
            Ok(Inbound::Violation(m)) if m.contains("exceeds")
        ));
        assert_eq!(traffic.oversize.load(Ordering::Relaxed), 2);
        // Declares 100 bytes, delivers 3.
        let mut short = 100u64.to_le_bytes().to_vec();
        short.extend_from_slice(&[1, 2, 3]);
        assert!(block_on(c.read_response(&proto(), &mut Cursor::new(short))).is_err());
        // Garbage of the declared length.
        let mut junk = 5u32.to_le_bytes().to_vec();
        junk.extend_from_slice(&[9; 5]);
        assert!(matches!(
            block_on(c.read_request(&proto(), &mut Cursor::new(junk))),
            Ok(Inbound::Violation(m)) if m.contains("malformed")
        ));
        // A request cut short is an I/O error (the peer went away), not a violation.
        let mut cut = 50u32.to_le_bytes().to_vec();
        cut.extend_from_slice(&[1; 10]);
        assert!(block_on(c.read_request(&proto(), &mut Cursor::new(cut))).is_err());
    }

    #[test]
    fn a_response_body_is_bounded_by_what_its_header_says_it_is() {
        let traffic = Arc::new(Traffic::default());
        let mut c = SyncCodec::new(8 << 20, traffic.clone());
        let write = |c: &mut SyncCodec, header: ResponseHeader, body: Vec<u8>| {
            let mut buf = Cursor::new(Vec::new());
            block_on(c.write_response(
                &proto(),
                &mut buf,
                SyncResponse {
                    header,
                    body: body.into(),
                },
            ))
            .unwrap();
            buf.into_inner()
        };
        // A record of 2 MiB: refused once its header is read, before the body is.
        let big = write(&mut c, ResponseHeader::Record, vec![1; 2 << 20]);
        let err = block_on(c.read_response(&proto(), &mut Cursor::new(big))).unwrap_err();
        assert!(err.to_string().contains("Record response"), "{err}");
        // "Not found" with a body.
        let odd = write(&mut c, ResponseHeader::NotFound, vec![1; 10]);
        assert!(block_on(c.read_response(&proto(), &mut Cursor::new(odd))).is_err());
        assert_eq!(traffic.oversize.load(Ordering::Relaxed), 2);
        // A model of the same 2 MiB passes, and so does a record of a few hundred bytes.
        for (h, n) in [
            (ResponseHeader::Model, 2 << 20),
            (ResponseHeader::Record, 300),
        ] {
            let ok = write(&mut c, h.clone(), vec![2; n]);
            let r = block_on(c.read_response(&proto(), &mut Cursor::new(ok))).unwrap();
            assert_eq!((r.header, r.body.len()), (h, n));
        }
    }

    /// Sends its bytes, then stalls forever.
    struct Stall(Vec<u8>);

    impl AsyncRead for Stall {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            if self.0.is_empty() {
                return std::task::Poll::Pending;
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_trickled_too_slowly_is_a_violation() {
        // Declares 100 bytes, sends 10, then nothing.
        let mut bytes = 100u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1; 10]);
        let mut c = SyncCodec::new(1000, Arc::default());
        let got = c.read_request(&proto(), &mut Stall(bytes)).await.unwrap();
        assert!(matches!(got, Inbound::Violation(m) if m.contains("not sent within")));
    }
}
