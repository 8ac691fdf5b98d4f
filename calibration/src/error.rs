//! The one error type of the `calibration` crate.

use std::path::PathBuf;

/// Everything that can go wrong while turning a dataset into calibration windows.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // === Files ===
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    // === Dataset (parquet) ===
    /// The dataset is not a readable parquet file.
    #[error("{path}: not a readable parquet file: {reason}")]
    NotParquet {
        /// The dataset file.
        path: PathBuf,
        /// What the parquet reader said.
        reason: String,
    },
    /// A column the template needs (or the Open Instruct schema requires) is absent.
    #[error("{path}: column `{column}` is missing (the file has columns {found:?})")]
    MissingColumn {
        /// The dataset file.
        path: PathBuf,
        /// The column that was looked for.
        column: String,
        /// The columns the file does have.
        found: Vec<String>,
    },
    /// A column exists but does not hold UTF-8 strings.
    #[error(
        "{path}: column `{column}` has type {got}, expected a string (UTF-8 BYTE_ARRAY) column"
    )]
    NotStringColumn {
        /// The dataset file.
        path: PathBuf,
        /// The column.
        column: String,
        /// Its physical/logical type as parquet describes it.
        got: String,
    },
    /// The file is empty (0 bytes) or has no rows.
    #[error("{path}: {what}")]
    EmptyDataset {
        /// The dataset file.
        path: PathBuf,
        /// `the file is empty (0 bytes)` or `the parquet file has no rows`.
        what: &'static str,
    },
    /// A row holds a null where the template needs a string.
    #[error("{path}: row {row} has a null in column `{column}`, expected a string")]
    NullValue {
        /// The dataset file.
        path: PathBuf,
        /// Zero-based row index in file order.
        row: usize,
        /// The column.
        column: String,
    },
    /// Reading a row failed after the file was opened.
    #[error("{path}: reading row {row}: {reason}")]
    ReadRow {
        /// The dataset file.
        path: PathBuf,
        /// Zero-based row index in file order.
        row: usize,
        /// What the parquet reader said.
        reason: String,
    },

    // === Hub ===
    /// The dataset could not be fetched from (or found in the cache of) the Hugging Face Hub.
    #[error("Hub dataset `{repo}` (revision `{revision}`), file `{file}`: {reason}")]
    Hub {
        /// The dataset repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The file inside the repository.
        file: String,
        /// What went wrong.
        reason: String,
    },

    // === Recipe ===
    /// The row template names a placeholder that is not a dataset column.
    #[error(
        "template {template:?}: unknown placeholder `{{{name}}}` (expected one of {expected:?})"
    )]
    UnknownPlaceholder {
        /// The template.
        template: String,
        /// The placeholder that is not a column.
        name: String,
        /// The placeholders that are allowed.
        expected: Vec<&'static str>,
    },
    /// The row template is malformed (an unmatched `{` or `}`).
    #[error(
        "template {template:?}: {reason} at byte {at} (write `{{{{` and `}}}}` for literal braces)"
    )]
    BadTemplate {
        /// The template.
        template: String,
        /// What is wrong.
        reason: &'static str,
        /// Byte offset of the problem.
        at: usize,
    },
    /// A recipe parameter is out of range.
    #[error("recipe: {what} must be {expected}, got {got}")]
    BadRecipe {
        /// Which parameter.
        what: &'static str,
        /// The allowed range.
        expected: &'static str,
        /// The value given.
        got: String,
    },

    // === Tokenizer ===
    /// The tokenizer could not be loaded or could not encode a row.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What the tokenizers library said.
        reason: String,
    },

    // === Windows ===
    /// The token stream is too short to draw even one window.
    #[error(
        "{path}: the token stream has {found} tokens, but a window of {seqlen} tokens needs at least {needed} \
         (all {rows} rows were read)"
    )]
    StreamTooShort {
        /// The dataset file.
        path: PathBuf,
        /// Tokens in the stream.
        found: usize,
        /// Tokens needed (`seqlen + 1`, since `randint(0, len - seqlen - 1)` needs a non-empty range).
        needed: usize,
        /// The window length.
        seqlen: usize,
        /// Rows read.
        rows: usize,
    },

    // === Saved sets (safetensors) ===
    /// A saved calibration set is malformed.
    #[error("{path}: not a calibration set: {reason}")]
    BadSet {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong (tensor, dtype, shape or metadata).
        reason: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
