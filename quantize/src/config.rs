//! The two JSON files of a branch: `quantize_config.json` in TheBloke's byte-exact form (spec §2.6)
//! and `config.json` = the source model config plus a `quantization_config` block (spec §2.7).
//!
//! JSON is written the way Python's `json.dumps(obj, indent=2)` writes it (the tool that made the
//! published files): two-space indent, `", "`-free line breaks, `": "` after keys, floats in
//! Python's shortest-repr form (`0.1`, `1e-05`, `1000000.0`), `true`/`false`/`null`, non-ASCII
//! escaped as `\uXXXX`. Objects keep their key order (serde_json's `preserve_order` is on).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::presets::Preset;

/// The base name of the model file, as in TheBloke's `quantize_config.json`.
pub const MODEL_FILE_BASE_NAME: &str = "model";

/// The attention subsets of one decoder layer, in AutoGPTQ 0.6's Mixtral order (spec §1.2).
pub const ATTENTION_SUBSETS: [&[&str]; 2] = [
    &["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    &["self_attn.o_proj"],
];

/// Writes `value` as Python's `json.dumps(value, indent=2)` does (no trailing newline).
pub fn to_python_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn write_value(out: &mut String, value: &Value, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&python_float(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                indent(out, depth + 1);
                write_value(out, item, depth + 1);
            }
            out.push('\n');
            indent(out, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                indent(out, depth + 1);
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item, depth + 1);
            }
            out.push('\n');
            indent(out, depth);
            out.push('}');
        }
    }
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, positional for decimal exponents in
/// `-4..16` (always with a fractional part, `1.0`), scientific otherwise (`1e-05`, `1e+16`).
pub fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // `{:e}` gives the shortest round-trip digits: "1.5e-1", "1e6".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

/// The `quantize_config.json` fields of a preset as an ordered JSON object, in TheBloke's order:
/// bits, group_size, damp_percent, desc_act, sym, true_sequential, model_name_or_path,
/// model_file_base_name. `static_groups` is appended only when true (TheBloke's files omit it).
pub fn quantize_config_value(preset: &Preset) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("bits".into(), Value::from(preset.bits));
    m.insert("group_size".into(), Value::from(preset.group_size));
    m.insert("damp_percent".into(), Value::from(preset.damp_percent));
    m.insert("desc_act".into(), Value::from(preset.desc_act));
    m.insert("sym".into(), Value::from(preset.sym));
    m.insert(
        "true_sequential".into(),
        Value::from(preset.true_sequential),
    );
    m.insert("model_name_or_path".into(), Value::Null);
    m.insert(
        "model_file_base_name".into(),
        Value::from(MODEL_FILE_BASE_NAME),
    );
    if preset.static_groups {
        m.insert("static_groups".into(), Value::from(true));
    }
    m
}

/// `quantize_config.json` exactly as TheBloke's branches carry it: `json.dumps(d, indent=2)`, no
/// trailing newline (186 bytes for group size 128, 185 for -1 or 32).
pub fn quantize_config_json(preset: &Preset) -> String {
    to_python_json(&Value::Object(quantize_config_value(preset)))
}

/// The module names of one decoder layer that a full Mixtral quantization touches, as the subsets
/// AutoGPTQ 0.6 processes: `[k, v, q]`, `[o]`, `[experts.0..E-1.w1, then .w3]`, `[experts.w2]`.
pub fn modules_in_block(num_experts: usize) -> Vec<Vec<String>> {
    let mut subsets: Vec<Vec<String>> = ATTENTION_SUBSETS
        .iter()
        .map(|s| s.iter().map(|m| m.to_string()).collect())
        .collect();
    let expert = |e: usize, w: &str| format!("block_sparse_moe.experts.{e}.{w}");
    let mut w13: Vec<String> = (0..num_experts).map(|e| expert(e, "w1")).collect();
    w13.extend((0..num_experts).map(|e| expert(e, "w3")));
    subsets.push(w13);
    subsets.push((0..num_experts).map(|e| expert(e, "w2")).collect());
    subsets
}

