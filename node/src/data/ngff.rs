//! OME-Zarr (OME-NGFF): chunked images in a Zarr folder, as napari, ome-zarr-py, Fiji
//! (MoBIE) and the big-data pipelines write them, read and written with `zarrs`.
//!
//! A folder `NAME.ome.zarr` is a Zarr group whose `multiscales` metadata (NGFF 0.4, on
//! Zarr v2: `.zattrs`; NGFF 0.5, on Zarr v3: `zarr.json`, under `ome`) names its axes
//! (2 to 5 of `t`, `c`, `z`, `y`, `x`, in that order) and its resolution levels; the first
//! level is the full-resolution array read here. Its `scale` transformation and the axes'
//! units give the physical pixel sizes; `omero` channel labels name the channels. Label
//! images (instance masks) sit in `labels/NAME` inside the image, listed by the `labels`
//! group's metadata.
//!
//! [`OmeZarr::open`] reads the metadata only; [`StackFile::read_stack`] reads the chunks
//! of one time point of one channel, so a movie larger than memory is never read whole.
//! [`write_labels`] writes a label movie as NGFF 0.5.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tiff::decoder::DecodingResult;
use zarrs::array::{Array, ArrayBuilder, ArraySubset, data_type};
use zarrs::filesystem::FilesystemStore;
use zarrs::group::{Group, GroupBuilder};

use super::DataError;
use super::ome::{MAX_CHANNELS, PhysicalSize, StackFile, bad, check_label_movie};
use super::tiff_io::{MAX_PIXELS, page_to_f32, page_to_labels};
use super::volume::{Image, Labels, Volume};

/// Most time points times channels an OME-Zarr image may have.
pub const MAX_STACKS: u64 = 1 << 24;

/// Whether `path` names a Zarr folder (`.zarr`, as in `NAME.ome.zarr`, any case).
#[must_use]
pub fn is_ome_zarr(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.to_ascii_lowercase().ends_with(".zarr"))
}

fn zarr_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Zarr {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Micrometres per NGFF length unit (the UDUNITS-2 names the spec lists).
fn micrometres(unit: &str) -> Option<f64> {
    Some(match unit {
        "micrometer" | "micron" => 1.0,
        "nanometer" => 1e-3,
        "picometer" => 1e-6,
        "angstrom" => 1e-4,
        "millimeter" => 1e3,
        "centimeter" => 1e4,
        "meter" => 1e6,
        _ => return None,
    })
}

/// An OME-Zarr image's full-resolution array and what its metadata says about it.
pub struct OmeZarr {
    path: PathBuf,
    array: Array<FilesystemStore>,
    /// The array's axes, one letter each (`tczyx` or fewer, in that order).
    axes: Vec<u8>,
    /// Sizes of t, c, z (1 where absent), y, x.
    size: [u64; 5],
    channels: Vec<String>,
    physical: PhysicalSize,
}

impl std::fmt::Debug for OmeZarr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OmeZarr")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

/// The NGFF metadata of a group: under `ome` (0.5) or at the top of the attributes (0.4).
fn ngff(attrs: &Map<String, Value>) -> &Map<String, Value> {
    attrs.get("ome").and_then(Value::as_object).unwrap_or(attrs)
}

/// The `scale` of a list of coordinate transformations: `Some(ones)` where the list has
/// no scale, `None` where its scale is not `dims` numbers (given by `path`, the wrong
/// length, or not numbers): no size can be read from it.
fn scale_of(transforms: Option<&Value>, dims: usize) -> Option<Vec<f64>> {
    let Some(scale) = transforms
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|t| t.get("type").and_then(Value::as_str) == Some("scale"))
    else {
        return Some(vec![1.0; dims]);
    };
    scale
        .get("scale")
        .and_then(Value::as_array)
        .filter(|s| s.len() == dims)?
        .iter()
        .map(Value::as_f64)
        .collect()
}

/// Most elements a chunk (or the index of a shard) may hold: 2^28 (1 GiB of 32-bit
/// values). Zarr decoders allocate a whole chunk at a time, whatever the reader asks for.
pub const MAX_CHUNK_ELEMENTS: u64 = 1 << 28;

