//! `mixtral-gptq calibrate` over the bundled parquet and tokenizer: recipe v1's reference numbers,
//! the offline Hub path, and errors that say what is wrong.

use std::path::Path;

use calibration::CalibrationSet;

use crate::util::{bin, fixture, run_in, text};

fn id_sum(set: &CalibrationSet) -> i64 {
    set.input_ids.iter().map(|&id| i64::from(id)).sum()
}

/// Lays out a Hub cache holding the bundled parquet as `VMware/open-instruct`'s train file.
fn hub_cache(root: &Path) {
    let commit = "c6f4e090ee7100b6c6f4e090ee7100b6c6f4e090";
    let repo = root.join("datasets--VMware--open-instruct");
    let file = repo
        .join("snapshots")
        .join(commit)
        .join(calibration::OPEN_INSTRUCT_FILE);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::copy(fixture("calibration/open-instruct-sample.parquet"), &file).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
}

#[test]
fn calibrate_32x512_matches_recipe_v1_reference() {
    let dir = tempfile::tempdir().unwrap();
    // Run outside the repository: the bundled dataset and tokenizer are found from the build root.
    let out = run_in(
        dir.path(),
        &[
            "calibrate",
            "--nsamples",
            "32",
            "--seqlen",
            "512",
            "--out",
            "set.safetensors",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("66247 tokens"), "{}", text(&out));
    assert!(
        stdout.contains("id sum         154731268"),
        "{}",
        text(&out)
    );

    let set = CalibrationSet::load(&dir.path().join("set.safetensors")).unwrap();
    assert_eq!((set.nsamples, set.seqlen), (32, 512));
    assert_eq!(
        &set.window(0)[..8],
        &[28732, 1516, 28731, 13, 359, 17422, 3741, 7011]
    );
    assert_eq!(id_sum(&set), 154_731_268);
    let meta = &set.meta;
    assert_eq!(
        (meta.recipe.as_str(), meta.seed, meta.stream_tokens),
        ("v1", 0, 66_247)
    );
    assert_eq!(meta.template, calibration::DEFAULT_TEMPLATE);
    assert_eq!(meta.dataset, "open-instruct-sample.parquet");
    let parquet = fixture("calibration/open-instruct-sample.parquet");
    assert_eq!(
        meta.dataset_sha256,
        calibration::sha256_file(&parquet).unwrap()
    );
    let tokenizer = fixture("moe-s/tokenizer.json");
    assert_eq!(
        meta.tokenizer_sha256,
        calibration::sha256_file(&tokenizer).unwrap()
    );
    // Only the output is left in the directory (the temporary file was renamed).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn calibrate_from_offline_hub_cache_equals_local_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    hub_cache(&cache);
    let args = [
        "calibrate",
        "--dataset",
        "VMware/open-instruct",
        "--nsamples",
        "8",
        "--seqlen",
        "256",
        "--seed",
        "7",
    ];
    let hub = bin()
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", &cache)
        .args(args)
        .args(["--out", "hub.safetensors"])
        .output()
        .unwrap();
    assert!(hub.status.success(), "{}", text(&hub));
    let parquet = fixture("calibration/open-instruct-sample.parquet");
    let local = run_in(
        dir.path(),
        &[
            "calibrate",
            "--dataset",
            parquet.to_str().unwrap(),
            "--nsamples",
            "8",
            "--seqlen",
            "256",
            "--seed",
            "7",
            "--out",
            "local.safetensors",
        ],
    );
    assert!(local.status.success(), "{}", text(&local));
    let hub = CalibrationSet::load(&dir.path().join("hub.safetensors")).unwrap();
    let local = CalibrationSet::load(&dir.path().join("local.safetensors")).unwrap();
    assert_eq!(hub.input_ids, local.input_ids);
    assert_eq!(hub.meta.dataset_sha256, local.meta.dataset_sha256);
    assert_eq!(
        hub.meta.dataset,
        format!(
            "VMware/open-instruct@main:{}",
            calibration::OPEN_INSTRUCT_FILE
        )
    );
}

#[test]
fn calibrate_offline_without_cache_fails_naming_the_repo() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", dir.path().join("empty-cache"))
        .args([
            "calibrate",
            "--dataset",
            "VMware/open-instruct",
            "--out",
            "x.safetensors",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("VMware/open-instruct") && stderr.contains("HF_HUB_OFFLINE"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("x.safetensors").exists());
}

#[test]
fn calibrate_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &[
            "calibrate",
            "--template",
            "[INST] {question}",
            "--out",
            "x.safetensors",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown placeholder `{question}`"),
        "{}",
        text(&out)
    );

    // One window longer than the whole bundled sample: the message gives found and needed.
    let out = run_in(
        dir.path(),
        &[
            "calibrate",
            "--nsamples",
            "1",
            "--seqlen",
            "5000000",
            "--out",
            "x.safetensors",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("needs at least 5000001") && stderr.contains("all 3000 rows"),
        "{}",
        text(&out)
    );

    let out = run_in(
        dir.path(),
        &[
            "calibrate",
            "--dataset",
            "missing.parquet",
            "--out",
            "x.safetensors",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.parquet"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("x.safetensors").exists());
}
