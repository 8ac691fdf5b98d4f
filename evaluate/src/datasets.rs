//! Evaluation texts: plain text files, and wikitext-2-raw-v1's test split from the Hub.
//!
//! wikitext comes from the dataset repository `Salesforce/wikitext` (parquet, one string column
//! `text`, one row per line of `wiki.test.raw`) through hf-hub's cache. The rows are joined the way
//! the GPTQ paper's `datautils.py` joins them: `"\n\n".join(test['text'])` ([`WIKITEXT_JOIN`]).
//!
//! Offline (`HF_HUB_OFFLINE=1`) nothing is fetched: the file must be in the cache, laid out as the
//! Hub clients lay it out: `<cache>/datasets--Salesforce--wikitext/{refs/main, snapshots/<commit>/<file>}`.
//! The cache is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.

use std::fs::File;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::error::{Error, Result};

/// The wikitext dataset repository on the Hub.
pub const WIKITEXT_REPO: &str = "Salesforce/wikitext";
/// wikitext-2-raw-v1's test split inside it.
pub const WIKITEXT2_TEST_FILE: &str = "wikitext-2-raw-v1/test-00000-of-00001.parquet";
/// The column holding the text.
pub const TEXT_COLUMN: &str = "text";
/// The separator the GPTQ paper puts between rows.
pub const WIKITEXT_JOIN: &str = "\n\n";
/// How the join is described in outputs.
pub const WIKITEXT_JOIN_DESCRIPTION: &str =
    r#"rows of column `text` joined with "\n\n" (GPTQ paper, datautils.py)"#;

/// The name `eval --text` accepts for wikitext-2's test split.
pub const WIKITEXT2_NAME: &str = "wikitext2";

/// An evaluation text, loaded and described.
#[derive(Debug, Clone)]
pub struct EvalText {
    /// Short name used in tables and report keys (`shakespeare`, `wikitext2`).
    pub name: String,
    /// Where it came from and how it was assembled, for the output.
    pub source: String,
    /// The text.
    pub text: String,
}

impl EvalText {
    /// Reads a text file; the name is the file stem.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "text".into());
        Ok(Self {
            name,
            source: format!("file {}", path.display()),
            text,
        })
    }

    /// Reads wikitext rows from a parquet file and joins them as the GPTQ paper does.
    pub fn from_wikitext_parquet(path: &Path) -> Result<Self> {
        let rows = read_text_column(path)?;
        Ok(Self {
            name: WIKITEXT2_NAME.to_string(),
            source: format!(
                "{} ({} rows; {WIKITEXT_JOIN_DESCRIPTION})",
                path.display(),
                rows.len()
            ),
            text: rows.join(WIKITEXT_JOIN),
        })
    }

    /// wikitext-2-raw-v1 test from the Hub (or the cache, offline).
    pub fn wikitext2() -> Result<Self> {
        let path = resolve_hub_dataset_file(WIKITEXT_REPO, "main", WIKITEXT2_TEST_FILE)?;
        let mut text = Self::from_wikitext_parquet(&path)?;
        text.source = format!("{WIKITEXT_REPO}:{WIKITEXT2_TEST_FILE} -> {}", text.source);
        Ok(text)
    }

    /// `wikitext2` (the Hub split) or a path to a `.parquet` of that schema or a text file.
    pub fn load(spec: &str) -> Result<Self> {
        if spec == WIKITEXT2_NAME {
            Self::wikitext2()
        } else if spec.ends_with(".parquet") {
            Self::from_wikitext_parquet(Path::new(spec))
        } else {
            Self::from_file(Path::new(spec))
        }
    }
}

/// Reads the string column `text` of a parquet file in row order. Nulls read as empty lines.
pub fn read_text_column(path: &Path) -> Result<Vec<String>> {
    let parquet_err = |reason: String| Error::Parquet {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| parquet_err(e.to_string()))?;
    let schema = reader.metadata().file_metadata().schema();
    let fields: Vec<String> = schema
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let Some(field) = schema.get_fields().iter().find(|f| f.name() == TEXT_COLUMN) else {
        return Err(Error::MissingColumn {
            path: path.to_path_buf(),
            column: TEXT_COLUMN.into(),
            found: fields,
        });
    };
    let projection = parquet::schema::types::Type::group_type_builder(schema.name())
        .with_fields(vec![field.clone()])
        .build()
        .map_err(|e| parquet_err(e.to_string()))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| parquet_err(e.to_string()))?;
    let mut out = Vec::new();
    for (index, row) in rows.enumerate() {
        let row = row.map_err(|e| parquet_err(format!("row {index}: {e}")))?;
        for (_, value) in row.into_columns() {
            match value {
                Field::Str(s) => out.push(s),
                Field::Null => out.push(String::new()),
                other => {
                    return Err(parquet_err(format!(
                        "row {index}: column `text` holds {other:?}, expected a string"
                    )))
                }
            }
        }
    }
    Ok(out)
}

