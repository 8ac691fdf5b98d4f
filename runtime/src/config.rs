//! `config.json` of a Mixtral checkpoint, in both the classic (`rope_theta`, `torch_dtype` at top
//! level) and the newer transformers style (`rope_parameters.rope_theta`, `dtype`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The model hyper-parameters the loader and the forward pass need (transformers' `MixtralConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct MixtralConfig {
    /// Model width (4096 for Mixtral-8x7B).
    pub hidden_size: usize,
    /// Expert FFN width (14336).
    pub intermediate_size: usize,
    /// Decoder layers (32).
    pub num_hidden_layers: usize,
    /// Query heads (32).
    pub num_attention_heads: usize,
    /// Key/value heads for grouped-query attention (8).
    pub num_key_value_heads: usize,
    /// Experts per layer (8).
    pub num_local_experts: usize,
    /// Experts each token is routed to (2).
    pub num_experts_per_tok: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
    /// Attention window (`None`: full causal attention).
    pub sliding_window: Option<usize>,
    /// Whether `lm_head` shares the embedding matrix (then the checkpoint has no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint declares (`torch_dtype` or `dtype`), e.g. `"bfloat16"`.
    pub dtype: Option<String>,
    /// The GPTQ block of a quantized branch, if any.
    pub quantization_config: Option<QuantizationConfig>,
    /// The whole file as read, so that a branch writer can copy it with only additions.
    pub raw: Value,
}

/// The `quantization_config` block of a GPTQ branch's `config.json` (spec §2.7).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QuantizationConfig {
    /// Bits per weight: 2, 3, 4 or 8.
    pub bits: u32,
    /// Input columns per group, or -1 for one group per row.
    #[serde(default = "minus_one")]
    pub group_size: i32,
    /// Activation order (act-order) was used.
    #[serde(default)]
    pub desc_act: bool,
    /// Symmetric quantizer.
    #[serde(default = "yes")]
    pub sym: bool,
    /// Dampening fraction used by the solver.
    #[serde(default)]
    pub damp_percent: Option<f64>,
    /// Sequential per-subset quantization.
    #[serde(default)]
    pub true_sequential: Option<bool>,
    /// `"gptq"` for GPTQ branches.
    #[serde(default)]
    pub quant_method: Option<String>,
    /// The quantized modules of each block, e.g. `[["self_attn.k_proj", ...], ["self_attn.o_proj"], ...]`
    /// (flat lists are accepted too). `None`: every attention projection and expert linear.
    #[serde(
        default,
        alias = "inside_layer_modules",
        deserialize_with = "module_lists"
    )]
    pub modules_in_block_to_quantize: Option<Vec<Vec<String>>>,
}

fn minus_one() -> i32 {
    -1
}
fn yes() -> bool {
    true
}

fn module_lists<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<Vec<String>>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        One(String),
        Many(Vec<String>),
    }
    let items: Option<Vec<Item>> = Option::deserialize(d)?;
    Ok(items.map(|items| {
        items
            .into_iter()
            .map(|i| match i {
                Item::One(s) => vec![s],
                Item::Many(v) => v,
            })
            .collect()
    }))
}

impl QuantizationConfig {
    /// Whether the module at `suffix` inside a block (e.g. `self_attn.q_proj`,
    /// `block_sparse_moe.experts.3.w2`) is stored quantized.
    pub fn quantizes(&self, suffix: &str) -> bool {
        match &self.modules_in_block_to_quantize {
            Some(lists) => lists.iter().flatten().any(|m| m == suffix),
            None => !suffix.ends_with(".gate"),
        }
    }
}

