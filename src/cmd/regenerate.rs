//! `mixtral-gptq regenerate`: writes all seven branches (or a chosen few) from one calibration set,
//! then compares their perplexity (`gptq-2048` by default) with the dense model's: one table per
//! text in the terminal, and Markdown/CSV/JSON tables and charts under `comparison/` (`--comparison-out`).
//!
//! With no `--model` it runs on the bundled fixture (`fixtures/moe-s`) with recipe 32 x 512, seed 0,
//! small enough for a 2-core machine. Each branch runs its own calibration forward passes: they
//! depend on that branch's own quantized earlier layers, so nothing can be shared but the windows.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use evaluate::datasets::EvalText;
use evaluate::results::{EvalResults, EVAL_FILE};
use quantize::driver::{write_branch, Options, STARVED_FRACTION};
use quantize::presets::PRESETS;
use quantize::Preset;
use serde_json::{json, Value};

use crate::cmd::bundled_eval_texts;
use crate::cmd::calibrate::{load_or_build, CalibrationOptions};
use crate::cmd::compare::{baseline_results_path, compare_dirs, evaluate_dirs};
use crate::cmd::eval::conventions;
use crate::cmd::quantize::model_dir;

/// Arguments of `mixtral-gptq regenerate`.
#[derive(Debug, clap::Args)]
pub struct RegenerateArgs {
    /// Dense source model: a directory or a Hub id [default: the bundled fixtures/moe-s].
    #[arg(long, value_name = "DIR|HUB_ID")]
    pub model: Option<String>,
    /// Revision of a Hub model.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Output directory; each branch goes to <out>/<branch>.
    #[arg(long, default_value = "branches")]
    pub out: PathBuf,
    /// Only these branches (comma-separated names) [default: all seven].
    #[arg(long, value_delimiter = ',')]
    pub branches: Vec<String>,
    /// A calibration set saved by `mixtral-gptq calibrate`.
    #[arg(long, value_name = "FILE.safetensors")]
    pub calibration: Option<PathBuf>,
    /// Parquet file or Hub dataset id [default: the bundled Open Instruct sample].
    #[arg(long, value_name = "PATH|HUB_ID")]
    pub dataset: Option<String>,
    /// Windows [default: 32 for the bundled fixture, 128 otherwise].
    #[arg(long)]
    pub nsamples: Option<usize>,
    /// Tokens per window [default: 512 for the bundled fixture, 8192 otherwise].
    #[arg(long)]
    pub seqlen: Option<usize>,
    /// Seed of the window sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Round-to-nearest branches instead of GPTQ (no calibration).
    #[arg(long)]
    pub rtn: bool,
    /// Split model.safetensors into shards of at most this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_shard_size: Option<u64>,
    /// Texts to evaluate [default: the bundled fixtures/eval/shakespeare.txt and python.txt].
    #[arg(long = "text", value_name = "FILE")]
    pub texts: Vec<PathBuf>,
    /// Perplexity convention.
    #[arg(long, default_value = "gptq-2048")]
    pub convention: String,
    /// Where the comparison tables and charts go.
    #[arg(long, default_value = "comparison")]
    pub comparison_out: PathBuf,
    /// Skip the evaluation and the comparison.
    #[arg(long)]
    pub no_eval: bool,
    /// Skip evaluating the dense model (and so the comparison files): only the branches' perplexities.
    #[arg(long)]
    pub no_baseline: bool,
    /// Also write everything (timings, starved modules, perplexities) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bars and no per-module log.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: RegenerateArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let presets: Vec<Preset> = if args.branches.is_empty() {
        PRESETS.to_vec()
    } else {
        args.branches
            .iter()
            .map(|b| Preset::by_name(b))
            .collect::<Result<_, _>>()?
    };
    let fixture = args.model.is_none();
    let dir = model_dir(args.model.as_deref(), &args.revision)?;
    let checkpoint = runtime::Checkpoint::open(&dir)
        .with_context(|| format!("opening model {}", dir.display()))?;
    let calib = if args.rtn {
        None
    } else {
        let options = CalibrationOptions {
            dataset: args.dataset.clone(),
            dataset_revision: "main".into(),
            dataset_file: calibration::OPEN_INSTRUCT_FILE.into(),
            tokenizer: Some(dir.join("tokenizer.json")),
            nsamples: args.nsamples.unwrap_or(if fixture { 32 } else { 128 }),
            seqlen: args.seqlen.unwrap_or(if fixture { 512 } else { 8192 }),
            seed: args.seed,
            template: calibration::DEFAULT_TEMPLATE.into(),
        };
        let t0 = Instant::now();
        let c = load_or_build(args.calibration.as_deref(), &options)?;
        eprintln!(
            "calibration: {} x {} tokens, seed {}, {:.1}s",
            c.nsamples,
            c.seqlen,
            c.meta.seed,
            t0.elapsed().as_secs_f64()
        );
        Some(c)
    };

    let mut branches = Vec::new();
    for preset in &presets {
        let opts = Options {
            preset: *preset,
            rtn: args.rtn,
            starved_fraction: STARVED_FRACTION,
            verbose: !args.quiet,
        };
        let (out, report) = write_branch(
            runtime::CpuBackend::new(),
            &checkpoint,
            calib.as_ref(),
            &opts,
            &args.out,
            args.max_shard_size,
        )
        .with_context(|| format!("quantizing {}", preset.name))?;
        let sum =
            |f: fn(&quantize::report::LayerTiming) -> f64| report.layers.iter().map(f).sum::<f64>();
        let timing = json!({
            "total": report.total_seconds,
            "forward": sum(|t| t.forward_seconds),
            "hessian": sum(|t| t.hessian_seconds),
            "solve": sum(|t| t.solve_seconds),
            "write": sum(|t| t.write_seconds),
        });
        eprintln!("{}: {:.1}s ({timing})", out.display(), report.total_seconds);
        let starved: Vec<Value> = report
            .starved()
            .iter()
            .map(|(m, t)| json!([m, t]))
            .collect();
        branches.push(json!({
            "branch": preset.name,
            "dir": out.display().to_string(),
            "method": if args.rtn { "rtn" } else { "gptq" },
            "seconds": timing,
            "starved": starved,
        }));
    }
    let quantize_seconds = start.elapsed().as_secs_f64();

    let mut baseline = Value::Null;
    if !args.no_eval {
        let text_specs: Vec<String> = if args.texts.is_empty() {
            bundled_eval_texts()
        } else {
            args.texts.iter().map(|t| t.display().to_string()).collect()
        };
        let dirs: Vec<PathBuf> = branches
            .iter()
            .map(|e| PathBuf::from(e["dir"].as_str().unwrap_or_default()))
            .collect();
        let as_map = |r: &EvalResults| -> Value {
            Value::Object(
                r.results
                    .iter()
                    .map(|(k, e)| (k.clone(), json!(e.perplexity.ppl)))
                    .collect(),
            )
        };
        let results = if args.no_baseline {
            let texts = text_specs
                .iter()
                .map(|t| EvalText::load(t).with_context(|| format!("reading {t}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let convs = conventions(&args.convention, None)?;
            let results = evaluate_dirs(&dirs, &texts, &convs)?;
            for (dir, r) in dirs.iter().zip(&results) {
                println!("{}: {}", dir.display(), as_map(r));
            }
            results
        } else {
            // The comparison evaluates what is missing (stored in each branch's eval.json),
            // prints one table per text and writes Markdown/CSV/JSON tables and charts.
            let out = &args.comparison_out;
            compare_dirs(
                &dir.display().to_string(),
                &dirs,
                &text_specs,
                &args.convention,
                out,
                false,
            )?;
            baseline = as_map(&EvalResults::load_or_default(
                &baseline_results_path(out),
                &dir.display().to_string(),
            )?);
            dirs.iter()
                .map(|d| EvalResults::load_or_default(&d.join(EVAL_FILE), &d.display().to_string()))
                .collect::<Result<Vec<_>, _>>()?
        };
        for (entry, r) in branches.iter_mut().zip(&results) {
            entry["ppl"] = as_map(r);
        }
    }
    let total = start.elapsed().as_secs_f64();
    eprintln!("regenerate: quantization {quantize_seconds:.1}s, total {total:.1}s");
    if let Some(path) = &args.json {
        let doc = json!({
            "model": dir.display().to_string(),
            "calibration": calib.as_ref().map(|c| quantize::report::calibration_json(&c.meta)),
            "baseline": baseline,
            "branches": branches,
            "quantize_seconds": quantize_seconds,
            "total_seconds": total,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
