//! Errors of the quantize crate. Each message says what went wrong, where, what was expected and what was found.

use std::path::PathBuf;

/// Everything that can go wrong while quantizing, packing, writing or verifying a branch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // === input / output ===
    /// An I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An unknown branch preset name.
    #[error("unknown branch `{name}`; expected one of: {known}")]
    UnknownPreset {
        /// The name given.
        name: String,
        /// The preset names, comma-separated.
        known: String,
    },

    // === solver (hessian, linalg, gptq, driver) ===
    /// A buffer of the wrong size handed to the solver.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        /// Which buffer.
        what: String,
        /// The size it must have.
        expected: String,
        /// The size it had.
        got: String,
    },
    /// A solver setting outside what the algorithm supports.
    #[error("{what}: expected {expected}, got {got}")]
    Setting {
        /// Which setting.
        what: String,
        /// The values allowed.
        expected: String,
        /// The value given.
        got: String,
    },
    /// A failure of the model runtime while running calibration forward passes.
    #[error("{context}: {source}")]
    Runtime {
        /// What the driver was doing.
        context: String,
        /// The runtime's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    // === packing, branch writing, verification (pack.rs, config.rs, branch.rs, verify.rs) ===
    /// A solver result whose vectors disagree with its declared shape.
    #[error("quantized layer: `{field}` has {got} elements, expected {expected}")]
    QuantizedLength {
        /// `codes`, `scales`, `zeros` or `g_idx`.
        field: &'static str,
        /// Elements expected from bits/group_size/in_features/out_features.
        expected: usize,
        /// Elements found.
        got: usize,
    },
    /// A zero point GPTQ "v1" cannot store (it stores `zero - 1` in `bits` bits).
    #[error("quantized layer: zero point {got} at group {group}, column {column}: expected an integer in 1..={maxq} (v1 stores zero - 1)")]
    ZeroPoint {
        /// Group (row of `zeros`).
        group: usize,
        /// Output column.
        column: usize,
        /// The zero point found.
        got: f32,
        /// Largest code.
        maxq: u32,
    },
    /// A packed layer that is not a consistent GPTQ v1 layer.
    #[error("`{module}`: {source}")]
    Layout {
        /// The module or tensor prefix.
        module: String,
        /// What is inconsistent.
        source: runtime::qlinear::QlinearError,
    },
    /// Malformed JSON in a named file.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A model config without a field the branch needs.
    #[error("{path}: config field `{field}`: expected {expected}")]
    ConfigField {
        /// The config file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// A tensor the branch layout does not contain, or written with the wrong size.
    #[error("branch {dir}: tensor `{name}`: {problem}")]
    BranchTensor {
        /// The branch directory being written.
        dir: PathBuf,
        /// The tensor name.
        name: String,
        /// What is wrong: unknown, written twice, wrong shape.
        problem: String,
    },
    /// `finish` called before every planned tensor was written.
    #[error("branch {dir}: {count} tensor(s) never written, e.g. {first}")]
    BranchIncomplete {
        /// The branch directory being written.
        dir: PathBuf,
        /// How many are missing.
        count: usize,
        /// The first missing (by name).
        first: String,
    },
    /// A safetensors file that could not be parsed.
    #[error("{path}: invalid safetensors: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// Result with the quantize crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
