//! OME-TIFF: the TIFF files microscopes and Bio-Formats write, with the image's
//! dimensions, channels and physical pixel sizes in OME-XML in the first page's
//! ImageDescription.
//!
//! An OME-TIFF holds a 5D image (X, Y, Z, C, T) as 2D pages (one per Z, C, T plane). The
//! XML's `Pixels` element gives the sizes and the `DimensionOrder` in which the pages
//! follow each other (`XYZCT`: Z fastest, then C, then T); `TiffData` elements may map
//! planes to pages explicitly. [`OmeTiff::open`] reads and checks the metadata only;
//! [`OmeTiff::read_stack`] reads one time point of one channel (its Z planes) when it is
//! needed, so a long movie is never in memory whole.
//!
//! Read: single-file OME-TIFF (plain or BigTIFF), any dimension order, `TiffData` with
//! `IFD`, `FirstZ/C/T` and `PlaneCount`, grayscale samples of any type the TIFF reader
//! takes, physical sizes in any length unit (kept in micrometres), the first `Image` of
//! the file. Refused with a message naming the file: planes in other files (multi-file
//! datasets), interleaved RGB channels, sizes that disagree with the pages.
//! Written ([`write_labels`]): one label movie, `XYZCT`, one channel, 16- or 32-bit.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use tiff::encoder::{Compression, DeflateLevel, TiffEncoder, colortype};
use tiff::tags::Tag;

use super::DataError;
use super::tiff_io::{
    MAX_PIXELS, gray_page_size, open_decoder, page_to_f32, page_to_labels, read_gray_page, tiff_err,
};
use super::volume::{Image, Labels, Volume};

/// Most planes (Z x C x T) an OME-TIFF may declare.
pub const MAX_PLANES: usize = 1 << 22;

/// Most channels an OME-TIFF may declare.
pub const MAX_CHANNELS: usize = 1024;

/// Whether `path` names an OME-TIFF file (`.ome.tif` or `.ome.tiff`, any case).
#[must_use]
pub fn is_ome_tiff(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    name.ends_with(".ome.tif") || name.ends_with(".ome.tiff")
}

/// Physical size of a pixel (and of a Z step) in micrometres, where the file says.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhysicalSize {
    /// Along X.
    pub x: Option<f64>,
    /// Along Y.
    pub y: Option<f64>,
    /// Between Z planes.
    pub z: Option<f64>,
}

/// A file (or folder) holding a movie as time points of channels of Z stacks, read one
/// stack at a time: OME-TIFF ([`OmeTiff`]) and OME-Zarr ([`super::ngff::OmeZarr`]).
pub trait StackFile: std::fmt::Debug + Send + Sync {
    /// The file or folder.
    fn path(&self) -> &Path;
    /// Time points.
    fn frames(&self) -> usize;
    /// Channel names, in order (a channel without a name is named by its index).
    fn channels(&self) -> &[String];
    /// Physical pixel and Z-step sizes in micrometres, where the metadata gives them.
    fn physical_size(&self) -> PhysicalSize;
    /// Reads the Z stack of channel `c` at time point `t` (a 2D image if it has one plane).
    ///
    /// # Errors
    /// I/O or decoding errors, or a stack the file does not have.
    fn read_stack(&self, c: usize, t: usize) -> Result<Image, DataError>;
    /// Reads the Z stack of channel `c` at time point `t` as labels (integer pixels).
    ///
    /// # Errors
    /// As [`StackFile::read_stack`], plus non-integer or negative labels.
    fn read_label_stack(&self, c: usize, t: usize) -> Result<Labels, DataError>;

    /// The channel `choice` names: a channel's name, or its index (from 0). `None` asks
    /// for the only channel of a single-channel file.
    ///
    /// # Errors
    /// No such channel, or no choice in a file with several channels.
    fn channel(&self, choice: Option<&str>) -> Result<usize, DataError> {
        let channels = self.channels();
        let list = || channels.join(", ");
        match choice {
            None if channels.len() == 1 => Ok(0),
            None => Err(bad(
                self.path(),
                format!(
                    "choice of channel: the file has {} ({}); pick one with --channel NAME or INDEX",
                    channels.len(),
                    list()
                ),
            )),
            Some(c) => channels
                .iter()
                .position(|n| n == c)
                .or_else(|| c.parse::<usize>().ok().filter(|&i| i < channels.len()))
                .ok_or_else(|| {
                    bad(
                        self.path(),
                        format!("channel \"{c}\"; the file has {}", list()),
                    )
                }),
        }
    }
}

