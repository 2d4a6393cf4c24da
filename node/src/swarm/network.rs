//! The libp2p side of a node: the composed [`CellswarmBehaviour`], the event loop that
//! owns the swarm, and the [`NetClient`] the rest of the node talks to.
//!
//! Transport: TCP with Noise and Yamux, plus QUIC. Only consortium members may connect
//! (an allow list of their PeerIds), connections are capped per peer and in total, and
//! idle connections live long enough to span rounds. Gossipsub carries small signed
//! announcements on `cellswarm/round/v1`; request-response (`/cellswarm/sync/1`, see
//! [`super::codec`]) carries deltas, models and merge records.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cellswarm_common::config::NetConfig;
use cellswarm_common::protocol::{AGENT, IDENTIFY_PROTOCOL, ROUND_TOPIC, SYNC_PROTOCOL};
use cellswarm_common::wire::Request;
use libp2p::core::ConnectedPoint;
use libp2p::futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::ConnectionId;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, autonat, connection_limits, dcutr,
    identify, noise, ping, relay, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::codec::{Inbound, Sent, SyncCodec, SyncResponse, Traffic};

/// Largest gossip message (announcements are a few hundred bytes).
pub const MAX_GOSSIP_BYTES: usize = 16 * 1024;

/// What went wrong in the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Building the transport or behaviour failed.
    #[error("starting libp2p: {0}")]
    Setup(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {message}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        message: String,
    },
    /// A request failed (peer gone, timeout, protocol error).
    #[error("request to {peer} failed: {message}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// Why.
        message: String,
    },
    /// The event loop has stopped.
    #[error("the network has shut down")]
    Closed,
}

/// The composed behaviour (in its own module: the derive generates an event enum
/// with one variant per field, which cannot carry doc comments).
mod behaviour {
    #![allow(missing_docs, missing_debug_implementations)]

    use libp2p::swarm::NetworkBehaviour;
    use libp2p::swarm::behaviour::toggle::Toggle;
    use libp2p::{
        allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, ping, relay,
        request_response,
    };

    use super::SyncCodec;

    /// The composed behaviour of a node.
    #[derive(NetworkBehaviour)]
    pub struct CellswarmBehaviour {
        /// Refuses every peer that is not a consortium member.
        pub allowlist: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
        /// Caps connections.
        pub limits: connection_limits::Behaviour,
        /// Signed round announcements.
        pub gossipsub: gossipsub::Behaviour,
        /// Deltas, models and merge records.
        pub sync: request_response::Behaviour<SyncCodec>,
        /// Addresses and versions of peers.
        pub identify: identify::Behaviour,
        /// Liveness.
        pub ping: ping::Behaviour,
        /// Serves as a relay for members (`[net] relay = true`).
        pub relay_server: Toggle<relay::Behaviour>,
        /// Reserves slots on the consortium's relays and dials through them.
        pub relay_client: relay::client::Behaviour,
        /// Upgrades relayed connections to direct ones by hole punching.
        pub dcutr: dcutr::Behaviour,
        /// Asks members whether our addresses are reachable from outside.
        pub autonat_client: autonat::v2::client::Behaviour,
        /// Answers members' reachability probes.
        pub autonat_server: autonat::v2::server::Behaviour,
    }
}

pub use behaviour::{CellswarmBehaviour, CellswarmBehaviourEvent};

/// What the network reports to the node.
#[derive(Debug)]
pub enum NetEvent {
    /// A gossip message; answer with [`NetClient::validate`].
    Gossip {
        /// The member that forwarded it to us.
        source: PeerId,
        /// Gossipsub's id (for the validation report).
        id: MessageId,
        /// The message bytes (an announcement envelope).
        data: Vec<u8>,
    },
    /// A peer asks for something; answer with [`NetClient::respond`].
    Inbound {
        /// The member asking.
        peer: PeerId,
        /// What it asks for.
        request: Request,
        /// Where the answer goes.
        channel: ResponseChannel<SyncResponse>,
    },
    /// A member connected.
    Connected(PeerId),
    /// A member's last connection closed.
    Disconnected(PeerId),
    /// A listen address is ready.
    Listening(Multiaddr),
}

#[derive(Debug)]
enum Command {
    Publish {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<SyncResponse, NetError>>,
    },
    Respond {
        channel: ResponseChannel<SyncResponse>,
        response: SyncResponse,
    },
    Validate {
        id: MessageId,
        source: PeerId,
        accept: MessageAcceptance,
    },
    Dial(Multiaddr),
    Disconnect(PeerId),
    Connected {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Listeners {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
}

/// Requests this node has in flight to one peer at most; more wait for a slot. A record
/// that names many deltas, or a catch-up, asks one member for them a few at a time
/// instead of all at once, and a peer that stalls holds only its own slots.
pub const REQUESTS_PER_PEER: usize = 8;

/// The request slots of each peer.
#[derive(Debug, Default)]
struct PeerSlots(std::sync::Mutex<HashMap<PeerId, Arc<tokio::sync::Semaphore>>>);

impl PeerSlots {
    fn of(&self, peer: PeerId) -> Arc<tokio::sync::Semaphore> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            map.entry(peer)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(REQUESTS_PER_PEER))),
        )
    }
}

