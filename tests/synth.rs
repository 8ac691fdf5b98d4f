//! `mixtral-gptq synth`: random Mixtrals of the moe-s shape (2 layers), dense and as GPTQ branches,
//! pass `verify`, load in `eval` with a finite perplexity, do not depend on the thread count, and
//! bad flags are named.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{fixture, run_in, text};

/// A random model's logits have std about 1 over 32000 tokens, so its perplexity is about
/// 32000·e^(1/2) ≈ 53000 (measured 54000 on python.txt); a model of zeros would give exactly 32000.
const RANDOM_PPL: std::ops::Range<f64> = 35_000.0..150_000.0;

/// Runs `synth --shape moe-s --layers 2 --out <dir>/<name> <extra>`, asserting success.
fn synth(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec![
        "synth",
        "--shape",
        "moe-s",
        "--layers",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run_in(dir, &args);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("tokenizer: copied")
            && stdout.contains(" bytes (")
            && stdout.contains("s ("),
        "{}",
        text(&o)
    );
    out
}

/// The perplexity `eval` reports on the first 3000 bytes of python.txt (one 512-token window).
fn perplexity(dir: &Path, model: &Path) -> f64 {
    let short = dir.join("python-head.txt");
    if !short.is_file() {
        let python = std::fs::read(fixture("eval/python.txt")).unwrap();
        std::fs::write(&short, &python[..3000]).unwrap();
    }
    let json = dir.join("ppl.json");
    let o = run_in(
        dir,
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--text",
            short.to_str().unwrap(),
            "--convention",
            "gptq-2048",
            "--ctx",
            "512",
            "--no-save",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = &v["results"]["python-head/gptq-512"];
    assert_eq!(r["predictions"], 511, "{v}");
    r["ppl"].as_f64().unwrap()
}

fn verify(dir: &Path, branch: &Path) -> String {
    let o = run_in(dir, &["verify", branch.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn synthetic_branches_verify_and_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for branch in ["gptq-4bit-128g-actorder_True", "main"] {
        let out = synth(dir, branch, &["--branch", branch]);
        assert!(
            verify(dir, &out).contains("ok (233 tensors, 56 quantized modules checked)"),
            "{branch}"
        );
        let config: Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["num_hidden_layers"], 2);
        assert_eq!(config["quantization_config"]["quant_method"], "gptq");
        let ppl = perplexity(dir, &out);
        assert!(RANDOM_PPL.contains(&ppl), "{branch}: ppl {ppl}");
    }
    let dense = synth(dir, "bf16", &[]);
    assert!(!dense.join("quantize_config.json").exists());
    let ppl = perplexity(dir, &dense);
    assert!(RANDOM_PPL.contains(&ppl), "bf16: ppl {ppl}");
}

#[test]
fn synthetic_output_depends_on_the_seed_not_the_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let branch = "gptq-3bit-128g-actorder_True";
    let a = synth(dir, "a", &["--branch", branch, "--threads", "1"]);
    let b = synth(dir, "b", &["--branch", branch, "--threads", "3"]);
    let c = synth(dir, "c", &["--branch", branch, "--seed", "1"]);
    let model = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(model(&a) == model(&b), "--threads changed the weights");
    assert!(model(&a) != model(&c), "--seed did not change the weights");
    // Sharded: an index and several shards, still a clean branch.
    let s = synth(
        dir,
        "s",
        &["--branch", branch, "--max-shard-size", "8000000"],
    );
    assert!(s.join("model.safetensors.index.json").is_file());
    assert!(!s.join("model.safetensors").exists());
    verify(dir, &s);
}

#[test]
fn bad_synth_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // (flags after `synth --out x`, what the message must name); none of them writes anything.
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--shape", "moe-s", "--branch", "gptq-5bit"],
            &["--branch", "gptq-5bit", "bf16"],
        ),
        (&["--shape", "moe-xl"], &["--shape", "8x7b", "moe-s"]),
        (
            &[
                "--shape",
                "moe-s",
                "--branch",
                "gptq-4bit-128g-actorder_True",
                "--intermediate",
                "520",
            ],
            &["--intermediate", "128", "520"],
        ),
        (
            &["--shape", "moe-s", "--heads", "6"],
            &["--hidden", "--heads", "6"],
        ),
        (
            &["--shape", "moe-s", "--top-k", "9"],
            &["--top-k", "at most"],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = vec!["synth", "--out", "x"];
        args.extend_from_slice(extra);
        let o = run_in(dir, &args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", text(&o));
        for n in needles {
            assert!(stderr.contains(n), "{extra:?}: `{n}` not in {stderr}");
        }
        assert!(!dir.join("x").exists() && !dir.join("x.partial").exists());
    }
    // A non-empty --out is refused without --force, replaced with it.
    std::fs::create_dir(dir.join("x")).unwrap();
    std::fs::write(dir.join("x/keep.txt"), "mine").unwrap();
    let o = run_in(
        dir,
        &["synth", "--shape", "moe-s", "--layers", "1", "--out", "x"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert!(dir.join("x/keep.txt").is_file());
    synth(dir, "x", &["--force"]);
    assert!(!dir.join("x/keep.txt").exists() && dir.join("x/model.safetensors").is_file());
}
