//! `mixtral-gptq eval` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {}

pub fn run(_args: EvalArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`eval` is not implemented yet")
}
