//! The orientation an image's metadata declares, found where Pillow 13's `Image.getexif()` finds it for
//! `ImageOps.exif_transpose`: the EXIF Orientation tag (JPEG APP1 "Exif", PNG eXIf, WebP EXIF; TIFF's own
//! IFD0 tag is read by the TIFF decoder) and, where the EXIF block has none, `tiff:Orientation` in the XMP
//! packet. Values outside 2-8 leave the image as stored, as there. The tag itself is parsed by the `image`
//! crate (`Orientation::from_exif_chunk`); what is here is only where PIL looks for it.

use image::metadata::Orientation;
use image::ImageDecoder;

const EXIF_HEADER: &[u8] = b"Exif\0\0";
const XMP_HEADER: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// The orientation tag of an EXIF block: a TIFF structure, after up to two "Exif\0\0" headers (PIL strips
/// them, and some PNG writers keep one in eXIf).
fn from_exif(mut block: &[u8]) -> Option<Orientation> {
    for _ in 0..2 {
        block = block.strip_prefix(EXIF_HEADER).unwrap_or(block);
    }
    Orientation::from_exif_chunk(block)
}

/// PIL's `re.search(r'tiff:Orientation(="|>)([0-9])', xmp)`: the first digit after an attribute or an
/// element of that name.
fn from_xmp(xmp: &[u8]) -> Option<Orientation> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut rest = xmp;
    while let Some(i) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[i + KEY.len()..];
        if let [b'=', b'"', d, ..] | [b'>', d, ..] = rest {
            if d.is_ascii_digit() {
                return Orientation::from_exif(d - b'0');
            }
        }
    }
    None
}

/// EXIF first, XMP only when the EXIF block has no (valid) orientation.
fn resolve(exif: Option<&[u8]>, xmp: impl FnOnce() -> Option<Orientation>) -> Orientation {
    exif.and_then(from_exif).or_else(xmp).unwrap_or(Orientation::NoTransforms)
}

/// A JPEG's orientation, from the APP1 segments before the first scan as PIL's JpegImagePlugin reads
/// them: the EXIF block is the first "Exif" segment with any later ones appended (without their header),
/// the XMP packet the last one. A malformed header ends the search: the decoder reports it.
pub(super) fn jpeg_orientation(d: &[u8]) -> Orientation {
    let (mut exif, mut xmp) = (None::<Vec<u8>>, None::<&[u8]>);
    let mut pos = 2; // after SOI
    while pos + 1 < d.len() {
        let marker = d[pos + 1];
        match (d[pos], marker) {
            (0xFF, 0xFF) | (0x00..=0xFE, _) => pos += 1, // fill bytes and junk between segments
            (_, 0x00 | 0x01 | 0xD0..=0xD8) => pos += 2,  // no length field
            (_, 0xD9 | 0xDA) => break,                   // end of image, start of scan
            (_, _) => {
                let Some(&[hi, lo]) = d.get(pos + 2..pos + 4) else { break };
                let len = u16::from_be_bytes([hi, lo]) as usize;
                let Some(seg) = d.get(pos + 4..pos + 2 + len.max(2)) else { break };
                if marker == 0xE1 {
                    if let Some(body) = seg.strip_prefix(EXIF_HEADER) {
                        match &mut exif {
                            Some(block) => block.extend_from_slice(body),
                            None => exif = Some(seg.to_vec()),
                        }
                    } else if let Some(packet) = seg.strip_prefix(XMP_HEADER) {
                        xmp = Some(packet);
                    }
                }
                pos += 2 + len.max(2);
            }
        }
    }
    resolve(exif.as_deref(), || xmp.and_then(from_xmp))
}

