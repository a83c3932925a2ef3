//! biofoundry: a controller for biofoundry workcells.
//!
//! Data flows one way: protocol file -> [`protocol::parse`] -> [`validate`] ->
//! [`plan`] -> runtime -> devices -> events -> sinks.

pub mod catalogue;
pub mod diagnostics;
pub mod labware;
pub mod protocol;
pub mod source;
pub mod units;
pub mod check;
pub mod plan;
pub mod validate;
pub mod schema;