/// Checks that no chunk (and no shard's index) of `array` is larger than
/// [`MAX_CHUNK_ELEMENTS`], before a chunk is read.
fn check_chunks(path: &Path, array: &Array<FilesystemStore>) -> Result<(), DataError> {
    let zeros = vec![0u64; array.dimensionality()];
    let chunk = array.chunk_shape(&zeros).map_err(|e| zarr_err(path, e))?;
    let elements = chunk
        .iter()
        .try_fold(1u64, |n, &c| n.checked_mul(c.get()))
        .unwrap_or(u64::MAX);
    if elements > MAX_CHUNK_ELEMENTS {
        return Err(bad(
            path,
            format!("chunks of {elements} elements (at most {MAX_CHUNK_ELEMENTS})"),
        ));
    }
    // A shard holds an index of one entry per inner chunk.
    let meta = serde_json::to_value(array.metadata()).unwrap_or(Value::Null);
    let inner = meta
        .get("codecs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c.get("name").and_then(Value::as_str) == Some("sharding_indexed"))
        .filter_map(|c| c.pointer("/configuration/chunk_shape"))
        .filter_map(Value::as_array);
    for shape in inner {
        let per_shard = chunk
            .iter()
            .zip(shape)
            .try_fold(1u64, |n, (&outer, inner)| {
                let inner = inner.as_u64().filter(|&i| i > 0)?;
                n.checked_mul(outer.get().div_ceil(inner))
            })
            .unwrap_or(u64::MAX);
        if per_shard > MAX_CHUNK_ELEMENTS / 16 {
            return Err(bad(
                path,
                format!(
                    "shards of {per_shard} inner chunks (at most {})",
                    MAX_CHUNK_ELEMENTS / 16
                ),
            ));
        }
    }
    Ok(())
}

impl OmeZarr {
    /// Reads and checks the metadata of an OME-Zarr image (no pixels).
    ///
    /// # Errors
    /// A folder that is not a Zarr group with NGFF `multiscales`, axes other than 2 to 5
    /// of t, c, z, y, x, an array whose shape disagrees with them, sizes past the limits,
    /// or a data type that is not an integer or a float.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let store = Arc::new(FilesystemStore::new(path).map_err(|e| zarr_err(path, e))?);
        let group = Group::open(Arc::clone(&store), "/").map_err(|e| zarr_err(path, e))?;
        let meta = ngff(group.attributes());
        let ms = meta
            .get("multiscales")
            .and_then(Value::as_array)
            .and_then(|m| m.first())
            .ok_or_else(|| bad(path, "Zarr group without NGFF multiscales metadata"))?;
        let axes: Vec<(String, Option<String>)> = ms
            .get("axes")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(path, "NGFF multiscales without axes"))?
            .iter()
            .map(|a| match a {
                Value::String(n) => (n.to_ascii_lowercase(), None),
                _ => (
                    a.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_ascii_lowercase(),
                    a.get("unit").and_then(Value::as_str).map(str::to_owned),
                ),
            })
            .collect();
        let names: String = axes.iter().map(|(n, _)| n.as_str()).collect();
        // NGFF's rule: y and x last, z, c and t before them where present, in that order.
        if !matches!(
            names.as_str(),
            "yx" | "zyx" | "cyx" | "czyx" | "tyx" | "tzyx" | "tcyx" | "tczyx"
        ) {
            return Err(bad(
                path,
                format!("NGFF axes \"{names}\" (2 to 5 of t, c, z, y, x, in that order)"),
            ));
        }
        let dim = |n: &str| axes.iter().position(|(a, _)| a == n);
        let (y, x) = (axes.len() - 2, axes.len() - 1);
        let level = ms
            .get("datasets")
            .and_then(Value::as_array)
            .and_then(|d| d.first())
            .ok_or_else(|| bad(path, "NGFF multiscales without datasets"))?;
        let level_path = level
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty() && !p.split('/').any(|s| s == ".." || s.is_empty()))
            .ok_or_else(|| bad(path, "NGFF dataset without a plain relative path"))?;
        let array = Array::open(Arc::clone(&store), &format!("/{level_path}"))
            .map_err(|e| zarr_err(&path.join(level_path), e))?;
        let shape = array.shape().to_vec();
        if shape.len() != axes.len() {
            return Err(bad(
                &path.join(level_path),
                format!("array of {} dimensions for axes \"{names}\"", shape.len()),
            ));
        }
        let size_of = |n: &str| dim(n).map_or(1, |d| shape[d]);
        let size = [size_of("t"), size_of("c"), size_of("z"), shape[y], shape[x]];
        let stack = size[2]
            .checked_mul(size[3])
            .and_then(|p| p.checked_mul(size[4]));
        if size.contains(&0) || stack.is_none_or(|p| p > MAX_PIXELS as u64) {
            return Err(bad(
                path,
                format!(
                    "Z stack of {} x {} x {} pixels (at least 1 and at most {MAX_PIXELS})",
                    size[2], size[3], size[4]
                ),
            ));
        }
        if size[1] > MAX_CHANNELS as u64 {
            return Err(bad(
                path,
                format!("{} channels (at most {MAX_CHANNELS})", size[1]),
            ));
        }
        if let Some(names_in_array) = array.dimension_names() {
            let given: Vec<String> = names_in_array
                .iter()
                .map(|n| n.as_deref().unwrap_or_default().to_ascii_lowercase())
                .collect();
            if given
                .iter()
                .zip(&axes)
                .any(|(g, (a, _))| !g.is_empty() && g != a)
            {
                return Err(bad(
                    &path.join(level_path),
                    format!(
                        "array dimensions named {given:?} for NGFF axes \"{names}\" (the array would be read transposed)"
                    ),
                ));
            }
        }
        check_chunks(&path.join(level_path), &array)?;
        if size[0].saturating_mul(size[1]) > MAX_STACKS {
            return Err(bad(
                path,
                format!(
                    "{} time points x {} channels (at most {MAX_STACKS} stacks)",
                    size[0], size[1]
                ),
            ));
        }
        let dt = array.data_type();
        if ![
            data_type::uint8(),
            data_type::uint16(),
            data_type::uint32(),
            data_type::uint64(),
            data_type::int8(),
            data_type::int16(),
            data_type::int32(),
            data_type::int64(),
            data_type::float32(),
            data_type::float64(),
        ]
        .contains(dt)
        {
            return Err(bad(
                &path.join(level_path),
                format!("data type {dt:?}; expected an integer or floating-point type"),
            ));
        }
        // Physical sizes: the level's scale times the multiscale's, in the axes' units.
        let outer = scale_of(ms.get("coordinateTransformations"), axes.len());
        let inner = scale_of(level.get("coordinateTransformations"), axes.len());
        let physical_at = |d: Option<usize>| {
            let d = d?;
            let unit = micrometres(axes[d].1.as_deref()?)?;
            let v = inner.as_ref()?[d] * outer.as_ref()?[d] * unit;
            (v.is_finite() && v > 0.0).then_some(v)
        };
        let physical = PhysicalSize {
            x: physical_at(Some(x)),
            y: physical_at(Some(y)),
            z: physical_at(dim("z")),
        };
        let channels_meta = meta
            .get("omero")
            .or_else(|| group.attributes().get("omero"))
            .and_then(|o| o.get("channels"))
            .and_then(Value::as_array);
        let channels = (0..size[1])
            .map(|i| {
                channels_meta
                    .and_then(|c| c.get(i as usize))
                    .and_then(|c| c.get("label"))
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("{i}"), str::to_owned)
            })
            .collect();
        Ok(Self {
            path: path.to_owned(),
            array,
            axes: names.into_bytes(),
            size,
            channels,
            physical,
        })
    }

    /// Z planes per stack.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.size[2] as usize
    }

    /// The image's first label image (`labels/NAME`, as the `labels` group lists them),
    /// if it has one.
    ///
    /// # Errors
    /// A listed label image that [`OmeZarr::open`] refuses.
    pub fn label_image(&self) -> Result<Option<Self>, DataError> {
        let labels = self.path.join("labels");
        if !labels.is_dir() {
            return Ok(None);
        }
        let store = Arc::new(FilesystemStore::new(&labels).map_err(|e| zarr_err(&labels, e))?);
        let Ok(group) = Group::open(store, "/") else {
            return Ok(None);
        };
        let first = ngff(group.attributes())
            .get("labels")
            .and_then(Value::as_array)
            .and_then(|l| l.first())
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty() && !n.contains('/') && *n != "..");
        first.map(|n| Self::open(&labels.join(n))).transpose()
    }

    /// The array subset of stack (c, t).
    fn subset(&self, c: usize, t: usize) -> Result<ArraySubset, DataError> {
        if c as u64 >= self.size[1] || t as u64 >= self.size[0] {
            return Err(bad(
                &self.path,
                format!(
                    "stack C={c} T={t} (the image has {} channels, {} time points)",
                    self.size[1], self.size[0]
                ),
            ));
        }
        let [_, _, z, y, x] = self.size;
        let ranges: Vec<std::ops::Range<u64>> = self
            .axes
            .iter()
            .map(|a| match a {
                b't' => t as u64..t as u64 + 1,
                b'c' => c as u64..c as u64 + 1,
                b'z' => 0..z,
                b'y' => 0..y,
                _ => 0..x,
            })
            .collect();
        Ok(ArraySubset::new_with_ranges(&ranges))
    }

    /// The elements of stack (c, t) in the array's own type, as the TIFF reader gives a
    /// page, so both formats convert pixels and labels alike.
    fn read_raw(&self, c: usize, t: usize) -> Result<DecodingResult, DataError> {
        let subset = self.subset(c, t)?;
        let err = |e: zarrs::array::ArrayError| zarr_err(&self.path, e);
        let dt = self.array.data_type();
        macro_rules! get {
            ($ty:ty, $variant:ident) => {
                DecodingResult::$variant(
                    self.array
                        .retrieve_array_subset::<Vec<$ty>>(&subset)
                        .map_err(err)?,
                )
            };
        }
        Ok(if *dt == data_type::uint8() {
            get!(u8, U8)
        } else if *dt == data_type::uint16() {
            get!(u16, U16)
        } else if *dt == data_type::uint32() {
            get!(u32, U32)
        } else if *dt == data_type::uint64() {
            get!(u64, U64)
        } else if *dt == data_type::int8() {
            get!(i8, I8)
        } else if *dt == data_type::int16() {
            get!(i16, I16)
        } else if *dt == data_type::int32() {
            get!(i32, I32)
        } else if *dt == data_type::int64() {
            get!(i64, I64)
        } else if *dt == data_type::float32() {
            get!(f32, F32)
        } else {
            get!(f64, F64)
        })
    }

    fn volume<T>(&self, data: Vec<T>) -> Volume<T> {
        Volume {
            depth: self.size[2] as usize,
            height: self.size[3] as usize,
            width: self.size[4] as usize,
            data,
        }
    }
}

