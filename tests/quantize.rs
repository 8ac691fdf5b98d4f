//! `regenerate` / `quantize` on the bundled fixture against the independent PyTorch reference
//! (`fixtures/reference-ppl.json`, recipe 32 x 512, seed 0).
//!
//! The slowest tests of the suite: all seven GPTQ branches are quantized once and each is evaluated
//! on both texts (gptq-2048); the RTN check does the same with `--rtn`.

use std::path::Path;

use serde_json::Value;

use crate::util::{fixture, run_in, text};

/// A faithful GPTQ lands within about 0.2 % of the reference (floating-point order differs, and a
/// few tokens route differently); the test allows 0.3 %.
const GPTQ_REL: f64 = 0.003;
/// RTN has no calibration: the codes are the reference's bit for bit (its scale is PyTorch-on-CUDA's
/// `range * fl32(1 / maxq)`), so only the forward pass's rounding differs (about 1e-5 measured).
/// The bound is 0.1 %.
const RTN_REL: f64 = 0.001;

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference-ppl.json")).unwrap()).unwrap()
}

fn regenerate(dir: &Path, extra: &[&str]) -> Value {
    let json = dir.join("regenerate.json");
    let mut args = vec![
        "regenerate",
        "--out",
        "branches",
        "--no-baseline",
        "--quiet",
        "--json",
    ];
    args.push(json.to_str().unwrap());
    args.extend_from_slice(extra);
    let out = run_in(dir, &args);
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn check_ppl(result: &Value, expected: &Value, rel: f64) -> Vec<String> {
    let mut failures = Vec::new();
    for b in result["branches"].as_array().unwrap() {
        let name = b["branch"].as_str().unwrap();
        for (key, got) in b["ppl"].as_object().unwrap() {
            let want = expected[name][key]
                .as_f64()
                .unwrap_or_else(|| panic!("no reference {name} {key}"));
            let got = got.as_f64().unwrap();
            let d = got / want - 1.0;
            eprintln!(
                "{name:<32} {key:<24} {got:>10.4} reference {want:>10.4} ({:+.3}%)",
                d * 100.0
            );
            if d.abs() > rel {
                failures.push(format!(
                    "{name} {key}: {got} vs {want} ({:+.3}%)",
                    d * 100.0
                ));
            }
        }
    }
    failures
}

#[test]
fn regenerate_gptq_branches_match_reference_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let result = regenerate(tmp.path(), &[]);
    let reference = reference();
    let recipe = &reference["recipes"]["32x512"];
    assert_eq!(
        result["calibration"]["stream_tokens"],
        recipe["calibration"]["stream_tokens"]
    );
    let branches = result["branches"].as_array().unwrap();
    assert_eq!(branches.len(), 7);

    // Starved experts: the same modules as the reference. Their token counts follow each
    // implementation's own quantized earlier layers (routing near ties), so they are not compared
    // one by one (layer 3 expert 7 saw 14 to 21 tokens here against the reference's 15); each must
    // stay under the rule's threshold, 0.5 % of the 32 x 512 calibration tokens.
    let threshold = 0.005 * (32.0 * 512.0);
    let want: Vec<(String, u64)> = recipe["starved_experts_rtn"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_u64().unwrap()))
        .collect();
    for b in branches {
        let mut experts: Vec<(String, u64)> = Vec::new();
        for s in b["starved"].as_array().unwrap() {
            let module = s[0].as_str().unwrap();
            let expert = module.rsplit_once('.').unwrap().0.to_string();
            if !experts.iter().any(|(e, _)| *e == expert) {
                experts.push((expert, s[1].as_u64().unwrap()));
            }
        }
        experts.sort();
        let names: Vec<&String> = experts.iter().map(|e| &e.0).collect();
        let want_names: Vec<&String> = want.iter().map(|e| &e.0).collect();
        assert_eq!(
            names, want_names,
            "{}: starved experts {experts:?}",
            b["branch"]
        );
        for (expert, got) in &experts {
            assert!(
                (*got as f64) < threshold,
                "{}: {expert} saw {got} tokens, not under {threshold} (reference {want:?})",
                b["branch"]
            );
        }
        // The branch is complete and carries its report.
        let dir = tmp.path().join(b["dir"].as_str().unwrap());
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("quant_report.json")).unwrap())
                .unwrap();
        assert_eq!(report["modules"].as_array().unwrap().len(), 4 * 28);
        assert_eq!(report["calibration"]["nsamples"], 32);
    }
    let failures = check_ppl(&result, &recipe["gptq"], GPTQ_REL);
    assert!(
        failures.is_empty(),
        "outside {GPTQ_REL}:\n{}",
        failures.join("\n")
    );
}

#[test]
fn regenerate_rtn_matches_reference_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["--rtn"];
    let result = regenerate(tmp.path(), &extra);
    let reference = reference();
    let rtn = &reference["recipes"]["32x512"]["rtn"];
    assert_eq!(
        result["branches"].as_array().unwrap().len(),
        7,
        "all seven branches"
    );
    let failures = check_ppl(&result, rtn, RTN_REL);
    assert!(
        failures.is_empty(),
        "outside {RTN_REL}:\n{}",
        failures.join("\n")
    );
}
