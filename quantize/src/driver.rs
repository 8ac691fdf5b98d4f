//! The layer-by-layer GPTQ driver (spec §1.1): AutoGPTQ 0.6's `quantize()` for Mixtral.
//!
//! For each decoder layer: the layer's inputs (for layer 0, the embedding of each calibration
//! window) -> for each true-sequential subset: run the whole layer on every window while an observer
//! accumulates the Hessians of that subset's inputs (an expert sees only its routed tokens), solve
//! each module, and put the weight dequantized from its *packed* form back into the layer, so later
//! subsets and layers see exactly what the file holds -> run the layer once more to get the next
//! layer's inputs. Memory: one layer's weights, the calibration activations of one layer, and one
//! subset's Hessians.
//!
//! A module whose input saw fewer than `starved_fraction · nsamples · seqlen` tokens is quantized by
//! round-to-nearest from its original weights (never zeroed, as AutoGPTQ would), and the report says
//! so. Router gate, embeddings, norms and `lm_head` are written dense.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use calibration::CalibrationSet;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use runtime::{Backend, Checkpoint, HostTensor, LayerWeights, LinearSite, Mixtral};

use crate::error::{Error, Result};
use crate::gptq::{fasterquant, rtn, GptqConfig};
use crate::hessian::Hessian;
use crate::linalg::Conditioning;
use crate::mixtral::{layer_modules, subset_modules, Module, SUBSETS};
use crate::module::QuantizedLinear;
use crate::quantizer::ScaleDivision;
use crate::report::{calibration_json, LayerTiming, Method, ModuleReport, QuantReport};
use crate::Preset;

/// Default starved-module threshold: 0.5 % of the calibration tokens (GPTQModel HEAD's fallback).
pub const STARVED_FRACTION: f64 = 0.005;

