//! Images from files and bytes: decoding (format sniffed from the content, first frame), Pillow's
//! decompression-bomb limit checked from the header before any pixel is decoded, EXIF orientation and
//! RGB conversion as transformers' `load_image` does them (`PIL.ImageOps.exif_transpose(image)`, then
//! `image.convert("RGB")`), and segmentation maps as `np.array(PIL.Image.open(...))` sees them.
//!
//! Baseline and progressive JPEGs go through a decoder that is bit-exact with PIL's libjpeg-turbo; other
//! formats (and JPEG features it does not cover, e.g. arithmetic coding) through the `image` crate.

use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageBuffer, ImageDecoder, ImageFormat, Luma, RgbImage};

use super::{exif, input_err, jpeg, ProcessorError, Result};

/// Pillow refuses to open images above `2 * Image.MAX_IMAGE_PIXELS` (a `DecompressionBombError`).
pub const PIL_MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// RGB conversion with the results PIL's `Image.open(...).convert("RGB")` gives for the modes its
/// decoders produce: gray is replicated, alpha is dropped (not composited), 16-bit grayscale
/// (PIL mode `I;16`) is clipped to 255, 16-bit RGB(A) and gray+alpha keep the high byte.
pub fn to_rgb_like_pil(img: &DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let gray = |v: Vec<u8>| {
        RgbImage::from_fn(w, h, |x, y| {
            let g = v[y as usize * w as usize + x as usize];
            image::Rgb([g, g, g])
        })
    };
    match img {
        DynamicImage::ImageRgb8(i) => i.clone(),
        DynamicImage::ImageLuma8(i) => gray(i.as_raw().clone()),
        DynamicImage::ImageLumaA8(i) => gray(i.pixels().map(|p| p.0[0]).collect()),
        DynamicImage::ImageLuma16(i) => gray(i.pixels().map(|p| p.0[0].min(255) as u8).collect()),
        DynamicImage::ImageLumaA16(i) => gray(i.pixels().map(|p| (p.0[0] >> 8) as u8).collect()),
        DynamicImage::ImageRgba8(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([p[0], p[1], p[2]])
        }),
        DynamicImage::ImageRgb16(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
        }),
        DynamicImage::ImageRgba16(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
        }),
        other => other.to_rgb8(), // float images: the image crate's conversion
    }
}

/// A decoded image, as `PIL.Image.open` gives it, and the orientation `exif_transpose` would still apply.
struct Decoded {
    image: DynamicImage,
    orientation: Orientation,
}

fn read(path: &Path) -> Result<(Vec<u8>, String)> {
    let name = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => Ok((bytes, name)),
        Err(source) => Err(ProcessorError::Io { path: name, source }),
    }
}

