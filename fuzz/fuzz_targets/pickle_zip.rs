//! A whole pytorch_model.bin (zip archive + pickle + storages) through the safe pickle reader.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = beit::checkpoint::pickle::read_torch_checkpoint_bytes(Path::new("fuzz.bin"), data, &[]);
});