/// Where the driver puts its results (the branch writer, or a test's collector).
pub trait Sink {
    /// One quantized linear, `name` without `.weight` (e.g. `model.layers.0.self_attn.q_proj`).
    fn quantized(&mut self, name: &str, q: &QuantizedLinear) -> Result<()>;
    /// One tensor kept dense, full tensor name, f32 values.
    fn dense(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()>;
}

/// How to run the driver.
#[derive(Debug, Clone)]
pub struct Options {
    /// The branch settings.
    pub preset: Preset,
    /// Round-to-nearest for every module (no calibration forward passes at all).
    pub rtn: bool,
    /// Fraction of `nsamples · seqlen` below which a module counts as starved.
    pub starved_fraction: f64,
    /// Draw a progress bar and print a log line per module (on stderr).
    pub verbose: bool,
}

impl Options {
    /// GPTQ with `preset`, the default starved threshold, quiet.
    pub fn new(preset: Preset) -> Self {
        Options {
            preset,
            rtn: false,
            starved_fraction: STARVED_FRACTION,
            verbose: false,
        }
    }
}

fn rt(context: impl Into<String>) -> impl FnOnce(runtime::Error) -> Error {
    let context = context.into();
    move |e| Error::Runtime {
        context,
        source: Box::new(e),
    }
}

/// Quantizes every decoder layer of `checkpoint` with `calib` (`None` only with `opts.rtn`),
/// handing each module and dense tensor to `sink`, and returns the report.
///
/// # Errors
/// Runtime errors (naming the layer and pass), solver errors, and the sink's errors.
pub fn quantize_checkpoint<B: Backend>(
    backend: B,
    checkpoint: &Checkpoint,
    calib: Option<&CalibrationSet>,
    opts: &Options,
    sink: &mut dyn Sink,
) -> Result<QuantReport>
where
    B::Tensor: Send + Sync,
{
    let start = Instant::now();
    let config = checkpoint.config().clone();
    let experts = config.num_local_experts;
    let layers = config.num_hidden_layers;
    let cfg = GptqConfig::from_preset(&opts.preset);
    let calib = match (calib, opts.rtn) {
        (Some(c), _) => Some(c),
        (None, true) => None,
        (None, false) => {
            return Err(Error::Setting {
                what: "calibration".into(),
                expected: "a calibration set for GPTQ (or --rtn)".into(),
                got: "none".into(),
            })
        }
    };
    let total_tokens = calib.map_or(0, |c| c.nsamples * c.seqlen);
    let threshold = opts.starved_fraction * total_tokens as f64;
    let method = if opts.rtn { Method::Rtn } else { Method::Gptq };
    let mut report = QuantReport::new(
        &opts.preset,
        method,
        threshold,
        calib.map_or(serde_json::Value::Null, |c| calibration_json(&c.meta)),
    );

    // Dense tensors: everything that is not the weight of a quantized module.
    let quantized: std::collections::HashSet<String> = (0..layers)
        .flat_map(|l| {
            layer_modules(experts)
                .into_iter()
                .map(move |m| format!("{}.weight", m.hf_name(l)))
        })
        .collect();
    for name in checkpoint.tensor_names() {
        if !quantized.contains(name) {
            let t = checkpoint
                .read(name)
                .map_err(rt(format!("reading `{name}`")))?;
            sink.dense(name, &t.shape, &t.data)?;
        }
    }

    let passes = if opts.rtn {
        0
    } else {
        (SUBSETS.len() + 1) * calib.map_or(0, |c| c.nsamples)
    };
    let bar = if opts.verbose && passes > 0 {
        let bar = ProgressBar::with_draw_target(
            Some((layers * passes) as u64),
            ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} forward passes, {elapsed} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let log = |line: &str| {
        if opts.verbose {
            bar.suspend(|| eprintln!("{line}"));
        }
    };

    let arch = Mixtral::new(backend, config.clone());
    let b = &arch.backend;
    // Layer-0 inputs: the embedding of each window.
    let mut inputs: Vec<B::Tensor> = Vec::new();
    if let (Some(c), false) = (calib, opts.rtn) {
        let table = checkpoint
            .load_embedding_on(b)
            .map_err(rt("loading the embedding"))?;
        for (i, w) in c.windows().enumerate() {
            let ids: Vec<u32> = w.iter().map(|&t| t as u32).collect();
            inputs.push(
                arch.embed(&table, &ids)
                    .map_err(rt(format!("embedding calibration window {i}")))?,
            );
        }
    }

    for l in 0..layers {
        let mut timing = LayerTiming {
            layer: l,
            ..Default::default()
        };
        let mut layer = checkpoint
            .load_layer_on(b, l)
            .map_err(rt(format!("loading layer {l}")))?;
        for s in 0..SUBSETS.len() {
            let modules = subset_modules(s, experts);
            bar.set_message(format!(
                "layer {l}/{layers} subset {}/{}",
                s + 1,
                SUBSETS.len()
            ));
            let hessians = if opts.rtn {
                HashMap::new()
            } else {
                let sites: Vec<LinearSite> = modules.iter().map(Module::site).collect();
                let t0 = Instant::now();
                let (h, hess) = collect_hessians(&arch, &layer, &inputs, &sites, &bar, l)?;
                timing.hessian_seconds += hess.as_secs_f64();
                timing.forward_seconds += (t0.elapsed() - hess).as_secs_f64();
                h
            };
            let t0 = Instant::now();
            let solved: Vec<(QuantizedLinear, ModuleReport)> = modules
                .par_iter()
                .map(|m| {
                    solve_module(
                        checkpoint,
                        l,
                        m,
                        hessians.get(&m.site()),
                        &cfg,
                        opts.rtn,
                        threshold,
                    )
                })
                .collect::<Result<_>>()?;
            timing.solve_seconds += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            for (m, (q, rep)) in modules.iter().zip(solved) {
                put_back(b, &mut layer, m, &q, l)?;
                sink.quantized(&m.hf_name(l), &q)?;
                log(&QuantReport::log_line(&rep));
                report.modules.push(rep);
            }
            timing.write_seconds += t0.elapsed().as_secs_f64();
        }
        if !opts.rtn && l + 1 < layers {
            bar.set_message(format!("layer {l}/{layers} outputs"));
            let t0 = Instant::now();
            for (i, x) in inputs.iter_mut().enumerate() {
                *x = arch
                    .layer_forward(&layer, x, None)
                    .map_err(rt(format!("layer {l} output pass, window {i}")))?;
                bar.inc(1);
            }
            timing.forward_seconds += t0.elapsed().as_secs_f64();
        } else {
            bar.inc(inputs.len() as u64);
        }
        log(&format!(
            "layer {l}: forward {:.1}s, hessians {:.1}s, solve {:.1}s, write {:.1}s",
            timing.forward_seconds,
            timing.hessian_seconds,
            timing.solve_seconds,
            timing.write_seconds
        ));
        report.layers.push(timing);
    }
    bar.finish_and_clear();
    report.total_seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Runs the layer on every input, accumulating the Hessians of `sites`. Returns them and the time
/// spent in the observer.
fn collect_hessians<B: Backend>(
    arch: &Mixtral<B>,
    layer: &LayerWeights<B::Tensor>,
    inputs: &[B::Tensor],
    sites: &[LinearSite],
    bar: &ProgressBar,
    l: usize,
) -> Result<(HashMap<LinearSite, Hessian>, Duration)> {
    let b = &arch.backend;
    let mut hessians: HashMap<LinearSite, Hessian> = HashMap::new();
    let mut failure: Option<Error> = None;
    let mut spent = Duration::ZERO;
    for (i, x) in inputs.iter().enumerate() {
        let mut observe = |site: LinearSite, t: &B::Tensor| {
            if failure.is_some() || !sites.contains(&site) {
                return;
            }
            let t0 = Instant::now();
            let result = b
                .download(t)
                .map_err(rt(format!("layer {l}: reading the input of {site:?}")))
                .and_then(|host: HostTensor| {
                    let cols = host.shape.last().copied().unwrap_or(0);
                    hessians
                        .entry(site)
                        .or_insert_with(|| Hessian::new(cols))
                        .add_batch(&host.data)
                });
            if let Err(e) = result {
                failure = Some(e);
            }
            spent += t0.elapsed();
        };
        if sites.iter().all(|s| *s == LinearSite::Attention) {
            // q/k/v see `rms_norm(x)`: the very op the layer starts with, so skip the rest of it.
            let eps = arch.config.rms_norm_eps as f32;
            let h = b
                .rms_norm(x, &layer.input_layernorm, eps)
                .map_err(rt(format!("layer {l} input norm, window {i}")))?;
            observe(LinearSite::Attention, &h);
        } else {
            arch.layer_forward(layer, x, Some(&mut observe))
                .map_err(rt(format!("layer {l} calibration pass, window {i}")))?;
        }
        if let Some(e) = failure.take() {
            return Err(e);
        }
        bar.inc(1);
    }
    Ok((hessians, spent))
}

/// Quantizes one module from its original weight: GPTQ, or RTN when asked, starved or unfactorizable.
fn solve_module(
    checkpoint: &Checkpoint,
    l: usize,
    m: &Module,
    h: Option<&Hessian>,
    cfg: &GptqConfig,
    all_rtn: bool,
    threshold: f64,
) -> Result<(QuantizedLinear, ModuleReport)> {
    let t0 = Instant::now();
    let name = m.hf_name(l);
    let w = checkpoint
        .linear(&name)
        .map_err(rt(format!("reading `{name}`")))?;
    let (rows, cols) = match w.shape[..] {
        [r, c] => (r, c),
        _ => {
            return Err(Error::Shape {
                what: format!("`{name}` weight"),
                expected: "[out, in]".into(),
                got: format!("{:?}", w.shape),
            })
        }
    };
    let (tokens, calls) = h.map_or((0, 0), |h| (h.tokens(), h.calls()));
    let mut rep = ModuleReport {
        module: name,
        layer: l,
        shape: [rows, cols],
        method: Method::Rtn,
        reason: None,
        tokens,
        calls,
        loss: None,
        conditioning: None,
        dead_columns: 0,
        seconds: 0.0,
    };
    let starved = (tokens as f64) < threshold || h.is_none();
    let q = if all_rtn || starved {
        rep.reason = Some(if all_rtn {
            "--rtn".into()
        } else {
            format!(
                "starved: {tokens} tokens < threshold {threshold:.1}; original weights, not zeroed"
            )
        });
        // `--rtn` reproduces the reference's RTN baseline (scales through 1/maxq); a starved
        // module is part of a GPTQ run and uses GPTQ's quantizer (IEEE division).
        let division = if all_rtn {
            ScaleDivision::Reciprocal
        } else {
            ScaleDivision::True
        };
        rtn(&w.data, rows, cols, cfg, division)?
    } else {
        let h = h
            .map(|h| h.matrix().to_owned())
            .unwrap_or_else(|| faer::Mat::zeros(cols, cols));
        let solved = fasterquant(&w.data, rows, cols, h, cfg)?;
        if solved.stats.conditioning == Conditioning::Unfactorizable {
            rep.reason = Some("Hessian not positive definite after damping and floor: round-to-nearest with group parameters".into());
            rep.method = Method::Rtn;
        } else {
            rep.method = Method::Gptq;
        }
        rep.loss = Some(solved.stats.loss);
        rep.conditioning = Some(solved.stats.conditioning);
        rep.dead_columns = solved.stats.dead_columns;
        solved.quantized
    };
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok((q, rep))
}

/// Puts the weight the packed tensors stand for back into the layer.
fn put_back<B: Backend>(
    b: &B,
    layer: &mut LayerWeights<B::Tensor>,
    m: &Module,
    q: &QuantizedLinear,
    l: usize,
) -> Result<()> {
    let packed = crate::pack::pack(q)?;
    let host = HostTensor {
        shape: vec![q.out_features, q.in_features],
        data: packed.dequantize(),
    };
    let t = b
        .upload(host)
        .map_err(rt(format!("layer {l}: uploading `{}`", m.suffix())))?;
    let experts = layer.experts.len();
    let slot = m.slot(layer).ok_or_else(|| Error::Shape {
        what: format!("layer {l} experts"),
        expected: format!("expert {:?}", m.expert),
        got: format!("{experts} experts"),
    })?;
    *slot = t;
    Ok(())
}

impl Sink for crate::branch::BranchWriter {
    fn quantized(&mut self, name: &str, q: &QuantizedLinear) -> Result<()> {
        self.write_quantized(name, q)
    }

    fn dense(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        self.write_dense(name, shape, data)
    }
}

/// Quantizes `checkpoint` into the branch directory `<out_dir>/<preset name>` (written atomically,
/// with `quant_report.json`), returning the directory and the report.
///
/// # Errors
/// As [`quantize_checkpoint`], plus the branch writer's errors.
pub fn write_branch<B: Backend>(
    backend: B,
    checkpoint: &Checkpoint,
    calib: Option<&CalibrationSet>,
    opts: &Options,
    out_dir: &std::path::Path,
    max_shard_size: Option<u64>,
) -> Result<(std::path::PathBuf, QuantReport)>
where
    B::Tensor: Send + Sync,
{
    let source_dir = checkpoint.dir();
    let source_config = crate::config::read_json(&source_dir.join("config.json"))?;
    let mut writer = crate::branch::BranchWriter::create(
        out_dir,
        &opts.preset,
        &source_config,
        source_dir,
        max_shard_size,
    )?;
    let report = quantize_checkpoint(backend, checkpoint, calib, opts, &mut writer)?;
    writer.write_extra_file(crate::report::REPORT_FILE, report.to_json().as_bytes())?;
    let dir = writer.finish()?;
    Ok((dir, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use calibration::CalibrationMeta;
    use runtime::CpuBackend;

    fn fixture_model() -> Option<Checkpoint> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s");
        // The model file is moved away briefly during device calls; skip rather than fail then.
        if !dir.join("model.safetensors").exists() {
            eprintln!("fixtures/moe-s/model.safetensors is absent; skipping");
            return None;
        }
        Some(Checkpoint::open(&dir).unwrap())
    }

    fn tiny_set(nsamples: usize, seqlen: usize) -> CalibrationSet {
        // Deterministic ids spread over the vocabulary.
        let input_ids = (0..nsamples * seqlen)
            .map(|i| ((i * 7919 + 13) % 31000) as i32 + 100)
            .collect();
        let meta = CalibrationMeta {
            recipe: "test".into(),
            template: "-".into(),
            seed: 0,
            nsamples,
            seqlen,
            tokenizer_sha256: String::new(),
            dataset_sha256: String::new(),
            dataset: "synthetic".into(),
            stream_tokens: nsamples * seqlen,
            rows_read: 0,
            eos_id: 2,
        };
        CalibrationSet {
            nsamples,
            seqlen,
            input_ids,
            meta,
        }
    }

    #[derive(Default)]
    struct Collect {
        quantized: Vec<(String, QuantizedLinear)>,
        dense: Vec<String>,
    }

    impl Sink for Collect {
        fn quantized(&mut self, name: &str, q: &QuantizedLinear) -> Result<()> {
            self.quantized.push((name.to_string(), q.clone()));
            Ok(())
        }
        fn dense(&mut self, name: &str, _shape: &[usize], _data: &[f32]) -> Result<()> {
            self.dense.push(name.to_string());
            Ok(())
        }
    }

    #[test]
    fn attention_shortcut_gives_the_forward_pass_hessian() {
        let Some(ck) = fixture_model() else { return };
        let arch = Mixtral::new(CpuBackend::new(), ck.config().clone());
        let table = ck.load_embedding_on(&arch.backend).unwrap();
        let set = tiny_set(2, 48);
        let inputs: Vec<_> = set
            .windows()
            .map(|w| {
                arch.embed(&table, &w.iter().map(|&t| t as u32).collect::<Vec<_>>())
                    .unwrap()
            })
            .collect();
        let layer = ck.load_layer_on(&arch.backend, 0).unwrap();
        let bar = ProgressBar::hidden();
        let (short, _) =
            collect_hessians(&arch, &layer, &inputs, &[LinearSite::Attention], &bar, 0).unwrap();
        let sites = [LinearSite::Attention, LinearSite::AttentionOut];
        let (full, _) = collect_hessians(&arch, &layer, &inputs, &sites, &bar, 0).unwrap();
        let (a, b) = (
            &short[&LinearSite::Attention],
            &full[&LinearSite::Attention],
        );
        assert_eq!((a.calls(), a.tokens()), (2, 96));
        assert_eq!(a.matrix(), b.matrix());
        assert_eq!(full[&LinearSite::AttentionOut].tokens(), 96);
    }

    #[test]
    fn driver_writes_every_module_in_reference_order_and_keeps_the_rest_dense() {
        let Some(ck) = fixture_model() else { return };
        let preset = Preset::by_name("gptq-4bit-128g-actorder_True").unwrap();
        let set = tiny_set(2, 64);
        let mut sink = Collect::default();
        let report = quantize_checkpoint(
            CpuBackend::new(),
            &ck,
            Some(&set),
            &Options::new(preset),
            &mut sink,
        )
        .unwrap();
        let layers = ck.config().num_hidden_layers;
        let want: Vec<String> = (0..layers)
            .flat_map(|l| layer_modules(8).into_iter().map(move |m| m.hf_name(l)))
            .collect();
        let got: Vec<String> = sink.quantized.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(got, want);
        assert!(sink
            .dense
            .contains(&"model.layers.0.block_sparse_moe.gate.weight".to_string()));
        assert!(sink.dense.contains(&"lm_head.weight".to_string()));
        assert!(sink
            .dense
            .contains(&"model.embed_tokens.weight".to_string()));
        assert!(!sink
            .dense
            .iter()
            .any(|n| n.contains("proj") || n.contains(".w1.") || n.contains(".w2.")));
        // 128 tokens: threshold 0.64 tokens, so only experts that got no token at all are RTN.
        for m in &report.modules {
            let attention = m.module.contains("self_attn");
            if attention {
                assert_eq!(
                    (m.method, m.tokens, m.calls),
                    (Method::Gptq, 128, 2),
                    "{}",
                    m.module
                );
            }
            assert_eq!(
                m.method == Method::Rtn,
                m.tokens == 0,
                "{}: {:?}",
                m.module,
                m.reason
            );
        }
        // Expert token counts: every token goes to exactly two experts.
        for l in 0..layers {
            let total: usize = report
                .modules
                .iter()
                .filter(|m| m.layer == l && m.module.ends_with(".w1"))
                .map(|m| m.tokens)
                .sum();
            assert_eq!(total, 2 * 128, "layer {l}");
        }
        assert!(sink
            .quantized
            .iter()
            .all(|(_, q)| q.bits == 4 && q.group_size == 128));
        // A starved expert is round-to-nearest from its original weights with GPTQ's quantizer.
        let starved = report
            .modules
            .iter()
            .find(|m| m.method == Method::Rtn)
            .expect("the fixture has experts that get no token");
        let (name, q) = sink
            .quantized
            .iter()
            .find(|(n, _)| n.contains(starved.module.as_str()))
            .unwrap_or_else(|| panic!("{} not written", starved.module));
        let w = ck.linear(name).unwrap();
        let cfg = GptqConfig::from_preset(&preset);
        let by = |d| rtn(&w.data, w.shape[0], w.shape[1], &cfg, d).unwrap();
        assert_eq!(q, &by(ScaleDivision::True));
        assert_ne!(
            q,
            &by(ScaleDivision::Reciprocal),
            "this weight tells the two apart"
        );
    }

    #[test]
    fn rtn_needs_no_calibration_and_gptq_does() {
        let Some(ck) = fixture_model() else { return };
        let preset = Preset::by_name("main").unwrap();
        let mut opts = Options::new(preset);
        let err = quantize_checkpoint(CpuBackend::new(), &ck, None, &opts, &mut Collect::default())
            .unwrap_err();
        assert!(err.to_string().contains("calibration"), "{err}");
        opts.rtn = true;
        let mut sink = Collect::default();
        let report = quantize_checkpoint(CpuBackend::new(), &ck, None, &opts, &mut sink).unwrap();
        assert!(report
            .modules
            .iter()
            .all(|m| m.method == Method::Rtn && m.reason.as_deref() == Some("--rtn")));
        // RTN from the original weights, sequential g_idx: the same as calling rtn() directly.
        let (name, q) = &sink.quantized[5];
        let w = ck.linear(name).unwrap();
        let cfg = GptqConfig::from_preset(&preset);
        assert_eq!(
            q,
            &rtn(
                &w.data,
                w.shape[0],
                w.shape[1],
                &cfg,
                ScaleDivision::Reciprocal
            )
            .unwrap()
        );
    }
}
