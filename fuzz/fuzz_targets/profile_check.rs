//! Any text as a device profile: parse, every check, and both renderings of
//! every diagnostic. Must never panic or hang.
#![no_main]

use biofoundry::diagnostics::{locate, render_human};
use biofoundry::profile;
use biofoundry::source::SourceFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = SourceFile::new("fuzz.toml", text);
    let (_, diagnostics) = profile::parse(file.clone());
    for d in &diagnostics {
        let _ = locate(&file, d);
        let _ = render_human(&file, d, false);
    }
});
