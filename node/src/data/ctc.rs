//! Movies in Cell Tracking Challenge (CTC) layout.
//!
//! ```text
//! NN/tTTT.tif                    frames (TTT: 3 or more digits, numbered from 0)
//! NN_GT/SEG/man_segTTT.tif       ground-truth instance masks (possibly some frames only)
//! NN_GT/TRA/man_trackTTT.tif     tracking markers, one label per track
//! NN_GT/TRA/man_track.txt        lineage: "L B E P" per track
//! NN_ERR_SEG/maskTTT.tif         reference segmentation (all frames)
//! ```
//!
//! A [`Movie`] is opened from the sequence folder (`NN`); its masks are found beside it.
//! A movie may also be one channel of an OME-TIFF file (`NAME.ome.tif`, [`super::ome`])
//! or of an OME-Zarr image (`NAME.ome.zarr`, [`super::ngff`]): frame `t` is its time
//! point `t` (a Z stack if it has several planes), and its masks, if any, are the label
//! movie `NAME_masks.ome.tif` beside it (what `cellswarm segment --out
//! NAME_masks.ome.tif` writes) or the Zarr image's first label image.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::DataError;
use super::ngff::{OmeZarr, is_ome_zarr};
use super::ome::{OmeTiff, PhysicalSize, StackFile, is_ome_tiff};
use super::tiff_io::{read_image, read_labels};
use super::volume::{Image, Labels};

/// Where a movie's segmentation masks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegSource {
    /// `NN_GT/SEG/man_segTTT.tif`.
    GroundTruth,
    /// `NN_ERR_SEG/maskTTT.tif`.
    Reference,
    /// `NAME_masks.ome.tif` beside an OME-TIFF movie `NAME.ome.tif`, or an OME-Zarr
    /// image's first label image (`NAME.ome.zarr/labels/...`).
    LabelMovie,
}

/// One line of a CTC lineage file: track `label` spans frames `begin..=end`, and
/// descends from track `parent` (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TrackRecord {
    /// Track label (as in the TRA masks).
    pub label: u32,
    /// First frame.
    pub begin: u32,
    /// Last frame.
    pub end: u32,
    /// Parent track, 0 if none.
    pub parent: u32,
}

impl TrackRecord {
    /// A record: track `label` spans frames `begin..=end` and descends from `parent`.
    #[must_use]
    pub const fn new(label: u32, begin: u32, end: u32, parent: u32) -> Self {
        Self {
            label,
            begin,
            end,
            parent,
        }
    }
}

/// Where a movie's frames are.
#[derive(Debug, Clone)]
enum Frames {
    /// `tTTT.tif` files of a sequence folder, by number.
    Files(BTreeMap<u32, PathBuf>),
    /// One channel of an OME-TIFF file or OME-Zarr image; frame `t` is its time point `t`.
    Ome {
        /// The file's metadata.
        file: Arc<dyn StackFile>,
        /// The channel read.
        channel: usize,
    },
}

/// Where a movie's segmentation masks are.
#[derive(Debug, Clone)]
enum Masks {
    /// Numbered files, by frame.
    Files(BTreeMap<u32, PathBuf>),
    /// An OME-TIFF or OME-Zarr label movie, one time point a frame.
    Ome(Arc<dyn StackFile>),
}

/// A CTC sequence folder (or one channel of an OME-TIFF file or OME-Zarr image) and
/// the masks found beside it.
#[derive(Debug, Clone)]
pub struct Movie {
    dir: PathBuf,
    frames: Frames,
    seg: Option<(SegSource, Masks)>,
    tra: Option<(BTreeMap<u32, PathBuf>, PathBuf)>,
}

/// Files in `dir` named `prefix` + digits + `.tif`, by number.
fn numbered(dir: &Path, prefix: &str) -> Result<BTreeMap<u32, PathBuf>, DataError> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| DataError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(digits) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".tif").or_else(|| r.strip_suffix(".tiff")))
        else {
            continue;
        };
        if digits.len() >= 3
            && digits.bytes().all(|b| b.is_ascii_digit())
            && let Ok(t) = digits.parse::<u32>()
        {
            out.insert(t, entry.path());
        }
    }
    Ok(out)
}

