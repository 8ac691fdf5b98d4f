//! quantize crate.
