//! MQTT for MES (docs/mqtt.md): the topic tree, the durable outbox, the link
//! to the broker, commands from MES and the embedded broker.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod command;
