//! Reading and writing single- and multi-page grayscale TIFF files (the `tiff` crate).
//!
//! Intensities may be 8/16/32/64-bit integers or 16/32/64-bit floats, compressed or not;
//! a multi-page file is a 3D stack. Label images must hold integers. Output is written
//! Deflate-compressed, to a temporary name and renamed, so a crash never leaves half a file.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use tiff::ColorType;
use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::encoder::{Compression, DeflateLevel, TiffEncoder, colortype};

use super::DataError;
use super::volume::{Image, Labels, Volume};

/// Largest image accepted, in pixels (a 3D stack of 2048 x 2048 x 512).
pub const MAX_PIXELS: usize = 1 << 31;

/// [`DataError::Tiff`] for `path`.
pub(super) fn tiff_err(path: &Path, e: &tiff::TiffError) -> DataError {
    DataError::Tiff {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// A TIFF decoder of `path`, decoding pages of at most 1 GiB.
pub(super) fn open_decoder(path: &Path) -> Result<Decoder<BufReader<File>>, DataError> {
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut limits = Limits::default();
    limits.decoding_buffer_size = 1 << 30;
    Ok(Decoder::new(BufReader::new(file))
        .map_err(|e| tiff_err(path, &e))?
        .with_limits(limits))
}

/// The size of the decoder's current page, if its pixels are single grayscale samples.
///
/// # Errors
/// A colour or multi-sample page, or an unreadable directory.
pub(super) fn gray_page_size(
    dec: &mut Decoder<BufReader<File>>,
    path: &Path,
) -> Result<(u32, u32), DataError> {
    match dec.colortype().map_err(|e| tiff_err(path, &e))? {
        ColorType::Gray(_) => dec.dimensions().map_err(|e| tiff_err(path, &e)),
        other => Err(DataError::Unsupported {
            path: path.to_owned(),
            what: format!("pixel type {other:?}; expected single-channel grayscale"),
        }),
    }
}

/// Samples in a decoded page.
fn samples(page: &DecodingResult) -> usize {
    match page {
        DecodingResult::U8(v) => v.len(),
        DecodingResult::U16(v) => v.len(),
        DecodingResult::U32(v) => v.len(),
        DecodingResult::U64(v) => v.len(),
        DecodingResult::I8(v) => v.len(),
        DecodingResult::I16(v) => v.len(),
        DecodingResult::I32(v) => v.len(),
        DecodingResult::I64(v) => v.len(),
        DecodingResult::F16(v) => v.len(),
        DecodingResult::F32(v) => v.len(),
        DecodingResult::F64(v) => v.len(),
        #[allow(unreachable_patterns)]
        _ => 0,
    }
}

/// Decodes the decoder's current page, `w` x `h` pixels as [`gray_page_size`] found,
/// checking that it decodes to one sample a pixel (packed 1- or 4-bit pages do not).
///
/// # Errors
/// Decoding errors, or another number of samples.
pub(super) fn read_gray_page(
    dec: &mut Decoder<BufReader<File>>,
    path: &Path,
    (w, h): (u32, u32),
) -> Result<DecodingResult, DataError> {
    let page = dec.read_image().map_err(|e| tiff_err(path, &e))?;
    let n = samples(&page);
    if n != w as usize * h as usize {
        return Err(DataError::Unsupported {
            path: path.to_owned(),
            what: format!("page that decodes to {n} samples for {w} x {h} pixels (packed pixels)"),
        });
    }
    Ok(page)
}

/// The raw pages of a TIFF file, each with its pixel type.
fn read_pages(path: &Path) -> Result<(usize, usize, Vec<DecodingResult>), DataError> {
    let mut dec = open_decoder(path)?;
    let mut pages = Vec::new();
    let mut dims: Option<(u32, u32)> = None;
    loop {
        let (w, h) = gray_page_size(&mut dec, path)?;
        if let Some((w0, h0)) = dims
            && (w, h) != (w0, h0)
        {
            return Err(DataError::SizeMismatch {
                path: path.to_owned(),
                expected: format!("{w0} x {h0} (first page)"),
                found: format!("{w} x {h} (page {})", pages.len()),
            });
        }
        dims = Some((w, h));
        let total = (w as usize) * (h as usize) * (pages.len() + 1);
        if total > MAX_PIXELS {
            return Err(DataError::Unsupported {
                path: path.to_owned(),
                what: format!("image larger than {MAX_PIXELS} pixels"),
            });
        }
        pages.push(read_gray_page(&mut dec, path, (w, h))?);
        if !dec.more_images() {
            break;
        }
        dec.next_image().map_err(|e| tiff_err(path, &e))?;
    }
    let (w, h) = dims.unwrap_or((0, 0));
    Ok((h as usize, w as usize, pages))
}

pub(super) fn page_to_f32(path: &Path, page: DecodingResult) -> Result<Vec<f32>, DataError> {
    Ok(match page {
        DecodingResult::U8(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::U16(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::U32(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::U64(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::I8(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::I16(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::I32(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::I64(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::F16(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::F32(v) => v,
        DecodingResult::F64(v) => v.into_iter().map(|x| x as f32).collect(),
        #[allow(unreachable_patterns)]
        _ => {
            return Err(DataError::Unsupported {
                path: path.to_owned(),
                what: "pixel type".into(),
            });
        }
    })
}

pub(super) fn page_to_labels(path: &Path, page: DecodingResult) -> Result<Vec<u32>, DataError> {
    let neg = || DataError::Unsupported {
        path: path.to_owned(),
        what: "negative or out-of-range label values".into(),
    };
    Ok(match page {
        DecodingResult::U8(v) => v.into_iter().map(u32::from).collect(),
        DecodingResult::U16(v) => v.into_iter().map(u32::from).collect(),
        DecodingResult::U32(v) => v,
        DecodingResult::U64(v) => v
            .into_iter()
            .map(|x| u32::try_from(x).map_err(|_| neg()))
            .collect::<Result<_, _>>()?,
        DecodingResult::I8(v) => v
            .into_iter()
            .map(|x| u32::try_from(x).map_err(|_| neg()))
            .collect::<Result<_, _>>()?,
        DecodingResult::I16(v) => v
            .into_iter()
            .map(|x| u32::try_from(x).map_err(|_| neg()))
            .collect::<Result<_, _>>()?,
        DecodingResult::I32(v) => v
            .into_iter()
            .map(|x| u32::try_from(x).map_err(|_| neg()))
            .collect::<Result<_, _>>()?,
        DecodingResult::I64(v) => v
            .into_iter()
            .map(|x| u32::try_from(x).map_err(|_| neg()))
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(DataError::Unsupported {
                path: path.to_owned(),
                what: "floating-point label image; masks must hold integer labels".into(),
            });
        }
    })
}

/// Reads an intensity image (2D, or 3D from a multi-page file).
///
/// # Errors
/// I/O, TIFF decoding, non-grayscale pixels, or pages of different sizes, naming the file.
pub fn read_image(path: &Path) -> Result<Image, DataError> {
    let (h, w, pages) = read_pages(path)?;
    let depth = pages.len();
    let mut data = Vec::with_capacity(depth * h * w);
    for p in pages {
        data.extend(page_to_f32(path, p)?);
    }
    Ok(Volume {
        depth,
        height: h,
        width: w,
        data,
    })
}

/// Reads a label image.
///
/// # Errors
/// As [`read_image`], plus non-integer or negative labels.
pub fn read_labels(path: &Path) -> Result<Labels, DataError> {
    let (h, w, pages) = read_pages(path)?;
    let depth = pages.len();
    let mut data = Vec::with_capacity(depth * h * w);
    for p in pages {
        data.extend(page_to_labels(path, p)?);
    }
    Ok(Volume {
        depth,
        height: h,
        width: w,
        data,
    })
}

fn write_with<F>(path: &Path, write: F) -> Result<(), DataError>
where
    F: FnOnce(&mut TiffEncoder<BufWriter<File>>) -> Result<(), tiff::TiffError>,
{
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tif.partial");
    let file = File::create(&tmp).map_err(io)?;
    let mut enc = TiffEncoder::new(BufWriter::new(file))
        .map_err(|e| tiff_err(path, &e))?
        .with_compression(Compression::Deflate(DeflateLevel::Balanced));
    write(&mut enc).map_err(|e| tiff_err(path, &e))?;
    drop(enc);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Writes a 16-bit image (one page per plane), Deflate-compressed.
///
/// # Errors
/// I/O or encoding errors.
pub fn write_u16(path: &Path, v: &Volume<u16>) -> Result<(), DataError> {
    write_with(path, |enc| {
        for z in 0..v.depth {
            enc.write_image::<colortype::Gray16>(v.width as u32, v.height as u32, v.plane(z))?;
        }
        Ok(())
    })
}

/// Writes a label image as 16-bit (the CTC convention), or 32-bit if a label exceeds
/// 65535.
///
/// # Errors
/// I/O or encoding errors.
pub fn write_labels(path: &Path, v: &Labels) -> Result<(), DataError> {
    if v.data.iter().all(|&l| l <= u32::from(u16::MAX)) {
        let narrow = Volume {
            depth: v.depth,
            height: v.height,
            width: v.width,
            data: v.data.iter().map(|&l| l as u16).collect(),
        };
        return write_u16(path, &narrow);
    }
    write_with(path, |enc| {
        for z in 0..v.depth {
            enc.write_image::<colortype::Gray32>(v.width as u32, v.height as u32, v.plane(z))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_labels_round_trip_2d_and_3d() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t000.tif");
        let img = Volume {
            depth: 3,
            height: 4,
            width: 5,
            data: (0..60u16).map(|i| i * 1000).collect(),
        };
        write_u16(&p, &img).unwrap();
        let back = read_image(&p).unwrap();
        assert_eq!(back.shape(), (3, 4, 5));
        assert_eq!(back.data[59], 59000.0);
        let labels = Volume::from_2d(2, 2, vec![0, 7, 70000, 1]);
        let q = dir.path().join("mask.tif");
        write_labels(&q, &labels).unwrap();
        assert_eq!(read_labels(&q).unwrap(), labels);
    }

    #[test]
    fn float_masks_and_rgb_images_are_refused_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("float.tif");
        let file = File::create(&p).unwrap();
        let mut enc = TiffEncoder::new(file).unwrap();
        enc.write_image::<colortype::Gray32Float>(2, 1, &[0.5, 1.0])
            .unwrap();
        drop(enc);
        assert_eq!(read_image(&p).unwrap().data, vec![0.5, 1.0]);
        let err = read_labels(&p).unwrap_err().to_string();
        assert!(
            err.contains("float.tif") && err.contains("integer"),
            "{err}"
        );
        let q = dir.path().join("rgb.tif");
        let file = File::create(&q).unwrap();
        let mut enc = TiffEncoder::new(file).unwrap();
        enc.write_image::<colortype::RGB8>(1, 1, &[1, 2, 3])
            .unwrap();
        drop(enc);
        let err = read_image(&q).unwrap_err().to_string();
        assert!(
            err.contains("rgb.tif") && err.contains("grayscale"),
            "{err}"
        );
        let missing = read_image(&dir.path().join("nope.tif"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.tif"), "{missing}");
    }

    #[test]
    fn reads_uint8_and_uncompressed_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u8.tif");
        let file = File::create(&p).unwrap();
        let mut enc = TiffEncoder::new(file).unwrap();
        enc.write_image::<colortype::Gray8>(3, 1, &[0, 128, 255])
            .unwrap();
        drop(enc);
        assert_eq!(read_image(&p).unwrap().data, vec![0.0, 128.0, 255.0]);
        assert_eq!(read_labels(&p).unwrap().data, vec![0, 128, 255]);
    }
}
