//! One module per subcommand: build inputs, call the libraries, print results.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub mod bench;
pub mod calibrate;
pub mod card;
pub mod compare;
pub mod eval;
pub mod publish;
pub mod quantize;
pub mod regenerate;
pub mod synth;
pub mod verify;

/// Runs the chosen subcommand. `Ok` carries the exit code (0 success, 1 "ran, but a check failed").
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Eval(args) => eval::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Regenerate(args) => regenerate::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Card(args) => card::run(args),
        Command::Publish(args) => publish::run(args),
    }
}

/// A bundled fixture path: relative to the current directory if it is there (a checkout), else
/// relative to the repository this binary was built from.
pub fn bundled(rel: &str) -> PathBuf {
    let here = Path::new(rel);
    if here.exists() {
        here.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }
}

/// The bundled evaluation texts (`fixtures/eval/shakespeare.txt` and `python.txt`), the default
/// of every command that measures perplexity.
pub fn bundled_eval_texts() -> Vec<String> {
    ["shakespeare", "python"]
        .iter()
        .map(|t| {
            bundled(&format!("fixtures/eval/{t}.txt"))
                .display()
                .to_string()
        })
        .collect()
}
