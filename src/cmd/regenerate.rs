//! `mixtral-gptq regenerate` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq regenerate`.
#[derive(Debug, clap::Args)]
pub struct RegenerateArgs {}

pub fn run(_args: RegenerateArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`regenerate` is not implemented yet")
}
