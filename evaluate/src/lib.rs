//! evaluate crate.
