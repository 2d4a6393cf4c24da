//! Annotated frames of a site's movies, ready for training and validation.

use std::collections::HashMap;

use cellswarm_common::config::FrameRange;

use super::DataError;
use super::ctc::Movie;
use super::normalize::{HIGH_PERCENTILE, LOW_PERCENTILE, classes, normalize};
use super::patches::{NO_STATE, TrainPlane};
use super::volume::{Image, Labels};
use crate::synth::read_states;

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

/// Loads the annotated frames of `movie` within `range` (all annotated frames if `None`).
///
/// # Errors
/// Read errors, or [`DataError::NoMasks`] when no frame in the range has a mask.
pub fn load_annotated(
    movie: &Movie,
    range: Option<FrameRange>,
) -> Result<Vec<Annotated>, DataError> {
    let frames: Vec<u32> = movie
        .annotated_frames()
        .into_iter()
        .filter(|t| range.is_none_or(|r| r.contains(*t)))
        .collect();
    if frames.is_empty() {
        return Err(DataError::NoMasks {
            path: movie.dir().to_owned(),
            problem: match range {
                Some(r) => format!("no annotated frame in {r} (masks in NN_GT/SEG or NN_ERR_SEG)"),
                None => {
                    "no masks found beside it (NN_GT/SEG/man_segTTT.tif or NN_ERR_SEG/maskTTT.tif)"
                        .into()
                }
            },
        });
    }
    let states = read_states(movie.dir())?;
    let mut by_frame: HashMap<u32, HashMap<u32, u8>> = HashMap::new();
    for (t, l, s) in states.iter().flatten() {
        by_frame.entry(*t).or_default().insert(*l, s.index());
    }
    let name = movie.dir().display().to_string();
    let mut out = Vec::with_capacity(frames.len());
    for t in frames {
        let raw = movie.frame(t)?;
        let Some(labels) = movie.seg_mask(t, &raw)? else {
            continue;
        };
        let st = states.as_ref().map(|_| {
            let map = by_frame.get(&t);
            labels
                .data
                .iter()
                .map(|l| map.and_then(|m| m.get(l)).copied().unwrap_or(NO_STATE))
                .collect()
        });
        out.push(Annotated {
            movie: name.clone(),
            t,
            image: normalize(&raw, LOW_PERCENTILE, HIGH_PERCENTILE),
            labels,
            states: st,
        });
    }
    Ok(out)
}

/// The 2D training planes of annotated frames (each z-plane of a 3D frame on its own).
#[must_use]
pub fn train_planes(frames: &[Annotated]) -> Vec<TrainPlane> {
    let mut out = Vec::new();
    for a in frames {
        let cls = classes(&a.labels);
        let n = a.labels.plane_len();
        for z in 0..a.labels.depth {
            out.push(TrainPlane::new(
                a.labels.height,
                a.labels.width,
                a.image.plane(z).to_vec(),
                cls[z * n..(z + 1) * n].to_vec(),
                a.states.as_ref().map(|s| s[z * n..(z + 1) * n].to_vec()),
            ));
        }
    }
    out
}
