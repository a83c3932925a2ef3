//! Helpers shared by the integration tests (`mod common;`). Each test crate
//! uses only part of them.
#![allow(dead_code)]

pub mod mqtt;
