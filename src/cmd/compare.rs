//! `mixtral-gptq compare` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {}

pub fn run(_args: CompareArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`compare` is not implemented yet")
}
