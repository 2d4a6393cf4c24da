//! Resource exhaustion: a member floods a node with connections and streams, oversized,
//! garbage and slow frames. The node's memory stays below twice its baseline, the honest
//! members' rounds still complete, and the offender is disconnected and logged.

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, noise, tcp, yamux};

use crate::swarm_util::{Consortium, LogEvent, Logs, Setup, terminate};

const VICTIM: usize = 0;
const ATTACKER: usize = 3;
const ROUNDS: u64 = 12;

/// What the attacker writes on a sync stream.
#[derive(Debug, Clone, Copy)]
enum Evil {
    /// A length prefix of 4 GiB.
    Oversize,
    /// 60,000 declared bytes, 100 every 100 ms.
    Slow,
    /// A valid length and bytes that are not a request.
    Garbage,
}

#[derive(Debug, Clone, Default)]
struct EvilCodec;

impl request_response::Codec for EvilCodec {
    type Protocol = StreamProtocol;
    type Request = Evil;
    type Response = ();

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<Evil>
    where
        T: AsyncRead + Unpin + Send,
    {
        Err(std::io::Error::other("the attacker serves nothing"))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<()>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(())
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Evil,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Evil::Oversize => {
                io.write_all(&u32::MAX.to_le_bytes()).await?;
                io.write_all(&[0xAB; 4096]).await?;
            }
            Evil::Garbage => {
                io.write_all(&64u32.to_le_bytes()).await?;
                io.write_all(&[0xFF; 64]).await?;
            }
            Evil::Slow => {
                io.write_all(&60_000u32.to_le_bytes()).await?;
                for _ in 0..600 {
                    io.write_all(&[7; 100]).await?;
                    io.flush().await?;
                    // Deliberately slow: this is the attack.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        (): (),
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        Ok(())
    }
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn reached(node: usize, round: u64) -> impl FnMut(&LogEvent) -> bool {
    move |e: &LogEvent| {
        e.node == node
            && matches!(e.message.as_str(), "round committed" | "caught up")
            && e.round().is_some_and(|r| r >= round)
    }
}

/// The attack: many raw TCP connections, and a member's swarm opening hundreds of
/// streams with oversized, garbage and slow frames. Runs until `stop`.
async fn attack(c: &Consortium, target: Multiaddr, port: u16, stop: Arc<AtomicU64>) -> u64 {
    // A member's own libp2p swarm speaking the sync protocol badly, and (once it is
    // connected) raw connections that never finish a handshake, each dribbling junk.
    let key = c.sites[ATTACKER].identity().libp2p_keypair();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("a transport")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                EvilCodec,
                [(
                    StreamProtocol::new(cellswarm_common::protocol::SYNC_PROTOCOL),
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(60))
                    .with_max_concurrent_streams(1000),
            )
        })
        .expect("a behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.dial(target).expect("dials");
    let victim = c.sites[VICTIM].identity().peer_id();
    let mut raw: Vec<tokio::net::TcpStream> = Vec::new();
    let mut sent = 0u64;
    let mut closed = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stop.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        let ev = tokio::time::timeout(Duration::from_millis(100), swarm.select_next_some()).await;
        match ev {
            Ok(SwarmEvent::ConnectionEstablished { .. }) => {
                for _ in 0..200 {
                    if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        raw.push(s);
                    }
                }
                for i in 0..300u64 {
                    let kind = match i % 3 {
                        0 => Evil::Slow,
                        1 => Evil::Garbage,
                        _ => Evil::Oversize,
                    };
                    swarm.behaviour_mut().send_request(&victim, kind);
                    sent += 1;
                }
            }
            Ok(SwarmEvent::ConnectionClosed { .. }) => {
                closed += 1;
                // Try to come back at once (refused while banned).
                let _ = swarm.dial(victim);
            }
            _ => {}
        }
        for s in &mut raw {
            let _ = s.try_write(&[0u8; 64]);
        }
    }
    assert!(sent > 0, "the attacker never got a connection");
    closed
}

#[test]
fn a_flooding_member_is_disconnected_memory_stays_bounded_and_rounds_complete() {
    let c = Consortium::new(Setup {
        nodes: 4,
        min_peers: 2,
        collect: "2s",
        merge: "3s",
        rounds: ROUNDS,
        training_delay: "200ms",
        ..Setup::default()
    });
    let (tx, mut logs) = Logs::new();
    let mut children: Vec<Child> = (0..3).map(|i| c.spawn(i, &tx)).collect();
    let listen = logs.wait_for("the victim listening", Duration::from_secs(60), |e| {
        e.node == VICTIM && e.message == "listening"
    });
    let addr: Multiaddr = listen
        .field("address")
        .expect("an address")
        .parse()
        .expect("a multiaddr");
    let port = addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(p) => Some(p),
            _ => None,
        })
        .expect("a TCP port");
    logs.wait_for(
        "round 2 everywhere",
        Duration::from_secs(120),
        reached(VICTIM, 2),
    );
    let pid = children[VICTIM].id();
    let baseline = rss_bytes(pid).expect("the victim's RSS");

    let stop = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let attacker = {
        let c = &c;
        std::thread::scope(|scope| {
            let flag = Arc::clone(&stop);
            let h = scope.spawn(move || runtime.block_on(attack(c, addr, port, flag)));
            // Sample the victim's memory while it is under attack (bounded; there is no
            // event for "memory changed").
            let mut peak = baseline;
            let until = Instant::now() + Duration::from_secs(8);
            while Instant::now() < until {
                peak = peak.max(rss_bytes(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(50));
            }
            let banned = logs.wait_for("the offender disconnected", Duration::from_secs(60), |e| {
                e.node == VICTIM && e.message == "disconnected an abusive peer"
            });
            stop.store(1, Ordering::Relaxed);
            let closed = h.join().expect("the attacker thread");
            (peak, banned, closed)
        })
    };
    let (peak, banned, closed) = attacker;
    let attacker_id = c.sites[ATTACKER].identity().peer_id().to_string();
    assert_eq!(
        banned.field("peer").as_deref(),
        Some(attacker_id.as_str()),
        "{}",
        banned.line
    );
    assert!(closed >= 1, "the attacker's connection was never closed");
    assert!(
        peak < 2 * baseline,
        "victim RSS {peak} B under attack, baseline {baseline} B"
    );
    for i in 0..3 {
        logs.wait_for(
            "every honest node at the last round",
            Duration::from_secs(120),
            reached(i, ROUNDS),
        );
    }
    eprintln!(
        "victim RSS baseline {baseline} B, peak under attack {peak} B; {}",
        banned.line
    );
    for (i, child) in children.iter_mut().enumerate() {
        assert!(
            terminate(child, Duration::from_secs(30)),
            "node {i} did not exit 0 on SIGTERM"
        );
    }
}
