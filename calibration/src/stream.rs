//! Recipe v1 steps 1-3: rows in file order -> template -> token ids (BOS from the tokenizer's
//! post-processor, EOS appended) -> one stream, cut off once it is long enough.
//!
//! Rows are tokenised in parallel in batches of [`BATCH_ROWS`], then appended strictly in file
//! order and the stop rule is checked after each row, so the stream is identical to a sequential
//! pass; at most one batch of extra rows is tokenised and thrown away.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::recipe::Template;

/// Rows tokenised per parallel batch.
pub const BATCH_ROWS: usize = 256;

/// The end-of-sequence token recipe v1 appends to every row (id 2 in Mixtral's tokenizer).
pub const EOS_TOKEN: &str = "</s>";

/// A `tokenizer.json` ready to encode rows the recipe-v1 way.
pub struct RowTokenizer {
    path: PathBuf,
    tokenizer: Tokenizer,
    eos_id: u32,
}

impl std::fmt::Debug for RowTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowTokenizer")
            .field("path", &self.path)
            .field("eos_id", &self.eos_id)
            .finish_non_exhaustive()
    }
}

impl RowTokenizer {
    /// Loads `tokenizer.json` and looks up the id of [`EOS_TOKEN`].
    ///
    /// # Errors
    /// [`Error::Io`] if the file is absent, [`Error::Tokenizer`] if it does not parse or has no EOS.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "tokenizer file not found",
                ),
            });
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let eos_id = tokenizer
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| Error::Tokenizer {
                path: path.to_path_buf(),
                reason: format!("no `{EOS_TOKEN}` token in the vocabulary"),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            tokenizer,
            eos_id,
        })
    }

    /// The id appended after each row.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Encodes one row's text with special tokens on (the post-processor adds BOS), then EOS.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the tokenizer fails on the text.
    pub fn encode_row(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        let mut ids = encoding.get_ids().to_vec();
        ids.push(self.eos_id);
        Ok(ids)
    }
}

/// The concatenated token ids of the rows read, and how the reading ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStream {
    /// Token ids, rows in file order.
    pub ids: Vec<u32>,
    /// Rows whose ids are in `ids`.
    pub rows_read: usize,
    /// Whether reading stopped because the file ran out (rather than at the target).
    pub exhausted: bool,
}

/// Reads rows until the stream holds at least `target` tokens or the rows run out.
///
/// # Errors
/// Dataset and tokenizer errors, with the file named.
pub fn build_stream(
    dataset: &Dataset,
    tokenizer: &RowTokenizer,
    template: &Template,
    target: usize,
) -> Result<TokenStream> {
    let mut stream = TokenStream {
        ids: Vec::new(),
        rows_read: 0,
        exhausted: true,
    };
    let mut batch: Vec<String> = Vec::with_capacity(BATCH_ROWS);
    let columns = template.columns();
    dataset.read_rows(&columns, |_, values| {
        batch.push(template.render(|c| values[c].as_str()));
        if batch.len() < BATCH_ROWS {
            return Ok(ControlFlow::Continue(()));
        }
        append_batch(&mut stream, tokenizer, &std::mem::take(&mut batch), target)
    })?;
    if !batch.is_empty() && stream.ids.len() < target {
        // The last batch: whether it reached the target is recorded in `stream.exhausted`.
        let _ = append_batch(&mut stream, tokenizer, &batch, target)?;
    }
    Ok(stream)
}

/// Tokenises `texts` in parallel and appends them in order until `target` is reached.
fn append_batch(
    stream: &mut TokenStream,
    tokenizer: &RowTokenizer,
    texts: &[String],
    target: usize,
) -> Result<ControlFlow<()>> {
    if stream.ids.len() >= target {
        return Ok(ControlFlow::Break(()));
    }
    let encoded: Vec<Result<Vec<u32>>> =
        texts.par_iter().map(|t| tokenizer.encode_row(t)).collect();
    for ids in encoded {
        stream.ids.extend_from_slice(&ids?);
        stream.rows_read += 1;
        if stream.ids.len() >= target {
            stream.exhausted = false;
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}
