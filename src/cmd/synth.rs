//! `mixtral-gptq synth`: a random Mixtral of any shape (the real 8x7B included), dense BF16 or
//! directly as a GPTQ branch, so that speed can be measured at full size without the 93 GB download.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use quantize::synth::{write_synth, SynthOptions, SynthShape, MIXTRAL_VOCAB, TOKENIZER_FILES};
use quantize::Preset;

use crate::cmd::bundled;
use crate::cmd::quantize::BUNDLED_MODEL;

/// The `--branch` value for the dense model.
const DENSE: &str = "bf16";

/// Arguments of `mixtral-gptq synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Output directory (written as <out>.partial, renamed when complete).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Base shape: `8x7b` (Mixtral-8x7B: hidden 4096, intermediate 14336, 32 layers, 32 heads,
    /// 8 KV heads, 8 experts, top-2, vocab 32000) or `moe-s` (the bundled fixtures/moe-s).
    #[arg(long, default_value = "8x7b")]
    pub shape: String,
    /// `bf16` for the dense model, or a GPTQ branch: main, gptq-4bit-128g-actorder_True,
    /// gptq-4bit-32g-actorder_True, gptq-3bit--1g-actorder_True, gptq-3bit-128g-actorder_True,
    /// gptq-8bit--1g-actorder_True, gptq-8bit-128g-actorder_True.
    #[arg(long, default_value = DENSE)]
    pub branch: String,
    /// Seed of every random draw (the output does not depend on the number of threads).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override `num_hidden_layers`.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override `hidden_size`.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Override `intermediate_size` (per expert).
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Override `num_attention_heads` (the head dim is hidden / heads).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Override `num_key_value_heads`.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Override `num_local_experts`.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Override `num_experts_per_tok`.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Override `vocab_size` (the bundled tokenizer is copied only for 32000).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Split model.safetensors into shards of at most this many bytes (with an index).
    #[arg(long, value_name = "BYTES")]
    pub max_shard_size: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Replace --out if it exists and is not empty.
    #[arg(long)]
    pub force: bool,
    /// No progress lines.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: SynthArgs) -> anyhow::Result<ExitCode> {
    let options = options(&args)?;
    check_out(&args)?;
    let shape = &options.shape;
    let what = options.preset.map(|p| p.name).unwrap_or(DENSE);
    if !args.quiet {
        eprintln!(
            "synth: {what}, {} layers, hidden {}, intermediate {}, {} experts (top-{}), vocab {}: \
             {:.2} B parameters, seed {}",
            shape.num_hidden_layers,
            shape.hidden_size,
            shape.intermediate_size,
            shape.num_local_experts,
            shape.num_experts_per_tok,
            shape.vocab_size,
            shape.parameters() as f64 / 1e9,
            options.seed
        );
    }
    let start = Instant::now();
    let mut last_layer = None;
    let summary = write_synth(&args.out, &options, |p| {
        // One line per finished layer.
        if args.quiet {
            return;
        }
        if let Some(l) = last_layer.filter(|&l| p.layer != Some(l)) {
            eprintln!(
                "  layer {}/{}: {:.2} of {:.2} GB, {:.1}s",
                l + 1,
                shape.num_hidden_layers,
                p.bytes_done as f64 / 1e9,
                p.bytes_total as f64 / 1e9,
                start.elapsed().as_secs_f64()
            );
        }
        last_layer = p.layer;
    })
    .with_context(|| format!("writing the synthetic model {}", args.out.display()))?;
    if summary.tokenizer {
        println!(
            "tokenizer: copied from {} (vocab {MIXTRAL_VOCAB}), so `eval --text` works",
            bundled(BUNDLED_MODEL).display()
        );
    } else {
        let why = if shape.vocab_size == MIXTRAL_VOCAB {
            format!("{} not found", bundled(BUNDLED_MODEL).display())
        } else {
            format!(
                "vocab {} is not the bundled tokenizer's {MIXTRAL_VOCAB}",
                shape.vocab_size
            )
        };
        println!("tokenizer: none ({why}); `eval` on text and `verify` need one");
    }
    println!(
        "wrote {} ({what}, {} tensors): {} bytes ({:.2} GB) in {:.1}s ({:.0} MB/s)",
        summary.dir.display(),
        summary.tensors,
        summary.bytes,
        summary.bytes as f64 / 1e9,
        summary.seconds,
        summary.bytes as f64 / 1e6 / summary.seconds.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// The library options from the flags, every bad value named by its flag.
fn options(args: &SynthArgs) -> anyhow::Result<SynthOptions> {
    let mut shape = SynthShape::by_name(&args.shape)?;
    let overrides = [
        (args.layers, &mut shape.num_hidden_layers),
        (args.hidden, &mut shape.hidden_size),
        (args.intermediate, &mut shape.intermediate_size),
        (args.heads, &mut shape.num_attention_heads),
        (args.kv_heads, &mut shape.num_key_value_heads),
        (args.experts, &mut shape.num_local_experts),
        (args.top_k, &mut shape.num_experts_per_tok),
        (args.vocab, &mut shape.vocab_size),
    ];
    for (value, field) in overrides {
        if let Some(v) = value {
            *field = v;
        }
    }
    let preset = if args.branch.eq_ignore_ascii_case(DENSE) {
        None
    } else {
        Some(Preset::by_name(&args.branch).map_err(|_| {
            anyhow::anyhow!(
                "--branch `{}`: expected {DENSE} or one of: {}",
                args.branch,
                quantize::presets::PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?)
    };
    shape.check(preset.as_ref())?;
    if args.max_shard_size == Some(0) {
        anyhow::bail!("--max-shard-size 0: expected a positive number of bytes");
    }
    if args.threads == Some(0) {
        anyhow::bail!("--threads 0: expected a positive number of threads");
    }
    let tokenizer_dir = bundled(BUNDLED_MODEL);
    let tokenizer_dir = TOKENIZER_FILES
        .iter()
        .all(|f| tokenizer_dir.join(f).is_file())
        .then_some(tokenizer_dir);
    Ok(SynthOptions {
        shape,
        preset,
        seed: args.seed,
        max_shard_size: args.max_shard_size,
        tokenizer_dir,
        threads: args.threads,
    })
}

/// Refuses an `--out` that is a file, or a non-empty directory without `--force`.
fn check_out(args: &SynthArgs) -> anyhow::Result<()> {
    let out = &args.out;
    if out.file_name().is_none() {
        anyhow::bail!(
            "--out {}: expected a directory path ending in a name",
            out.display()
        );
    }
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        anyhow::bail!("--out {}: exists and is not a directory", out.display());
    }
    let non_empty = std::fs::read_dir(out)
        .with_context(|| format!("--out {}: reading the directory", out.display()))?
        .next()
        .is_some();
    if non_empty && !args.force {
        anyhow::bail!(
            "--out {}: exists and is not empty; pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}
