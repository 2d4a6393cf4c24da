//! The network: a 2D U-Net whose heads predict, per pixel, background / cell interior /
//! cell boundary, a cell state (interphase / dividing / dying) and, with the `distance`
//! instance representation, the pixel's distance to its cell's edge divided by the
//! cell's largest.
//!
//! burn 0.22 picks the backend at run time by [`Device`]: [`default_device`] is the
//! pure-Rust `flex` CPU backend (multi-threaded with burn's `rayon` and `simd` features);
//! the `cuda` and `wgpu` cargo features add GPU devices.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::activation::relu;
use cellswarm_common::config::{InstanceHead, ModelSpec};

use crate::data::normalize::CLASSES;

/// The U-Net's hyper-parameters (saved as `config.json` beside the weights).
#[derive(Config, Debug, PartialEq, Eq)]
pub struct UNetConfig {
    /// Input channels.
    #[config(default = 1)]
    pub in_channels: usize,
    /// Down-sampling levels.
    #[config(default = 3)]
    pub depth: usize,
    /// Channels of the first level; doubled at each level and at the bottleneck.
    #[config(default = 16)]
    pub base_channels: usize,
    /// Pixel classes (background, interior, boundary).
    #[config(default = 3)]
    pub classes: usize,
    /// Cell-state classes of the second head (0: no head).
    #[config(default = 3)]
    pub cell_states: usize,
    /// Cell width in pixels the network was trained at (see [`crate::scale`]); images
    /// are rescaled to it before inference. `None`: trained at the movies' own scale.
    pub diameter: Option<u32>,
    /// A third head predicting each pixel's normalised distance to its cell's edge
    /// (`[model] instances = "distance"`); cells are then seeded at its peaks.
    #[config(default = false)]
    pub distance: bool,
}

impl UNetConfig {
    /// The network a consortium's `[model]` section names.
    #[must_use]
    pub fn from_spec(spec: &ModelSpec) -> Self {
        Self {
            in_channels: spec.in_channels as usize,
            depth: spec.depth as usize,
            base_channels: spec.base_channels as usize,
            classes: CLASSES,
            cell_states: spec.cell_states as usize,
            diameter: (spec.diameter > 0).then_some(spec.diameter),
            distance: spec.instances == InstanceHead::Distance,
        }
    }

    /// Input sides must be multiples of this.
    #[must_use]
    pub fn granule(&self) -> usize {
        1 << self.depth
    }

    /// Builds the network with freshly initialised weights on `device`.
    #[must_use]
    pub fn init(&self, device: &Device) -> UNet {
        let c = |level: usize| self.base_channels << level;
        let down = (0..self.depth)
            .map(|l| {
                ConvBlock::new(
                    if l == 0 { self.in_channels } else { c(l - 1) },
                    c(l),
                    device,
                )
            })
            .collect();
        let bottleneck = ConvBlock::new(c(self.depth - 1), c(self.depth), device);
        let up = (0..self.depth)
            .rev()
            .map(|l| {
                ConvTranspose2dConfig::new([c(l + 1), c(l)], [2, 2])
                    .with_stride([2, 2])
                    .init(device)
            })
            .collect();
        let dec = (0..self.depth)
            .rev()
            .map(|l| ConvBlock::new(2 * c(l), c(l), device))
            .collect();
        let head = Conv2dConfig::new([c(0), self.classes], [1, 1]).init(device);
        let state_head = (self.cell_states > 0)
            .then(|| Conv2dConfig::new([c(0), self.cell_states], [1, 1]).init(device));
        let distance_head = self
            .distance
            .then(|| Conv2dConfig::new([c(0), 1], [1, 1]).init(device));
        UNet {
            down,
            bottleneck,
            up,
            dec,
            head,
            state_head,
            distance_head,
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
        }
    }
}

/// Two 3x3 convolutions with ReLU.
#[derive(Module, Debug)]
pub struct ConvBlock {
    c1: Conv2d,
    c2: Conv2d,
}