/// How this node reaches its peers: direct or through a relay (for /status and
/// /metrics), and what hole punching and the relays did.
#[derive(Debug, Default)]
pub struct Links {
    peers: std::sync::Mutex<HashMap<PeerId, HashMap<ConnectionId, bool>>>,
    /// Connections established through a relay, ever.
    pub relayed_connections: AtomicU64,
    /// Relayed connections upgraded to direct ones by hole punching.
    pub holepunch_ok: AtomicU64,
    /// Hole punches that failed (the pair stays relayed).
    pub holepunch_failed: AtomicU64,
    /// Reservations a relay accepted for us (renewals included).
    pub reservations: AtomicU64,
    /// As a relay: reservations accepted for members.
    pub reservations_served: AtomicU64,
    /// As a relay: circuits opened between members.
    pub circuits_served: AtomicU64,
    /// As a relay: reservations or circuits refused.
    pub relay_refused: AtomicU64,
    /// Addresses of ours that a member confirmed reachable (AutoNAT).
    pub reachable: std::sync::Mutex<Vec<Multiaddr>>,
    /// libp2p's byte counters per transport stack (relayed stacks hold `p2p-circuit`).
    bandwidth: std::sync::OnceLock<prometheus_client::registry::Registry>,
}

/// How a peer is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkPath {
    /// At least one direct connection.
    Direct,
    /// Only through a relay.
    Relayed,
}

impl Links {
    fn opened(&self, peer: PeerId, id: ConnectionId, relayed: bool) {
        if relayed {
            self.relayed_connections.fetch_add(1, Ordering::Relaxed);
        }
        self.lock().entry(peer).or_default().insert(id, relayed);
    }

