//! The TOML configuration of a node.
//!
//! A node reads two files:
//!
//! - its **site file** ([`NodeConfig`], e.g. `cellswarm.toml`): identity key file,
//!   listen addresses, bootstrap peers, its private movies, local training, privacy,
//!   store and status endpoint. Only this site reads it.
//! - the **consortium file** ([`ConsortiumConfig`], e.g. `consortium.toml`), named by the
//!   site file and identical at every member: the members (PeerIds with display names),
//!   the model, the round timing and quorum, the aggregation strategy and the genesis
//!   model hash. Everything that must agree for merges to be bit-identical lives here,
//!   and [`ConsortiumConfig::agreement_digest`] lets members check that it does.
//!
//! [`Config::load`] reads both, resolves relative paths against the file that holds
//! them, fills defaults for everything optional and runs [`Config::validate`]. Every
//! error names the file, the field and the problem ([`ConfigError`]).

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::signer_key_from_peer_id;
use crate::ids::ModelHash;

/// Environment variable that overrides the default store location.
pub const DATA_DIR_ENV: &str = "CELLSWARM_DATA_DIR";
/// Smallest allowed `net.max_message_bytes`.
pub const MIN_MESSAGE_BYTES: u64 = 1 << 20;
/// Largest allowed `net.max_message_bytes`.
pub const MAX_MESSAGE_BYTES: u64 = 4 << 30;

/// A configuration problem, naming the file, the field and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the file: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{}{}: {}{problem}", file.display(), position(*line, *column), field_prefix(field))]
    Parse {
        /// The file.
        file: PathBuf,
        /// Dotted path of the field, empty for syntax errors outside any field.
        field: String,
        /// 1-based line, 0 if unknown.
        line: usize,
        /// 1-based column, 0 if unknown.
        column: usize,
        /// What the parser said.
        problem: String,
    },
    /// The values parse but contradict each other or are out of range.
    #[error("{}: field `{field}`: {problem}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Dotted path of the field.
        field: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
}

fn position(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{column}")
    }
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() || field == "." {
        String::new()
    } else {
        format!("field `{field}`: ")
    }
}

impl ConfigError {
    /// The file the problem is in.
    #[must_use]
    pub fn file(&self) -> &Path {
        match self {
            Self::Read { file, .. } | Self::Parse { file, .. } | Self::Invalid { file, .. } => file,
        }
    }

    /// The dotted field path, if the problem is in a field.
    #[must_use]
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Parse { field, .. } | Self::Invalid { field, .. } if !field.is_empty() => {
                Some(field)
            }
            _ => None,
        }
    }
}

/// Parses TOML text into `T`, reporting the field path and the line of any problem.
///
/// # Errors
/// [`ConfigError::Parse`] naming `file`.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &Path,
) -> Result<T, ConfigError> {
    let line_col = |span: Option<std::ops::Range<usize>>| {
        span.map_or((0, 0), |s| {
            let before = &text[..s.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            (line, column)
        })
    };
    let de = toml::Deserializer::parse(text).map_err(|e| {
        let (line, column) = line_col(e.span());
        ConfigError::Parse {
            file: file.to_owned(),
            field: String::new(),
            line,
            column,
            problem: e.message().trim().to_owned(),
        }
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = line_col(inner.span());
        ConfigError::Parse {
            file: file.to_owned(),
            field: if field == "." { String::new() } else { field },
            line,
            column,
            problem: inner.message().trim().to_owned(),
        }
    })
}

fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_owned(),
        source,
    })
}

// ---------------------------------------------------------------------------------------
// Small value types
// ---------------------------------------------------------------------------------------

/// An inclusive range of frame numbers, written `"0-14"` (or `"7"` for one frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRange {
    /// First frame.
    pub first: u32,
    /// Last frame (inclusive).
    pub last: u32,
}

impl FrameRange {
    /// Whether `t` is in the range.
    #[must_use]
    pub fn contains(&self, t: u32) -> bool {
        (self.first..=self.last).contains(&t)
    }
    /// Whether two ranges share a frame.
    #[must_use]
    pub fn overlaps(&self, other: &FrameRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for FrameRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for FrameRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected a frame range such as \"0-14\", got {s:?}");
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if last < first {
            return Err(format!("frame range {s:?} ends before it starts"));
        }
        Ok(Self { first, last })
    }
}

impl Serialize for FrameRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for FrameRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

mod peer_id_text {
    use super::{Deserialize, Deserializer, PeerId, Serializer};

    pub(super) fn serialize<S: Serializer>(p: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&p.to_base58())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a valid PeerId ({e})")))
    }
}

// ---------------------------------------------------------------------------------------
// Consortium file
// ---------------------------------------------------------------------------------------

/// One member of the consortium.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Display name, e.g. `"site-a"` or an institution's short name.
    pub name: String,
    /// The member's PeerId, as printed by `cellswarm keygen` or `cellswarm init`.
    #[serde(with = "peer_id_text")]
    pub peer_id: PeerId,
    /// Addresses where the member can be reached (optional; bootstrap peers also work).
    #[serde(default)]
    pub addresses: Vec<Multiaddr>,
}

/// The network architecture every member trains (converted to burn's config by the node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// Architecture name; `"unet"` is the only one today.
    pub architecture: String,
    /// Number of down-sampling levels (1..=6).
    pub depth: u32,
    /// Channels of the first level; each level doubles them, the bottleneck too.
    pub base_channels: u32,
    /// Input channels (1 for single-channel fluorescence or phase contrast).
    pub in_channels: u32,
    /// Cell-state classes of the classification head (0 disables it).
    pub cell_states: u32,
    /// Size of the `test-vector` model (a protocol-test model of this many parameters).
    pub params: u32,
    /// Loss weights of the pixel classes (background, interior, boundary), the same for
    /// every member: weights each site drew from its own class frequencies would make
    /// the members optimise different objectives (docs/training.md).
    pub class_weights: [f64; 3],
    /// Object width in pixels at which every member trains (twice the largest inscribed
    /// radius of a cell: a round nucleus's diameter, a rod's width). Each site rescales
    /// its movies from their own annotated width to this one, and inference rescales an
    /// image from its estimated width, so one model serves cells of every size
    /// (docs/training.md). 0 trains and segments at the movies' own scale.
    pub diameter: u32,
    /// How the network tells touching cells apart (docs/training.md). A file without
    /// the key (or without `[model]`) means [`InstanceHead::Boundary`], the network of
    /// consortia formed before the key existed, so their stored models still fit; files
    /// `cellswarm init` writes say `"distance"`, the default of new models.
    #[serde(default = "InstanceHead::without_key")]
    pub instances: InstanceHead,
}

/// The network's instance representation: what it predicts beside the pixel classes so
/// that touching cells come out as separate objects. Its `Default` is the representation
/// new models get; a consortium file without the key means [`Self::without_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceHead {
    /// Cell boundaries only: seeds are regions of likely interior, split where their
    /// shape has a neck.
    Boundary,
    /// Also each pixel's distance to its cell's edge, divided by the cell's largest
    /// (as StarDist's object probabilities): seeds are the peaks of the predicted
    /// distance, which dips to zero between touching cells whatever their shape.
    #[default]
    Distance,
}

