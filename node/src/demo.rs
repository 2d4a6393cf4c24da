//! `cellswarm demo`: a consortium of sites on one machine, and a report.
//!
//! Each site gets its own synthetic movie from a different profile (non-IID) or one of
//! the real CTC movies given with `--data`; its node runs in this process with its own
//! libp2p swarm on loopback, its own sled store and its own key, and trains the U-Net on
//! its frames only. Beside the swarm, each site also trains a *local-only* model with the
//! same steps from the same start, and one *pooled* model trains on all sites' training
//! frames together (what a consortium could do if data could move: the same network, seed
//! and total optimiser steps as the whole swarm), so the report can show what the swarm
//! adds and what it leaves on the table. After each round the merged, pooled and local
//! models are scored on every site's held-out frames and on their union.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellswarm_aggregator::dp::RdpAccountant;
use cellswarm_common::config::Config;
use cellswarm_common::identity::Identity;
use cellswarm_common::ids::{ModelHash, RoundId};
use cellswarm_common::weights::{Limits, Weights};
use serde::Serialize;
use tokio::sync::watch;

use crate::daemon::{DaemonError, Node};
use crate::data::ctc::Movie;
use crate::data::dataset::{Annotated, load_annotated};
use crate::data::patches::SamplerConfig;
use crate::data::volume::Labels;
use crate::infer::{InferOptions, classical_segment, segment};
use crate::metrics::{MatchCounts, Overlaps, match_counts};
use crate::model::{UNetConfig, default_device, save_model};
use crate::store::{BlobKind, DiskStore, Store};
use crate::swarm::local::{LocalTrainer, RoundError, TrainedRound};
use crate::train::TrainOptions;
use crate::train::params::load_weights;
use crate::train::site::{UNetTrainer, movie_counts};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Sites (one node each).
    pub sites: usize,
    /// Rounds.
    pub rounds: u64,
    /// Optimiser steps per site per round.
    pub steps: u64,
    /// Real CTC sequence folders, one per site (synthetic movies when empty).
    pub data: Vec<PathBuf>,
    /// Frames per synthetic movie.
    pub frames: u32,
    /// Held-out fields of view per synthetic site ([`HELDOUT_FIELDS`] by default).
    pub fields: usize,
    /// Report folder.
    pub out: PathBuf,
    /// Seed of the synthetic movies and of training.
    pub seed: u64,
    /// Channels of the U-Net's first level.
    pub width: usize,
    /// Patches per step.
    pub batch: usize,
    /// Patch side.
    pub patch: usize,
    /// Local differential privacy on every site: (clip norm C, noise multiplier sigma).
    pub local_dp: Option<(f64, f64)>,
    /// Privacy audit: every message the first site's node sends is appended to this file
    /// (`net.capture_sent`).
    pub capture_sent: Option<PathBuf>,
    /// Adam learning rate of every site (and of the local and pooled models).
    pub learning_rate: f64,
    /// The consortium's merge strategy (`[aggregation] strategy`).
    pub strategy: String,
    /// Server learning rate of the server optimisers (FedAdam, FedYogi, FedAdagrad).
    pub server_learning_rate: f64,
    /// FedAvg's server step size (`[aggregation] server_step`).
    pub server_step: f64,
    /// FedProx mu of every site (0: off).
    pub fedprox_mu: f64,
    /// Zoom, blur and noise augmentation (rotations, flips and intensity changes always).
    pub augment: bool,
    /// Decay every model's learning rate along one cosine over all rounds.
    pub lr_decay: bool,
    /// A site (0-based, among all sites) that does not train: every model, and the
    /// classical baseline, is scored on all its annotated frames (leave one site out).
    pub unseen: Option<usize>,
    /// Cell width in pixels every model trains at (0: each movie's own scale), as the
    /// consortium file's `[model] diameter`.
    pub diameter: u32,
    /// Instance representation of every model (the consortium file's
    /// `[model] instances`).
    pub instances: cellswarm_common::config::InstanceHead,
    /// Train the local-only and pooled models beside the swarm (off: the swarm alone,
    /// a third of the work, to train a consortium's model such as the generalist).
    pub baselines: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            sites: 3,
            rounds: 6,
            // 30 steps of 8 patches of 64 x 64: batches of 4 or fewer patches hit a slow
            // direct convolution in burn-flex's weight gradient (3x slower per patch;
            // docs/benchmarks.md).
            steps: 30,
            data: Vec::new(),
            frames: 9,
            fields: HELDOUT_FIELDS,
            out: PathBuf::from("cellswarm-demo"),
            seed: 1,
            width: 8,
            batch: 8,
            patch: 64,
            local_dp: None,
            capture_sent: None,
            learning_rate: 3e-3,
            strategy: "fedavg".to_owned(),
            server_learning_rate: 0.01,
            server_step: 1.0,
            fedprox_mu: 0.1,
            augment: true,
            lr_decay: true,
            unseen: None,
            diameter: cellswarm_common::config::DEFAULT_DIAMETER,
            instances: cellswarm_common::config::InstanceHead::default(),
            baselines: true,
        }
    }
}

/// One round of the report.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// The round.
    pub round: u64,
    /// The merged model's hash.
    pub model: String,
    /// Each site's mean training loss in this round.
    pub train_loss: BTreeMap<String, f32>,
    /// The swarm model's F1 on each site's held-out frames.
    pub f1_swarm: BTreeMap<String, f64>,
    /// Each site's local-only model's F1 on its own held-out frames.
    pub f1_local: BTreeMap<String, f64>,
    /// The pooled model's F1 on each site's held-out frames.
    pub f1_pooled: BTreeMap<String, f64>,
    /// F1 on the union of all sites' held-out frames: `swarm` and `pooled`.
    pub union: BTreeMap<String, f64>,
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// Each site's local-DP epsilon spent after this round (empty without local DP).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub epsilon: BTreeMap<String, f64>,
}