/// The file name a frame would have, in the width the folder uses.
fn expected_name(prefix: &str, t: u32, like: Option<&PathBuf>) -> String {
    let width = like
        .and_then(|p| p.file_stem())
        .and_then(|s| s.to_str())
        .map_or(3, |s| s.len() - prefix.len());
    format!("{prefix}{t:0width$}.tif")
}

/// The label movie of OME-TIFF movie `NAME.ome.tif`: `NAME_masks.ome.tif` beside it.
#[must_use]
pub fn masks_beside(movie: &Path) -> PathBuf {
    let name = movie
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    let stem = [".ome.tiff", ".ome.tif"]
        .iter()
        .find(|e| lower.ends_with(*e))
        .map_or(name, |e| &name[..name.len() - e.len()]);
    movie.with_file_name(format!("{stem}_masks.ome.tif"))
}

impl Movie {
    /// Opens a sequence folder such as `.../Fluo-N2DL-HeLa/02`, or a single-channel
    /// OME-TIFF file (`.ome.tif`) or OME-Zarr image (`.ome.zarr`).
    ///
    /// # Errors
    /// A folder with no `tTTT.tif` frames, or a gap in the frame numbers (naming the
    /// missing file); an OME file that [`OmeTiff::open`] or [`OmeZarr::open`] refuses,
    /// or that has several channels (see [`Movie::open_channel`]).
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        Self::open_channel(dir, None)
    }

    /// Opens a movie as [`Movie::open`] does, reading channel `channel` (a name or an
    /// index from 0) of an OME-TIFF file or OME-Zarr image. A CTC folder has one channel
    /// and ignores the choice (it is meant for the OME movies beside it).
    ///
    /// # Errors
    /// As [`Movie::open`], and a channel the movie does not have.
    pub fn open_channel(dir: &Path, channel: Option<&str>) -> Result<Self, DataError> {
        if is_ome_tiff(dir) || is_ome_zarr(dir) {
            Self::open_ome(dir, channel)
        } else {
            Self::open_ctc(dir)
        }
    }

    fn open_ctc(dir: &Path) -> Result<Self, DataError> {
        let frames = numbered(dir, "t")?;
        let Some((&last, _)) = frames.last_key_value() else {
            return Err(DataError::NoFrames {
                dir: dir.to_owned(),
            });
        };
        let first = frames.first_key_value().map_or(0, |(&t, _)| t);
        for t in first..=last {
            if !frames.contains_key(&t) {
                return Err(DataError::MissingFrame {
                    path: dir.join(expected_name("t", t, frames.values().next())),
                });
            }
        }
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let parent = dir.parent().unwrap_or_else(|| Path::new("."));
        let gt = parent.join(format!("{name}_GT"));
        let err = parent.join(format!("{name}_ERR_SEG"));
        let seg = if gt.join("SEG").is_dir() {
            Some((
                SegSource::GroundTruth,
                Masks::Files(numbered(&gt.join("SEG"), "man_seg")?),
            ))
        } else if err.is_dir() {
            Some((SegSource::Reference, Masks::Files(numbered(&err, "mask")?)))
        } else {
            None
        };
        let tra_dir = gt.join("TRA");
        let tra = if tra_dir.join("man_track.txt").is_file() {
            Some((
                numbered(&tra_dir, "man_track")?,
                tra_dir.join("man_track.txt"),
            ))
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_owned(),
            frames: Frames::Files(frames),
            seg,
            tra,
        })
    }

    fn open_ome(path: &Path, channel: Option<&str>) -> Result<Self, DataError> {
        let (file, masks): (Arc<dyn StackFile>, Option<Arc<dyn StackFile>>) = if is_ome_zarr(path) {
            let z = OmeZarr::open(path)?;
            let labels = z.label_image()?;
            (
                Arc::new(z),
                labels.map(|l| Arc::new(l) as Arc<dyn StackFile>),
            )
        } else {
            let beside = masks_beside(path);
            let labels = if beside.is_file() {
                Some(Arc::new(OmeTiff::open(&beside)?) as Arc<dyn StackFile>)
            } else {
                None
            };
            (Arc::new(OmeTiff::open(path)?), labels)
        };
        let channel = file.channel(channel)?;
        if let Some(m) = &masks
            && m.channels().len() != 1
        {
            return Err(DataError::Unsupported {
                path: m.path().to_owned(),
                what: format!(
                    "label movie with {} channels; expected one",
                    m.channels().len()
                ),
            });
        }
        let seg = masks.map(|m| (SegSource::LabelMovie, Masks::Ome(m)));
        Ok(Self {
            dir: path.to_owned(),
            frames: Frames::Ome { file, channel },
            seg,
            tra: None,
        })
    }

    /// Physical pixel and Z-step sizes in micrometres, where the movie's metadata gives
    /// them (OME-TIFF and OME-Zarr; a CTC folder has none).
    #[must_use]
    pub fn physical_size(&self) -> Option<PhysicalSize> {
        match &self.frames {
            Frames::Files(_) => None,
            Frames::Ome { file, .. } => Some(file.physical_size()),
        }
    }

    /// The last frame number (0 for an empty movie, which [`Movie::open`] refuses).
    #[must_use]
    pub fn last_frame(&self) -> u32 {
        match &self.frames {
            Frames::Files(f) => f.last_key_value().map_or(0, |(&t, _)| t),
            Frames::Ome { file, .. } => {
                u32::try_from(file.frames().saturating_sub(1)).unwrap_or(u32::MAX)
            }
        }
    }

    /// The sequence folder (or the OME-TIFF file, or the OME-Zarr folder).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Frame numbers, ascending.
    pub fn frames(&self) -> impl Iterator<Item = u32> + '_ {
        let (files, count) = match &self.frames {
            Frames::Files(f) => (Some(f.keys().copied()), 0),
            Frames::Ome { file, .. } => (None, file.frames()),
        };
        files
            .into_iter()
            .flatten()
            .chain((0..count).filter_map(|t| u32::try_from(t).ok()))
    }

    /// Whether the movie has frame `t`.
    fn has_frame(&self, t: u32) -> bool {
        match &self.frames {
            Frames::Files(f) => f.contains_key(&t),
            Frames::Ome { file, .. } => (t as usize) < file.frames(),
        }
    }

    /// Number of frames.
    #[must_use]
    pub fn len(&self) -> usize {
        match &self.frames {
            Frames::Files(f) => f.len(),
            Frames::Ome { file, .. } => file.frames(),
        }
    }

    /// Whether the movie has no frames (never true for an opened movie).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where its segmentation masks come from, if it has any.
    #[must_use]
    pub fn seg_source(&self) -> Option<SegSource> {
        self.seg.as_ref().map(|(s, _)| *s)
    }

    /// Frames that have a segmentation mask.
    #[must_use]
    pub fn annotated_frames(&self) -> Vec<u32> {
        match self.seg.as_ref().map(|(_, m)| m) {
            None => Vec::new(),
            Some(Masks::Files(m)) => m.keys().copied().filter(|&t| self.has_frame(t)).collect(),
            Some(Masks::Ome(m)) => (0..m.frames())
                .filter_map(|t| u32::try_from(t).ok())
                .filter(|&t| self.has_frame(t))
                .collect(),
        }
    }

    /// Path of frame `t` (of an OME movie: its file or folder).
    #[must_use]
    pub fn frame_path(&self, t: u32) -> Option<&Path> {
        match &self.frames {
            Frames::Files(f) => f.get(&t).map(PathBuf::as_path),
            Frames::Ome { file, .. } => self.has_frame(t).then(|| file.path()),
        }
    }

    fn missing(&self, t: u32) -> DataError {
        DataError::MissingFrame {
            path: match &self.frames {
                Frames::Files(f) => self.dir.join(expected_name("t", t, f.values().next())),
                Frames::Ome { file, .. } => PathBuf::from(format!(
                    "{} (time point {t} of {})",
                    self.dir.display(),
                    file.frames()
                )),
            },
        }
    }

    /// Reads frame `t`.
    ///
    /// # Errors
    /// A frame number the movie does not have, or a read error naming the file.
    pub fn frame(&self, t: u32) -> Result<Image, DataError> {
        match &self.frames {
            Frames::Files(f) => read_image(f.get(&t).ok_or_else(|| self.missing(t))?),
            Frames::Ome { file, channel } => {
                if !self.has_frame(t) {
                    return Err(self.missing(t));
                }
                file.read_stack(*channel, t as usize)
            }
        }
    }

    /// Reads the segmentation mask of frame `t` (None if that frame is not annotated),
    /// checking that it has the frame's size.
    ///
    /// # Errors
    /// Read errors, or a mask whose size differs from `like`.
    pub fn seg_mask(&self, t: u32, like: &Image) -> Result<Option<Labels>, DataError> {
        let (path, mask) = match self.seg.as_ref().map(|(_, m)| m) {
            None => return Ok(None),
            Some(Masks::Files(m)) => {
                let Some(path) = m.get(&t) else {
                    return Ok(None);
                };
                (path.as_path(), read_labels(path)?)
            }
            Some(Masks::Ome(m)) => {
                if t as usize >= m.frames() {
                    return Ok(None);
                }
                (m.path(), m.read_label_stack(0, t as usize)?)
            }
        };
        check_same_size(path, like, &mask)?;
        Ok(Some(mask))
    }

    /// Reads the tracking markers of frame `t`, if the movie has TRA ground truth.
    ///
    /// # Errors
    /// Read errors, or a size mismatch.
    pub fn tra_mask(&self, t: u32, like: &Image) -> Result<Option<Labels>, DataError> {
        let Some(path) = self.tra.as_ref().and_then(|(m, _)| m.get(&t)) else {
            return Ok(None);
        };
        let mask = read_labels(path)?;
        check_same_size(path, like, &mask)?;
        Ok(Some(mask))
    }

    /// The lineage (`man_track.txt`), if the movie has TRA ground truth.
    ///
    /// # Errors
    /// Read or parse errors naming the file and line.
    pub fn tracks(&self) -> Result<Option<Vec<TrackRecord>>, DataError> {
        self.tra.as_ref().map(|(_, p)| read_tracks(p)).transpose()
    }

    /// Reads frames `ts`, checking that they all have the size of the first.
    ///
    /// # Errors
    /// Read errors or a size mismatch naming the file.
    pub fn load_frames(&self, ts: &[u32]) -> Result<Vec<(u32, Image)>, DataError> {
        let mut out: Vec<(u32, Image)> = Vec::with_capacity(ts.len());
        for &t in ts {
            let img = self.frame(t)?;
            if let Some((t0, first)) = out.first()
                && !first.same_shape(&img)
            {
                return Err(DataError::SizeMismatch {
                    path: self.frame_path(t).unwrap_or(&self.dir).to_owned(),
                    expected: format!("{:?} like frame {t0}", first.shape()),
                    found: format!("{:?}", img.shape()),
                });
            }
            out.push((t, img));
        }
        Ok(out)
    }
}