impl InstanceHead {
    /// The representation of a consortium file without `instances`.
    #[must_use]
    pub fn without_key() -> Self {
        Self::Boundary
    }

    /// The name used in config files.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Boundary => "boundary",
            Self::Distance => "distance",
        }
    }
}

impl FromStr for InstanceHead {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "boundary" => Ok(Self::Boundary),
            "distance" => Ok(Self::Distance),
            other => Err(format!(
                "unknown instance representation {other:?} (boundary or distance)"
            )),
        }
    }
}

/// Default [`ModelSpec::diameter`]: close to HeLa nuclei (22.5 px) and E. coli widths
/// (17-20 px), so the project's real movies are barely resampled.
pub const DEFAULT_DIAMETER: u32 = 20;

/// Default [`ModelSpec::class_weights`]: `1/sqrt(frequency)` weights typical of
/// fluorescent nuclei (HeLa's frequencies give 0.77, 2.23, 5.72; the demo's three
/// synthetic sites together 0.76, 2.30, 4.69).
pub const DEFAULT_CLASS_WEIGHTS: [f64; 3] = [0.75, 2.25, 5.0];

impl ModelSpec {
    /// What is wrong with `diameter` as a training width, if anything: it must be 0 (the
    /// movies' own scale) or 4-200 pixels.
    #[must_use]
    pub fn diameter_problem(diameter: u32) -> Option<String> {
        (diameter != 0 && !(4..=200).contains(&diameter)).then(|| {
            format!("must be 0 (the movies' own scale) or between 4 and 200 pixels, got {diameter}")
        })
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            architecture: "unet".into(),
            depth: 3,
            base_channels: 16,
            in_channels: 1,
            cell_states: 3,
            params: 1000,
            class_weights: DEFAULT_CLASS_WEIGHTS,
            diameter: DEFAULT_DIAMETER,
            instances: InstanceHead::without_key(),
        }
    }
}

/// Round timing and quorum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundsConfig {
    /// Quorum: the least number of members' deltas (the merger's own included) a merge needs.
    pub min_peers: u32,
    /// How long after a round starts the merger waits for every live member's delta; at
    /// this deadline it merges what it has if the quorum is met.
    #[serde(with = "humantime_serde")]
    pub collect_timeout: Duration,
    /// How long members wait for each merger candidate's record before the next
    /// candidate takes over.
    #[serde(with = "humantime_serde")]
    pub merge_timeout: Duration,
    /// Stop after this many rounds (absent: run until stopped).
    pub max_rounds: Option<u64>,
}

impl Default for RoundsConfig {
    fn default() -> Self {
        Self {
            min_peers: 2,
            collect_timeout: Duration::from_secs(600),
            merge_timeout: Duration::from_secs(120),
            max_rounds: None,
        }
    }
}

/// How updates are merged (see `docs/aggregation.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// FedAvg weighted by sample count.
    #[serde(rename = "fedavg")]
    FedAvg,
    /// FedAvg with equal weights.
    #[serde(rename = "fedavg-unweighted")]
    FedAvgUnweighted,
    /// FedAdam server optimiser on the averaged pseudo-gradient.
    #[serde(rename = "fedadam")]
    FedAdam,
    /// FedYogi server optimiser.
    #[serde(rename = "fedyogi")]
    FedYogi,
    /// FedAdagrad server optimiser.
    #[serde(rename = "fedadagrad")]
    FedAdagrad,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// Krum: the single update closest to its neighbours.
    Krum,
    /// Multi-Krum: the average of the best-scoring updates.
    MultiKrum,
}

impl StrategyKind {
    /// Whether the strategy must see each update separately (and so cannot be combined
    /// with secure aggregation, which reveals only the sum).
    #[must_use]
    pub fn needs_individual_updates(self) -> bool {
        matches!(
            self,
            Self::Median | Self::TrimmedMean | Self::Krum | Self::MultiKrum
        )
    }
    /// Every strategy, in documentation order.
    pub const ALL: [StrategyKind; 9] = [
        Self::FedAvg,
        Self::FedAvgUnweighted,
        Self::FedAdam,
        Self::FedYogi,
        Self::FedAdagrad,
        Self::Median,
        Self::TrimmedMean,
        Self::Krum,
        Self::MultiKrum,
    ];

    /// The name used in config files.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
            Self::FedAvgUnweighted => "fedavg-unweighted",
            Self::FedAdam => "fedadam",
            Self::FedYogi => "fedyogi",
            Self::FedAdagrad => "fedadagrad",
            Self::Median => "median",
            Self::TrimmedMean => "trimmed-mean",
            Self::Krum => "krum",
            Self::MultiKrum => "multi-krum",
        }
    }
}

impl FromStr for StrategyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown strategy {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// How deltas are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingKind {
    /// Exact f32.
    F32,
    /// IEEE half precision.
    F16,
    /// 8-bit with a per-tensor scale.
    Int8,
    /// Largest `topk_fraction` of values.
    TopK,
}

/// Central differential privacy applied by the aggregator to the merged update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralDpConfig {
    /// Noise standard deviation as a multiple of the clipping norm.
    pub noise_multiplier: f64,
    /// The delta of (epsilon, delta)-DP reported by the accountant.
    pub delta: f64,
}

/// Aggregation settings; identical at every member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// The merge strategy.
    pub strategy: StrategyKind,
    /// Delta encoding on the wire.
    pub encoding: EncodingKind,
    /// Fraction of values kept by the `topk` encoding.
    pub topk_fraction: f64,
    /// Deltas whose L2 norm exceeds this are rejected.
    pub max_update_norm: f64,
    /// If set, each update is scaled down to at most this L2 norm before merging.
    pub clip_norm: Option<f64>,
    /// Trimmed mean: fraction of values trimmed at each end (0 <= beta < 0.5).
    pub trim_beta: f64,
    /// The number f of Byzantine members tolerated: Krum's and Multi-Krum's f, and a
    /// commit certificate needs f + 1 members' attestations.
    pub byzantine: u32,
    /// Multi-Krum: how many updates to average (default n - f).
    pub multi_krum_keep: Option<u32>,
    /// Weighted FedAvg and the server optimisers: the most samples any member's declared
    /// count stands for (unset: no ceiling beyond the round's median count).
    pub max_samples: Option<u64>,
    /// Server optimisers: learning rate (eta).
    pub server_learning_rate: f64,
    /// FedAvg (weighted or not): the server step size eta_g. The model moves by eta_g
    /// times the weighted mean of the updates (1: plain FedAvg; above 1 extrapolates
    /// along the members' common direction, as in Reddi et al., ICLR 2021).
    pub server_step: f64,
    /// Server optimisers: first-moment decay (beta1).
    pub server_beta1: f64,
    /// Server optimisers: second-moment decay (beta2).
    pub server_beta2: f64,
    /// Server optimisers: adaptivity (tau).
    pub server_tau: f64,
    /// Central differential privacy on the merged update (requires `clip_norm`).
    pub central_dp: Option<CentralDpConfig>,
    /// Pairwise-masked secure aggregation (only with FedAvg-style strategies).
    pub secure_aggregation: bool,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        Self {
            strategy: StrategyKind::FedAvg,
            encoding: EncodingKind::F32,
            topk_fraction: 0.01,
            max_update_norm: 1e4,
            clip_norm: None,
            trim_beta: 0.1,
            byzantine: 1,
            multi_krum_keep: None,
            max_samples: None,
            server_learning_rate: 0.01,
            server_step: 1.0,
            server_beta1: 0.9,
            server_beta2: 0.99,
            server_tau: 1e-3,
            central_dp: None,
            secure_aggregation: false,
        }
    }
}