/// An OME-TIFF file's metadata and where each plane is: see the module documentation.
#[derive(Debug, Clone)]
pub struct OmeTiff {
    path: PathBuf,
    /// SizeX, SizeY, SizeZ, SizeC, SizeT.
    size: [usize; 5],
    /// The three letters after `XY` in `DimensionOrder`, as indices into Z, C, T (0-2).
    order: [usize; 3],
    physical: PhysicalSize,
    channels: Vec<String>,
    /// The page of each plane, indexed `z + Z * (c + C * t)`.
    pages: Vec<Option<u32>>,
}

/// [`DataError::Unsupported`] for `path`: what it holds that cannot be read.
pub(super) fn bad(path: &Path, what: impl Into<String>) -> DataError {
    DataError::Unsupported {
        path: path.to_owned(),
        what: what.into(),
    }
}

/// Micrometres per `unit` (OME's `UnitsLength` symbols; the default is µm).
fn micrometres(unit: &str) -> Option<f64> {
    Some(match unit {
        "µm" | "μm" | "um" | "micron" => 1.0,
        "nm" => 1e-3,
        "pm" => 1e-6,
        "Å" => 1e-4,
        "mm" => 1e3,
        "cm" => 1e4,
        "m" => 1e6,
        _ => return None,
    })
}

