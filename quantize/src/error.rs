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
}

/// Result with the quantize crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
