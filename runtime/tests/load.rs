//! Checkpoint loading: dtypes, shards, GPTQ branches, and one test per loader error.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use runtime::{Backend, Checkpoint, CpuBackend, Error, Model};
use safetensors::tensor::Dtype;
use serde_json::json;

/// Tensors by name: shape and values.
type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn tiny_dir(dtype: Dtype) -> (tempfile::TempDir, Weights) {
    let config = tiny_config();
    let weights = tiny_weights(&config, 11);
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &config, &to_raw(&weights, dtype));
    (dir, weights)
}

fn open_err(dir: &Path) -> Error {
    Checkpoint::open(dir).expect_err("opening should fail")
}

#[test]
fn reads_bf16_f16_f32_as_f32() {
    for (dtype, tol) in [(Dtype::F32, 0.0), (Dtype::F16, 1e-3), (Dtype::BF16, 8e-3)] {
        let (dir, weights) = tiny_dir(dtype);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let name = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
        let t = ckpt.read(name).unwrap();
        assert_eq!(t.shape, vec![16, 24]);
        for (a, b) in t.data.iter().zip(&weights[name].1) {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1e-3),
                "{dtype:?}: {a} vs {b}"
            );
        }
        let layer = ckpt.load_layer(1).unwrap();
        assert_eq!(layer.experts.len(), 4);
        assert_eq!(layer.q_proj.dims(), &[16, 16]);
        assert_eq!(layer.k_proj.dims(), &[8, 16]);
    }
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let (single, _) = tiny_dir(Dtype::BF16);
    let config = tiny_config();
    let raw = to_raw(&tiny_weights(&config, 11), Dtype::BF16);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut shards: [BTreeMap<String, Raw>; 2] = Default::default();
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in raw.into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(name.clone(), json!(file));
        shards[i % 2].insert(name, t);
    }
    for (i, shard) in shards.iter().enumerate() {
        write_safetensors(
            &dir.path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            shard,
        );
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let ids: Vec<u32> = (0..12).collect();
    let a = Model::load(single.path()).unwrap().nll(&ids).unwrap();
    let b = Model::load(dir.path()).unwrap().nll(&ids).unwrap();
    assert_eq!(a, b);

    // A shard the index names but that is gone.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::MissingFile { .. }), "{e}");
    assert!(
        e.to_string().contains("model-00002-of-00002.safetensors"),
        "{e}"
    );
}

#[test]
fn missing_weights_file() {
    let (dir, _) = tiny_dir(Dtype::BF16);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::MissingFile { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn missing_config_and_missing_dir() {
    let (dir, _) = tiny_dir(Dtype::BF16);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = open_err(dir.path());
    assert!(
        matches!(e, Error::MissingFile { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );
    let e = open_err(&dir.path().join("nope"));
    assert!(matches!(e, Error::MissingFile { .. }), "{e}");
}

fn rewrite(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Raw>)) {
    let config = tiny_config();
    let mut raw = to_raw(&tiny_weights(&config, 11), Dtype::BF16);
    edit(&mut raw);
    write_checkpoint(dir, &config, &raw);
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    rewrite(dir.path(), |r| {
        r.remove("model.layers.1.self_attn.v_proj.weight");
    });
    let e = open_err(dir.path());
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("model.layers.1.self_attn.v_proj.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn extra_tensor() {
    let dir = tempfile::tempdir().unwrap();
    rewrite(dir.path(), |r| {
        r.insert(
            "model.layers.5.mlp.up_proj.weight".into(),
            (Dtype::BF16, vec![2], vec![0; 4]),
        );
    });
    let e = open_err(dir.path());
    assert!(matches!(e, Error::ExtraTensor { .. }), "{e}");
    assert!(
        e.to_string().contains("model.layers.5.mlp.up_proj.weight"),
        "{e}"
    );
}

#[test]
fn wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    rewrite(dir.path(), |r| {
        let t = r
            .get_mut("model.layers.0.block_sparse_moe.experts.2.w1.weight")
            .unwrap();
        t.1 = vec![16, 24]; // transposed
    });
    let e = open_err(dir.path());
    let msg = e.to_string();
    assert!(matches!(e, Error::TensorShape { .. }), "{msg}");
    assert!(
        msg.contains("experts.2.w1.weight") && msg.contains("[16, 24]") && msg.contains("[24, 16]"),
        "{msg}"
    );
}

#[test]
fn wrong_dtype() {
    let dir = tempfile::tempdir().unwrap();
    rewrite(dir.path(), |r| {
        let t = r.get_mut("model.norm.weight").unwrap();
        *t = (Dtype::I16, t.1.clone(), t.2.clone());
    });
    let e = open_err(dir.path());
    let msg = e.to_string();
    assert!(matches!(e, Error::TensorDtype { .. }), "{msg}");
    assert!(
        msg.contains("model.norm.weight") && msg.contains("I16"),
        "{msg}"
    );
}

#[test]
fn truncated_file() {
    let (dir, _) = tiny_dir(Dtype::BF16);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::SafetensorsHeader { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    // Cut inside the header, and shorter than the length prefix.
    std::fs::write(&path, &bytes[..40]).unwrap();
    assert!(matches!(
        open_err(dir.path()),
        Error::SafetensorsHeader { .. }
    ));
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert!(matches!(
        open_err(dir.path()),
        Error::SafetensorsHeader { .. }
    ));
}

#[test]
fn corrupt_header() {
    let (dir, _) = tiny_dir(Dtype::BF16);
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'#'; // the header's opening brace
    std::fs::write(&path, &bytes).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::SafetensorsHeader { .. }), "{e}");
    // A header length larger than the file.
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        open_err(dir.path()),
        Error::SafetensorsHeader { .. }
    ));
}

