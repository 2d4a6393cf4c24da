//! Annotated frames of a site's movies, ready for training and validation.

use std::collections::{BTreeMap, HashMap};

use cellswarm_common::config::FrameRange;

use super::DataError;
use super::ctc::{Movie, TrackRecord};
use super::normalize::{
    HIGH_PERCENTILE, LOW_PERCENTILE, TRAINING_SMOOTHING_RADIUS, classes, normalize_smoothed,
};
use super::patches::{NO_STATE, TrainPlane};
use super::volume::{Image, Labels};
use crate::scale;
use crate::synth::{CellState, read_states};

/// One annotated frame.
#[derive(Debug, Clone)]
pub struct Annotated {
    /// The sequence folder it came from.
    pub movie: String,
    /// Frame number.
    pub t: u32,
    /// Percentile-normalised intensities.
    pub image: Image,
    /// Instance labels.
    pub labels: Labels,
    /// Cell-state class per pixel ([`NO_STATE`] where unknown), if the movie has states.
    pub states: Option<Vec<u8>>,
}

/// A movie's annotated frames within a range, listed but not yet read: each is read
/// when asked ([`AnnotatedMovie::load`]), so a movie larger than memory can be streamed.
#[derive(Debug, Clone)]
pub struct AnnotatedMovie {
    movie: Movie,
    name: String,
    frames: Vec<u32>,
    /// Explicit states (label to state index) by frame, when the movie has a states file.
    states: Option<HashMap<u32, HashMap<u32, u8>>>,
    /// The lineage that implies states where no states file is given.
    lineage: Option<Vec<TrackRecord>>,
}

impl AnnotatedMovie {
    /// Lists the annotated frames of `movie` within `range` (all annotated frames if
    /// `None`) and reads its states or lineage.
    ///
    /// # Errors
    /// Read errors, or [`DataError::NoMasks`] when no frame in the range has a mask.
    pub fn open(movie: &Movie, range: Option<FrameRange>) -> Result<Self, DataError> {
        let frames: Vec<u32> = movie
            .annotated_frames()
            .into_iter()
            .filter(|t| range.is_none_or(|r| r.contains(*t)))
            .collect();
        if frames.is_empty() {
            return Err(DataError::NoMasks {
                path: movie.dir().to_owned(),
                problem: match range {
                    Some(r) => {
                        format!("no annotated frame in {r} (masks in NN_GT/SEG or NN_ERR_SEG)")
                    }
                    None => "no masks found beside it (NN_GT/SEG/man_segTTT.tif or NN_ERR_SEG/maskTTT.tif)"
                        .into(),
                },
            });
        }
        // Explicit states win; otherwise a lineage implies some (see `lineage_state`).
        let rows = read_states(movie.dir())?;
        let lineage = match rows {
            Some(_) => None,
            None => movie.tracks()?,
        };
        let states = rows.map(|rows| {
            let mut by_frame: HashMap<u32, HashMap<u32, u8>> = HashMap::new();
            for (t, l, s) in rows {
                by_frame.entry(t).or_default().insert(l, s.index());
            }
            by_frame
        });
        Ok(Self {
            movie: movie.clone(),
            name: movie.dir().display().to_string(),
            frames,
            states,
            lineage,
        })
    }

    /// The same frames without those in `range` (held out).
    #[must_use]
    pub fn without(mut self, range: Option<FrameRange>) -> Self {
        if let Some(r) = range {
            self.frames.retain(|t| !r.contains(*t));
        }
        self
    }

    /// The annotated frames listed.
    #[must_use]
    pub fn frames(&self) -> &[u32] {
        &self.frames
    }

