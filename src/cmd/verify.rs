//! `mixtral-gptq verify` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {}

pub fn run(_args: VerifyArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`verify` is not implemented yet")
}