#[test]
fn not_mixtral_config() {
    let (dir, _) = tiny_dir(Dtype::BF16);
    let mut config = tiny_config();
    config["model_type"] = json!("llama");
    config["architectures"] = json!(["LlamaForCausalLM"]);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::NotMixtral { .. }), "{e}");
    assert!(
        e.to_string().contains("config.json") && e.to_string().contains("llama"),
        "{e}"
    );
}

#[test]
fn nan_and_inf_in_a_weight() {
    for bad in [f32::NAN, f32::INFINITY] {
        let config = tiny_config();
        let mut weights = tiny_weights(&config, 11);
        let name = "model.layers.1.self_attn.o_proj.weight";
        weights.get_mut(name).unwrap().1[37] = bad;
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &config, &to_raw(&weights, Dtype::BF16));
        // Headers are fine; the value is found when the tensor is read.
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let e = ckpt.load_layer(1).unwrap_err();
        assert!(matches!(e, Error::NonFinite { index: 37, .. }), "{e}");
        assert!(e.to_string().contains(name), "{e}");
        assert!(ckpt.load_layer(0).is_ok());
        assert!(matches!(
            Model::load(dir.path()),
            Err(Error::NonFinite { .. })
        ));
    }
}

/// Packs 4-bit codes `[K, N]` along K (8 per word, LSB first), the GPTQ v1 `qweight` layout.
fn pack4(codes: &[u8], k: usize, n: usize) -> Vec<i32> {
    let mut words = vec![0u32; k / 8 * n];
    for r in 0..k {
        for c in 0..n {
            words[r / 8 * n + c] |= (codes[r * n + c] as u32) << (4 * (r % 8));
        }
    }
    words.into_iter().map(|w| w as i32).collect()
}

