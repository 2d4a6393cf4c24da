//! `cellswarm synth | train | segment | eval`: learning on one site, no network.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, bail};
use cellswarm_common::config::FrameRange;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::data::ctc::{Movie, TrackRecord, read_tracks};
use crate::data::dataset::{Annotated, AnnotatedMovie, load_annotated};
use crate::data::patches::SamplerConfig;
use crate::data::stream::{TrainingFrames, open_training};
use crate::data::tiff_io::{read_labels, write_labels};
use crate::data::volume::Image;
use crate::infer::{
    InferOptions, Probabilities, border_objects, labels_from, predict_frame, segment,
};
use crate::measures::compare;
use crate::metrics::{MatchCounts, Overlaps, SegMeasure, match_counts};
use burn::prelude::Device;

use crate::model::{UNet, UNetConfig, device_from_name, load_model, save_model};
use crate::synth::{CellState, Profile, generate, read_state_file};
use crate::train::{Budget, TrainOptions, Trainer};

/// Arguments of `cellswarm train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// CTC sequence folders (e.g. `.../02`), OME-TIFF files (`NAME.ome.tif`) or OME-Zarr
    /// images (`NAME.ome.zarr`); masks are found beside them (`02_GT/SEG`, else
    /// `02_ERR_SEG`; `NAME_masks.ome.tif`; the image's first label image).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// The channel of OME-TIFF and OME-Zarr movies to read: its name or index (needed
    /// where one has several; CTC folders have one).
    #[arg(long)]
    pub channel: Option<String>,
    /// The model folder to write (weights.safetensors and config.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Frames to train on, e.g. `0-14` (default: all annotated frames).
    #[arg(long)]
    pub frames: Option<FrameRange>,
    /// Held-out frames scored after training, e.g. `15-19`.
    #[arg(long)]
    pub val_frames: Option<FrameRange>,
    /// Train for this many minutes.
    #[arg(long, conflicts_with = "steps")]
    pub minutes: Option<f64>,
    /// Train for this many optimiser steps (default 500).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Seed for initialisation, sampling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Patches per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 128)]
    pub patch: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// U-Net levels.
    #[arg(long, default_value_t = 3)]
    pub depth: usize,
    /// Channels of the first level.
    #[arg(long, default_value_t = 16)]
    pub width: usize,
    /// Cell width in pixels the model trains at: each movie is rescaled from the width
    /// of its annotated cells to this, and segmenting rescales images from their
    /// estimated cell width (0: train and segment at the movies' own scale).
    #[arg(long, default_value_t = cellswarm_common::config::DEFAULT_DIAMETER)]
    pub diameter: u32,
    /// How the network tells touching cells apart: `distance` (a head predicting each
    /// pixel's normalised distance to its cell's edge; cells are seeded at its peaks) or
    /// `boundary` (boundaries only; seeds split where their shape has a neck).
    #[arg(long, default_value = "distance")]
    pub instances: cellswarm_common::config::InstanceHead,
    /// Weight of the soft Dice loss term (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub dice: f32,
    /// Smallest object kept when scoring, in pixels.
    #[arg(long, default_value_t = 10)]
    pub min_size: usize,
    /// Constant learning rate (default: cosine decay over the budget).
    #[arg(long)]
    pub constant_lr: bool,
    /// The annotations leave cells cut by the frame border unlabelled (as the CTC
    /// reference segmentations do): segmentations from this model will leave them out too.
    #[arg(long)]
    pub exclude_border: bool,
    /// Compute device: cpu, cuda[:N] or wgpu[:N] (GPU backends need the matching
    /// cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Memory for the training frames, in MiB: movies whose annotated frames need more
    /// are streamed, a few frames held at a time.
    #[arg(long, default_value_t = crate::data::stream::DEFAULT_RESIDENT_MB)]
    pub max_resident_mb: u64,
}

/// Post-processing learned from the training annotations, saved beside the model.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct Postprocess {
    /// Drop objects touching the frame border (the annotations leave them out).
    pub exclude_border: bool,
    /// Smallest object kept, in pixels.
    pub min_size: usize,
    /// The annotated cell width of the training movies, in their pixels (the median
    /// over movies; only for a model trained at a fixed width): the width assumed when
    /// the width of a movie to segment cannot be estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_width: Option<f32>,
}

/// File beside the weights holding [`Postprocess`].
pub const POSTPROCESS_FILE: &str = "postprocess.json";

fn load_postprocess(dir: &Path) -> anyhow::Result<Option<Postprocess>> {
    let p = dir.join(POSTPROCESS_FILE);
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?,
    ))
}

