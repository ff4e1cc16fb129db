//! Typed backend errors: a bad image is a 400 with the library's message; a model fault is a 500 with a generic
//! message and the request id, its cause logged under that id, and the server serves the next request.
//!
//! The seam is the `Backend` trait the server already takes: a test backend wraps the fixture pipeline and fails
//! on images of chosen widths, so production code carries no test hooks. Alone in its binary because it installs
//! a global log subscriber (the fault is logged on a runtime thread, not the test's).

mod common;

use std::time::Duration;

use beit::pipeline::{Pipeline, Prediction, Prepared};
use beit::processor::{load_image_bytes, SegmentationMap};
use beit::BeitError;
use beit_server::{Backend, BackendResult, ModelInfo, ServerConfig};
use common::*;
use image::RgbImage;

/// Images of this width make the backend return an internal error.
const FAULT_WIDTH: u32 = 13;
/// Images of this width make the backend panic.
const PANIC_WIDTH: u32 = 17;
/// Images of this width are refused as invalid input.
const REFUSE_WIDTH: u32 = 19;
const FAULT_CAUSE: &str = "the fault this test provokes";

/// The fixture pipeline, failing on images of the widths above.
struct Faulty(Pipeline);

impl Faulty {
    fn check(images: &[&Prepared]) -> BackendResult<()> {
        for (i, img) in images.iter().enumerate() {
            match img.original.1 as u32 {
                FAULT_WIDTH => return Err(BeitError::internal("the faulty test backend", FAULT_CAUSE)),
                PANIC_WIDTH => panic!("the faulty test backend panics on purpose"),
                REFUSE_WIDTH => {
                    let found = format!("{REFUSE_WIDTH} pixels");
                    return Err(BeitError::invalid_input(
                        format!("image {i}: width"),
                        format!("expected another, found {found}"),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Backend for Faulty {
    fn info(&self) -> ModelInfo {
        self.0.info()
    }
    fn classify(&self, images: &[&Prepared], top_k: usize) -> BackendResult<Vec<Vec<Prediction>>> {
        Self::check(images)?;
        Backend::classify(&self.0, images, top_k)
    }
    fn segment(&self, images: &[&Prepared]) -> BackendResult<Vec<SegmentationMap>> {
        Self::check(images)?;
        Backend::segment(&self.0, images)
    }
    fn embed(&self, images: &[&Prepared]) -> BackendResult<Vec<Vec<f32>>> {
        Self::check(images)?;
        Backend::embed(&self.0, images)
    }
}

fn png_of(w: u32, h: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 20) as u8, (y * 20) as u8, 90]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

async fn start_faulty(cfg: ServerConfig) -> beit_server::Server {
    capture_logs(false);
    let model = model_dir("cls_single");
    beit_server::start(cfg, move || Ok(Faulty(load_pipeline(&model)?))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_image_is_400_with_the_librarys_message() {
    let server = start_faulty(config("faulty")).await;
    let http = Http::new(&server);
    // Bytes that do not decode: the library's own message, naming the request's image.
    let junk = b"not an image, just bytes".to_vec();
    let expected = load_image_bytes(&junk, Some(25_000_000), "request body").unwrap_err().to_string();
    let a = http.post("/classify", "image/png", junk).await;
    assert_eq!(a.status, 400, "{}", a.text());
    let body = a.json();
    assert_eq!(body["error_type"], "invalid_image");
    assert_eq!(body["error"], expected.as_str());
    assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()), "{body}");

    // An image that decodes but that the model refuses (InvalidInput from the backend): 400, its message as is.
    let a = http.post("/classify", "image/png", png_of(REFUSE_WIDTH, 8)).await;
    assert_eq!(a.status, 400, "{}", a.text());
    assert_eq!(a.json()["error_type"], "validation");
    assert_eq!(a.json()["error"], "image 0: width: expected another, found 19 pixels");
    // A 4xx is the caller's to fix: logged as a request (the access line), not as a failure.
    let id = a.json()["request_id"].as_str().unwrap().to_string();
    let lines = logged(&id);
    assert!(lines.iter().all(|l| !l.contains("ERROR")) && lines.iter().any(|l| l.contains("status=400")), "{lines:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_fault_is_500_logged_and_the_server_serves_on() {
    let server = start_faulty(config("faulty")).await;
    let http = Http::new(&server);
    let good = http.post("/classify", "image/png", image_bytes("chelsea.png")).await;
    assert_eq!(good.status, 200, "{}", good.text());

    for (width, cause) in [(FAULT_WIDTH, FAULT_CAUSE), (PANIC_WIDTH, "classify panicked: the faulty test backend")] {
        let a = http.post("/classify", "image/png", png_of(width, 8)).await;
        assert_eq!(a.status, 500, "{}", a.text());
        let body = a.json();
        assert_eq!(body["error_type"], "backend");
        let id = body["request_id"].as_str().unwrap().to_string();
        let message = body["error"].as_str().unwrap();
        // The client gets the id to quote, not the cause.
        assert!(message.contains(&id) && !message.contains(cause), "{message}");
        let lines = logged(&id);
        assert!(
            lines.iter().any(|l| l.contains("ERROR") && l.contains(cause)),
            "no log line with {cause:?}: {lines:?}"
        );
        // Still up: the next good request gets the same answer as before.
        let again = http.post("/classify", "image/png", image_bytes("chelsea.png")).await;
        assert_eq!((again.status, again.json()), (good.status, good.json()));
    }
    assert_eq!(http.get("/health").await.status, 200);
    let m = http.get("/metrics").await.text();
    assert!(m.contains("beit_requests_total{endpoint=\"/classify\",status=\"500\"} 2\n"), "{m}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_in_a_batch_fails_only_its_own_request() {
    // A long batch window so that the requests sent together run as one batch.
    let cfg = ServerConfig { max_batch_delay: Duration::from_millis(200), ..config("faulty") };
    let server = start_faulty(cfg).await;
    let http = Http::new(&server);
    let expected = http.post("/classify", "image/png", image_bytes("chelsea.png")).await.json();
    let bodies =
        [image_bytes("chelsea.png"), png_of(FAULT_WIDTH, 8), image_bytes("chelsea.png"), png_of(PANIC_WIDTH, 8)];
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let http = http.clone();
            tokio::spawn(async move { http.post("/classify", "image/png", b).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let a = t.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(a.json(), expected, "request {i}");
        }
        statuses.push(a.status.as_u16());
    }
    assert_eq!(statuses, [200, 500, 200, 500]);
    assert_eq!(http.get("/health").await.status, 200);
    server.shutdown().await.unwrap();
}
