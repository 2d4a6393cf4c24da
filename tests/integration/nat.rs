//! Members behind NAT: relays on loopback. A member serves as the consortium's relay;
//! two members have no address anyone can dial, so the pair reaches each other only
//! through the relay (and hole punching, where it works, upgrades the connection). The
//! relay-only process refuses non-members. Network namespaces with real NATs are the
//! next step (issue "Across real networks").

use std::sync::atomic::Ordering;
use std::time::Duration;

use cellswarm_common::identity::Identity;
use cellswarm_node::swarm::network::LinkPath;
use cellswarm_node::swarm::relay::{self, RelaySettings};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, noise, tcp, yamux};
use tokio_util::sync::CancellationToken;

use crate::swarm_util::{Consortium, Setup, runtime, stop_all, wait_all_agree};

const LONG: Duration = Duration::from_secs(120);

/// Rewrites the consortium file: `relay` becomes its relay, and members from `hidden` on
/// list no address (as if each sat behind its own NAT).
fn behind_nat(c: &Consortium, relay: &Multiaddr, hidden: usize) {
    let file = c.file();
    let text = std::fs::read_to_string(&file).expect("the consortium file reads");
    let mut out = String::new();
    let mut member = None;
    for line in text.lines() {
        if line.starts_with("[[members]]") {
            member = Some(member.map_or(0, |m: usize| m + 1));
        }
        if line.starts_with("addresses") && member.is_some_and(|m| m >= hidden) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.starts_with("genesis") {
            out.push_str(&format!("relays = [\"{relay}\"]\n"));
        }
    }
    std::fs::write(&file, out).expect("the consortium file is written");
}

/// Waits (bounded) until `node` is connected to `peer` and returns how.
async fn path_to(node: &cellswarm_node::daemon::Node, peer: libp2p::PeerId) -> LinkPath {
    let key = peer.to_string();
    for _ in 0..300 {
        if let Some(p) = node.net().links().paths().get(&key) {
            return *p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} never connected to {peer}", node.peer_id());
}

#[test]
fn members_without_a_reachable_address_train_together_through_a_member_relay() {
    let c = Consortium::new(Setup::default());
    let relay = c.sites[0].config().node.net.listen[0]
        .clone()
        .with_p2p(c.sites[0].identity().peer_id())
        .expect("a relay address");
    behind_nat(&c, &relay, 1);
    c.set_net(0, "relay = true");
    let config = c.sites[1].config();
    assert_eq!(config.consortium.relays.len(), 1);
    assert!(config.consortium.members[2].addresses.is_empty());
    assert!(c.sites[0].config().node.net.relay);
    runtime().block_on(async {
        let nodes = c.start_all().await;
        let hash = wait_all_agree(&nodes, c.setup.rounds, LONG).await;
        assert_ne!(hash, c.genesis, "the model moved");
        // Members 1 and 2 can reach each other only through member 0's relay (or a
        // hole punched from there): each holds a slot, and they meet.
        let path = path_to(&nodes[1], nodes[2].peer_id()).await;
        for n in &nodes[1..] {
            let links = n.net().links();
            assert!(
                links.relayed_connections.load(Ordering::Relaxed) >= 1,
                "no relayed connection: {}",
                links.prometheus()
            );
            assert!(links.reservations.load(Ordering::Relaxed) >= 1);
        }
        // Bytes went through the relay (before a hole, if one was punched on loopback,
        // took over).
        let relayed: u64 = nodes[1..]
            .iter()
            .map(|n| {
                let (rin, rout) = n.net().links().relayed_bytes();
                rin + rout
            })
            .sum();
        assert!(
            relayed > 0,
            "no bytes counted through the relay: {}",
            nodes[1].net().links().bandwidth_text()
        );
        let served = nodes[0].net().links();
        assert!(served.reservations_served.load(Ordering::Relaxed) >= 2);
        assert!(served.circuits_served.load(Ordering::Relaxed) >= 1);
        eprintln!(
            "member 1 reaches member 2 {path:?}; hole punches ok {} failed {}",
            nodes[1].net().links().holepunch_ok.load(Ordering::Relaxed),
            nodes[1]
                .net()
                .links()
                .holepunch_failed
                .load(Ordering::Relaxed),
        );
        stop_all(nodes).await;
    });
}

/// Starts an in-process relay (`cellswarm relay`'s loop) on a free loopback port for
/// `allowed`; returns its address (with `/p2p/`), its stop token and its task.
async fn start_relay(
    id: &Identity,
    allowed: Vec<libp2p::PeerId>,
) -> (
    Multiaddr,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), cellswarm_node::swarm::network::NetError>>,
) {
    let cancel = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let settings = RelaySettings {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("an address")],
        external: Vec::new(),
        allowed,
        max_connections: 16,
    };
    let task = tokio::spawn(relay::run(
        id.libp2p_keypair(),
        settings,
        cancel.clone(),
        move |a| {
            let _ = tx.send(a.clone());
        },
    ));
    let addr = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the relay listens")
        .expect("an address")
        .with_p2p(id.peer_id())
        .expect("a relay address");
    (addr, cancel, task)
}

