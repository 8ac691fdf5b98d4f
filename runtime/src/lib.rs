//! The Mixtral model: configuration, checkpoint loading (local directory or Hub id, dense or GPTQ
//! branch) and the forward pass, written once over a [`Backend`]-style seam with a CPU implementation
//! (candle-core, the reference) and a CUDA one (cudarc + NVRTC kernels).

pub mod cuda;
pub mod qlinear;