/// [`modules_in_block`] restricted to `quantized` (names relative to the layer), dropping empty
/// subsets; the order stays AutoGPTQ's.
pub fn modules_in_block_to_quantize(num_experts: usize, quantized: &[String]) -> Vec<Vec<String>> {
    modules_in_block(num_experts)
        .into_iter()
        .map(|s| {
            s.into_iter()
                .filter(|m| quantized.contains(m))
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// The `quantization_config` block of the branch `config.json`: the quantize_config fields, then
/// `quant_method: "gptq"`, then `modules_in_block_to_quantize`.
pub fn quantization_config_value(preset: &Preset, modules: &[Vec<String>]) -> Map<String, Value> {
    let mut m = quantize_config_value(preset);
    m.insert("quant_method".into(), Value::from("gptq"));
    m.insert(
        "modules_in_block_to_quantize".into(),
        Value::Array(
            modules
                .iter()
                .map(|s| Value::Array(s.iter().map(|n| Value::from(n.as_str())).collect()))
                .collect(),
        ),
    );
    m
}

/// The branch `config.json`: the source config with its key order and values (including
/// `torch_dtype`/`dtype`) unchanged, any existing `quantization_config` replaced by a new one at the
/// end. Written in Python's indent-2 form with a trailing newline, as transformers writes it.
///
/// # Errors
/// [`Error::ConfigField`] if the source is not a JSON object.
pub fn branch_config_json(
    source: &Value,
    preset: &Preset,
    modules: &[Vec<String>],
) -> Result<String> {
    let mut map = source.as_object().cloned().ok_or(Error::ConfigField {
        path: "config.json".into(),
        field: "(root)",
        expected: "a JSON object",
    })?;
    map.shift_remove("quantization_config");
    map.insert(
        "quantization_config".into(),
        Value::Object(quantization_config_value(preset, modules)),
    );
    Ok(to_python_json(&Value::Object(map)) + "\n")
}

/// The dimensions of a Mixtral model that fix a branch's tensor layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size` (per expert).
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_local_experts`.
    pub num_local_experts: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads`.
    pub num_key_value_heads: usize,
    /// `head_dim`, or `hidden_size / num_attention_heads` when absent or null.
    pub head_dim: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `tie_word_embeddings` (false for Mixtral: `lm_head.weight` is stored).
    pub tie_word_embeddings: bool,
}

impl ModelDims {
    /// Reads the dimensions from a parsed `config.json`; `path` is only used in error messages.
    ///
    /// # Errors
    /// [`Error::ConfigField`] naming the first missing or non-positive field.
    pub fn from_config(config: &Value, path: &Path) -> Result<ModelDims> {
        let field = |name: &'static str| -> Result<usize> {
            config
                .get(name)
                .and_then(Value::as_u64)
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or(Error::ConfigField {
                    path: path.to_path_buf(),
                    field: name,
                    expected: "a positive integer",
                })
        };
        let hidden_size = field("hidden_size")?;
        let num_attention_heads = field("num_attention_heads")?;
        let head_dim = match config.get("head_dim") {
            None | Some(Value::Null) => hidden_size / num_attention_heads,
            Some(_) => field("head_dim")?,
        };
        Ok(ModelDims {
            hidden_size,
            intermediate_size: field("intermediate_size")?,
            num_hidden_layers: field("num_hidden_layers")?,
            num_local_experts: field("num_local_experts")?,
            num_attention_heads,
            num_key_value_heads: field("num_key_value_heads")?,
            head_dim,
            vocab_size: field("vocab_size")?,
            tie_word_embeddings: config
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// `(in_features, out_features)` of a module named relative to its layer
    /// (`self_attn.q_proj`, `block_sparse_moe.experts.3.w2`, ...), or `None` if it is not a
    /// quantizable Mixtral linear.
    pub fn linear_shape(&self, module: &str) -> Option<(usize, usize)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match module {
            "self_attn.q_proj" => return Some((h, q)),
            "self_attn.k_proj" | "self_attn.v_proj" => return Some((h, kv)),
            "self_attn.o_proj" => return Some((q, h)),
            _ => {}
        }
        let rest = module.strip_prefix("block_sparse_moe.experts.")?;
        let (e, w) = rest.split_once('.')?;
        let e: usize = e.parse().ok()?;
        if e >= self.num_local_experts {
            return None;
        }
        match w {
            "w1" | "w3" => Some((h, self.intermediate_size)),
            "w2" => Some((self.intermediate_size, h)),
            _ => None,
        }
    }
}

/// Parses a JSON file, naming it in errors.
///
/// # Errors
/// [`Error::Io`] if it cannot be read, [`Error::Json`] if it is not JSON.
pub fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::PRESETS;

    /// TheBloke's 4-bit g128 `quantize_config.json` (spec §2.6), exactly, no trailing newline.
    const THEBLOKE_G128: &str = "{\n  \"bits\": 4,\n  \"group_size\": 128,\n  \"damp_percent\": 0.1,\n  \"desc_act\": true,\n  \"sym\": true,\n  \"true_sequential\": true,\n  \"model_name_or_path\": null,\n  \"model_file_base_name\": \"model\"\n}";

    #[test]
    fn quantize_config_is_byte_exact() {
        let g128 = Preset::by_name("gptq-4bit-128g-actorder_True").unwrap();
        assert_eq!(quantize_config_json(&g128), THEBLOKE_G128);
        assert_eq!(THEBLOKE_G128.len(), 186);
        for p in PRESETS {
            let expected_len = if p.group_size == 128 { 186 } else { 185 };
            let s = quantize_config_json(&p);
            assert_eq!(s.len(), expected_len, "{}: {s}", p.name);
            let v: Value = serde_json::from_str(&s).unwrap();
            assert_eq!(v["bits"], p.bits);
            assert_eq!(v["group_size"], p.group_size);
        }
        let main = quantize_config_json(&PRESETS[0]);
        assert!(main.contains("\"group_size\": -1,"));
        assert!(!main.ends_with('\n'));
    }

    #[test]
    fn python_float_repr() {
        for (x, s) in [
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (1e6, "1000000.0"),
            (0.02, "0.02"),
            (1.0, "1.0"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123.456, "123.456"),
            (-2.5e-7, "-2.5e-07"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(python_float(x), s, "{x}");
        }
    }

    #[test]
    fn python_json_round_trips_the_fixture_config() {
        // fixtures/moe-s/config.json was written by transformers (json.dumps indent=2, sort_keys).
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s/config.json"),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(to_python_json(&v), text.trim_end_matches('\n'));
    }

    #[test]
    fn branch_config_appends_the_block_and_keeps_the_source() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s/config.json");
        let source = read_json(&path).unwrap();
        let dims = ModelDims::from_config(&source, &path).unwrap();
        assert_eq!(
            (dims.hidden_size, dims.num_local_experts, dims.head_dim),
            (256, 8, 32)
        );
        assert_eq!(dims.linear_shape("self_attn.k_proj"), Some((256, 64)));
        assert_eq!(
            dims.linear_shape("block_sparse_moe.experts.7.w2"),
            Some((512, 256))
        );
        assert_eq!(dims.linear_shape("block_sparse_moe.experts.8.w2"), None);
        assert_eq!(dims.linear_shape("block_sparse_moe.gate"), None);

        let preset = Preset::by_name("gptq-3bit--1g-actorder_True").unwrap();
        let all: Vec<String> = modules_in_block(8).concat();
        assert_eq!(all.len(), 28);
        let modules = modules_in_block_to_quantize(8, &all);
        let text = branch_config_json(&source, &preset, &modules).unwrap();
        assert!(text.ends_with("}\n"));
        let v: Value = serde_json::from_str(&text).unwrap();
        let src_keys: Vec<&String> = source.as_object().unwrap().keys().collect();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(&keys[..src_keys.len()], &src_keys[..]);
        assert_eq!(keys.last().unwrap().as_str(), "quantization_config");
        assert_eq!(v["torch_dtype"], "bfloat16");
        assert_eq!(v["rms_norm_eps"], source["rms_norm_eps"]);
        assert!(text.contains("\"rms_norm_eps\": 1e-05,"));
        let qc = &v["quantization_config"];
        assert_eq!(qc["quant_method"], "gptq");
        assert_eq!(qc["bits"], 3);
        assert_eq!(qc["group_size"], -1);
        assert_eq!(qc["desc_act"], true);
        let m = qc["modules_in_block_to_quantize"].as_array().unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[0],
            serde_json::json!(["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"])
        );
        assert_eq!(m[1], serde_json::json!(["self_attn.o_proj"]));
        assert_eq!(m[2][0], "block_sparse_moe.experts.0.w1");
        assert_eq!(m[2][7], "block_sparse_moe.experts.7.w1");
        assert_eq!(m[2][8], "block_sparse_moe.experts.0.w3");
        assert_eq!(m[3].as_array().unwrap().len(), 8);
        assert_eq!(m[3][0], "block_sparse_moe.experts.0.w2");

        // Only the modules actually quantized: attention only.
        let attn: Vec<String> = ["self_attn.q_proj", "self_attn.o_proj"]
            .map(String::from)
            .to_vec();
        let part = modules_in_block_to_quantize(8, &attn);
        assert_eq!(
            part,
            vec![
                vec!["self_attn.q_proj".to_string()],
                vec!["self_attn.o_proj".to_string()]
            ]
        );
    }
}
