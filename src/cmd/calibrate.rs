//! `mixtral-gptq calibrate` (work in progress: not yet available).

use std::process::ExitCode;

/// Arguments of `mixtral-gptq calibrate`.
#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {}

pub fn run(_args: CalibrateArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`calibrate` is not implemented yet")
}
