//! Utilities shared by the command-line tests: running the built `metalearn` binary and reading
//! its output ([`cli`], [`meta_runs`]), plus the library tests' tensor utilities.
#![allow(dead_code, unused_imports)]

#[path = "../../../metalearn/tests/common/mod.rs"]
mod tensors;

pub use tensors::*;

pub mod cli;
pub mod meta_runs;
