//! Encoding an evaluation text as one token stream.
//!
//! The text is encoded as a whole with `tokenizer.json` and special tokens on, so Mixtral's
//! post-processor puts one BOS (id 1) at the start and nowhere else (fixtures/README.md,
//! "Perplexity conventions"; the GPTQ paper's `datautils.py` does the same).

use std::path::Path;

pub use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Mixtral's beginning-of-sequence id.
pub const BOS_ID: u32 = 1;

/// Loads `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Encodes `text` as a whole with special tokens on (one BOS at the start).
pub fn encode(tokenizer: &Tokenizer, tokenizer_path: &Path, text: &str) -> Result<Vec<u32>> {
    let encoding = tokenizer.encode(text, true).map_err(|e| Error::Tokenizer {
        path: tokenizer_path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(encoding.get_ids().to_vec())
}

/// Reads a text file and encodes it with the `tokenizer.json` at `tokenizer_path`.
pub fn encode_file(tokenizer_path: &Path, text_path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(text_path).map_err(|e| Error::io(text_path, e))?;
    let tokenizer = load_tokenizer(tokenizer_path)?;
    encode(&tokenizer, tokenizer_path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures")
            .join(rel)
    }

    /// Token counts of the eval texts with BOS, from `fixtures/reference-ppl.json` (`eval_tokens`).
    #[test]
    fn eval_texts_token_counts_match_reference() {
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("reference-ppl.json")).unwrap())
                .unwrap();
        let tok = fixture("moe-s/tokenizer.json");
        for name in ["shakespeare", "python"] {
            let ids = encode_file(&tok, &fixture(&format!("eval/{name}.txt"))).unwrap();
            let expected = reference["eval_tokens"][name].as_u64().unwrap() as usize;
            assert_eq!(ids.len(), expected, "{name}");
            assert_eq!(ids[0], BOS_ID, "{name}: BOS first");
            assert!(!ids[1..].contains(&BOS_ID), "{name}: only one BOS");
        }
        // Pin the brief's numbers too, so a changed fixture is noticed.
        assert_eq!(reference["eval_tokens"]["shakespeare"], 179_497);
        assert_eq!(reference["eval_tokens"]["python"], 133_049);
    }

    #[test]
    fn missing_tokenizer_names_the_path() {
        let err = load_tokenizer(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.json"),
            "{err}"
        );
    }
}
