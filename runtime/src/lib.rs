//! The Mixtral model: configuration, checkpoint loading (local directory or Hub id, dense or GPTQ
//! branch) and the forward pass, written once over a [`Backend`]-style seam with a CPU implementation
//! (candle-core, the reference) and a CUDA one (cudarc + NVRTC kernels).
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod hub;
pub mod load;
pub mod mixtral;
pub mod qlinear;
mod sgemm;

pub use backend::{AttentionShape, Backend, ExpertRoute, HostTensor, Routing, LM_HEAD_CHUNK};
pub use config::{MixtralConfig, QuantizationConfig};
pub use cpu::CpuBackend;
pub use error::{Error, Result};
pub use hub::{resolve, HubOptions};
pub use load::Checkpoint;
pub use mixtral::{ExpertWeights, HeadWeights, LayerWeights, LinearSite, Mixtral, Model, Observer};
