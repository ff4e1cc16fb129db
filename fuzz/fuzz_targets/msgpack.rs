//! A flax_model.msgpack through the msgpack decoder and the Flax -> PyTorch renaming/transposition.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = beit::checkpoint::msgpack::decode_flax_as_pytorch(Path::new("fuzz.msgpack"), data);
});
