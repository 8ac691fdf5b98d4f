//! Shared helpers for the runtime tests: a tiny random Mixtral checkpoint written to disk.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

/// A deterministic generator (64-bit LCG) for test weights.
pub struct Lcg(pub u64);

impl Lcg {
    /// Uniform in [-1, 1).
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// The tiny config: hidden 16, 4 heads of 4, 2 KV heads, 4 experts, top-2, 2 layers, vocab 50.
pub fn tiny_config() -> Value {
    json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": 50,
        "max_position_embeddings": 4096,
        "sliding_window": null,
        "tie_word_embeddings": false,
        "torch_dtype": "float32"
    })
}

/// Random f32 weights for every tensor of a dense checkpoint of `config` (norm weights near 1).
pub fn tiny_weights(config: &Value, seed: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let g = |k: &str| config[k].as_u64().unwrap() as usize;
    let (h, i, v) = (g("hidden_size"), g("intermediate_size"), g("vocab_size"));
    let (nh, nkv, ne) = (
        g("num_attention_heads"),
        g("num_key_value_heads"),
        g("num_local_experts"),
    );
    let d = h / nh;
    let mut rng = Lcg(seed);
    let mut out = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, rng: &mut Lcg, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data = rng.vec(n, scale).into_iter().map(|x| x + offset).collect();
        out.insert(name, (shape, data));
    };
    put(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        &mut rng,
        1.0,
        0.0,
    );
    put("lm_head.weight".into(), vec![v, h], &mut rng, 0.5, 0.0);
    put("model.norm.weight".into(), vec![h], &mut rng, 0.2, 1.0);
    for l in 0..g("num_hidden_layers") {
        let p = format!("model.layers.{l}");
        put(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            &mut rng,
            0.2,
            1.0,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            &mut rng,
            0.2,
            1.0,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![nh * d, h],
            &mut rng,
            0.5,
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![nkv * d, h],
            &mut rng,
            0.5,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![nkv * d, h],
            &mut rng,
            0.5,
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, nh * d],
            &mut rng,
            0.3,
            0.0,
        );
        put(
            format!("{p}.block_sparse_moe.gate.weight"),
            vec![ne, h],
            &mut rng,
            1.0,
            0.0,
        );
        for e in 0..ne {
            let m = format!("{p}.block_sparse_moe.experts.{e}");
            put(format!("{m}.w1.weight"), vec![i, h], &mut rng, 0.4, 0.0);
            put(format!("{m}.w2.weight"), vec![h, i], &mut rng, 0.3, 0.0);
            put(format!("{m}.w3.weight"), vec![i, h], &mut rng, 0.4, 0.0);
        }
    }
    out
}

/// One tensor to serialize: dtype, shape and raw little-endian bytes.
pub type Raw = (Dtype, Vec<usize>, Vec<u8>);

/// Encodes f32 values as `dtype` (BF16 by truncation-free rounding via `half`, F16, F32).
pub fn encode(dtype: Dtype, data: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => data
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F16 => data
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F32 => data.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        Dtype::I32 => data
            .iter()
            .flat_map(|&x| (x as i32).to_le_bytes())
            .collect(),
        other => panic!("test helper: no encoder for {other:?}"),
    }
}

/// Converts f32 weights to raw tensors of one dtype.
pub fn to_raw(
    weights: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    dtype: Dtype,
) -> BTreeMap<String, Raw> {
    weights
        .iter()
        .map(|(k, (s, d))| (k.clone(), (dtype, s.clone(), encode(dtype, d))))
        .collect()
}

/// Writes `tensors` as a safetensors file at `path`.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Raw>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (dt, s, b))| (k.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes `config.json` and a single `model.safetensors` into `dir`.
pub fn write_checkpoint(dir: &Path, config: &Value, tensors: &BTreeMap<String, Raw>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors);
}

/// The bundled fixture model directory.
pub fn fixture_model() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s")
}
