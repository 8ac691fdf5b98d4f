//! `eval --device`: an unknown device is a usage error, and `cuda` either scores on the GPU (same
//! perplexity as the CPU, `BENCHMARKS.md`) or, on a machine without CUDA, fails with a named error
//! (exit code 2), never a panic.

use crate::util::{fixture, run_in, text};

fn eval(device: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("moe-s");
    let python = fixture("eval/python.txt");
    run_in(
        dir.path(),
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--text",
            python.to_str().unwrap(),
            "--convention",
            "gptq-2048",
            "--no-save",
            "--device",
            device,
        ],
    )
}

#[test]
fn unknown_device_is_an_error() {
    let out = eval("tpu");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected `cpu`, `cuda` or `cuda:N`"),
        "{}",
        text(&out)
    );
}

#[test]
fn cuda_device_scores_or_names_what_is_missing() {
    let out = eval("cuda");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // CPU reference of the bundled model on python.txt (BENCHMARKS.md): 21.27289.
        assert!(stdout.contains("ppl 21.27"), "{}", text(&out));
    } else {
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            stderr.contains("CUDA") && !stderr.contains("panicked"),
            "{}",
            text(&out)
        );
        eprintln!("no GPU here: {}", stderr.trim());
    }
}
