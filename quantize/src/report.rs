//! `quant_report.json`: what happened to every module of a branch (method and why, tokens seen,
//! damp used, loss, time), per-layer timings and the calibration metadata.

use serde::Serialize;
use serde_json::{json, Value};

use crate::linalg::Conditioning;
use crate::Preset;

/// File name of the report inside a branch directory.
pub const REPORT_FILE: &str = "quant_report.json";

/// How a module was quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// GPTQ (`fasterquant`) with error feedback.
    Gptq,
    /// Round-to-nearest on the original weights, no error feedback.
    Rtn,
}

/// One quantized module's entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleReport {
    /// Full name, e.g. `model.layers.0.self_attn.k_proj`.
    pub module: String,
    /// Decoder layer.
    pub layer: usize,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// GPTQ or RTN.
    pub method: Method,
    /// Why RTN was used (`--rtn`, starved expert, unfactorizable Hessian); `None` for GPTQ.
    pub reason: Option<String>,
    /// Calibration tokens that reached the module's input.
    pub tokens: usize,
    /// Forward calls that reached it (N of `H = 2/N Σ x xᵀ`).
    pub calls: usize,
    /// GPTQ's `Σ (w - q)² / d²`; `None` for RTN.
    pub loss: Option<f64>,
    /// Damping actually used and how the Hessian was made invertible; `None` for RTN.
    pub conditioning: Option<Conditioning>,
    /// Input columns with no signal (zeroed by GPTQ, as the reference does).
    pub dead_columns: usize,
    /// Solve time.
    pub seconds: f64,
}

/// Where one layer's time went.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LayerTiming {
    /// Decoder layer.
    pub layer: usize,
    /// Forward passes (subset passes and the output pass), Hessian time excluded.
    pub forward_seconds: f64,
    /// Copying module inputs out and accumulating Hessians.
    pub hessian_seconds: f64,
    /// GPTQ / RTN solves (wall time; modules of a subset run in parallel).
    pub solve_seconds: f64,
    /// Packing, dequantizing the packed weight back into the layer, writing.
    pub write_seconds: f64,
}

/// The whole report of one branch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantReport {
    /// Branch name.
    pub branch: String,
    /// Bits.
    pub bits: u32,
    /// Group size (-1: none).
    pub group_size: i32,
    /// Act-order.
    pub desc_act: bool,
    /// Damping fraction.
    pub damp_percent: f64,
    /// Symmetric quantizer.
    pub sym: bool,
    /// Static groups.
    pub static_groups: bool,
    /// True-sequential subsets.
    pub true_sequential: bool,
    /// `gptq`, or `rtn` when the whole branch was made by round-to-nearest.
    pub method: Method,
    /// Lock-step block size of the solver.
    pub blocksize: usize,
    /// A module whose input saw fewer tokens than this is quantized by RTN (not zeroed).
    pub starved_threshold_tokens: f64,
    /// The calibration set's metadata (`null` for a branch made by RTN only).
    pub calibration: Value,
    /// Where this implementation departs from AutoGPTQ 0.6, stated once.
    pub deviations: Vec<String>,
    /// Modules in the order they were quantized.
    pub modules: Vec<ModuleReport>,
    /// Per-layer timings.
    pub layers: Vec<LayerTiming>,
    /// Wall time of the whole run.
    pub total_seconds: f64,
}

impl QuantReport {
    /// An empty report for `preset`.
    pub fn new(
        preset: &Preset,
        method: Method,
        starved_threshold_tokens: f64,
        calibration: Value,
    ) -> Self {
        QuantReport {
            branch: preset.name.to_string(),
            bits: preset.bits,
            group_size: preset.group_size,
            desc_act: preset.desc_act,
            damp_percent: preset.damp_percent,
            sym: preset.sym,
            static_groups: preset.static_groups,
            true_sequential: preset.true_sequential,
            method,
            blocksize: crate::gptq::BLOCKSIZE,
            starved_threshold_tokens,
            calibration,
            deviations: vec![
                "modules whose calibration inputs number fewer than starved_threshold_tokens are \
                 quantized by round-to-nearest from their original weights (AutoGPTQ 0.6 zeroes them)"
                    .into(),
                "act-order uses a stable descending sort of diag(H) (torch.argsort is not stable)".into(),
                "a Hessian that is not positive definite after damping is retried with more damping, \
                 then a diagonal floor, then round-to-nearest (GPTQModel HEAD); AutoGPTQ 0.6 aborts"
                    .into(),
                "later subsets and layers see the weights dequantized from the packed tensors \
                 (fp16 scales), exactly what the files hold"
                    .into(),
            ],
            modules: Vec::new(),
            layers: Vec::new(),
            total_seconds: 0.0,
        }
    }

    /// Modules quantized by RTN because they were starved, with their token counts.
    pub fn starved(&self) -> Vec<(&str, usize)> {
        self.modules
            .iter()
            .filter(|m| {
                m.reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("starved"))
            })
            .map(|m| (m.module.as_str(), m.tokens))
            .collect()
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| json!({ "error": e.to_string() }).to_string())
    }

    /// The one-line log of a module.
    pub fn log_line(m: &ModuleReport) -> String {
        match m.method {
            Method::Gptq => {
                let damp = match m.conditioning {
                    Some(Conditioning::Damped {
                        percdamp,
                        damp,
                        retries,
                    }) if retries > 0 => {
                        format!("damp {percdamp:.4} ({damp:.3e}) after {retries} retries")
                    }
                    Some(Conditioning::Damped { percdamp, damp, .. }) => {
                        format!("damp {percdamp} ({damp:.3e})")
                    }
                    Some(Conditioning::Floored { floor, percdamp }) => {
                        format!("damp {percdamp} + diagonal floor {floor:.3e}")
                    }
                    Some(Conditioning::Unfactorizable) | None => "no inverse".into(),
                };
                format!(
                    "{}: gptq, {} tokens / {} calls, {damp}, loss {:.4e}, {} dead columns, {:.2}s",
                    m.module,
                    m.tokens,
                    m.calls,
                    m.loss.unwrap_or(f64::NAN),
                    m.dead_columns,
                    m.seconds
                )
            }
            Method::Rtn => format!(
                "{}: rtn ({}), {} tokens, {:.2}s",
                m.module,
                m.reason.as_deref().unwrap_or(""),
                m.tokens,
                m.seconds
            ),
        }
    }
}

/// The calibration metadata as JSON (what the set was built from).
pub fn calibration_json(meta: &calibration::CalibrationMeta) -> Value {
    json!({
        "recipe": meta.recipe,
        "template": meta.template,
        "seed": meta.seed,
        "nsamples": meta.nsamples,
        "seqlen": meta.seqlen,
        "dataset": meta.dataset,
        "dataset_sha256": meta.dataset_sha256,
        "tokenizer_sha256": meta.tokenizer_sha256,
        "stream_tokens": meta.stream_tokens,
        "rows_read": meta.rows_read,
        "eos_id": meta.eos_id,
    })
}
