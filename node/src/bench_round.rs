//! `cellswarm bench round`: the protocol's overhead without training.
//!
//! N nodes run in this process, each with its own libp2p swarm on loopback, its own sled
//! store in a temporary folder and the `test-vector` model of P parameters (training is a
//! single vector update, so a round's time is the protocol: announce, fetch, verify,
//! merge, publish, recompute, commit, store). Round 1 (connection set-up) is not counted.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use cellswarm_common::config::Config;
use cellswarm_common::identity::Identity;
use cellswarm_common::ids::RoundId;

use crate::daemon::{DaemonError, Node, build_trainer};
use crate::swarm::local::{LocalTrainer, VectorTrainer};

/// What one run measured.
#[derive(Debug, Clone)]
pub struct RoundBench {
    /// Wall time of each counted round (commit to commit at node 0).
    pub rounds: Vec<Duration>,
    /// Bytes the request-response protocol sent per node per counted round, averaged.
    pub bytes_per_node_per_round: f64,
    /// Peak resident memory of this process (all nodes), in bytes, if known.
    pub peak_rss: Option<u64>,
}

impl RoundBench {
    /// Median round time.
    #[must_use]
    pub fn median(&self) -> Duration {
        median(&self.rounds)
    }
}

/// The median of `v` (zero when empty).
#[must_use]
pub fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Peak resident memory of this process (`VmHWM`), in bytes, where `/proc` has it.
#[must_use]
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn write_consortium(
    dir: &std::path::Path,
    nodes: usize,
    params: usize,
    rounds: u64,
) -> Result<Vec<(std::path::PathBuf, Identity)>, DaemonError> {
    let io = |e: std::io::Error| DaemonError::Setup(format!("writing benchmark files: {e}"));
    let genesis = VectorTrainer::new(params, 0, Duration::ZERO)
        .genesis(0)
        .hash();
    let mut consortium = format!(
        "name = \"bench\"\ngenesis = \"{genesis}\"\n[model]\narchitecture = \"test-vector\"\nparams = {params}\n\
         [rounds]\nmin_peers = {nodes}\ncollect_timeout = \"60s\"\nmerge_timeout = \"30s\"\nmax_rounds = {rounds}\n\
         [aggregation]\nstrategy = \"fedavg\"\nmax_update_norm = 1e12\n"
    );
    let mut sites = Vec::new();
    for i in 0..nodes {
        let id = Identity::from_seed([i as u8 + 1; 32])?;
        let site = dir.join(format!("site-{i}"));
        std::fs::create_dir_all(&site).map_err(io)?;
        let _ = write!(
            consortium,
            "[[members]]\nname = \"site-{i}\"\npeer_id = \"{}\"\n",
            id.peer_id()
        );
        let file = site.join("site.toml");
        std::fs::write(
            &file,
            format!(
                "consortium = \"../consortium.toml\"\n[net]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n\
                 [training]\nseed = {}\n[store]\npath = \"store\"\n[status]\nenabled = false\n",
                i + 1
            ),
        )
        .map_err(io)?;
        sites.push((file, id));
    }
    std::fs::write(dir.join("consortium.toml"), consortium).map_err(io)?;
    Ok(sites)
}

/// Runs `rounds` counted rounds of `nodes` nodes with `params` parameters.
///
/// # Errors
/// Set-up failures (ports, stores), or a round that does not complete within a minute.
pub async fn round_overhead(
    nodes: usize,
    params: usize,
    rounds: u64,
) -> Result<RoundBench, DaemonError> {
    let dir =
        tempfile::tempdir().map_err(|e| DaemonError::Setup(format!("a temporary folder: {e}")))?;
    let total = rounds + 1;
    let sites = write_consortium(dir.path(), nodes, params, total)?;
    let mut running = Vec::new();
    for (file, id) in sites {
        let config = Config::load(&file)?;
        let trainer = build_trainer(&config)?;
        running.push(Node::start(config, id, trainer).await?);
    }
    // Everyone dials everyone's actual listen address.
    for a in 0..running.len() {
        for b in 0..a {
            for addr in running[b].net().listeners().await {
                let p = running[b].peer_id();
                running[a]
                    .net()
                    .dial(addr.with_p2p(p).unwrap_or_else(|a| a))
                    .await;
            }
        }
    }
    let mut status = running[0].status();
    let timeout = Duration::from_secs(60);
    let wait_round = |status: &mut tokio::sync::watch::Receiver<crate::swarm::status::Status>,
                      r: u64| {
        let mut status = status.clone();
        async move {
            tokio::time::timeout(timeout, status.wait_for(|s| s.head_round >= RoundId(r)))
                .await
                .map_err(|_| {
                    DaemonError::Setup(format!("round {r} did not complete within {timeout:?}"))
                })?
                .map_err(|_| DaemonError::Setup("node 0 stopped".into()))?;
            Ok::<Instant, DaemonError>(Instant::now())
        }
    };
    let mut last = wait_round(&mut status, 1).await?;
    let bytes_at = |running: &[Node]| -> u64 {
        running
            .iter()
            .map(|n| {
                n.net()
                    .traffic()
                    .bytes_out
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    };
    let start_bytes = bytes_at(&running);
    let mut times = Vec::new();
    for r in 2..=total {
        let now = wait_round(&mut status, r).await?;
        times.push(now - last);
        last = now;
    }
    // Every node finished the last round before its bytes are counted.
    for n in &running {
        let mut s = n.status();
        tokio::time::timeout(timeout, s.wait_for(|s| s.head_round >= RoundId(total)))
            .await
            .map_err(|_| DaemonError::Setup("a node did not finish".into()))?
            .map_err(|_| DaemonError::Setup("a node stopped".into()))?;
    }
    let bytes = bytes_at(&running) - start_bytes;
    let rss = peak_rss();
    for n in &running {
        n.shutdown();
    }
    for n in running {
        n.wait().await?;
    }
    Ok(RoundBench {
        rounds: times,
        bytes_per_node_per_round: bytes as f64 / nodes as f64 / rounds as f64,
        peak_rss: rss,
    })
}
