//! biofoundry: a controller for biofoundry workcells.
//!
//! Data flows one way: protocol file -> [`protocol::parse`] -> [`validate`] ->
//! [`plan`] -> runtime -> devices -> events -> sinks.

pub mod catalogue;
pub mod check;
pub mod diagnostics;
pub mod labware;
pub mod plan;
pub mod protocol;
pub mod schema;
pub mod source;
pub mod units;
pub mod validate;