    /// The movie's name (its folder or file), as [`Annotated::movie`] has it.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads frame `t`: normalised intensities, its mask and the states it implies;
    /// `None` when the frame has no mask after all.
    ///
    /// # Errors
    /// Read errors.
    pub fn load(&self, t: u32) -> Result<Option<Annotated>, DataError> {
        let movie = &self.movie;
        let raw = movie.frame(t)?;
        let Some(labels) = movie.seg_mask(t, &raw)? else {
            return Ok(None);
        };
        let derived = match &self.lineage {
            Some(tracks) => movie
                .tra_mask(t, &raw)?
                .filter(|tra| tra.same_shape(&labels))
                .map(|tra| states_from_lineage(&labels, &tra, tracks, t, movie.last_frame())),
            None => None,
        };
        let st = derived.or_else(|| {
            self.states.as_ref().map(|by_frame| {
                let map = by_frame.get(&t);
                labels
                    .data
                    .iter()
                    .map(|l| map.and_then(|m| m.get(l)).copied().unwrap_or(NO_STATE))
                    .collect()
            })
        });
        Ok(Some(Annotated {
            movie: self.name.clone(),
            t,
            image: normalize_smoothed(
                &raw,
                LOW_PERCENTILE,
                HIGH_PERCENTILE,
                TRAINING_SMOOTHING_RADIUS,
            ),
            labels,
            states: st,
        }))
    }
}

/// Loads the annotated frames of `movie` within `range` (all annotated frames if `None`).
///
/// # Errors
/// Read errors, or [`DataError::NoMasks`] when no frame in the range has a mask.
pub fn load_annotated(
    movie: &Movie,
    range: Option<FrameRange>,
) -> Result<Vec<Annotated>, DataError> {
    let listed = AnnotatedMovie::open(movie, range)?;
    let mut out = Vec::with_capacity(listed.frames.len());
    for &t in &listed.frames {
        out.extend(listed.load(t)?);
    }
    Ok(out)
}

/// Frames before a division labelled "dividing" when states come from a lineage.
pub const DIVIDING_FRAMES: u32 = 2;

/// The state a lineage implies for a track in frame `t`: a mother's last
/// [`DIVIDING_FRAMES`] frames are dividing; the last frames of a track that ends without
/// children before the movie does are unknown (the cell may die, leave or be lost);
/// every other frame is interphase.
#[must_use]
pub fn lineage_state(
    track: &TrackRecord,
    children: usize,
    t: u32,
    last_frame: u32,
) -> Option<CellState> {
    let near_end = t + DIVIDING_FRAMES > track.end;
    if !near_end {
        Some(CellState::Interphase)
    } else if children >= 2 {
        Some(CellState::Dividing)
    } else if track.end < last_frame {
        None
    } else {
        Some(CellState::Interphase)
    }
}

/// Per-pixel states of a segmentation from a lineage: each object takes the state (see
/// [`lineage_state`]) of the TRA object it overlaps most; pixels of objects that overlap
/// none are unknown.
#[must_use]
pub fn states_from_lineage(
    seg: &Labels,
    tra: &Labels,
    tracks: &[TrackRecord],
    t: u32,
    last_frame: u32,
) -> Vec<u8> {
    let mut children: HashMap<u32, usize> = HashMap::new();
    for tr in tracks.iter().filter(|tr| tr.parent != 0) {
        *children.entry(tr.parent).or_default() += 1;
    }
    let by_label: HashMap<u32, &TrackRecord> = tracks.iter().map(|tr| (tr.label, tr)).collect();
    let mut overlap: HashMap<(u32, u32), u64> = HashMap::new();
    for (&s, &r) in seg.data.iter().zip(&tra.data) {
        if s != 0 && r != 0 {
            *overlap.entry((s, r)).or_default() += 1;
        }
    }
    let mut best: HashMap<u32, (u64, u32)> = HashMap::new();
    for (&(s, r), &n) in &overlap {
        let e = best.entry(s).or_insert((0, 0));
        if (n, std::cmp::Reverse(r)) > (e.0, std::cmp::Reverse(e.1)) {
            *e = (n, r);
        }
    }
    let state: HashMap<u32, u8> = best
        .into_iter()
        .filter_map(|(s, (_, r))| {
            let tr = by_label.get(&r)?;
            let st = lineage_state(tr, children.get(&r).copied().unwrap_or(0), t, last_frame)?;
            Some((s, st.index()))
        })
        .collect();
    seg.data
        .iter()
        .map(|s| state.get(s).copied().unwrap_or(NO_STATE))
        .collect()
}

