//! calibration crate.
