//! Times the image front end alone on a folder of images (read into memory first, so disk is not timed):
//! decoding as `load_image` does (JPEG, EXIF, RGB), decoding + a Pillow-exact bicubic resize to SIZE x SIZE,
//! both on one core (images/s per core), and the same through the threaded loader (all cores).
//!
//! ```sh
//! cargo run --release -p beit --example frontend -- /work/logs/photos [SIZE]
//! ```
//! `BEIT_CPU=portable` runs the portable kernels.

use std::time::Instant;

use beit::processor::loader::{load_ordered, ImageSource, LoaderOptions};
use beit::processor::resample::{resize, Filter};
use beit::processor::{load_image_bytes, PIL_MAX_IMAGE_PIXELS};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or("usage: frontend DIR [SIZE]")?;
    let size: usize = args.get(2).map_or(Ok(224), |s| s.parse())?;
    let mut files: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let sources: Vec<ImageSource> = files
        .iter()
        .map(|p| Ok(ImageSource::Bytes { name: p.display().to_string(), bytes: std::fs::read(p)? }))
        .collect::<std::io::Result<_>>()?;
    let n = sources.len() as f64;
    let limit = Some(PIL_MAX_IMAGE_PIXELS);
    let shrink = move |img: image::RgbImage| {
        let (w, h) = (img.width() as usize, img.height() as usize);
        resize(img.as_raw(), w, h, 3, size, size, Filter::Bicubic)
            .map_err(|e| beit::processor::ProcessorError::Decode { path: "resize".into(), message: e.to_string() })
    };
    let in_memory: Vec<(&str, &[u8])> = sources
        .iter()
        .filter_map(|s| match s {
            ImageSource::Bytes { name, bytes } => Some((name.as_str(), bytes.as_slice())),
            ImageSource::Path(_) => None,
        })
        .collect();
    let t = Instant::now();
    for (name, b) in &in_memory {
        load_image_bytes(b, limit, name)?;
    }
    let decode = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (name, b) in &in_memory {
        shrink(load_image_bytes(b, limit, name)?)?;
    }
    let both = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let options = LoaderOptions { workers: 0, queue: 16, max_pixels: limit };
    let mut failed = 0;
    for (_, r) in load_ordered(sources.clone(), &options, shrink) {
        failed += r.is_err() as usize;
    }
    let threaded = t.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!(
        "{{\"images\": {n}, \"size\": {size}, \"decode_per_core_images_per_s\": {:.1}, \"decode_resize_per_core_images_per_s\": {:.1}, \"decode_resize_threaded_images_per_s\": {:.1}, \"threads\": {cores}, \"failed\": {failed}}}",
        n / decode,
        n / both,
        n / threaded
    );
    Ok(())
}