/// Inference settings shared by `segment`, `track --movie` and `classify`.
#[derive(Debug, Clone, clap::Args)]
pub struct InferArgs {
    /// Tile side.
    #[arg(long, default_value_t = 256)]
    pub tile: usize,
    /// Smallest object kept, in pixels at the model's training width (default: the model
    /// folder's postprocess.json, else 10).
    #[arg(long)]
    pub min_size: Option<usize>,
    /// Drop objects touching the frame border (default: as learned from the training
    /// annotations, in postprocess.json).
    #[arg(long)]
    pub exclude_border: Option<bool>,
    /// Compute device: cpu, cuda[:N] or wgpu[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Interior probability a pixel needs to seed a cell (boundary models only; a
    /// distance model seeds at the peaks of its distance).
    #[arg(long)]
    pub seed_threshold: Option<f32>,
    /// Pixels by which two touching cells' cores must be deeper than the neck between
    /// them to be split (lower splits more).
    #[arg(long)]
    pub split_depth: Option<f32>,
    /// Cell width in the movie, in pixels (a round cell's diameter, a rod's width);
    /// images are rescaled from it to the model's training width. Default: estimated
    /// from one frame of the movie by a first pass of the model.
    #[arg(long)]
    pub diameter: Option<f32>,
}

/// A loaded model with its inference settings: the flags, else the model folder's
/// postprocess.json, else the defaults.
pub(crate) struct Segmenter {
    pub(crate) model: UNet,
    pub(crate) config: UNetConfig,
    pub(crate) device: Device,
    pub(crate) opts: InferOptions,
    /// The training movies' cell width from postprocess.json, if known.
    pub(crate) training_width: Option<f32>,
    /// The probabilities of the frame [`Segmenter::fix_width`] estimated the width on,
    /// where they are those [`Segmenter::predict`] would compute for it.
    estimated: Option<(u32, Vec<Probabilities>)>,
}

impl Segmenter {
    /// Loads model folder `dir`, or the built-in generalist model if `None`.
    pub(crate) fn load(dir: Option<&Path>, a: &InferArgs) -> anyhow::Result<Self> {
        let device = device_from_name(&a.device)?;
        let ((model, config), post) = match dir {
            Some(dir) => (load_model(dir, &device)?, load_postprocess(dir)?),
            None => {
                eprintln!(
                    "no --model given: using the built-in generalist model ({})",
                    crate::model::BUILTIN_MODEL
                );
                (crate::model::load_builtin(&device)?, None)
            }
        };
        let opts = InferOptions {
            tile: a.tile,
            min_size: a.min_size.or(post.map(|p| p.min_size)).unwrap_or(10),
            exclude_border: a
                .exclude_border
                .or(post.map(|p| p.exclude_border))
                .unwrap_or(false),
            seed_threshold: a
                .seed_threshold
                .unwrap_or(InferOptions::default().seed_threshold),
            split_depth: a.split_depth.unwrap_or(InferOptions::default().split_depth),
            diameter: a.diameter,
            ..InferOptions::default()
        };
        if let Some(d) = a.diameter
            && !(d.is_finite() && (1.0..=2000.0).contains(&d))
        {
            bail!("--diameter must be between 1 and 2000 pixels, got {d}");
        }
        Ok(Self {
            model,
            config,
            device,
            opts,
            training_width: post.and_then(|p| p.training_width),
            estimated: None,
        })
    }

    /// The probabilities of frame `t` of the movie (its image `img`): the width
    /// estimate's pass where that was frame `t`, else a pass at the fixed width.
    pub(crate) fn predict(&mut self, t: u32, img: &Image) -> Vec<Probabilities> {
        match self.estimated.take_if(|(at, _)| *at == t) {
            Some((_, planes)) => planes,
            None => predict_frame(&self.model, &self.config, &self.device, img, &self.opts),
        }
    }
}