/// The orientation of an image the `image` crate decodes (PNG eXIf, WebP EXIF, and XMP in PNG iTXt, WebP
/// and GIF). Metadata that cannot be read leaves the image as stored, as an unreadable EXIF block does in PIL.
pub(super) fn decoder_orientation(decoder: &mut impl ImageDecoder) -> Orientation {
    let exif = decoder.exif_metadata().ok().flatten();
    resolve(exif.as_deref(), || decoder.xmp_metadata().ok().flatten().as_deref().and_then(from_xmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little- or big-endian EXIF block with one IFD0 entry: Orientation (SHORT) = `value`.
    fn exif_block(value: u16, big_endian: bool) -> Vec<u8> {
        let (u16b, u32b): (fn(u16) -> [u8; 2], fn(u32) -> [u8; 4]) =
            if big_endian { (u16::to_be_bytes, u32::to_be_bytes) } else { (u16::to_le_bytes, u32::to_le_bytes) };
        let mut b = EXIF_HEADER.to_vec();
        b.extend_from_slice(if big_endian { b"MM" } else { b"II" });
        b.extend(u16b(42));
        b.extend(u32b(8));
        b.extend(u16b(1));
        b.extend(u16b(0x112));
        b.extend(u16b(3));
        b.extend(u32b(1));
        b.extend(u16b(value));
        b.extend([0, 0]);
        b.extend(u32b(0));
        b
    }

    fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
        let mut s = vec![0xFF, marker];
        s.extend(((body.len() + 2) as u16).to_be_bytes());
        s.extend_from_slice(body);
        s
    }

    fn jpeg(segments: &[Vec<u8>]) -> Vec<u8> {
        let mut d = vec![0xFF, 0xD8];
        segments.iter().for_each(|s| d.extend_from_slice(s));
        d.extend([0xFF, 0xDA, 0, 2, 0xFF, 0xD9]);
        d
    }

    #[test]
    fn exif_and_xmp_in_jpeg_headers() {
        let jfif = segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        for (value, want) in [(6, Orientation::Rotate90), (8, Orientation::Rotate270), (2, Orientation::FlipHorizontal)]
        {
            for be in [false, true] {
                let d = jpeg(&[jfif.clone(), segment(0xE1, &exif_block(value, be))]);
                assert_eq!(jpeg_orientation(&d), want, "{value} {be}");
            }
        }
        // Fill bytes and junk between segments are skipped; after the first scan nothing is read.
        let mut d = jpeg(&[jfif.clone()]);
        d.splice(2..2, [0x12, 0xFF, 0xFF]);
        d.splice(d.len() - 2..d.len() - 2, segment(0xE1, &exif_block(6, false)));
        assert_eq!(jpeg_orientation(&d), Orientation::NoTransforms);
        let d = jpeg(&[segment(0xE1, &exif_block(3, false))]);
        assert_eq!(jpeg_orientation(&[&[0xFF, 0xD8, 0xFF, 0xFF, 0x00], &d[2..]].concat()), Orientation::Rotate180);
        // XMP only counts when EXIF has no orientation; the last XMP packet wins.
        let xmp = |v: &str| segment(0xE1, &[XMP_HEADER, v.as_bytes()].concat());
        let d = jpeg(&[xmp(r#"<x tiff:Orientation="8"/>"#), xmp("<tiff:Orientation>5</tiff:Orientation>")]);
        assert_eq!(jpeg_orientation(&d), Orientation::Rotate90FlipH);
        let d = jpeg(&[segment(0xE1, &exif_block(1, false)), xmp(r#"tiff:Orientation="6""#)]);
        assert_eq!(jpeg_orientation(&d), Orientation::NoTransforms);
        // Truncated or bogus headers: no orientation, no panic.
        for d in
            [&[0xFF, 0xD8][..], &[0xFF, 0xD8, 0xFF], &[0xFF, 0xD8, 0xFF, 0xE1, 0xFF], &[0xFF, 0xD8, 0xFF, 0xE1, 0, 0]]
        {
            assert_eq!(jpeg_orientation(d), Orientation::NoTransforms);
        }
    }

    #[test]
    fn exif_blocks_and_xmp_packets() {
        let block = exif_block(7, true);
        assert_eq!(from_exif(&block), Some(Orientation::Rotate270FlipH));
        assert_eq!(from_exif(&block[6..]), Some(Orientation::Rotate270FlipH));
        assert_eq!(from_exif(&[EXIF_HEADER, &block].concat()), Some(Orientation::Rotate270FlipH));
        assert_eq!(from_exif(&exif_block(0, false)), None);
        assert_eq!(from_exif(b"Exif\0\0garbage"), None);
        assert_eq!(from_xmp(br#"tiff:Orientation tiff:Orientation="4""#), Some(Orientation::FlipVertical));
        assert_eq!(from_xmp(br#"tiff:Orientation='4'"#), None);
        assert_eq!(from_xmp(b"tiff:Orientation>"), None);
    }
}