/// Decodes `bytes` (named `name` in errors), refusing images above `max_pixels` from the header.
fn decode(bytes: &[u8], max_pixels: Option<u64>, name: &str) -> Result<Decoded> {
    let too_many = |width: u32, height: u32, limit: u64| ProcessorError::TooManyPixels {
        path: name.to_string(),
        width,
        height,
        pixels: width as u64 * height as u64,
        limit,
    };
    let dec_err = |message: String| ProcessorError::Decode { path: name.to_string(), message };
    // A JPEG's orientation comes from its APP1 segments, whichever decoder reads the pixels.
    let jpeg_orientation = bytes.starts_with(&[0xFF, 0xD8]).then(|| exif::jpeg_orientation(bytes));
    if let Some(orientation) = jpeg_orientation {
        match jpeg::decode(bytes, max_pixels) {
            Ok(Some(d)) => {
                let image = match d.channels {
                    1 => GrayImage::from_raw(d.width, d.height, d.pixels).map(DynamicImage::ImageLuma8),
                    _ => RgbImage::from_raw(d.width, d.height, d.pixels).map(DynamicImage::ImageRgb8),
                };
                let image = image.ok_or_else(|| dec_err("inconsistent JPEG buffer".into()))?;
                return Ok(Decoded { image, orientation });
            }
            Ok(None) => {} // a JPEG feature left to the `image` crate
            Err(jpeg::JpegError::TooManyPixels { width, height }) => {
                return Err(too_many(width, height, max_pixels.unwrap_or(0)))
            }
            Err(jpeg::JpegError::Corrupt(message)) => return Err(dec_err(message)),
        }
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| ProcessorError::Io { path: name.to_string(), source })?;
    let Some(format) = reader.format() else {
        return Err(dec_err("unrecognized format (expected PNG, JPEG, WebP, BMP, TIFF or GIF)".into()));
    };
    let mut limits = image::Limits::default();
    // Room for the largest allowed image in 16-bit RGBA; the pixel check below is the real limit.
    limits.max_alloc = max_pixels.map(|m| m.saturating_mul(8).max(512 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| dec_err(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if let Some(limit) = max_pixels {
        if width as u64 * height as u64 > limit {
            return Err(too_many(width, height, limit));
        }
    }
    // PIL's TIFF plugin applies the IFD0 orientation itself when loading (`TiffImageFile.load_end`), so
    // even `Image.open` sees a TIFF upright; for other formats it is left to `exif_transpose`.
    let (on_open, orientation) = match (jpeg_orientation, format) {
        (Some(o), _) => (Orientation::NoTransforms, o),
        (None, ImageFormat::Tiff) => {
            (decoder.orientation().unwrap_or(Orientation::NoTransforms), Orientation::NoTransforms)
        }
        (None, _) => (Orientation::NoTransforms, exif::decoder_orientation(&mut decoder)),
    };
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| dec_err(e.to_string()))?;
    image.apply_orientation(on_open);
    Ok(Decoded { image, orientation })
}

/// Decodes an image from bytes as `PIL.Image.open` does (format sniffed from the content, first frame;
/// no EXIF orientation applied, except TIFF's, which PIL's TIFF plugin applies on load), refusing
/// images above `max_pixels` (`None`: no limit) from the header, before any pixel is decoded. Errors
/// name the bytes `name` (a file name, "request body", ...).
pub fn decode_image_bytes(bytes: &[u8], max_pixels: Option<u64>, name: &str) -> Result<DynamicImage> {
    Ok(decode(bytes, max_pixels, name)?.image)
}

/// [`decode_image_bytes`] on a file's content; errors name the file.
pub fn decode_image(path: impl AsRef<Path>, max_pixels: Option<u64>) -> Result<DynamicImage> {
    let (bytes, name) = read(path.as_ref())?;
    decode_image_bytes(&bytes, max_pixels, &name)
}

/// Loads an image from bytes as transformers' `load_image` does: decoded, turned upright by its EXIF
/// (or XMP) orientation as `PIL.ImageOps.exif_transpose`, and converted to RGB as `convert("RGB")`.
/// `max_pixels` (`None`: no limit) is checked from the header; errors name the bytes `name`.
pub fn load_image_bytes(bytes: &[u8], max_pixels: Option<u64>, name: &str) -> Result<RgbImage> {
    let Decoded { mut image, orientation } = decode(bytes, max_pixels, name)?;
    // A transpose commutes with the per-pixel RGB conversion; PIL transposes first.
    image.apply_orientation(orientation);
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => to_rgb_like_pil(&other),
    })
}

/// Loads an image file as transformers' `load_image` does (see [`load_image_bytes`]), with Pillow's
/// decompression-bomb limit.
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    load_image_with_limit(path, Some(PIL_MAX_IMAGE_PIXELS))
}

/// [`load_image`] with a configurable pixel limit (`None`: no limit).
pub fn load_image_with_limit(path: impl AsRef<Path>, max_pixels: Option<u64>) -> Result<RgbImage> {
    let (bytes, name) = read(path.as_ref())?;
    load_image_bytes(&bytes, max_pixels, &name)
}

/// A label map of 16-bit ids, as `np.array(PIL.Image.open(...))` gives it.
pub type LabelMap = ImageBuffer<Luma<u16>, Vec<u16>>;

