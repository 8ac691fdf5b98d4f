//! `mixtral-gptq eval`: perplexity of a model or a branch over text files or wikitext-2.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cmd::{bundled, bundled_eval_texts};
use anyhow::{bail, Context};
use evaluate::datasets::EvalText;
use evaluate::results::{EvalEntry, EvalResults, EVAL_FILE};
use evaluate::{Convention, Perplexity};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `mixtral-gptq eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Model directory (dense or GPTQ branch) or Hub id; default: the bundled fixture `fixtures/moe-s`.
    #[arg(long)]
    pub model: Option<String>,
    /// Text to evaluate (repeatable): a text file, a parquet with wikitext's `text` column, or
    /// `wikitext2` for wikitext-2-raw-v1's test split from the Hub (`Salesforce/wikitext`).
    /// Default: the bundled `fixtures/eval/shakespeare.txt` and `python.txt`.
    #[arg(long = "text", value_name = "FILE|wikitext2")]
    pub texts: Vec<String>,
    /// Perplexity convention: `gptq-2048`, `llamacpp-512` or `all` (both).
    #[arg(long, default_value = "all")]
    pub convention: String,
    /// Context length (window/chunk size), overriding the convention's.
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Device: `cpu` (f32 reference) or `cuda` (f32 on GPU 0; `cuda:N` for GPU N).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Don't store the results in the branch directory's `eval.json`.
    #[arg(long)]
    pub no_save: bool,
}

/// Parses `--convention` and `--ctx` into the conventions to run.
pub fn conventions(name: &str, ctx: Option<usize>) -> anyhow::Result<Vec<Convention>> {
    let mut list: Vec<Convention> = if name == "all" {
        Convention::ALL.to_vec()
    } else {
        vec![name.parse::<Convention>()?]
    };
    if let Some(ctx) = ctx {
        for c in &mut list {
            *c = Convention { kind: c.kind, ctx }.validate()?;
        }
    }
    Ok(list)
}

/// A loaded model with its tokenizer, ready to score texts.
pub struct Evaluator {
    /// The model as given.
    pub spec: String,
    /// The resolved local directory.
    pub dir: PathBuf,
    model: Box<dyn evaluate::Scorer>,
    tokenizer: evaluate::tokenize::Tokenizer,
    tokenizer_path: PathBuf,
}

impl Evaluator {
    /// Resolves `spec` (directory or Hub id) and loads the model on `device` and its tokenizer.
    pub fn load(spec: &str, device: &str) -> anyhow::Result<Self> {
        let ordinal = match device {
            "cpu" => None,
            "cuda" => Some(0),
            d => match d
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => Some(n),
                None => bail!("--device {device}: expected `cpu`, `cuda` or `cuda:N`"),
            },
        };
        let dir = runtime::resolve(spec, &runtime::HubOptions::from_env())
            .with_context(|| format!("resolving model {spec}"))?;
        let model: Box<dyn evaluate::Scorer> = match ordinal {
            None => Box::new(
                runtime::Model::load(&dir)
                    .with_context(|| format!("loading model {}", dir.display()))?,
            ),
            Some(n) => {
                let backend = runtime::cuda::CudaBackend::new(n)
                    .with_context(|| format!("opening CUDA device {n}"))?;
                let checkpoint = runtime::Checkpoint::open(&dir)
                    .with_context(|| format!("opening model {}", dir.display()))?;
                Box::new(
                    runtime::Model::from_checkpoint(backend, &checkpoint)
                        .with_context(|| format!("loading model {} on cuda:{n}", dir.display()))?,
                )
            }
        };
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = evaluate::tokenize::load_tokenizer(&tokenizer_path)?;
        Ok(Self {
            spec: spec.to_string(),
            dir,
            model,
            tokenizer,
            tokenizer_path,
        })
    }

    /// Encodes `text` and evaluates it under `convention`, with a progress bar on stderr.
    pub fn run(
        &mut self,
        text: &EvalText,
        ids: &[u32],
        convention: Convention,
    ) -> anyhow::Result<Perplexity> {
        let bar = ProgressBar::new(convention.windows(ids.len()) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} windows, {elapsed} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("{} {convention}", text.name));
        let result = evaluate::evaluate(self.model.as_mut(), ids, convention, &mut |done, _| {
            bar.set_position(done as u64)
        })
        .with_context(|| format!("evaluating {} on {} ({convention})", self.spec, text.name));
        bar.finish_and_clear();
        result
    }

    /// Encodes a text with the model's tokenizer (one BOS at the start).
    pub fn encode(&self, text: &EvalText) -> anyhow::Result<Vec<u32>> {
        Ok(evaluate::tokenize::encode(
            &self.tokenizer,
            &self.tokenizer_path,
            &text.text,
        )?)
    }
}

/// Runs `mixtral-gptq eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let spec = args
        .model
        .clone()
        .unwrap_or_else(|| bundled("fixtures/moe-s").display().to_string());
    let conventions = conventions(&args.convention, args.ctx)?;
    let text_specs: Vec<String> = if args.texts.is_empty() {
        bundled_eval_texts()
    } else {
        args.texts.clone()
    };
    // Read every text before loading the model, so a missing file fails fast.
    let texts = text_specs
        .iter()
        .map(|t| EvalText::load(t).with_context(|| format!("reading evaluation text {t}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut evaluator = Evaluator::load(&spec, &args.device)?;
    let is_branch = evaluator.dir.join("quantize_config.json").is_file();
    let save_path = evaluator.dir.join(EVAL_FILE);
    let mut stored = if is_branch && !args.no_save {
        EvalResults::load_or_default(&save_path, &spec)?
    } else {
        EvalResults {
            model: spec.clone(),
            ..Default::default()
        }
    };
    let mut fresh = EvalResults {
        model: spec.clone(),
        ..Default::default()
    };
    println!("model {} ({})", spec, evaluator.dir.display());
    for text in &texts {
        let ids = evaluator.encode(text)?;
        println!(
            "text {}: {} | {} tokens (BOS included)",
            text.name,
            text.source,
            ids.len()
        );
        for &convention in &conventions {
            let ppl = evaluator.run(text, &ids, convention)?;
            println!("  {}", ppl.summary());
            let entry = EvalEntry {
                text: text.name.clone(),
                source: text.source.clone(),
                perplexity: ppl,
            };
            stored.insert(entry.clone());
            fresh.insert(entry);
        }
    }
    if is_branch && !args.no_save {
        stored.save(&save_path)?;
        println!("results stored in {}", save_path.display());
    }
    if let Some(json) = &args.json {
        fresh.save(json)?;
        println!("results written to {}", json.display());
    }
    Ok(ExitCode::SUCCESS)
}