/// The PeerId a relay address ends in (`.../p2p/<PeerId>`).
#[must_use]
pub fn relay_peer(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(multiaddr::Protocol::P2p(id)) => Some(id),
        _ => None,
    }
}

/// The relays named in `relays`, each once, in order of first mention, with all its
/// addresses (the first is where a member reserves its slot and opens circuits).
#[must_use]
pub fn relay_groups(relays: &[Multiaddr]) -> Vec<(PeerId, Vec<Multiaddr>)> {
    let mut groups: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
    for a in relays {
        let Some(id) = relay_peer(a) else { continue };
        match groups.iter_mut().find(|(p, _)| *p == id) {
            Some((_, addrs)) => addrs.push(a.clone()),
            None => groups.push((id, vec![a.clone()])),
        }
    }
    groups
}

/// The consortium file: identical at every member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsortiumConfig {
    /// The consortium's name.
    pub name: String,
    /// Hash of the starting model (round 0), as printed by `cellswarm genesis`.
    #[serde(default)]
    pub genesis: Option<ModelHash>,
    /// The members.
    pub members: Vec<MemberConfig>,
    /// Relays every member reserves a slot on and dials unreachable members through
    /// (`/ip4/.../tcp/PORT/p2p/<relay PeerId>`): members or `cellswarm relay` processes.
    /// Reachability, not part of the agreement digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<Multiaddr>,
    /// The model every member trains.
    #[serde(default)]
    pub model: ModelSpec,
    /// Round timing and quorum.
    #[serde(default)]
    pub rounds: RoundsConfig,
    /// How updates are merged.
    #[serde(default)]
    pub aggregation: AggregationConfig,
}

impl ConsortiumConfig {
    /// Parses a consortium file's text (no validation).
    ///
    /// # Errors
    /// [`ConfigError::Parse`].
    pub fn from_toml(text: &str, file: &Path) -> Result<Self, ConfigError> {
        parse_toml(text, file)
    }

    /// The PeerIds of the consortium's relays, each once.
    #[must_use]
    pub fn relay_peers(&self) -> Vec<PeerId> {
        relay_groups(&self.relays)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Reads and validates a consortium file.
    ///
    /// # Errors
    /// Any [`ConfigError`].
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let c = Self::from_toml(&read(file)?, file)?;
        c.validate(file)?;
        Ok(c)
    }