    fn closed(&self, peer: PeerId, id: ConnectionId) {
        let mut map = self.lock();
        if let Some(c) = map.get_mut(&peer) {
            c.remove(&id);
            if c.is_empty() {
                map.remove(&peer);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, HashMap<ConnectionId, bool>>> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every connected peer and how it is reached, by PeerId.
    #[must_use]
    pub fn paths(&self) -> std::collections::BTreeMap<String, LinkPath> {
        self.lock()
            .iter()
            .map(|(p, c)| {
                let path = if c.values().any(|relayed| !relayed) {
                    LinkPath::Direct
                } else {
                    LinkPath::Relayed
                };
                (p.to_string(), path)
            })
            .collect()
    }

    /// libp2p's bandwidth counters in the Prometheus text format
    /// (`libp2p_bandwidth_bytes_total{protocols=...,direction=...}`).
    #[must_use]
    pub fn bandwidth_text(&self) -> String {
        let mut out = String::new();
        if let Some(r) = self.bandwidth.get() {
            let _ = prometheus_client::encoding::text::encode_registry(&mut out, r);
        }
        out
    }

    /// Bytes in and out over relayed connections (through a relay's circuits).
    #[must_use]
    pub fn relayed_bytes(&self) -> (u64, u64) {
        relayed_bytes(&self.bandwidth_text())
    }

    /// The Prometheus lines of these counters.
    #[must_use]
    pub fn prometheus(&self) -> String {
        let paths = self.paths();
        let direct = paths.values().filter(|p| **p == LinkPath::Direct).count();
        let relayed = paths.len() - direct;
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# HELP cellswarm_peers Connected peers by path.\n# TYPE cellswarm_peers gauge\n\
             cellswarm_peers{{path=\"direct\"}} {direct}\ncellswarm_peers{{path=\"relayed\"}} {relayed}\n\
             # HELP cellswarm_relayed_connections_total Connections established through a relay.\n\
             # TYPE cellswarm_relayed_connections_total counter\ncellswarm_relayed_connections_total {}\n\
             # HELP cellswarm_holepunch_total Hole punches (DCUtR) by result.\n# TYPE cellswarm_holepunch_total counter\n\
             cellswarm_holepunch_total{{result=\"ok\"}} {}\ncellswarm_holepunch_total{{result=\"failed\"}} {}\n\
             # HELP cellswarm_relay_reservations_total Reservations relays accepted for this node.\n\
             # TYPE cellswarm_relay_reservations_total counter\ncellswarm_relay_reservations_total {}\n\
             # HELP cellswarm_relay_served_total As a relay: reservations and circuits served for members, and requests refused.\n\
             # TYPE cellswarm_relay_served_total counter\ncellswarm_relay_served_total{{kind=\"reservation\"}} {}\n\
             cellswarm_relay_served_total{{kind=\"circuit\"}} {}\ncellswarm_relay_served_total{{kind=\"refused\"}} {}\n",
            c(&self.relayed_connections),
            c(&self.holepunch_ok),
            c(&self.holepunch_failed),
            c(&self.reservations),
            c(&self.reservations_served),
            c(&self.circuits_served),
            c(&self.relay_refused),
        ) + &{
            let bandwidth = self.bandwidth_text();
            let (rin, rout) = relayed_bytes(&bandwidth);
            format!(
                "# HELP cellswarm_relayed_bytes_total Bytes over relayed connections.\n\
                 # TYPE cellswarm_relayed_bytes_total counter\n\
                 cellswarm_relayed_bytes_total{{direction=\"in\"}} {rin}\n\
                 cellswarm_relayed_bytes_total{{direction=\"out\"}} {rout}\n{bandwidth}"
            )
        }
    }
}

/// Sums libp2p's bandwidth counters (`text`, the Prometheus text format) over the
/// transport stacks that go through a relay: `(inbound, outbound)` bytes. The side that
/// dialled through a relay labels its connection with the circuit address
/// (`.../p2p-circuit/p2p`); the side that was dialled sees only the dialler's PeerId
/// (`/p2p`), which no direct connection has.
fn relayed_bytes(text: &str) -> (u64, u64) {
    let (mut inb, mut outb) = (0u64, 0u64);
    for line in text.lines() {
        let relayed = line.contains("p2p-circuit") || line.contains("{protocols=\"/p2p\",");
        if !line.starts_with("libp2p_bandwidth_bytes_total{") || !relayed {
            continue;
        }
        let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if line.contains("direction=\"Inbound\"") {
            inb += v as u64;
        } else if line.contains("direction=\"Outbound\"") {
            outb += v as u64;
        }
    }
    (inb, outb)
}

/// A cloneable handle to the event loop.
#[derive(Debug, Clone)]
pub struct NetClient {
    commands: mpsc::Sender<Command>,
    local: PeerId,
    traffic: Arc<Traffic>,
    slots: Arc<PeerSlots>,
    links: Arc<Links>,
}

impl NetClient {
    /// This node's PeerId.
    #[must_use]
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Bytes through the sync protocol.
    #[must_use]
    pub fn traffic(&self) -> &Arc<Traffic> {
        &self.traffic
    }

    /// How peers are reached (direct or relayed).
    #[must_use]
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }

    async fn send(&self, c: Command) -> Result<(), NetError> {
        self.commands.send(c).await.map_err(|_| NetError::Closed)
    }

    /// Publishes bytes on the round topic.
    ///
    /// # Errors
    /// Gossipsub refusals (no peers yet, duplicate) or a closed loop.
    pub async fn publish(&self, data: Vec<u8>) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.traffic.capture(Sent::Gossip, &[&data]);
        self.send(Command::Publish { data, reply }).await?;
        rx.await.map_err(|_| NetError::Closed)?
    }

    /// Sends a request and waits for the response.
    ///
    /// # Errors
    /// [`NetError::Request`] when the peer fails, times out or is unreachable.
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<SyncResponse, NetError> {
        // Held until the answer (or the failure) is back: at most REQUESTS_PER_PEER.
        let _slot = self
            .slots
            .of(peer)
            .acquire_owned()
            .await
            .map_err(|_| NetError::Closed)?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Closed)?
    }

    /// Answers an inbound request.
    pub async fn respond(&self, channel: ResponseChannel<SyncResponse>, response: SyncResponse) {
        let _ = self.send(Command::Respond { channel, response }).await;
    }

    /// Reports whether a gossip message was valid (only valid ones are forwarded).
    pub async fn validate(&self, id: MessageId, source: PeerId, accept: MessageAcceptance) {
        let _ = self.send(Command::Validate { id, source, accept }).await;
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr) {
        let _ = self.send(Command::Dial(addr)).await;
    }

    /// Closes every connection to a peer.
    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.send(Command::Disconnect(peer)).await;
    }

