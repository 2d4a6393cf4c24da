//! The node as a long-running process: configuration in, a running [`Node`] out.
//!
//! [`Node::start`] opens and checks the store, starts the libp2p event loop and the round
//! engine as tasks, dials the consortium's known addresses, and keeps redialling members
//! that are not connected. [`run_until_signal`] is `cellswarm run`: it stops the node on
//! SIGTERM or SIGINT, waits for the engine to abandon its round and flush the store, and
//! returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cellswarm_common::config::{Config, ConfigError};
use cellswarm_common::identity::{Identity, IdentityError};
use cellswarm_common::ids::ModelHash;
use cellswarm_common::weights::Layout;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::data::DataError;
use crate::data::ctc::Movie;
use crate::data::dataset::{Annotated, AnnotatedMovie, load_annotated};
use crate::data::stream::{DEFAULT_RESIDENT_MB, TrainingFrames, open_training};
use crate::model::UNetConfig;
use crate::store::{BlobKind, DiskStore, Store, StoreError};
use crate::swarm::engine::{Engine, EngineError, EngineParts};
use crate::swarm::local::{LocalTrainer, VectorTrainer};
use crate::swarm::network::{self, NetClient, NetError, NetSettings};
use crate::swarm::status::{Metrics, Status};
use crate::train::TrainOptions;
use crate::train::site::UNetTrainer;

/// The `test-vector` architecture name (a protocol-test model).
pub const TEST_VECTOR: &str = "test-vector";