/// The whole report (`metrics.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Site names, in order.
    pub sites: Vec<String>,
    /// Where each site's movie came from.
    pub movies: Vec<String>,
    /// Per-round results.
    pub rounds: Vec<RoundReport>,
    /// Row labels of the cross-site matrix: `swarm`, `pooled`, then `local:<site>`.
    pub cross_site_models: Vec<String>,
    /// F1 of every model (rows) on every site's held-out frames (columns).
    pub cross_site_f1: Vec<Vec<f64>>,
    /// F1 of every model on the union of all sites' held-out frames (objects matched on
    /// each frame, counts summed over all frames of all sites): `swarm`, `pooled`,
    /// `local:<site>`.
    pub union: BTreeMap<String, f64>,
    /// Mean over sites of the swarm model's F1.
    pub swarm_mean_f1: f64,
    /// Mean over sites of the pooled model's F1 (NaN, written as null, without
    /// baselines).
    pub pooled_mean_f1: f64,
    /// The best mean over sites of any local-only model's F1 (NaN, written as null,
    /// without baselines).
    pub best_local_mean_f1: f64,
    /// The final model's hash.
    pub final_model: String,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Local DP settings, if on: clip norm, noise multiplier and the delta of (epsilon, delta).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_dp: Option<LocalDpReport>,
    /// The site that did not train, if one was left out, and every model's F1 on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unseen: Option<UnseenReport>,
}

/// Scores on a site that took no part in training (leave one site out).
#[derive(Debug, Clone, Serialize)]
pub struct UnseenReport {
    /// The site's name.
    pub site: String,
    /// Its movie.
    pub movie: String,
    /// Annotated frames scored (all of the movie's).
    pub frames: usize,
    /// Objects in those frames' reference masks.
    pub objects: u64,
    /// F1 at IoU 0.5 of `swarm`, `pooled`, every `local:<site>` and `classical` (Otsu
    /// threshold and distance-transform watershed, no network).
    pub f1: BTreeMap<String, f64>,
}

/// Local DP settings of a demo run.
#[derive(Debug, Clone, Serialize)]
pub struct LocalDpReport {
    /// Clipping norm C.
    pub clip_norm: f64,
    /// Noise multiplier sigma (noise standard deviation sigma * C).
    pub noise_multiplier: f64,
    /// The delta of the (epsilon, delta) reported.
    pub delta: f64,
    /// The epsilon each site's node reported spent at the end (its own accountant).
    pub epsilon: BTreeMap<String, f64>,
}

/// The delta of the (epsilon, delta) the demo reports under local DP.
pub const DEMO_DP_DELTA: f64 = 1e-5;

/// A site's data.
struct Site {
    name: String,
    movie: PathBuf,
    train: Vec<Annotated>,
    heldout: Vec<Annotated>,
}

/// Records each round's training loss of a node's trainer.
struct Recording {
    inner: UNetTrainer,
    losses: Arc<Mutex<BTreeMap<u64, f32>>>,
    /// Round r's merged model arrives as the base of round r + 1 (node 0 only).
    models: Option<watch::Sender<BTreeMap<u64, Weights>>>,
}

impl LocalTrainer for Recording {
    fn genesis(&mut self, seed: u64) -> Weights {
        self.inner.genesis(seed)
    }

    fn train_round(
        &mut self,
        base: &Weights,
        round: RoundId,
        cancel: &AtomicBool,
    ) -> Result<TrainedRound, RoundError> {
        if let Some(m) = &self.models {
            m.send_modify(|map| {
                map.insert(round.0 - 1, base.clone());
            });
        }
        let r = self.inner.train_round(base, round, cancel)?;
        if let Ok(mut l) = self.losses.lock() {
            l.insert(round.0, r.metrics.train_loss);
        }
        Ok(r)
    }

    fn evaluate(&mut self, _model: &Weights) -> Option<f32> {
        // The demo scores every model on every site itself.
        None
    }
}

fn setup_err(what: &str) -> impl Fn(std::io::Error) -> DaemonError + '_ {
    move |e| DaemonError::Setup(format!("{what}: {e}"))
}

/// Site profiles in the order sites get them: different imaging (noise) and different
/// cell densities and shapes, so that no site's data stands for the others'.
const DEMO_PROFILES: [&str; 5] = ["noisy", "dense", "sparse", "balanced", "fast"];

/// Fields of view each synthetic site is scored on by default (the last frame of a
/// movie of its own each, with other cells than the movie it trains on).
pub const HELDOUT_FIELDS: usize = 6;

/// Most held-out fields of view per synthetic site: [`field_seed`] gives each site 64
/// seeds of its own.
pub const MAX_FIELDS: usize = 64;

/// Seed of held-out field `k` (below [`MAX_FIELDS`]) of synthetic site `site` (far from
/// the training movies' seeds `seed + site`).
fn field_seed(seed: u64, site: usize, k: usize) -> u64 {
    seed.wrapping_mul(1_000_003)
        .wrapping_add(0x5eed_0000 + (site as u64) * MAX_FIELDS as u64 + k as u64)
}

fn site_name(i: usize) -> String {
    format!("site-{}", (b'a' + (i % 26) as u8) as char)
}

