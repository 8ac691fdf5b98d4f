//! `mixtral-gptq`: regenerates, checks, evaluates and publishes the GPTQ branches of
//! Mixtral-8x7B-Instruct. This binary only parses arguments and calls the library crates.

use std::process::ExitCode;

mod cli;
mod cmd;

fn main() -> ExitCode {
    let cli = cli::parse();
    match cmd::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
