//! `conformance::check_json` with the portable engine on arbitrary UTF-8: a malformed or
//! hostile vectors file is an error or failure lines, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rebindgw_tools::conformance::check_json;
use rebindgw::engine::Backend;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match check_json(text, Backend::Portable) {
        Ok(report) => {
            for f in &report.failures {
                assert!(!f.is_empty());
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