#[test]
fn gptq_branch_is_dequantized() {
    // 4-bit, group size 8, symmetric (stored zero 7): w[n, k] = scale[g, n] · (code[k, n] − 8).
    let mut config = tiny_config();
    config["quantization_config"] = json!({"bits": 4, "group_size": 8, "desc_act": false, "sym": true,
        "quant_method": "gptq", "modules_in_block_to_quantize": [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
        ["block_sparse_moe.experts.0.w1", "block_sparse_moe.experts.1.w1", "block_sparse_moe.experts.2.w1", "block_sparse_moe.experts.3.w1"]]});
    let dense = tiny_weights(&config, 5);
    let mut raw = BTreeMap::new();
    let mut rng = Lcg(77);
    let mut expected = BTreeMap::new();
    for (name, (shape, data)) in &dense {
        let quantized = name.contains("self_attn") || name.ends_with(".w1.weight");
        if !quantized {
            raw.insert(
                name.clone(),
                (Dtype::F16, shape.clone(), encode(Dtype::F16, data)),
            );
            continue;
        }
        let prefix = name.strip_suffix(".weight").unwrap();
        let (n, k) = (shape[0], shape[1]);
        let g = k / 8;
        let codes: Vec<u8> = (0..k * n)
            .map(|_| ((rng.next() + 1.0) * 8.0) as u8 % 16)
            .collect();
        let scales: Vec<f32> = (0..g * n)
            .map(|_| half::f16::from_f32(0.01 + 0.05 * rng.next().abs()).to_f32())
            .collect();
        let mut w = vec![0f32; n * k];
        for r in 0..n {
            for c in 0..k {
                w[r * k + c] = scales[(c / 8) * n + r] * (codes[c * n + r] as f32 - 8.0);
            }
        }
        expected.insert(prefix.to_owned(), w);
        let i32s = |v: Vec<i32>, s: Vec<usize>| {
            (
                Dtype::I32,
                s,
                v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            )
        };
        raw.insert(
            format!("{prefix}.qweight"),
            i32s(pack4(&codes, k, n), vec![k / 8, n]),
        );
        raw.insert(
            format!("{prefix}.qzeros"),
            i32s(vec![0x7777_7777; g * n / 8], vec![g, n / 8]),
        );
        raw.insert(
            format!("{prefix}.scales"),
            (Dtype::F16, vec![g, n], encode(Dtype::F16, &scales)),
        );
        let g_idx: Vec<i32> = (0..k).map(|c| (c / 8) as i32).collect();
        raw.insert(format!("{prefix}.g_idx"), i32s(g_idx, vec![k]));
        raw.insert(
            format!("{prefix}.bias"),
            (Dtype::F16, vec![n], encode(Dtype::F16, &vec![0.0; n])),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &config, &raw);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert!(ckpt.is_quantized("model.layers.0.self_attn.q_proj"));
    assert!(!ckpt.is_quantized("model.layers.0.block_sparse_moe.experts.0.w2"));
    for (prefix, w) in &expected {
        let got = ckpt.linear(prefix).unwrap();
        assert_eq!(&got.data, w, "{prefix}");
    }
    let layer = ckpt.load_layer(1).unwrap();
    let q = CpuBackend.download(&layer.q_proj).unwrap();
    assert_eq!(q.data, expected["model.layers.1.self_attn.q_proj"]);
    // The whole branch runs.
    let nll = Model::load(dir.path())
        .unwrap()
        .nll(&[1, 2, 3, 4, 5])
        .unwrap();
    assert!(nll.iter().all(|v| v.is_finite()));

    // A quantized module with an inconsistent g_idx is named.
    let mut bad = raw.clone();
    let gi = bad
        .get_mut("model.layers.0.self_attn.k_proj.g_idx")
        .unwrap();
    gi.2[0..4].copy_from_slice(&9i32.to_le_bytes());
    write_checkpoint(dir.path(), &config, &bad);
    let e = Checkpoint::open(dir.path())
        .unwrap()
        .load_layer(0)
        .unwrap_err();
    assert!(matches!(e, Error::Quantized { .. }), "{e}");
    assert!(
        e.to_string().contains("model.layers.0.self_attn.k_proj"),
        "{e}"
    );
    // A dense weight where the config says quantized is a missing tensor.
    let mut bad = raw.clone();
    for suffix in ["qweight", "qzeros", "scales", "g_idx", "bias"] {
        bad.remove(&format!("model.layers.0.self_attn.o_proj.{suffix}"));
    }
    let (s, d) = &dense["model.layers.0.self_attn.o_proj.weight"];
    bad.insert(
        "model.layers.0.self_attn.o_proj.weight".into(),
        (Dtype::F16, s.clone(), encode(Dtype::F16, d)),
    );
    write_checkpoint(dir.path(), &config, &bad);
    let e = open_err(dir.path());
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    assert!(
        e.to_string().contains("model.layers.0.self_attn.o_proj."),
        "{e}"
    );
}

#[test]
fn fixture_opens_and_reads_one_layer() {
    let ckpt = Checkpoint::open(fixture_model()).unwrap();
    assert_eq!(ckpt.config().num_hidden_layers, 4);
    let layer = ckpt.load_layer(2).unwrap();
    assert_eq!(layer.experts[7].w2.dims(), &[256, 512]);
    assert!(matches!(ckpt.load_layer(4), Err(Error::Input(_))));
}
