//! `cellswarm track` and `cellswarm classify`: cell dynamics from masks or a model.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cellswarm_common::config::FrameRange;

use super::learn::{InferArgs, Segmenter, bar, masks, movie_frames};
use crate::data::ctc::{TrackRecord, read_tracks, write_tracks};
use crate::data::tiff_io::{read_labels, write_labels};
use crate::data::volume::Labels;
use crate::infer::{instance_states, labels_from};
use crate::synth::CellState;
use crate::track::states::{Observation, StateRules, decode};
use crate::track::{DivisionRules, TrackOptions, Tracking, lineage_by_overlap, objects, track};

/// How `cellswarm track` links objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Linker {
    /// Optimal assignment on overlap and distance, divisions, gap closing (the tracker).
    Assignment,
    /// Largest overlap only: for complete masks whose labels are not linked (derives a
    /// lineage to use as ground truth).
    Overlap,
}

/// Arguments of `cellswarm track`.
#[derive(Debug, clap::Args)]
pub struct TrackArgs {
    /// Folder of instance masks, one per frame (`maskTTT.tif`, `man_segTTT.tif` or
    /// `man_trackTTT.tif`), numbered without gaps.
    #[arg(long, required_unless_present = "movie", conflicts_with = "movie")]
    pub masks: Option<PathBuf>,
    /// Segment with this model folder first (default: the built-in generalist model).
    #[arg(long, requires = "movie")]
    pub model: Option<PathBuf>,
    /// The CTC sequence folder (or OME-TIFF file, or OME-Zarr image) to segment and track
    /// (instead of `--masks`).
    #[arg(long)]
    pub movie: Option<PathBuf>,
    /// The channel of an OME-TIFF or OME-Zarr movie: its name or index (needed where it
    /// has several; a CTC folder has one).
    #[arg(long, requires = "movie")]
    pub channel: Option<String>,
    /// Where to write `maskTTT.tif` and `res_track.txt` (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// How objects are linked.
    #[arg(long, value_enum, default_value_t = Linker::Assignment)]
    pub linker: Linker,
    /// Largest displacement between frames for objects that do not overlap, in pixels.
    #[arg(long, default_value_t = TrackOptions::default().max_distance)]
    pub max_distance: f64,
    /// Weight of the distance term against the overlap term of the linking cost.
    #[arg(long, default_value_t = TrackOptions::default().distance_weight)]
    pub distance_weight: f64,
    /// Longest gap to close, in missing frames (0: none).
    #[arg(long, default_value_t = TrackOptions::default().max_gap)]
    pub max_gap: u32,
    /// Do not look for divisions.
    #[arg(long)]
    pub no_divisions: bool,
    /// Smallest area ratio of the smaller daughter to the larger.
    #[arg(long, default_value_t = DivisionRules::default().min_daughter_ratio)]
    pub min_daughter_ratio: f64,
    /// Fewest frames a mother's track must have existed before she divides.
    #[arg(long, default_value_t = DivisionRules::default().min_mother_frames)]
    pub min_mother_frames: u32,
    /// Tracks present in at most this many frames (inside the movie and the field of
    /// view, without daughters) are segmentation fragments: merged into a neighbour or
    /// dropped, and never daughters (0: off).
    #[arg(long, default_value_t = TrackOptions::default().fragment_frames)]
    pub fragment_frames: u32,
    /// Keep fragments that touch no other object as tracks instead of dropping them.
    #[arg(long)]
    pub keep_isolated_fragments: bool,
    /// Cut an object in two before linking when it is at least this many times as large
    /// as the object it continues and took in new mass from where another object was
    /// (a fresh daughter merged with a neighbour); a cut is carried on while the merge
    /// lasts (0: off).
    #[arg(long, default_value_t = TrackOptions::default().split_growth)]
    pub split_growth: f64,
    /// Smallest share of an object's area that must overlap its predecessor (`--linker overlap`).
    #[arg(long, default_value_t = 0.3)]
    pub min_overlap: f64,
    /// Compensate stage drift: search a global shift within this many pixels of the
    /// foreground centroids' shift (0: off).
    #[arg(long, default_value_t = TrackOptions::default().drift_radius)]
    pub drift_radius: usize,
    /// Inference settings for `--movie`.
    #[command(flatten)]
    pub infer: InferArgs,
}

