//! The calibration dataset on the Hugging Face Hub (`VMware/open-instruct`), through hf-hub's
//! cache.
//!
//! Online, files are fetched with hf-hub's sync API into the standard cache (resumable, with a
//! progress bar). With `HF_HUB_OFFLINE=1` nothing is fetched: the file must already be in the
//! cache, laid out as the Hub clients lay it out:
//! `<cache>/datasets--VMware--open-instruct/{refs/<revision>, snapshots/<commit>/<file>}`.
//! The cache directory is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The dataset repository the published branches were calibrated on.
pub const OPEN_INSTRUCT_REPO: &str = "VMware/open-instruct";

/// Its one parquet file (split `train`).
pub const OPEN_INSTRUCT_FILE: &str = "data/train-00000-of-00001-c6f4e090ee7100b6.parquet";

/// One file of a dataset repository on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDataset {
    /// Repository id, `owner/name`.
    pub repo: String,
    /// Branch, tag or commit hash.
    pub revision: String,
    /// Path of the parquet file inside the repository.
    pub file: String,
}

impl Default for HubDataset {
    /// `VMware/open-instruct` at `main`, its train parquet.
    fn default() -> Self {
        Self {
            repo: OPEN_INSTRUCT_REPO.to_string(),
            revision: "main".to_string(),
            file: OPEN_INSTRUCT_FILE.to_string(),
        }
    }
}

impl HubDataset {
    /// Whether `spec` looks like a Hub repository id (`owner/name`, no further path, no `.parquet`).
    pub fn looks_like_repo_id(spec: &str) -> bool {
        let mut parts = spec.split('/');
        let valid = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if valid(a) && valid(b))
            && !spec.ends_with(".parquet")
    }

    /// Resolves to a local path: from the cache when `HF_HUB_OFFLINE` is set, otherwise through
    /// the Hub API (which also uses the cache and downloads only what is missing).
    ///
    /// # Errors
    /// [`Error::Hub`] if the file is not cached (offline) or cannot be downloaded.
    pub fn resolve(&self) -> Result<PathBuf> {
        let cache = cache_dir_from_env()
            .ok_or_else(|| self.error("no cache directory: set HF_HUB_CACHE or HF_HOME"))?;
        if offline_from_env() {
            self.resolve_in_cache(&cache)
        } else {
            self.download(&cache)
        }
    }

    /// Finds the file in a Hub cache directory without any network access.
    ///
    /// `revision` is looked up in `refs/` (a branch or tag); a 40-hex-digit revision may also be
    /// a commit that has a snapshot but no ref.
    ///
    /// # Errors
    /// [`Error::Hub`] naming the directory looked in when the ref or the file is absent.
    pub fn resolve_in_cache(&self, cache: &Path) -> Result<PathBuf> {
        let repo_dir = cache.join(Repo::new(self.repo.clone(), RepoType::Dataset).folder_name());
        let ref_path = repo_dir.join("refs").join(&self.revision);
        let commit = match std::fs::read_to_string(&ref_path) {
            Ok(text) => text.trim().to_string(),
            Err(_) if is_commit_hash(&self.revision) => self.revision.clone(),
            Err(_) => {
                return Err(self.error(&format!(
                    "offline (HF_HUB_OFFLINE) and not in the cache: no ref {}",
                    ref_path.display()
                )))
            }
        };
        let path = repo_dir.join("snapshots").join(&commit).join(&self.file);
        if path.is_file() {
            Ok(path)
        } else {
            Err(self.error(&format!(
                "offline (HF_HUB_OFFLINE) and not in the cache: {} does not exist",
                path.display()
            )))
        }
    }

    /// Downloads (or finds in the cache) the file with hf-hub's sync API.
    fn download(&self, cache: &Path) -> Result<PathBuf> {
        let mut builder =
            ApiBuilder::from_cache(Cache::new(cache.to_path_buf())).with_progress(true);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint);
        }
        let api = builder.build().map_err(|e| self.error(&e.to_string()))?;
        let repo = Repo::with_revision(self.repo.clone(), RepoType::Dataset, self.revision.clone());
        api.repo(repo)
            .get(&self.file)
            .map_err(|e| self.error(&e.to_string()))
    }

    fn error(&self, reason: &str) -> Error {
        Error::Hub {
            repo: self.repo.clone(),
            revision: self.revision.clone(),
            file: self.file.clone(),
            reason: reason.to_string(),
        }
    }
}

/// The Hub cache directory the Python clients would use: `HF_HUB_CACHE`, else `HF_HOME/hub`,
/// else `~/.cache/huggingface/hub`. `None` only when none of these can be found.
pub fn cache_dir_from_env() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|home| home.join("hub")))
        .or_else(|| var("HOME").map(|home| home.join(".cache").join("huggingface").join("hub")))
}

/// Whether `HF_HUB_OFFLINE` is set to a true value (`1`, `true`, `yes`, `on`), as huggingface_hub reads it.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn lay_out_cache(root: &Path) -> PathBuf {
        let repo = root.join("datasets--VMware--open-instruct");
        let file = repo.join("snapshots").join(COMMIT).join(OPEN_INSTRUCT_FILE);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"PAR1").unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), COMMIT).unwrap();
        file
    }

    #[test]
    fn resolves_from_a_hub_shaped_cache() {
        let dir = tempfile::tempdir().unwrap();
        let file = lay_out_cache(dir.path());
        assert_eq!(
            HubDataset::default().resolve_in_cache(dir.path()).unwrap(),
            file
        );
        let by_commit = HubDataset {
            revision: COMMIT.into(),
            ..HubDataset::default()
        };
        assert_eq!(by_commit.resolve_in_cache(dir.path()).unwrap(), file);
    }

    #[test]
    fn missing_ref_or_file_names_what_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        lay_out_cache(dir.path());
        let other = HubDataset {
            revision: "v2".into(),
            ..HubDataset::default()
        };
        let msg = other.resolve_in_cache(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("refs/v2") && msg.contains("VMware/open-instruct"),
            "{msg}"
        );
        let other = HubDataset {
            file: "data/other.parquet".into(),
            ..HubDataset::default()
        };
        let msg = other.resolve_in_cache(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("data/other.parquet") && msg.contains(COMMIT),
            "{msg}"
        );
    }

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(HubDataset::looks_like_repo_id("VMware/open-instruct"));
        assert!(!HubDataset::looks_like_repo_id(
            "fixtures/calibration/open-instruct-sample.parquet"
        ));
        assert!(!HubDataset::looks_like_repo_id("data.parquet"));
        assert!(!HubDataset::looks_like_repo_id("./x/y"));
        assert!(!HubDataset::looks_like_repo_id("a/b.parquet"));
    }
}
