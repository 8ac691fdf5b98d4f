//! Hub ids resolve offline through a cache directory laid out as the Hub lays it out
//! (`models--org--name/refs/<rev>` holding the commit, `snapshots/<commit>/<files>`), built here
//! from the bundled fixture.

mod common;

use std::path::{Path, PathBuf};

use common::fixture_model;
use runtime::{resolve, Checkpoint, Error, HubOptions};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn options(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_owned(),
        offline: true,
        revision: "main".into(),
        progress: false,
        endpoint: None,
    }
}

/// Lays out `models--org--moe-s` with `files` of the fixture symlinked into the snapshot.
fn cache_with(files: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--moe-s");
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let fixture = std::fs::canonicalize(fixture_model()).unwrap();
    for f in files {
        std::os::unix::fs::symlink(fixture.join(f), snapshot.join(f)).unwrap();
    }
    (cache, snapshot)
}

#[test]
fn hub_id_resolves_from_the_cache_offline() {
    let (cache, snapshot) = cache_with(&["config.json", "model.safetensors", "tokenizer.json"]);
    let dir = resolve("org/moe-s", &options(cache.path())).unwrap();
    assert_eq!(dir, snapshot);
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.config().hidden_size, 256);
    // An explicit revision that the cache has a ref for.
    std::fs::write(cache.path().join("models--org--moe-s/refs/v1"), COMMIT).unwrap();
    assert_eq!(
        resolve("org/moe-s@v1", &options(cache.path())).unwrap(),
        snapshot
    );
}

#[test]
fn missing_cached_file_is_named() {
    let (cache, _) = cache_with(&["config.json"]);
    let e = resolve("org/moe-s", &options(cache.path())).unwrap_err();
    assert!(matches!(e, Error::NotCached { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("org/moe-s")
            && msg.contains("model.safetensors")
            && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
    // A repository that is not cached at all.
    let e = resolve(
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        &options(cache.path()),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("mistralai/Mixtral-8x7B-Instruct-v0.1")
            && e.to_string().contains("config.json"),
        "{e}"
    );
    // An unknown revision.
    let e = resolve("org/moe-s@nope", &options(cache.path())).unwrap_err();
    assert!(e.to_string().contains("@nope"), "{e}");
}

#[test]
fn local_directory_and_bad_spec() {
    let dir = fixture_model();
    assert_eq!(
        resolve(dir.to_str().unwrap(), &options(Path::new("/nonexistent"))).unwrap(),
        dir
    );
    let e = resolve("./no/such/dir", &options(Path::new("/nonexistent"))).unwrap_err();
    assert!(matches!(e, Error::MissingFile { .. }), "{e}");
}

#[test]
fn options_from_env() {
    // One test touches the environment, so no other test in this binary races with it.
    std::env::set_var("HF_HOME", "/tmp/hf-home-test");
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let o = HubOptions::from_env();
    assert_eq!(o.cache_dir, PathBuf::from("/tmp/hf-home-test/hub"));
    assert!(o.offline);
    std::env::set_var("HF_HUB_CACHE", "/tmp/hf-cache-test");
    std::env::set_var("HF_HUB_OFFLINE", "0");
    let o = HubOptions::from_env();
    assert_eq!(o.cache_dir, PathBuf::from("/tmp/hf-cache-test"));
    assert!(!o.offline);
}
