//! `mixtral-gptq synth` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {}

pub fn run(_args: SynthArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`synth` is not implemented yet")
}