fn check_same_size(path: &Path, like: &Image, mask: &Labels) -> Result<(), DataError> {
    if like.same_shape(mask) {
        Ok(())
    } else {
        Err(DataError::SizeMismatch {
            path: path.to_owned(),
            expected: format!("{:?} (the frame's size)", like.shape()),
            found: format!("{:?}", mask.shape()),
        })
    }
}

/// Parses a CTC lineage file.
///
/// # Errors
/// I/O errors, or a line that is not four non-negative integers with `begin <= end`.
pub fn read_tracks(path: &Path) -> Result<Vec<TrackRecord>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |problem: &str| DataError::BadTrackFile {
            path: path.to_owned(),
            line: i + 1,
            problem: problem.to_owned(),
        };
        let nums: Vec<u32> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| bad("expected four non-negative integers `L B E P`"))?;
        let [label, begin, end, parent] = nums[..] else {
            return Err(bad("expected four numbers `L B E P`"));
        };
        if label == 0 || end < begin {
            return Err(bad("label must be positive and B <= E"));
        }
        out.push(TrackRecord {
            label,
            begin,
            end,
            parent,
        });
    }
    Ok(out)
}

/// Writes a CTC lineage file (sorted by label), atomically.
///
/// # Errors
/// I/O errors.
pub fn write_tracks(path: &Path, tracks: &[TrackRecord]) -> Result<(), DataError> {
    let mut sorted = tracks.to_vec();
    sorted.sort();
    let mut text = String::new();
    for t in &sorted {
        let _ = writeln!(text, "{} {} {} {}", t.label, t.begin, t.end, t.parent);
    }
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("txt.partial");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tiff_io::{write_labels, write_u16};
    use crate::data::volume::Volume;

    fn frame(v: u16) -> Volume<u16> {
        Volume::from_2d(4, 6, vec![v; 24])
    }

    #[test]
    fn opens_a_movie_with_reference_masks() {
        let root = tempfile::tempdir().unwrap();
        let seq = root.path().join("02");
        std::fs::create_dir_all(&seq).unwrap();
        std::fs::create_dir_all(root.path().join("02_ERR_SEG")).unwrap();
        for t in 0..3 {
            write_u16(&seq.join(format!("t{t:03}.tif")), &frame(t as u16)).unwrap();
            write_labels(
                &root.path().join(format!("02_ERR_SEG/mask{t:03}.tif")),
                &Volume::from_2d(4, 6, vec![t; 24]),
            )
            .unwrap();
        }
        let m = Movie::open(&seq).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m.seg_source(), Some(SegSource::Reference));
        assert_eq!(m.annotated_frames(), vec![0, 1, 2]);
        let f = m.frame(2).unwrap();
        assert_eq!(f.data[0], 2.0);
        assert_eq!(m.seg_mask(1, &f).unwrap().unwrap().data[0], 1);
        assert!(m.tracks().unwrap().is_none());
    }

    #[test]
    fn a_missing_frame_is_named() {
        let root = tempfile::tempdir().unwrap();
        let seq = root.path().join("01");
        std::fs::create_dir_all(&seq).unwrap();
        for t in [0, 1, 3] {
            write_u16(&seq.join(format!("t{t:03}.tif")), &frame(1)).unwrap();
        }
        let err = Movie::open(&seq).unwrap_err().to_string();
        assert!(err.contains("t002.tif"), "{err}");
        let empty = root.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(matches!(
            Movie::open(&empty),
            Err(DataError::NoFrames { .. })
        ));
    }

    #[test]
    fn mismatched_sizes_are_named() {
        let root = tempfile::tempdir().unwrap();
        let seq = root.path().join("01");
        let gt = root.path().join("01_GT/SEG");
        std::fs::create_dir_all(&seq).unwrap();
        std::fs::create_dir_all(&gt).unwrap();
        write_u16(&seq.join("t000.tif"), &frame(1)).unwrap();
        write_u16(&seq.join("t001.tif"), &Volume::from_2d(5, 6, vec![0; 30])).unwrap();
        write_labels(
            &gt.join("man_seg000.tif"),
            &Volume::from_2d(3, 3, vec![0; 9]),
        )
        .unwrap();
        let m = Movie::open(&seq).unwrap();
        assert_eq!(m.seg_source(), Some(SegSource::GroundTruth));
        let f0 = m.frame(0).unwrap();
        let err = m.seg_mask(0, &f0).unwrap_err().to_string();
        assert!(err.contains("man_seg000.tif"), "{err}");
        let err = m.load_frames(&[0, 1]).unwrap_err().to_string();
        assert!(err.contains("t001.tif"), "{err}");
    }

    #[test]
    fn lineage_round_trips_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("man_track.txt");
        let tracks = vec![
            TrackRecord {
                label: 2,
                begin: 3,
                end: 9,
                parent: 1,
            },
            TrackRecord {
                label: 1,
                begin: 0,
                end: 2,
                parent: 0,
            },
        ];
        write_tracks(&p, &tracks).unwrap();
        let mut sorted = tracks.clone();
        sorted.sort();
        assert_eq!(read_tracks(&p).unwrap(), sorted);
        std::fs::write(&p, "1 0 2 0\n2 5 3 1\n").unwrap();
        let err = read_tracks(&p).unwrap_err().to_string();
        assert!(
            err.contains("man_track.txt") && err.contains("line 2"),
            "{err}"
        );
        std::fs::write(&p, "1 0 x 0\n").unwrap();
        assert!(read_tracks(&p).is_err());
    }
}
