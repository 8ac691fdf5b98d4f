//! Errors of the evaluate crate.

use std::path::PathBuf;

/// An error from a scorer (the model behind a perplexity run), boxed so any backend can plug in.
pub type ScorerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong while evaluating, comparing or writing reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // === input files ===
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `tokenizer.json` could not be loaded or could not encode the text.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What the tokenizers crate said.
        message: String,
    },
    /// A JSON file could not be parsed or written.
    #[error("{path}: JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },

    /// A parquet file could not be read or written.
    #[error("{path}: parquet: {reason}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A parquet file lacks the column the reader needs.
    #[error("{path}: no column `{column}` (found: {found:?})")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column looked for.
        column: String,
        /// The columns present.
        found: Vec<String>,
    },
    /// A dataset file could not be found in the Hub cache or downloaded.
    #[error("Hub dataset {repo}@{revision}, file {file}: {reason}")]
    Hub {
        /// Repository id.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// File inside the repository.
        file: String,
        /// What went wrong.
        reason: String,
    },

    /// A chart could not be drawn or written.
    #[error("{path}: chart: {reason}")]
    Chart {
        /// The output file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    // === perplexity ===
    /// A convention name that is not known.
    #[error("unknown perplexity convention `{name}`: expected `gptq-2048`, `llamacpp-512`, `gptq`, `llamacpp` or either with `-<ctx>`")]
    UnknownConvention {
        /// What was given.
        name: String,
    },
    /// A context length the convention cannot use.
    #[error("convention {convention}: context length {ctx} is too small (need at least {min})")]
    ContextTooSmall {
        /// The convention label.
        convention: String,
        /// The context length given.
        ctx: usize,
        /// The smallest usable context.
        min: usize,
    },
    /// The text is shorter than one window.
    #[error(
        "convention {convention}: the text has {tokens} tokens, fewer than one window of {ctx}"
    )]
    TextTooShort {
        /// The convention label.
        convention: String,
        /// Tokens in the text.
        tokens: usize,
        /// The context length.
        ctx: usize,
    },
    /// The scorer failed on a window.
    #[error("window {window} of {windows}: scoring failed: {source}")]
    Scorer {
        /// Index of the window.
        window: usize,
        /// Number of windows.
        windows: usize,
        /// The scorer's error.
        source: ScorerError,
    },
    /// The scorer returned the wrong number of values.
    #[error("window {window}: the scorer returned {got} negative log-likelihoods, expected {expected} (window length - 1)")]
    ScorerLength {
        /// Index of the window.
        window: usize,
        /// Expected count.
        expected: usize,
        /// Returned count.
        got: usize,
    },
    /// The scorer returned a NaN or infinite value.
    #[error("window {window}, position {position}: the scorer returned a non-finite NLL {value}")]
    NonFinite {
        /// Index of the window.
        window: usize,
        /// Position inside the window.
        position: usize,
        /// The value.
        value: f32,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