/// Prepares the sites' movies: synthetic ones from different profiles, or `data`.
fn prepare_sites(o: &DemoOptions) -> Result<Vec<Site>, DaemonError> {
    let mut sites = Vec::new();
    for i in 0..o.sites {
        let name = site_name(i);
        // A `--data` entry `synthetic:<profile>` is a synthetic site among real ones.
        let synthetic = match o.data.get(i) {
            None => Some(DEMO_PROFILES[i % DEMO_PROFILES.len()]),
            Some(p) => p.to_str().and_then(|p| p.strip_prefix("synthetic:")),
        };
        if let Some(profile_name) = synthetic {
            if o.frames == 0 {
                return Err(DaemonError::Setup(
                    "--frames must be at least 1 (frames of each synthetic site's movie)".into(),
                ));
            }
            if !(1..=MAX_FIELDS).contains(&o.fields) {
                return Err(DaemonError::Setup(format!(
                    "--fields must be between 1 and {MAX_FIELDS} (held-out fields of view of \
                     each synthetic site)"
                )));
            }
            let profile = crate::synth::Profile::named(profile_name)
                .ok_or_else(|| DaemonError::Setup(format!("no profile {profile_name}")))?;
            let dir = o.out.join("data").join(&name);
            let seq = dir.join("01");
            if !seq.is_dir() {
                crate::synth::generate(&profile, o.frames as usize, o.seed + i as u64)
                    .write_ctc(&dir, "01")?;
            }
            // The site trains on all of its movie and is scored on other fields of view
            // from the same microscope: new cells, never frames of the cells it trained
            // on (consecutive frames show the same cells a pixel or two apart, which
            // rewards a model for remembering them).
            let train = load_annotated(&Movie::open(&seq)?, None)?;
            let mut heldout = Vec::with_capacity(o.fields);
            for k in 0..o.fields {
                let field = format!("{:02}", k + 2);
                let fseq = dir.join(&field);
                if !fseq.is_dir() {
                    crate::synth::generate(&profile, o.frames as usize, field_seed(o.seed, i, k))
                        .write_ctc(&dir, &field)?;
                }
                // The field's last frame: cells that have moved, grown and divided.
                heldout.extend(load_annotated(&Movie::open(&fseq)?, None)?.pop());
            }
            sites.push(Site {
                name,
                movie: seq,
                train,
                heldout,
            });
            continue;
        }
        let movie = o.data[i].clone();
        let m = Movie::open(&movie)?;
        let all = load_annotated(&m, None)?;
        if all.len() < 2 {
            return Err(DaemonError::Setup(format!(
                "{}: needs at least 2 annotated frames (one to train on, one held out)",
                movie.display()
            )));
        }
        // A real movie: the last quarter of its annotated frames (at least one) is held
        // out.
        let held = (all.len() / 4).max(1);
        let split = all.len() - held;
        let mut train = all;
        let heldout = train.split_off(split);
        sites.push(Site {
            name,
            movie,
            train,
            heldout,
        });
    }
    Ok(sites)
}

fn unet_config(o: &DemoOptions) -> UNetConfig {
    UNetConfig::new()
        .with_depth(3)
        .with_base_channels(o.width)
        .with_diameter((o.diameter > 0).then_some(o.diameter))
        .with_distance(o.instances == cellswarm_common::config::InstanceHead::Distance)
}

/// Training options of site `site`; the pooled model is "site" `o.sites`.
fn train_options(o: &DemoOptions, site: usize) -> TrainOptions {
    TrainOptions {
        batch: o.batch,
        learning_rate: o.learning_rate,
        fedprox_mu: o.fedprox_mu as f32,
        seed: o.seed * 1000 + site as u64,
        sampler: {
            let augmented = SamplerConfig {
                patch: o.patch,
                ..SamplerConfig::default()
            };
            // Without augmentation: no zoom, blur or noise (rotations, flips and
            // intensity changes stay).
            if o.augment {
                augmented
            } else {
                SamplerConfig {
                    zoom: 1.0,
                    blur: 0.0,
                    noise: 0.0,
                    ..augmented
                }
            }
        },
        cosine_decay: false,
        // Every model of the demo (swarm members, local-only and pooled) trains the
        // objective of the demo's consortium file, which keeps the default weights.
        class_weights: crate::train::agreed_class_weights(
            &cellswarm_common::config::ModelSpec::default(),
        ),
        ..TrainOptions::default()
    }
}

/// The trainer of site `index` (the pooled model is "site" `o.sites`) taking `steps`
/// steps a round.
fn trainer(
    o: &DemoOptions,
    config: &UNetConfig,
    frames: &[Annotated],
    index: usize,
    steps: u64,
) -> Result<UNetTrainer, DaemonError> {
    let t = UNetTrainer::new(
        config.clone(),
        frames,
        Vec::new(),
        train_options(o, index),
        steps,
    )
    .map_err(|e| DaemonError::Setup(e.to_string()))?;
    Ok(if o.lr_decay {
        t.with_cosine_rounds(o.rounds)
    } else {
        t
    })
}

