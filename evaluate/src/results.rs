//! Stored evaluation results: `eval.json` beside a model or in a branch directory, so that
//! `compare` and `card` reuse measured perplexities instead of evaluating again.
//!
//! Keys are `"{text}/{convention}"` (`shakespeare/gptq-2048`), as in `fixtures/reference-ppl.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::perplexity::Perplexity;

/// The file name used in branch directories.
pub const EVAL_FILE: &str = "eval.json";

/// One measured perplexity with the text it was measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalEntry {
    /// Short text name (`shakespeare`, `wikitext2`).
    pub text: String,
    /// Where the text came from and how it was assembled.
    pub source: String,
    /// The measurement.
    #[serde(flatten)]
    pub perplexity: Perplexity,
}

/// All results stored for one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalResults {
    /// The model evaluated (directory or Hub id, as given).
    pub model: String,
    /// Results by `"{text}/{convention}"`.
    pub results: BTreeMap<String, EvalEntry>,
}

/// The key of a result: `"{text}/{convention}"`.
pub fn result_key(text: &str, convention: &str) -> String {
    format!("{text}/{convention}")
}

impl EvalResults {
    /// Reads `path`; a missing file gives empty results for `model`.
    pub fn load_or_default(path: &Path, model: &str) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                model: model.to_string(),
                results: BTreeMap::new(),
            }),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Adds or replaces one result.
    pub fn insert(&mut self, entry: EvalEntry) {
        self.results
            .insert(result_key(&entry.text, &entry.perplexity.convention), entry);
    }

    /// The perplexity of `text` under `convention`, if stored.
    pub fn ppl(&self, text: &str, convention: &str) -> Option<f64> {
        self.results
            .get(&result_key(text, convention))
            .map(|e| e.perplexity.ppl)
    }

    /// Writes the results as pretty JSON (via a temporary file, so a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let tmp = path.with_extension("json.partial");
        std::fs::write(&tmp, json + "\n").map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perplexity::ConventionKind;

    #[test]
    fn round_trip_and_merge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EVAL_FILE);
        let mut results = EvalResults::load_or_default(&path, "branch").unwrap();
        assert!(results.results.is_empty());
        let p = Perplexity {
            convention: "gptq-2048".into(),
            kind: ConventionKind::Gptq,
            ctx: 2048,
            tokens: 179_497,
            windows: 87,
            predictions: 87 * 2047,
            nll_sum: 1.0,
            ppl: 73.4,
            seconds: 1.0,
        };
        results.insert(EvalEntry {
            text: "shakespeare".into(),
            source: "file".into(),
            perplexity: p.clone(),
        });
        results.insert(EvalEntry {
            text: "shakespeare".into(),
            source: "file".into(),
            perplexity: p,
        });
        results.save(&path).unwrap();
        let back = EvalResults::load_or_default(&path, "other").unwrap();
        assert_eq!(back, results);
        assert_eq!(back.results.len(), 1);
        assert_eq!(back.ppl("shakespeare", "gptq-2048"), Some(73.4));
        assert_eq!(back.ppl("shakespeare", "llamacpp-512"), None);
    }
}