/// What keeps a node from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The key file could not be read.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The store could not be opened, or is damaged.
    #[error(
        "store {path}: {source}\n  the store is damaged; move it aside (or restore a backup) and start again: the node fetches the chain of merge records and the newest model from its peers"
    )]
    Store {
        /// The store folder.
        path: PathBuf,
        /// What failed.
        source: StoreError,
    },
    /// The network could not be set up.
    #[error("network: {0}")]
    Net(#[from] NetError),
    /// The engine stopped with an error.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Reading the site's movies failed.
    #[error("data: {0}")]
    Data(#[from] DataError),
    /// The site's data or model settings cannot be used.
    #[error("{0}")]
    Setup(String),
}

/// Builds the local trainer the configuration asks for: the `test-vector` model, or the
/// U-Net on the site's movies (or its synthetic movie).
///
/// # Errors
/// Unreadable movies, no annotated frames, or a model the trainer cannot build.
pub fn build_trainer(config: &Config) -> Result<Box<dyn LocalTrainer>, DaemonError> {
    let spec = &config.consortium.model;
    let training = &config.node.training;
    if spec.architecture == TEST_VECTOR {
        return Ok(Box::new(VectorTrainer::new(
            spec.params as usize,
            training.seed,
            config.node.testing.training_delay,
        )));
    }
    let (train, heldout) = site_frames(config)?;
    let options = TrainOptions {
        batch: training.batch_size as usize,
        learning_rate: training.learning_rate,
        dice_weight: training.dice_weight as f32,
        fedprox_mu: training.fedprox_mu as f32,
        seed: training.seed,
        sampler: crate::data::patches::SamplerConfig {
            patch: training.patch_size as usize,
            ..crate::data::patches::SamplerConfig::default()
        },
        cosine_decay: false,
        class_weights: crate::train::agreed_class_weights(spec),
        ..TrainOptions::default()
    };
    let unet = UNetConfig::from_spec(spec);
    let planes = train.into_planes(unet.diameter);
    let trainer = UNetTrainer::with_planes(
        unet,
        planes,
        heldout,
        options,
        u64::from(training.steps_per_round),
    )
    .map_err(|e| DaemonError::Setup(format!("building the U-Net trainer: {e}")))?;
    Ok(Box::new(trainer))
}

/// The site's training and held-out frames.
fn site_frames(config: &Config) -> Result<(TrainingFrames, Vec<Annotated>), DaemonError> {
    let data = &config.node.data;
    let mut movies = Vec::new();
    if let Some(s) = &data.synthetic {
        let profile = crate::synth::Profile::named(&s.profile).ok_or_else(|| {
            DaemonError::Setup(format!(
                "{}: data.synthetic.profile {:?} is not a known profile",
                config.node_file.display(),
                s.profile
            ))
        })?;
        let dir = config.node.store.resolved_path().join("synthetic");
        let seq = dir.join("01");
        if !seq.is_dir() {
            crate::synth::generate(&profile, s.frames as usize, s.seed).write_ctc(&dir, "01")?;
        }
        movies.push(seq);
    }
    movies.extend(data.movies.iter().cloned());
    let mut listed = Vec::new();
    let mut heldout = Vec::new();
    for path in &movies {
        let movie = Movie::open_channel(path, data.channel.as_deref())?;
        let held = match data.heldout_frames {
            Some(r) => load_annotated(&movie, Some(r))?,
            None => Vec::new(),
        };
        listed.push(AnnotatedMovie::open(&movie, data.train_frames)?.without(data.heldout_frames));
        heldout.extend(held);
    }
    let diameter = UNetConfig::from_spec(&config.consortium.model).diameter;
    let train = open_training(
        listed,
        diameter,
        data.max_resident_mb.unwrap_or(DEFAULT_RESIDENT_MB),
    )?;
    if matches!(&train, TrainingFrames::Resident(t) if t.is_empty()) {
        return Err(DaemonError::Setup(format!(
            "{}: no training frames (set data.movies or data.synthetic)",
            config.node_file.display()
        )));
    }
    Ok((train, heldout))
}

/// Local DP adds noise of norm about `sigma * C * sqrt(P)`: if that is over the
/// consortium's `max_update_norm`, every peer would refuse every delta of this site.
fn check_local_dp(config: &Config, params: usize) -> Result<(), ConfigError> {
    let Some(dp) = config.node.privacy.local_dp else {
        return Ok(());
    };
    let noise =
        cellswarm_aggregator::dp::expected_noise_norm(params, dp.clip_norm, dp.noise_multiplier);
    let norm = dp.clip_norm.hypot(noise) * 1.05;
    let bound = config.consortium.aggregation.max_update_norm;
    if norm > bound {
        return Err(ConfigError::Invalid {
            file: config.node_file.clone(),
            field: "privacy.local_dp".into(),
            problem: format!(
                "clip_norm {} with noise_multiplier {} gives updates of norm about {norm:.3e} over \
                 {params} parameters, above the consortium's aggregation.max_update_norm = {bound}: \
                 every peer would refuse them; lower noise_multiplier or clip_norm, or raise \
                 max_update_norm in the consortium file",
                dp.clip_norm, dp.noise_multiplier
            ),
        });
    }
    Ok(())
}

/// Opens the store of `config` and checks what its head points to. Damaged blobs are
/// quarantined and fetched again from peers; damaged metadata refuses to start.
///
/// # Errors
/// [`DaemonError::Store`] with the path and what to do.
pub fn open_store(config: &Config) -> Result<DiskStore, DaemonError> {
    let path = config.node.store.resolved_path();
    let wrap = |source| DaemonError::Store {
        path: path.clone(),
        source,
    };
    let store = DiskStore::open(&path, config.node.store.cache_capacity_bytes).map_err(wrap)?;
    let report = store.check().map_err(wrap)?;
    for q in &report.quarantined {
        tracing::warn!(file = %q.display(), "a stored file did not match its hash; quarantined, will fetch it from peers");
    }
    Ok(store)
}

/// Creates the genesis model of `config` in its store and returns its hash.
///
/// # Errors
/// A trainer that cannot be built, or a store that cannot be written.
pub fn create_genesis(config: &Config) -> Result<ModelHash, DaemonError> {
    let mut trainer = build_trainer(config)?;
    let model = trainer.genesis(0);
    let store = open_store(config)?;
    let hash = model.hash();
    let path = config.node.store.resolved_path();
    store
        .put_blob(BlobKind::Model, hash.as_bytes(), &model.to_bytes())
        .and_then(|()| store.flush())
        .map_err(|source| DaemonError::Store { path, source })?;
    Ok(hash)
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    peer_id: PeerId,
    status: watch::Receiver<Status>,
    metrics: Arc<Metrics>,
    net: NetClient,
    cancel: CancellationToken,
    tracker: TaskTracker,
    engine: JoinHandle<Result<(), EngineError>>,
}

impl Node {
    /// Starts a node: store, network, engine, and the dialler.
    ///
    /// # Errors
    /// A configuration this node is not a member of, a damaged store, an address that
    /// cannot be bound, or an engine that cannot be configured.
    pub async fn start(
        config: Config,
        identity: Identity,
        trainer: Box<dyn LocalTrainer>,
    ) -> Result<Self, DaemonError> {
        let peer_id = identity.peer_id();
        config.own_member(&peer_id)?;
        let store: Arc<dyn Store> = Arc::new(open_store(&config)?);
        let mut trainer = trainer;
        let layout: Arc<Layout> = Arc::clone(trainer.genesis(0).layout());
        check_local_dp(&config, layout.total())?;
        let (net, events, event_loop) =
            network::start(identity.libp2p_keypair(), &NetSettings::of(&config))?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(event_loop.run(cancel.clone()));
        let metrics = Arc::new(Metrics::default());
        let (status_tx, status) = watch::channel(Status::default());
        let bootstrap: Vec<Multiaddr> = config.node.net.bootstrap.clone();
        let known: Vec<(PeerId, Vec<Multiaddr>)> = config
            .consortium
            .members
            .iter()
            .filter(|m| m.peer_id != peer_id)
            .map(|m| (m.peer_id, m.addresses.clone()))
            .collect();
        // Each other relay's first address: where circuits to members are opened.
        let relays: Vec<(PeerId, Multiaddr)> =
            cellswarm_common::config::relay_groups(&config.consortium.relays)
                .into_iter()
                .filter(|(id, _)| *id != peer_id)
                .map(|(id, addrs)| (id, addrs[0].clone()))
                .collect();
        let status_cfg = config.node.status.clone();
        let engine = Engine::new(EngineParts {
            config,
            identity: Arc::new(identity),
            store,
            net: net.clone(),
            events,
            trainer,
            layout,
            metrics: Arc::clone(&metrics),
            status: status_tx,
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        })?;
        let engine = tracker.spawn(engine.run());
        tracker.spawn(redial(
            net.clone(),
            bootstrap,
            known,
            relays,
            cancel.clone(),
        ));
        if status_cfg.enabled {
            let server = crate::status_http::serve(
                status_cfg.listen,
                status.clone(),
                Arc::clone(&metrics),
                Arc::clone(net.traffic()),
                Arc::clone(net.links()),
                cancel.clone(),
            )
            .await
            .map_err(|e| {
                cancel.cancel();
                DaemonError::Setup(format!(
                    "status endpoint {}: {e} (change [status] listen, or set enabled = false)",
                    status_cfg.listen
                ))
            })?;
            tracker.spawn(server);
        }
        tracker.close();
        Ok(Self {
            peer_id,
            status,
            metrics,
            net,
            cancel,
            tracker,
            engine,
        })
    }

    /// This node's PeerId.
    #[must_use]
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Status snapshots (a watch channel: wait on changes).
    #[must_use]
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The node's counters.
    #[must_use]
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The network handle (addresses, dialling, traffic counters).
    #[must_use]
    pub fn net(&self) -> &NetClient {
        &self.net
    }

    /// Asks the node to stop (abandon the round, flush, close connections).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits for the node to stop (after [`Node::shutdown`] or a fatal error).
    ///
    /// # Errors
    /// The engine's error, if it stopped with one.
    pub async fn wait(self) -> Result<(), DaemonError> {
        let result = match self.engine.await {
            Ok(r) => r.map_err(DaemonError::from),
            Err(e) => Err(DaemonError::Setup(format!("the engine task failed: {e}"))),
        };
        // Whatever stopped the engine stops the rest.
        self.cancel.cancel();
        self.tracker.wait().await;
        result
    }
}

/// Dials the bootstrap addresses once, and the members' known addresses now and again
/// every few seconds for each member that is not connected (peers restart; a daemon runs
/// for months).
async fn redial(
    net: NetClient,
    bootstrap: Vec<Multiaddr>,
    known: Vec<(PeerId, Vec<Multiaddr>)>,
    relays: Vec<(PeerId, Multiaddr)>,
    cancel: CancellationToken,
) {
    for a in bootstrap {
        net.dial(a).await;
    }
    if known.iter().all(|(_, a)| a.is_empty()) && relays.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Ticks each member has been unreachable in a row.
    let mut missed: std::collections::HashMap<PeerId, u32> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let connected = net.connected().await;
        for (peer, addrs) in &known {
            if connected.contains(peer) {
                missed.remove(peer);
                continue;
            }
            for a in addrs {
                net.dial(a.clone().with_p2p(*peer).unwrap_or_else(|a| a))
                    .await;
            }
            // A member without an address, or not reached directly for two tries, is
            // dialled through every relay (it holds a slot there if it is behind NAT);
            // hole punching then upgrades the relayed connection where the NATs allow.
            let n = missed.entry(*peer).or_default();
            *n += 1;
            // Through relays from the first try when it has no address, else from the
            // third; after a few tries at 3 s, backing off to one a minute (a member that
            // is offline for days costs the relay a refused circuit a minute).
            let tries = if addrs.is_empty() {
                *n
            } else {
                n.saturating_sub(2)
            };
            let due = (1..=3).contains(&tries)
                || (tries < 20 && tries.is_power_of_two())
                || (tries > 0 && tries % 20 == 0);
            if due {
                for (id, r) in &relays {
                    if id == peer {
                        continue;
                    }
                    let via = r
                        .clone()
                        .with(libp2p::multiaddr::Protocol::P2pCircuit)
                        .with_p2p(*peer)
                        .unwrap_or_else(|a| a);
                    net.dial(via).await;
                }
            }
        }
    }
}

