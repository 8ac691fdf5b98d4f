//! `mixtral-gptq compare`: one table per evaluation text (terminal, Markdown, CSV, JSON) and a
//! chart of perplexity against size on disk, from branch directories and stored `eval.json`s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use evaluate::compare::{build_tables, BranchSummary, Table};
use evaluate::datasets::EvalText;
use evaluate::results::{EvalEntry, EvalResults, EVAL_FILE};
use serde_json::Value;

use crate::cmd::eval::{conventions, Evaluator};
use crate::cmd::{bundled, bundled_eval_texts};

/// Arguments of `mixtral-gptq compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Branch directories (as written by `quantize`/`regenerate`).
    #[arg(required = true, value_name = "BRANCH_DIR")]
    pub branches: Vec<PathBuf>,
    /// The unquantized model the branches were made from (directory or Hub id); default: the bundled fixture.
    #[arg(long)]
    pub baseline: Option<String>,
    /// Evaluation texts (repeatable; file, wikitext parquet, or `wikitext2`); default: the bundled
    /// `fixtures/eval/shakespeare.txt` and `python.txt`.
    #[arg(long = "text", value_name = "FILE|wikitext2")]
    pub texts: Vec<String>,
    /// Conventions: `gptq-2048`, `llamacpp-512` or `all`.
    #[arg(long, default_value = "all")]
    pub convention: String,
    /// Output directory for the tables and charts.
    #[arg(long, default_value = "comparison")]
    pub out: PathBuf,
    /// Don't evaluate what is missing from the stored results; show it as `-`.
    #[arg(long)]
    pub no_eval: bool,
}

/// Bytes of the weight files (`*.safetensors`) in `dir`.
pub fn weight_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "safetensors") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn ppl_map(results: &EvalResults) -> BTreeMap<String, f64> {
    results
        .results
        .iter()
        .map(|(k, e)| (k.clone(), e.perplexity.ppl))
        .collect()
}

/// Reads a branch directory: `quantize_config.json` (required), `quant_report.json` and
/// `eval.json` (optional), and the size of its weight files.
pub fn read_branch(dir: &Path) -> anyhow::Result<BranchSummary> {
    let config = read_json(&dir.join("quantize_config.json"))
        .context("a branch directory needs quantize_config.json")?;
    let report_path = dir.join("quant_report.json");
    let report = if report_path.is_file() {
        Some(read_json(&report_path)?)
    } else {
        None
    };
    let results = EvalResults::load_or_default(&dir.join(EVAL_FILE), &dir.display().to_string())?;
    let name = report
        .as_ref()
        .and_then(|r| r["branch"].as_str().map(String::from))
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    let calibration = report.as_ref().map(|r| &r["calibration"]);
    Ok(BranchSummary {
        name,
        bits: Some(
            config["bits"]
                .as_u64()
                .context("quantize_config.json: `bits` missing")? as u32,
        ),
        group_size: Some(
            config["group_size"]
                .as_i64()
                .context("quantize_config.json: `group_size` missing")? as i32,
        ),
        desc_act: Some(config["desc_act"].as_bool().unwrap_or(false)),
        damp_percent: config["damp_percent"].as_f64(),
        dataset: calibration.and_then(|c| c["dataset"].as_str().map(String::from)),
        seqlen: calibration.and_then(|c| c["seqlen"].as_u64().map(|s| s as usize)),
        size_bytes: weight_bytes(dir)?,
        ppl: ppl_map(&results),
        quant_seconds: report.as_ref().and_then(|r| r["total_seconds"].as_f64()),
    })
}

/// Where the baseline's results are stored: `<out>/baseline-eval.json`.
/// Where `compare` keeps the dense model's results inside its output directory.
pub fn baseline_results_path(out: &Path) -> PathBuf {
    out.join("baseline-eval.json")
}

