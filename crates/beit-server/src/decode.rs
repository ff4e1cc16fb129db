//! Images from request bytes, decoded in memory by the library exactly as `beit classify` decodes files
//! (`beit::processor::load_image_bytes`: the PIL-exact JPEG decoder, EXIF orientation, RGB as PIL's
//! `convert("RGB")`), with the pixel limit checked from the header before any pixel is decoded.

use beit::processor::{load_image_bytes, ProcessorError};
use beit::BeitError;
use image::RgbImage;

/// What the library's messages call a request's image.
pub const IMAGE_NAME: &str = "request body";

/// Decodes an image (format sniffed from the bytes, first frame), turns it upright by its EXIF orientation and
/// converts it to RGB as transformers' `load_image` does, refusing images with more than `max_pixels` pixels
/// before decoding. Errors are the library's, naming the image [`IMAGE_NAME`]; [`crate::ApiError::from_beit`]
/// answers them.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, BeitError> {
    let decode_error = |message: &str| ProcessorError::Decode { path: IMAGE_NAME.into(), message: message.into() };
    if bytes.is_empty() {
        return Err(decode_error("no bytes: the request has no image").into());
    }
    // The image decoders are not expected to panic on bad input; if one does, the request fails, not the server.
    std::panic::catch_unwind(|| load_image_bytes(bytes, Some(max_pixels), IMAGE_NAME))
        .unwrap_or_else(|_| Err(decode_error("the decoder failed")))
        .map_err(BeitError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ApiError, ErrorType, RequestId};
    use std::io::Cursor;
    use std::path::{Path, PathBuf};

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

    /// The answer a request with these bytes gets.
    fn answer(bytes: &[u8], max_pixels: u64) -> ApiError {
        ApiError::from_beit(&decode_rgb(bytes, max_pixels).unwrap_err(), &RequestId::new())
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let e = answer(&png(20, 20), 399);
        assert_eq!(e.kind, ErrorType::ImageTooLarge, "{e}");
        assert!(e.message.contains("20x20 = 400 pixels"), "{e}");
        assert!(e.message.contains("--max-image-pixels"), "{e}");
        // A header claiming a huge image with no pixel data behind it: refused before any allocation.
        let mut bytes = png(1, 1);
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let e = answer(&bytes, 1_000_000);
        assert!(matches!(e.kind, ErrorType::ImageTooLarge | ErrorType::InvalidImage), "{e}");
    }

    #[test]
    fn garbage_truncated_and_empty_are_invalid_images() {
        for bytes in [b"not an image at all".to_vec(), png(8, 8)[..40].to_vec(), Vec::new(), vec![0xFF, 0xD8, 0xFF]] {
            let e = answer(&bytes, 1 << 20);
            assert_eq!((e.kind, e.status().as_u16()), (ErrorType::InvalidImage, 400), "{e}");
        }
        // The library's message, naming the request's image.
        let e = answer(b"not an image at all", 1 << 20);
        assert!(
            e.message.starts_with("request body: cannot decode image: ") && e.message.contains("unrecognized format"),
            "{e}"
        );
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures/processor").join(name)
    }

    /// Same pixels as `beit classify` gets from the file, JPEGs (PIL-exact decoder) and oriented images included.
    #[test]
    fn same_pixels_as_the_library_for_files() {
        for name in [
            "images/chelsea.png",
            "images/gray16.png",
            "images/rgba.png",
            "images/palette.png",
            "images/chelsea_q90_444.jpg",
            "images/coffee_q90.jpg",
            "jpeg/progressive_420_restart.jpg",
            "exif/jpeg_o6.jpg",
            "exif/png_o5.png",
            "exif/webp_o6.webp",
        ] {
            let bytes = std::fs::read(fixture(name)).unwrap();
            let ours = decode_rgb(&bytes, 1 << 26).unwrap();
            let lib = beit::processor::load_image(fixture(name)).unwrap();
            assert!(ours == lib, "{name}: pixels differ from beit::processor::load_image");
        }
        let upright = decode_rgb(&std::fs::read(fixture("exif/jpeg_o6.jpg")).unwrap(), 1 << 26).unwrap();
        assert_eq!(upright.dimensions(), (64, 48), "the file stores the 64x48 image sideways, as 48x64");
    }
}
