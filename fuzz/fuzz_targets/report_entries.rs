//! Any bytes as a run's journal entries: split at line ends, each piece is one
//! entry's JSON body (its kind from its `type`, else picked by its position),
//! rendered by `report::render_entries`. Must end with a whole document in
//! which nothing from the input became markup, never a panic.
#![no_main]

use biofoundry::journal::Entry;
use libfuzzer_sys::fuzz_target;

const KINDS: [&str; 12] = [
    "run", "sample", "step", "alarm", "deck", "run_state", "command", "device_state", "prompt",
    "log", "operation", "resumed",
];

fuzz_target!(|data: &[u8]| {
    let entries: Vec<Entry> = data
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, piece)| {
            let body = String::from_utf8_lossy(piece).into_owned();
            let kind = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
                .unwrap_or_else(|| KINDS[i % KINDS.len()].to_string());
            Entry {
                seq: i as u64,
                kind,
                body,
                prev: String::new(),
                hash: String::new(),
            }
        })
        .collect();
    let html = biofoundry::report::render_entries(&entries);
    assert!(html.ends_with("</html>\n"));
    assert!(!html.contains("<script"));
});
