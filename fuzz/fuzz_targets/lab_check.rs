//! Any text as a lab file (profiles are looked up in the shipped devices/):
//! parse, every check, and the renderings of every diagnostic.
#![no_main]

use biofoundry::diagnostics::{locate, render_human};
use biofoundry::lab;
use biofoundry::source::SourceFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = SourceFile::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/fuzz.toml"), text);
    let (_, diagnostics) = lab::parse(file.clone());
    for d in &diagnostics {
        let _ = locate(&file, d);
        let _ = render_human(&file, d, false);
    }
});