impl StackFile for OmeZarr {
    fn path(&self) -> &Path {
        &self.path
    }

    fn frames(&self) -> usize {
        self.size[0] as usize
    }

    fn channels(&self) -> &[String] {
        &self.channels
    }

    fn physical_size(&self) -> PhysicalSize {
        self.physical
    }

    fn read_stack(&self, c: usize, t: usize) -> Result<Image, DataError> {
        Ok(self.volume(page_to_f32(&self.path, self.read_raw(c, t)?)?))
    }

    fn read_label_stack(&self, c: usize, t: usize) -> Result<Labels, DataError> {
        Ok(self.volume(page_to_labels(&self.path, self.read_raw(c, t)?)?))
    }
}

/// Writes a label movie (one Z stack per time point, all of one shape) as an NGFF 0.5
/// label image: axes t, (z,) y, x with the `physical` sizes in micrometres where given,
/// one resolution level `0`, 16-bit if every label fits, else 32-bit, one chunk per
/// plane of at most 512 x 512, gzip-compressed. Written to `PATH.partial` and renamed,
/// so a crash never leaves half an image under the name.
///
/// # Errors
/// No frames, frames of different shapes, an existing `path`, or I/O errors.
pub fn write_labels(
    path: &Path,
    frames: &[Labels],
    physical: PhysicalSize,
) -> Result<(), DataError> {
    write_label_image(path, frames, physical, None)
}