impl Segmenter {
    /// Fixes the cell width of a movie before segmenting it, so every frame is seen at
    /// one scale: the `--diameter` given, else estimated on the middle frame of `frames`
    /// (a model trained at the movies' own scale needs none).
    pub(crate) fn fix_width(&mut self, movie: &Movie, frames: &[u32]) -> anyhow::Result<()> {
        let (Some(target), None) = (self.config.diameter, self.opts.diameter) else {
            return Ok(());
        };
        let Some(&t) = frames.get(frames.len() / 2) else {
            return Ok(());
        };
        let img = movie.frame(t)?;
        let (estimate, planes) = crate::infer::estimate_width_with_pass(
            &self.model,
            &self.config,
            &self.device,
            &img,
            &self.opts,
        );
        // The pass is the one for the estimate, or for the training width without one.
        if estimate.is_some() || self.training_width.is_none() {
            self.estimated = planes.map(|p| (t, p));
        }
        let width = estimate.or(self.training_width).unwrap_or(target as f32);
        let s = crate::scale::factor(target as f32, width, crate::infer::WIDTH_TOLERANCE);
        match (estimate, self.training_width) {
            (Some(w), _) => eprintln!(
                "cells about {w:.1} px wide (frame {t}); the model trained at {target} px: \
                 images rescaled by {s:.3} (set --diameter to override)"
            ),
            (None, Some(w)) => eprintln!(
                "could not estimate the cells' width on frame {t}; assuming the width of the \
                 cells the model trained on, {w:.1} px: images rescaled by {s:.3} (set \
                 --diameter to override)"
            ),
            (None, None) => eprintln!(
                "could not estimate the cells' width on frame {t} (no cells found, or a \
                 rescaled pass did not confirm it); segmenting at the movie's own scale \
                 (set --diameter to override)"
            ),
        }
        self.opts.diameter = Some(width);
        Ok(())
    }
}

/// Opens a movie and lists its frames within `range` (all if `None`); none is an error.
pub(crate) fn movie_frames(
    dir: &Path,
    range: Option<FrameRange>,
    channel: Option<&str>,
) -> anyhow::Result<(Movie, Vec<u32>)> {
    let movie = Movie::open_channel(dir, channel)
        .with_context(|| format!("opening movie {}", dir.display()))?;
    let frames: Vec<u32> = movie
        .frames()
        .filter(|t| range.is_none_or(|r| r.contains(*t)))
        .collect();
    if frames.is_empty() {
        bail!("no frames of {} in the requested range", dir.display());
    }
    Ok((movie, frames))
}

/// Arguments of `cellswarm segment`.
#[derive(Debug, clap::Args)]
pub struct SegmentArgs {
    /// A model folder written by `cellswarm train` (or a demo's `model/`; default: the
    /// built-in generalist model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A CTC sequence folder, an OME-TIFF file (`.ome.tif`) or an OME-Zarr image
    /// (`.ome.zarr`).
    #[arg(long)]
    pub movie: PathBuf,
    /// The channel of an OME-TIFF or OME-Zarr movie: its name or index (needed where it
    /// has several; a CTC folder has one).
    #[arg(long)]
    pub channel: Option<String>,
    /// Where to write `maskTTT.tif` (a folder, created if missing); a path ending in
    /// `.ome.tif` writes one OME-TIFF label movie instead, one ending in `.ome.zarr` an
    /// OME-Zarr (NGFF 0.5) label image (one time point per segmented frame, with the
    /// movie's pixel sizes), and `IMAGE.ome.zarr/labels/NAME` writes that label image
    /// into an NGFF 0.5 image and lists it there.
    #[arg(long)]
    pub out: PathBuf,
    /// Frames to segment (default: all).
    #[arg(long)]
    pub frames: Option<FrameRange>,
    /// Inference settings.
    #[command(flatten)]
    pub infer: InferArgs,
}