/// Arguments of `cellswarm classify`.
#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// A model folder with a cell-state head.
    #[arg(long)]
    pub model: PathBuf,
    /// A CTC sequence folder, an OME-TIFF file (`.ome.tif`) or an OME-Zarr image
    /// (`.ome.zarr`).
    #[arg(long)]
    pub movie: PathBuf,
    /// The channel of an OME-TIFF or OME-Zarr movie: its name or index (needed where it
    /// has several; a CTC folder has one).
    #[arg(long)]
    pub channel: Option<String>,
    /// Classify these objects (`maskTTT.tif`, e.g. `cellswarm track` output, so labels
    /// are track labels) instead of segmenting.
    #[arg(long)]
    pub masks: Option<PathBuf>,
    /// The CSV file to write: `frame,label,class,probability`.
    #[arg(long)]
    pub out: PathBuf,
    /// Frames to classify (default: all).
    #[arg(long)]
    pub frames: Option<FrameRange>,
    /// Classify every object on its own frame only, even where `--masks` holds tracks
    /// (`res_track.txt`); by default a tracked cell's states are read along its track
    /// (docs/tracking.md, "Cell states along tracks").
    #[arg(long)]
    pub per_frame: bool,
    /// Along tracks: probability of a change of state from one frame to the next (lower
    /// smooths more).
    #[arg(long, default_value_t = StateRules::default().change)]
    pub state_change: f64,
    /// Along tracks: how many times more likely a track that vanishes inside the field
    /// ends dying, and one that ends in two daughters ends dividing.
    #[arg(long, default_value_t = StateRules::default().end_evidence)]
    pub end_evidence: f64,
    /// Along tracks: area ratio to the previous frame below which shrinking is evidence
    /// for dying (0: ignore areas).
    #[arg(long, default_value_t = StateRules::default().shrink)]
    pub shrink: f64,
    /// Inference settings (segmentation settings apply without `--masks`).
    #[command(flatten)]
    pub infer: InferArgs,
}

/// Mask files of a folder under the first prefix that has any, checked for gaps.
fn numbered_masks(dir: &Path) -> anyhow::Result<Vec<(u32, PathBuf)>> {
    for prefix in ["mask", "man_seg", "man_track"] {
        let found = masks(dir, prefix)?;
        if let Some(&(first, _)) = found.first() {
            for (k, (t, p)) in found.iter().enumerate() {
                if *t != first + k as u32 {
                    bail!(
                        "{}: frame {} is missing before it (mask frames must be contiguous)",
                        p.display(),
                        first + k as u32
                    );
                }
            }
            return Ok(found);
        }
    }
    bail!(
        "{}: no maskTTT.tif, man_segTTT.tif or man_trackTTT.tif files",
        dir.display()
    )
}

/// Writes a tracking result in CTC layout; frame numbers start at `first`.
fn write_result(out: &Path, first: u32, r: &Tracking) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let last = first as usize + r.masks.len();
    let width = if last > 1000 { 4 } else { 3 };
    for (k, m) in r.masks.iter().enumerate() {
        let t = first as usize + k;
        write_labels(&out.join(format!("mask{t:0width$}.tif")), m)?;
    }
    let shifted: Vec<TrackRecord> = r
        .tracks
        .iter()
        .map(|t| TrackRecord {
            begin: t.begin + first,
            end: t.end + first,
            ..*t
        })
        .collect();
    write_tracks(&out.join("res_track.txt"), &shifted)?;
    Ok(())
}

/// `cellswarm track`.
///
/// # Errors
/// Unreadable or inconsistent inputs, or write errors.
pub fn track_cmd(a: &TrackArgs) -> anyhow::Result<()> {
    let (first, frames): (u32, Vec<Labels>) = if let Some(dir) = &a.masks {
        let files = numbered_masks(dir)?;
        let pb = bar(files.len() as u64, "masks");
        let mut frames = Vec::with_capacity(files.len());
        for (_, p) in &files {
            frames.push(read_labels(p)?);
            pb.inc(1);
        }
        pb.finish_and_clear();
        (files[0].0, frames)
    } else {
        let Some(movie) = &a.movie else {
            bail!("give --masks DIR, or --movie DIR (with --model DIR, or the built-in model)");
        };
        let mut s = Segmenter::load(a.model.as_deref(), &a.infer)?;
        let (movie, ts) = movie_frames(movie, None, a.channel.as_deref())?;
        s.fix_width(&movie, &ts)?;
        let pb = bar(ts.len() as u64, "frames");
        let mut frames = Vec::with_capacity(ts.len());
        for &t in &ts {
            let img = movie.frame(t)?;
            let planes = s.predict(t, &img);
            frames.push(labels_from(&planes, &s.opts));
            pb.inc(1);
        }
        pb.finish_and_clear();
        (ts.first().copied().unwrap_or(0), frames)
    };
    let r = match a.linker {
        Linker::Overlap => lineage_by_overlap(&frames, a.min_overlap, a.drift_radius)?,
        Linker::Assignment => {
            let opts = TrackOptions {
                max_distance: a.max_distance,
                distance_weight: a.distance_weight,
                max_gap: a.max_gap,
                divisions: (!a.no_divisions).then_some(DivisionRules {
                    min_daughter_ratio: a.min_daughter_ratio,
                    min_mother_frames: a.min_mother_frames,
                    ..DivisionRules::default()
                }),
                drift_radius: a.drift_radius,
                fragment_frames: a.fragment_frames,
                drop_isolated_fragments: !a.keep_isolated_fragments,
                split_growth: a.split_growth,
                ..TrackOptions::default()
            };
            track(&frames, &opts)?
        }
    };
    write_result(&a.out, first, &r)?;
    println!(
        "tracked {} frames: {} tracks, {} divisions, {} gaps closed, {} merged objects cut; wrote {}",
        frames.len(),
        r.tracks.len(),
        r.divisions,
        r.gaps_closed,
        r.merges_split,
        a.out.display()
    );
    Ok(())
}