/// Resolves a file of a Hub dataset repository to a local path through hf-hub's cache.
///
/// Offline (`HF_HUB_OFFLINE`), only the cache is looked at; otherwise hf-hub's sync API
/// downloads what is missing (resumably, with a progress bar).
pub fn resolve_hub_dataset_file(repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
    let hub_err = |reason: String| Error::Hub {
        repo: repo.to_string(),
        revision: revision.to_string(),
        file: file.to_string(),
        reason,
    };
    // The same environment as model resolution: HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT.
    let env = runtime::HubOptions::from_env();
    if env.offline {
        return resolve_in_cache(&env.cache_dir, repo, revision, file).map_err(hub_err);
    }
    let mut builder = ApiBuilder::from_cache(Cache::new(env.cache_dir)).with_progress(env.progress);
    if let Some(endpoint) = env.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build().map_err(|e| hub_err(e.to_string()))?;
    let handle = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Dataset,
        revision.to_string(),
    ));
    handle.get(file).map_err(|e| hub_err(e.to_string()))
}

/// Finds a file in a Hub-layout cache without network access.
fn resolve_in_cache(
    cache: &Path,
    repo: &str,
    revision: &str,
    file: &str,
) -> Result<PathBuf, String> {
    let repo_dir = cache.join(Repo::new(repo.to_string(), RepoType::Dataset).folder_name());
    let ref_path = repo_dir.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(text) => text.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => {
            revision.to_string()
        }
        Err(_) => {
            return Err(format!(
                "offline (HF_HUB_OFFLINE) and not in the cache: no ref {}",
                ref_path.display()
            ))
        }
    };
    let path = repo_dir.join("snapshots").join(commit).join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "offline (HF_HUB_OFFLINE) and not in the cache: {} does not exist",
            path.display()
        ))
    }
}

/// Writes a parquet file with wikitext's schema (`text`: optional UTF-8 string) from `rows`;
/// for tests and for preparing an offline cache.
pub fn write_wikitext_parquet(path: &Path, rows: &[Option<&str>]) -> Result<()> {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;

    let parquet_err = |e: parquet::errors::ParquetError| Error::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { OPTIONAL BYTE_ARRAY text (STRING); }",
        )
        .map_err(parquet_err)?,
    );
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut writer =
        SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))
            .map_err(parquet_err)?;
    let mut group = writer.next_row_group().map_err(parquet_err)?;
    if let Some(mut column) = group.next_column().map_err(parquet_err)? {
        let values: Vec<ByteArray> = rows.iter().flatten().map(|s| ByteArray::from(*s)).collect();
        let def_levels: Vec<i16> = rows.iter().map(|r| i16::from(r.is_some())).collect();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, Some(&def_levels), None)
            .map_err(parquet_err)?;
        column.close().map_err(parquet_err)?;
    }
    group.close().map_err(parquet_err)?;
    writer.close().map_err(parquet_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first rows of wikitext-2-raw-v1 test, as the Hub parquet holds them (lines keep their
    /// leading space and trailing newline; blank lines are empty strings).
    const ROWS: [Option<&str>; 5] = [
        Some(""),
        Some(" = Robert Boulter = \n"),
        Some(""),
        Some(" Robert Boulter is an English film actor . \n"),
        None,
    ];

    #[test]
    fn reads_and_joins_a_written_parquet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.parquet");
        write_wikitext_parquet(&path, &ROWS).unwrap();
        let rows = read_text_column(&path).unwrap();
        assert_eq!(
            rows,
            vec![
                "",
                " = Robert Boulter = \n",
                "",
                " Robert Boulter is an English film actor . \n",
                ""
            ]
        );
        let text = EvalText::from_wikitext_parquet(&path).unwrap();
        assert_eq!(
            text.text,
            "\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film actor . \n\n\n"
        );
        assert_eq!(text.name, "wikitext2");
        assert!(
            text.source.contains(r#"joined with "\n\n""#) && text.source.contains("5 rows"),
            "{}",
            text.source
        );
    }

    #[test]
    fn resolves_from_a_hub_shaped_cache_offline() {
        let dir = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = dir.path().join("datasets--Salesforce--wikitext");
        let file = repo
            .join("snapshots")
            .join(commit)
            .join(WIKITEXT2_TEST_FILE);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        write_wikitext_parquet(&file, &ROWS).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        assert_eq!(
            resolve_in_cache(dir.path(), WIKITEXT_REPO, "main", WIKITEXT2_TEST_FILE).unwrap(),
            file
        );
        let err =
            resolve_in_cache(dir.path(), WIKITEXT_REPO, "v9", WIKITEXT2_TEST_FILE).unwrap_err();
        assert!(err.contains("refs/v9"), "{err}");
    }

    #[test]
    fn a_parquet_without_text_column_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calib.parquet");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fixtures/calibration/open-instruct-sample.parquet"),
            &path,
        )
        .unwrap();
        let err = read_text_column(&path).unwrap_err().to_string();
        assert!(
            err.contains("`text`") && err.contains("instruction"),
            "{err}"
        );
        let err = read_text_column(&dir.path().join("missing.parquet"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.parquet"), "{err}");
    }
}
