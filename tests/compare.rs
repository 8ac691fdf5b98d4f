//! `compare`, `card` and `publish --dry-run` over the fixture's seven branches (made by
//! round-to-nearest so the test is fast), with stored perplexities from `reference-ppl.json`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::util::{fixture, run_in, text};

/// The seven branches, in TheBloke's order.
const BRANCHES: [&str; 7] = [
    "main",
    "gptq-4bit-128g-actorder_True",
    "gptq-4bit-32g-actorder_True",
    "gptq-3bit--1g-actorder_True",
    "gptq-3bit-128g-actorder_True",
    "gptq-8bit--1g-actorder_True",
    "gptq-8bit-128g-actorder_True",
];

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    branches: Vec<PathBuf>,
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference-ppl.json")).unwrap()).unwrap()
}

/// `eval.json` content holding `ppl` by `text/convention`.
fn eval_json(model: &str, ppl: &Value) -> Value {
    let mut results = serde_json::Map::new();
    for (key, value) in ppl.as_object().unwrap() {
        let (text, conv) = key.split_once('/').unwrap();
        let ctx: u64 = conv.rsplit('-').next().unwrap().parse().unwrap();
        results.insert(
            key.clone(),
            json!({"text": text, "source": "reference-ppl.json", "convention": conv,
                   "kind": conv.split('-').next().unwrap(), "ctx": ctx, "tokens": 0, "windows": 0,
                   "predictions": 0, "nll_sum": 0.0, "ppl": value, "seconds": 0.0}),
        );
    }
    json!({"model": model, "results": results})
}

/// Seven RTN branches of moe-s with their stored results, once per test binary.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let reference = reference();
        let mut branches = Vec::new();
        for b in BRANCHES {
            let out = run_in(
                &root,
                &[
                    "quantize", "--branch", b, "--rtn", "--out", "branches", "-q",
                ],
            );
            assert!(out.status.success(), "{}", text(&out));
            let branch = root.join("branches").join(b);
            let ppl = &reference["recipes"]["128x2048"]["rtn"][b];
            std::fs::write(branch.join("eval.json"), eval_json(b, ppl).to_string()).unwrap();
            branches.push(branch);
        }
        std::fs::create_dir_all(root.join("comparison")).unwrap();
        std::fs::write(
            root.join("comparison/baseline-eval.json"),
            eval_json("bf16", &reference["bf16"]).to_string(),
        )
        .unwrap();
        Setup {
            _dir: dir,
            root,
            branches,
        }
    })
}

fn args<'a>(head: &[&'a str], branches: &'a [PathBuf]) -> Vec<&'a str> {
    head.iter()
        .copied()
        .chain(branches.iter().map(|b| b.to_str().unwrap()))
        .collect()
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert_eq!(&bytes[12..16], b"IHDR");
    (
        u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
    )
}