#[test]
fn two_members_that_only_a_relay_process_connects_commit_rounds() {
    let setup = Setup {
        nodes: 2,
        min_peers: 2,
        rounds: 3,
        ..Setup::default()
    };
    let c = Consortium::new(setup);
    let relay_id = Identity::from_seed([9; 32]).expect("a seed");
    runtime().block_on(async {
        let allowed = c.sites.iter().map(|s| s.identity().peer_id()).collect();
        let (relay_addr, cancel, task) = start_relay(&relay_id, allowed).await;
        // The consortium file names the relay at the port it got.
        behind_nat(&c, &relay_addr, 0);
        let nodes = c.start_all().await;
        let hash = wait_all_agree(&nodes, c.setup.rounds, LONG).await;
        assert_ne!(hash, c.genesis, "the model moved");
        for n in &nodes {
            let links = n.net().links();
            assert!(
                links.relayed_connections.load(Ordering::Relaxed) >= 1,
                "no relayed connection: {}",
                links.prometheus()
            );
        }
        stop_all(nodes).await;
        cancel.cancel();
        task.await
            .expect("the relay task")
            .expect("the relay stops cleanly");
    });
}

/// A bare relay-client swarm for `key` (no other behaviour).
fn client(key: libp2p::identity::Keypair) -> libp2p::Swarm<libp2p::relay::client::Behaviour> {
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .expect("the relay client")
        .with_behaviour(|_, relay_client| relay_client)
        .expect("the behaviour")
        .build()
}

/// Asks `relay` for a slot for `swarm`; whether the relay accepted it within the timeout.
async fn reserve(
    swarm: &mut libp2p::Swarm<libp2p::relay::client::Behaviour>,
    relay: Multiaddr,
) -> bool {
    swarm
        .listen_on(relay.with(Protocol::P2pCircuit))
        .expect("a circuit listen address");
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(libp2p::relay::client::Event::ReservationReqAccepted {
                    ..
                }) => return true,
                SwarmEvent::ListenerClosed { .. } | SwarmEvent::ListenerError { .. } => {
                    return false;
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or(false)
}

/// Dials `target` through `relay` from `key`'s own swarm; whether a connection to it
/// was established within the timeout.
async fn through(
    key: libp2p::identity::Keypair,
    relay: &Multiaddr,
    target: libp2p::PeerId,
) -> bool {
    let mut swarm = client(key);
    let via = relay
        .clone()
        .with(Protocol::P2pCircuit)
        .with_p2p(target)
        .expect("a circuit address");
    if swarm.dial(via).is_err() {
        return false;
    }
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == target => {
                    return true;
                }
                SwarmEvent::OutgoingConnectionError { .. } => return false,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or(false)
}

#[test]
fn the_relay_process_serves_members_and_refuses_strangers() {
    let member = Identity::from_seed([7; 32]).expect("a seed");
    let other = Identity::from_seed([6; 32]).expect("a seed");
    let stranger = Identity::from_seed([8; 32]).expect("a seed");
    let relay_id = Identity::from_seed([9; 32]).expect("a seed");
    runtime().block_on(async {
        let allowed = vec![member.peer_id(), other.peer_id()];
        let (addr, cancel, task) = start_relay(&relay_id, allowed).await;
        let mut held = client(member.libp2p_keypair());
        assert!(
            reserve(&mut held, addr.clone()).await,
            "the member got no slot"
        );
        // The member keeps its slot (its swarm runs) while others try to reach it.
        let holder = tokio::spawn(async move {
            loop {
                let _ = held.select_next_some().await;
            }
        });
        assert!(
            through(other.libp2p_keypair(), &addr, member.peer_id()).await,
            "another member could not reach the member through the relay"
        );
        assert!(
            !through(stranger.libp2p_keypair(), &addr, member.peer_id()).await,
            "a stranger reached a member through the relay"
        );
        assert!(
            !reserve(&mut client(stranger.libp2p_keypair()), addr).await,
            "a stranger got a slot"
        );
        holder.abort();
        cancel.cancel();
        task.await
            .expect("the relay task")
            .expect("the relay stops cleanly");
    });
}
