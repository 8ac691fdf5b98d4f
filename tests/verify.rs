//! `mixtral-gptq verify`: a branch written by the branch writer from random layers on the moe-s
//! config verifies clean; each kind of corruption is reported by name with exit code 1.

use std::path::{Path, PathBuf};

use quantize::branch::BranchWriter;
use quantize::pack::synthetic_layer;
use quantize::Preset;
use serde_json::Value;

use crate::util::{fixture, run_in, text};

const PRESET: &str = "gptq-3bit-128g-actorder_True";

/// Writes a complete moe-s branch of [`PRESET`] under `out` from synthetic layers.
fn write_branch(out: &Path) -> PathBuf {
    let preset = Preset::by_name(PRESET).unwrap();
    let source_dir = fixture("moe-s");
    let source = quantize::config::read_json(&source_dir.join("config.json")).unwrap();
    let mut w = BranchWriter::create(out, &preset, &source, &source_dir, None).unwrap();
    let layout = w.layout().clone();
    for (i, t) in layout.tensors.iter().enumerate() {
        if let Some(module) = t.name.strip_suffix(".qweight") {
            let rel = module.splitn(4, '.').nth(3).unwrap();
            let (k, n) = layout.dims.linear_shape(rel).unwrap();
            let q = synthetic_layer(3, 128, k, n, true, true, i as u64);
            w.write_quantized(module, &q).unwrap();
        } else if t.name.ends_with(".weight") {
            let n: usize = t.shape.iter().product();
            w.write_dense(&t.name, &t.shape, &vec![0.25; n]).unwrap();
        }
    }
    w.finish().unwrap()
}

/// Rewrites a safetensors file: `edit(name, dtype, bytes)` returns the new dtype and bytes, or
/// `None` to drop the tensor. Shapes are kept.
fn rewrite(path: &Path, edit: impl Fn(&str, &str, Vec<u8>) -> Option<(String, Vec<u8>)>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut entries: Vec<(String, Value)> = header.into_iter().collect();
    entries.sort_by_key(|(_, v)| {
        v.get("data_offsets")
            .map(|o| o[0].as_u64().unwrap())
            .unwrap_or(0)
    });
    let mut new_header = serde_json::Map::new();
    let mut new_data = Vec::new();
    for (name, info) in entries {
        if name == "__metadata__" {
            new_header.insert(name, info);
            continue;
        }
        let (a, b) = (
            info["data_offsets"][0].as_u64().unwrap() as usize,
            info["data_offsets"][1].as_u64().unwrap() as usize,
        );
        let Some((dtype, tensor)) =
            edit(&name, info["dtype"].as_str().unwrap(), data[a..b].to_vec())
        else {
            continue;
        };
        let start = new_data.len();
        new_data.extend(tensor);
        new_header.insert(
            name,
            serde_json::json!({"dtype": dtype, "shape": info["shape"], "data_offsets": [start, new_data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&new_header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(new_data);
    std::fs::write(path, out).unwrap();
}

/// Runs `verify` on `dir`; asserts exit code `code` and that stdout contains every `needle`.
fn verify_says(dir: &Path, code: i32, needles: &[&str]) {
    let out = run_in(dir.parent().unwrap(), &["verify", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in needles {
        assert!(
            stdout.contains(needle),
            "expected `{needle}` in:\n{}",
            text(&out)
        );
    }
}

#[test]
fn verify_clean_branch_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_branch(tmp.path());
    verify_says(&dir, 0, &["ok (", "112 quantized modules"]);
}

#[test]
fn verify_names_each_corruption_and_exits_1() {
    let module = "model.layers.1.block_sparse_moe.experts.3.w2";
    // Each case: a corruption of a fresh branch and what the report must say.
    type Corrupt = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Corrupt, Vec<String>)> = vec![
        (
            "flipped qzeros word",
            Box::new(move |dir| {
                rewrite(&dir.join("model.safetensors"), |name, dtype, mut b| {
                    if name == format!("{module}.qzeros") {
                        b[0] ^= 0x01;
                    }
                    Some((dtype.to_string(), b))
                })
            }),
            vec![format!("{module}: qzeros: sym needs every stored zero = 3")],
        ),
        (
            "g_idx out of range",
            Box::new(move |dir| {
                rewrite(&dir.join("model.safetensors"), |name, dtype, mut b| {
                    if name == format!("{module}.g_idx") {
                        b[20..24].copy_from_slice(&9i32.to_le_bytes());
                    }
                    Some((dtype.to_string(), b))
                })
            }),
            vec![format!(
                "{module}: g_idx: 1 value(s) outside 0..4, first g_idx[5] = 9"
            )],
        ),
        (
            "deleted tensor",
            Box::new(|dir| {
                rewrite(&dir.join("model.safetensors"), |name, dtype, b| {
                    (name != "model.layers.0.self_attn.q_proj.scales")
                        .then(|| (dtype.to_string(), b))
                })
            }),
            vec!["model.layers.0.self_attn.q_proj.scales: missing".to_string()],
        ),
        (
            "wrong dtype",
            Box::new(|dir| {
                rewrite(&dir.join("model.safetensors"), |name, dtype, b| {
                    if name == "model.layers.2.post_attention_layernorm.weight" {
                        let wide: Vec<u8> = b.chunks(2).flat_map(|c| [0, 0, c[0], c[1]]).collect();
                        return Some(("F32".to_string(), wide));
                    }
                    Some((dtype.to_string(), b))
                })
            }),
            vec![
                "model.layers.2.post_attention_layernorm.weight: is F32 [256], expected F16 [256]"
                    .to_string(),
            ],
        ),
        (
            "quantize_config.json removed",
            Box::new(|dir| std::fs::remove_file(dir.join("quantize_config.json")).unwrap()),
            vec!["quantize_config.json: missing".to_string()],
        ),
        (
            "bits disagree",
            Box::new(|dir| {
                let path = dir.join("config.json");
                let text = std::fs::read_to_string(&path)
                    .unwrap()
                    .replace("\"bits\": 3,", "\"bits\": 4,");
                std::fs::write(&path, text).unwrap();
            }),
            vec![
                "config.json quantization_config: `bits` is 4, quantize_config.json says 3"
                    .to_string(),
            ],
        ),
        (
            "quantized router",
            Box::new(|dir| {
                let path = dir.join("config.json");
                let text = std::fs::read_to_string(&path).unwrap().replace(
                    "\"self_attn.o_proj\"\n",
                    "\"self_attn.o_proj\",\n        \"block_sparse_moe.gate\"\n",
                );
                std::fs::write(&path, text).unwrap();
            }),
            vec!["`block_sparse_moe.gate` is not a quantizable Mixtral linear".to_string()],
        ),
    ];
    for (what, corrupt, needles) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_branch(tmp.path());
        corrupt(&dir);
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        verify_says(&dir, 1, &needles);
        eprintln!("ok: {what}");
    }
}

#[test]
fn verify_missing_dir_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run_in(tmp.path(), &["verify", "no-such-branch"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-branch"),
        "{}",
        text(&out)
    );
}
