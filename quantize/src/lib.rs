//! GPTQ for Mixtral: Hessians, the solver, the layer-by-layer driver, packing into the GPTQ "v1"
//! format, branch presets, the atomic branch writer and the branch verifier.

pub mod branch;
pub mod config;
pub mod driver;
pub mod error;
pub mod gptq;
pub mod hessian;
pub mod linalg;
pub mod mixtral;
pub mod module;
pub mod pack;
pub mod presets;
pub mod quantizer;
pub mod report;
pub mod synth;
pub mod verify;

pub use error::{Error, Result};
pub use module::QuantizedLinear;
pub use presets::Preset;
