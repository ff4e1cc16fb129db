//! The processor fixtures (scripts/gen_processor_fixtures.py, scripts/gen_exif_fixtures.py), for the
//! tests of every processor module.

use serde_json::Value;

use crate::npy::{parse_npy, NpyData};

/// The fixture directory, with a trailing slash.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/processor/");

/// A JSON file under [`FIXTURES`].
pub fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}{rel}")).unwrap()).unwrap() // ok: test-only module (cfg(test) in mod.rs)
}

/// gen_processor_fixtures.py's manifest.
pub fn manifest() -> Value {
    json("manifest.json")
}

fn npy(rel: &str) -> (Vec<usize>, NpyData) {
    let a = parse_npy(&std::fs::read(format!("{FIXTURES}{rel}")).unwrap()).unwrap(); // ok: test-only module
    (a.shape, a.data)
}

/// A float32 .npy under [`FIXTURES`]: shape and values.
pub fn npy_f32(rel: &str) -> (Vec<usize>, Vec<f32>) {
    match npy(rel) {
        (s, NpyData::F32(v)) => (s, v),
        (_, other) => panic!("{rel}: not float32: {other:?}"), // ok: test-only module
    }
}

/// An int64 .npy under [`FIXTURES`]: shape and values.
pub fn npy_i64(rel: &str) -> (Vec<usize>, Vec<i64>) {
    match npy(rel) {
        (s, NpyData::I64(v)) => (s, v),
        (_, other) => panic!("{rel}: not int64: {other:?}"), // ok: test-only module
    }
}

/// A JSON array of strings.
pub fn strs(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect() // ok: test-only module
}
