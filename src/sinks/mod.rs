//! Event sinks: where run events go. The console lives here; the journal
//! (`src/journal.rs`) and the MQTT outbox (`src/mqtt/sink.rs`) are sinks through
//! the same trait and write each event before the runtime goes on.

pub mod console;