impl ConvBlock {
    fn new(cin: usize, cout: usize, device: &Device) -> Self {
        let conv = |i, o| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Self {
            c1: conv(cin, cout),
            c2: conv(cout, cout),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        relu(self.c2.forward(relu(self.c1.forward(x))))
    }
}

/// The U-Net.
#[derive(Module, Debug)]
pub struct UNet {
    down: Vec<ConvBlock>,
    bottleneck: ConvBlock,
    up: Vec<ConvTranspose2d>,
    dec: Vec<ConvBlock>,
    head: Conv2d,
    state_head: Option<Conv2d>,
    distance_head: Option<Conv2d>,
    pool: MaxPool2d,
}

/// The network's outputs.
#[derive(Debug, Clone)]
pub struct Output {
    /// Pixel-class logits, `[batch, classes, height, width]`.
    pub classes: Tensor<4>,
    /// Cell-state logits, `[batch, states, height, width]`, if the model has the head.
    pub states: Option<Tensor<4>>,
    /// Normalised-distance logits, `[batch, 1, height, width]`, if the model has the head
    /// (the distance is their sigmoid).
    pub distance: Option<Tensor<4>>,
}

impl UNet {
    /// Runs the network.
    ///
    /// # Shapes
    /// - input: `[batch, in_channels, height, width]`, height and width multiples of
    ///   `2^depth`
    /// - output: see [`Output`]
    pub fn forward(&self, x: Tensor<4>) -> Output {
        let mut skips = Vec::with_capacity(self.down.len());
        let mut h = x;
        for (i, block) in self.down.iter().enumerate() {
            h = block.forward(if i == 0 { h } else { self.pool.forward(h) });
            skips.push(h.clone());
        }
        h = self.bottleneck.forward(self.pool.forward(h));
        for (up, block) in self.up.iter().zip(&self.dec) {
            let skip = skips.pop().expect("one skip per level");
            h = block.forward(Tensor::cat(vec![up.forward(h), skip], 1));
        }
        Output {
            classes: self.head.forward(h.clone()),
            states: self.state_head.as_ref().map(|s| s.forward(h.clone())),
            distance: self.distance_head.as_ref().map(|d| d.forward(h)),
        }
    }
}

/// File holding a model folder's weights (safetensors, loadable from PyTorch).
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// File holding a model folder's network configuration (JSON).
pub const CONFIG_FILE: &str = "config.json";

/// What went wrong saving or loading a model folder.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{}: {message}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The folder's weights do not fit its configuration.
    #[error("{}: the weights do not fit the network in config.json: {detail}", path.display())]
    Mismatch {
        /// The weights file.
        path: PathBuf,
        /// What did not fit.
        detail: String,
    },
}

/// Saves a model folder: `weights.safetensors` and `config.json`, each written to a
/// temporary name and renamed, so a crash never leaves a half-written model.
///
/// # Errors
/// I/O or serialisation errors naming the file.
pub fn save_model(dir: &Path, model: &UNet, config: &UNetConfig) -> Result<(), ModelError> {
    let io = |path: &Path, message: String| ModelError::Io {
        path: path.to_owned(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e.to_string()))?;
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!("{WEIGHTS_FILE}.partial"));
    let mut store = SafetensorsStore::from_file(&tmp).metadata("producer", "cellswarm");
    model
        .save_into(&mut store)
        .map_err(|e| io(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &weights).map_err(|e| io(&weights, e.to_string()))?;
    let cfg = dir.join(CONFIG_FILE);
    let tmp = dir.join(format!("{CONFIG_FILE}.partial"));
    config.save(&tmp).map_err(|e| io(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &cfg).map_err(|e| io(&cfg, e.to_string()))
}

/// A model folder's `config.json`. Folders written before the distance head existed
/// have no `distance` key: they are boundary models.
fn parse_config(text: &str) -> Result<UNetConfig, String> {
    let bad = |e: serde_json::Error| format!("not a readable model configuration: {e}");
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
    if let Some(fields) = value.as_object_mut() {
        fields
            .entry("distance")
            .or_insert(serde_json::Value::Bool(false));
    }
    serde_json::from_value(value).map_err(bad)
}

/// Loads a model folder saved by [`save_model`] onto `device`.
///
/// # Errors
/// Missing or unreadable files, or weights that do not fit the configuration.
pub fn load_model(dir: &Path, device: &Device) -> Result<(UNet, UNetConfig), ModelError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::Io {
        path: cfg_path.clone(),
        message: e.to_string(),
    })?;
    let config = parse_config(&text).map_err(|message| ModelError::Io {
        path: cfg_path.clone(),
        message,
    })?;
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        return Err(ModelError::Io {
            path,
            message: "missing; a model folder holds weights.safetensors and config.json".into(),
        });
    }
    let model = load_weights(&config, device, SafetensorsStore::from_file(&path), path)?;
    Ok((model, config))
}

/// The network of `config` with the weights of `store` (read from `path`, named in
/// errors), refusing weights that do not fit the network exactly.
fn load_weights(
    config: &UNetConfig,
    device: &Device,
    mut store: SafetensorsStore,
    path: PathBuf,
) -> Result<UNet, ModelError> {
    let mut model = config.init(device);
    let result = model.load_from(&mut store).map_err(|e| ModelError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(ModelError::Mismatch {
            path,
            detail: format!(
                "errors {:?}, missing {:?}, unused {:?}",
                result.errors, result.missing, result.unused
            ),
        });
    }
    Ok(model)
}

/// Weights of the generalist model built into cellswarm (configs/models/generalist).
const BUILTIN_WEIGHTS: &[u8] =
    include_bytes!("../../configs/models/generalist/weights.safetensors");
/// Network configuration of the built-in generalist model.
const BUILTIN_CONFIG: &str = include_str!("../../configs/models/generalist/config.json");
/// Where the built-in model's files live in the repository (for messages).
pub const BUILTIN_MODEL: &str = "configs/models/generalist";

