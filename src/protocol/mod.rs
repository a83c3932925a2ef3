//! Protocol files: parse (with spans) -> validate -> plan.

pub mod condition;
pub mod model;
pub mod parse;
pub mod wells;

pub use model::*;
pub use parse::{ParamOverride, parse};
