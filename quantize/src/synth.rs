//! Random Mixtral models of any shape, written dense (BF16) or directly as a GPTQ branch, so that
//! speed can be measured at full size (Mixtral-8x7B: 93 GB dense, 24 GB at 4 bits) without
//! downloading anything.
//!
//! Weights are drawn so that activations stay in a realistic range through any number of layers:
//! - embeddings ~ N(0, 1); every RMSNorm weight 1.0;
//! - a linear with `in` inputs has std `1/sqrt(in)` (unit-variance outputs for unit-variance
//!   inputs): q/k/v, the experts' w1/w3, the router gate (logits of std 1 over the experts, so
//!   the top-2 choice and its weights vary from token to token) and lm_head;
//! - the two projections that write into the residual stream, o_proj and w2, are scaled down by a
//!   further `1/sqrt(2·layers)` (GPT-2's residual scaling), so the residual grows slowly and the
//!   embedding is never drowned.
//!
//! A GPTQ branch is generated in its packed form, never through dense weights, with the same std
//! per module; router, norms, embeddings and lm_head are dense F16 in a branch, as `quantize`
//! writes them. The draws ([`draw`]) are counter-based: bit-identical for a given seed whatever the
//! number of threads, and a tensor's values do not depend on the other tensors (`--layers 2` gives
//! the first two layers of the full model).
//!
//! Memory is bounded by a few tensors: one tensor (or one module's four GPTQ tensors) is drawn on
//! all cores while the previous one is written by [`BranchWriter`], which writes under
//! `<out>.partial` and renames at the end.

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use half::{bf16, f16};
use runtime::qlinear::pack_multiple;
use safetensors::Dtype;
use serde_json::{Map, Value};

use crate::branch::{BranchLayout, BranchWriter};
use crate::config::ModelDims;
use crate::error::{Error, Result};
use crate::presets::Preset;

pub mod draw;

pub use draw::{normal_bytes, synth_g_idx, synth_gptq, synth_qweight, tensor_key};

/// The tokenizer files copied from the bundled model when the vocabulary is Mixtral's 32000.
pub const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Mixtral's vocabulary size, the one the bundled tokenizer has.
pub const MIXTRAL_VOCAB: usize = 32000;

/// The dimensions of a synthetic Mixtral (the `config.json` fields that matter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthShape {
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size` (per expert).
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`; the head dim is `hidden_size / num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads`.
    pub num_key_value_heads: usize,
    /// `num_local_experts`.
    pub num_local_experts: usize,
    /// `num_experts_per_tok`.
    pub num_experts_per_tok: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
}

impl SynthShape {
    /// Mixtral-8x7B(-Instruct-v0.1): 46.7 B parameters, head dim 128.
    pub const MIXTRAL_8X7B: SynthShape = SynthShape {
        hidden_size: 4096,
        intermediate_size: 14336,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        num_local_experts: 8,
        num_experts_per_tok: 2,
        vocab_size: MIXTRAL_VOCAB,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        max_position_embeddings: 32768,
    };

    /// The bundled fixture `fixtures/moe-s` (29.6 M parameters, head dim 32).
    /// The rest (experts, routing, vocabulary, norm, RoPE, positions) is Mixtral-8x7B's.
    pub const MOE_S: SynthShape = SynthShape {
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        ..SynthShape::MIXTRAL_8X7B
    };