    /// The member with this PeerId.
    #[must_use]
    pub fn member(&self, peer: &PeerId) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.peer_id == *peer)
    }

    /// SHA-256 over everything members must agree on, in a canonical form (members
    /// sorted by PeerId). Two members with different digests cannot merge together.
    #[must_use]
    pub fn agreement_digest(&self) -> [u8; 32] {
        let mut canon = self.clone();
        canon.members.sort_by_key(|m| m.peer_id.to_bytes());
        for m in &mut canon.members {
            // Reachability is local knowledge, not part of the agreement.
            m.addresses.clear();
        }
        canon.relays.clear();
        // bincode 2 with the standard config is a fixed, documented binary layout.
        let bytes = bincode::serde::encode_to_vec(&canon, bincode::config::standard())
            .expect("plain config structs always serialise");
        *crate::ids::ModelHash::of(&bytes).as_bytes()
    }

    /// Checks ranges and contradictions.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `file` and the field.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |field: &str, problem: String| {
            Err(ConfigError::Invalid {
                file: file.to_owned(),
                field: field.to_owned(),
                problem,
            })
        };
        if self.name.trim().is_empty() {
            return bad("name", "the consortium needs a name".into());
        }
        if self.members.is_empty() {
            return bad(
                "members",
                "the consortium lists no members; add one [[members]] table per site".into(),
            );
        }
        let mut peers = BTreeSet::new();
        let mut names = BTreeSet::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.name.trim().is_empty() {
                return bad(
                    &format!("members[{i}].name"),
                    "a member needs a display name".into(),
                );
            }
            if !names.insert(m.name.as_str()) {
                return bad(
                    &format!("members[{i}].name"),
                    format!("the name {:?} is used twice", m.name),
                );
            }
            if !peers.insert(m.peer_id) {
                return bad(
                    &format!("members[{i}].peer_id"),
                    format!("PeerId {} is listed twice", m.peer_id),
                );
            }
            if signer_key_from_peer_id(&m.peer_id).is_err() {
                return bad(
                    &format!("members[{i}].peer_id"),
                    format!(
                        "PeerId {} does not embed an Ed25519 key; use the id printed by `cellswarm keygen`",
                        m.peer_id
                    ),
                );
            }
        }
        for (i, a) in self.relays.iter().enumerate() {
            if relay_peer(a).is_none() {
                return bad(
                    &format!("relays[{i}]"),
                    format!("{a} does not end in /p2p/<the relay's PeerId>"),
                );
            }
        }
        let n = self.members.len() as u64;
        let r = &self.rounds;
        if r.min_peers == 0 {
            return bad("rounds.min_peers", "the quorum must be at least 1".into());
        }
        if u64::from(r.min_peers) > n {
            return bad(
                "rounds.min_peers",
                format!(
                    "the quorum ({}) is larger than the consortium ({n} members)",
                    r.min_peers
                ),
            );
        }
        if r.collect_timeout.is_zero() {
            return bad("rounds.collect_timeout", "must be longer than 0s".into());
        }
        if r.merge_timeout.is_zero() {
            return bad("rounds.merge_timeout", "must be longer than 0s".into());
        }
        if r.max_rounds == Some(0) {
            return bad(
                "rounds.max_rounds",
                "must be at least 1 (leave it out to run until stopped)".into(),
            );
        }
        let m = &self.model;
        if !matches!(m.architecture.as_str(), "unet" | "test-vector") {
            return bad(
                "model.architecture",
                format!(
                    "unknown architecture {:?}; supported: \"unet\", and \"test-vector\" for protocol tests",
                    m.architecture
                ),
            );
        }
        if m.architecture == "test-vector" && !(1..=256 << 20).contains(&m.params) {
            return bad(
                "model.params",
                format!("must be between 1 and {}, got {}", 256 << 20, m.params),
            );
        }
        if !(1..=6).contains(&m.depth) {
            return bad(
                "model.depth",
                format!("must be between 1 and 6, got {}", m.depth),
            );
        }
        if !(1..=256).contains(&m.base_channels) {
            return bad(
                "model.base_channels",
                format!("must be between 1 and 256, got {}", m.base_channels),
            );
        }
        if !(1..=16).contains(&m.in_channels) {
            return bad(
                "model.in_channels",
                format!("must be between 1 and 16, got {}", m.in_channels),
            );
        }
        if m.cell_states > 64 {
            return bad(
                "model.cell_states",
                format!("must be at most 64, got {}", m.cell_states),
            );
        }
        if !m
            .class_weights
            .iter()
            .all(|w| w.is_finite() && (0.01..=100.0).contains(w))
        {
            return bad(
                "model.class_weights",
                format!(
                    "each weight must be between 0.01 and 100, got {:?}",
                    m.class_weights
                ),
            );
        }
        if let Some(problem) = ModelSpec::diameter_problem(m.diameter) {
            return bad("model.diameter", problem);
        }
        self.validate_aggregation(file)
    }

    fn validate_aggregation(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |field: &str, problem: String| {
            Err(ConfigError::Invalid {
                file: file.to_owned(),
                field: format!("aggregation.{field}"),
                problem,
            })
        };
        let a = &self.aggregation;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !(a.topk_fraction > 0.0 && a.topk_fraction <= 1.0) {
            return bad(
                "topk_fraction",
                format!("must be in (0, 1], got {}", a.topk_fraction),
            );
        }
        if !positive(a.max_update_norm) {
            return bad(
                "max_update_norm",
                format!("must be a positive number, got {}", a.max_update_norm),
            );
        }
        if let Some(c) = a.clip_norm
            && !positive(c)
        {
            return bad("clip_norm", format!("must be a positive number, got {c}"));
        }
        if !(0.0..0.5).contains(&a.trim_beta) {
            return bad(
                "trim_beta",
                format!("must be in [0, 0.5), got {}", a.trim_beta),
            );
        }
        let quorum = u64::from(self.rounds.min_peers);
        let f = u64::from(a.byzantine);
        if matches!(a.strategy, StrategyKind::Krum | StrategyKind::MultiKrum) && quorum <= 2 * f + 2
        {
            return bad(
                "byzantine",
                format!(
                    "{} tolerating {f} Byzantine members needs more than 2f + 2 = {} updates per round, \
                     but rounds.min_peers is {quorum}; raise the quorum or lower `byzantine`",
                    a.strategy.name(),
                    2 * f + 2
                ),
            );
        }
        if let Some(keep) = a.multi_krum_keep
            && (keep == 0 || u64::from(keep) > quorum)
        {
            return bad(
                "multi_krum_keep",
                format!("must be between 1 and rounds.min_peers ({quorum}), got {keep}"),
            );
        }
        if a.max_samples == Some(0) {
            return bad(
                "max_samples",
                "must be at least 1 (leave it out for no ceiling)".into(),
            );
        }
        if !positive(a.server_learning_rate) {
            return bad(
                "server_learning_rate",
                format!("must be a positive number, got {}", a.server_learning_rate),
            );
        }
        if !(a.server_step.is_finite() && a.server_step > 0.0 && a.server_step <= 10.0) {
            return bad(
                "server_step",
                format!("must be in (0, 10], got {}", a.server_step),
            );
        }
        if a.server_step != 1.0
            && !matches!(
                a.strategy,
                StrategyKind::FedAvg | StrategyKind::FedAvgUnweighted
            )
        {
            return bad(
                "server_step",
                format!(
                    "applies to fedavg and fedavg-unweighted only (strategy is {}); the server \
                     optimisers take server_learning_rate",
                    a.strategy.name()
                ),
            );
        }
        if a.server_step != 1.0 && a.secure_aggregation {
            return bad(
                "server_step",
                "secure aggregation merges the plain mean of the masked updates: leave server_step \
                 at 1"
                    .into(),
            );
        }
        for (name, v) in [
            ("server_beta1", a.server_beta1),
            ("server_beta2", a.server_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(name, format!("must be in [0, 1), got {v}"));
            }
        }
        if !positive(a.server_tau) {
            return bad(
                "server_tau",
                format!("must be a positive number, got {}", a.server_tau),
            );
        }
        if let Some(dp) = a.central_dp {
            if a.strategy.needs_individual_updates() {
                return bad(
                    "central_dp",
                    format!(
                        "central DP needs a strategy whose sensitivity is a known weight (fedavg, \
                         fedavg-unweighted, fedadam, fedyogi, fedadagrad); {} is not",
                        a.strategy.name()
                    ),
                );
            }
            if a.clip_norm.is_none() {
                return bad(
                    "central_dp",
                    "central DP needs `clip_norm` to bound each update's influence".into(),
                );
            }
            if !positive(dp.noise_multiplier) {
                return bad(
                    "central_dp.noise_multiplier",
                    format!("must be a positive number, got {}", dp.noise_multiplier),
                );
            }
            if !(dp.delta > 0.0 && dp.delta < 1.0) {
                return bad(
                    "central_dp.delta",
                    format!("must be in (0, 1), got {}", dp.delta),
                );
            }
        }
        if a.secure_aggregation && a.strategy == StrategyKind::FedAvg {
            return bad(
                "secure_aggregation",
                "with secure aggregation the merge sees only the sum of the updates, so it cannot \
                 weight them by sample count: use strategy = \"fedavg-unweighted\" (or fedadam, fedyogi, \
                 fedadagrad on the unweighted mean)"
                    .into(),
            );
        }
        if a.secure_aggregation && a.clip_norm.is_none() {
            return bad(
                "secure_aggregation",
                "secure aggregation needs `clip_norm`: masked updates cannot be norm-checked by \
                 the others, so each member clips its own to clip_norm and the fixed-point range \
                 is set by it"
                    .into(),
            );
        }
        if a.secure_aggregation && a.central_dp.is_some() {
            return bad(
                "secure_aggregation",
                "central_dp and secure_aggregation together are not supported by this version; \
                 use local DP ([privacy.local_dp] in each site file) with secure aggregation"
                    .into(),
            );
        }
        if a.secure_aggregation && a.strategy.needs_individual_updates() {
            return bad(
                "secure_aggregation",
                format!(
                    "secure aggregation reveals only the sum of updates, but {} must see each update; \
                     use fedavg, fedavg-unweighted, fedadam, fedyogi or fedadagrad, or turn secure_aggregation off",
                    a.strategy.name()
                ),
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Site file
// ---------------------------------------------------------------------------------------

/// Where the node's key is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// The key file (mode 0600), created by `cellswarm keygen` or `cellswarm init`.
    pub key_file: PathBuf,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            key_file: PathBuf::from("identity.key"),
        }
    }
}

/// Networking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// Multiaddrs to listen on, e.g. `/ip4/0.0.0.0/tcp/7070`.
    pub listen: Vec<Multiaddr>,
    /// Multiaddrs of peers to dial at start (ending in `/p2p/<PeerId>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Largest request or response accepted (models, deltas, merge records), in bytes.
    pub max_message_bytes: u64,
    /// Close a connection idle for this long (longer than a round).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Give up on a request after this long.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Most connections to one peer.
    pub max_connections_per_peer: u32,
    /// Most established connections in total.
    pub max_connections: u32,
    /// Most connections still in their handshake.
    pub max_pending_connections: u32,
    /// For privacy audits: append a copy of every message this node sends (requests,
    /// responses and announcements, before transport encryption) to this file. Off when
    /// absent. See docs/security.md for the record layout.
    pub capture_sent: Option<PathBuf>,
    /// Serve as a relay for the consortium's members (only members may reserve a slot
    /// or be relayed). List this node's address in the consortium file's `relays`.
    pub relay: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/7070"
                    .parse()
                    .expect("a literal multiaddr parses"),
            ],
            bootstrap: Vec::new(),
            max_message_bytes: 512 << 20,
            idle_timeout: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(300),
            max_connections_per_peer: 4,
            max_connections: 64,
            max_pending_connections: 16,
            capture_sent: None,
            relay: false,
        }
    }
}

