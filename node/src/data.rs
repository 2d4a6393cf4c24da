//! A site's movies: reading CTC folders and TIFF files, normalising, and drawing
//! training patches.
//!
//! - [`volume`]: 2D/3D images and label images.
//! - [`tiff_io`]: TIFF reading (8-64-bit integers and floats, compressed or not,
//!   multi-page stacks) and writing.
//! - [`ctc`]: the Cell Tracking Challenge layout ([`ctc::Movie`]) and lineage files.
//! - [`ome`]: OME-TIFF files (5D images with OME-XML metadata), read and written.
//! - [`ngff`]: OME-Zarr images (NGFF 0.4 and 0.5) and their label images, read and written.
//! - [`normalize`]: percentile normalisation and the three pixel classes.
//! - [`patches`]: seeded, augmented patch sampling.
//! - [`dataset`]: annotated frames of a movie as training planes.
//! - [`stream`]: training frames read a few at a time when they exceed the memory budget.

use std::path::PathBuf;

pub mod ctc;
pub mod dataset;
pub mod ngff;
pub mod normalize;
pub mod ome;
pub mod patches;
pub mod stream;
pub mod tiff_io;
pub mod volume;

/// What went wrong reading or writing movie data. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TIFF decoder or encoder failed.
    #[error("{}: not a readable TIFF image: {message}", path.display())]
    Tiff {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// The file holds something cellswarm does not read.
    #[error("{}: unsupported {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported.
        what: String,
    },
    /// A folder without frames.
    #[error("{}: no frames named tTTT.tif; expected a CTC sequence folder such as .../01", dir.display())]
    NoFrames {
        /// The folder.
        dir: PathBuf,
    },
    /// A frame is missing from the sequence.
    #[error("{}: missing frame (frame numbers must be contiguous)", path.display())]
    MissingFrame {
        /// The file that should exist.
        path: PathBuf,
    },
    /// An image or mask has a different size than expected.
    #[error("{}: size {found}, expected {expected}", path.display())]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// The Zarr reader or writer failed.
    #[error("{}: not a readable OME-Zarr image: {message}", path.display())]
    Zarr {
        /// The Zarr folder (or the array or group in it).
        path: PathBuf,
        /// The reader's or writer's message.
        message: String,
    },
    /// A lineage file has a bad line.
    #[error("{}: line {line}: {problem}", path.display())]
    BadTrackFile {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// A movie without the masks a command needs.
    #[error("{}: {problem}", path.display())]
    NoMasks {
        /// The sequence folder.
        path: PathBuf,
        /// What is missing.
        problem: String,
    },
}
