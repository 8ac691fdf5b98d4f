//! A built calibration set and its safetensors form.
//!
//! One tensor, `input_ids`, I32 `[nsamples, seqlen]`, and `__metadata__` naming the recipe (see
//! [`CalibrationMeta`]). The file is written byte-for-byte deterministically (metadata keys
//! sorted, header padded to 8 bytes as safetensors does) and atomically (a temporary file in the
//! same directory, synced, then renamed).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// The name of the one tensor in a saved set.
pub const TENSOR_NAME: &str = "input_ids";

/// What a calibration set was built from, recorded in its file and in every branch built with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalibrationMeta {
    /// Recipe version ([`crate::RECIPE_VERSION`]).
    pub recipe: String,
    /// Row template.
    pub template: String,
    /// Seed of `random.Random(seed)`.
    pub seed: u64,
    /// Windows.
    pub nsamples: usize,
    /// Tokens per window.
    pub seqlen: usize,
    /// Lower-case hex SHA-256 of the `tokenizer.json` file.
    pub tokenizer_sha256: String,
    /// Lower-case hex SHA-256 of the dataset parquet file.
    pub dataset_sha256: String,
    /// The dataset as given (file name, or Hub id and file).
    pub dataset: String,
    /// Tokens in the stream the windows were drawn from.
    pub stream_tokens: usize,
    /// Rows read into the stream.
    pub rows_read: usize,
    /// The EOS id appended after each row.
    pub eos_id: u32,
}

impl CalibrationMeta {
    fn to_map(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("format", "mixtral-gptq calibration set".to_string()),
            ("recipe", self.recipe.clone()),
            ("template", self.template.clone()),
            ("seed", self.seed.to_string()),
            ("nsamples", self.nsamples.to_string()),
            ("seqlen", self.seqlen.to_string()),
            ("tokenizer_sha256", self.tokenizer_sha256.clone()),
            ("dataset_sha256", self.dataset_sha256.clone()),
            ("dataset", self.dataset.clone()),
            ("stream_tokens", self.stream_tokens.to_string()),
            ("rows_read", self.rows_read.to_string()),
            ("eos_id", self.eos_id.to_string()),
        ])
    }

    fn from_map(path: &Path, map: &HashMap<String, String>) -> Result<Self> {
        let get = |key: &str| {
            map.get(key).cloned().ok_or_else(|| Error::BadSet {
                path: path.to_path_buf(),
                reason: format!("metadata has no `{key}`"),
            })
        };
        fn parse<T: std::str::FromStr>(path: &Path, key: &str, value: String) -> Result<T> {
            value.parse().map_err(|_| Error::BadSet {
                path: path.to_path_buf(),
                reason: format!("metadata `{key}` = {value:?} is not a number"),
            })
        }
        Ok(Self {
            recipe: get("recipe")?,
            template: get("template")?,
            seed: parse(path, "seed", get("seed")?)?,
            nsamples: parse(path, "nsamples", get("nsamples")?)?,
            seqlen: parse(path, "seqlen", get("seqlen")?)?,
            tokenizer_sha256: get("tokenizer_sha256")?,
            dataset_sha256: get("dataset_sha256")?,
            dataset: get("dataset")?,
            stream_tokens: parse(path, "stream_tokens", get("stream_tokens")?)?,
            rows_read: parse(path, "rows_read", get("rows_read")?)?,
            eos_id: parse(path, "eos_id", get("eos_id")?)?,
        })
    }
}

/// The calibration windows GPTQ runs on: `nsamples` rows of `seqlen` token ids, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalibrationSet {
    /// Windows.
    pub nsamples: usize,
    /// Tokens per window.
    pub seqlen: usize,
    /// `nsamples * seqlen` ids, window after window.
    pub input_ids: Vec<i32>,
    /// What the set was built from.
    pub meta: CalibrationMeta,
}

impl CalibrationSet {
    /// Window `i` (`seqlen` ids).
    ///
    /// # Panics
    /// If `i >= nsamples`.
    pub fn window(&self, i: usize) -> &[i32] {
        &self.input_ids[i * self.seqlen..(i + 1) * self.seqlen]
    }

    /// All windows, in order.
    pub fn windows(&self) -> impl Iterator<Item = &[i32]> {
        self.input_ids.chunks_exact(self.seqlen.max(1))
    }