/// Cell width of each movie's annotations in pixels (the typical width of every annotated
/// plane's cell regions, see [`crate::scale::typical_width`]), by movie; movies without
/// a cell at least 3 pixels wide are left out.
#[must_use]
pub fn movie_widths(frames: &[Annotated]) -> BTreeMap<String, f32> {
    let mut regions: BTreeMap<String, Vec<(f32, usize)>> = BTreeMap::new();
    for a in frames {
        let (h, w) = (a.labels.height, a.labels.width);
        let all = regions.entry(a.movie.clone()).or_default();
        for z in 0..a.labels.depth {
            let mask: Vec<bool> = a.labels.plane(z).iter().map(|&l| l != 0).collect();
            all.extend(scale::regions(&mask, h, w));
        }
    }
    regions
        .into_iter()
        .filter_map(|(m, r)| scale::typical_width(&r).map(|v| (m, v)))
        .collect()
}

/// `a` with every plane rescaled by `s`: the image bilinearly, labels and states by
/// nearest neighbour.
#[must_use]
pub fn rescaled(a: &Annotated, s: f32) -> Annotated {
    let (d, h, w) = a.labels.shape();
    let (nh, nw) = scale::scaled_size(h, w, s);
    let mut image = Image::new(d, nh, nw);
    let mut labels = Labels::new(d, nh, nw);
    let mut states = a.states.as_ref().map(|_| Vec::with_capacity(d * nh * nw));
    for z in 0..d {
        image
            .plane_mut(z)
            .copy_from_slice(&scale::resample(a.image.plane(z), h, w, nh, nw));
        labels
            .plane_mut(z)
            .copy_from_slice(&scale::resample_nearest(a.labels.plane(z), h, w, nh, nw));
        if let (Some(out), Some(st)) = (states.as_mut(), a.states.as_ref()) {
            out.extend(scale::resample_nearest(
                &st[z * h * w..(z + 1) * h * w],
                h,
                w,
                nh,
                nw,
            ));
        }
    }
    Annotated {
        movie: a.movie.clone(),
        t: a.t,
        image,
        labels,
        states,
    }
}

/// The 2D training planes of annotated frames (each z-plane of a 3D frame on its own).
/// With a training width `diameter` (pixels), each movie's frames are first rescaled from
/// the movie's annotated cell width ([`movie_widths`]) to it.
#[must_use]
pub fn train_planes(frames: &[Annotated], diameter: Option<u32>) -> Vec<TrainPlane> {
    // Each movie's factor, from its annotated width to the training width.
    let factors: BTreeMap<String, f32> = match diameter {
        Some(d) => movie_widths(frames)
            .into_iter()
            .map(|(movie, width)| {
                let s = scale::factor(d as f32, width, crate::infer::WIDTH_TOLERANCE);
                tracing::info!(movie, width, scale = s, "training scale of a movie");
                (movie, s)
            })
            .collect(),
        None => BTreeMap::new(),
    };
    let mut out = Vec::new();
    for a in frames {
        let s = factors.get(&a.movie).copied().unwrap_or(1.0);
        out.extend(frame_planes(a, s));
    }
    out
}

