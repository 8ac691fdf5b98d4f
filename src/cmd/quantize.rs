//! `mixtral-gptq quantize`: one GPTQ branch from a dense Mixtral (spec §1), written atomically with
//! `quant_report.json` beside the weights.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use quantize::driver::{write_branch, Options, STARVED_FRACTION};
use quantize::Preset;

use crate::cmd::bundled;
use crate::cmd::calibrate::{load_or_build, CalibrationOptions};

/// The bundled model, relative to the repository root.
pub const BUNDLED_MODEL: &str = "fixtures/moe-s";

/// Arguments of `mixtral-gptq quantize`.
#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    /// Branch to write: main, gptq-4bit-128g-actorder_True, gptq-4bit-32g-actorder_True,
    /// gptq-3bit--1g-actorder_True, gptq-3bit-128g-actorder_True, gptq-8bit--1g-actorder_True,
    /// gptq-8bit-128g-actorder_True.
    #[arg(long)]
    pub branch: String,
    /// Dense source model: a directory or a Hub id [default: the bundled fixtures/moe-s].
    #[arg(long, value_name = "DIR|HUB_ID")]
    pub model: Option<String>,
    /// Revision of a Hub model.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// A calibration set saved by `mixtral-gptq calibrate` (otherwise built from the options below).
    #[arg(long, value_name = "FILE.safetensors")]
    pub calibration: Option<PathBuf>,
    #[command(flatten)]
    pub calib: CalibrationOptions,
    /// Output directory; the branch is written to <out>/<branch>.
    #[arg(long, default_value = "branches")]
    pub out: PathBuf,
    /// Round-to-nearest for every module instead of GPTQ (no calibration needed).
    #[arg(long)]
    pub rtn: bool,
    /// Split model.safetensors into shards of at most this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_shard_size: Option<u64>,
    /// Modules whose input saw fewer than this fraction of the calibration tokens are quantized by
    /// round-to-nearest (never zeroed).
    #[arg(long, default_value_t = STARVED_FRACTION)]
    pub starved_fraction: f64,
    /// No progress bar and no per-module log.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The model directory for `--model` (`None`: the bundled fixture).
pub fn model_dir(model: Option<&str>, revision: &str) -> anyhow::Result<PathBuf> {
    match model {
        None => Ok(bundled(BUNDLED_MODEL)),
        Some(spec) => {
            let mut options = runtime::HubOptions::from_env();
            options.revision = revision.to_string();
            runtime::resolve(spec, &options).with_context(|| format!("resolving model `{spec}`"))
        }
    }
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<ExitCode> {
    let preset = Preset::by_name(&args.branch)?;
    let dir = model_dir(args.model.as_deref(), &args.revision)?;
    let checkpoint = runtime::Checkpoint::open(&dir)
        .with_context(|| format!("opening model {}", dir.display()))?;
    let calib = if args.rtn {
        None
    } else {
        // The model's own tokenizer unless one is named.
        let mut options = args.calib.clone();
        if options.tokenizer.is_none() && dir.join("tokenizer.json").is_file() {
            options.tokenizer = Some(dir.join("tokenizer.json"));
        }
        Some(load_or_build(args.calibration.as_deref(), &options)?)
    };
    let opts = Options {
        preset,
        rtn: args.rtn,
        starved_fraction: args.starved_fraction,
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
    .with_context(|| format!("quantizing {} into {}", preset.name, args.out.display()))?;
    for (module, tokens) in report.starved() {
        eprintln!("note: {module} saw {tokens} calibration tokens: quantized by round-to-nearest");
    }
    println!(
        "wrote {} ({} modules, {:.1}s)",
        out.display(),
        report.modules.len(),
        report.total_seconds
    );
    Ok(ExitCode::SUCCESS)
}