/// `cellswarm run`: runs the node of `config` until SIGTERM or SIGINT, then stops it
/// cleanly (the round in progress is abandoned, the store flushed).
///
/// # Errors
/// Start-up failures, or an engine that stops with an error.
pub async fn run_until_signal(config: Config) -> Result<(), DaemonError> {
    let identity = Identity::load_key_file(&config.node.identity.key_file)?;
    let trainer = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || build_trainer(&config))
            .await
            .map_err(|e| DaemonError::Setup(e.to_string()))??
    };
    let node = Node::start(config, identity, trainer).await?;
    tracing::info!(peer = %node.peer_id(), "node running; stop with SIGTERM or Ctrl-C");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| DaemonError::Setup(format!("installing the SIGTERM handler: {e}")))?;
    let mut status = node.status();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        // The engine stopped by itself (an error): report it below.
        () = async { while status.changed().await.is_ok() {} } => {}
    }
    node.shutdown();
    node.wait().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use cellswarm_common::config::{ConsortiumConfig, NodeConfig};
    use cellswarm_common::ids::RoundId;

    use super::*;

    #[test]
    fn a_site_over_its_memory_budget_streams_its_frames_and_trains() {
        let dir = tempfile::tempdir().unwrap();
        let node_file = dir.path().join("site.toml");
        let site = format!(
            "[data]\nmax_resident_mb = 0\nheldout_frames = \"4-4\"\n\n[data.synthetic]\nprofile = \"balanced\"\nframes = 5\nseed = 2\n\n\
             [training]\nsteps_per_round = 6\nbatch_size = 2\npatch_size = 32\n\n[store]\npath = {:?}\n",
            dir.path().join("store").display().to_string()
        );
        let config = Config {
            node: NodeConfig::from_toml(&site, &node_file).unwrap(),
            consortium: ConsortiumConfig::from_toml(
                "name = \"t\"\nmembers = []\n\n[model]\ndepth = 2\nbase_channels = 4\n",
                &dir.path().join("consortium.toml"),
            )
            .unwrap(),
            node_file,
        };
        let (train, heldout) = site_frames(&config).unwrap();
        match train {
            TrainingFrames::Streamed(s) => assert_eq!((s.frames(), s.resident()), (4, 2)),
            TrainingFrames::Resident(_) => panic!("a zero budget streams"),
        }
        assert_eq!(heldout.len(), 1);
        let mut trainer = build_trainer(&config).unwrap();
        let base = trainer.genesis(1);
        let round = trainer
            .train_round(&base, RoundId(1), &AtomicBool::new(false))
            .unwrap();
        assert_eq!(round.samples, 12, "6 steps of 2 patches");
        assert!(round.metrics.train_loss.is_finite());
        assert_eq!(round.metrics.steps, 6);
    }
}
