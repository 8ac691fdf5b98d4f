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
    /// Device: `cpu` (f32 reference) or `cuda` (GPU 0, layer by layer: f32 hidden states, f16/bf16
    /// tensor-core products with f32 accumulation; `cuda:N` for GPU N).
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
    model: Engine,
    tokenizer: evaluate::tokenize::Tokenizer,
    tokenizer_path: PathBuf,
}

/// Where the model runs.
enum Engine {
    /// The CPU reference, window by window.
    Cpu(Box<dyn evaluate::Scorer>),
    /// One GPU, layer-major over every window at once (runtime::cuda::eval).
    Cuda {
        dev: std::sync::Arc<runtime::cuda::CudaDevice>,
        checkpoint: Box<runtime::Checkpoint>,
    },
}

/// Records the windows a convention cuts, scoring each as zero (first pass of the GPU path).
struct Recorder(Vec<Vec<u32>>);

impl evaluate::Scorer for Recorder {
    fn nll(&mut self, window: &[u32]) -> Result<Vec<f32>, evaluate::error::ScorerError> {
        self.0.push(window.to_vec());
        Ok(vec![0.0; window.len().saturating_sub(1)])
    }
}

/// Hands out NLLs computed beforehand, checking that the windows come in the recorded order.
struct Replay<'a> {
    windows: &'a [Vec<u32>],
    nll: &'a [Vec<f32>],
    next: usize,
}

impl evaluate::Scorer for Replay<'_> {
    fn nll(&mut self, window: &[u32]) -> Result<Vec<f32>, evaluate::error::ScorerError> {
        let i = self.next;
        self.next += 1;
        match (self.windows.get(i), self.nll.get(i)) {
            (Some(w), Some(n)) if w.as_slice() == window => Ok(n.clone()),
            _ => Err(format!("window {i} was not the one evaluated on the GPU").into()),
        }
    }
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
        let model = match ordinal {
            None => Engine::Cpu(Box::new(
                runtime::Model::load(&dir)
                    .with_context(|| format!("loading model {}", dir.display()))?,
            )),
            Some(n) => {
                let dev = runtime::cuda::CudaDevice::new(n)
                    .with_context(|| format!("opening CUDA device {n}"))?;
                let checkpoint = runtime::Checkpoint::open(&dir)
                    .with_context(|| format!("opening model {}", dir.display()))?;
                Engine::Cuda {
                    dev,
                    checkpoint: Box::new(checkpoint),
                }
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

    /// Evaluates several (text, ids, convention) jobs. On the CPU each job runs window by
    /// window; on a GPU every window of every job goes through the model in one layer-major
    /// pass, then each job's perplexity is assembled by the same convention code.
    pub fn run_many(
        &mut self,
        jobs: &[(&EvalText, &[u32], Convention)],
    ) -> anyhow::Result<Vec<Perplexity>> {
        let Engine::Cuda { dev, checkpoint } = &self.model else {
            return jobs
                .iter()
                .map(|&(text, ids, convention)| self.run(text, ids, convention))
                .collect();
        };
        let mut recorded = Vec::with_capacity(jobs.len());
        for &(text, ids, convention) in jobs {
            let mut rec = Recorder(Vec::new());
            evaluate::evaluate(&mut rec, ids, convention, &mut |_, _| {}).with_context(|| {
                format!("evaluating {} on {} ({convention})", self.spec, text.name)
            })?;
            recorded.push(rec.0);
        }
        let all: Vec<Vec<u32>> = recorded.iter().flatten().cloned().collect();
        let tokens: usize = all.iter().map(Vec::len).sum();
        eprintln!(
            "evaluating {} windows ({tokens} tokens) layer by layer on {}",
            all.len(),
            dev.name()
        );
        let out = runtime::cuda::eval::evaluate_checkpoint(
            dev,
            checkpoint,
            &all,
            &runtime::cuda::eval::EvalOptions::default(),
        )
        .with_context(|| format!("evaluating {} on the GPU", self.spec))?;
        let mut results = Vec::with_capacity(jobs.len());
        let mut first = 0;
        for (&(text, ids, convention), windows) in jobs.iter().zip(&recorded) {
            let n = windows.len();
            let mut replay = Replay {
                windows,
                nll: &out.nll[first..first + n],
                next: 0,
            };
            first += n;
            let mut ppl = evaluate::evaluate(&mut replay, ids, convention, &mut |_, _| {})
                .with_context(|| {
                    format!("evaluating {} on {} ({convention})", self.spec, text.name)
                })?;
            // The pass was shared: each job gets its share of the time by tokens.
            let own: usize = windows.iter().map(Vec::len).sum();
            ppl.seconds = out.total_ms / 1e3 * own as f64 / tokens.max(1) as f64;
            results.push(ppl);
        }
        Ok(results)
    }

    /// Encodes `text` and evaluates it under `convention`, with a progress bar on stderr.
    pub fn run(
        &mut self,
        text: &EvalText,
        ids: &[u32],
        convention: Convention,
    ) -> anyhow::Result<Perplexity> {
        let Engine::Cpu(model) = &mut self.model else {
            return self
                .run_many(&[(text, ids, convention)])?
                .pop()
                .context("no result");
        };
        let bar = ProgressBar::new(convention.windows(ids.len()) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} windows, {elapsed} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("{} {convention}", text.name));
        let result = evaluate::evaluate(model.as_mut(), ids, convention, &mut |done, _| {
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
    let encoded = texts
        .iter()
        .map(|t| evaluator.encode(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let jobs: Vec<(&EvalText, &[u32], Convention)> = texts
        .iter()
        .zip(&encoded)
        .flat_map(|(t, ids)| conventions.iter().map(move |&c| (t, ids.as_slice(), c)))
        .collect();
    // The GPU evaluates every job in one pass; the CPU one job at a time (progress bars).
    let mut precomputed = if args.device == "cpu" {
        None
    } else {
        Some(evaluator.run_many(&jobs)?.into_iter())
    };
    for (text, ids) in texts.iter().zip(&encoded) {
        println!(
            "text {}: {} | {} tokens (BOS included)",
            text.name,
            text.source,
            ids.len()
        );
        for &convention in &conventions {
            let ppl = match precomputed.as_mut() {
                Some(it) => it.next().context("missing GPU result")?,
                None => evaluator.run(text, ids, convention)?,
            };
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
