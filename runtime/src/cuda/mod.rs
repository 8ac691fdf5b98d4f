//! CUDA backend: cudarc with run-time loading, kernels compiled by NVRTC on first use.
//!
//! Nothing here needs CUDA at build time. At run time [`probe::probe_all`] opens the driver, NVRTC
//! and cuBLAS (or names the one that is missing) before any cudarc call, since cudarc panics on a
//! missing library.

pub mod error;
pub mod kernels;
mod launch;
pub mod probe;
pub mod random;
pub mod timing;

pub use error::{CudaError, Result};
pub mod backend;
pub mod device;
pub mod eval;
pub mod gptq;

pub use backend::{CudaBackend, CudaTensor};
pub use device::CudaDevice;
pub use gptq::{
    prepare, ActDtype, DenseLayer, DeviceExperts, DeviceGptq, PreparedGptq, GEMV_MAX_ROWS,
    GEMV_MAX_ROWS_TENSOR_CORES, GEMV_MIN_WEIGHTS_TENSOR_CORES,
};
pub use half::{bf16, f16};
