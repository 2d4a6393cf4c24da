//! The daemon's HTTP status endpoint (axum; bound to loopback by default).
//!
//! - `GET /status`: JSON — PeerId, round, phase, model hash, connected members (and
//!   whether each is reached directly or through a relay), the last merge record, rounds
//!   completed, and the rejection counters.
//! - `GET /metrics`: the Prometheus text format (see [`Metrics::prometheus`]).
//!
//! Nothing here reads data or the store: it serves the engine's published snapshot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::swarm::codec::Traffic;
use crate::swarm::network::{LinkPath, Links};
use crate::swarm::status::{Metrics, Status};

#[derive(Clone)]
struct Shared {
    status: watch::Receiver<Status>,
    metrics: Arc<Metrics>,
    traffic: Arc<Traffic>,
    links: Arc<Links>,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
struct StatusDoc {
    #[serde(flatten)]
    status: Status,
    deltas_accepted: u64,
    rejected: std::collections::BTreeMap<String, u64>,
    bytes_in: u64,
    bytes_out: u64,
    /// Every connected peer (members and relays) and whether it is reached directly or
    /// only through a relay.
    links: std::collections::BTreeMap<String, LinkPath>,
    /// Our addresses a member confirmed reachable from outside (AutoNAT); empty behind
    /// NAT.
    reachable: Vec<String>,
    /// Bytes received and sent over relayed connections.
    relayed_bytes_in: u64,
    relayed_bytes_out: u64,
}

async fn get_status(State(s): State<Shared>) -> impl IntoResponse {
    let (relayed_bytes_in, relayed_bytes_out) = s.links.relayed_bytes();
    let doc = StatusDoc {
        status: s.status.borrow().clone(),
        deltas_accepted: s.metrics.deltas_accepted.load(Ordering::Relaxed),
        rejected: s
            .metrics
            .rejections()
            .into_iter()
            .map(|(k, v)| (k.as_str().to_owned(), v))
            .collect(),
        bytes_in: s.traffic.bytes_in.load(Ordering::Relaxed),
        bytes_out: s.traffic.bytes_out.load(Ordering::Relaxed),
        links: s.links.paths(),
        reachable: s
            .links
            .reachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(ToString::to_string)
            .collect(),
        relayed_bytes_in,
        relayed_bytes_out,
    };
    axum::Json(doc)
}

async fn get_metrics(State(s): State<Shared>) -> impl IntoResponse {
    let round = s.status.borrow().round;
    let mut body = s.metrics.prometheus(
        s.traffic.bytes_in.load(Ordering::Relaxed),
        s.traffic.bytes_out.load(Ordering::Relaxed),
        round,
    );
    body.push_str(&format!(
        "# HELP cellswarm_abusive_disconnects_total Peers disconnected and refused for a while after repeated protocol violations.\n\
         # TYPE cellswarm_abusive_disconnects_total counter\ncellswarm_abusive_disconnects_total {}\n\
         # HELP cellswarm_oversize_total Messages refused for declaring more bytes than the limit.\n\
         # TYPE cellswarm_oversize_total counter\ncellswarm_oversize_total {}\n\
         # HELP cellswarm_net_events_dropped_total Gossip messages and requests dropped because the engine was busy.\n\
         # TYPE cellswarm_net_events_dropped_total counter\ncellswarm_net_events_dropped_total {}\n",
        s.traffic.abusive_disconnects.load(Ordering::Relaxed),
        s.traffic.oversize.load(Ordering::Relaxed),
        s.traffic.events_dropped.load(Ordering::Relaxed),
    ));
    body.push_str(&s.links.prometheus());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Binds `addr` and serves until `cancel` fires.
///
/// # Errors
/// An address that cannot be bound (in use, not local).
pub async fn serve(
    addr: SocketAddr,
    status: watch::Receiver<Status>,
    metrics: Arc<Metrics>,
    traffic: Arc<Traffic>,
    links: Arc<Links>,
    cancel: CancellationToken,
) -> Result<impl Future<Output = ()> + Send + use<>, std::io::Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "status endpoint listening (GET /status, GET /metrics)");
    let app = Router::new()
        .route("/status", get(get_status))
        .route("/metrics", get(get_metrics))
        .with_state(Shared {
            status,
            metrics,
            traffic,
            links,
        });
    Ok(async move {
        let stop = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "status endpoint failed");
        }
    })
}

/// Why `cellswarm status` got no answer from a node.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The endpoint is not `http://HOST:PORT`.
    #[error("{0}: expected http://HOST:PORT")]
    Endpoint(String),
    /// No connection.
    #[error("connecting to {endpoint}: {error} (is the node running with [status] enabled?)")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        error: std::io::Error,
    },
    /// The connection failed while asking or reading.
    #[error("talking to {endpoint}: {error}")]
    Io {
        /// The endpoint.
        endpoint: String,
        /// Why.
        error: std::io::Error,
    },
    /// An answer that is not HTTP, or not 200.
    #[error("{url}: {what}")]
    Status {
        /// The endpoint and path.
        url: String,
        /// The status line, or what was wrong.
        what: String,
    },
}

/// Fetches `path` from a status endpoint at `endpoint` (`http://host:port`) with a plain
/// HTTP/1.0 request, returning the body. Used by `cellswarm status`.
///
/// # Errors
/// A malformed endpoint, a connection failure, or a non-200 answer.
pub fn fetch(endpoint: &str, path: &str) -> Result<String, FetchError> {
    use std::io::{Read, Write};
    let hostport = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| FetchError::Endpoint(endpoint.to_owned()))?
        .trim_end_matches('/');
    let mut stream =
        std::net::TcpStream::connect(hostport).map_err(|error| FetchError::Connect {
            endpoint: endpoint.to_owned(),
            error,
        })?;
    let io = |error| FetchError::Io {
        endpoint: endpoint.to_owned(),
        error,
    };
    let timeout = Some(std::time::Duration::from_secs(10));
    stream.set_read_timeout(timeout).map_err(io)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").map_err(io)?;
    let mut raw = Vec::new();
    stream.take(16 << 20).read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let status = |what: &str| FetchError::Status {
        url: format!("{endpoint}{path}"),
        what: what.to_owned(),
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| status("not an HTTP response"))?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        return Err(status(status_line));
    }
    Ok(body.to_owned())
}
