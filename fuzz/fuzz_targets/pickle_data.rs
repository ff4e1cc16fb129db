//! The pickle interpreter itself: the input is `archive/data.pkl`, wrapped here into a valid (stored, CRC-correct)
//! zip archive next to a few storage entries, so mutations reach the opcode machine instead of failing the zip CRC.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::path::Path;

fn archive(pkl: &[u8]) -> Option<Vec<u8>> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts).ok()?;
    w.write_all(pkl).ok()?;
    w.start_file("archive/byteorder", opts).ok()?;
    w.write_all(b"little").ok()?;
    // Storage keys "0".."3" with 64 bytes each: enough for small tensors of every dtype.
    for k in 0..4 {
        w.start_file(format!("archive/data/{k}"), opts).ok()?;
        w.write_all(&[k as u8; 64]).ok()?;
    }
    Some(w.finish().ok()?.into_inner())
}

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = archive(data) {
        let _ = beit::checkpoint::pickle::read_torch_checkpoint_bytes(
            Path::new("fuzz.bin"),
            &bytes,
            &["fuzz.Module", "dall_e.*"],
        );
    }
});