/// Decodes a label map from bytes as `np.array(PIL.Image.open(...))` sees it: one channel of class ids. A PNG is
/// read without expansion (as Pillow opens it): a palette PNG gives its indices (mode "P", as Pascal VOC's masks),
/// 8- and 16-bit gray their values, 1-bit gray 0/1 (mode "1") and 2- or 4-bit gray values widened to 0..255 (mode
/// "L"); a transparency chunk is ignored. Other formats must decode to 8- or 16-bit gray. Anything with colour
/// channels is refused: its colours are not ids. Errors name `name`.
pub fn decode_label_map(bytes: &[u8], name: &str) -> Result<LabelMap> {
    let what = || format!("{name}: segmentation map");
    let one_channel = "one channel of class ids (8- or 16-bit gray, or a palette PNG)";
    if !bytes.starts_with(b"\x89PNG") {
        return match decode_image_bytes(bytes, Some(PIL_MAX_IMAGE_PIXELS), name)? {
            DynamicImage::ImageLuma8(g) => {
                let (w, h) = g.dimensions();
                LabelMap::from_raw(w, h, g.into_raw().into_iter().map(u16::from).collect())
                    .ok_or_else(|| input_err(what(), "a consistent buffer", "a short one"))
            }
            DynamicImage::ImageLuma16(g) => Ok(g),
            other => Err(input_err(what(), one_channel, format!("{:?}", other.color()))),
        };
    }
    let dec_err = |e: png::DecodingError| ProcessorError::Decode { path: name.to_string(), message: e.to_string() };
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(dec_err)?;
    let (w, h) = (reader.info().width, reader.info().height);
    let pixels = w as u64 * h as u64;
    if pixels > PIL_MAX_IMAGE_PIXELS {
        return Err(ProcessorError::TooManyPixels {
            path: name.to_string(),
            width: w,
            height: h,
            pixels,
            limit: PIL_MAX_IMAGE_PIXELS,
        });
    }
    let (color, _) = reader.output_color_type();
    if !matches!(color, png::ColorType::Grayscale | png::ColorType::Indexed) {
        return Err(input_err(what(), one_channel, format!("a {color:?} PNG")));
    }
    let size = reader.output_buffer_size().ok_or_else(|| input_err(what(), "a decodable size", "too large"))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(dec_err)?;
    let bits = info.bit_depth as usize;
    let (wu, hu) = (w as usize, h as usize);
    let mut out = Vec::with_capacity(wu * hu);
    for line in buf.chunks_exact(info.line_size).take(hu) {
        for x in 0..wu {
            out.push(match bits {
                16 => u16::from_be_bytes([line[2 * x], line[2 * x + 1]]),
                8 => line[x] as u16,
                _ => {
                    let per = 8 / bits;
                    let raw = (line[x / per] >> (8 - bits * (x % per + 1))) & ((1u8 << bits) - 1);
                    match (color, bits) {
                        (png::ColorType::Indexed, _) | (_, 1) => raw as u16,
                        _ => (raw as u16 * 255) / ((1u16 << bits) - 1),
                    }
                }
            });
        }
    }
    LabelMap::from_raw(w, h, out).ok_or_else(|| input_err(what(), "a consistent buffer", "a short one"))
}

/// Loads a label map from bytes as `np.array(PIL.Image.open(...))` sees it ([`decode_label_map`]), with values up
/// to 255 (the processor's labels are 8-bit). No EXIF orientation is applied (transformers passes segmentation
/// maps through as given), except TIFF's, which PIL applies on load.
pub fn load_segmentation_map_bytes(bytes: &[u8], name: &str) -> Result<GrayImage> {
    let map = decode_label_map(bytes, name)?;
    let (w, h) = map.dimensions();
    let max = map.pixels().map(|p| p.0[0]).max().unwrap_or(0);
    if max > 255 {
        let what = format!("{name}: segmentation map");
        return Err(input_err(what, "label values up to 255", format!("a 16-bit value of {max}")));
    }
    let data = map.into_raw().into_iter().map(|v| v as u8).collect();
    GrayImage::from_raw(w, h, data)
        .ok_or_else(|| input_err(format!("{name}: segmentation map"), "a consistent buffer", "a short one"))
}

/// [`load_segmentation_map_bytes`] on a file's content; errors name the file.
pub fn load_segmentation_map(path: impl AsRef<Path>) -> Result<GrayImage> {
    let (bytes, name) = read(path.as_ref())?;
    load_segmentation_map_bytes(&bytes, &name)
}

#[cfg(test)]
mod tests {
    use super::super::test_fixtures::{json, manifest, npy_f32, npy_i64, FIXTURES};
    use super::super::BeitImageProcessor;
    use super::*;

    /// JPEG decoding against PIL's `convert("RGB")`: baseline/progressive, restarts, subsamplings
    /// 4:4:4 to 4:1:1 and mixed, separate scans, Adobe RGB, gray.
    #[test]
    fn jpeg_decoding_matches_pil() {
        for case in manifest()["jpeg_cases"].as_array().unwrap() {
            let ours = load_image(format!("{FIXTURES}{}", case["jpeg"].as_str().unwrap())).unwrap();
            let theirs = image::open(format!("{FIXTURES}{}", case["expected"].as_str().unwrap())).unwrap().to_rgb8();
            assert_eq!(ours.dimensions(), theirs.dimensions(), "{case}");
            let d = ours.as_raw().iter().zip(theirs.as_raw()).filter(|(a, b)| a != b).count();
            println!("jpeg {}: {d} of {} values differ", case["jpeg"], theirs.as_raw().len());
            assert_eq!(d, 0, "{case}");
        }
    }

