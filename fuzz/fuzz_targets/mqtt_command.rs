//! Any bytes as an MES command payload, on every verb (and an unknown one),
//! with and without a command key. Must end with a command or a rejection
//! with a reason, never a panic.
#![no_main]

use biofoundry::mqtt::command::{Verb, parse_command};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, UNIX_EPOCH};

const KEY: &[u8] = b"0123456789abcdef-fuzz-key";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let verb = Verb::ALL
        .get(usize::from(selector) % (Verb::ALL.len() + 1))
        .map_or("launch", |v| v.name());
    let key = (selector & 0x80 != 0).then_some(KEY);
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    match parse_command(verb, payload, key, now) {
        Ok(c) => assert!(!c.cmd_id.is_empty()),
        Err(r) => assert!(!r.reason.is_empty()),
    }
});