    /// The members connected now.
    pub async fn connected(&self) -> Vec<PeerId> {
        let (reply, rx) = oneshot::channel();
        if self.send(Command::Connected { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The addresses this node listens on.
    pub async fn listeners(&self) -> Vec<Multiaddr> {
        let (reply, rx) = oneshot::channel();
        if self.send(Command::Listeners { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

/// Settings of the network layer.
#[derive(Debug, Clone)]
pub struct NetSettings {
    /// From the site file.
    pub net: NetConfig,
    /// The consortium's members.
    pub members: Vec<PeerId>,
    /// The consortium's relays (addresses ending in `/p2p/<PeerId>`).
    pub relays: Vec<Multiaddr>,
}

impl NetSettings {
    /// The settings of a node run from `config`: its site's network section and the
    /// consortium's members.
    #[must_use]
    pub fn of(config: &cellswarm_common::config::Config) -> Self {
        Self {
            net: config.node.net.clone(),
            members: config
                .consortium
                .members
                .iter()
                .map(|m| m.peer_id)
                .collect(),
            relays: config.consortium.relays.clone(),
        }
    }
}

/// An allow list of `peers`: any other peer's connection is closed at establishment.
pub(crate) fn allow_only(
    peers: impl IntoIterator<Item = PeerId>,
) -> allow_block_list::Behaviour<allow_block_list::AllowedPeers> {
    let mut allowlist = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
    for p in peers {
        allowlist.allow_peer(p);
    }
    allowlist
}

/// identify with cellswarm's protocol name and agent version.
pub(crate) fn identify_behaviour(key: &libp2p::identity::Keypair) -> identify::Behaviour {
    identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
            .with_agent_version(AGENT.into()),
    )
}

/// ping every 15 s (liveness).
pub(crate) fn ping_behaviour() -> ping::Behaviour {
    ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15)))
}

/// Builds the swarm, starts listening, and returns the client, the event stream and the
/// event loop (to be spawned).
///
/// # Errors
/// Transport or behaviour set-up, or an address that cannot be bound.
pub fn start(
    keypair: libp2p::identity::Keypair,
    settings: &NetSettings,
) -> Result<(NetClient, mpsc::Receiver<NetEvent>, EventLoop), NetError> {
    let traffic = Arc::new(match &settings.net.capture_sent {
        Some(path) => Traffic::with_capture(path)
            .map_err(|e| NetError::Setup(format!("net.capture_sent {}: {e}", path.display())))?,
        None => Traffic::default(),
    });
    let net = settings.net.clone();
    let codec = SyncCodec::new(net.max_message_bytes, Arc::clone(&traffic));
    let members = settings.members.clone();
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let local_id = keypair.public().to_peer_id();
    // The other relays of the consortium (this node may be one of them).
    let relays: Vec<(PeerId, Vec<Multiaddr>)> =
        cellswarm_common::config::relay_groups(&settings.relays)
            .into_iter()
            .filter(|(id, _)| *id != local_id)
            .collect();
    let relay_peers: Vec<PeerId> = relays.iter().map(|(id, _)| *id).collect();
    let mut bandwidth = prometheus_client::registry::Registry::default();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| setup(&e))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_bandwidth_metrics(&mut bandwidth)
        .with_behaviour(|key, relay_client| {
            let allowlist = allow_only(members.iter().chain(&relay_peers).copied());
            let limits = connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established(Some(net.max_connections))
                    .with_max_established_per_peer(Some(net.max_connections_per_peer))
                    .with_max_pending_incoming(Some(net.max_pending_connections))
                    .with_max_pending_outgoing(Some(net.max_pending_connections)),
            );
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(MAX_GOSSIP_BYTES)
                .mesh_n_low(1)
                .mesh_n(4)
                .mesh_n_high(8)
                .mesh_outbound_min(1)
                .build()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )
            .map_err(std::io::Error::other)?;
            let sync = request_response::Behaviour::with_codec(
                codec.clone(),
                [(StreamProtocol::new(SYNC_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(net.request_timeout)
                    .with_max_concurrent_streams(32),
            );
            let identify = identify_behaviour(key);
            Ok(CellswarmBehaviour {
                allowlist,
                limits,
                gossipsub,
                sync,
                identify,
                ping: ping_behaviour(),
                relay_server: Toggle::from(net.relay.then(|| {
                    relay::Behaviour::new(
                        key.public().to_peer_id(),
                        super::relay::relay_config(members.len() + relay_peers.len()),
                    )
                })),
                relay_client,
                dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
                autonat_client: autonat::v2::client::Behaviour::default(),
                autonat_server: autonat::v2::server::Behaviour::default(),
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(net.idle_timeout))
        .build();
    if let Some(r) = swarm.behaviour_mut().relay_server.as_mut() {
        // Serve members whether or not AutoNAT has confirmed an external address yet:
        // the consortium file names this node as a relay, at the addresses a reservation
        // hands out.
        r.set_status(Some(relay::Status::Enable));
        for addr in &settings.relays {
            if cellswarm_common::config::relay_peer(addr) == Some(local_id) {
                swarm.add_external_address(super::relay::without_p2p(addr));
            }
        }
    }
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&IdentTopic::new(ROUND_TOPIC))
        .map_err(|e| setup(&e))?;
    for addr in &net.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
    }
    // A slot on every other relay (see `reserve_again`).
    let now = Instant::now();
    let relisten = relays
        .iter()
        .map(|(_, addrs)| (now, addrs[0].clone(), RELISTEN))
        .collect();
    let local = *swarm.local_peer_id();
    let links = Arc::new(Links::default());
    let _ = links.bandwidth.set(bandwidth);
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let client_traffic = Arc::clone(&traffic);
    let client = NetClient {
        commands: cmd_tx,
        local,
        traffic,
        slots: Arc::default(),
        links: Arc::clone(&links),
    };
    let mut event_loop = EventLoop {
        swarm,
        commands: cmd_rx,
        events: ev_tx,
        pending: HashMap::new(),
        connected: HashSet::new(),
        strikes: HashMap::new(),
        banned: HashMap::new(),
        deferred: VecDeque::new(),
        traffic_for_loop: Arc::clone(&client_traffic),
        members: members.iter().copied().collect(),
        links,
        relay_listens: HashMap::new(),
        relisten,
        relays,
    };
    // The slots, asked for before the swarm runs (as the listen addresses are).
    event_loop.reserve_again();
    Ok((client, ev_rx, event_loop))
}

/// Owns the swarm; the only code that touches it.
pub struct EventLoop {
    swarm: Swarm<CellswarmBehaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<SyncResponse, NetError>>>,
    connected: HashSet<PeerId>,
    /// Recent protocol violations by peer (oversized, malformed or stalled streams).
    strikes: HashMap<PeerId, VecDeque<(Instant, String)>>,
    /// Peers disconnected for abuse, and until when they stay refused.
    banned: HashMap<PeerId, Instant>,
    /// Connection and listen events the engine's full queue could not take yet, in order.
    deferred: VecDeque<NetEvent>,
    traffic_for_loop: Arc<Traffic>,
    /// The consortium's members (relays that are not members are not reported).
    members: HashSet<PeerId>,
    links: Arc<Links>,
    /// Our slots on relays, by listener: the relay's address and the wait before
    /// reserving again should the slot be lost.
    relay_listens: HashMap<libp2p::core::transport::ListenerId, (Multiaddr, Duration)>,
    /// Slots to reserve (at start, or after the relay went away): when, the relay's
    /// address, and the wait before the try after it (doubling to [`RELISTEN_MAX`]).
    relisten: Vec<(Instant, Multiaddr, Duration)>,
    /// The consortium's other relays, each with all its addresses.
    relays: Vec<(PeerId, Vec<Multiaddr>)>,
}

/// How long after losing a relay slot it is reserved again (the first time).
pub const RELISTEN: Duration = Duration::from_secs(5);
/// The longest wait between tries to reserve a relay slot again.
pub const RELISTEN_MAX: Duration = Duration::from_secs(60);

/// Protocol violations within [`ABUSE_WINDOW`] after which a peer is disconnected.
pub const ABUSE_STRIKES: usize = 3;
/// The window over which violations are counted.
pub const ABUSE_WINDOW: Duration = Duration::from_secs(60);
/// How long a peer disconnected for abuse is refused before it may connect again.
pub const ABUSE_BAN: Duration = Duration::from_secs(60);

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer", self.swarm.local_peer_id())
            .field("connected", &self.connected.len())
            .finish_non_exhaustive()
    }
}

impl EventLoop {
    /// Runs until `cancel` fires or every client is gone.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut unban = tokio::time::interval(Duration::from_secs(1));
        unban.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut retry = tokio::time::interval(Duration::from_millis(20));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = unban.tick(), if !self.banned.is_empty() || !self.relisten.is_empty() => {
                    self.lift_bans();
                    self.reserve_again();
                }
                _ = retry.tick(), if !self.deferred.is_empty() => self.flush_deferred(),
                event = self.swarm.select_next_some() => self.handle_swarm(event).await,
                command = self.commands.recv() => match command {
                    Some(c) => self.handle_command(c),
                    None => break,
                },
            }
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(NetError::Closed));
        }
    }

    /// Counts a protocol violation by `peer`; at [`ABUSE_STRIKES`] within
    /// [`ABUSE_WINDOW`] the peer is disconnected and refused for [`ABUSE_BAN`].
    fn strike(&mut self, peer: PeerId, reason: String) {
        let now = Instant::now();
        let list = self.strikes.entry(peer).or_default();
        list.push_back((now, reason));
        while list
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > ABUSE_WINDOW)
        {
            list.pop_front();
        }
        if list.len() < ABUSE_STRIKES {
            return;
        }
        let reasons: Vec<String> = list.drain(..).map(|(_, r)| r).collect();
        self.strikes.remove(&peer);
        self.banned.insert(peer, now + ABUSE_BAN);
        self.traffic_for_loop
            .abusive_disconnects
            .fetch_add(1, Ordering::Relaxed);
        // Closes every connection of the peer and refuses new ones until the ban lifts.
        self.swarm.behaviour_mut().allowlist.disallow_peer(peer);
        tracing::warn!(
            peer = %peer,
            strikes = reasons.len(),
            reasons = %reasons.join("; "),
            ban_seconds = ABUSE_BAN.as_secs(),
            "disconnected an abusive peer"
        );
    }

    /// Reserves the relay slots that are due (at start, or after the slot was lost) at
    /// the relay's first address, and dials its other addresses: each transport's view
    /// of our address is what hole punching needs (QUIC's UDP mapping is the one most
    /// NATs let a punched hole through). A failed try waits twice as long before the
    /// next, up to [`RELISTEN_MAX`].
    fn reserve_again(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.relisten)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.relisten = later;
        for (_, addr, wait) in due {
            match self
                .swarm
                .listen_on(addr.clone().with(Protocol::P2pCircuit))
            {
                Ok(id) => {
                    let relay = cellswarm_common::config::relay_peer(&addr);
                    let others: Vec<Multiaddr> = self
                        .relays
                        .iter()
                        .filter(|(p, _)| Some(*p) == relay)
                        .flat_map(|(_, addrs)| addrs[1..].iter().cloned())
                        .collect();
                    for a in others {
                        let _ = self.swarm.dial(a);
                    }
                    self.relay_listens.insert(id, (addr, wait));
                }
                Err(e) => {
                    tracing::warn!(relay = %addr, error = %e, "cannot reserve a slot on a relay; trying again");
                    self.retry_reservation(addr, wait);
                }
            }
        }
    }

    /// Schedules another reservation on `addr` after `wait`, and doubles the wait.
    fn retry_reservation(&mut self, addr: Multiaddr, wait: Duration) {
        self.relisten
            .push((Instant::now() + wait, addr, (wait * 2).min(RELISTEN_MAX)));
    }

    fn lift_bans(&mut self) {
        let now = Instant::now();
        let lifted: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in lifted {
            self.banned.remove(&peer);
            self.swarm.behaviour_mut().allowlist.allow_peer(peer);
            tracing::info!(peer = %peer, "ban lifted; the member may connect again");
        }
    }

    fn handle_command(&mut self, c: Command) {
        let b = self.swarm.behaviour_mut();
        match c {
            Command::Publish { data, reply } => {
                let r = b
                    .gossipsub
                    .publish(IdentTopic::new(ROUND_TOPIC), data)
                    .map(|_| ())
                    .map_err(|e| NetError::Setup(format!("publish: {e}")));
                let _ = reply.send(r);
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = b.sync.send_request(&peer, Inbound::Request(request));
                self.pending.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                let _ = b.sync.send_response(channel, response);
            }
            Command::Validate { id, source, accept } => {
                b.gossipsub
                    .report_message_validation_result(&id, &source, accept);
            }
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!(%addr, error = %e, "dial failed");
                }
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Connected { reply } => {
                let _ = reply.send(self.connected.iter().copied().collect());
            }
            Command::Listeners { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
        }
    }

    /// Hands an event to the engine without ever waiting for it (the engine may itself be
    /// waiting for this loop, to publish or to request). When the engine's queue is full,
    /// a gossip message is ignored (heartbeats, delta announcements and our attestation
    /// are repeated every heartbeat) and a request is dropped unanswered (its stream
    /// closes and the asker tries again), both counted in
    /// `cellswarm_net_events_dropped_total`; a change of connection or listen address is
    /// kept, in order, and handed over as soon as the queue has room, since the engine
    /// must not miss it.
    fn emit(&mut self, e: NetEvent) {
        self.flush_deferred();
        let keep_order = matches!(
            e,
            NetEvent::Connected(_) | NetEvent::Disconnected(_) | NetEvent::Listening(_)
        );
        if keep_order && !self.deferred.is_empty() {
            self.deferred.push_back(e);
            return;
        }
        let e = match self.events.try_send(e) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(e)) => e,
        };
        match e {
            NetEvent::Gossip { source, id, .. } => {
                self.traffic_for_loop
                    .events_dropped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %source, "engine busy: a gossip message is ignored");
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, MessageAcceptance::Ignore);
            }
            NetEvent::Inbound { peer, .. } => {
                self.traffic_for_loop
                    .events_dropped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %peer, "engine busy: a request is dropped unanswered");
            }
            other => self.deferred.push_back(other),
        }
    }

    /// Hands deferred connection events to the engine, in order, as far as its queue
    /// takes them.
    fn flush_deferred(&mut self) {
        while let Some(e) = self.deferred.pop_front() {
            match self.events.try_send(e) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(e)) => {
                    self.deferred.push_front(e);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.deferred.clear();
                    return;
                }
            }
        }
    }

    async fn handle_swarm(&mut self, event: SwarmEvent<CellswarmBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.emit(NetEvent::Listening(address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                if !relayed && let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.swarm.add_peer_address(peer_id, address.clone());
                }
                self.links.opened(peer_id, connection_id, relayed);
                let path = if relayed { "relayed" } else { "direct" };
                if !self.members.contains(&peer_id) {
                    tracing::info!(peer = %peer_id, path, "relay connected");
                } else if self.connected.insert(peer_id) {
                    tracing::info!(peer = %peer_id, path, "member connected");
                    self.emit(NetEvent::Connected(peer_id));
                } else {
                    tracing::debug!(peer = %peer_id, path, "another connection to a member");
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.links.closed(peer_id, connection_id);
                if num_established == 0 && self.connected.remove(&peer_id) {
                    tracing::info!(peer = %peer_id, "member disconnected");
                    self.emit(NetEvent::Disconnected(peer_id));
                }
            }
            SwarmEvent::NewExternalAddrCandidate { address } => {
                tracing::debug!(%address, "a peer sees us at this address");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "reachable from outside at this address");
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some((addr, wait)) = self.relay_listens.remove(&listener_id) {
                    if wait == RELISTEN {
                        tracing::info!(relay = %addr, reason = ?reason, "relay slot lost; reserving again");
                    } else {
                        tracing::debug!(relay = %addr, reason = ?reason, "relay slot lost again");
                    }
                    self.retry_reservation(addr, wait);
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::warn!(addr = %send_back_addr, reason = %error, "refused an incoming connection");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, reason = %error, "outgoing connection failed");
            }
            SwarmEvent::Behaviour(CellswarmBehaviourEvent::Gossipsub(
                gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                },
            )) => {
                self.emit(NetEvent::Gossip {
                    source: propagation_source,
                    id: message_id,
                    data: message.data,
                });
            }
            SwarmEvent::Behaviour(CellswarmBehaviourEvent::Sync(event)) => {
                self.handle_sync(event).await
            }
            SwarmEvent::Behaviour(CellswarmBehaviourEvent::Identify(
                identify::Event::Received { peer_id, info, .. },
            )) => {
                for addr in info.listen_addrs {
                    self.swarm.add_peer_address(peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(CellswarmBehaviourEvent::Dcutr(e)) => match e.result {
                Ok(_) => {
                    self.links.holepunch_ok.fetch_add(1, Ordering::Relaxed);
                    // The relayed connections stay open beside the direct one: closing
                    // them under gossipsub's streams stalled rounds in tests (gossip
                    // went on to the closed connection), so some requests and gossip
                    // still cross the relay until it closes them (idle timeout).
                    tracing::info!(peer = %e.remote_peer_id, "hole punched: a direct connection beside the relayed one");
                }
                Err(err) => {
                    self.links.holepunch_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(peer = %e.remote_peer_id, reason = %err, "hole punching failed: the connection stays relayed");
                }
            },
            SwarmEvent::Behaviour(CellswarmBehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    ..
                },
            )) => {
                self.links.reservations.fetch_add(1, Ordering::Relaxed);
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "reserved a slot on a relay: members can reach us through it");
                }
            }
            SwarmEvent::Behaviour(CellswarmBehaviourEvent::RelayServer(e)) => self.on_relay(e),
            SwarmEvent::Behaviour(CellswarmBehaviourEvent::AutonatClient(e)) => match e.result {
                Ok(()) => {
                    tracing::info!(addr = %e.tested_addr, server = %e.server, "reachable from outside at this address (AutoNAT)");
                    let mut r = self
                        .links
                        .reachable
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if !r.contains(&e.tested_addr) {
                        r.push(e.tested_addr);
                    }
                }
                Err(err) => {
                    tracing::debug!(addr = %e.tested_addr, server = %e.server, reason = %err, "not reachable at this address (AutoNAT)");
                    self.links
                        .reachable
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .retain(|a| *a != e.tested_addr);
                }
            },
            _ => {}
        }
    }

    /// Counts what this node did as a relay. Only members can connect at all (the
    /// allow list), so every reservation and circuit served is a member's.
    fn on_relay(&mut self, e: relay::Event) {
        match e {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                self.links
                    .reservations_served
                    .fetch_add(1, Ordering::Relaxed);
                if !renewed {
                    tracing::info!(peer = %src_peer_id, "relay: reserved a slot for a member");
                }
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                self.links.circuits_served.fetch_add(1, Ordering::Relaxed);
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit opened between members");
            }
            relay::Event::ReservationReqDenied { src_peer_id, .. } => {
                self.links.relay_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %src_peer_id, "relay: reservation refused");
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                ..
            } => {
                self.links.relay_refused.fetch_add(1, Ordering::Relaxed);
                // Mostly a member asking for one that is offline (no reservation).
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit refused");
            }
            _ => {}
        }
    }

    async fn handle_sync(&mut self, event: request_response::Event<Inbound, SyncResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request: Inbound::Violation(reason),
                    ..
                } => {
                    // The channel is dropped: the stream closes unanswered.
                    tracing::warn!(peer = %peer, reason = %reason, "refused a request");
                    self.strike(peer, reason);
                }
                request_response::Message::Request {
                    request: Inbound::Request(request),
                    channel,
                    ..
                } => {
                    self.emit(NetEvent::Inbound {
                        peer,
                        request,
                        channel,
                    });
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if is_violation_out(&error) {
                    self.strike(peer, format!("response: {error}"));
                }
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        message: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::warn!(peer = %peer, reason = %error, "inbound request failed");
                if is_violation_in(&error) {
                    self.strike(peer, format!("request: {error}"));
                }
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

/// An inbound stream the peer broke: oversized or malformed bytes, or a request it did
/// not finish sending in time (a slow-frame attack).
fn is_violation_in(e: &request_response::InboundFailure) -> bool {
    use request_response::InboundFailure as F;
    match e {
        F::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        F::Timeout => true,
        _ => false,
    }
}

/// A response the peer broke: oversized or malformed bytes. A response that did not come
/// in time is not held against the peer: an honest member busy merging, or our own slow
/// reading, looks the same from here, and three strikes would cut an honest member off
/// (a peer that answers slowly on purpose costs us one request timeout per request).
fn is_violation_out(e: &request_response::OutboundFailure) -> bool {
    use request_response::OutboundFailure as F;
    match e {
        F::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellswarm_common::wire::ResponseHeader;

    /// Lets every spawned task run until it waits (a current-thread runtime).
    async fn settle() {
        for _ in 0..32 {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn relayed_bytes_sum_the_circuit_stacks_only() {
        let text = "# HELP libp2p_bandwidth_bytes Bandwidth usage by direction and transport protocols.\n\
            libp2p_bandwidth_bytes_total{protocols=\"/ip4/udp/quic-v1/p2p/p2p-circuit/p2p\",direction=\"Inbound\"} 100\n\
            libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp/p2p/p2p-circuit/p2p\",direction=\"Inbound\"} 20\n\
            libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp/p2p/p2p-circuit/p2p\",direction=\"Outbound\"} 7\n\
            libp2p_bandwidth_bytes_total{protocols=\"/p2p\",direction=\"Outbound\"} 3\n\
            libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp/p2p\",direction=\"Outbound\"} 900\n\
            libp2p_bandwidth_bytes_total{protocols=\"/ip4/udp/quic-v1\",direction=\"Inbound\"} 5000\n";
        assert_eq!(relayed_bytes(text), (120, 10));
        assert_eq!(relayed_bytes(""), (0, 0));
    }

    #[tokio::test]
    async fn requests_to_one_peer_wait_for_a_slot_beyond_the_limit() {
        let (tx, mut rx) = mpsc::channel(64);
        let client = NetClient {
            commands: tx,
            local: PeerId::random(),
            traffic: Arc::default(),
            slots: Arc::default(),
            links: Arc::default(),
        };
        let (busy, other) = (PeerId::random(), PeerId::random());
        let mut tasks = Vec::new();
        for peer in std::iter::repeat_n(busy, REQUESTS_PER_PEER + 1).chain([other]) {
            let c = client.clone();
            tasks.push(tokio::spawn(async move {
                c.request(peer, Request::Latest).await
            }));
        }
        settle().await;
        let mut sent = Vec::new();
        while let Ok(Command::Request { peer, reply, .. }) = rx.try_recv() {
            sent.push((peer, reply));
        }
        // The busy peer's first slots and the other peer's request went out; the busy
        // peer's last request waits.
        assert_eq!(
            sent.iter().filter(|(p, _)| *p == busy).count(),
            REQUESTS_PER_PEER
        );
        assert_eq!(sent.iter().filter(|(p, _)| *p == other).count(), 1);
        // One answer frees a slot, and the waiting request goes out.
        let at = sent.iter().position(|(p, _)| *p == busy).unwrap();
        let (_, reply) = sent.swap_remove(at);
        let _ = reply.send(Ok(SyncResponse::empty(ResponseHeader::NotFound)));
        settle().await;
        assert!(matches!(
            rx.try_recv(),
            Ok(Command::Request { peer, .. }) if peer == busy
        ));
        assert!(rx.try_recv().is_err());
    }
}
