//! `cellswarm relay`: a relay-only process for a consortium whose members sit behind NAT.
//!
//! It holds no model and no data and takes no part in rounds: it lets members reserve a
//! slot, forwards circuits between members (a member behind NAT is dialled through its
//! slot), helps them hole-punch to each other (DCUtR runs between the members, over the
//! relayed connection) and answers their AutoNAT reachability probes. It accepts
//! connections from the consortium's members and its other relays only (the same allow
//! list as a node), so no one else can reserve a slot or be relayed.

use std::time::Duration;

use libp2p::futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, autonat, connection_limits, noise, relay, tcp, yamux};
use tokio_util::sync::CancellationToken;

use super::network::{NetError, allow_only, identify_behaviour, ping_behaviour};

/// The relay process's behaviour (its own module: the derive's event enum carries no docs).
mod behaviour {
    #![allow(missing_docs, missing_debug_implementations)]

    use libp2p::swarm::NetworkBehaviour;
    use libp2p::{allow_block_list, autonat, connection_limits, identify, ping, relay};

    /// What a relay-only process runs.
    #[derive(NetworkBehaviour)]
    pub struct RelayBehaviour {
        /// Members and the consortium's other relays only.
        pub allowlist: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
        /// Caps connections.
        pub limits: connection_limits::Behaviour,
        /// Reservations and circuits for members.
        pub relay: relay::Behaviour,
        /// Addresses and versions of peers (members learn their observed address here).
        pub identify: identify::Behaviour,
        /// Liveness.
        pub ping: ping::Behaviour,
        /// Answers members' reachability probes.
        pub autonat: autonat::v2::server::Behaviour,
    }
}

pub use behaviour::{RelayBehaviour, RelayBehaviourEvent};

/// What a relay process is given.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Addresses members reach the relay at (the consortium file's `relays` entries for
    /// it); a reservation names them. Empty: each address it listens on, as bound.
    pub external: Vec<Multiaddr>,
    /// PeerIds allowed to connect: the consortium's members and its other relays.
    pub allowed: Vec<PeerId>,
    /// Most connections in total.
    pub max_connections: u32,
}

/// A relay's limits for a consortium of `members` (relays included): members' circuits
/// carry models and deltas for as long as the consortium runs, so neither duration nor
/// bytes are capped per circuit (libp2p's defaults, 2 minutes and 128 KiB, suit only
/// hole-punching coordination); every pair of members may hold a circuit each way, so
/// each member may be in 2 per other member and the relay carries up to two per pair;
/// and there is no rate limit, since only members can connect at all (the allow list),
/// and members that cannot reach a peer retry every few seconds.
#[must_use]
pub fn relay_config(members: usize) -> relay::Config {
    let n = members.max(2);
    relay::Config {
        max_reservations: (4 * n).max(128),
        max_reservations_per_peer: 4,
        reservation_duration: Duration::from_secs(3600),
        reservation_rate_limiters: Vec::new(),
        max_circuits: (2 * n * n).max(16),
        max_circuits_per_peer: (2 * n).max(4),
        max_circuit_duration: Duration::from_secs(24 * 3600),
        max_circuit_bytes: 0,
        circuit_src_rate_limiters: Vec::new(),
    }
}

/// `addr` without its trailing `/p2p/<PeerId>`.
#[must_use]
pub fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()
}

/// Runs a relay until `cancel` fires; `on_listen` is called with each address it
/// listens on.
///
/// # Errors
/// Transport set-up, or an address that cannot be bound.
pub async fn run(
    keypair: libp2p::identity::Keypair,
    settings: RelaySettings,
    cancel: CancellationToken,
    mut on_listen: impl FnMut(&Multiaddr) + Send,
) -> Result<(), NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let allowed = settings.allowed.clone();
    let max = settings.max_connections;
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
            let mut relay =
                relay::Behaviour::new(key.public().to_peer_id(), relay_config(allowed.len() + 1));
            relay.set_status(Some(relay::Status::Enable));
            RelayBehaviour {
                allowlist: allow_only(allowed.iter().copied()),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(max))
                        .with_max_established_per_peer(Some(4))
                        .with_max_pending_incoming(Some(64))
                        .with_max_pending_outgoing(Some(64)),
                ),
                relay,
                identify: identify_behaviour(key),
                ping: ping_behaviour(),
                autonat: autonat::v2::server::Behaviour::default(),
            }
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    for addr in &settings.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
    }
    for addr in &settings.external {
        swarm.add_external_address(without_p2p(addr));
    }
    tracing::info!(peer = %swarm.local_peer_id(), members = allowed.len(), "relay running");
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            e = swarm.select_next_some() => e,
        };
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if settings.external.is_empty() {
                    swarm.add_external_address(address.clone());
                }
                on_listen(&address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                tracing::info!(peer = %peer_id, "member connected");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::warn!(addr = %send_back_addr, reason = %error, "refused an incoming connection");
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Relay(e)) => match e {
                relay::Event::ReservationReqAccepted {
                    src_peer_id,
                    renewed: false,
                } => tracing::info!(peer = %src_peer_id, "reserved a slot for a member"),
                relay::Event::CircuitReqAccepted {
                    src_peer_id,
                    dst_peer_id,
                } => {
                    tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "circuit opened between members");
                }
                relay::Event::CircuitClosed {
                    src_peer_id,
                    dst_peer_id,
                    error,
                } => {
                    tracing::info!(src = %src_peer_id, dst = %dst_peer_id, error = ?error, "circuit closed");
                }
                relay::Event::ReservationReqDenied { src_peer_id, .. } => {
                    tracing::warn!(peer = %src_peer_id, "reservation refused");
                }
                relay::Event::CircuitReqDenied {
                    src_peer_id,
                    dst_peer_id,
                    status,
                } => {
                    // Mostly a member asking for one that is offline (no reservation).
                    tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, ?status, "circuit refused");
                }
                _ => {}
            },
            _ => {}
        }
    }
}