/// Arguments of `cellswarm eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Folder of predicted masks (`maskTTT.tif`).
    #[arg(long)]
    pub pred: PathBuf,
    /// Folder of ground truth: `NN_GT/SEG` (`man_segTTT.tif`), `NN_GT`, or `NN_ERR_SEG`.
    #[arg(long)]
    pub gt: PathBuf,
    /// Tracking ground truth (`man_track.txt` with `man_trackTTT.tif`, or `res_track.txt`
    /// with `maskTTT.tif`); default: `TRA` inside or beside `--gt`. Used when `--pred`
    /// holds a `res_track.txt`.
    #[arg(long)]
    pub tra: Option<PathBuf>,
    /// Also score cell states: a `cellswarm classify` CSV for the objects of `--pred`,
    /// against `cell_states.csv` in or beside `--gt`.
    #[arg(long)]
    pub states: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `cellswarm synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Output folder (a CTC dataset: `01/`, `01_GT/`).
    #[arg(long)]
    pub out: PathBuf,
    /// Site profile: balanced, dense, sparse, noisy, fast or textured.
    #[arg(long, default_value = "balanced")]
    pub profile: String,
    /// Number of frames.
    #[arg(long, default_value_t = 20)]
    pub frames: usize,
    /// Generator seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frame side in pixels.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Sequence name.
    #[arg(long, default_value = "01")]
    pub sequence: String,
}

pub(crate) fn bar(len: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let template =
        format!("{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit} {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        pb.set_style(style);
    }
    pb
}

/// `cellswarm synth`.
///
/// # Errors
/// An unknown profile or write errors.
pub fn synth(a: &SynthArgs) -> anyhow::Result<()> {
    let Some(mut p) = Profile::named(&a.profile) else {
        bail!(
            "unknown profile {:?}; choose one of {}",
            a.profile,
            Profile::NAMES.join(", ")
        );
    };
    if a.size < 32 {
        bail!("--size must be at least 32 pixels");
    }
    p.size = a.size;
    let movie = generate(&p, a.frames.max(1), a.seed);
    movie
        .write_ctc(&a.out, &a.sequence)
        .with_context(|| format!("writing the movie to {}", a.out.display()))?;
    let divisions = movie.tracks.iter().filter(|t| t.parent != 0).count();
    println!(
        "wrote {} frames of {}x{} ({} profile, seed {}) to {}: {} tracks, {} division daughters",
        a.frames,
        p.size,
        p.size,
        p.name,
        a.seed,
        a.out.join(&a.sequence).display(),
        movie.tracks.len(),
        divisions
    );
    Ok(())
}

fn load_frames(
    dirs: &[PathBuf],
    frames: Option<FrameRange>,
    channel: Option<&str>,
) -> anyhow::Result<Vec<Annotated>> {
    let mut all = Vec::new();
    for d in dirs {
        let movie = Movie::open_channel(d, channel)
            .with_context(|| format!("opening movie {}", d.display()))?;
        all.extend(load_annotated(&movie, frames)?);
    }
    Ok(all)
}

/// Scores segmentations of annotated frames.
fn score(
    model: &UNet,
    config: &UNetConfig,
    device: &Device,
    frames: &[Annotated],
    post: Postprocess,
) -> (MatchCounts, SegMeasure) {
    let mut opts = InferOptions {
        min_size: post.min_size,
        exclude_border: post.exclude_border,
        ..InferOptions::default()
    };
    // One width for all held-out frames, as `segment` does: estimated on the middle
    // frame, else the training movies' width.
    if config.diameter.is_some() {
        opts.diameter = frames
            .get(frames.len() / 2)
            .and_then(|a| crate::infer::estimate_width(model, config, device, &a.image, &opts))
            .or(post.training_width);
    }
    let mut counts = MatchCounts::default();
    let mut seg = SegMeasure::default();
    for a in frames {
        // The images are already normalised; segment() normalises again, which is a no-op
        // up to the percentile positions (0 and 1 map to themselves).
        let pred = segment(model, config, device, &a.image, &opts);
        let o = Overlaps::new(&a.labels, &pred);
        counts += match_counts(&o, 0.5);
        seg.add(&o);
    }
    (counts, seg)
}

/// `cellswarm train`.
///
/// # Errors
/// Unreadable data, bad settings, or a diverging run.
pub fn train(a: &TrainArgs) -> anyhow::Result<()> {
    if let Some(problem) = cellswarm_common::config::ModelSpec::diameter_problem(a.diameter) {
        bail!("--diameter {problem}");
    }
    let mut listed = Vec::with_capacity(a.data.len());
    for d in &a.data {
        let movie = Movie::open_channel(d, a.channel.as_deref())
            .with_context(|| format!("opening movie {}", d.display()))?;
        listed.push(AnnotatedMovie::open(&movie, a.frames)?);
    }
    let diameter = (a.diameter > 0).then_some(a.diameter);
    let training = open_training(listed, diameter, a.max_resident_mb)?;
    let val = match a.val_frames {
        Some(r) => load_frames(&a.data, Some(r), a.channel.as_deref())?,
        None => Vec::new(),
    };
    let config = UNetConfig::new()
        .with_depth(a.depth)
        .with_base_channels(a.width)
        .with_diameter((a.diameter > 0).then_some(a.diameter))
        .with_distance(a.instances == cellswarm_common::config::InstanceHead::Distance);
    let options = TrainOptions {
        batch: a.batch,
        learning_rate: a.lr,
        dice_weight: a.dice,
        seed: a.seed,
        sampler: SamplerConfig {
            patch: a.patch,
            ..SamplerConfig::default()
        },
        cosine_decay: !a.constant_lr,
        ..TrainOptions::default()
    };
    let training_width = config.diameter.and_then(|_| {
        let widths = match &training {
            TrainingFrames::Resident(frames) => crate::data::dataset::movie_widths(frames),
            TrainingFrames::Streamed(s) => s.widths().clone(),
        };
        let mut widths: Vec<f32> = widths
            .into_values()
            .filter(|w| w.is_finite() && *w > 0.0)
            .collect();
        widths.sort_by(f32::total_cmp);
        widths.get(widths.len() / 2).copied()
    });
    let post = Postprocess {
        exclude_border: a.exclude_border,
        min_size: a.min_size,
        training_width,
    };
    let (touching, objects) = match &training {
        TrainingFrames::Resident(frames) => {
            border_objects(&frames.iter().map(|f| &f.labels).collect::<Vec<_>>())
        }
        TrainingFrames::Streamed(_) => (0, 0),
    };
    if !a.exclude_border && objects >= 100 && touching * 50 < objects {
        eprintln!(
            "note: only {touching} of {objects} annotated objects touch the frame border; if the annotations \
             leave cells cut by the border unlabelled, pass --exclude-border"
        );
    }
    let device = device_from_name(&a.device)?;
    let described = match &training {
        TrainingFrames::Resident(frames) => format!("{} annotated frames", frames.len()),
        TrainingFrames::Streamed(s) => format!(
            "{} annotated frames, streamed {} at a time (over --max-resident-mb {})",
            s.frames(),
            s.resident(),
            a.max_resident_mb
        ),
    };
    let planes = training.into_planes(config.diameter);
    let mut trainer = Trainer::new(&config, &device, planes, options, None)?;
    let budget = match (a.minutes, a.steps) {
        (Some(m), _) => Budget::Time(Duration::from_secs_f64(m * 60.0)),
        (None, s) => Budget::Steps(s.unwrap_or(500)),
    };
    eprintln!(
        "training on {described} from {} movie(s); class weights {:?}",
        a.data.len(),
        trainer.class_weight_values()
    );
    let pb = match budget {
        Budget::Steps(s) => bar(s, "steps"),
        Budget::Time(d) => bar(d.as_secs(), "s"),
    };
    let mut recent = Vec::new();
    let report = trainer.train(budget, &AtomicBool::new(false), |step, loss| {
        recent.push(loss);
        if recent.len() > 20 {
            recent.remove(0);
        }
        match budget {
            Budget::Steps(_) => pb.set_position(step),
            Budget::Time(_) => pb.set_position(pb.elapsed().as_secs()),
        }
        pb.set_message(format!(
            "loss {:.4}",
            recent.iter().sum::<f32>() / recent.len() as f32
        ));
    })?;
    pb.finish_and_clear();
    let model = trainer.model();
    save_model(&a.out, &model, &config)?;
    let pp = a.out.join(POSTPROCESS_FILE);
    std::fs::write(&pp, serde_json::to_string_pretty(&post)?)
        .with_context(|| format!("writing {}", pp.display()))?;
    println!(
        "trained {} steps ({} patches) in {:.1} s: mean loss {:.4}, last {:.4}; model saved to {}",
        report.steps,
        report.samples,
        report.elapsed.as_secs_f64(),
        report.mean_loss,
        report.last_loss,
        a.out.display()
    );
    if !val.is_empty() {
        let (counts, seg) = score(&model, &config, &device, &val, post);
        let s = counts.scores(0.5);
        println!(
            "held-out frames {}: F1@0.5 {:.4}  precision {:.4}  recall {:.4}  AP@0.5 {:.4}  mean IoU {:.4}  SEG {:.4}",
            a.val_frames.map(|r| r.to_string()).unwrap_or_default(),
            s.f1,
            s.precision,
            s.recall,
            s.ap,
            s.mean_matched_iou,
            seg.value()
        );
        if !a.exclude_border {
            // References that leave cells cut by the border unlabelled (CTC's often do)
            // count every such cell the model finds as a false positive: say so when
            // leaving them out scores clearly better on the held-out frames.
            let without = Postprocess {
                exclude_border: true,
                ..post
            };
            let (c, _) = score(&model, &config, &device, &val, without);
            let f1 = c.scores(0.5).f1;
            if f1 >= s.f1 + BORDER_NOTE_GAIN {
                eprintln!(
                    "note: leaving out the objects that touch the frame border scores F1@0.5 {f1:.4} on the \
                     held-out frames ({:.4} with them): the annotations may leave cells cut by the border \
                     unlabelled; if so, train with --exclude-border (or segment with --exclude-border true)",
                    s.f1
                );
            }
        }
    }
    Ok(())
}

/// How much better the held-out F1 must be without border objects for `train` to
/// suggest `--exclude-border`.
const BORDER_NOTE_GAIN: f64 = 0.03;

/// `cellswarm segment`.
///
/// # Errors
/// An unreadable model or movie, or write errors.
pub fn segment_cmd(a: &SegmentArgs) -> anyhow::Result<()> {
    let mut s = Segmenter::load(a.model.as_deref(), &a.infer)?;
    let (movie, frames) = movie_frames(&a.movie, a.frames, a.channel.as_deref())?;
    s.fix_width(&movie, &frames)?;
    // `IMAGE.ome.zarr/labels/NAME`: the masks go into the image, listed as its labels.
    let into_image = crate::data::ngff::inside_image(&a.out);
    let zarr = into_image.is_some() || crate::data::ngff::is_ome_zarr(&a.out);
    let label_movie = zarr || crate::data::ome::is_ome_tiff(&a.out);
    if label_movie {
        // Time point t of a label movie is frame t of the movie it labels.
        if a.frames
            .is_some_and(|r| r.first > movie.frames().next().unwrap_or(0))
        {
            bail!(
                "{}: an OME label movie starts at the movie's first frame; drop --frames, or \
                 write maskTTT.tif files to a folder",
                a.out.display()
            );
        }
        if let Some(parent) = a
            .out
            .parent()
            .filter(|p| !p.as_os_str().is_empty() && into_image.is_none())
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
    } else {
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    }
    let width = if movie.len() > 1000 { 4 } else { 3 };
    let pb = bar(frames.len() as u64, "frames");
    let mut kept = Vec::new();
    for &t in &frames {
        let img = movie.frame(t)?;
        let labels = labels_from(&s.predict(t, &img), &s.opts);
        if label_movie {
            kept.push(labels);
        } else {
            write_labels(&a.out.join(format!("mask{t:0width$}.tif")), &labels)?;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if !label_movie {
        println!("wrote {} masks to {}", frames.len(), a.out.display());
        return Ok(());
    }
    let physical = movie.physical_size().unwrap_or_default();
    if let Some((image, name)) = &into_image {
        crate::data::ngff::write_image_labels(image, name, &kept, physical)?;
    } else if zarr {
        crate::data::ngff::write_labels(&a.out, &kept, physical)?;
    } else {
        crate::data::ome::write_labels(&a.out, &kept, physical)?;
    }
    println!(
        "wrote {} frames of masks to {} ({})",
        frames.len(),
        a.out.display(),
        if zarr { "OME-Zarr" } else { "OME-TIFF" }
    );
    Ok(())
}

/// Numbered `prefix`TTT.tif files in a folder.
pub(crate) fn masks(dir: &Path, prefix: &str) -> anyhow::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(t) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".tif"))
            .and_then(|d| d.parse::<u32>().ok())
        {
            out.push((t, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The result of `cellswarm eval`.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    /// Frames scored.
    pub frames: Vec<u32>,
    /// Ground-truth objects.
    pub gt_objects: u64,
    /// Instance matching at IoU 0.5, 0.75 and 0.9.
    pub matching: Vec<crate::metrics::MatchScores>,
    /// CTC SEG.
    pub seg: f64,
    /// Tracking measures, when the prediction has a lineage and the ground truth a TRA.
    pub tracking: Option<TrackingReport>,
    /// Cell-state accuracy, when asked for.
    pub states: Option<StateReport>,
}

/// Tracking measures of `cellswarm eval`.
#[derive(Debug, Serialize)]
pub struct TrackingReport {
    /// The TRA ground truth used.
    pub reference: PathBuf,
    /// Frames compared.
    pub frames: usize,
    /// CTC DET.
    pub det: Option<f64>,
    /// CTC TRA.
    pub tra: Option<f64>,
    /// Linking measure LNK.
    pub lnk: Option<f64>,
    /// The AOGM and its operation counts.
    pub aogm: f64,
    /// Operation counts.
    pub counts: crate::measures::AogmCounts,
    /// Division counts.
    pub divisions: crate::measures::DivisionCounts,
    /// Share of reference divisions found.
    pub division_recall: Option<f64>,
}

/// Cell-state scores of `cellswarm eval --states`.
#[derive(Debug, Serialize)]
pub struct StateReport {
    /// Ground-truth objects with a state that were detected and classified.
    pub objects: u64,
    /// Of these, classified correctly.
    pub correct: u64,
    /// `correct / objects`.
    pub accuracy: f64,
    /// Per state: (name, objects, recall).
    pub per_state: Vec<(String, u64, f64)>,
}

/// Frame-numbered mask files of a TRA folder and its lineage file.
fn tra_files(dir: &Path) -> anyhow::Result<(Vec<(u32, PathBuf)>, PathBuf)> {
    for (prefix, file) in [("man_track", "man_track.txt"), ("mask", "res_track.txt")] {
        let lineage = dir.join(file);
        if lineage.is_file() {
            let m = masks(dir, prefix)?;
            if m.is_empty() {
                bail!("{}: {file} but no {prefix}TTT.tif masks", dir.display());
            }
            return Ok((m, lineage));
        }
    }
    bail!("{}: neither man_track.txt nor res_track.txt", dir.display())
}

fn tracking_report(pred: &Path, tra_dir: &Path) -> anyhow::Result<TrackingReport> {
    let (gt_masks, gt_lineage) = tra_files(tra_dir)?;
    let preds = masks(pred, "mask")?;
    let mut gts = Vec::with_capacity(gt_masks.len());
    let mut res = Vec::with_capacity(gt_masks.len());
    let first = gt_masks.first().map_or(0, |(t, _)| *t);
    for (k, (t, gp)) in gt_masks.iter().enumerate() {
        if *t != first + k as u32 {
            bail!("{}: TRA frames must be contiguous", gp.display());
        }
        let Some((_, pp)) = preds.iter().find(|(u, _)| u == t) else {
            bail!(
                "{}: no mask{t:03}.tif for TRA frame {t} (tracking is scored on every frame)",
                pred.display()
            );
        };
        gts.push(read_labels(gp)?);
        res.push(read_labels(pp)?);
    }
    let shift = |v: Vec<TrackRecord>| -> Vec<TrackRecord> {
        v.into_iter()
            .map(|r| TrackRecord {
                begin: r.begin.saturating_sub(first),
                end: r.end.saturating_sub(first),
                ..r
            })
            .collect()
    };
    let gt_tracks = shift(read_tracks(&gt_lineage)?);
    let res_tracks = shift(read_tracks(&pred.join("res_track.txt"))?);
    let (c, d) = compare((&gts, &gt_tracks), (&res, &res_tracks))
        .with_context(|| format!("scoring {} against {}", pred.display(), tra_dir.display()))?;
    Ok(TrackingReport {
        reference: tra_dir.to_owned(),
        frames: gts.len(),
        det: c.det(),
        tra: c.tra(),
        lnk: c.lnk(),
        aogm: c.aogm(),
        counts: c,
        divisions: d,
        division_recall: d.recall(),
    })
}

fn state_report(
    pred: &Path,
    gt_seg: &[(u32, PathBuf)],
    pred_states: &Path,
    gt_states: &Path,
) -> anyhow::Result<StateReport> {
    use std::collections::HashMap;
    let predicted: HashMap<(u32, u32), CellState> = read_state_file(pred_states)?
        .into_iter()
        .map(|(t, l, s)| ((t, l), s))
        .collect();
    let truth: HashMap<(u32, u32), CellState> = read_state_file(gt_states)?
        .into_iter()
        .map(|(t, l, s)| ((t, l), s))
        .collect();
    let preds = masks(pred, "mask")?;
    let mut per = vec![(0u64, 0u64); CellState::ALL.len()];
    for (t, gp) in gt_seg {
        let Some((_, pp)) = preds.iter().find(|(u, _)| u == t) else {
            continue;
        };
        let o = Overlaps::new(&read_labels(gp)?, &read_labels(pp)?);
        for (&(g, p), &inter) in &o.pairs {
            if 2 * inter <= o.gt_area[&g] {
                continue;
            }
            let (Some(want), Some(got)) = (truth.get(&(*t, g)), predicted.get(&(*t, p))) else {
                continue;
            };
            let e = &mut per[want.index() as usize];
            e.0 += 1;
            e.1 += u64::from(want == got);
        }
    }
    let objects: u64 = per.iter().map(|e| e.0).sum();
    let correct: u64 = per.iter().map(|e| e.1).sum();
    if objects == 0 {
        bail!(
            "no ground-truth object with a state in {} was detected and classified in {}",
            gt_states.display(),
            pred_states.display()
        );
    }
    Ok(StateReport {
        objects,
        correct,
        accuracy: correct as f64 / objects as f64,
        per_state: CellState::ALL
            .iter()
            .zip(&per)
            .map(|(s, e)| {
                (
                    s.name().to_owned(),
                    e.0,
                    if e.0 == 0 {
                        0.0
                    } else {
                        e.1 as f64 / e.0 as f64
                    },
                )
            })
            .collect(),
    })
}

/// Scores predicted masks against ground truth.
///
/// # Errors
/// Unreadable folders or files, no common frames, or masks of different sizes.
pub fn evaluate(
    pred: &Path,
    gt: &Path,
    tra: Option<&Path>,
    states: Option<&Path>,
) -> anyhow::Result<EvalReport> {
    let gt_dir = if gt.join("SEG").is_dir() {
        gt.join("SEG")
    } else {
        gt.to_owned()
    };
    let mut gts = masks(&gt_dir, "man_seg")?;
    if gts.is_empty() {
        gts = masks(&gt_dir, "mask")?;
    }
    if gts.is_empty() {
        bail!(
            "{}: no man_segTTT.tif or maskTTT.tif ground-truth masks",
            gt_dir.display()
        );
    }
    let preds = masks(pred, "mask")?;
    let thresholds = [0.5, 0.75, 0.9];
    let mut counts = [MatchCounts::default(); 3];
    let mut seg = SegMeasure::default();
    let mut frames = Vec::new();
    for (t, gp) in &gts {
        let Some((_, pp)) = preds.iter().find(|(u, _)| u == t) else {
            continue;
        };
        let g = read_labels(gp)?;
        let p = read_labels(pp)?;
        if !g.same_shape(&p) {
            bail!(
                "{}: size {:?} differs from the ground truth's {:?}",
                pp.display(),
                p.shape(),
                g.shape()
            );
        }
        let o = Overlaps::new(&g, &p);
        for (c, th) in counts.iter_mut().zip(thresholds) {
            *c += match_counts(&o, th);
        }
        seg.add(&o);
        frames.push(*t);
    }
    if frames.is_empty() {
        bail!(
            "no frame of {} has a prediction in {} (expected maskTTT.tif with the same frame numbers)",
            gt_dir.display(),
            pred.display()
        );
    }
    // The folder holding TRA/ and cell_states.csv: `--gt` itself or, for `NN_GT/SEG`, its parent.
    let gt_root = if gt_dir == gt {
        gt.parent().unwrap_or(gt).to_owned()
    } else {
        gt.to_owned()
    };
    let tracking = if pred.join("res_track.txt").is_file() {
        let dir = tra.map_or_else(|| gt_root.join("TRA"), Path::to_owned);
        if tra.is_some() || dir.is_dir() {
            Some(tracking_report(pred, &dir)?)
        } else {
            None
        }
    } else if let Some(t) = tra {
        bail!(
            "--tra {} given but {} has no res_track.txt (run cellswarm track)",
            t.display(),
            pred.display()
        );
    } else {
        None
    };
    let states = match states {
        Some(file) => {
            let truth = gt_root.join("cell_states.csv");
            if !truth.is_file() {
                bail!(
                    "{}: no cell-state ground truth to score --states against",
                    truth.display()
                );
            }
            Some(state_report(pred, &gts, file, &truth)?)
        }
        None => None,
    };
    Ok(EvalReport {
        tracking,
        states,
        frames,
        gt_objects: seg.objects,
        matching: counts
            .iter()
            .zip(thresholds)
            .map(|(c, t)| c.scores(t))
            .collect(),
        seg: seg.value(),
    })
}

/// `cellswarm eval`.
///
/// # Errors
/// As [`evaluate`].
pub fn eval(a: &EvalArgs) -> anyhow::Result<()> {
    let r = evaluate(&a.pred, &a.gt, a.tra.as_deref(), a.states.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} frames, {} ground-truth objects",
        r.frames.len(),
        r.gt_objects
    );
    println!("IoU   precision  recall     F1         AP         mean IoU   TP/FP/FN");
    for s in &r.matching {
        println!(
            "{:<5} {:<10.4} {:<10.4} {:<10.4} {:<10.4} {:<10.4} {}/{}/{}",
            s.threshold,
            s.precision,
            s.recall,
            s.f1,
            s.ap,
            s.mean_matched_iou,
            s.counts.tp,
            s.counts.fp,
            s.counts.fn_
        );
    }
    println!("SEG {:.4}", r.seg);
    let show = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.4}"));
    if let Some(t) = &r.tracking {
        let c = &t.counts;
        println!(
            "DET {}  TRA {}  LNK {}  ({} frames of {})",
            show(t.det),
            show(t.tra),
            show(t.lnk),
            t.frames,
            t.reference.display()
        );
        println!(
            "AOGM {:.1}: NS {} FN {} FP {} ED {} EA {} EC {} over {} vertices, {} edges",
            t.aogm, c.ns, c.fn_, c.fp, c.ed, c.ea, c.ec, c.vertices, c.edges
        );
        println!(
            "divisions: {} found, {} missed, {} made up (recall {})",
            t.divisions.tp,
            t.divisions.fn_,
            t.divisions.fp,
            show(t.division_recall)
        );
    }
    if let Some(s) = &r.states {
        print!(
            "cell states: accuracy {:.4} over {} objects;",
            s.accuracy, s.objects
        );
        for (name, n, recall) in &s.per_state {
            print!(" {name} {recall:.3} ({n})");
        }
        println!();
    }
    Ok(())
}