/// Name of state class `c` of a model with `n` states.
fn state_name(c: usize, n: usize) -> String {
    match CellState::ALL.get(c) {
        Some(s) if n == CellState::ALL.len() => s.name().to_owned(),
        _ => format!("state{c}"),
    }
}

/// `cellswarm classify`.
///
/// # Errors
/// A model without a state head, unreadable inputs, masks that do not fit the frames.
pub fn classify(a: &ClassifyArgs) -> anyhow::Result<()> {
    let mut s = Segmenter::load(Some(&a.model), &a.infer)?;
    if s.config.cell_states == 0 {
        bail!(
            "{}: the model has no cell-state head (config.json has cell_states = 0)",
            a.model.display()
        );
    }
    let (movie, ts) = movie_frames(&a.movie, a.frames, a.channel.as_deref())?;
    s.fix_width(&movie, &ts)?;
    let given = match &a.masks {
        Some(dir) => Some(numbered_masks(dir)?),
        None => None,
    };
    // Tracks given with the masks: states are read along them.
    let tracks = match &a.masks {
        Some(dir) if !a.per_frame && dir.join("res_track.txt").is_file() => {
            if s.config.cell_states == CellState::ALL.len() {
                Some(read_tracks(&dir.join("res_track.txt"))?)
            } else {
                tracing::warn!(
                    states = s.config.cell_states,
                    "the model's states are not interphase, dividing and dying: classifying frame by frame"
                );
                None
            }
        }
        _ => None,
    };
    // (frame, label, state, the head's mean probabilities)
    let mut rows: Vec<(u32, u32, usize, Vec<f32>)> = Vec::new();
    let mut observed: Vec<Observation> = Vec::new();
    let pb = bar(ts.len() as u64, "frames");
    for &t in &ts {
        let img = movie.frame(t)?;
        let planes = s.predict(t, &img);
        let labels = match &given {
            Some(files) => {
                let Some((_, p)) = files.iter().find(|(u, _)| *u == t) else {
                    bail!(
                        "{}: no mask for frame {t}",
                        a.masks.as_deref().unwrap_or(Path::new("")).display()
                    );
                };
                let l = read_labels(p)?;
                if !l.same_shape(&img) {
                    bail!(
                        "{}: size {:?} differs from the frame's {:?}",
                        p.display(),
                        l.shape(),
                        img.shape()
                    );
                }
                l
            }
            None => labels_from(&planes, &s.opts),
        };
        let states = instance_states(&planes, &labels);
        if tracks.is_some() {
            let objs = objects(&labels, 1);
            for st in &states {
                // Both are ascending by label.
                let Ok(at) = objs.binary_search_by_key(&st.label, |o| o.label) else {
                    continue;
                };
                let o = &objs[at];
                let mut p = [0.0f32; 3];
                for (d, v) in p.iter_mut().zip(&st.mean) {
                    *d = *v;
                }
                observed.push(Observation {
                    frame: t,
                    label: st.label,
                    probabilities: p,
                    area: o.area,
                    at_border: o.at_border,
                });
            }
        }
        rows.extend(
            states
                .into_iter()
                .map(|st| (t, st.label, st.class, st.mean)),
        );
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mut changed = 0usize;
    if let Some(tracks) = &tracks {
        let last = ts.last().copied().unwrap_or(0);
        let rules = StateRules {
            change: a.state_change,
            end_evidence: a.end_evidence,
            shrink: a.shrink,
        };
        let decoded = decode(&observed, tracks, last, &rules);
        for r in &mut rows {
            if let Some(&c) = decoded.get(&(r.0, r.1))
                && c != r.2
            {
                r.2 = c;
                changed += 1;
            }
        }
    }
    let mut csv = String::from("frame,label,class,probability\n");
    for (t, label, class, mean) in &rows {
        let _ = writeln!(
            csv,
            "{t},{label},{},{:.4}",
            state_name(*class, s.config.cell_states),
            mean.get(*class).copied().unwrap_or(0.0)
        );
    }
    let objects = rows.len();
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&a.out, csv).with_context(|| format!("writing {}", a.out.display()))?;
    if tracks.is_some() {
        println!(
            "classified {objects} objects in {} frames along their tracks ({changed} changed from the frame's own reading); wrote {}",
            ts.len(),
            a.out.display()
        );
    } else {
        println!(
            "classified {objects} objects in {} frames; wrote {}",
            ts.len(),
            a.out.display()
        );
    }
    Ok(())
}
