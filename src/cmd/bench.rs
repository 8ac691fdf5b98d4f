//! `mixtral-gptq bench` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`bench` is not implemented yet")
}
