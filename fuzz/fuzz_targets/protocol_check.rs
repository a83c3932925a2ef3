//! Any text through the whole of `check`: parse, validate, plan, and both
//! renderings of every diagnostic. Must never panic or hang.
#![no_main]

use biofoundry::check::check_source;
use biofoundry::diagnostics::{locate, render_human};
use biofoundry::source::SourceFile;
use biofoundry::validate::SimulatedLab;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let report = check_source(SourceFile::new("fuzz.toml", text), &[], &SimulatedLab);
    for d in &report.diagnostics {
        let _ = locate(&report.file, d);
        let _ = render_human(&report.file, d, false);
    }
});