/// If `path` is `IMAGE.ome.zarr/labels/NAME`, the image folder and `NAME`.
#[must_use]
pub fn inside_image(path: &Path) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_str()?.to_owned();
    let labels = path.parent()?;
    if labels.file_name()? != "labels" {
        return None;
    }
    let image = labels.parent()?;
    is_ome_zarr(image).then(|| (image.to_owned(), name))
}

/// Writes a label movie into an NGFF 0.5 image as `IMAGE/labels/NAME` (as
/// [`write_labels`] writes one, with `image-label` pointing back at the image) and lists
/// it in the image's `labels` group, creating the group if needed: napari and other NGFF
/// viewers then show the masks over the image, and cellswarm reads the first listed label
/// image as the movie's masks. Returns the label image's path.
///
/// # Errors
/// A name that is not a plain folder name, an image that is not NGFF 0.5 (a 0.4 image is
/// Zarr v2, which this writer does not write: write the labels to their own
/// `NAME.ome.zarr`), a label movie whose frames or plane size differ from the image's,
/// an existing label image of that name, or I/O errors.
pub fn write_image_labels(
    image: &Path,
    name: &str,
    frames: &[Labels],
    physical: PhysicalSize,
) -> Result<PathBuf, DataError> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain {
        return Err(bad(
            image,
            format!("label image name {name:?}: use letters, digits, '.', '_' and '-'"),
        ));
    }
    if !image.join("zarr.json").is_file() {
        return Err(bad(
            image,
            "labels can be added to an NGFF 0.5 image (Zarr v3, zarr.json) only; for this \
             image write them to their own NAME.ome.zarr",
        ));
    }
    let z = OmeZarr::open(image)?;
    let (d, h, w) = frames.first().map_or((0, 0, 0), Volume::shape);
    let (zd, zh, zw) = (z.size[2] as usize, z.size[3] as usize, z.size[4] as usize);
    if frames.len() != z.frames() || (d, h, w) != (zd, zh, zw) {
        return Err(bad(
            image,
            format!(
                "the masks ({} frames of {d} x {h} x {w}) do not fit the image ({} frames of {} x {} x {})",
                frames.len(),
                z.frames(),
                zd,
                zh,
                zw
            ),
        ));
    }
    let labels = image.join("labels");
    let path = labels.join(name);
    std::fs::create_dir_all(&labels).map_err(|source| DataError::Io {
        path: labels.clone(),
        source,
    })?;
    write_label_image(&path, frames, physical, Some("../../"))?;
    let err = |e: &dyn std::fmt::Display| zarr_err(&labels, e);
    let store = Arc::new(FilesystemStore::new(&labels).map_err(|e| err(&e))?);
    let mut listed: Vec<Value> = match Group::open(Arc::clone(&store), "/") {
        Ok(g) => ngff(g.attributes())
            .get("labels")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    if !listed.iter().any(|v| v.as_str() == Some(name)) {
        listed.push(Value::String(name.to_owned()));
    }
    let Value::Object(attrs) = json!({"ome": {"version": "0.5", "labels": listed}}) else {
        unreachable!("a JSON object literal");
    };
    GroupBuilder::new()
        .attributes(attrs)
        .build(store, "/")
        .map_err(|e| err(&e))?
        .store_metadata()
        .map_err(|e| err(&e))?;
    Ok(path)
}

