//! An image file through the processor's decoder (our baseline JPEG decoder, else the `image` crate) with the
//! default pixel limit, then the RGB conversion. The decoder takes a path, so each input is written to one
//! per-process file (in /dev/shm when it exists).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        dir.join(format!("beit-fuzz-image-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let p = scratch();
    if std::fs::write(p, data).is_ok() {
        // A lower limit than Pillow's keeps each run fast; the check is the same code.
        let _ = beit::processor::load_image_with_limit(p, Some(1 << 22));
    }
});
