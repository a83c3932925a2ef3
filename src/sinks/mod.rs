//! Event sinks: where run events go (the console now; the journal and the MQTT
//! outbox write events before the runtime goes on, through the same trait).

pub mod console;
