//! Errors of the CUDA backend: missing libraries, kernel compilation, driver and cuBLAS failures,
//! and weights the kernels do not support.

use std::path::PathBuf;

/// Everything that can go wrong on the CUDA path. Messages say what, where, expected and got.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    // === setup ===
    /// A shared library (driver, NVRTC, cuBLAS) could not be opened; nothing was loaded.
    #[error(
        "CUDA is not usable: could not load {library} (needed for {purpose}); searched {searched}. \
         Install it or set MIXTRAL_GPTQ_CUDA_LIB_DIR to the folder that holds it"
    )]
    MissingLibrary {
        /// The library, as named to the user.
        library: &'static str,
        /// What it is needed for.
        purpose: &'static str,
        /// Every place tried, in order.
        searched: String,
    },
    /// CUDA's `include/` folder (cuda_fp16.h, cuda_bf16.h) was not found for NVRTC.
    #[error(
        "CUDA is not usable: no CUDA include directory holding cuda_fp16.h was found (NVRTC needs it to \
         compile the kernels); searched {searched}. Set MIXTRAL_GPTQ_CUDA_INCLUDE_DIR"
    )]
    MissingIncludeDir {
        /// Every place tried, in order.
        searched: String,
    },
    /// The driver loaded but reports no device with this ordinal.
    #[error("CUDA device {ordinal} does not exist: the driver reports {count} device(s)")]
    NoDevice {
        /// The device asked for.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },

    // === compilation ===
    /// NVRTC rejected a kernel source; the log is NVRTC's.
    #[error("NVRTC could not compile `{kernel}` for {arch}:\n{log}")]
    KernelCompile {
        /// The kernel file.
        kernel: &'static str,
        /// The target architecture (`sm_90`).
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A compiled module lacks an entry point the host code asks for.
    #[error("kernel module `{kernel}` has no entry point `{entry}`: {source}")]
    MissingEntry {
        /// The kernel file.
        kernel: &'static str,
        /// The entry point asked for.
        entry: String,
        /// The underlying error.
        source: cudarc::driver::DriverError,
    },

    // === run time ===
    /// A CUDA driver call failed.
    #[error("CUDA driver call failed while {what}: {source}")]
    Driver {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS failed while {what}: {source}")]
    Cublas {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: cudarc::cublas::result::CublasError,
    },
    /// Reading or writing the kernel cache failed.
    #[error("kernel cache {path}: {source}")]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    // === inputs ===
    /// A GPTQ tensor has the wrong length for the declared shape.
    #[error("GPTQ weight: `{tensor}` has {got} elements, expected {expected} (K={k}, N={n}, bits={bits}, groups={groups})")]
    TensorShape {
        /// The tensor.
        tensor: &'static str,
        /// Expected element count.
        expected: usize,
        /// Element count found.
        got: usize,
        /// K.
        k: usize,
        /// N.
        n: usize,
        /// Bits per code.
        bits: u32,
        /// G.
        groups: usize,
    },
    /// The weight is valid GPTQ but outside what the kernels handle.
    #[error("GPTQ weight not supported by the CUDA kernels: {field} = {value} ({reason})")]
    Unsupported {
        /// The field or argument.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why it is not supported.
        reason: &'static str,
    },
    /// An activation or output buffer has the wrong size.
    #[error("{what}: expected {expected} elements, got {got}")]
    BadInput {
        /// What was being done.
        what: &'static str,
        /// Expected element count.
        expected: usize,
        /// Element count found.
        got: usize,
    },
}

/// Result of the CUDA backend.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Wraps a driver error with what was being done.
pub(crate) fn drv<T>(
    what: impl Into<String>,
    r: std::result::Result<T, cudarc::driver::DriverError>,
) -> Result<T> {
    r.map_err(|source| CudaError::Driver {
        what: what.into(),
        source,
    })
}
