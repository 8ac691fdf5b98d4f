//! `mixtral-gptq calibrate`: build the calibration windows of recipe v1 and save them as
//! safetensors (`input_ids` I32 `[nsamples, seqlen]` with the recipe in the metadata).
//!
//! [`CalibrationOptions`] is shared with `quantize`, which takes either a saved set or these
//! options (see [`load_or_build`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use calibration::{
    CalibrationSet, DatasetSource, HubDataset, Recipe, DEFAULT_TEMPLATE, OPEN_INSTRUCT_FILE,
};

use crate::cmd::bundled;

/// The bundled Open Instruct sample, relative to the repository root.
const BUNDLED_DATASET: &str = "fixtures/calibration/open-instruct-sample.parquet";
/// The bundled Mixtral tokenizer, relative to the repository root.
const BUNDLED_TOKENIZER: &str = "fixtures/moe-s/tokenizer.json";

/// Where the calibration data comes from and how windows are drawn (recipe v1).
#[derive(Debug, Clone, clap::Args)]
pub struct CalibrationOptions {
    /// Parquet file, or a Hub dataset id such as `VMware/open-instruct` [default: the bundled
    /// fixtures/calibration/open-instruct-sample.parquet]
    #[arg(long, value_name = "PATH|HUB_ID")]
    pub dataset: Option<String>,
    /// Revision (branch, tag or commit) of a Hub dataset.
    #[arg(long, default_value = "main")]
    pub dataset_revision: String,
    /// File inside a Hub dataset repository.
    #[arg(long, default_value = OPEN_INSTRUCT_FILE)]
    pub dataset_file: String,
    /// tokenizer.json [default: the model's (quantize) or the bundled fixtures/moe-s/tokenizer.json]
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Number of windows.
    #[arg(long, default_value_t = 128)]
    pub nsamples: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 8192)]
    pub seqlen: usize,
    /// Seed of Python's `random.Random(seed)` that draws the window starts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-row text; placeholders {instruction} {alpaca_prompt} {response} {source} {task_name}.
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    pub template: String,
}

impl CalibrationOptions {
    /// The recipe these options describe.
    pub fn recipe(&self) -> Recipe {
        Recipe {
            template: self.template.clone(),
            nsamples: self.nsamples,
            seqlen: self.seqlen,
            seed: self.seed,
        }
    }

    /// The dataset: `--dataset` (with `--dataset-revision`/`--dataset-file` for a Hub id), or the
    /// bundled sample.
    pub fn source(&self) -> DatasetSource {
        match &self.dataset {
            None => DatasetSource::File(bundled(BUNDLED_DATASET)),
            Some(spec) => match DatasetSource::parse(spec) {
                DatasetSource::Hub(hub) => DatasetSource::Hub(HubDataset {
                    revision: self.dataset_revision.clone(),
                    file: self.dataset_file.clone(),
                    ..hub
                }),
                file => file,
            },
        }
    }

    /// `--tokenizer`, or the bundled one.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.tokenizer
            .clone()
            .unwrap_or_else(|| bundled(BUNDLED_TOKENIZER))
    }

    /// Builds the calibration set.
    pub fn build(&self) -> anyhow::Result<CalibrationSet> {
        let source = self.source();
        calibration::build_from(&source, &self.tokenizer_path(), &self.recipe())
            .with_context(|| format!("building calibration windows from {}", source.describe()))
    }
}

/// A saved set if `saved` is given, otherwise one built from `options`.
pub fn load_or_build(
    saved: Option<&Path>,
    options: &CalibrationOptions,
) -> anyhow::Result<CalibrationSet> {
    match saved {
        Some(path) => CalibrationSet::load(path)
            .with_context(|| format!("loading calibration set {}", path.display())),
        None => options.build(),
    }
}

/// Arguments of `mixtral-gptq calibrate`.
#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub options: CalibrationOptions,
    /// Output file (safetensors), written atomically.
    #[arg(long, value_name = "FILE.safetensors")]
    pub out: PathBuf,
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let set = args.options.build()?;
    let built = started.elapsed();
    set.save(&args.out)
        .with_context(|| format!("writing calibration set {}", args.out.display()))?;
    let meta = &set.meta;
    let target = args.options.recipe().target_tokens();
    let sum: i64 = set.input_ids.iter().map(|&id| i64::from(id)).sum();
    println!(
        "dataset        {} (sha256 {})",
        meta.dataset, meta.dataset_sha256
    );
    println!(
        "tokenizer      {} (sha256 {})",
        args.options.tokenizer_path().display(),
        meta.tokenizer_sha256
    );
    println!("template       {:?}", meta.template);
    if meta.stream_tokens >= target {
        println!(
            "stream         {} tokens from {} rows (target {target})",
            meta.stream_tokens, meta.rows_read
        );
    } else {
        println!(
            "stream         {} tokens from {} rows (all rows; the target of {target} was not reached)",
            meta.stream_tokens, meta.rows_read
        );
    }
    println!(
        "windows        {} x {} tokens, seed {}",
        set.nsamples, set.seqlen, meta.seed
    );
    println!(
        "first window   {:?}...",
        &set.window(0)[..set.seqlen.min(8)]
    );
    println!("id sum         {sum}");
    println!("built in       {:.2} s", built.as_secs_f64());
    println!("wrote          {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
