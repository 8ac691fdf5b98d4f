//! `mixtral-gptq publish`: creates each Hub branch and uploads each branch directory to it with the
//! official `hf` command-line client.
//!
//! The token is read by `hf` itself from `HF_TOKEN`; it is never passed on a command line, printed
//! or written. A branch that fails `verify` is never uploaded.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

/// Arguments of `mixtral-gptq publish`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Branch directories; each is uploaded to the Hub branch named after it (its `quant_report.json`
    /// `branch`, else the directory name).
    #[arg(required = true, value_name = "BRANCH_DIR")]
    pub branches: Vec<PathBuf>,
    /// Target repository (`owner/name`).
    #[arg(long)]
    pub repo: String,
    /// Model card to upload as `README.md` on `main` (see `mixtral-gptq card`).
    #[arg(long, value_name = "FILE")]
    pub card: Option<PathBuf>,
    /// Create the repository as private.
    #[arg(long)]
    pub private: bool,
    /// Print every command instead of running it.
    #[arg(long)]
    pub dry_run: bool,
    /// The `hf` executable.
    #[arg(long, default_value = "hf")]
    pub hf: String,
}

/// Quotes a word for a POSIX shell when needed.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs `mixtral-gptq publish`.
pub fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    if !args.dry_run && std::env::var_os("HF_TOKEN").is_none_or(|t| t.is_empty()) {
        bail!("HF_TOKEN is not set: publishing needs a Hub token with write access in HF_TOKEN");
    }
    let mut plan: Vec<Vec<String>> = Vec::new();
    let mut create = vec![
        args.hf.clone(),
        "repo".into(),
        "create".into(),
        args.repo.clone(),
        "--repo-type".into(),
        "model".into(),
    ];
    if args.private {
        create.push("--private".into());
    }
    create.push("--exist-ok".into());
    plan.push(create);
    let mut failed = Vec::new();
    for dir in &args.branches {
        let report = quantize::verify::verify_branch(dir)
            .with_context(|| format!("verifying {}", dir.display()))?;
        if !report.is_clean() {
            eprintln!("{}: fails verify, not uploaded:", dir.display());
            for p in &report.problems {
                eprintln!("  {}: {}", p.subject, p.message);
            }
            failed.push(dir.display().to_string());
            continue;
        }
        let branch = crate::cmd::compare::read_branch(dir)?.name;
        if branch != "main" {
            plan.push(
                [
                    &args.hf,
                    "repo",
                    "branch",
                    "create",
                    &args.repo,
                    &branch,
                    "--repo-type",
                    "model",
                    "--exist-ok",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            );
        }
        plan.push(
            [
                args.hf.as_str(),
                "upload",
                &args.repo,
                &dir.display().to_string(),
                ".",
                "--repo-type",
                "model",
                "--revision",
                &branch,
                "--commit-message",
                &format!("Upload GPTQ branch {branch}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        );
    }
    if let Some(card) = &args.card {
        anyhow::ensure!(
            card.is_file(),
            "model card {} does not exist",
            card.display()
        );
        plan.push(
            [
                args.hf.as_str(),
                "upload",
                &args.repo,
                &card.display().to_string(),
                "README.md",
                "--repo-type",
                "model",
                "--revision",
                "main",
                "--commit-message",
                "Update model card",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        );
    }
    for cmd in &plan {
        let line = cmd
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ");
        if args.dry_run {
            println!("{line}");
            continue;
        }
        println!("+ {line}");
        let status = Command::new(&cmd[0])
            .args(&cmd[1..])
            .status()
            .with_context(|| format!("running {}", cmd[0]))?;
        if !status.success() {
            bail!("`{line}` failed with {status}");
        }
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("not uploaded (failed verify): {}", failed.join(", "));
        Ok(ExitCode::from(1))
    }
}