/// A synthetic movie used instead of (or beside) real data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Site profile (see `cellswarm synth --help`).
    pub profile: String,
    /// Number of frames.
    #[serde(default = "default_synth_frames")]
    pub frames: u32,
    /// Generator seed.
    #[serde(default)]
    pub seed: u64,
}

fn default_synth_frames() -> u32 {
    20
}

/// The site's private movies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// CTC sequence folders such as `/data/Fluo-N2DL-HeLa/02`, OME-TIFF files
    /// (`NAME.ome.tif`) or OME-Zarr images (`NAME.ome.zarr`); masks are found beside them
    /// (`02_GT/SEG` or `02_ERR_SEG`; `NAME_masks.ome.tif`; the image's `labels/`).
    pub movies: Vec<PathBuf>,
    /// The channel of the OME-TIFF movies to train on, by name or index (needed where a
    /// file has several channels).
    pub channel: Option<String>,
    /// Frames used for training (default: all but the held-out ones).
    pub train_frames: Option<FrameRange>,
    /// Frames held out for validation.
    pub heldout_frames: Option<FrameRange>,
    /// Generate a synthetic movie instead of reading `movies`.
    pub synthetic: Option<SyntheticConfig>,
    /// Memory for the training frames, in MiB (default 4096): movies whose annotated
    /// frames need more are streamed, a few frames held at a time.
    pub max_resident_mb: Option<u64>,
}

/// Local training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Optimiser steps per round.
    pub steps_per_round: u32,
    /// Patches per step.
    pub batch_size: u32,
    /// Side of the square training patches, in pixels (a multiple of 2^depth).
    pub patch_size: u32,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// FedProx proximal weight mu (0 disables it).
    pub fedprox_mu: f64,
    /// Weight of the soft Dice term added to cross-entropy (0 disables it).
    pub dice_weight: f64,
    /// Seed for patch sampling and augmentation.
    pub seed: u64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            steps_per_round: 50,
            batch_size: 8,
            patch_size: 128,
            learning_rate: 1e-3,
            fedprox_mu: 0.0,
            dice_weight: 0.0,
            seed: 0,
        }
    }
}

/// Local differential privacy: clip each round's update and add Gaussian noise before signing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalDpConfig {
    /// Clipping norm C.
    pub clip_norm: f64,
    /// Noise standard deviation as a multiple of C (sigma).
    pub noise_multiplier: f64,
    /// The delta of (epsilon, delta)-DP reported by the accountant.
    pub delta: f64,
}

/// Privacy settings of this site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Local differential privacy (absent: off).
    pub local_dp: Option<LocalDpConfig>,
}

/// The durable store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Store directory (default: `$CELLSWARM_DATA_DIR`, else the platform data dir).
    pub path: Option<PathBuf>,
    /// sled page cache, in bytes.
    pub cache_capacity_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: None,
            cache_capacity_bytes: 64 << 20,
        }
    }
}

impl StoreConfig {
    /// The store directory: the config field, else `$CELLSWARM_DATA_DIR/store`, else
    /// `$XDG_DATA_HOME/cellswarm/store`, else `$HOME/.local/share/cellswarm/store`.
    #[must_use]
    pub fn resolved_path(&self) -> PathBuf {
        if let Some(p) = &self.path {
            return p.clone();
        }
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(d) = env(DATA_DIR_ENV) {
            return d.join("store");
        }
        if let Some(d) = env("XDG_DATA_HOME") {
            return d.join("cellswarm").join("store");
        }
        env("HOME")
            .map_or_else(|| PathBuf::from("."), |h| h.join(".local").join("share"))
            .join("cellswarm")
            .join("store")
    }
}

/// The HTTP status endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Serve `/status` and `/metrics`.
    pub enabled: bool,
    /// Address to bind (loopback by default; expose with care).
    pub listen: SocketAddr,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9460)),
        }
    }
}

/// Settings for protocol tests and benchmarks; never needed in production.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// Time the `test-vector` model's training takes per round (stands in for real
    /// training, so that rounds last long enough to interrupt).
    #[serde(with = "humantime_serde")]
    pub training_delay: Duration,
    /// Extra time this node takes to merge (to interrupt a merger while it merges).
    #[serde(with = "humantime_serde")]
    pub merge_delay: Duration,
    /// Under secure aggregation, never send our answer to a sealed epoch nor merge one
    /// (stands in for a member that drops out right after its masked delta was sealed).
    pub withhold_answer: bool,
    /// Under secure aggregation, wait this long after our view of an epoch is complete
    /// before sealing it as the merger (to let other members restart first in tests).
    #[serde(with = "humantime_serde")]
    pub seal_delay: Duration,
    /// Drop verified deltas signed by these members (PeerIds) as if they never arrived
    /// (to give members different views of a round in tests).
    pub ignore_deltas_from: Vec<String>,
}

/// The site file of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The consortium file (relative to this file).
    #[serde(default = "default_consortium_file")]
    pub consortium: PathBuf,
    /// Identity.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Networking.
    #[serde(default)]
    pub net: NetConfig,
    /// Private movies.
    #[serde(default)]
    pub data: DataConfig,
    /// Local training.
    #[serde(default)]
    pub training: TrainingConfig,
    /// Privacy.
    #[serde(default)]
    pub privacy: PrivacyConfig,
    /// The store.
    #[serde(default)]
    pub store: StoreConfig,
    /// The status endpoint.
    #[serde(default)]
    pub status: StatusConfig,
    /// Test and benchmark settings.
    #[serde(default)]
    pub testing: TestingConfig,
}

fn default_consortium_file() -> PathBuf {
    PathBuf::from("consortium.toml")
}

impl NodeConfig {
    /// Parses a site file's text (no validation, paths as written).
    ///
    /// # Errors
    /// [`ConfigError::Parse`].
    pub fn from_toml(text: &str, file: &Path) -> Result<Self, ConfigError> {
        parse_toml(text, file)
    }