/// The OME-XML of a file: its `Pixels` element's sizes and order, its channels and its
/// plane-to-page map. `file_name` is the file's own name, which a `TiffData`'s `UUID`
/// may name.
fn parse(path: &Path, xml: &str, file_name: &str) -> Result<OmeTiff, DataError> {
    let doc = roxmltree::Document::parse(xml.trim_start_matches('\u{feff}').trim())
        .map_err(|e| bad(path, format!("OME-XML in the first page ({e})")))?;
    let pixels = doc
        .descendants()
        .find(|n| n.has_tag_name_local("Image"))
        .and_then(|image| image.children().find(|n| n.has_tag_name_local("Pixels")))
        .ok_or_else(|| bad(path, "OME-XML without an Image with Pixels"))?;
    let size = |name: &str| -> Result<usize, DataError> {
        let v = pixels
            .attribute(name)
            .ok_or_else(|| bad(path, format!("OME-XML Pixels without {name}")))?;
        match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(bad(
                path,
                format!("OME-XML Pixels {name}=\"{v}\" (a positive whole number is needed)"),
            )),
        }
    };
    let dims = [
        size("SizeX")?,
        size("SizeY")?,
        size("SizeZ")?,
        size("SizeC")?,
        size("SizeT")?,
    ];
    let [sx, sy, sz, sc, st] = dims;
    let stack = sx.checked_mul(sy).and_then(|p| p.checked_mul(sz));
    if stack.is_none_or(|p| p > MAX_PIXELS) {
        return Err(bad(
            path,
            format!("Z stack of {sz} x {sy} x {sx} pixels (at most {MAX_PIXELS})"),
        ));
    }
    if sc > MAX_CHANNELS {
        return Err(bad(path, format!("{sc} channels (at most {MAX_CHANNELS})")));
    }
    let planes = sz
        .checked_mul(sc)
        .and_then(|p| p.checked_mul(st))
        .filter(|&p| p <= MAX_PLANES)
        .ok_or_else(|| {
            bad(
                path,
                format!("{sz} x {sc} x {st} planes (Z x C x T; at most {MAX_PLANES})"),
            )
        })?;
    let order_text = pixels.attribute("DimensionOrder").unwrap_or("XYZCT");
    let order = dimension_order(order_text).ok_or_else(|| {
        bad(
            path,
            format!("DimensionOrder \"{order_text}\" (XY then Z, C, T in some order)"),
        )
    })?;
    let unit = |attr: &str| -> Result<f64, DataError> {
        let u = pixels.attribute(attr).unwrap_or("µm");
        micrometres(u).ok_or_else(|| bad(path, format!("length unit {attr}=\"{u}\"")))
    };
    let length = |attr: &str, unit_attr: &str| -> Result<Option<f64>, DataError> {
        let Some(v) = pixels.attribute(attr) else {
            return Ok(None);
        };
        match v.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(Some(x * unit(unit_attr)?)),
            _ => Err(bad(
                path,
                format!("{attr}=\"{v}\" (a positive length is needed)"),
            )),
        }
    };
    let physical = PhysicalSize {
        x: length("PhysicalSizeX", "PhysicalSizeXUnit")?,
        y: length("PhysicalSizeY", "PhysicalSizeYUnit")?,
        z: length("PhysicalSizeZ", "PhysicalSizeZUnit")?,
    };
    let mut channels = Vec::new();
    for (i, ch) in pixels
        .children()
        .filter(|n| n.has_tag_name_local("Channel"))
        .enumerate()
    {
        if let Some(spp) = ch.attribute("SamplesPerPixel")
            && spp.trim() != "1"
        {
            return Err(bad(
                path,
                format!(
                    "channel {i} with {spp} samples per pixel (interleaved RGB); expected grayscale channels"
                ),
            ));
        }
        channels.push(
            ch.attribute("Name")
                .map_or_else(|| format!("{i}"), str::to_owned),
        );
    }
    // Files that list fewer Channel elements than SizeC: the rest are named by number.
    for i in channels.len()..sc {
        channels.push(format!("{i}"));
    }
    channels.truncate(sc);

    let mut file = OmeTiff {
        path: path.to_owned(),
        size: dims,
        order,
        physical,
        channels,
        pages: vec![None; planes],
    };
    let tiff_data: Vec<_> = pixels
        .children()
        .filter(|n| n.has_tag_name_local("TiffData"))
        .collect();
    if tiff_data.is_empty() {
        // No map: the pages follow the dimension order from the first.
        for s in 0..planes {
            let p = file.plane_at_sequence(s);
            file.pages[p] = Some(s as u32);
        }
        return Ok(file);
    }
    // This file's own UUID: a TiffData naming it (or naming this file) maps pages here.
    let own_uuid = doc
        .root_element()
        .attribute("UUID")
        .map(str::trim)
        .filter(|u| !u.is_empty());
    // Planes mapped so far: more than the image has is a malformed (or hostile) map.
    let mut mapped = 0usize;
    for td in tiff_data {
        if let Some(uuid) = td.children().find(|n| n.has_tag_name_local("UUID")) {
            let id = uuid.text().map(str::trim).filter(|u| !u.is_empty());
            let name = uuid.attribute("FileName");
            let here = (id.is_some() && id == own_uuid) || name == Some(file_name);
            if !here {
                return Err(bad(
                    path,
                    format!(
                        "multi-file OME-TIFF: planes are in {}; open a single-file OME-TIFF (e.g. bfconvert or tifffile)",
                        name.or(id).unwrap_or("another file")
                    ),
                ));
            }
        }
        let num = |attr: &str, default: usize| -> Result<usize, DataError> {
            td.attribute(attr).map_or(Ok(default), |v| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| bad(path, format!("TiffData {attr}=\"{v}\"")))
            })
        };
        let ifd = num("IFD", 0)?;
        let (z, c, t) = (num("FirstZ", 0)?, num("FirstC", 0)?, num("FirstT", 0)?);
        if z >= sz || c >= sc || t >= st {
            return Err(bad(
                path,
                format!("TiffData starts at plane Z={z} C={c} T={t}, outside {sz} x {sc} x {st}"),
            ));
        }
        let first = file.sequence_of(z, c, t);
        let default_count = if td.attribute("IFD").is_some() {
            1
        } else {
            planes - first
        };
        let count = num("PlaneCount", default_count)?;
        if count > planes - first {
            return Err(bad(
                path,
                format!(
                    "TiffData PlaneCount {count} from plane Z={z} C={c} T={t} runs past the image's {planes} planes"
                ),
            ));
        }
        mapped = mapped.saturating_add(count);
        if mapped > planes {
            return Err(bad(
                path,
                format!("TiffData map {mapped} planes or more, for an image of {planes}"),
            ));
        }
        for k in 0..count {
            let page = u32::try_from(ifd + k)
                .map_err(|_| bad(path, format!("TiffData IFD {}", ifd + k)))?;
            let p = file.plane_at_sequence(first + k);
            file.pages[p] = Some(page);
        }
    }
    Ok(file)
}

/// `XYZCT` and its kin: the indices into (Z, C, T) of the three letters after `XY`.
fn dimension_order(s: &str) -> Option<[usize; 3]> {
    let rest = s.trim().strip_prefix("XY")?;
    let mut out = [0usize; 3];
    let mut seen = [false; 3];
    let mut letters = rest.chars();
    for slot in &mut out {
        let i = match letters.next()? {
            'Z' => 0,
            'C' => 1,
            'T' => 2,
            _ => return None,
        };
        if std::mem::replace(&mut seen[i], true) {
            return None;
        }
        *slot = i;
    }
    letters.next().is_none().then_some(out)
}

trait LocalName {
    fn has_tag_name_local(&self, name: &str) -> bool;
}

