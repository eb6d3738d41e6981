//! Self-contained demonstrations on built-in data, shared by the command-line tool and the
//! examples.

pub mod sine;
pub mod xor;