/// The 2D training planes of one annotated frame, rescaled by its movie's factor `s`
/// (from its annotated width to the training width; capped for the frame's size).
#[must_use]
pub fn frame_planes(a: &Annotated, s: f32) -> Vec<TrainPlane> {
    let s = scale::capped(s, a.labels.height, a.labels.width);
    let resized;
    let a = if s == 1.0 {
        a
    } else {
        resized = rescaled(a, s);
        &resized
    };
    let cls = classes(&a.labels);
    let n = a.labels.plane_len();
    (0..a.labels.depth)
        .map(|z| {
            TrainPlane::new(
                a.labels.height,
                a.labels.width,
                a.image.plane(z).to_vec(),
                cls[z * n..(z + 1) * n].to_vec(),
                a.states.as_ref().map(|s| s[z * n..(z + 1) * n].to_vec()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::Volume;

    /// A frame of `movie` with disks of radius `r` on a 4 x 4 grid, 6 r apart.
    fn disk_frame(movie: &str, r: f32) -> Annotated {
        let side = (24.0 * r) as usize;
        let mut labels = vec![0u32; side * side];
        for (k, l) in labels.iter_mut().enumerate() {
            let (y, x) = ((k / side) as f32, (k % side) as f32);
            for c in 0..16u32 {
                let (cy, cx) = (
                    (3.0 + 6.0 * (c / 4) as f32) * r,
                    (3.0 + 6.0 * (c % 4) as f32) * r,
                );
                if (y - cy).powi(2) + (x - cx).powi(2) <= r * r {
                    *l = c + 1;
                }
            }
        }
        let image = labels
            .iter()
            .map(|&l| if l > 0 { 0.8 } else { 0.1 })
            .collect();
        Annotated {
            movie: movie.into(),
            t: 0,
            image: Volume::from_2d(side, side, image),
            labels: Volume::from_2d(side, side, labels),
            states: None,
        }
    }

    #[test]
    fn each_movie_is_rescaled_to_the_training_width() {
        let frames = [
            disk_frame("big", 20.0),
            disk_frame("small", 5.0),
            disk_frame("right", 10.0),
        ];
        let widths = movie_widths(&frames);
        assert!(
            (widths["big"] / widths["small"] - 4.0).abs() < 0.3,
            "{widths:?}"
        );
        let planes = train_planes(&frames, Some(widths["right"].round() as u32));
        // The big movie shrinks about 2x, the small one grows about 2x, the right one stays.
        assert_eq!(planes[2].height, frames[2].labels.height);
        let ratio = |i: usize| planes[i].height as f32 / frames[i].labels.height as f32;
        assert!((ratio(0) - 0.5).abs() < 0.05, "{}", ratio(0));
        assert!((ratio(1) - 2.0).abs() < 0.2, "{}", ratio(1));
        // At the movie's own scale nothing changes.
        let same = train_planes(&frames, None);
        assert!(
            same.iter()
                .zip(&frames)
                .all(|(p, f)| p.height == f.labels.height)
        );
        // The rescaled cells are as wide as the training width.
        for p in &planes {
            let mask: Vec<bool> = p.classes.iter().map(|&c| c != 0).collect();
            let w = scale::typical_width(&scale::regions(&mask, p.height, p.width)).unwrap();
            assert!(
                (w - widths["right"]).abs() <= 2.5,
                "{w} vs {}",
                widths["right"]
            );
        }
    }

    #[test]
    fn lineage_marks_the_frames_before_a_division() {
        // Track 1 (frames 0-4) divides into 2 and 3; track 4 ends early without children.
        let tracks = [
            TrackRecord {
                label: 1,
                begin: 0,
                end: 4,
                parent: 0,
            },
            TrackRecord {
                label: 2,
                begin: 5,
                end: 9,
                parent: 1,
            },
            TrackRecord {
                label: 3,
                begin: 5,
                end: 9,
                parent: 1,
            },
            TrackRecord {
                label: 4,
                begin: 0,
                end: 6,
                parent: 0,
            },
        ];
        let at = |l: usize, t: u32| lineage_state(&tracks[l], if l == 0 { 2 } else { 0 }, t, 9);
        assert_eq!(at(0, 2), Some(CellState::Interphase));
        assert_eq!(at(0, 3), Some(CellState::Dividing));
        assert_eq!(at(0, 4), Some(CellState::Dividing));
        assert_eq!(at(3, 6), None);
        assert_eq!(at(1, 9), Some(CellState::Interphase));
        // SEG labels differ from TRA labels; each SEG object takes its TRA object's state.
        let seg = Volume::from_2d(1, 4, vec![7, 7, 8, 0]);
        let tra = Volume::from_2d(1, 4, vec![1, 0, 4, 0]);
        let s = states_from_lineage(&seg, &tra, &tracks, 4, 9);
        assert_eq!(s, vec![1, 1, 0, NO_STATE]);
    }
}