impl LocalName for roxmltree::Node<'_, '_> {
    /// The element's name without its namespace (OME-XML's namespace changes with the
    /// schema's year).
    fn has_tag_name_local(&self, name: &str) -> bool {
        self.is_element() && self.tag_name().name() == name
    }
}

impl OmeTiff {
    /// Reads and checks the OME-XML of an OME-TIFF file (no pixels).
    ///
    /// # Errors
    /// I/O, a TIFF without OME-XML, metadata cellswarm does not read (see the module
    /// documentation), or a first page whose size differs from the XML's.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let mut dec = open_decoder(path)?;
        let xml = dec
            .get_tag_ascii_string(Tag::ImageDescription)
            .map_err(|_| {
                bad(
                    path,
                    "TIFF without OME-XML in its first page's ImageDescription",
                )
            })?;
        if !xml.contains("<OME") {
            return Err(bad(
                path,
                "TIFF whose ImageDescription is not OME-XML (a plain TIFF stack is a CTC frame: tTTT.tif in a sequence folder)",
            ));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let ome = parse(path, &xml, name)?;
        let (w, h) = dec.dimensions().map_err(|e| tiff_err(path, &e))?;
        if (w as usize, h as usize) != (ome.size[0], ome.size[1]) {
            return Err(DataError::SizeMismatch {
                path: path.to_owned(),
                expected: format!("{} x {} (OME-XML SizeX x SizeY)", ome.size[0], ome.size[1]),
                found: format!("{w} x {h} (first page)"),
            });
        }
        Ok(ome)
    }

    /// Z planes per stack (SizeZ).
    #[must_use]
    pub fn depth(&self) -> usize {
        self.size[2]
    }

    /// The position of plane (z, c, t) in the dimension order.
    fn sequence_of(&self, z: usize, c: usize, t: usize) -> usize {
        let coord = [z, c, t];
        let n = [self.size[2], self.size[3], self.size[4]];
        let [a, b, d] = self.order;
        coord[a] + n[a] * (coord[b] + n[b] * coord[d])
    }

    /// The plane index (`z + Z * (c + C * t)`) at position `s` of the dimension order.
    fn plane_at_sequence(&self, s: usize) -> usize {
        let n = [self.size[2], self.size[3], self.size[4]];
        let [a, b, d] = self.order;
        let mut coord = [0usize; 3];
        coord[a] = s % n[a];
        coord[b] = (s / n[a]) % n[b];
        coord[d] = s / (n[a] * n[b]);
        coord[0] + n[0] * (coord[1] + n[1] * coord[2])
    }

    /// The pages of the Z stack of channel `c` at time `t`, in Z order.
    fn stack_pages(&self, c: usize, t: usize) -> Result<Vec<u32>, DataError> {
        if c >= self.size[3] || t >= self.size[4] {
            return Err(bad(
                &self.path,
                format!(
                    "plane C={c} T={t} (the file has {} channels, {} time points)",
                    self.size[3], self.size[4]
                ),
            ));
        }
        (0..self.size[2])
            .map(|z| {
                self.pages[z + self.size[2] * (c + self.size[3] * t)].ok_or_else(|| {
                    bad(
                        &self.path,
                        format!("plane Z={z} C={c} T={t}: no TiffData maps it to a page"),
                    )
                })
            })
            .collect()
    }

    /// Reads the raw pages of one stack, checking each against SizeX x SizeY.
    fn read_pages(
        &self,
        c: usize,
        t: usize,
    ) -> Result<Vec<tiff::decoder::DecodingResult>, DataError> {
        let pages = self.stack_pages(c, t)?;
        let mut dec = open_decoder(&self.path)?;
        let mut out = Vec::with_capacity(pages.len());
        for page in pages {
            dec.seek_to_image(page as usize).map_err(|e| {
                bad(
                    &self.path,
                    format!("page {page} of plane C={c} T={t} ({e})"),
                )
            })?;
            let (w, h) = gray_page_size(&mut dec, &self.path)?;
            if (w as usize, h as usize) != (self.size[0], self.size[1]) {
                return Err(DataError::SizeMismatch {
                    path: self.path.clone(),
                    expected: format!("{} x {} (OME-XML)", self.size[0], self.size[1]),
                    found: format!("{w} x {h} (page {page})"),
                });
            }
            out.push(read_gray_page(&mut dec, &self.path, (w, h))?);
        }
        Ok(out)
    }

    fn volume<T>(&self, data: Vec<T>) -> Volume<T> {
        Volume {
            depth: self.size[2],
            height: self.size[1],
            width: self.size[0],
            data,
        }
    }
}

