//! biofoundry: a controller for biofoundry workcells.
//!
//! Data flows one way: protocol file -> [`protocol::parse`] -> [`validate`] ->
//! [`plan`] -> runtime -> devices -> events -> sinks. [`check::check_source`]
//! runs the first three and collects every diagnostic:
//!
//! ```
//! use biofoundry::check::check_source;
//! use biofoundry::source::SourceFile;
//! use biofoundry::validate::SimulatedLab;
//!
//! let text = r#"
//! format = "biofoundry.protocol/1"
//! [protocol]
//! name = "warm up"
//! [devices]
//! inc = "incubator"
//! [[step]]
//! do = "inc.set_temperature"
//! temperature = "90 C"
//! "#;
//! let report = check_source(SourceFile::new("warm.toml", text), &[], &SimulatedLab);
//! let d = &report.diagnostics[0];
//! assert_eq!(d.code, "out-of-limits");
//! assert_eq!(report.file.line_col(d.span.start), (9, 15));
//! ```

pub mod catalogue;
pub mod check;
pub mod clock;
pub mod device;
pub mod diagnostics;
pub mod driver;
pub mod journal;
pub mod lab;
pub mod labware;
pub mod mqtt;
pub mod plan;
pub mod profile;
pub mod protocol;
pub mod report;
pub mod runtime;
pub mod schema;
pub mod serve;
pub mod sim;
pub mod sinks;
pub mod source;
pub mod store;
pub mod transport;
pub mod units;
pub mod validate;
pub mod wiresim;
