//! preprocessor_config.json through BeitImageProcessor.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = beit::BeitImageProcessor::from_json_str(text);
    }
});