    /// The named shapes, for `--shape`.
    pub const NAMED: [(&'static str, SynthShape); 2] = [
        ("8x7b", SynthShape::MIXTRAL_8X7B),
        ("moe-s", SynthShape::MOE_S),
    ];

    /// Looks a shape up by name (`8x7b`, `moe-s`).
    ///
    /// # Errors
    /// [`Error::Setting`] naming `--shape` and the known names.
    pub fn by_name(name: &str) -> Result<SynthShape> {
        SynthShape::NAMED
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, s)| *s)
            .ok_or_else(|| Error::Setting {
                what: "--shape".into(),
                expected: SynthShape::NAMED
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(" or "),
                got: format!("`{name}`"),
            })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks that the shape is a valid Mixtral and, for a GPTQ `preset`, that every quantized
    /// linear packs at its bit width and is split evenly into groups.
    ///
    /// # Errors
    /// [`Error::Setting`] whose `what` names the config field and the `synth` flag that sets it.
    pub fn check(&self, preset: Option<&Preset>) -> Result<()> {
        let setting = |what: &str, expected: String, got: usize| Error::Setting {
            what: what.to_string(),
            expected,
            got: got.to_string(),
        };
        for (what, v) in [
            ("`num_hidden_layers` (--layers)", self.num_hidden_layers),
            ("`hidden_size` (--hidden)", self.hidden_size),
            (
                "`intermediate_size` (--intermediate)",
                self.intermediate_size,
            ),
            ("`num_attention_heads` (--heads)", self.num_attention_heads),
            (
                "`num_key_value_heads` (--kv-heads)",
                self.num_key_value_heads,
            ),
            ("`num_local_experts` (--experts)", self.num_local_experts),
            ("`num_experts_per_tok` (--top-k)", self.num_experts_per_tok),
            ("`vocab_size` (--vocab)", self.vocab_size),
        ] {
            if v == 0 {
                return Err(setting(what, "a positive number".into(), v));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads)
            || !self.head_dim().is_multiple_of(2)
        {
            return Err(setting(
                "`hidden_size` (--hidden)",
                format!(
                    "a multiple of `num_attention_heads` (--heads) {} giving an even head dim (RoPE)",
                    self.num_attention_heads
                ),
                self.hidden_size,
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(setting(
                "`num_key_value_heads` (--kv-heads)",
                format!(
                    "a divisor of `num_attention_heads` (--heads) {}",
                    self.num_attention_heads
                ),
                self.num_key_value_heads,
            ));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return Err(setting(
                "`num_experts_per_tok` (--top-k)",
                format!("at most `num_local_experts` {}", self.num_local_experts),
                self.num_experts_per_tok,
            ));
        }
        let Some(preset) = preset else {
            return Ok(());
        };
        let multiple = pack_multiple(preset.bits);
        let kv = self.num_key_value_heads * self.head_dim();
        // (what, value, whether it is some linear's input width and so must hold whole groups)
        for (what, v, is_input) in [
            ("`hidden_size` (--hidden)", self.hidden_size, true),
            (
                "`intermediate_size` (--intermediate)",
                self.intermediate_size,
                true,
            ),
            (
                "k/v projection width `num_key_value_heads × head dim` (--kv-heads)",
                kv,
                false,
            ),
        ] {
            if v % multiple != 0 {
                return Err(setting(
                    what,
                    format!(
                        "a multiple of {multiple} for {}-bit packing (--branch {})",
                        preset.bits, preset.name
                    ),
                    v,
                ));
            }
            if is_input && preset.group_size > 0 && v % preset.group_size as usize != 0 {
                return Err(setting(
                    what,
                    format!(
                        "a multiple of the group size {} of --branch {} (each linear's inputs \
                         split into whole groups)",
                        preset.group_size, preset.name
                    ),
                    v,
                ));
            }
        }
        Ok(())
    }

    /// The `config.json` of the model, in transformers' sorted-key form (as the bundled fixture
    /// and Mixtral-8x7B's own file have it), `torch_dtype` `bfloat16`.
    pub fn config_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("architectures", Value::from(vec!["MixtralForCausalLM"]));
        put("attention_dropout", Value::from(0.0));
        put("bos_token_id", Value::from(1));
        put("eos_token_id", Value::from(2));
        put("hidden_act", Value::from("silu"));
        put("hidden_size", Value::from(self.hidden_size));
        put("initializer_range", Value::from(0.02));
        put("intermediate_size", Value::from(self.intermediate_size));
        put(
            "max_position_embeddings",
            Value::from(self.max_position_embeddings),
        );
        put("model_type", Value::from("mixtral"));
        put("num_attention_heads", Value::from(self.num_attention_heads));
        put("num_experts_per_tok", Value::from(self.num_experts_per_tok));
        put("num_hidden_layers", Value::from(self.num_hidden_layers));
        put("num_key_value_heads", Value::from(self.num_key_value_heads));
        put("num_local_experts", Value::from(self.num_local_experts));
        put("output_router_logits", Value::from(false));
        put("rms_norm_eps", Value::from(self.rms_norm_eps));
        put("rope_theta", Value::from(self.rope_theta));
        put("router_aux_loss_coef", Value::from(0.02));
        put("sliding_window", Value::Null);
        put("tie_word_embeddings", Value::from(false));
        put("torch_dtype", Value::from("bfloat16"));
        put("transformers_version", Value::from("4.36.0"));
        put("use_cache", Value::from(true));
        put("vocab_size", Value::from(self.vocab_size));
        Value::Object(m)
    }

    /// Parameters of the dense model.
    pub fn parameters(&self) -> u64 {
        let (h, i, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let q = (self.num_attention_heads * self.head_dim()) as u64;
        let kv = (self.num_key_value_heads * self.head_dim()) as u64;
        let e = self.num_local_experts as u64;
        let layer = 2 * h + e * h + 2 * h * q + 2 * h * kv + e * 3 * h * i;
        2 * v * h + h + self.num_hidden_layers as u64 * layer
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// The model's dimensions.
    pub shape: SynthShape,
    /// A GPTQ branch of this preset, or `None` for the dense BF16 model.
    pub preset: Option<Preset>,
    /// Seed of every random draw.
    pub seed: u64,
    /// Split the safetensors into shards of at most this many bytes (with an index).
    pub max_shard_size: Option<u64>,
    /// Where the tokenizer files ([`TOKENIZER_FILES`]) are copied from when the vocabulary is
    /// [`MIXTRAL_VOCAB`] (the bundled `fixtures/moe-s`).
    pub tokenizer_dir: Option<PathBuf>,
    /// Threads drawing the weights (`None`: rayon's global pool, all cores). The output is the
    /// same for any number.
    pub threads: Option<usize>,
}

/// Progress after one tensor was written.
#[derive(Debug, Clone)]
pub struct SynthProgress<'a> {
    /// The tensor just written.
    pub name: &'a str,
    /// Its decoder layer, if it belongs to one.
    pub layer: Option<usize>,
    /// Tensors written so far.
    pub tensors_done: usize,
    /// Tensors in total.
    pub tensors_total: usize,
    /// Tensor bytes written so far.
    pub bytes_done: u64,
    /// Tensor bytes in total.
    pub bytes_total: u64,
}

/// What [`write_synth`] wrote.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    /// The final directory.
    pub dir: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of every file in the directory.
    pub bytes: u64,
    /// Wall-clock seconds, from planning to the final rename.
    pub seconds: f64,
    /// Whether the tokenizer files were copied (so `eval` on text works).
    pub tokenizer: bool,
}

/// Writes a random Mixtral to `out` (atomically: `<out>.partial`, renamed at the end; an existing
/// `out` is replaced only then). `progress` is called after every tensor.
///
/// # Errors
/// [`Error::Setting`] for an invalid shape ([`SynthShape::check`]); [`Error::Io`] and the
/// [`BranchWriter`] errors on writing.
pub fn write_synth(
    out: &Path,
    options: &SynthOptions,
    mut progress: impl FnMut(&SynthProgress),
) -> Result<SynthSummary> {
    let start = Instant::now();
    let shape = &options.shape;
    shape.check(options.preset.as_ref())?;
    let config = shape.config_json();
    let config_path = out.join("config.json");
    runtime::config::MixtralConfig::from_value(config.clone(), &config_path).map_err(|e| {
        Error::Runtime {
            context: "the synthetic config is not a valid Mixtral config".into(),
            source: Box::new(e),
        }
    })?;
    let dims = ModelDims::from_config(&config, &config_path)?;
    let layout = match &options.preset {
        Some(p) => BranchLayout::mixtral(&dims, p.bits, p.group_size)?,
        None => dense_layout(&dims)?,
    };
    let tokenizer_dir = options
        .tokenizer_dir
        .as_deref()
        .filter(|d| shape.vocab_size == MIXTRAL_VOCAB && d.join(TOKENIZER_FILES[0]).is_file());
    let mut writer = BranchWriter::create_at(
        out,
        options.preset.as_ref(),
        &config,
        tokenizer_dir,
        layout.clone(),
        options.max_shard_size,
    )?;
    // Our own generation config (bos 1, eos 2: Mixtral's), whatever the tokenizer directory held.
    writer.write_extra_file("generation_config.json", generation_config().as_bytes())?;
    writer.write_extra_file("synth.json", synth_record(options).as_bytes())?;

    let tensors_total = layout.tensors.len();
    let bytes_total = layout.total_size();
    let (mut tensors_done, mut bytes_done) = (0usize, 0u64);
    let generator = Generator {
        shape: *shape,
        preset: options.preset,
        seed: options.seed,
    };
    let pool = match options.threads {
        None => None,
        Some(n) => Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| Error::Setting {
                    what: "threads (--threads)".into(),
                    expected: "a thread pool that can be started".into(),
                    got: format!("{n}: {e}"),
                })?,
        ),
    };
    std::thread::scope(|s| -> Result<()> {
        // Capacity 1: at most one tensor waits while one is drawn and one is written.
        let (tx, rx) = sync_channel::<Drawn>(1);
        let tensors = &layout.tensors;
        let generator = &generator;
        let pool = pool.as_ref();
        s.spawn(move || {
            let draw_all = move || {
                for spec in tensors {
                    for drawn in generator.draw(&spec.name, &spec.shape, spec.dtype) {
                        if tx.send(drawn).is_err() {
                            return; // the writer failed and hung up
                        }
                    }
                }
            };
            match pool {
                Some(pool) => pool.install(draw_all),
                None => draw_all(),
            }
        });
        for drawn in rx {
            writer.write_raw(&drawn.name, drawn.dtype, &drawn.shape, &drawn.bytes)?;
            tensors_done += 1;
            bytes_done += drawn.bytes.len() as u64;
            progress(&SynthProgress {
                name: &drawn.name,
                layer: layer_of(&drawn.name),
                tensors_done,
                tensors_total,
                bytes_done,
                bytes_total,
            });
        }
        Ok(())
    })?;
    let dir = writer.finish()?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })? {
        let entry = entry.map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
    }
    Ok(SynthSummary {
        dir,
        tensors: tensors_done,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
        tokenizer: tokenizer_dir.is_some(),
    })
}