    /// The safetensors bytes of this set.
    pub fn to_bytes(&self) -> Vec<u8> {
        let data_len = self.input_ids.len() * 4;
        let mut header = serde_json::Map::new();
        let meta: serde_json::Map<String, serde_json::Value> = self
            .meta
            .to_map()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        header.insert("__metadata__".into(), meta.into());
        header.insert(
            TENSOR_NAME.into(),
            serde_json::json!({
                "dtype": "I32",
                "shape": [self.nsamples, self.seqlen],
                "data_offsets": [0, data_len],
            }),
        );
        let mut header = serde_json::Value::Object(header).to_string().into_bytes();
        // safetensors pads the header with spaces so that the data starts 8-byte aligned.
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut out = Vec::with_capacity(8 + header.len() + data_len);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        for id in &self.input_ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// Writes the set to `path` atomically (temporary file in the same directory, then rename).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".calibration-")
            .suffix(".partial")
            .tempfile_in(dir)
            .map_err(Error::io(dir))?;
        tmp.write_all(&self.to_bytes())
            .map_err(Error::io(tmp.path()))?;
        // tempfile creates files private (0600); a saved set is an ordinary output file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::Permissions::from_mode(0o644);
            tmp.as_file()
                .set_permissions(mode)
                .map_err(Error::io(tmp.path()))?;
        }
        tmp.as_file().sync_all().map_err(Error::io(tmp.path()))?;
        tmp.persist(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e.error,
        })?;
        Ok(())
    }

    /// Reads a set written by [`CalibrationSet::save`].
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::BadSet`] if the file is not safetensors, lacks `input_ids`, has
    /// another dtype or rank, or its metadata is missing or disagrees with the shape.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        let bad = |reason: String| Error::BadSet {
            path: path.to_path_buf(),
            reason,
        };
        let tensors =
            SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let view = tensors.tensor(TENSOR_NAME).map_err(|_| {
            bad(format!(
                "no tensor `{TENSOR_NAME}` (has {:?})",
                tensors.names()
            ))
        })?;
        if view.dtype() != Dtype::I32 {
            return Err(bad(format!(
                "`{TENSOR_NAME}` has dtype {:?}, expected I32",
                view.dtype()
            )));
        }
        let &[nsamples, seqlen] = view.shape() else {
            return Err(bad(format!(
                "`{TENSOR_NAME}` has shape {:?}, expected [nsamples, seqlen]",
                view.shape()
            )));
        };
        let map = header
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("no __metadata__".into()))?;
        let meta = CalibrationMeta::from_map(path, map)?;
        if (meta.nsamples, meta.seqlen) != (nsamples, seqlen) {
            return Err(bad(format!(
                "metadata says {} x {}, tensor `{TENSOR_NAME}` is {nsamples} x {seqlen}",
                meta.nsamples, meta.seqlen
            )));
        }
        let input_ids = view
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Self {
            nsamples,
            seqlen,
            input_ids,
            meta,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CalibrationSet {
        CalibrationSet {
            nsamples: 3,
            seqlen: 4,
            input_ids: (0..12).map(|i| i * 1000 - 7).collect(),
            meta: CalibrationMeta {
                recipe: "v1".into(),
                template: "[INST] {instruction} [/INST] {response}".into(),
                seed: 1 << 40,
                nsamples: 3,
                seqlen: 4,
                tokenizer_sha256: "ab".repeat(32),
                dataset_sha256: "cd".repeat(32),
                dataset: "x.parquet".into(),
                stream_tokens: 99,
                rows_read: 5,
                eos_id: 2,
            },
        }
    }

    #[test]
    fn save_load_round_trip_is_exact_and_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("set.safetensors");
        let set = sample();
        set.save(&path).unwrap();
        let loaded = CalibrationSet::load(&path).unwrap();
        assert_eq!(loaded, set);
        assert_eq!(loaded.window(2), &[7993, 8993, 9993, 10993]);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            set.to_bytes(),
            "bytes differ between writes"
        );
        // The safetensors crate reads it as a normal file.
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("input_ids").unwrap().shape(), &[3, 4]);
        // No temporary file is left behind, and the file is not private to its owner.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
    }

    #[test]
    fn malformed_sets_are_rejected_with_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let msg = CalibrationSet::load(&path).unwrap_err().to_string();
        assert!(
            msg.contains("bad.safetensors") && msg.contains("not safetensors"),
            "{msg}"
        );

        let mut set = sample();
        set.meta.nsamples = 2;
        std::fs::write(&path, set.to_bytes()).unwrap();
        let msg = CalibrationSet::load(&path).unwrap_err().to_string();
        assert!(msg.contains("metadata says 2 x 4"), "{msg}");
    }
}
