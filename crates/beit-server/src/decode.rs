//! Images from request bytes, decoded as `beit classify` decodes files, with the pixel limit checked from the
//! header before any pixel is decoded.
//!
//! The library decodes from a path only (`beit::processor::decode_image`), and its JPEG decoder — bit-exact with
//! PIL's libjpeg-turbo, unlike the `image` crate's — is private. So JPEG bytes go through a short-lived temporary
//! file and `decode_image`: the server then answers exactly what `beit classify` prints for the same file. Every
//! other format is decoded in memory with the `image` crate, the same calls `decode_image` makes for them. If no
//! temporary file can be written, JPEGs fall back to the `image` crate in memory (values may then differ from
//! PIL's by a few levels on 4:2:0 files), with a warning.

use std::fs::{File, OpenOptions};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use beit::processor::{decode_image, to_rgb_like_pil, ProcessorError};
use image::{DynamicImage, ImageDecoder, RgbImage};

use crate::error::{ApiError, ErrorType};

/// Decodes an image (format sniffed from the bytes, first frame, no EXIF rotation) to RGB as PIL's
/// `Image.open(...).convert("RGB")` does, refusing images with more than `max_pixels` pixels before decoding.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::new(ErrorType::InvalidImage, "the request has no image bytes"));
    }
    // The image decoders are not expected to panic on bad input; if one does, the request fails, not the server.
    let decoded = std::panic::catch_unwind(|| {
        if bytes.starts_with(&[0xFF, 0xD8]) {
            if let Some(r) = decode_jpeg_via_file(bytes, max_pixels) {
                return r;
            }
        }
        decode_in_memory(bytes, max_pixels)
    })
    .unwrap_or_else(|_| Err(ApiError::new(ErrorType::InvalidImage, "cannot decode image: the decoder failed")))?;
    Ok(to_rgb_like_pil(&decoded))
}

fn too_many(width: u32, height: u32, limit: u64) -> ApiError {
    ApiError::new(
        ErrorType::ImageTooLarge,
        format!(
            "image is {width}x{height} = {} pixels, more than the server's limit of {limit} (--max-image-pixels)",
            width as u64 * height as u64
        ),
    )
}

fn corrupt(message: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorType::InvalidImage, format!("cannot decode image: {message}"))
}

/// The same steps as `decode_image` takes for non-JPEG files, on bytes in memory.
pub fn decode_in_memory(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, ApiError> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(corrupt)?;
    if reader.format().is_none() {
        return Err(ApiError::new(
            ErrorType::InvalidImage,
            "cannot decode image: unrecognized format (expected PNG, JPEG, WebP, BMP, TIFF or GIF)",
        ));
    }
    let mut limits = image::Limits::default();
    // Room for the largest allowed image in 16-bit RGBA; the pixel check below is the real limit.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(512 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    if width as u64 * height as u64 > max_pixels {
        return Err(too_many(width, height, max_pixels));
    }
    DynamicImage::from_decoder(decoder).map_err(corrupt)
}

static SEQ: AtomicU64 = AtomicU64::new(0);
static WARNED: AtomicBool = AtomicBool::new(false);

/// Removes the temporary file when the decode is over, whatever happened.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        // ok to ignore: the file may already be gone; a leftover in the temp directory harms nothing.
        let _ = std::fs::remove_file(&self.0);
    }
}

fn create_temp(dir: &Path) -> std::io::Result<(File, TempFile)> {
    loop {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("beit-serve-{}-{n}.jpg", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((f, TempFile(path))),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `decode_image` on a temporary copy of the bytes; `None` when the file cannot be written.
fn decode_jpeg_via_file(bytes: &[u8], max_pixels: u64) -> Option<Result<DynamicImage, ApiError>> {
    let written = create_temp(&std::env::temp_dir()).and_then(|(mut f, guard)| {
        f.write_all(bytes)?;
        Ok(guard)
    });
    let guard = match written {
        Ok(g) => g,
        Err(e) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "cannot write a temporary file for JPEG decoding ({e}); decoding JPEGs with the image crate, \
                     whose values can differ from PIL's"
                );
            }
            return None;
        }
    };
    Some(decode_image(&guard.0, Some(max_pixels)).map_err(|e| match e {
        ProcessorError::TooManyPixels { width, height, limit, .. } => too_many(width, height, limit),
        // The messages name the temporary file: keep only what they say about the image.
        ProcessorError::Decode { message, .. } => corrupt(message),
        ProcessorError::Io { source, .. } => corrupt(source),
        other => corrupt(other.to_string().replace(&guard.0.display().to_string(), "image")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn png_roundtrip() {
        let img = decode_rgb(&png(5, 3), 100).unwrap();
        assert_eq!(img.dimensions(), (5, 3));
        assert_eq!(img.get_pixel(4, 2).0, [4, 2, 7]);
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let e = decode_rgb(&png(20, 20), 399).unwrap_err();
        assert_eq!(e.kind, ErrorType::ImageTooLarge, "{e}");
        assert!(e.message.contains("20x20 = 400 pixels"), "{e}");
        // A header claiming a huge image with no pixel data behind it: refused before any allocation.
        let mut bytes = png(1, 1);
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let e = decode_rgb(&bytes, 1_000_000).unwrap_err();
        assert!(matches!(e.kind, ErrorType::ImageTooLarge | ErrorType::InvalidImage), "{e}");
    }

    #[test]
    fn garbage_truncated_and_empty_are_invalid_images() {
        for bytes in [b"not an image at all".to_vec(), png(8, 8)[..40].to_vec(), Vec::new(), vec![0xFF, 0xD8, 0xFF]] {
            let e = decode_rgb(&bytes, 1 << 20).unwrap_err();
            assert_eq!(e.kind, ErrorType::InvalidImage, "{e}");
            assert!(!e.message.contains("beit-serve-"), "the temp file leaks into {e}");
        }
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures/processor/images").join(name)
    }

    #[test]
    fn same_pixels_as_the_library_for_files() {
        for name in ["chelsea.png", "gray16.png", "rgba.png", "palette.png", "chelsea_q90_444.jpg", "coffee_q90.jpg"] {
            let bytes = std::fs::read(fixture(name)).unwrap();
            let ours = decode_rgb(&bytes, 1 << 26).unwrap();
            let lib = beit::processor::load_image(fixture(name)).unwrap();
            assert!(ours == lib, "{name}: pixels differ from beit::processor::load_image");
        }
    }
}