    /// Makes relative paths relative to `base` (the directory of the site file).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.consortium);
        fix(&mut self.identity.key_file);
        self.data.movies.iter_mut().for_each(fix);
        if let Some(p) = &mut self.store.path {
            fix(p);
        }
        if let Some(p) = &mut self.net.capture_sent {
            fix(p);
        }
    }

    /// Checks this file's own ranges and contradictions.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `file` and the field.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |field: &str, problem: String| {
            Err(ConfigError::Invalid {
                file: file.to_owned(),
                field: field.to_owned(),
                problem,
            })
        };
        let n = &self.net;
        if n.listen.is_empty() {
            return bad("net.listen", "at least one listen address is needed".into());
        }
        for (i, a) in n.bootstrap.iter().enumerate() {
            if !a.iter().any(|p| matches!(p, multiaddr::Protocol::P2p(_))) {
                return bad(
                    &format!("net.bootstrap[{i}]"),
                    format!("{a} must end in /p2p/<PeerId> so the peer can be authenticated"),
                );
            }
        }
        if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&n.max_message_bytes) {
            return bad(
                "net.max_message_bytes",
                format!(
                    "must be between {MIN_MESSAGE_BYTES} and {MAX_MESSAGE_BYTES}, got {}",
                    n.max_message_bytes
                ),
            );
        }
        for (name, d) in [
            ("net.idle_timeout", n.idle_timeout),
            ("net.request_timeout", n.request_timeout),
        ] {
            if d.is_zero() {
                return bad(name, "must be longer than 0s".into());
            }
        }
        if n.max_connections_per_peer == 0
            || n.max_connections == 0
            || n.max_pending_connections == 0
        {
            return bad(
                "net.max_connections",
                "connection limits must be at least 1".into(),
            );
        }
        let d = &self.data;
        if !d.movies.is_empty() && d.synthetic.is_some() {
            return bad(
                "data.synthetic",
                "set either `movies` or [data.synthetic], not both; remove [data.synthetic] to train on the movies".into(),
            );
        }
        if let (Some(t), Some(h)) = (d.train_frames, d.heldout_frames)
            && t.overlaps(&h)
        {
            return bad(
                "data.heldout_frames",
                format!(
                    "held-out frames {h} overlap the training frames {t}; validation would be biased"
                ),
            );
        }
        if let Some(s) = &d.synthetic
            && s.frames < 2
        {
            return bad(
                "data.synthetic.frames",
                format!("must be at least 2, got {}", s.frames),
            );
        }
        let t = &self.training;
        if t.steps_per_round == 0 {
            return bad("training.steps_per_round", "must be at least 1".into());
        }
        if t.batch_size == 0 {
            return bad("training.batch_size", "must be at least 1".into());
        }
        if t.patch_size < 8 {
            return bad(
                "training.patch_size",
                format!("must be at least 8 pixels, got {}", t.patch_size),
            );
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return bad(
                "training.learning_rate",
                format!("must be a positive number, got {}", t.learning_rate),
            );
        }
        for (name, v) in [
            ("training.fedprox_mu", t.fedprox_mu),
            ("training.dice_weight", t.dice_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(name, format!("must be zero or positive, got {v}"));
            }
        }
        if let Some(dp) = self.privacy.local_dp {
            if !(dp.clip_norm.is_finite() && dp.clip_norm > 0.0) {
                return bad(
                    "privacy.local_dp.clip_norm",
                    format!("must be a positive number, got {}", dp.clip_norm),
                );
            }
            if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier > 0.0) {
                return bad(
                    "privacy.local_dp.noise_multiplier",
                    format!("must be a positive number, got {}", dp.noise_multiplier),
                );
            }
            if !(dp.delta > 0.0 && dp.delta < 1.0) {
                return bad(
                    "privacy.local_dp.delta",
                    format!("must be in (0, 1), got {}", dp.delta),
                );
            }
        }
        if self.store.cache_capacity_bytes < (1 << 20) {
            return bad(
                "store.cache_capacity_bytes",
                "must be at least 1 MiB".into(),
            );
        }
        Ok(())
    }
}

/// A node's whole configuration: its site file and the consortium file it names.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The site file, paths resolved.
    pub node: NodeConfig,
    /// The consortium file.
    pub consortium: ConsortiumConfig,
    /// Where the site file was read from.
    pub node_file: PathBuf,
}