/// [`write_labels`], with `image-label` naming its `source` image (relative path).
fn write_label_image(
    path: &Path,
    frames: &[Labels],
    physical: PhysicalSize,
    source: Option<&str>,
) -> Result<(), DataError> {
    let (first, wide) = check_label_movie(path, frames)?;
    let (d, h, w) = first.shape();
    let tmp = path.with_extension("zarr.partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|source| DataError::Io {
            path: tmp.clone(),
            source,
        })?;
    }
    let mut names = vec!["t"];
    let mut axes = vec![json!({"name": "t", "type": "time"})];
    let mut scale = vec![1.0];
    let mut shape = vec![frames.len() as u64];
    let mut chunks = vec![1u64];
    let mut space = |name: &'static str, n: usize, chunk: usize, size: Option<f64>| {
        names.push(name);
        axes.push(match size {
            Some(_) => json!({"name": name, "type": "space", "unit": "micrometer"}),
            None => json!({"name": name, "type": "space"}),
        });
        scale.push(size.unwrap_or(1.0));
        shape.push(n as u64);
        chunks.push(chunk as u64);
    };
    if d > 1 {
        space("z", d, 1, physical.z);
    }
    space("y", h, h.min(512), physical.y);
    space("x", w, w.min(512), physical.x);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("labels");
    let attrs = json!({
        "ome": {
            "version": "0.5",
            "multiscales": [{
                "name": name,
                "axes": axes,
                "datasets": [{
                    "path": "0",
                    "coordinateTransformations": [{"type": "scale", "scale": scale}],
                }],
            }],
            "image-label": {"source": match source {
                Some(image) => json!({"image": image}),
                None => json!({}),
            }},
        }
    });
    let write = || -> Result<(), DataError> {
        let err = |e: &dyn std::fmt::Display| zarr_err(path, e);
        let store = Arc::new(FilesystemStore::new(&tmp).map_err(|e| err(&e))?);
        let Value::Object(attrs) = attrs else {
            unreachable!("a JSON object literal");
        };
        GroupBuilder::new()
            .attributes(attrs)
            .build(Arc::clone(&store), "/")
            .map_err(|e| err(&e))?
            .store_metadata()
            .map_err(|e| err(&e))?;
        let codec = zarrs::array::codec::GzipCodec::new(5).map_err(|e| err(&e))?;
        let array = ArrayBuilder::new(
            shape.clone(),
            chunks.clone(),
            if wide {
                data_type::uint32()
            } else {
                data_type::uint16()
            },
            0u32,
        )
        .dimension_names(Some(names.clone()))
        .bytes_to_bytes_codecs(vec![Arc::new(codec)])
        .build(Arc::clone(&store), "/0")
        .map_err(|e| err(&e))?;
        array.store_metadata().map_err(|e| err(&e))?;
        for (t, f) in frames.iter().enumerate() {
            let ranges: Vec<std::ops::Range<u64>> = std::iter::once(t as u64..t as u64 + 1)
                .chain(shape[1..].iter().map(|&n| 0..n))
                .collect();
            let subset = ArraySubset::new_with_ranges(&ranges);
            if wide {
                array.store_array_subset(&subset, f.data.clone())
            } else {
                let narrow: Vec<u16> = f.data.iter().map(|&l| l as u16).collect();
                array.store_array_subset(&subset, narrow)
            }
            .map_err(|e| err(&e))?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_movies_round_trip_2d_and_3d_with_their_pixel_sizes() {
        let dir = tempfile::tempdir().unwrap();
        for (depth, wide) in [(1, false), (3, true)] {
            let p = dir.path().join(format!("masks{depth}.ome.zarr"));
            let frames: Vec<Labels> = (0..4u32)
                .map(|t| Volume {
                    depth,
                    height: 5,
                    width: 7,
                    data: (0..(depth * 35) as u32)
                        .map(|i| if wide { i * 3000 + t } else { i + t })
                        .collect(),
                })
                .collect();
            let ps = PhysicalSize {
                x: Some(0.5),
                y: Some(0.5),
                z: (depth > 1).then_some(2.0),
            };
            write_labels(&p, &frames, ps).unwrap();
            assert!(!p.with_extension("zarr.partial").exists());
            let z = OmeZarr::open(&p).unwrap();
            assert_eq!((z.frames(), z.depth(), z.channels().len()), (4, depth, 1));
            assert_eq!(z.physical_size(), ps);
            for (t, f) in frames.iter().enumerate() {
                assert_eq!(&z.read_label_stack(0, t).unwrap(), f);
                let img = z.read_stack(0, t).unwrap();
                assert_eq!(img.data[1], f.data[1] as f32);
            }
            assert!(z.read_stack(0, 4).is_err());
            assert!(z.read_stack(1, 0).is_err());
            let err = write_labels(&p, &frames, ps).unwrap_err().to_string();
            assert!(err.contains("already exists"), "{err}");
        }
        assert!(
            write_labels(
                &dir.path().join("none.ome.zarr"),
                &[],
                PhysicalSize::default()
            )
            .is_err()
        );
    }

    #[test]
    fn masks_written_into_an_image_are_listed_and_read_back_as_its_masks() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("movie.ome.zarr");
        let plane = |t: u32| Volume {
            depth: 1,
            height: 4,
            width: 6,
            data: (0..24u32).map(|i| (i + t) % 5).collect(),
        };
        let movie: Vec<Labels> = (0..3).map(plane).collect();
        let ps = PhysicalSize::default();
        // Any NGFF 0.5 image will do as the movie; a label movie is one.
        write_labels(&image, &movie, ps).unwrap();
        let masks: Vec<Labels> = (10..13).map(plane).collect();
        let at = write_image_labels(&image, "cells", &masks, ps).unwrap();
        assert_eq!(at, image.join("labels/cells"));
        assert_eq!(inside_image(&at), Some((image.clone(), "cells".into())));
        write_image_labels(&image, "nuclei", &movie, ps).unwrap();
        let z = OmeZarr::open(&image).unwrap();
        let l = z
            .label_image()
            .unwrap()
            .expect("the first listed label image");
        assert_eq!(l.read_label_stack(0, 1).unwrap().data, masks[1].data);
        let group = std::fs::read_to_string(image.join("labels/zarr.json")).unwrap();
        assert!(
            group.contains("\"cells\"") && group.contains("\"nuclei\""),
            "{group}"
        );
        let meta = std::fs::read_to_string(image.join("labels/cells/zarr.json")).unwrap();
        assert!(meta.contains("\"../../\""), "{meta}");
        // Refused, with the reason: an existing name, a name with a path in it, masks
        // that do not fit, an NGFF 0.4 image.
        assert!(write_image_labels(&image, "cells", &masks, ps).is_err());
        let e = write_image_labels(&image, "../x", &masks, ps)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label image name"), "{e}");
        let e = write_image_labels(&image, "few", &masks[..2], ps)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
        let v2 = dir.path().join("old.ome.zarr");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join(".zattrs"), "{}").unwrap();
        let e = write_image_labels(&v2, "cells", &masks, ps)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NGFF 0.5"), "{e}");
    }

    #[test]
    fn folders_that_are_not_ngff_images_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, attrs: Value| {
            let p = dir.path().join(name);
            let store = Arc::new(FilesystemStore::new(&p).unwrap());
            let Value::Object(a) = attrs else { panic!() };
            GroupBuilder::new()
                .attributes(a)
                .build(store, "/")
                .unwrap()
                .store_metadata()
                .unwrap();
            p
        };
        let cases = [
            ("plain.zarr", json!({}), "multiscales"),
            (
                "axes.zarr",
                json!({"multiscales": [{"axes": ["x", "y"], "datasets": [{"path": "0"}]}]}),
                "axes",
            ),
            (
                "escape.zarr",
                json!({"multiscales": [{"axes": ["y", "x"], "datasets": [{"path": "../0"}]}]}),
                "relative path",
            ),
            (
                "missing.zarr",
                json!({"ome": {"version": "0.5", "multiscales": [{"axes": ["y", "x"], "datasets": [{"path": "0"}]}]}}),
                "missing.zarr",
            ),
        ];
        for (name, attrs, needle) in cases {
            let p = write(name, attrs);
            let err = OmeZarr::open(&p).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
        }
        // Arrays whose dimension names or chunks say otherwise than the metadata allows.
        let array_case = |name: &str, dims: [&str; 3], chunks: Vec<u64>| {
            let p = write(
                name,
                json!({"ome": {"version": "0.5", "multiscales": [{
                    "axes": [{"name": "t", "type": "time"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                    "datasets": [{"path": "0"}]}]}}),
            );
            let store = Arc::new(FilesystemStore::new(&p).unwrap());
            ArrayBuilder::new(vec![2u64, 4096, 4096], chunks, data_type::uint16(), 0u16)
                .dimension_names(Some(dims.to_vec()))
                .build(store, "/0")
                .unwrap()
                .store_metadata()
                .unwrap();
            OmeZarr::open(&p).unwrap_err().to_string()
        };
        let err = array_case("transposed.zarr", ["y", "t", "x"], vec![1, 64, 64]);
        assert!(err.contains("transposed"), "{err}");
        let err = array_case("bomb.zarr", ["t", "y", "x"], vec![1, 1 << 16, 1 << 16]);
        assert!(err.contains("chunks of"), "{err}");
        let err = OmeZarr::open(&dir.path().join("nowhere.zarr"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nowhere.zarr"), "{err}");
    }
}
