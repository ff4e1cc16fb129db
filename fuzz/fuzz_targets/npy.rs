//! A .npy file (--pixel-values, --bool-masked-pos, ...) through the parser and the tensor conversions.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = beit::npy::parse_npy(data) {
        let dev = candle_core::Device::Cpu;
        let _ = a.to_f32_tensor(Path::new("fuzz.npy"), &dev);
        let _ = a.to_mask_tensor(Path::new("fuzz.npy"), &dev);
    }
});
