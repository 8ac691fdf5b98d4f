//! `mixtral-gptq quantize` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq quantize`.
#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {}

pub fn run(_args: QuantizeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`quantize` is not implemented yet")
}