impl Config {
    /// Reads the site file, then the consortium file it names, and validates both.
    ///
    /// # Errors
    /// Any [`ConfigError`], naming the file it is in.
    pub fn load(node_file: &Path) -> Result<Self, ConfigError> {
        let mut node = NodeConfig::from_toml(&read(node_file)?, node_file)?;
        let base = node_file.parent().unwrap_or_else(|| Path::new("."));
        node.resolve_paths(base);
        node.validate(node_file)?;
        let consortium = ConsortiumConfig::from_toml(&read(&node.consortium)?, &node.consortium)?;
        let config = Self {
            node,
            consortium,
            node_file: node_file.to_owned(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Validates both files and the rules that span them.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the file and field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate(&self.node_file)?;
        self.consortium.validate(&self.node.consortium)?;
        let d = &self.node.data;
        // The `test-vector` protocol-test model trains on nothing.
        if self.consortium.model.architecture != "test-vector"
            && d.movies.is_empty()
            && d.synthetic.is_none()
        {
            return Err(ConfigError::Invalid {
                file: self.node_file.clone(),
                field: "data.movies".into(),
                problem: "no movies: list CTC sequence folders, or set [data.synthetic]".into(),
            });
        }
        let granule = 1u32 << self.consortium.model.depth;
        if !self.node.training.patch_size.is_multiple_of(granule) {
            return Err(ConfigError::Invalid {
                file: self.node_file.clone(),
                field: "training.patch_size".into(),
                problem: format!(
                    "{} is not a multiple of 2^depth = {granule} (model.depth = {} in {})",
                    self.node.training.patch_size,
                    self.consortium.model.depth,
                    self.node.consortium.display()
                ),
            });
        }
        Ok(())
    }

    /// Checks that `peer` (this node) is a member, and returns its entry.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] on the consortium file's `members` when it is not.
    pub fn own_member(&self, peer: &PeerId) -> Result<&MemberConfig, ConfigError> {
        self.consortium.member(peer).ok_or_else(|| ConfigError::Invalid {
            file: self.node.consortium.clone(),
            field: "members".into(),
            problem: format!(
                "this node's PeerId {peer} (key file {}) is not listed; add it or use the right key",
                self.node.identity.key_file.display()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn peer(b: u8) -> PeerId {
        Identity::from_seed([b; 32]).unwrap().peer_id()
    }

    fn consortium_toml(extra: &str) -> String {
        format!(
            r#"name = "test"
{extra}
[[members]]
name = "a"
peer_id = "{}"
[[members]]
name = "b"
peer_id = "{}"
[[members]]
name = "c"
peer_id = "{}"
"#,
            peer(1),
            peer(2),
            peer(3)
        )
    }

    const SITE: &str = r#"
consortium = "consortium.toml"
[identity]
key_file = "identity.key"
[net]
listen = ["/ip4/127.0.0.1/tcp/0"]
[data]
movies = ["data/01"]
"#;

    /// Writes a site file and a consortium file and loads them.
    fn load(site: &str, consortium: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("site.toml"), site).unwrap();
        std::fs::write(dir.path().join("consortium.toml"), consortium).unwrap();
        Config::load(&dir.path().join("site.toml"))
    }

    fn expect_err(site: &str, consortium: &str, file: &str, field: &str, words: &str) {
        let err = load(site, consortium).unwrap_err();
        let msg = err.to_string();
        assert!(
            err.file().ends_with(file),
            "error should name {file}: {msg}"
        );
        assert_eq!(err.field(), Some(field), "{msg}");
        assert!(msg.contains(field), "message should name the field: {msg}");
        assert!(msg.contains(words), "message should say {words:?}: {msg}");
    }

    #[test]
    fn minimal_files_load_with_defaults_and_resolved_paths() {
        let c = load(SITE, &consortium_toml("")).unwrap();
        assert_eq!(c.consortium.members.len(), 3);
        assert_eq!(c.consortium.rounds, RoundsConfig::default());
        assert_eq!(c.consortium.aggregation, AggregationConfig::default());
        assert_eq!(c.node.training, TrainingConfig::default());
        assert!(c.node.identity.key_file.is_absolute());
        assert!(c.node.data.movies[0].ends_with("data/01"));
        assert!(c.node.consortium.is_absolute());
        assert_eq!(c.own_member(&peer(2)).unwrap().name, "b");
        let err = c.own_member(&peer(9)).unwrap_err();
        assert!(err.to_string().contains("is not listed"), "{err}");
    }

    #[test]
    fn agreement_digest_ignores_member_order_and_addresses() {
        let a = ConsortiumConfig::from_toml(&consortium_toml(""), Path::new("c.toml")).unwrap();
        let mut b = a.clone();
        b.members.reverse();
        b.members[0]
            .addresses
            .push("/ip4/10.0.0.1/tcp/7070".parse().unwrap());
        assert_eq!(a.agreement_digest(), b.agreement_digest());
        b.rounds.min_peers = 3;
        assert_ne!(a.agreement_digest(), b.agreement_digest());
    }

    #[test]
    fn strategy_names_parse_like_config_files() {
        for k in StrategyKind::ALL {
            assert_eq!(k.name().parse::<StrategyKind>(), Ok(k));
            let text = format!("strategy = \"{}\"", k.name());
            let a: AggregationConfig = toml::from_str(&text).unwrap();
            assert_eq!(a.strategy, k);
        }
        assert!(
            "fedmagic"
                .parse::<StrategyKind>()
                .unwrap_err()
                .contains("trimmed-mean")
        );
    }

    #[test]
    fn quorum_larger_than_consortium() {
        expect_err(
            SITE,
            &consortium_toml("[rounds]\nmin_peers = 4"),
            "consortium.toml",
            "rounds.min_peers",
            "larger than the consortium",
        );
    }

    #[test]
    fn syntax_error_names_line() {
        let err = load(SITE, "name = \"x\"\n[[members]\n").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { line: 2, .. }), "{msg}");
        assert!(msg.contains("consortium.toml:2:"), "{msg}");
    }

    #[test]
    fn wrong_type_names_field_and_line() {
        let site = SITE.replace("[net]", "[training]\nbatch_size = \"eight\"\n[net]");
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "training.batch_size",
            "invalid type",
        );
        let err = load(&site, &consortium_toml("")).unwrap_err();
        assert!(err.to_string().contains("site.toml:6:"), "{err}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let c = consortium_toml("[rounds]\nmin_peer = 2");
        let err = load(SITE, &c).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `min_peer`"), "{msg}");
        assert_eq!(err.field(), Some("rounds.min_peer"), "{msg}");
    }

    #[test]
    fn invalid_peer_id() {
        let c = consortium_toml("").replacen(&peer(2).to_string(), "12D3KooWnotapeer", 1);
        expect_err(
            SITE,
            &c,
            "consortium.toml",
            "members[1].peer_id",
            "not a valid PeerId",
        );
    }

    #[test]
    fn duplicate_member() {
        let c = consortium_toml("").replacen(&peer(3).to_string(), &peer(1).to_string(), 1);
        expect_err(
            SITE,
            &c,
            "consortium.toml",
            "members[2].peer_id",
            "listed twice",
        );
    }

    #[test]
    fn krum_needs_more_than_2f_plus_2() {
        let c = consortium_toml(
            "[rounds]\nmin_peers = 3\n[aggregation]\nstrategy = \"krum\"\nbyzantine = 1",
        );
        expect_err(
            SITE,
            &c,
            "consortium.toml",
            "aggregation.byzantine",
            "2f + 2",
        );
    }

    #[test]
    fn secure_aggregation_with_robust_strategy() {
        let c = consortium_toml(
            "[aggregation]\nstrategy = \"median\"\nsecure_aggregation = true\nclip_norm = 1.0",
        );
        expect_err(
            SITE,
            &c,
            "consortium.toml",
            "aggregation.secure_aggregation",
            "must see each update",
        );
    }

    #[test]
    fn server_step_only_for_plain_fedavg() {
        let ok = consortium_toml("[aggregation]\nstrategy = \"fedavg\"\nserver_step = 2.5");
        let c = load(SITE, &ok).unwrap();
        assert_eq!(c.consortium.aggregation.server_step, 2.5);
        for (extra, words) in [
            (
                "strategy = \"fedavg\"\nserver_step = 0.0",
                "must be in (0, 10]",
            ),
            (
                "strategy = \"fedavg\"\nserver_step = 11.0",
                "must be in (0, 10]",
            ),
            (
                "strategy = \"fedadam\"\nserver_step = 2.0",
                "fedavg and fedavg-unweighted only",
            ),
            (
                "strategy = \"fedavg-unweighted\"\nserver_step = 2.0\nsecure_aggregation = true\nclip_norm = 1.0",
                "leave server_step at 1",
            ),
        ] {
            let c = consortium_toml(&format!("[aggregation]\n{extra}"));
            expect_err(
                SITE,
                &c,
                "consortium.toml",
                "aggregation.server_step",
                words,
            );
        }
    }

    #[test]
    fn class_weights_are_agreed_and_checked() {
        let c = load(SITE, &consortium_toml("")).unwrap();
        assert_eq!(c.consortium.model.class_weights, DEFAULT_CLASS_WEIGHTS);
        let c = load(
            SITE,
            &consortium_toml("[model]\nclass_weights = [1.0, 2.0, 8.0]"),
        )
        .unwrap();
        assert_eq!(c.consortium.model.class_weights, [1.0, 2.0, 8.0]);
        // Part of what members agree on.
        let a = ConsortiumConfig::from_toml(&consortium_toml(""), Path::new("c.toml")).unwrap();
        let mut b = a.clone();
        b.model.class_weights[2] = 6.0;
        assert_ne!(a.agreement_digest(), b.agreement_digest());
        for bad in ["[0.0, 1.0, 1.0]", "[1.0, 1.0, 1000.0]", "[1.0, -2.0, 1.0]"] {
            let c = consortium_toml(&format!("[model]\nclass_weights = {bad}"));
            expect_err(
                SITE,
                &c,
                "consortium.toml",
                "model.class_weights",
                "between 0.01 and 100",
            );
        }
    }

    #[test]
    fn the_training_scale_is_agreed_and_checked() {
        let c = load(SITE, &consortium_toml("")).unwrap();
        assert_eq!(c.consortium.model.diameter, DEFAULT_DIAMETER);
        let c = load(SITE, &consortium_toml("[model]\ndiameter = 0")).unwrap();
        assert_eq!(c.consortium.model.diameter, 0);
        let a = ConsortiumConfig::from_toml(&consortium_toml(""), Path::new("c.toml")).unwrap();
        let mut b = a.clone();
        b.model.diameter = 30;
        assert_ne!(a.agreement_digest(), b.agreement_digest());
        for bad in ["3", "201"] {
            let c = consortium_toml(&format!("[model]\ndiameter = {bad}"));
            expect_err(
                SITE,
                &c,
                "consortium.toml",
                "model.diameter",
                "between 4 and 200",
            );
        }
    }

    #[test]
    fn the_instance_representation_is_agreed() {
        // Without the key: the network consortia had before it existed.
        let c = load(SITE, &consortium_toml("")).unwrap();
        assert_eq!(c.consortium.model.instances, InstanceHead::Boundary);
        let c = load(SITE, &consortium_toml("[model]\ninstances = \"distance\"")).unwrap();
        assert_eq!(c.consortium.model.instances, InstanceHead::Distance);
        let c = load(SITE, &consortium_toml("[model]\ndepth = 3")).unwrap();
        assert_eq!(c.consortium.model.instances, InstanceHead::Boundary);
        let a = ConsortiumConfig::from_toml(&consortium_toml(""), Path::new("c.toml")).unwrap();
        let mut b = a.clone();
        b.model.instances = InstanceHead::Distance;
        assert_ne!(a.agreement_digest(), b.agreement_digest());
        let c = consortium_toml("[model]\ninstances = \"flows\"");
        expect_err(
            SITE,
            &c,
            "consortium.toml",
            "model.instances",
            "unknown variant",
        );
        assert_eq!("distance".parse(), Ok(InstanceHead::Distance));
        assert!("stars".parse::<InstanceHead>().is_err());
    }

    #[test]
    fn unknown_strategy() {
        let c = consortium_toml("[aggregation]\nstrategy = \"fedmagic\"");
        expect_err(
            SITE,
            &c,
            "consortium.toml",
            "aggregation.strategy",
            "unknown variant",
        );
    }

    #[test]
    fn bad_trim_beta() {
        let c = consortium_toml("[aggregation]\nstrategy = \"trimmed-mean\"\ntrim_beta = 0.5");
        expect_err(
            SITE,
            &c,
            "consortium.toml",
            "aggregation.trim_beta",
            "[0, 0.5)",
        );
    }

    #[test]
    fn central_dp_without_clipping() {
        let c = consortium_toml("[aggregation.central_dp]\nnoise_multiplier = 1.0\ndelta = 1e-5");
        expect_err(
            SITE,
            &c,
            "consortium.toml",
            "aggregation.central_dp",
            "clip_norm",
        );
    }

    #[test]
    fn central_dp_with_robust_strategy() {
        let c = consortium_toml(
            "[aggregation]\nstrategy = \"median\"\nclip_norm = 1.0\n[aggregation.central_dp]\nnoise_multiplier = 1.0\ndelta = 1e-5",
        );
        expect_err(
            SITE,
            &c,
            "consortium.toml",
            "aggregation.central_dp",
            "median is not",
        );
    }

    #[test]
    fn no_movies() {
        let site = SITE.replace("movies = [\"data/01\"]", "");
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "data.movies",
            "no movies",
        );
    }

    #[test]
    fn movies_and_synthetic_together() {
        let site = SITE.replace("[net]", "[data.synthetic]\nprofile = \"balanced\"\n[net]");
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "data.synthetic",
            "not both",
        );
    }

    #[test]
    fn heldout_overlaps_training() {
        let site = SITE.replace(
            "[data]",
            "[data]\ntrain_frames = \"0-14\"\nheldout_frames = \"10-19\"",
        );
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "data.heldout_frames",
            "overlap",
        );
    }

