//! Command-line interface: clap derive structs only (each subcommand's arguments live
//! beside its implementation in `cmd/`).

use clap::{Parser, Subcommand};

use crate::cmd;

/// Regenerate, verify, evaluate and publish GPTQ branches of Mixtral-8x7B-Instruct.
#[derive(Debug, Parser)]
#[command(name = "mixtral-gptq", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Perplexity of a model or a branch over a text file or dataset.
    Eval(cmd::eval::EvalArgs),
    /// Build calibration token windows (recipe v1) and save them as safetensors.
    Calibrate(cmd::calibrate::CalibrateArgs),
    /// Quantize one branch with GPTQ.
    Quantize(cmd::quantize::QuantizeArgs),
    /// Write all seven branches and print their perplexity against bf16.
    Regenerate(cmd::regenerate::RegenerateArgs),
    /// Check a branch directory: tensors, packing, g_idx, configs, files.
    Verify(cmd::verify::VerifyArgs),
    /// Write a random Mixtral of any size, dense or as a GPTQ branch.
    Synth(cmd::synth::SynthArgs),
    /// Benchmarks (kernels, evaluation).
    Bench(cmd::bench::BenchArgs),
    /// Compare branches: tables (terminal, Markdown, CSV, JSON) and a chart.
    Compare(cmd::compare::CompareArgs),
    /// Write the published repository's README.md (model card) from branch reports.
    Card(cmd::card::CardArgs),
    /// Upload branches to the Hugging Face Hub with the `hf` client.
    Publish(cmd::publish::PublishArgs),
}

pub fn parse() -> Cli {
    Cli::parse()
}
