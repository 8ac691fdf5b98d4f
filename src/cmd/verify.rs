//! `mixtral-gptq verify BRANCH_DIR`: checks a branch directory and lists every problem found.
//!
//! Exit codes: 0 clean, 1 problems found (each printed as `subject: message`), 2 on error (the
//! directory cannot be read).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Arguments of `mixtral-gptq verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The branch directory (holding config.json, quantize_config.json, model.safetensors, ...).
    #[arg(value_name = "BRANCH_DIR")]
    pub branch_dir: PathBuf,
}

/// Verifies the branch and prints the result.
pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.branch_dir;
    let report = quantize::verify::verify_branch(dir)
        .with_context(|| format!("verifying branch {}", dir.display()))?;
    if report.is_clean() {
        println!(
            "{}: ok ({} tensors, {} quantized modules checked)",
            dir.display(),
            report.tensors,
            report.quantized_modules
        );
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &report.problems {
        println!("{problem}");
    }
    println!(
        "{}: {} problem(s) ({} tensors, {} quantized modules checked)",
        dir.display(),
        report.problems.len(),
        report.tensors,
        report.quantized_modules
    );
    Ok(ExitCode::from(1))
}
