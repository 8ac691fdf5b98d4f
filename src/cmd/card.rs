//! `mixtral-gptq card`: writes the published repository's `README.md` from the branch reports.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use evaluate::card::{render, CardInput};
use evaluate::compare::BranchSummary;
use evaluate::results::EvalResults;

use crate::cmd::bundled;
use crate::cmd::compare::{read_branch, weight_bytes};

/// Arguments of `mixtral-gptq card`.
#[derive(Debug, clap::Args)]
pub struct CardArgs {
    /// Branch directories, in the order of the table.
    #[arg(required = true, value_name = "BRANCH_DIR")]
    pub branches: Vec<PathBuf>,
    /// The published repository id (`owner/name`).
    #[arg(long)]
    pub repo: String,
    /// The unquantized model's Hub id.
    #[arg(long, default_value = "mistralai/Mixtral-8x7B-Instruct-v0.1")]
    pub base_model: String,
    /// Stored results of the unquantized model (`compare` writes `<out>/baseline-eval.json`), for a reference row.
    #[arg(long, value_name = "FILE")]
    pub baseline_eval: Option<PathBuf>,
    /// The unquantized model's directory (for its size in the reference row); default: the bundled fixture.
    #[arg(long, value_name = "DIR")]
    pub baseline: Option<PathBuf>,
    /// Perplexity columns as `text/convention` (repeatable); default: every result the branches have.
    #[arg(long = "ppl", value_name = "TEXT/CONVENTION")]
    pub ppl: Vec<String>,
    /// Where to write the card.
    #[arg(long, default_value = "README.md")]
    pub out: PathBuf,
}

/// Runs `mixtral-gptq card`.
pub fn run(args: CardArgs) -> anyhow::Result<ExitCode> {
    let branches = args
        .branches
        .iter()
        .map(|d| read_branch(d).with_context(|| format!("reading branch {}", d.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let baseline = match &args.baseline_eval {
        Some(path) => {
            let results = EvalResults::load_or_default(path, "bf16")?;
            anyhow::ensure!(
                !results.results.is_empty(),
                "{}: no stored results",
                path.display()
            );
            let dir = args
                .baseline
                .clone()
                .unwrap_or_else(|| bundled("fixtures/moe-s"));
            Some(BranchSummary {
                name: "bf16".into(),
                bits: None,
                group_size: None,
                desc_act: None,
                damp_percent: None,
                dataset: None,
                seqlen: None,
                size_bytes: weight_bytes(&dir)?,
                ppl: results
                    .results
                    .iter()
                    .map(|(k, e)| (k.clone(), e.perplexity.ppl))
                    .collect(),
                quant_seconds: None,
            })
        }
        None => None,
    };
    let ppl_columns: Vec<(String, String)> = if args.ppl.is_empty() {
        let mut keys: Vec<&String> = branches.iter().flat_map(|b| b.ppl.keys()).collect();
        keys.sort_by_key(|k| {
            (
                k.split('/').next().map(String::from),
                !k.contains("/gptq"),
                k.to_string(),
            )
        });
        keys.dedup();
        keys.iter()
            .filter_map(|k| {
                k.split_once('/')
                    .map(|(t, c)| (t.to_string(), c.to_string()))
            })
            .collect()
    } else {
        args.ppl
            .iter()
            .map(|k| {
                k.split_once('/')
                    .map(|(t, c)| (t.to_string(), c.to_string()))
                    .context("--ppl takes TEXT/CONVENTION")
            })
            .collect::<anyhow::Result<_>>()?
    };
    let card = render(&CardInput {
        repo_id: args.repo.clone(),
        base_model: args.base_model.clone(),
        baseline,
        branches,
        ppl_columns,
    });
    std::fs::write(&args.out, card).with_context(|| format!("writing {}", args.out.display()))?;
    println!("model card written to {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
