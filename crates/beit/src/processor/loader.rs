//! Images loaded on worker threads while the caller runs the model: a bounded queue between loading and
//! the consumer, results in input order, memory bounded by the queue (not by the number of images), and
//! every image's error reported on its own.
//!
//! ```no_run
//! use beit::processor::loader::{load_ordered, ImageSource, LoaderOptions};
//! let sources = vec![ImageSource::Path("a.jpg".into()), ImageSource::Path("b.png".into())];
//! for (name, image) in load_ordered(sources, &LoaderOptions::default(), Ok) {
//!     match image {
//!         Ok(rgb) => println!("{name}: {}x{}", rgb.width(), rgb.height()),
//!         Err(e) => eprintln!("{e}"),
//!     }
//! }
//! ```

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use image::RgbImage;

use super::{load_image_bytes, load_image_with_limit, ProcessorError, Result, PIL_MAX_IMAGE_PIXELS};

/// Where an image comes from.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// A file.
    Path(PathBuf),
    /// Bytes in memory (an upload, an archive member), with the name errors give it.
    Bytes {
        /// What errors call it, e.g. "request body".
        name: String,
        /// The encoded image.
        bytes: Vec<u8>,
    },
}

impl ImageSource {
    /// The name errors and results give this source.
    pub fn name(&self) -> String {
        match self {
            ImageSource::Path(p) => p.display().to_string(),
            ImageSource::Bytes { name, .. } => name.clone(),
        }
    }

    /// Loads it as transformers' `load_image` does (see [`super::load_image_bytes`]).
    pub fn load(&self, max_pixels: Option<u64>) -> Result<RgbImage> {
        match self {
            ImageSource::Path(p) => load_image_with_limit(p, max_pixels),
            ImageSource::Bytes { name, bytes } => load_image_bytes(bytes, max_pixels, name),
        }
    }
}

/// How [`load_ordered`] runs.
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    /// Worker threads; 0: one per available core.
    pub workers: usize,
    /// Loaded images that may wait for the consumer (plus one per worker): the memory bound.
    pub queue: usize,
    /// The decompression-bomb limit (`None`: none).
    pub max_pixels: Option<u64>,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions { workers: 0, queue: 16, max_pixels: Some(PIL_MAX_IMAGE_PIXELS) }
    }
}

type Job<T> = (ImageSource, SyncSender<Result<T>>);

/// The results of [`load_ordered`], in input order: `(source name, result)`. Dropping it stops the workers
/// after the images they are on.
pub struct Loader<T> {
    order: Receiver<(String, Receiver<Result<T>>)>,
}

impl<T> Iterator for Loader<T> {
    type Item = (String, Result<T>);

    fn next(&mut self) -> Option<Self::Item> {
        let (name, rx) = self.order.recv().ok()?;
        let result = rx.recv().unwrap_or_else(|_| {
            Err(ProcessorError::Decode { path: name.clone(), message: "the loading thread stopped".into() })
        });
        Some((name, result))
    }
}

/// Loads `sources` on worker threads and applies `then` there (e.g. preprocessing), yielding the results
/// in input order while later images load. A panic while loading one image becomes that image's error.
pub fn load_ordered<T, F>(sources: Vec<ImageSource>, options: &LoaderOptions, then: F) -> Loader<T>
where
    T: Send + 'static,
    F: Fn(RgbImage) -> Result<T> + Send + Sync + 'static,
{
    let workers = match options.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let max_pixels = options.max_pixels;
    let (order_tx, order) = sync_channel(options.queue.max(1));
    let (job_tx, job_rx) = sync_channel::<Job<T>>(0);
    let job_rx = Arc::new(Mutex::new(job_rx));
    let then = Arc::new(then);
    for _ in 0..workers.min(sources.len()).max(1) {
        let (job_rx, then) = (job_rx.clone(), then.clone());
        std::thread::spawn(move || loop {
            let job = job_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
            let Ok((source, tx)) = job else { return };
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| source.load(max_pixels).and_then(|i| (*then)(i))))
                .unwrap_or_else(|_| {
                    Err(ProcessorError::Decode { path: source.name(), message: "panicked while loading".into() })
                });
            let _ = tx.send(result); // the consumer may have gone
        });
    }
    std::thread::spawn(move || {
        for source in sources {
            let (tx, rx) = sync_channel(1);
            let name = source.name();
            // Order first: the consumer waits on this image's slot while a worker fills it.
            if order_tx.send((name, rx)).is_err() || job_tx.send((source, tx)).is_err() {
                return;
            }
        }
    });
    Loader { order }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/processor/images/");

    /// Results come in input order, equal to loading one by one, with errors per image, from paths and bytes.
    #[test]
    fn loads_in_order_with_errors_per_image() {
        let names = ["chelsea.png", "coffee_q90.jpg", "missing.png", "camera.png", "chelsea_q90_444.jpg"];
        let mut sources: Vec<ImageSource> =
            names.iter().map(|n| ImageSource::Path(format!("{IMAGES}{n}").into())).collect();
        sources.push(ImageSource::Bytes { name: "garbage".into(), bytes: b"not an image".to_vec() });
        sources.push(ImageSource::Bytes {
            name: "coffee bytes".into(),
            bytes: std::fs::read(format!("{IMAGES}coffee_q90.jpg")).unwrap(),
        });
        for workers in [1, 2, 5] {
            let options = LoaderOptions { workers, queue: 1, ..Default::default() };
            let got: Vec<(String, Result<RgbImage>)> = load_ordered(sources.clone(), &options, Ok).collect();
            assert_eq!(got.len(), sources.len());
            for ((name, r), s) in got.iter().zip(&sources) {
                assert_eq!(name, &s.name());
                match s.load(Some(PIL_MAX_IMAGE_PIXELS)) {
                    Ok(want) => assert!(r.as_ref().unwrap() == &want, "{name}"),
                    Err(e) => assert_eq!(r.as_ref().unwrap_err().to_string(), e.to_string()),
                }
            }
            assert!(got[2].1.as_ref().unwrap_err().to_string().contains("missing.png"));
            assert!(got[5].1.is_err() && got[6].1.is_ok());
        }
        // `then` runs on the workers; a panic there is that image's error; dropping early is fine.
        let options = LoaderOptions { workers: 2, queue: 2, ..Default::default() };
        let sizes: Vec<_> = load_ordered(sources[..2].to_vec(), &options, |i| {
            if i.width() != 225 {
                panic!("test panic");
            }
            Ok(i.width())
        })
        .map(|(_, r)| r.map_err(|e| e.to_string()))
        .collect();
        assert_eq!(sizes[0], Ok(225));
        assert!(sizes[1].as_ref().unwrap_err().contains("panicked"), "{sizes:?}");
        let mut early = load_ordered(sources.clone(), &options, Ok);
        assert!(early.next().is_some());
        drop(early);
    }
}
