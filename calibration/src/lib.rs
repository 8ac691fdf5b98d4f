//! Calibration token windows for GPTQ: VMware/open-instruct rows -> token stream -> windows,
//! exactly and reproducibly ("recipe v1", `fixtures/README.md`).
//!
//! ```text
//! parquet rows (file order) --template--> text --tokenizer.json (+BOS) + EOS--> stream
//!     (stop at 4 * nsamples * seqlen tokens) --random.Random(seed).randint--> windows
//! ```
//!
//! [`build`] does it all and returns a [`CalibrationSet`], which saves to safetensors with the
//! recipe, the seed and the SHA-256 of the tokenizer and dataset files in its metadata. The window
//! sampler is a bit-exact port of CPython's `random` ([`PyRandom`]), so the same windows can be
//! drawn in Python from the same stream:
//!
//! ```text
//! rnd = random.Random(seed)
//! windows = [stream[i : i + seqlen]
//!            for i in (rnd.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples))]
//! ```
//!
//! The Hub dataset (`VMware/open-instruct`) is resolved to a cached local file by
//! [`HubDataset::resolve`]; [`build_from`] takes either source.

#![deny(missing_docs)]

pub mod dataset;
pub mod error;
pub mod hub;
pub mod pyrandom;
pub mod recipe;
pub mod set;
pub mod stream;
pub mod windows;

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use dataset::Dataset;
pub use error::{Error, Result};
pub use hub::{HubDataset, OPEN_INSTRUCT_FILE, OPEN_INSTRUCT_REPO};
pub use pyrandom::PyRandom;
pub use recipe::{Recipe, Template, COLUMNS, DEFAULT_TEMPLATE, RECIPE_VERSION};
pub use set::{CalibrationMeta, CalibrationSet};
pub use stream::{build_stream, RowTokenizer, TokenStream};
pub use windows::window_starts;

/// Builds the calibration set of `recipe` from a local parquet file and a `tokenizer.json`.
///
/// To use the Hub dataset, resolve it first with [`HubDataset::resolve`], or call [`build_from`].
///
/// # Errors
/// Recipe, dataset, tokenizer and I/O errors, each naming its file; [`Error::StreamTooShort`]
/// if all rows together give no more than `seqlen` tokens.
pub fn build(dataset: &Path, tokenizer: &Path, recipe: &Recipe) -> Result<CalibrationSet> {
    let template = recipe.validate()?;
    let data = Dataset::open(dataset)?;
    let row_tokenizer = RowTokenizer::from_file(tokenizer)?;
    let stream = build_stream(&data, &row_tokenizer, &template, recipe.target_tokens())?;
    let starts = window_starts(
        stream.ids.len(),
        recipe.nsamples,
        recipe.seqlen,
        recipe.seed,
    )
    .ok_or_else(|| Error::StreamTooShort {
        path: dataset.to_path_buf(),
        found: stream.ids.len(),
        needed: recipe.seqlen + 1,
        seqlen: recipe.seqlen,
        rows: stream.rows_read,
    })?;
    let mut input_ids = Vec::with_capacity(recipe.nsamples * recipe.seqlen);
    for start in starts {
        let window = &stream.ids[start..start + recipe.seqlen];
        // Token ids are below the vocabulary size (32,000 for Mixtral), far inside i32.
        input_ids.extend(window.iter().map(|&id| id as i32));
    }
    let meta = CalibrationMeta {
        recipe: RECIPE_VERSION.to_string(),
        template: recipe.template.clone(),
        seed: recipe.seed,
        nsamples: recipe.nsamples,
        seqlen: recipe.seqlen,
        tokenizer_sha256: sha256_file(tokenizer)?,
        dataset_sha256: sha256_file(dataset)?,
        dataset: DatasetSource::File(dataset.to_path_buf()).describe(),
        stream_tokens: stream.ids.len(),
        rows_read: stream.rows_read,
        eos_id: row_tokenizer.eos_id(),
    };
    Ok(CalibrationSet {
        nsamples: recipe.nsamples,
        seqlen: recipe.seqlen,
        input_ids,
        meta,
    })
}

/// Where the dataset comes from: a local parquet file or a file of a Hub dataset repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetSource {
    /// A local parquet file.
    File(PathBuf),
    /// A parquet file in a Hub dataset repository, fetched into (or found in) the Hub cache.
    Hub(HubDataset),
}

impl DatasetSource {
    /// Reads a command-line spec: an existing path is a file; otherwise an `owner/name` id is a
    /// Hub dataset (at `main`, with [`OPEN_INSTRUCT_FILE`]); anything else is taken as a path
    /// (and fails, naming it, when opened).
    pub fn parse(spec: &str) -> Self {
        let path = Path::new(spec);
        if !path.exists() && HubDataset::looks_like_repo_id(spec) {
            DatasetSource::Hub(HubDataset {
                repo: spec.to_string(),
                ..HubDataset::default()
            })
        } else {
            DatasetSource::File(path.to_path_buf())
        }
    }

    /// The local parquet path (for the Hub, see [`HubDataset::resolve`]).
    ///
    /// # Errors
    /// [`Error::Hub`] if the Hub file cannot be found or fetched.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            DatasetSource::File(path) => Ok(path.clone()),
            DatasetSource::Hub(hub) => hub.resolve(),
        }
    }

    /// How the source is recorded in [`CalibrationMeta::dataset`]: the file name, or
    /// `owner/name@revision:file` for the Hub.
    pub fn describe(&self) -> String {
        match self {
            DatasetSource::File(path) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
            DatasetSource::Hub(hub) => format!("{}@{}:{}", hub.repo, hub.revision, hub.file),
        }
    }
}

/// [`build`] from a [`DatasetSource`], recording the source's description in the metadata.
///
/// # Errors
/// As [`DatasetSource::resolve`] and [`build`].
pub fn build_from(
    source: &DatasetSource,
    tokenizer: &Path,
    recipe: &Recipe,
) -> Result<CalibrationSet> {
    let path = source.resolve()?;
    let mut set = build(&path, tokenizer, recipe)?;
    set.meta.dataset = source.describe();
    Ok(set)
}

/// Lower-case hex SHA-256 of a file's bytes.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(Error::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
