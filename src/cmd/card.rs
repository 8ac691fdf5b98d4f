//! `mixtral-gptq card` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq card`.
#[derive(Debug, clap::Args)]
pub struct CardArgs {}

pub fn run(_args: CardArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`card` is not implemented yet")
}