#[test]
fn compare_writes_tables_and_charts_for_the_seven_branches() {
    let s = setup();
    let out = run_in(
        &s.root,
        &args(
            &["compare", "--baseline", fixture("moe-s").to_str().unwrap()],
            &s.branches,
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reference = reference();
    let rtn = &reference["recipes"]["128x2048"]["rtn"];
    for text_name in ["shakespeare", "python"] {
        let dir = s.root.join("comparison");
        // JSON: one table per text, bf16 + seven rows, differences against bf16.
        let tables: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("comparison.json")).unwrap())
                .unwrap();
        let table = tables
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["text"] == text_name)
            .unwrap();
        assert_eq!(table["conventions"], json!(["gptq-2048", "llamacpp-512"]));
        let rows = table["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 8);
        assert_eq!(rows[0]["branch"], "bf16");
        let base = reference["bf16"][format!("{text_name}/gptq-2048")]
            .as_f64()
            .unwrap();
        for (row, b) in rows[1..].iter().zip(BRANCHES) {
            assert_eq!(row["branch"], b);
            let p = rtn[b][format!("{text_name}/gptq-2048")].as_f64().unwrap();
            assert_eq!(row["ppl"][0].as_f64().unwrap(), p);
            let delta = row["delta_pct"][0].as_f64().unwrap();
            assert!(
                (delta - 100.0 * (p / base - 1.0)).abs() < 1e-9,
                "{b}: {delta}"
            );
            let size = std::fs::metadata(s.root.join("branches").join(b).join("model.safetensors"))
                .unwrap()
                .len();
            assert_eq!(row["size_bytes"].as_u64().unwrap(), size);
            assert!(row["quant_seconds"].as_f64().unwrap() > 0.0);
        }
        // CSV: header + 8 rows, equal column counts.
        let csv = std::fs::read_to_string(dir.join(format!("comparison-{text_name}.csv"))).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 9, "{csv}");
        assert!(
            lines
                .iter()
                .all(|l| l.split(',').count() == lines[0].split(',').count()),
            "{csv}"
        );
        // Markdown and terminal.
        let md = std::fs::read_to_string(dir.join("comparison.md")).unwrap();
        assert!(
            md.contains(&format!("Perplexity on `{text_name}`"))
                && md.contains("| `gptq-3bit--1g-actorder_True` | 3 | None | Yes |"),
            "{md}"
        );
        assert!(
            stdout.contains(&format!("Perplexity on `{text_name}`")),
            "{stdout}"
        );
        // Charts: PNG and SVG of the chart's size, one point per branch plus bf16.
        assert_eq!(
            png_size(&dir.join(format!("ppl-vs-size-{text_name}.png"))),
            (evaluate::chart::WIDTH, evaluate::chart::HEIGHT)
        );
        let svg =
            std::fs::read_to_string(dir.join(format!("ppl-vs-size-{text_name}.svg"))).unwrap();
        assert!(svg.contains(&format!(
            r#"width="{}" height="{}""#,
            evaluate::chart::WIDTH,
            evaluate::chart::HEIGHT
        )));
        // 8 data points + one legend marker per series (bf16, 3-, 4-, 8-bit).
        assert_eq!(svg.matches("<circle").count(), 8 + 4, "points in the SVG");
        for label in ["bf16", "4-bit (main)", "4-bit g32", "3-bit g128", "8-bit"] {
            assert!(svg.contains(label), "label {label}");
        }
    }
}