    #[test]
    fn bad_frame_range() {
        let site = SITE.replace("[data]", "[data]\ntrain_frames = \"14-0\"");
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "data.train_frames",
            "ends before it starts",
        );
    }

    #[test]
    fn bad_multiaddr() {
        let site = SITE.replace("/ip4/127.0.0.1/tcp/0", "/ip4/999.0.0.1/tcp/0");
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "net.listen[0]",
            "",
        );
    }

    #[test]
    fn relays_name_their_peer_and_stay_out_of_the_agreement() {
        expect_err(
            SITE,
            &consortium_toml("relays = [\"/ip4/10.0.0.9/tcp/7071\"]"),
            "consortium.toml",
            "relays[0]",
            "/p2p/",
        );
        let relay = format!("/ip4/10.0.0.9/tcp/7071/p2p/{}", peer(9));
        let quic = format!("/ip4/10.0.0.9/udp/7071/quic-v1/p2p/{}", peer(9));
        let with = load(
            SITE,
            &consortium_toml(&format!("relays = [\"{relay}\", \"{quic}\"]")),
        )
        .unwrap();
        assert_eq!(with.consortium.relay_peers(), vec![peer(9)]);
        let groups = relay_groups(&with.consortium.relays);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].0, peer(9));
        assert_eq!(groups[0].1, with.consortium.relays);
        let without = load(SITE, &consortium_toml("")).unwrap();
        assert_eq!(
            with.consortium.agreement_digest(),
            without.consortium.agreement_digest()
        );
        assert!(!without.node.net.relay);
    }

    #[test]
    fn bootstrap_without_peer_id() {
        let site = SITE.replace("[net]", "[net]\nbootstrap = [\"/ip4/10.0.0.2/tcp/7070\"]");
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "net.bootstrap[0]",
            "/p2p/",
        );
    }

    #[test]
    fn message_limit_out_of_range() {
        let site = SITE.replace("[net]", "[net]\nmax_message_bytes = 1000");
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "net.max_message_bytes",
            "between",
        );
    }

    #[test]
    fn patch_size_not_multiple_of_depth() {
        let site = SITE.replace("[net]", "[training]\npatch_size = 100\n[net]");
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "training.patch_size",
            "2^depth",
        );
    }

    #[test]
    fn bad_duration() {
        let c = consortium_toml("[rounds]\nmerge_timeout = \"soon\"");
        expect_err(SITE, &c, "consortium.toml", "rounds.merge_timeout", "");
    }

    #[test]
    fn local_dp_out_of_range() {
        let site = SITE.replace(
            "[net]",
            "[privacy.local_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\ndelta = 2.0\n[net]",
        );
        expect_err(
            &site,
            &consortium_toml(""),
            "site.toml",
            "privacy.local_dp.delta",
            "(0, 1)",
        );
    }

    #[test]
    fn missing_consortium_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("site.toml"), SITE).unwrap();
        let err = Config::load(&dir.path().join("site.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("consortium.toml"), "{err}");
    }

    #[test]
    fn store_path_resolution_order() {
        let explicit = StoreConfig {
            path: Some(PathBuf::from("/srv/cellswarm")),
            ..StoreConfig::default()
        };
        assert_eq!(explicit.resolved_path(), PathBuf::from("/srv/cellswarm"));
        assert!(StoreConfig::default().resolved_path().ends_with("store"));
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = load(
            SITE,
            &consortium_toml(
                "genesis = \"00000000000000000000000000000000000000000000000000000000000000ff\"",
            ),
        )
        .unwrap();
        assert_eq!(c.consortium.genesis.unwrap().0[31], 0xff);
        let text = toml::to_string(&c.consortium).unwrap();
        let back = ConsortiumConfig::from_toml(&text, Path::new("x")).unwrap();
        assert_eq!(back, c.consortium);
        let text = toml::to_string(&c.node).unwrap();
        assert_eq!(
            NodeConfig::from_toml(&text, Path::new("x")).unwrap(),
            c.node
        );
    }
}