/// Writes key files, site files and the consortium file; returns the site files.
fn write_configs(
    o: &DemoOptions,
    sites: &[Site],
    genesis: ModelHash,
) -> Result<Vec<(PathBuf, Identity)>, DaemonError> {
    let root = o.out.join("swarm");
    std::fs::create_dir_all(&root).map_err(setup_err("creating the swarm folder"))?;
    let mut consortium = format!(
        "name = \"cellswarm-demo\"\ngenesis = \"{genesis}\"\n\n[model]\narchitecture = \"unet\"\n\
         depth = 3\nbase_channels = {}\ndiameter = {}\ninstances = \"{}\"\n\n[rounds]\nmin_peers = {}\ncollect_timeout = \"30m\"\n\
         merge_timeout = \"2m\"\nmax_rounds = {}\n\n[aggregation]\nstrategy = {:?}\n\
         server_learning_rate = {:?}\nserver_step = {:?}\nmax_update_norm = 1e6\n",
        o.width,
        o.diameter,
        o.instances.name(),
        sites.len(),
        o.rounds,
        o.strategy,
        o.server_learning_rate,
        o.server_step,
    );
    let mut out = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&o.seed.to_le_bytes());
        seed[8] = i as u8 + 1;
        let id = Identity::from_seed(seed)?;
        let dir = root.join(&s.name);
        std::fs::create_dir_all(&dir).map_err(setup_err("creating a site folder"))?;
        let _ = write!(
            consortium,
            "\n[[members]]\nname = \"{}\"\npeer_id = \"{}\"\n",
            s.name,
            id.peer_id()
        );
        let movie = s.movie.canonicalize().unwrap_or_else(|_| s.movie.clone());
        let file = dir.join("cellswarm.toml");
        std::fs::write(
            &file,
            format!(
                "consortium = \"../consortium.toml\"\n\n[net]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n{}\n\
                 [data]\nmovies = [{:?}]\n\n[training]\nsteps_per_round = {}\nbatch_size = {}\n\
                 patch_size = {}\nseed = {}\nlearning_rate = {:?}\nfedprox_mu = {:?}\n\n[store]\npath = \"store\"\n\n[status]\nenabled = false\n{}",
                o.capture_sent
                    .as_ref()
                    .filter(|_| i == 0)
                    .map_or(String::new(), |p| format!(
                        "capture_sent = {:?}\n",
                        std::path::absolute(p).unwrap_or_else(|_| p.clone()).display().to_string()
                    )),
                movie.display().to_string(),
                o.steps,
                o.batch,
                o.patch,
                i,
                o.learning_rate,
                o.fedprox_mu,
                o.local_dp.map_or(String::new(), |(c, z)| format!(
                    "\n[privacy.local_dp]\nclip_norm = {c:?}\nnoise_multiplier = {z:?}\ndelta = {DEMO_DP_DELTA:?}\n"
                )),
            ),
        )
        .map_err(setup_err("writing a site file"))?;
        out.push((file, id));
    }
    std::fs::write(root.join("consortium.toml"), consortium)
        .map_err(setup_err("writing the consortium file"))?;
    Ok(out)
}

/// Object matches at IoU 0.5 of `model` on `frames`, one site's held-out frames (F1 from
/// `.scores(0.5).f1`; counts add up over sites for the union). Each movie among them
/// (a synthetic site's fields of view are movies of their own) is segmented as
/// `cellswarm segment` segments a movie: at one cell width estimated on it.
fn score(
    config: &UNetConfig,
    model: &Weights,
    frames: &[Annotated],
) -> Result<MatchCounts, DaemonError> {
    let device = default_device();
    let mut net = config.init(&device);
    load_weights(&mut net, model)
        .map_err(|e| DaemonError::Setup(format!("loading weights: {e}")))?;
    let mut counts = MatchCounts::default();
    for movie in frames.chunk_by(|a, b| a.movie == b.movie) {
        counts += movie_counts(&net, config, &device, movie, &InferOptions::default());
    }
    Ok(counts)
}

/// Scores of one model on each site and on the union of all sites' held-out frames.
fn score_sites(
    config: &UNetConfig,
    model: &Weights,
    held: &[Vec<Annotated>],
) -> Result<(Vec<f64>, f64), DaemonError> {
    let mut union = MatchCounts::default();
    let mut per_site = Vec::with_capacity(held.len());
    for h in held {
        let c = score(config, model, h)?;
        per_site.push(c.scores(0.5).f1);
        union += c;
    }
    Ok((per_site, union.scores(0.5).f1))
}

fn read_model(store: &Path, hash: ModelHash) -> Result<Weights, DaemonError> {
    let path = store.join("blobs/models").join(hash.to_hex());
    let bytes = std::fs::read(&path).map_err(setup_err("reading the merged model"))?;
    let limits = Limits {
        max_tensors: 4096,
        max_params: 1 << 28,
    };
    let w = Weights::from_bytes(&bytes, &limits)
        .map_err(|e| DaemonError::Setup(format!("{}: {e}", path.display())))?;
    if w.hash() != hash {
        return Err(DaemonError::Setup(format!(
            "{} does not match its hash",
            path.display()
        )));
    }
    Ok(w)
}