/// Loads the generalist model built into the binary: trained through a swarm of sites
/// with different microscopes, modalities and cell sizes (docs/training.md, "The
/// generalist model"), used by `segment` and `track` when no model folder is given.
///
/// # Errors
/// Only if the embedded files do not fit each other (a broken build).
pub fn load_builtin(device: &Device) -> Result<(UNet, UNetConfig), ModelError> {
    let path = PathBuf::from(BUILTIN_MODEL);
    let config = parse_config(BUILTIN_CONFIG).map_err(|message| ModelError::Io {
        path: path.join(CONFIG_FILE),
        message,
    })?;
    let store = SafetensorsStore::from_bytes(Some(BUILTIN_WEIGHTS.to_vec()));
    let model = load_weights(&config, device, store, path.join(WEIGHTS_FILE))?;
    Ok((model, config))
}

/// The CPU device this build uses by default (burn's `flex` backend).
#[must_use]
pub fn default_device() -> Device {
    Device::flex()
}

/// Why a device name names no device of this build.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The part after `:` is not a number.
    #[error("bad device index in {0:?}; expected e.g. cuda:0")]
    Index(String),
    /// Not a backend name at all.
    #[error("unknown device {0:?}; expected cpu, cuda[:N] or wgpu[:N]")]
    Unknown(String),
    /// A backend this build was compiled without.
    #[error(
        "this build has no {kind} backend (asked for {kind}:{index}); rebuild with `cargo build --release -p cellswarm-node --features {kind}`"
    )]
    NotBuilt {
        /// The backend.
        kind: &'static str,
        /// The device index asked for.
        index: usize,
    },
}

/// A device by name: `cpu`, `cuda` / `cuda:N` (built with the `cuda` feature) or `wgpu`
/// (built with the `wgpu` feature).
///
/// # Errors
/// An unknown name, or a backend this build was compiled without.
pub fn device_from_name(name: &str) -> Result<Device, DeviceError> {
    let (kind, index) = name.split_once(':').unwrap_or((name, "0"));
    let index: usize = index
        .parse()
        .map_err(|_| DeviceError::Index(name.to_owned()))?;
    match kind {
        "cpu" => Ok(default_device()),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(index)),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(if index == 0 {
            Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
        } else {
            Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(index))
        }),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(DeviceError::NotBuilt {
            kind: "cuda",
            index,
        }),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => Err(DeviceError::NotBuilt {
            kind: "wgpu",
            index,
        }),
        _ => Err(DeviceError::Unknown(name.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_folders_round_trip_and_refuse_mismatches() {
        let device = default_device();
        device.seed(2);
        let cfg = UNetConfig::new().with_depth(2).with_base_channels(4);
        let model = cfg.init(&device);
        let dir = tempfile::tempdir().unwrap();
        save_model(dir.path(), &model, &cfg).unwrap();
        let (back, back_cfg) = load_model(dir.path(), &device).unwrap();
        assert_eq!(back_cfg, cfg);
        let a = crate::train::params::to_weights(&model).unwrap();
        let b = crate::train::params::to_weights(&back).unwrap();
        assert_eq!(a.hash(), b.hash());
        // A config that does not fit the weights is refused.
        cfg.clone()
            .with_base_channels(8)
            .save(dir.path().join(CONFIG_FILE))
            .unwrap();
        assert!(load_model(dir.path(), &device).is_err());
        let empty = tempfile::tempdir().unwrap();
        let err = load_model(empty.path(), &device).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        // A distance model round-trips with its head; a config.json written before the
        // head existed (no `distance` key) loads as a boundary model.
        let dist = UNetConfig::new()
            .with_depth(2)
            .with_base_channels(4)
            .with_distance(true);
        save_model(dir.path(), &dist.init(&device), &dist).unwrap();
        assert_eq!(load_model(dir.path(), &device).unwrap().1, dist);
        save_model(dir.path(), &model, &cfg).unwrap();
        let old = std::fs::read_to_string(dir.path().join(CONFIG_FILE))
            .unwrap()
            .replace("\"distance\": false,", "")
            .replace(",\n  \"distance\": false", "");
        assert!(!old.contains("distance"), "{old}");
        std::fs::write(dir.path().join(CONFIG_FILE), old).unwrap();
        assert_eq!(load_model(dir.path(), &device).unwrap().1, cfg);
    }

    #[test]
    fn devices_by_name() {
        assert!(device_from_name("cpu").is_ok());
        assert!(
            device_from_name("tpu")
                .unwrap_err()
                .to_string()
                .contains("unknown device")
        );
        assert!(
            device_from_name("cuda:x")
                .unwrap_err()
                .to_string()
                .contains("index")
        );
        #[cfg(not(feature = "cuda"))]
        assert!(
            device_from_name("cuda:0")
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }

    #[test]
    fn shapes_follow_the_config() {
        let device = default_device();
        let cfg = UNetConfig::new().with_depth(2).with_base_channels(4);
        let net = cfg.init(&device);
        let out = net.forward(Tensor::zeros([2, 1, 16, 24], &device));
        assert_eq!(out.classes.dims(), [2, 3, 16, 24]);
        assert_eq!(out.states.unwrap().dims(), [2, 3, 16, 24]);
        let no_states = cfg.with_cell_states(0).init(&device);
        assert!(
            no_states
                .forward(Tensor::zeros([1, 1, 8, 8], &device))
                .states
                .is_none()
        );
    }
}
