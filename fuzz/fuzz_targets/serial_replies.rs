//! Any bytes as an instrument's reply on a serial line: the real link (line
//! framing, echo, drain) and profile driver (error tables, reply patterns,
//! scaling) read every signal of two shipped profiles from them. Must end
//! with a value or a typed error, never a panic.
#![no_main]

use biofoundry::device::Device;
use biofoundry::driver::{Link, ProfileDevice};
use biofoundry::transport::serial::{Opener, SerialLink};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use tokio::io::AsyncWriteExt;

fn profiles() -> &'static Vec<Arc<biofoundry::profile::Profile>> {
    static P: OnceLock<Vec<Arc<biofoundry::profile::Profile>>> = OnceLock::new();
    P.get_or_init(|| {
        ["opentrons-temperature-module", "liconic-stx", "alicat-mfc", "thermo-cytomat"]
            .iter()
            .map(|n| {
                let path = format!("{}/../devices/{n}.toml", env!("CARGO_MANIFEST_DIR"));
                Arc::new(biofoundry::profile::load(std::path::Path::new(&path)).unwrap())
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        for profile in profiles() {
            let reply = data.to_vec();
            // Each connection gets the fuzz bytes, then the line closes (so a
            // reply without a line end ends at once instead of timing out).
            let opener = Opener::Pipe(Arc::new(move || {
                let (ours, mut theirs) = tokio::io::duplex(1 << 16);
                let reply = reply.clone();
                tokio::spawn(async move {
                    let _ = theirs.write_all(&reply).await;
                    let _ = theirs.shutdown().await;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                });
                Ok(ours)
            }));
            let line = Arc::new(tokio::sync::Mutex::new(SerialLink::new(opener)));
            let Some(link) = Link::serial(profile, line) else { continue };
            let device = ProfileDevice::new("fuzz", Arc::clone(profile), &Default::default(), link);
            for signal in profile.doc.signals.keys() {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    device.read(signal),
                )
                .await;
            }
        }
    });
});