impl StackFile for OmeTiff {
    fn path(&self) -> &Path {
        &self.path
    }

    fn frames(&self) -> usize {
        self.size[4]
    }

    fn channels(&self) -> &[String] {
        &self.channels
    }

    fn physical_size(&self) -> PhysicalSize {
        self.physical
    }

    fn read_stack(&self, c: usize, t: usize) -> Result<Image, DataError> {
        let mut data = Vec::with_capacity(self.size[0] * self.size[1] * self.size[2]);
        for page in self.read_pages(c, t)? {
            data.extend(page_to_f32(&self.path, page)?);
        }
        Ok(self.volume(data))
    }

    fn read_label_stack(&self, c: usize, t: usize) -> Result<Labels, DataError> {
        let mut data = Vec::with_capacity(self.size[0] * self.size[1] * self.size[2]);
        for page in self.read_pages(c, t)? {
            data.extend(page_to_labels(&self.path, page)?);
        }
        Ok(self.volume(data))
    }
}

/// The first frame of a label movie about to be written to `path`, and whether a label
/// needs 32 bits, after checking that there is a frame, that every frame has its shape,
/// and that nothing is at `path` yet.
///
/// # Errors
/// No frames, frames of different shapes, or an existing `path`.
pub(super) fn check_label_movie<'a>(
    path: &Path,
    frames: &'a [Labels],
) -> Result<(&'a Labels, bool), DataError> {
    let Some(first) = frames.first() else {
        return Err(bad(path, "label movie without frames"));
    };
    if let Some((t, f)) = frames
        .iter()
        .enumerate()
        .find(|(_, f)| !f.same_shape(first))
    {
        return Err(DataError::SizeMismatch {
            path: path.to_owned(),
            expected: format!("{:?} (frame 0)", first.shape()),
            found: format!("{:?} (frame {t})", f.shape()),
        });
    }
    if path.exists() {
        return Err(bad(path, "output that already exists (remove it first)"));
    }
    let wide = frames
        .iter()
        .any(|f| f.data.iter().any(|&l| l > u32::from(u16::MAX)));
    Ok((first, wide))
}

