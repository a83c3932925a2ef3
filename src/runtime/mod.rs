//! The runtime: run and device state machines, the scheduler, events.

pub mod device_machine;
pub mod events;
pub mod executor;
pub mod machine;
pub mod recovery;
pub mod simulate;
