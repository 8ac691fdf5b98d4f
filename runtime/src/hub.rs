//! Resolving a model spec (a local directory or a Hub id) to a local directory, through hf-hub's
//! sync API and the standard Hub cache (`models--org--name/{refs,snapshots}`).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::load::{INDEX_FILE, SINGLE_FILE};

/// Files fetched besides the weights when present (tokenizer and generation settings).
pub const OPTIONAL_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Where and how to resolve Hub ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The Hub cache directory (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// Resolve from the cache only, never touching the network.
    pub offline: bool,
    /// Revision used when the spec has no `@revision` (`main`).
    pub revision: String,
    /// Show hf-hub's download progress bars.
    pub progress: bool,
    /// Hub endpoint (`HF_ENDPOINT`), `None` for huggingface.co.
    pub endpoint: Option<String>,
}

impl HubOptions {
    /// Options from the environment as the Hub libraries read it: the cache is `HF_HUB_CACHE`, else
    /// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` (or `true`/`yes`/`on`)
    /// means offline; `HF_ENDPOINT` overrides the endpoint.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .unwrap_or_else(|| Cache::default().path().clone());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        HubOptions {
            cache_dir,
            offline,
            revision: "main".into(),
            progress: true,
            endpoint: var("HF_ENDPOINT"),
        }
    }
}

/// Splits `org/name@rev` into the repository id and the revision (`default` when absent).
fn split_spec<'a>(spec: &'a str, default: &'a str) -> (&'a str, &'a str) {
    match spec.rsplit_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, rev),
        _ => (spec, default),
    }
}

/// Whether `spec` has the shape of a Hub repository id (`org/name`, optionally `@revision`).
pub fn is_hub_id(spec: &str) -> bool {
    let (id, _) = split_spec(spec, "main");
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves `spec` to a local model directory: an existing directory is returned as is; a Hub id
/// (`mistralai/Mixtral-8x7B-Instruct-v0.1`, optionally `@revision`) is looked up in the Hub cache
/// and, unless offline, downloaded there (config, weights, shard index and shards, tokenizer files).
/// The result is the snapshot directory holding them.
///
/// # Errors
/// [`Error::MissingFile`] when `spec` is neither a directory nor a Hub id, [`Error::NotCached`]
/// offline when a needed file is not cached, [`Error::Download`] when hf-hub fails.
pub fn resolve(spec: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_owned());
    }
    if !is_hub_id(spec) {
        return Err(Error::MissingFile {
            path: path.to_owned(),
            what: "a model directory (or a Hub id such as mistralai/Mixtral-8x7B-Instruct-v0.1)"
                .into(),
        });
    }
    let (id, revision) = split_spec(spec, &options.revision);
    let repo = Repo::with_revision(id.to_owned(), RepoType::Model, revision.to_owned());
    if options.offline {
        resolve_cached(id, revision, repo, options)
    } else {
        download(id, revision, repo, options)
    }
}

fn resolve_cached(id: &str, revision: &str, repo: Repo, options: &HubOptions) -> Result<PathBuf> {
    let cache = Cache::new(options.cache_dir.clone()).repo(repo);
    let not_cached = |file: &str| Error::NotCached {
        repo: id.to_owned(),
        revision: revision.to_owned(),
        file: file.to_owned(),
        cache: options.cache_dir.clone(),
    };
    let config = cache
        .get("config.json")
        .ok_or_else(|| not_cached("config.json"))?;
    let dir = config.parent().map(Path::to_owned).unwrap_or_default();
    if let Some(index) = cache.get(INDEX_FILE) {
        for shard in shard_files(&index)? {
            cache.get(&shard).ok_or_else(|| not_cached(&shard))?;
        }
    } else {
        cache
            .get(SINGLE_FILE)
            .ok_or_else(|| not_cached(SINGLE_FILE))?;
    }
    Ok(dir)
}

fn download(id: &str, revision: &str, repo: Repo, options: &HubOptions) -> Result<PathBuf> {
    let mut builder = ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
        .with_progress(options.progress);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let fail = |file: &str| {
        let file = file.to_owned();
        move |source| Error::Download {
            repo: id.to_owned(),
            revision: revision.to_owned(),
            file,
            source: Box::new(source),
        }
    };
    let api = builder.build().map_err(fail("(connecting)"))?;
    let api = api.repo(repo);
    let info = api.info().map_err(fail("(repository listing)"))?;
    let listed = |f: &str| info.siblings.iter().any(|s| s.rfilename == f);
    let config = api.get("config.json").map_err(fail("config.json"))?;
    if listed(INDEX_FILE) {
        let index = api.get(INDEX_FILE).map_err(fail(INDEX_FILE))?;
        for shard in shard_files(&index)? {
            api.get(&shard).map_err(fail(&shard))?;
        }
    } else {
        api.get(SINGLE_FILE).map_err(fail(SINGLE_FILE))?;
    }
    for file in OPTIONAL_FILES.iter().filter(|f| listed(f)) {
        api.get(file).map_err(fail(file))?;
    }
    Ok(config.parent().map(Path::to_owned).unwrap_or_default())
}

/// The distinct shard file names listed in a `model.safetensors.index.json`.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_owned(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_owned(),
        source,
    })?;
    let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::ShardIndex {
            path: index.to_owned(),
            problem: "no `weight_map` object".into(),
        });
    };
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("mistralai/Mixtral-8x7B-Instruct-v0.1"));
        assert!(is_hub_id(
            "TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ@gptq-4bit-32g-actorder_True"
        ));
        assert!(!is_hub_id("./model"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("a/b/c"));
        assert_eq!(split_spec("a/b@rev", "main"), ("a/b", "rev"));
        assert_eq!(split_spec("a/b", "main"), ("a/b", "main"));
    }
}