/// Runs the demo, printing one line per round to stdout, and writes the report.
///
/// # Errors
/// Unreadable movies, a swarm that does not finish, or a report that cannot be written.
pub async fn run(o: DemoOptions) -> Result<Report, DaemonError> {
    if !o.data.is_empty() && o.data.len() != o.sites {
        return Err(DaemonError::Setup(format!(
            "--data gives {} movies for {} sites: give one per site (or change --sites)",
            o.data.len(),
            o.sites
        )));
    }
    if let Some(problem) = cellswarm_common::config::ModelSpec::diameter_problem(o.diameter) {
        return Err(DaemonError::Setup(format!("--diameter {problem}")));
    }
    if let Some(k) = o.unseen.filter(|&k| k >= o.sites || o.sites < 3) {
        return Err(DaemonError::Setup(format!(
            "cannot leave site {k} out of {} sites: give an index below the number of \
             sites and at least 3 sites (two must train)",
            o.sites
        )));
    }
    let start = Instant::now();
    std::fs::create_dir_all(&o.out).map_err(setup_err("creating the report folder"))?;
    let mut sites = {
        let o = o.clone();
        tokio::task::spawn_blocking(move || prepare_sites(&o))
            .await
            .map_err(|e| DaemonError::Setup(e.to_string()))??
    };
    // The site left out trains nothing: all its annotated frames are scored.
    let unseen = o.unseen.map(|k| {
        let mut s = sites.remove(k);
        let mut all = std::mem::take(&mut s.train);
        all.append(&mut s.heldout);
        s.heldout = all;
        s
    });
    let config = unet_config(&o);
    let device = default_device();
    device.seed(0);
    let genesis_weights = crate::train::params::to_weights(&config.init(&device))
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    let genesis = genesis_weights.hash();
    let files = write_configs(&o, &sites, genesis)?;
    println!(
        "cellswarm demo: {} sites ({}), {} rounds of {} steps; report in {}",
        sites.len(),
        sites
            .iter()
            .map(|s| format!(
                "{} {} train/{} held-out frames",
                s.name,
                s.train.len(),
                s.heldout.len()
            ))
            .collect::<Vec<_>>()
            .join(", "),
        o.rounds,
        o.steps,
        o.out.display()
    );

    // Start the nodes; each store gets the genesis model first.
    let (models_tx, mut models_rx) = watch::channel(BTreeMap::<u64, Weights>::new());
    let mut nodes = Vec::new();
    let mut losses = Vec::new();
    let mut stores = Vec::new();
    for (i, (file, id)) in files.into_iter().enumerate() {
        let cfg = Config::load(&file)?;
        let store_path = cfg.node.store.resolved_path();
        {
            let store =
                DiskStore::open(&store_path, 1 << 20).map_err(|source| DaemonError::Store {
                    path: store_path.clone(),
                    source,
                })?;
            store
                .put_blob(
                    BlobKind::Model,
                    genesis.as_bytes(),
                    &genesis_weights.to_bytes(),
                )
                .map_err(|source| DaemonError::Store {
                    path: store_path.clone(),
                    source,
                })?;
        }
        let inner = trainer(&o, &config, &sites[i].train, i, o.steps)?;
        let l = Arc::new(Mutex::new(BTreeMap::new()));
        losses.push(Arc::clone(&l));
        stores.push(store_path);
        let models = (i == 0).then(|| models_tx.clone());
        nodes.push(
            Node::start(
                cfg,
                id,
                Box::new(Recording {
                    inner,
                    losses: l,
                    models,
                }),
            )
            .await?,
        );
    }
    for a in 0..nodes.len() {
        for b in 0..a {
            let p = nodes[b].peer_id();
            for addr in nodes[b].net().listeners().await {
                nodes[a]
                    .net()
                    .dial(addr.with_p2p(p).unwrap_or_else(|a| a))
                    .await;
            }
        }
    }

    // Local-only models, trained beside the swarm with the same steps per round, round
    // by round, so each round's line can compare the two; and the pooled model, trained
    // on every site's training frames with as many steps per round as all sites
    // together.
    let heldout: Arc<Vec<Vec<Annotated>>> =
        Arc::new(sites.iter().map(|s| s.heldout.clone()).collect());
    let names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
    // One thread per model (the last one pooled), each sending its model after every
    // round, so no model waits for another.
    let mut model_rx = Vec::new();
    let mut local_tasks = Vec::new();
    {
        // Without baselines, no local-only or pooled model (and no copy of the frames).
        let jobs: Vec<(Vec<Annotated>, usize, u64)> = if o.baselines {
            let train: Vec<Vec<Annotated>> = sites.iter().map(|s| s.train.clone()).collect();
            let all: Vec<Annotated> = train.iter().flatten().cloned().collect();
            train
                .into_iter()
                .enumerate()
                .map(|(i, t)| (t, i, o.steps))
                .chain(std::iter::once((
                    all,
                    sites.len(),
                    o.steps * sites.len() as u64,
                )))
                .collect()
        } else {
            Vec::new()
        };
        for (frames, index, steps) in jobs {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Weights, DaemonError>>();
            model_rx.push(rx);
            let config = config.clone();
            let genesis_weights = genesis_weights.clone();
            let o = o.clone();
            let rounds = o.rounds;
            local_tasks.push(tokio::task::spawn_blocking(move || {
                let mut t = match trainer(&o, &config, &frames, index, steps) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.send(Err(DaemonError::Setup(e.to_string())));
                        return;
                    }
                };
                drop(frames);
                let mut current = genesis_weights;
                for r in 1..=rounds {
                    match t.train_round(&current, RoundId(r), &AtomicBool::new(false)) {
                        Ok(x) => current = x.weights,
                        Err(e) => {
                            let _ = tx.send(Err(DaemonError::Setup(e.to_string())));
                            return;
                        }
                    }
                    if tx.send(Ok(current.clone())).is_err() {
                        return;
                    }
                }
            }));
        }
    }

    // Follow the swarm round by round (waiting on status changes).
    let mut status = nodes[0].status();
    let mut rounds = Vec::new();
    let mut last_local: Vec<Weights> = Vec::new();
    let mut last_pooled: Option<Weights> = None;
    let mut last_swarm: Option<(ModelHash, Weights)> = None;
    // The last round's scores of the swarm and the pooled model: the final models are
    // those, and scoring is deterministic, so the cross-site matrix takes them as they are.
    type SiteScores = (Vec<f64>, f64);
    let mut last_scores: Option<(SiteScores, Option<SiteScores>)> = None;
    for r in 1..=o.rounds {
        let hour = Duration::from_secs(3600);
        let late = |_| DaemonError::Setup(format!("round {r} did not finish within an hour"));
        let model = if r < o.rounds {
            // The model of round r is the base node 0 trains round r + 1 from.
            tokio::time::timeout(hour, models_rx.wait_for(|m| m.contains_key(&r)))
                .await
                .map_err(late)?
                .map_err(|_| DaemonError::Setup("the first node stopped".into()))?
                .get(&r)
                .cloned()
                .ok_or_else(|| DaemonError::Setup("a recorded model vanished".into()))?
        } else {
            let s =
                tokio::time::timeout(hour, status.wait_for(|s| s.head_round.0 >= r && s.stopped))
                    .await
                    .map_err(late)?
                    .map_err(|_| DaemonError::Setup("the first node stopped".into()))?
                    .clone();
            let hash = s
                .model
                .ok_or_else(|| DaemonError::Setup("a committed round without a model".into()))?;
            read_model(&stores[0], hash)?
        };
        let hash = model.hash();
        let mut local = Vec::with_capacity(model_rx.len());
        for rx in &mut model_rx {
            local.push(
                rx.recv()
                    .await
                    .ok_or_else(|| DaemonError::Setup("local-only training stopped".into()))??,
            );
        }
        let pooled = local.pop();
        let ((f1, union_swarm), pooled_scores, f1_local) = {
            let config = config.clone();
            let held = Arc::clone(&heldout);
            let m = model.clone();
            let l = local.clone();
            let p = pooled.clone();
            tokio::task::spawn_blocking(move || -> Result<_, DaemonError> {
                let swarm = score_sites(&config, &m, &held)?;
                let pooled = p.map(|p| score_sites(&config, &p, &held)).transpose()?;
                let local = held
                    .iter()
                    .zip(&l)
                    .map(|(h, w)| Ok(score(&config, w, h)?.scores(0.5).f1))
                    .collect::<Result<Vec<_>, DaemonError>>()?;
                Ok((swarm, pooled, local))
            })
            .await
            .map_err(|e| DaemonError::Setup(e.to_string()))??
        };
        let loss: BTreeMap<String, f32> = names
            .iter()
            .zip(&losses)
            .filter_map(|(n, l)| {
                l.lock()
                    .ok()
                    .and_then(|m| m.get(&r).copied())
                    .map(|v| (n.clone(), v))
            })
            .collect();
        let fmt = |v: &[f64]| {
            names
                .iter()
                .zip(v)
                .map(|(n, v)| format!("{n}={v:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        // Every site releases one privatized delta per round: the epsilon after round r
        // is r Gaussian mechanisms (the nodes' own accountants, read at the end, agree).
        let epsilon: BTreeMap<String, f64> = o
            .local_dp
            .map(|(_, z)| {
                let acc = (0..r).fold(RdpAccountant::default(), |a, _| a.after(z));
                let e = acc.epsilon(DEMO_DP_DELTA);
                names.iter().map(|n| (n.clone(), e)).collect()
            })
            .unwrap_or_default();
        println!(
            "round {r:>2}  model {}  loss {}  F1 swarm {}{}  union swarm={union_swarm:.3}{}{}",
            hash.short(),
            names
                .iter()
                .map(|n| format!("{n}={:.3}", loss.get(n).copied().unwrap_or(f32::NAN)))
                .collect::<Vec<_>>()
                .join(" "),
            fmt(&f1),
            if f1_local.is_empty() {
                String::new()
            } else {
                format!("  local-only {}", fmt(&f1_local))
            },
            pooled_scores
                .as_ref()
                .map(|(_, u)| format!(" pooled={u:.3}"))
                .unwrap_or_default(),
            if epsilon.is_empty() {
                String::new()
            } else {
                format!(
                    "  DP epsilon {}",
                    epsilon
                        .iter()
                        .map(|(n, e)| format!("{n}={e:.3e}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            },
        );
        rounds.push(RoundReport {
            round: r,
            model: hash.to_hex(),
            train_loss: loss,
            f1_swarm: names.iter().cloned().zip(f1.iter().copied()).collect(),
            f1_local: names.iter().cloned().zip(f1_local).collect(),
            f1_pooled: pooled_scores
                .as_ref()
                .map(|(f, _)| names.iter().cloned().zip(f.iter().copied()).collect())
                .unwrap_or_default(),
            union: std::iter::once(("swarm".to_owned(), union_swarm))
                .chain(
                    pooled_scores
                        .as_ref()
                        .map(|(_, u)| ("pooled".to_owned(), *u)),
                )
                .collect(),
            elapsed_s: start.elapsed().as_secs_f64(),
            epsilon,
        });
        last_local = local;
        last_pooled = pooled;
        last_swarm = Some((hash, model));
        last_scores = Some(((f1, union_swarm), pooled_scores));
    }
    let final_epsilon: BTreeMap<String, f64> = names
        .iter()
        .zip(&nodes)
        .filter_map(|(n, node)| node.status().borrow().epsilon.map(|e| (n.clone(), e)))
        .collect();
    for n in &nodes {
        n.shutdown();
    }
    for n in nodes {
        n.wait().await?;
    }
    for t in local_tasks {
        t.await.map_err(|e| DaemonError::Setup(e.to_string()))?;
    }
    let (final_hash, final_model) =
        last_swarm.ok_or_else(|| DaemonError::Setup("no rounds".into()))?;
    let final_pooled = last_pooled;

    // The cross-site matrix: every final model on every site's held-out frames.
    let report = {
        let config = config.clone();
        let held = Arc::clone(&heldout);
        let names = names.clone();
        let o2 = o.clone();
        let movies: Vec<String> = sites
            .iter()
            .map(|s| s.movie.display().to_string())
            .collect();
        tokio::task::spawn_blocking(move || -> Result<Report, DaemonError> {
            let mut models = vec![("swarm".to_owned(), final_model.clone())];
            models.extend(final_pooled.map(|p| ("pooled".to_owned(), p)));
            for (n, w) in names.iter().zip(&last_local) {
                models.push((format!("local:{n}"), w.clone()));
            }
            let mut matrix = Vec::new();
            let mut union = BTreeMap::new();
            let (mut swarm_scores, mut pooled_scores) =
                last_scores.map_or((None, None), |(s, p)| (Some(s), p));
            for (name, w) in &models {
                let known = match name.as_str() {
                    "swarm" => swarm_scores.take(),
                    "pooled" => pooled_scores.take(),
                    _ => None,
                };
                let (row, u) = match known {
                    Some(s) => s,
                    None => score_sites(&config, w, &held)?,
                };
                matrix.push(row);
                union.insert(name.clone(), u);
            }
            let mean = |row: &[f64]| row.iter().sum::<f64>() / row.len().max(1) as f64;
            let row_of = |name: &str| models.iter().position(|(n, _)| n == name);
            let swarm_mean_f1 = mean(&matrix[0]);
            let pooled_mean_f1 = row_of("pooled").map_or(f64::NAN, |i| mean(&matrix[i]));
            let best_local_mean_f1 = models
                .iter()
                .zip(&matrix)
                .filter(|((n, _), _)| n.starts_with("local:"))
                .map(|(_, r)| mean(r))
                .fold(f64::NAN, f64::max);
            write_outputs(&o2, &config, &names, &held, &final_model)?;
            let unseen = unseen
                .map(|u| -> Result<UnseenReport, DaemonError> {
                    let mut f1 = BTreeMap::new();
                    for (name, w) in &models {
                        f1.insert(name.clone(), score(&config, w, &u.heldout)?.scores(0.5).f1);
                    }
                    let mut classical = MatchCounts::default();
                    let opts = InferOptions::default();
                    let mut objects = 0u64;
                    for a in &u.heldout {
                        let pred = classical_segment(&a.image, &opts);
                        classical += match_counts(&Overlaps::new(&a.labels, &pred), 0.5);
                        objects += a.labels.ids().len() as u64;
                    }
                    f1.insert("classical".to_owned(), classical.scores(0.5).f1);
                    Ok(UnseenReport {
                        site: u.name.clone(),
                        movie: u.movie.display().to_string(),
                        frames: u.heldout.len(),
                        objects,
                        f1,
                    })
                })
                .transpose()?;
            Ok(Report {
                sites: names.clone(),
                movies,
                rounds,
                cross_site_models: models.into_iter().map(|(n, _)| n).collect(),
                cross_site_f1: matrix,
                union,
                swarm_mean_f1,
                pooled_mean_f1,
                best_local_mean_f1,
                final_model: final_hash.to_hex(),
                seconds: 0.0,
                local_dp: None,
                unseen,
            })
        })
        .await
        .map_err(|e| DaemonError::Setup(e.to_string()))??
    };
    let report = Report {
        seconds: start.elapsed().as_secs_f64(),
        local_dp: o
            .local_dp
            .map(|(clip_norm, noise_multiplier)| LocalDpReport {
                clip_norm,
                noise_multiplier,
                delta: DEMO_DP_DELTA,
                epsilon: final_epsilon,
            }),
        ..report
    };
    std::fs::write(
        o.out.join("metrics.json"),
        serde_json::to_vec_pretty(&report).map_err(|e| DaemonError::Setup(e.to_string()))?,
    )
    .map_err(setup_err("writing metrics.json"))?;
    std::fs::write(o.out.join("f1_per_round.svg"), f1_plot(&report))
        .map_err(setup_err("writing f1_per_round.svg"))?;
    std::fs::write(o.out.join("cross_site.svg"), matrix_plot(&report))
        .map_err(setup_err("writing cross_site.svg"))?;
    println!(
        "F1 at IoU 0.5 (rows: models, columns: held-out frames of each site and of all sites)"
    );
    println!(
        "  {:<14} {}{:>8}",
        "",
        report
            .sites
            .iter()
            .map(|s| format!("{s:>8}"))
            .collect::<String>(),
        "union"
    );
    for (m, row) in report.cross_site_models.iter().zip(&report.cross_site_f1) {
        println!(
            "  {m:<14} {}{:>8.3}",
            row.iter().map(|v| format!("{v:>8.3}")).collect::<String>(),
            report.union.get(m).copied().unwrap_or(f64::NAN)
        );
    }
    if let Some(u) = &report.unseen {
        println!(
            "unseen site {} ({}; {} frames, {} objects, no training): F1 {}",
            u.site,
            u.movie,
            u.frames,
            u.objects,
            u.f1.iter()
                .map(|(k, v)| format!("{k}={v:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let best_local = report
        .union
        .iter()
        .filter(|(k, _)| k.starts_with("local:"))
        .map(|(_, v)| *v)
        .reduce(f64::max);
    println!(
        "union F1: swarm {:.3}{}{}; {:.0} s; report in {}",
        report.union.get("swarm").copied().unwrap_or(f64::NAN),
        report
            .union
            .get("pooled")
            .map(|v| format!(", pooled {v:.3}"))
            .unwrap_or_default(),
        best_local
            .map(|v| format!(", best local-only {v:.3}"))
            .unwrap_or_default(),
        report.seconds,
        o.out.display()
    );
    Ok(report)
}

/// The final model (safetensors) and one overlay PNG per site.
fn write_outputs(
    o: &DemoOptions,
    config: &UNetConfig,
    names: &[String],
    held: &[Vec<Annotated>],
    model: &Weights,
) -> Result<(), DaemonError> {
    let device = default_device();
    let mut net = config.init(&device);
    load_weights(&mut net, model).map_err(|e| DaemonError::Setup(e.to_string()))?;
    save_model(&o.out.join("model"), &net, config)
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    let dir = o.out.join("overlays");
    std::fs::create_dir_all(&dir).map_err(setup_err("creating overlays/"))?;
    for (n, h) in names.iter().zip(held) {
        if let Some(a) = h.first() {
            let pred = segment(&net, config, &device, &a.image, &InferOptions::default());
            write_overlay(&dir.join(format!("{n}.png")), &a.image.data, &pred)?;
        }
    }
    Ok(())
}

/// Grey image with predicted instance outlines in yellow.
fn write_overlay(path: &Path, image: &[f32], labels: &Labels) -> Result<(), DaemonError> {
    let (h, w) = (labels.height, labels.width);
    let plane = &labels.data[..h * w];
    let mut rgb = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let v = (image.get(i).copied().unwrap_or(0.0).clamp(0.0, 1.0) * 255.0) as u8;
            let l = plane[i];
            let edge = l != 0
                && [(0i64, 1i64), (1, 0), (0, -1), (-1, 0)]
                    .iter()
                    .any(|(dy, dx)| {
                        let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                        yy < 0
                            || xx < 0
                            || yy >= h as i64
                            || xx >= w as i64
                            || plane[yy as usize * w + xx as usize] != l
                    });
            let px = if edge { [255, 220, 0] } else { [v, v, v] };
            rgb[i * 3..i * 3 + 3].copy_from_slice(&px);
        }
    }
    let file = std::fs::File::create(path).map_err(setup_err("creating an overlay"))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .and_then(|mut wr| wr.write_image_data(&rgb))
        .map_err(|e| DaemonError::Setup(format!("{}: {e}", path.display())))
}

const COLOURS: [&str; 6] = [
    "#1b6ca8", "#d1495b", "#2e933c", "#edae49", "#6a4c93", "#00798c",
];

/// F1 per round, swarm (solid) against pooled (dotted) and local-only (dashed), one
/// colour per site, and the union of all sites in black.
fn f1_plot(r: &Report) -> String {
    let (w, h, left, top, pw, ph) = (720.0, 420.0, 60.0, 30.0, 520.0, 330.0);
    let n = r.rounds.len().max(1) as f64;
    let x = |round: f64| left + (round - 1.0) / (n - 1.0).max(1.0) * pw;
    let y = |f1: f64| top + (1.0 - f1.clamp(0.0, 1.0)) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">F1 at IoU 0.5 on held-out frames: swarm (solid), pooled (dotted), local-only (dashed)</text>\n"
    );
    for k in 0..=5 {
        let v = f64::from(k) / 5.0;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.1}</text>",
            left + pw,
            left - 6.0,
            y(v) + 4.0,
            yy = y(v)
        );
    }
    for rr in &r.rounds {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(rr.round as f64),
            top + ph + 18.0,
            rr.round
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">round</text>",
        left + pw / 2.0,
        top + ph + 36.0
    );
    for (i, site) in r.sites.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        for (key, dash) in [
            ("swarm", ""),
            ("pooled", " stroke-dasharray=\"2 3\""),
            ("local", " stroke-dasharray=\"6 4\""),
        ] {
            let pts: Vec<String> = r
                .rounds
                .iter()
                .filter_map(|rr| {
                    let v = match key {
                        "swarm" => rr.f1_swarm.get(site),
                        "pooled" => rr.f1_pooled.get(site),
                        _ => rr.f1_local.get(site),
                    }?;
                    Some(format!("{:.1},{:.1}", x(rr.round as f64), y(*v)))
                })
                .collect();
            if pts.is_empty() {
                // A model the run did not train (--no-baselines).
                continue;
            }
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
                pts.join(" ")
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{site}</text>",
            left + pw + 16.0,
            top + 16.0 + i as f64 * 18.0
        );
    }
    for (key, dash) in [("swarm", ""), ("pooled", " stroke-dasharray=\"2 3\"")] {
        let pts: Vec<String> = r
            .rounds
            .iter()
            .filter_map(|rr| {
                rr.union
                    .get(key)
                    .map(|v| format!("{:.1},{:.1}", x(rr.round as f64), y(*v)))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"black\" stroke-width=\"2.5\"{dash} points=\"{}\"/>",
            pts.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\">union</text>",
        left + pw + 16.0,
        top + 16.0 + r.sites.len() as f64 * 18.0
    );
    s.push_str("</svg>\n");
    s
}

/// The cross-site matrix (and the union column) as a heat map with values.
fn matrix_plot(r: &Report) -> String {
    let (cell, left, top) = (90.0, 130.0, 50.0);
    let columns: Vec<&str> = r
        .sites
        .iter()
        .map(String::as_str)
        .chain(std::iter::once("union"))
        .collect();
    let w = left + cell * columns.len() as f64 + 20.0;
    let h = top + cell * r.cross_site_models.len() as f64 + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"18\" font-size=\"14\">F1 of each model (rows) on each site's held-out frames and their union (columns)</text>\n"
    );
    for (j, site) in columns.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{site}</text>",
            left + cell * (j as f64 + 0.5),
            top - 8.0
        );
    }
    for (i, (m, row)) in r.cross_site_models.iter().zip(&r.cross_site_f1).enumerate() {
        let yy = top + cell * i as f64;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{m}</text>",
            left - 8.0,
            yy + cell / 2.0 + 4.0
        );
        let union = r.union.get(m).copied().unwrap_or(f64::NAN);
        for (j, v) in row.iter().chain(std::iter::once(&union)).enumerate() {
            let g = (255.0 - v.clamp(0.0, 1.0) * 180.0) as u8;
            let _ = writeln!(
                s,
                "<rect x=\"{}\" y=\"{yy}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({g},{g},255)\" stroke=\"white\"/>\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{v:.3}</text>",
                left + cell * j as f64,
                left + cell * (j as f64 + 0.5),
                yy + cell / 2.0 + 4.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