/// Writes a label movie (one Z stack per time point, all of one shape) as an OME-TIFF:
/// `XYZCT`, one channel, 16-bit if every label fits, else 32-bit, Deflate-compressed,
/// with `physical` sizes where given; to a temporary name and renamed.
///
/// # Errors
/// No frames, frames of different shapes, I/O or encoding errors.
pub fn write_labels(
    path: &Path,
    frames: &[Labels],
    physical: PhysicalSize,
) -> Result<(), DataError> {
    let (first, wide) = check_label_movie(path, frames)?;
    let (d, h, w) = first.shape();
    let mut attrs = String::new();
    for (axis, v) in [("X", physical.x), ("Y", physical.y), ("Z", physical.z)] {
        if let Some(v) = v {
            // Micrometres are OME's default unit; the TIFF tag holds ASCII only, so the
            // unit's symbol is left out rather than written.
            attrs.push_str(&format!(" PhysicalSize{axis}=\"{v}\""));
        }
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <OME xmlns=\"http://www.openmicroscopy.org/Schemas/OME/2016-06\" Creator=\"cellswarm\">\
         <Image ID=\"Image:0\" Name=\"{}\"><Pixels ID=\"Pixels:0\" DimensionOrder=\"XYZCT\" \
         Type=\"{}\" SizeX=\"{w}\" SizeY=\"{h}\" SizeZ=\"{d}\" SizeC=\"1\" SizeT=\"{}\"{attrs}>\
         <Channel ID=\"Channel:0:0\" Name=\"labels\" SamplesPerPixel=\"1\"/>\
         <TiffData IFD=\"0\" PlaneCount=\"{}\"/></Pixels></Image></OME>",
        xml_escape(name),
        if wide { "uint32" } else { "uint16" },
        frames.len(),
        d * frames.len(),
    );
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("partial");
    let file = File::create(&tmp).map_err(io)?;
    let result = (|| -> Result<(), tiff::TiffError> {
        let mut enc = TiffEncoder::new(BufWriter::new(file))?
            .with_compression(Compression::Deflate(DeflateLevel::Balanced));
        let mut first_page = true;
        for f in frames {
            for z in 0..d {
                let plane = f.plane(z);
                if wide {
                    let mut img = enc.new_image::<colortype::Gray32>(w as u32, h as u32)?;
                    if std::mem::take(&mut first_page) {
                        img.encoder()
                            .write_tag(Tag::ImageDescription, xml.as_str())?;
                    }
                    img.write_data(plane)?;
                } else {
                    let narrow: Vec<u16> = plane.iter().map(|&l| l as u16).collect();
                    let mut img = enc.new_image::<colortype::Gray16>(w as u32, h as u32)?;
                    if std::mem::take(&mut first_page) {
                        img.encoder()
                            .write_tag(Tag::ImageDescription, xml.as_str())?;
                    }
                    img.write_data(&narrow)?;
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(tiff_err(path, &e));
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// `s` as XML attribute text in ASCII (the TIFF tag holds ASCII only): markup and
/// every non-ASCII character as character references.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => out.push_str(&format!("&#x{:X};", u32::from(c))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `pages` (16-bit, `w` x `h` each) with `xml` in the first page, as a
    /// microscope's software does.
    fn write_pages(path: &Path, w: u32, h: u32, pages: &[Vec<u16>], xml: &str) {
        let file = File::create(path).unwrap();
        let mut enc = TiffEncoder::new(BufWriter::new(file)).unwrap();
        for (i, p) in pages.iter().enumerate() {
            let mut img = enc.new_image::<colortype::Gray16>(w, h).unwrap();
            if i == 0 {
                img.encoder().write_tag(Tag::ImageDescription, xml).unwrap();
            }
            img.write_data(p).unwrap();
        }
    }

    /// A pixel value that says which plane and pixel it is.
    fn value(z: usize, c: usize, t: usize, i: usize) -> u16 {
        (t * 1000 + c * 100 + z * 10 + i) as u16
    }

    fn xml(order: &str, sizes: [usize; 5], extra: &str, inner: &str) -> String {
        let [x, y, z, c, t] = sizes;
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<OME xmlns=\"http://www.openmicroscopy.org/Schemas/OME/2016-06\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" UUID=\"urn:uuid:1\" Creator=\"OME Bio-Formats 6.11\">\
             <Instrument ID=\"Instrument:0\"/><Image ID=\"Image:0\" Name=\"cells\"><AcquisitionDate>2026-01-01T00:00:00</AcquisitionDate>\
             <Pixels BigEndian=\"false\" DimensionOrder=\"{order}\" ID=\"Pixels:0\" Interleaved=\"false\" \
             SignificantBits=\"16\" SizeC=\"{c}\" SizeT=\"{t}\" SizeX=\"{x}\" SizeY=\"{y}\" SizeZ=\"{z}\" Type=\"uint16\"{extra}>\
             <Channel ID=\"Channel:0:0\" Name=\"membrane\" SamplesPerPixel=\"1\"><LightPath/></Channel>\
             <Channel ID=\"Channel:0:1\" Name=\"nuclei\" SamplesPerPixel=\"1\"><LightPath/></Channel>\
             {inner}<Plane TheC=\"0\" TheT=\"0\" TheZ=\"0\" DeltaT=\"0.0\"/></Pixels></Image>\
             <StructuredAnnotations/></OME>"
        )
    }

    /// The pages of a (z, c, t) movie in `order`, each 3 x 2 pixels.
    fn pages_in(order: &str, sizes: [usize; 5]) -> Vec<Vec<u16>> {
        let [_, _, nz, nc, nt] = sizes;
        let n = [nz, nc, nt];
        let o = dimension_order(order).unwrap();
        (0..nz * nc * nt)
            .map(|s| {
                let mut coord = [0; 3];
                coord[o[0]] = s % n[o[0]];
                coord[o[1]] = (s / n[o[0]]) % n[o[1]];
                coord[o[2]] = s / (n[o[0]] * n[o[1]]);
                (0..6)
                    .map(|i| value(coord[0], coord[1], coord[2], i))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn every_dimension_order_reads_the_same_stacks() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [3, 2, 4, 2, 3];
        for order in ["XYZCT", "XYZTC", "XYCZT", "XYCTZ", "XYTZC", "XYTCZ"] {
            let p = dir.path().join(format!("{order}.ome.tif"));
            let extra = " PhysicalSizeX=\"0.65\" PhysicalSizeY=\"0.65\" PhysicalSizeZ=\"2000\" PhysicalSizeZUnit=\"nm\"";
            write_pages(
                &p,
                3,
                2,
                &pages_in(order, sizes),
                &xml(order, sizes, extra, ""),
            );
            let ome = OmeTiff::open(&p).unwrap();
            assert_eq!((ome.frames(), ome.depth()), (3, 4));
            assert_eq!(ome.channels(), ["membrane", "nuclei"]);
            let ps = ome.physical_size();
            assert_eq!((ps.x, ps.y), (Some(0.65), Some(0.65)));
            assert!((ps.z.unwrap() - 2.0).abs() < 1e-12, "{ps:?}");
            let c = ome.channel(Some("nuclei")).unwrap();
            assert_eq!(c, 1);
            for t in 0..3 {
                let img = ome.read_stack(c, t).unwrap();
                assert_eq!(img.shape(), (4, 2, 3));
                for z in 0..4 {
                    let want: Vec<f32> = (0..6).map(|i| f32::from(value(z, 1, t, i))).collect();
                    assert_eq!(img.plane(z), &want[..], "{order} t={t} z={z}");
                }
            }
        }
    }

    #[test]
    fn tiff_data_maps_planes_to_pages() {
        let dir = tempfile::tempdir().unwrap();
        // One Z, two channels, two time points; pages stored T-major but mapped one by
        // one (as Bio-Formats writes), with this file's own name in the UUID, or its
        // UUID under the name it had before it was renamed.
        let sizes = [3, 2, 1, 2, 2];
        let p = dir.path().join("mapped.ome.tiff");
        let mut inner = String::new();
        let mut pages = Vec::new();
        for (ifd, (c, t)) in [(1, 1), (0, 0), (1, 0), (0, 1)].into_iter().enumerate() {
            let name = if ifd == 0 {
                "renamed-since.ome.tif"
            } else {
                "mapped.ome.tiff"
            };
            inner.push_str(&format!(
                "<TiffData FirstC=\"{c}\" FirstT=\"{t}\" FirstZ=\"0\" IFD=\"{ifd}\" PlaneCount=\"1\">\
                 <UUID FileName=\"{name}\">urn:uuid:1</UUID></TiffData>"
            ));
            pages.push((0..6).map(|i| value(0, c, t, i)).collect());
        }
        write_pages(&p, 3, 2, &pages, &xml("XYZCT", sizes, "", &inner));
        let ome = OmeTiff::open(&p).unwrap();
        for (c, t) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let img = ome.read_stack(c, t).unwrap();
            let want: Vec<f32> = (0..6).map(|i| f32::from(value(0, c, t, i))).collect();
            assert_eq!(img.data, want, "c={c} t={t}");
        }
        // A run of planes from one TiffData.
        let q = dir.path().join("run.ome.tif");
        let inner = "<TiffData FirstC=\"1\" IFD=\"0\" PlaneCount=\"3\"/><TiffData IFD=\"3\"/>";
        let order: Vec<Vec<u16>> = [(1, 0), (0, 1), (1, 1), (0, 0)]
            .iter()
            .map(|&(c, t)| (0..6).map(|i| value(0, c, t, i)).collect())
            .collect();
        write_pages(&q, 3, 2, &order, &xml("XYZCT", sizes, "", inner));
        let ome = OmeTiff::open(&q).unwrap();
        for (c, t) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let want: Vec<f32> = (0..6).map(|i| f32::from(value(0, c, t, i))).collect();
            assert_eq!(ome.read_stack(c, t).unwrap().data, want, "c={c} t={t}");
        }
    }

    #[test]
    fn what_cannot_be_read_is_refused_with_the_file_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [3, 2, 1, 2, 1];
        let pages = pages_in("XYZCT", sizes);
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "multi.ome.tif",
                xml(
                    "XYZCT",
                    sizes,
                    "",
                    "<TiffData IFD=\"0\"><UUID FileName=\"other.ome.tif\">u</UUID></TiffData>",
                ),
                "multi-file",
            ),
            (
                "order.ome.tif",
                xml("XYQCT", sizes, "", ""),
                "DimensionOrder",
            ),
            (
                "overmapped.ome.tif",
                xml(
                    "XYZCT",
                    sizes,
                    "",
                    &"<TiffData IFD=\"0\" PlaneCount=\"2\"/>".repeat(2),
                ),
                "TiffData map",
            ),
            (
                "huge.ome.tif",
                xml("XYZCT", [1 << 20, 1 << 20, 4, 2, 1], "", ""),
                "pixels",
            ),
            (
                "planes.ome.tif",
                xml("XYZCT", [3, 2, 1 << 12, 2, 1 << 12], "", ""),
                "planes",
            ),
            (
                "unit.ome.tif",
                xml(
                    "XYZCT",
                    sizes,
                    " PhysicalSizeX=\"1\" PhysicalSizeXUnit=\"furlong\"",
                    "",
                ),
                "unit",
            ),
            (
                "zero.ome.tif",
                xml("XYZCT", [3, 2, 0, 2, 1], "", ""),
                "SizeZ",
            ),
            (
                "past.ome.tif",
                xml(
                    "XYZCT",
                    sizes,
                    "",
                    "<TiffData FirstC=\"1\" PlaneCount=\"5\"/>",
                ),
                "PlaneCount",
            ),
            (
                "broken.ome.tif",
                "<OME><Image><Pixels".to_owned(),
                "OME-XML",
            ),
        ];
        for (name, meta, needle) in cases {
            let p = dir.path().join(name);
            write_pages(&p, 3, 2, &pages, &meta);
            let err = OmeTiff::open(&p).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
        }
        // A size that disagrees with the pages, a plane with no page, no channel chosen.
        let p = dir.path().join("size.ome.tif");
        write_pages(&p, 3, 2, &pages, &xml("XYZCT", [4, 2, 1, 2, 1], "", ""));
        let err = OmeTiff::open(&p).unwrap_err().to_string();
        assert!(err.contains("SizeX"), "{err}");
        let p = dir.path().join("gap.ome.tif");
        write_pages(
            &p,
            3,
            2,
            &pages,
            &xml("XYZCT", sizes, "", "<TiffData FirstC=\"1\" IFD=\"0\"/>"),
        );
        let ome = OmeTiff::open(&p).unwrap();
        let err = ome.read_stack(0, 0).unwrap_err().to_string();
        assert!(err.contains("no TiffData"), "{err}");
        let err = ome.channel(None).unwrap_err().to_string();
        assert!(
            err.contains("membrane, nuclei") && err.contains("--channel"),
            "{err}"
        );
        assert!(ome.channel(Some("dapi")).is_err());
        assert_eq!(ome.channel(Some("0")).unwrap(), 0);
        // A plain TIFF is not an OME-TIFF.
        let plain = dir.path().join("plain.ome.tif");
        super::super::tiff_io::write_u16(&plain, &Volume::from_2d(2, 3, vec![0u16; 6])).unwrap();
        let err = OmeTiff::open(&plain).unwrap_err().to_string();
        assert!(err.contains("OME-XML"), "{err}");
    }

    #[test]
    fn damaged_metadata_is_an_error_never_a_panic() {
        let p = Path::new("damaged.ome.tif");
        let inner = "<TiffData FirstC=\"1\" FirstT=\"2\" IFD=\"3\" PlaneCount=\"2\"><UUID FileName=\"damaged.ome.tif\">u</UUID></TiffData>";
        let good = xml("XYTCZ", [5, 4, 2, 2, 3], " PhysicalSizeZ=\"1.5\"", inner);
        assert!(parse(p, &good, "damaged.ome.tif").is_ok());
        let bytes = good.as_bytes();
        // Every truncation, and every position overwritten by characters that change
        // numbers, names and structure.
        for cut in 0..bytes.len() {
            let _ = parse(p, &good[..good.floor_char_boundary(cut)], "damaged.ome.tif");
        }
        for i in 0..bytes.len() {
            for b in [b'9', b'-', b'"', b'<', b'Z', b' '] {
                let mut m = bytes.to_vec();
                m[i] = b;
                if let Ok(text) = std::str::from_utf8(&m) {
                    let _ = parse(p, text, "damaged.ome.tif");
                }
            }
        }
    }

    #[test]
    fn label_movies_round_trip_with_their_pixel_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("masks.ome.tif");
        let frames: Vec<Labels> = (0..3u32)
            .map(|t| Volume {
                depth: 2,
                height: 3,
                width: 4,
                data: (0..24u32)
                    .map(|i| if t == 2 { i * 5000 } else { i + t })
                    .collect(),
            })
            .collect();
        let ps = PhysicalSize {
            x: Some(0.5),
            y: Some(0.5),
            z: Some(2.0),
        };
        write_labels(&p, &frames, ps).unwrap();
        let ome = OmeTiff::open(&p).unwrap();
        assert_eq!((ome.frames(), ome.depth(), ome.channels().len()), (3, 2, 1));
        assert_eq!(ome.physical_size(), ps);
        for (t, f) in frames.iter().enumerate() {
            assert_eq!(&ome.read_label_stack(0, t).unwrap(), f);
        }
        assert!(write_labels(&p, &[], ps).is_err());
        let err = write_labels(&p, &frames, ps).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        // A name outside ASCII is written as character references and read back.
        let q = dir.path().join("zellkerne-µ.ome.tif");
        write_labels(&q, &frames[..1], ps).unwrap();
        assert_eq!(OmeTiff::open(&q).unwrap().frames(), 1);
    }
}