    #[test]
    fn loading_refuses_bad_files_without_panicking() {
        let dir = std::env::temp_dir().join(format!("beit-processor-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = std::fs::read(format!("{FIXTURES}images/astronaut.png")).unwrap();
        for (name, bytes) in
            [("truncated.png", &png[..png.len() / 2]), ("garbage.png", b"not an image".as_slice()), ("empty.jpg", b"")]
        {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = load_image(&p).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
            let e = load_image_bytes(bytes, None, "request body").unwrap_err();
            assert!(matches!(e, ProcessorError::Decode { .. }) && e.to_string().contains("request body"), "{e}");
        }
        let e = load_image(dir.join("missing.png")).unwrap_err();
        assert!(matches!(e, ProcessorError::Io { .. }), "{e}");
        let e = load_image_with_limit(format!("{FIXTURES}images/astronaut.png"), Some(256 * 256 - 1)).unwrap_err();
        assert!(matches!(e, ProcessorError::TooManyPixels { pixels: 65536, .. }), "{e}");
        let e = load_image_bytes(&png, Some(256 * 256 - 1), "upload").unwrap_err();
        assert!(matches!(&e, ProcessorError::TooManyPixels { path, .. } if path == "upload"), "{e}");
        assert!(load_image_with_limit(format!("{FIXTURES}images/astronaut.png"), Some(256 * 256)).is_ok());
        assert!(load_segmentation_map(format!("{FIXTURES}images/astronaut.png")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bytes_and_paths_load_the_same() {
        for name in ["chelsea.png", "gray16.png", "palette.png", "coffee_q90.jpg", "label.png"] {
            let path = format!("{FIXTURES}images/{name}");
            let bytes = std::fs::read(&path).unwrap();
            assert!(load_image_bytes(&bytes, None, name).unwrap() == load_image(&path).unwrap(), "{name}");
            assert!(decode_image_bytes(&bytes, None, name).unwrap() == decode_image(&path, None).unwrap(), "{name}");
        }
        let label = std::fs::read(format!("{FIXTURES}images/label.png")).unwrap();
        assert!(
            load_segmentation_map_bytes(&label, "label").unwrap()
                == load_segmentation_map(format!("{FIXTURES}images/label.png")).unwrap()
        );
    }

    /// Images stored sideways with an orientation tag (JPEG APP1, PNG eXIf, lossless WebP, TIFF), against
    /// transformers' `load_image` (uint8 RGB) and `load_image` + `BeitImageProcessor` (pixel values), exactly.
    #[test]
    fn exif_orientation_matches_transformers() {
        let m = json("exif/manifest.json");
        let proc = BeitImageProcessor::from_json_file(format!("{FIXTURES}{}", m["config"].as_str().unwrap())).unwrap();
        for case in m["cases"].as_array().unwrap() {
            let path = format!("{FIXTURES}{}", case["image"].as_str().unwrap());
            let ours = load_image(&path).unwrap();
            let theirs = image::open(format!("{FIXTURES}{}", case["rgb"].as_str().unwrap())).unwrap().to_rgb8();
            assert_eq!(ours.dimensions(), theirs.dimensions(), "{case}");
            assert!(ours == theirs, "{case}: pixels differ from transformers' load_image");
            let (shape, want) = npy_f32(case["pixel_values"].as_str().unwrap());
            let got = proc.preprocess_rgb(&[ours]).unwrap();
            assert_eq!(got.shape.to_vec(), shape, "{case}");
            assert!(got.data.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{case}");
        }
        // Segmentation maps are not transposed (transformers passes them through as given).
        for case in m["label_cases"].as_array().unwrap() {
            let map = load_segmentation_map(format!("{FIXTURES}{}", case["map"].as_str().unwrap())).unwrap();
            let (shape, want) = npy_i64(case["labels"].as_str().unwrap());
            let got = proc.preprocess_segmentation_maps(&[map]).unwrap();
            assert_eq!((got.shape.to_vec(), got.data), (shape, want), "{case}");
        }
    }
}