/// Every tensor of the dense model, BF16, in model order (the branch layout with nothing quantized).
fn dense_layout(dims: &ModelDims) -> Result<BranchLayout> {
    // Bits and group size are unused when no module is quantized.
    let mut layout = BranchLayout::plan(dims, 16, -1, &[])?;
    for t in &mut layout.tensors {
        t.dtype = Dtype::BF16;
    }
    Ok(layout)
}

/// Mixtral-8x7B-Instruct-v0.1's `generation_config.json`.
fn generation_config() -> String {
    "{\n  \"_from_model_config\": true,\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2,\n  \
     \"transformers_version\": \"4.36.0\"\n}\n"
        .to_string()
}

/// `synth.json`: how the weights were drawn, so a directory says it is not a trained model.
fn synth_record(options: &SynthOptions) -> String {
    let v = serde_json::json!({
        "synthetic": true,
        "seed": options.seed,
        "branch": options.preset.map(|p| p.name).unwrap_or("bf16"),
        "weights": "random, quantize::synth (embeddings N(0,1), norms 1, linears 1/sqrt(in), \
                    o_proj and w2 further 1/sqrt(2 layers); GPTQ codes uniform, 0 mapped to the zero point)",
    });
    crate::config::to_python_json(&v) + "\n"
}

/// The decoder layer of a tensor name (`model.layers.{i}.…`).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// One tensor's bytes, ready for the writer.
struct Drawn {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Draws the tensors of one model.
struct Generator {
    shape: SynthShape,
    preset: Option<Preset>,
    seed: u64,
}

impl Generator {
    /// The tensors for planned tensor `name`: itself if dense, a module's four GPTQ tensors for its
    /// `.qweight`, nothing for the other three (drawn with the `.qweight`). Large tensors are
    /// drawn straight into their little-endian bytes.
    fn draw(&self, name: &str, shape: &[usize], dtype: Dtype) -> Vec<Drawn> {
        let dense = |bytes| {
            vec![Drawn {
                name: name.to_string(),
                dtype,
                shape: shape.to_vec(),
                bytes,
            }]
        };
        let len: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
            let one = match dtype {
                Dtype::BF16 => bf16::ONE.to_bits(),
                _ => f16::ONE.to_bits(),
            };
            return dense(one.to_le_bytes().repeat(shape.iter().product()));
        }
        let key = tensor_key(self.seed, name);
        if let Some(module) = name.strip_suffix(".weight") {
            let std = weight_std(&self.shape, module);
            let mut bytes = vec![0u8; len];
            match dtype {
                Dtype::BF16 => draw::normal_into(key, std, draw::bf16_bits, &mut bytes),
                _ => draw::normal_into(key, std, |x| f16::from_f32(x).to_bits(), &mut bytes),
            }
            return dense(bytes);
        }
        let (Some(module), Some(preset)) = (name.strip_suffix(".qweight"), self.preset) else {
            return Vec::new(); // .qzeros, .scales, .g_idx: drawn with .qweight
        };
        let (k, n) = (shape[0] * 32 / preset.bits as usize, shape[1]);
        let mut qweight = vec![0u8; len];
        draw::synth_qweight_into(preset.bits, k, n, key, &mut qweight);
        let w = draw::gptq_params(&preset, k, n, weight_std(&self.shape, module), key);
        let s = w.shapes();
        let part = |suffix: &str, dtype, shape: &[usize], bytes| Drawn {
            name: format!("{module}.{suffix}"),
            dtype,
            shape: shape.to_vec(),
            bytes,
        };
        vec![
            part("qweight", Dtype::I32, &s.qweight, qweight),
            part(
                "qzeros",
                Dtype::I32,
                &s.qzeros,
                le_bytes(&w.qzeros, |x| x.to_le_bytes()),
            ),
            part(
                "scales",
                Dtype::F16,
                &s.scales,
                le_bytes(&w.scales, |x| x.to_le_bytes()),
            ),
            part(
                "g_idx",
                Dtype::I32,
                &s.g_idx,
                le_bytes(&w.g_idx, |x| x.to_le_bytes()),
            ),
        ]
    }
}

