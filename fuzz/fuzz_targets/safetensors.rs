//! A safetensors file (header + data) through beit's reader, as `model.safetensors` would be.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = beit::checkpoint::parse_safetensors(data, Path::new("fuzz.safetensors"), &candle_core::Device::Cpu);
});