/// The shape of the fields that are read the same way in both styles.
#[derive(Deserialize)]
struct Fields {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    num_local_experts: usize,
    num_experts_per_tok: usize,
    rms_norm_eps: f64,
    vocab_size: usize,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn default_max_pos() -> usize {
    32768
}

impl MixtralConfig {
    /// Reads and checks `config.json`.
    ///
    /// # Errors
    /// [`Error::MissingFile`], [`Error::Json`], [`Error::NotMixtral`] when `model_type` /
    /// `architectures` name another model, [`Error::Config`] for missing or inconsistent fields.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile {
                path: path.to_owned(),
                what: "the model configuration".into(),
            },
            _ => Error::Io {
                path: path.to_owned(),
                source,
            },
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })?;
        Self::from_value(raw, path)
    }

    /// Builds the config from parsed JSON; `path` is only used in error messages.
    ///
    /// # Errors
    /// As [`from_file`](Self::from_file).
    pub fn from_value(raw: Value, path: &Path) -> Result<Self> {
        let config_err = |problem: String| Error::Config {
            path: path.to_owned(),
            problem,
        };
        let Some(obj) = raw.as_object() else {
            return Err(config_err("expected a JSON object".into()));
        };
        let model_type = obj.get("model_type").and_then(Value::as_str);
        let archs: Vec<&str> = obj
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let is_mixtral = match model_type {
            Some(t) => t == "mixtral",
            None => archs.iter().any(|a| a.starts_with("Mixtral")),
        };
        if !is_mixtral {
            return Err(Error::NotMixtral {
                path: path.to_owned(),
                found: format!("model_type {model_type:?}, architectures {archs:?}"),
            });
        }
        let f: Fields =
            serde_json::from_value(raw.clone()).map_err(|e| config_err(e.to_string()))?;
        let rope_theta = obj
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                obj.get("rope_parameters")
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(1e6);
        let dtype = obj
            .get("torch_dtype")
            .or_else(|| obj.get("dtype"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let quantization_config = match obj.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(q) => Some(
                serde_json::from_value::<QuantizationConfig>(q.clone())
                    .map_err(|e| config_err(format!("quantization_config: {e}")))?,
            ),
        };
        let config = MixtralConfig {
            hidden_size: f.hidden_size,
            intermediate_size: f.intermediate_size,
            num_hidden_layers: f.num_hidden_layers,
            num_attention_heads: f.num_attention_heads,
            num_key_value_heads: f.num_key_value_heads.unwrap_or(f.num_attention_heads),
            num_local_experts: f.num_local_experts,
            num_experts_per_tok: f.num_experts_per_tok,
            rms_norm_eps: f.rms_norm_eps,
            rope_theta,
            vocab_size: f.vocab_size,
            max_position_embeddings: f.max_position_embeddings,
            sliding_window: f.sliding_window,
            tie_word_embeddings: f.tie_word_embeddings,
            dtype,
            quantization_config,
            raw,
        };
        config.check().map_err(config_err)?;
        Ok(config)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{name}` is 0, expected a positive number"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "`hidden_size` {} is not a multiple of `num_attention_heads` {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "`num_attention_heads` {} is not a multiple of `num_key_value_heads` {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dim {} is odd; RoPE needs it even",
                self.head_dim()
            ));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return Err(format!(
                "`num_experts_per_tok` {} exceeds `num_local_experts` {}",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
            || self.rms_norm_eps.is_nan()
            || self.rms_norm_eps < 0.0
        {
            return Err(format!(
                "`rope_theta` {} must be positive and `rms_norm_eps` {} non-negative",
                self.rope_theta, self.rms_norm_eps
            ));
        }
        Ok(())
    }

    /// Width of one attention head, `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture() -> Value {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/moe-s/config.json"
        ))
        .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn classic_style_fixture() {
        let c = MixtralConfig::from_value(fixture(), Path::new("config.json")).unwrap();
        assert_eq!(c.hidden_size, 256);
        assert_eq!(c.head_dim(), 32);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.sliding_window, None);
        assert!(c.quantization_config.is_none());
    }

    #[test]
    fn new_style_rope_parameters_and_dtype() {
        let mut v = fixture();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("torch_dtype");
        o.insert(
            "rope_parameters".into(),
            json!({"rope_theta": 5e5, "rope_type": "default"}),
        );
        o.insert("dtype".into(), json!("float16"));
        o.insert("sliding_window".into(), json!(4096));
        let c = MixtralConfig::from_value(v, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.dtype.as_deref(), Some("float16"));
        assert_eq!(c.sliding_window, Some(4096));
    }

    #[test]
    fn quantization_config_nested_and_flat() {
        let mut v = fixture();
        v["quantization_config"] = json!({"bits": 3, "group_size": -1, "desc_act": true, "sym": true,
            "damp_percent": 0.1, "quant_method": "gptq",
            "modules_in_block_to_quantize": [["self_attn.k_proj", "self_attn.v_proj"], ["block_sparse_moe.experts.0.w1"]]});
        let c = MixtralConfig::from_value(v.clone(), Path::new("c.json")).unwrap();
        let q = c.quantization_config.unwrap();
        assert_eq!((q.bits, q.group_size, q.desc_act), (3, -1, true));
        assert!(q.quantizes("self_attn.v_proj"));
        assert!(!q.quantizes("self_attn.q_proj"));
        v["quantization_config"]["modules_in_block_to_quantize"] =
            json!(["self_attn.q_proj", "block_sparse_moe.experts.1.w2"]);
        let q = MixtralConfig::from_value(v, Path::new("c.json"))
            .unwrap()
            .quantization_config
            .unwrap();
        assert!(q.quantizes("block_sparse_moe.experts.1.w2"));
        assert!(!q.quantizes("self_attn.k_proj"));
    }

    #[test]
    fn not_mixtral_is_an_error() {
        let mut v = fixture();
        v["model_type"] = json!("llama");
        v["architectures"] = json!(["LlamaForCausalLM"]);
        let e = MixtralConfig::from_value(v, Path::new("x/config.json")).unwrap_err();
        assert!(matches!(e, Error::NotMixtral { .. }), "{e}");
        assert!(e.to_string().contains("x/config.json") && e.to_string().contains("llama"));
    }

    #[test]
    fn missing_field_is_named() {
        let mut v = fixture();
        v.as_object_mut().unwrap().remove("num_local_experts");
        let e = MixtralConfig::from_value(v, Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("num_local_experts"), "{e}");
    }
}