#[test]
fn card_table_matches_the_branch_reports() {
    let s = setup();
    let card = s.root.join("README.md");
    let out = run_in(
        &s.root,
        &args(
            &[
                "card",
                "--repo",
                "someone/Mixtral-8x7B-Instruct-v0.1-GPTQ",
                "--baseline-eval",
                "comparison/baseline-eval.json",
                "--out",
                card.to_str().unwrap(),
            ],
            &s.branches,
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let card = std::fs::read_to_string(&card).unwrap();
    let reference = reference();
    for (dir, b) in s.branches.iter().zip(BRANCHES) {
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("quant_report.json")).unwrap())
                .unwrap();
        let row = card
            .lines()
            .find(|l| l.starts_with(&format!("| [{b}](")))
            .unwrap_or_else(|| panic!("no row for {b}:\n{card}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | branch | bits | GS | act | damp | dataset | seq len | size | ppl... | ExLlama | desc |
        assert_eq!(cells[2], report["bits"].to_string(), "{row}");
        let gs = report["group_size"].as_i64().unwrap();
        assert_eq!(
            cells[3],
            if gs < 0 {
                "None".to_string()
            } else {
                gs.to_string()
            },
            "{row}"
        );
        assert_eq!(cells[4], "Yes", "{row}");
        assert_eq!(cells[5], report["damp_percent"].to_string(), "{row}");
        let size = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len();
        assert_eq!(cells[8], evaluate::compare::format_size(size), "{row}");
        let p = reference["recipes"]["128x2048"]["rtn"][b]["python/gptq-2048"]
            .as_f64()
            .unwrap();
        assert_eq!(
            cells[9],
            format!("{p:.4}"),
            "python/gptq-2048 column: {row}"
        );
        let exllama = if report["bits"] == 4 { "Yes" } else { "No" };
        assert_eq!(cells[cells.len() - 3], exllama, "{row}");
    }
    assert!(
        card.contains("PPL python (gptq-2048)") && card.contains("PPL shakespeare (llamacpp-512)"),
        "{card}"
    );
    assert!(card.contains("| (unquantized, bf16) | 16 |"), "{card}");
    assert!(card.contains("<s>[INST] {prompt} [/INST]"));
    assert!(card.contains("hf download someone/Mixtral-8x7B-Instruct-v0.1-GPTQ --revision gptq-4bit-128g-actorder_True"));
    assert!(
        card.contains("| `gptq-4bit-32g-actorder_True` | Yes | Yes | Yes | No (1) | Yes |"),
        "{card}"
    );
}

#[test]
fn publish_dry_run_plans_every_branch_and_never_needs_the_token() {
    let s = setup();
    let card = s.root.join("card.md");
    std::fs::write(&card, "# card\n").unwrap();
    let out = crate::util::bin()
        .current_dir(&s.root)
        .env("HF_TOKEN", "hf_secret_never_printed")
        .args(args(
            &[
                "publish",
                "--repo",
                "someone/M-GPTQ",
                "--card",
                card.to_str().unwrap(),
                "--dry-run",
            ],
            &s.branches,
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text(&out).contains("hf_secret_never_printed"),
        "token leaked"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        "hf repo create someone/M-GPTQ --repo-type model --exist-ok"
    );
    for (dir, b) in s.branches.iter().zip(BRANCHES) {
        let upload = format!(
            "hf upload someone/M-GPTQ {} . --repo-type model --revision {b} --commit-message 'Upload GPTQ branch {b}'",
            dir.display()
        );
        let up = lines
            .iter()
            .position(|l| *l == upload)
            .unwrap_or_else(|| panic!("no `{upload}` in\n{stdout}"));
        if b != "main" {
            let create =
                format!("hf repo branch create someone/M-GPTQ {b} --repo-type model --exist-ok");
            assert_eq!(lines[up - 1], create, "{stdout}");
        }
    }
    assert_eq!(lines.len(), 1 + 6 + 7 + 1, "{stdout}");
    assert!(
        lines[lines.len() - 1].contains(" README.md --repo-type model --revision main"),
        "{stdout}"
    );

    // Without the dry run and without HF_TOKEN nothing runs.
    let out = crate::util::bin()
        .current_dir(&s.root)
        .env_remove("HF_TOKEN")
        .args(args(&["publish", "--repo", "someone/M-GPTQ"], &s.branches))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HF_TOKEN"),
        "{}",
        text(&out)
    );
}

#[test]
fn publish_skips_a_branch_that_fails_verify() {
    let s = setup();
    let broken = s.root.join("broken").join("main");
    std::fs::create_dir_all(&broken).unwrap();
    for entry in std::fs::read_dir(&s.branches[0]).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, broken.join(p.file_name().unwrap())).unwrap();
    }
    // Declare 3 bits over 4-bit packed tensors.
    let cfg = std::fs::read_to_string(broken.join("quantize_config.json"))
        .unwrap()
        .replace("\"bits\": 4", "\"bits\": 3");
    std::fs::write(broken.join("quantize_config.json"), cfg).unwrap();
    let out = run_in(
        &s.root,
        &[
            "publish",
            "--repo",
            "someone/M-GPTQ",
            "--dry-run",
            broken.to_str().unwrap(),
            s.branches[1].to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains(broken.to_str().unwrap()),
        "broken branch planned:\n{stdout}"
    );
    assert!(
        stdout.contains("--revision gptq-4bit-128g-actorder_True"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fails verify"),
        "{}",
        text(&out)
    );
}
