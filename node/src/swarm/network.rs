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
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cellswarm_common::config::NetConfig;
use cellswarm_common::protocol::{AGENT, IDENTIFY_PROTOCOL, ROUND_TOPIC, SYNC_PROTOCOL};
use cellswarm_common::wire::Request;
use libp2p::futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, connection_limits, identify, noise,
    ping, tcp, yamux,
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
    use libp2p::{
        allow_block_list, connection_limits, gossipsub, identify, ping, request_response,
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

/// A cloneable handle to the event loop.
#[derive(Debug, Clone)]
pub struct NetClient {
    commands: mpsc::Sender<Command>,
    local: PeerId,
    traffic: Arc<Traffic>,
    slots: Arc<PeerSlots>,
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
        }
    }
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
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| setup(&e))?
        .with_quic()
        .with_behaviour(|key| {
            let mut allowlist =
                allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
            for m in &members {
                allowlist.allow_peer(*m);
            }
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
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                    .with_agent_version(AGENT.into()),
            );
            Ok(CellswarmBehaviour {
                allowlist,
                limits,
                gossipsub,
                sync,
                identify,
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(15)),
                ),
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(net.idle_timeout))
        .build();
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
    let local = *swarm.local_peer_id();
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let client_traffic = Arc::clone(&traffic);
    let client = NetClient {
        commands: cmd_tx,
        local,
        traffic,
        slots: Arc::default(),
    };
    Ok((
        client,
        ev_rx,
        EventLoop {
            swarm,
            commands: cmd_rx,
            events: ev_tx,
            pending: HashMap::new(),
            connected: HashSet::new(),
            strikes: HashMap::new(),
            banned: HashMap::new(),
            deferred: VecDeque::new(),
            traffic_for_loop: Arc::clone(&client_traffic),
        },
    ))
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
}

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
                _ = unban.tick(), if !self.banned.is_empty() => self.lift_bans(),
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
                peer_id, endpoint, ..
            } => {
                self.swarm
                    .add_peer_address(peer_id, endpoint.get_remote_address().clone());
                if self.connected.insert(peer_id) {
                    tracing::info!(peer = %peer_id, "member connected");
                    self.emit(NetEvent::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } if self.connected.remove(&peer_id) => {
                tracing::info!(peer = %peer_id, "member disconnected");
                self.emit(NetEvent::Disconnected(peer_id));
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

    #[tokio::test]
    async fn requests_to_one_peer_wait_for_a_slot_beyond_the_limit() {
        let (tx, mut rx) = mpsc::channel(64);
        let client = NetClient {
            commands: tx,
            local: PeerId::random(),
            traffic: Arc::default(),
            slots: Arc::default(),
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
