//! config.json through BeitConfig (every field, validation of sizes).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = beit::BeitConfig::from_json_str(text);
    }
});
