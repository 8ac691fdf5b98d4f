//! `mixtral-gptq publish` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq publish`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {}

pub fn run(_args: PublishArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`publish` is not implemented yet")
}