/// The little-endian bytes of `v` (a sized loop: `flat_map(..).collect()` grows its buffer).
fn le_bytes<T: Copy, const N: usize>(v: &[T], bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for &x in v {
        out.extend_from_slice(&bytes(x));
    }
    out
}

/// The std a dense weight named `module` (full name without `.weight`) is drawn with.
pub fn weight_std(shape: &SynthShape, module: &str) -> f32 {
    let residual = 1.0 / (2.0 * shape.num_hidden_layers.max(1) as f32).sqrt();
    let last = module.rsplit('.').next().unwrap_or(module);
    match last {
        "embed_tokens" => 1.0,
        "o_proj" => {
            residual / ((shape.num_attention_heads * shape.head_dim()).max(1) as f32).sqrt()
        }
        "w2" => residual / (shape.intermediate_size.max(1) as f32).sqrt(),
        // q/k/v, w1/w3, the router gate, lm_head: all read the hidden state.
        _ => 1.0 / (shape.hidden_size.max(1) as f32).sqrt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean and (population) standard deviation; shared with `draw`'s tests.
    pub(super) fn mean_std(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
        let n = v.clone().count() as f64;
        let mean = v.clone().sum::<f64>() / n;
        let var = v.map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn named_shapes_match_the_fixture_and_mixtral_8x7b() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s/config.json");
        let fixture = runtime::config::MixtralConfig::from_file(&path).unwrap();
        let s = SynthShape::by_name("moe-s").unwrap();
        assert_eq!(
            (
                s.hidden_size,
                s.intermediate_size,
                s.num_hidden_layers,
                s.num_attention_heads,
                s.num_key_value_heads,
                s.num_local_experts,
                s.num_experts_per_tok,
                s.vocab_size,
                s.max_position_embeddings,
            ),
            (
                fixture.hidden_size,
                fixture.intermediate_size,
                fixture.num_hidden_layers,
                fixture.num_attention_heads,
                fixture.num_key_value_heads,
                fixture.num_local_experts,
                fixture.num_experts_per_tok,
                fixture.vocab_size,
                fixture.max_position_embeddings,
            )
        );
        assert_eq!(
            (s.rms_norm_eps, s.rope_theta),
            (fixture.rms_norm_eps, fixture.rope_theta)
        );
        // The synthetic config has the fixture's keys, in its (sorted) order.
        let fixture_keys: Vec<&String> = fixture.raw.as_object().unwrap().keys().collect();
        let config = s.config_json();
        assert_eq!(
            config.as_object().unwrap().keys().collect::<Vec<_>>(),
            fixture_keys
        );
        // Mixtral-8x7B: 46,702,792,704 parameters, head dim 128.
        let m = SynthShape::by_name("8x7B").unwrap();
        assert_eq!(m.parameters(), 46_702_792_704);
        assert_eq!(m.head_dim(), 128);
        let e = SynthShape::by_name("7x8b").unwrap_err().to_string();
        assert!(
            e.contains("--shape") && e.contains("8x7b") && e.contains("moe-s"),
            "{e}"
        );
    }

    #[test]
    fn bad_shapes_name_the_flag_and_what_was_expected() {
        let g128 = Preset::by_name("gptq-4bit-128g-actorder_True").unwrap();
        let bad = SynthShape {
            intermediate_size: 520,
            ..SynthShape::MOE_S
        };
        bad.check(None).unwrap();
        let e = bad.check(Some(&g128)).unwrap_err().to_string();
        assert!(
            e.contains("--intermediate") && e.contains("128") && e.contains("520"),
            "{e}"
        );
        let three = Preset::by_name("gptq-3bit--1g-actorder_True").unwrap();
        let e = SynthShape {
            hidden_size: 272,
            num_attention_heads: 8,
            ..SynthShape::MOE_S
        }
        .check(Some(&three))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--hidden") && e.contains("multiple of 32"),
            "{e}"
        );
        let e = SynthShape {
            num_key_value_heads: 3,
            ..SynthShape::MOE_S
        }
        .check(None)
        .unwrap_err()
        .to_string();
        assert!(e.contains("--kv-heads") && e.contains('3'), "{e}");
        let e = SynthShape {
            num_experts_per_tok: 9,
            ..SynthShape::MOE_S
        }
        .check(None)
        .unwrap_err()
        .to_string();
        assert!(e.contains("--top-k"), "{e}");
        let e = SynthShape {
            num_hidden_layers: 0,
            ..SynthShape::MOE_S
        }
        .check(None)
        .unwrap_err()
        .to_string();
        assert!(e.contains("--layers"), "{e}");
    }

    fn options(preset: Option<&str>, layers: usize) -> SynthOptions {
        SynthOptions {
            shape: SynthShape {
                num_hidden_layers: layers,
                ..SynthShape::MOE_S
            },
            preset: preset.map(|p| Preset::by_name(p).unwrap()),
            seed: 1,
            max_shard_size: None,
            tokenizer_dir: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s")),
            threads: None,
        }
    }

    #[test]
    fn a_synthetic_branch_verifies_clean_and_is_deterministic() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = options(Some("gptq-3bit-128g-actorder_True"), 2);
        let mut calls = 0;
        let a = write_synth(&tmp.path().join("a"), &opts, |p| {
            calls += 1;
            assert!(p.tensors_done <= p.tensors_total && p.bytes_done <= p.bytes_total);
        })
        .unwrap();
        assert_eq!(calls, a.tensors);
        assert_eq!(a.tensors, 2 * (28 * 4 + 3) + 3);
        assert!(a.tokenizer);
        let report = crate::verify::verify_branch(&a.dir).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(report.quantized_modules, 2 * 28);
        // Same seed, another thread count: the same bytes.
        let one_thread = SynthOptions {
            threads: Some(1),
            ..opts.clone()
        };
        let b = write_synth(&tmp.path().join("b"), &one_thread, |_| {}).unwrap();
        let model = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert!(model(&a.dir) == model(&b.dir));
        // The checkpoint loads and its dense tensors are F16 with the planned std.
        let ckpt = runtime::Checkpoint::open(&a.dir).unwrap();
        assert!(ckpt.is_quantized("model.layers.1.block_sparse_moe.experts.7.w2"));
        assert!(!tmp.path().join("a.partial").exists());
    }

    #[test]
    fn a_synthetic_dense_model_is_bf16_with_a_plain_config() {
        let tmp = tempfile::tempdir().unwrap();
        let mut opts = options(None, 1);
        opts.shape.vocab_size = 1024;
        opts.max_shard_size = Some(1 << 20);
        let s = write_synth(&tmp.path().join("d"), &opts, |_| {}).unwrap();
        assert!(!s.tokenizer, "vocab 1024: no tokenizer copied");
        assert!(!s.dir.join("tokenizer.json").exists());
        assert!(!s.dir.join("quantize_config.json").exists());
        assert!(s.dir.join("model.safetensors.index.json").is_file());
        let config = crate::config::read_json(&s.dir.join("config.json")).unwrap();
        assert!(config.get("quantization_config").is_none());
        assert_eq!(config["vocab_size"], 1024);
        let ckpt = runtime::Checkpoint::open(&s.dir).unwrap();
        let embed = ckpt.read("model.embed_tokens.weight").unwrap();
        let q = ckpt.read("model.layers.0.self_attn.q_proj.weight").unwrap();
        let norm = ckpt.read("model.layers.0.input_layernorm.weight").unwrap();
        let stats = |t: &runtime::HostTensor| mean_std(t.data.iter().map(|&x| x as f64));
        let (_, e) = stats(&embed);
        let (_, qs) = stats(&q);
        let (nm, ns) = stats(&norm);
        assert!((e - 1.0).abs() < 0.02, "embedding std {e}");
        assert!(
            (qs * 16.0 - 1.0).abs() < 0.02,
            "q_proj std {qs}, expected 1/sqrt(256)"
        );
        assert_eq!((nm, ns), (1.0, 0.0));
    }

    /// Residual RMS after each layer, tokens routed to each expert (all layers), mean NLL.
    fn activations(dir: &Path, ids: &[u32]) -> (Vec<f64>, Vec<usize>, f64) {
        use runtime::{Backend, LinearSite};
        let model = runtime::Model::load(dir).unwrap();
        let b = &model.arch.backend;
        let mut x = model.arch.embed(&model.embed_tokens, ids).unwrap();
        let rms = |t: &runtime::HostTensor| {
            (t.data.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / t.data.len() as f64).sqrt()
        };
        let mut per_layer = vec![rms(&b.download(&x).unwrap())];
        let mut routed = vec![0usize; model.config().num_local_experts];
        for layer in &model.layers {
            let mut observe = |site: LinearSite, t: &candle_core::Tensor| {
                if let LinearSite::ExpertUp(e) = site {
                    routed[e] += b.shape(t)[0];
                }
            };
            x = model
                .arch
                .layer_forward(layer, &x, Some(&mut observe))
                .unwrap();
            per_layer.push(rms(&b.download(&x).unwrap()));
        }
        let nll = model.nll(ids).unwrap();
        let mean = nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64;
        (per_layer, routed, mean)
    }

    #[test]
    fn activations_stay_in_range_and_routing_is_spread() {
        let tmp = tempfile::tempdir().unwrap();
        let ids: Vec<u32> = (0..96u64)
            .map(|i| (draw::draw(9, i) % 32000) as u32)
            .collect();
        for branch in [None, Some("gptq-4bit-128g-actorder_True")] {
            let s = write_synth(
                &tmp.path().join(branch.unwrap_or("bf16")),
                &options(branch, 4),
                |_| {},
            )
            .unwrap();
            let (rms, routed, nll) = activations(&s.dir, &ids);
            // The embedding has RMS 1; each layer adds about 2 % (residual scaling 1/sqrt(2L)).
            // Codes uniform over 0..2^b (mean −½ step) gave 1.20 after 4 layers instead.
            for pair in rms.windows(2) {
                assert!(
                    pair[1] > pair[0] && pair[1] < pair[0] * 1.05,
                    "{branch:?}: RMS per layer {rms:?}"
                );
            }
            assert!(
                rms[0] > 0.95 && rms[4] < 1.12,
                "{branch:?}: RMS per layer {rms:?}"
            );
            // Top-2 of 8 over 96 tokens and 4 layers: 768 routings, 96 per expert on average.
            assert_eq!(routed.iter().sum::<usize>(), 4 * 96 * 2);
            assert!(
                routed.iter().all(|&n| n > 30 && n < 200),
                "{branch:?}: routed {routed:?}"
            );
            // Logits of std about 1 over 32000 tokens: NLL a little above ln(32000) = 10.37.
            assert!(nll > 10.0 && nll < 12.0, "{branch:?}: mean NLL {nll}");
        }
    }
}
