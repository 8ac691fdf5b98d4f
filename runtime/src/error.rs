//! The runtime's error type: every failure a user can cause names the file or tensor and the problem.

use std::path::PathBuf;

/// Everything that can go wrong while resolving, loading or running a Mixtral model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // === Files and configuration ===
    /// A file the checkpoint needs is not there.
    #[error("{path}: file not found ({what})")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// Why it was needed.
        what: String,
    },
    /// An I/O error while reading a file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file being parsed.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// `config.json` is valid JSON but not a usable Mixtral configuration.
    #[error("{path}: {problem}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// `config.json` describes another architecture.
    #[error("{path}: not a Mixtral config: {found} (expected model_type \"mixtral\" or architectures [\"MixtralForCausalLM\"])")]
    NotMixtral {
        /// The config file.
        path: PathBuf,
        /// What the file declares instead.
        found: String,
    },

    // === Safetensors ===
    /// The safetensors header is truncated, malformed or inconsistent with the file size.
    #[error("{path}: corrupt or truncated safetensors file: {problem}")]
    SafetensorsHeader {
        /// The safetensors file.
        path: PathBuf,
        /// The parser's description.
        problem: String,
    },
    /// A tensor the configuration requires is absent from every shard.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The checkpoint file (or index) searched.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor that a Mixtral checkpoint of this configuration does not have.
    #[error(
        "{path}: unexpected tensor `{name}` (not part of a Mixtral checkpoint with this config)"
    )]
    ExtraTensor {
        /// The file that holds it.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor whose shape does not match the configuration.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The file that holds it.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// Shape implied by config.json.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
    },
    /// A tensor whose dtype is not one the loader accepts for it.
    #[error("{path}: tensor `{name}` has dtype {got}, expected {expected}")]
    TensorDtype {
        /// The file that holds it.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The accepted dtypes.
        expected: String,
        /// The dtype in the file.
        got: String,
    },
    /// A weight holds NaN or infinity.
    #[error("{path}: tensor `{name}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// The file that holds it.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// Flat index of the first bad element.
        index: usize,
        /// The bad value.
        value: f32,
    },
    /// The shard index refers to a file or tensor inconsistently.
    #[error("{path}: {problem}")]
    ShardIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A GPTQ-quantized module failed its consistency checks.
    #[error("{path}: quantized module `{module}`: {source}")]
    Quantized {
        /// The file that holds it.
        path: PathBuf,
        /// The module prefix, e.g. `model.layers.0.self_attn.q_proj`.
        module: String,
        /// The check that failed.
        source: crate::qlinear::QlinearError,
    },

    // === Hub ===
    /// Offline mode and the file is not in the Hub cache.
    #[error("{repo}@{revision}: `{file}` is not in the Hub cache {cache} and HF_HUB_OFFLINE=1 forbids downloading it")]
    NotCached {
        /// Repository id.
        repo: String,
        /// Revision asked for.
        revision: String,
        /// File inside the repository.
        file: String,
        /// The cache directory searched.
        cache: PathBuf,
    },
    /// hf-hub could not fetch a file.
    #[error("{repo}@{revision}: downloading `{file}`: {source}")]
    Download {
        /// Repository id.
        repo: String,
        /// Revision asked for.
        revision: String,
        /// File inside the repository.
        file: String,
        /// The hf-hub error.
        source: Box<hf_hub::api::sync::ApiError>,
    },

    // === Forward pass ===
    /// Token ids or tensor shapes handed to the forward pass are unusable.
    #[error("invalid input: {0}")]
    Input(String),
    /// An error from candle-core (CPU backend).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// An error of the CUDA backend (library missing, kernel compilation, driver or cuBLAS).
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
}

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
