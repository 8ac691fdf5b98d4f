//! `mixtral-gptq eval`: perplexity of the bundled bf16 model against the independent PyTorch
//! reference (`fixtures/reference-ppl.json`), and the evaluation-data paths.

use std::path::Path;
use std::sync::OnceLock;

use serde_json::Value;

use crate::util::{fixture, run_in, text};

/// Relative tolerance against the reference perplexities: the reference ran the forward pass in
/// fp32 from the same bf16 weights, so only summation order differs (brief: within 0.05 %).
const PPL_REL_TOL: f64 = 5e-4;

/// Runs `eval` once per test binary over both texts and both conventions; returns its JSON.
fn bf16_results() -> &'static Value {
    static RESULTS: OnceLock<Value> = OnceLock::new();
    RESULTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("bf16.json");
        let out = run_in(
            dir.path(),
            &[
                "eval",
                "--model",
                fixture("moe-s").to_str().unwrap(),
                "--text",
                fixture("eval/shakespeare.txt").to_str().unwrap(),
                "--text",
                fixture("eval/python.txt").to_str().unwrap(),
                "--convention",
                "all",
                "--json",
                json.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "179497 tokens",
            "133049 tokens",
            "gptq-2048: ppl",
            "llamacpp-512: ppl",
            "scored predictions",
        ] {
            assert!(
                stdout.contains(needle),
                "missing `{needle}`:\n{}",
                text(&out)
            );
        }
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
    })
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference-ppl.json")).unwrap()).unwrap()
}

fn check(key: &str, windows: u64, predictions: u64) {
    let reference = reference();
    let expected = reference["bf16"][key].as_f64().unwrap();
    let got = &bf16_results()["results"][key];
    let ppl = got["ppl"].as_f64().unwrap();
    let rel = (ppl / expected - 1.0).abs();
    eprintln!(
        "{key}: ppl {ppl:.5}, reference {expected:.5}, relative difference {:.2e}",
        rel
    );
    assert!(
        rel < PPL_REL_TOL,
        "{key}: ppl {ppl} vs reference {expected} (relative {rel:.2e} > {PPL_REL_TOL})"
    );
    let text = key.split('/').next().unwrap();
    assert_eq!(
        got["tokens"], reference["eval_tokens"][text],
        "{key}: token count"
    );
    assert_eq!(
        (
            got["windows"].as_u64().unwrap(),
            got["predictions"].as_u64().unwrap()
        ),
        (windows, predictions),
        "{key}"
    );
}

#[test]
fn bf16_shakespeare_gptq_2048_matches_reference() {
    // 179497 / 2048 = 87 windows of 2047 predictions.
    check("shakespeare/gptq-2048", 87, 87 * 2047);
}

#[test]
fn bf16_shakespeare_llamacpp_512_matches_reference() {
    // 179497 / 512 = 350 chunks of 255 scored predictions.
    check("shakespeare/llamacpp-512", 350, 350 * 255);
}

#[test]
fn bf16_python_gptq_2048_matches_reference() {
    check("python/gptq-2048", 64, 64 * 2047);
}

#[test]
fn bf16_python_llamacpp_512_matches_reference() {
    check("python/llamacpp-512", 259, 259 * 255);
}

/// Lays out a Hub cache holding a wikitext-2 test parquet of `rows`.
fn wikitext_cache(root: &Path, rows: &[Option<&str>]) {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = root.join("datasets--Salesforce--wikitext");
    let file = repo
        .join("snapshots")
        .join(commit)
        .join(evaluate::datasets::WIKITEXT2_TEST_FILE);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    evaluate::datasets::write_wikitext_parquet(&file, rows).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
}

#[test]
fn wikitext2_from_an_offline_hub_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let play = std::fs::read_to_string(fixture("eval/shakespeare.txt")).unwrap();
    let lines: Vec<&str> = play.lines().take(120).collect();
    let rows: Vec<Option<&str>> = lines.iter().map(|l| Some(*l)).collect();
    wikitext_cache(&cache, &rows);
    let out = crate::util::bin()
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", &cache)
        .args([
            "eval",
            "--model",
            fixture("moe-s").to_str().unwrap(),
            "--text",
            "wikitext2",
            "--convention",
            "gptq",
            "--ctx",
            "128",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Salesforce/wikitext") && stdout.contains(r#"joined with "\n\n""#),
        "{stdout}"
    );
    assert!(
        stdout.contains("gptq-128: ppl") && stdout.contains("ctx 128"),
        "{stdout}"
    );

    // The same rows joined by hand and given as a text file give the same token count.
    let joined = dir.path().join("joined.txt");
    std::fs::write(&joined, lines.join("\n\n")).unwrap();
    let ids = evaluate::tokenize::encode_file(&fixture("moe-s/tokenizer.json"), &joined).unwrap();
    assert!(
        stdout.contains(&format!("{} tokens", ids.len())),
        "{stdout}"
    );
}

#[test]
fn wikitext2_missing_offline_names_the_cache_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = crate::util::bin()
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", dir.path())
        .args([
            "eval",
            "--model",
            fixture("moe-s").to_str().unwrap(),
            "--text",
            "wikitext2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Salesforce/wikitext") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
}

#[test]
fn bad_convention_and_short_text_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["eval", "--convention", "perplexity-9"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("perplexity-9"),
        "{}",
        text(&out)
    );
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "To be, or not to be").unwrap();
    let out = run_in(
        dir.path(),
        &[
            "eval",
            "--model",
            fixture("moe-s").to_str().unwrap(),
            "--text",
            short.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fewer than one window"),
        "{}",
        text(&out)
    );
}