/// Evaluates the `(text, convention)` pairs missing from `results` for the model at `spec`.
fn fill_missing(
    spec: &str,
    results: &mut EvalResults,
    texts: &[EvalText],
    convs: &[evaluate::Convention],
) -> anyhow::Result<bool> {
    let missing: Vec<(&EvalText, evaluate::Convention)> = texts
        .iter()
        .flat_map(|t| convs.iter().map(move |c| (t, *c)))
        .filter(|(t, c)| results.ppl(&t.name, &c.to_string()).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let mut evaluator = Evaluator::load(spec, "cpu")?;
    let mut encoded: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (text, conv) in missing {
        if !encoded.contains_key(&text.name) {
            encoded.insert(text.name.clone(), evaluator.encode(text)?);
        }
        let ppl = evaluator.run(text, &encoded[&text.name], conv)?;
        println!("{spec}: {} {}", text.name, ppl.summary());
        results.insert(EvalEntry {
            text: text.name.clone(),
            source: text.source.clone(),
            perplexity: ppl,
        });
    }
    Ok(true)
}

/// Evaluates, for each branch directory, the `(text, convention)` pairs missing from its
/// `eval.json`, and stores them there; returns each directory's results.
pub fn evaluate_dirs(
    branches: &[PathBuf],
    texts: &[EvalText],
    convs: &[evaluate::Convention],
) -> anyhow::Result<Vec<EvalResults>> {
    let mut all = Vec::with_capacity(branches.len());
    for dir in branches {
        let path = dir.join(EVAL_FILE);
        let mut results = EvalResults::load_or_default(&path, &dir.display().to_string())?;
        if fill_missing(&dir.display().to_string(), &mut results, texts, convs)? {
            results.save(&path)?;
        }
        all.push(results);
    }
    Ok(all)
}

/// Builds and writes the comparison of `branches` against `baseline` into `out`; prints the tables.
/// Missing results are evaluated (and stored) unless `no_eval`.
pub fn compare_dirs(
    baseline: &str,
    branches: &[PathBuf],
    text_specs: &[String],
    convention: &str,
    out: &Path,
    no_eval: bool,
) -> anyhow::Result<Vec<Table>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let convs = conventions(convention, None)?;
    let texts = if no_eval {
        Vec::new()
    } else {
        text_specs
            .iter()
            .map(|t| EvalText::load(t).with_context(|| format!("reading {t}")))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let base_path = baseline_results_path(out);
    let mut base_results = EvalResults::load_or_default(&base_path, baseline)?;
    if !no_eval && fill_missing(baseline, &mut base_results, &texts, &convs)? {
        base_results.save(&base_path)?;
    }
    let base_dir = runtime::resolve(baseline, &runtime::HubOptions::from_env())
        .with_context(|| format!("resolving {baseline}"))?;
    let base = BranchSummary {
        name: "bf16".into(),
        bits: None,
        group_size: None,
        desc_act: None,
        damp_percent: None,
        dataset: None,
        seqlen: None,
        size_bytes: weight_bytes(&base_dir)?,
        ppl: ppl_map(&base_results),
        quant_seconds: None,
    };
    evaluate_dirs(branches, &texts, &convs)?;
    let mut summaries = Vec::new();
    for dir in branches {
        summaries
            .push(read_branch(dir).with_context(|| format!("reading branch {}", dir.display()))?);
    }
    let tables = build_tables(&base, &summaries);
    let model = base_dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let mut markdown = String::from("# Branch comparison\n\n");
    for table in &tables {
        println!("\n{}", table.to_terminal());
        markdown.push_str(&table.to_markdown());
        markdown.push('\n');
        write(
            &out.join(format!("comparison-{}.csv", table.text)),
            &table.to_csv(),
        )?;
        let (png, svg) = (
            out.join(format!("ppl-vs-size-{}.png", table.text)),
            out.join(format!("ppl-vs-size-{}.svg", table.text)),
        );
        evaluate::chart::draw(table, &model, &png, &svg)?;
    }
    write(&out.join("comparison.md"), &markdown)?;
    write(
        &out.join("comparison.json"),
        &(serde_json::to_string_pretty(&tables)? + "\n"),
    )?;
    println!("\ntables and charts written to {}", out.display());
    Ok(tables)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs `mixtral-gptq compare`.
pub fn run(args: CompareArgs) -> anyhow::Result<ExitCode> {
    let baseline = args
        .baseline
        .clone()
        .unwrap_or_else(|| bundled("fixtures/moe-s").display().to_string());
    let texts: Vec<String> = if args.texts.is_empty() {
        bundled_eval_texts()
    } else {
        args.texts.clone()
    };
    compare_dirs(
        &baseline,
        &args.branches,
        &texts,
        &args.convention,
        &args.out,
        args.no_eval,
    )?;
    Ok(ExitCode::SUCCESS)
}
