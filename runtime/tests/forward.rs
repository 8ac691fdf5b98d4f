//! The CPU forward pass against an independent, naive f64 implementation of Mixtral written here
//! from `modeling_mixtral.py`, on a tiny random model.

mod common;

use std::collections::BTreeMap;

use common::*;
use runtime::{Backend, CpuBackend, LinearSite, Model};
use safetensors::tensor::Dtype;
use serde_json::Value;

/// f32 against f64 on a tiny model: the accumulated rounding of a few hundred f32 operations per
/// value stays far below this (measured max ~1e-6).
const REL_TOL: f64 = 1e-4;

type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

struct Naive<'a> {
    w: &'a Weights,
    c: &'a Value,
}

impl Naive<'_> {
    fn u(&self, k: &str) -> usize {
        self.c[k].as_u64().unwrap() as usize
    }
    fn get(&self, name: &str) -> Vec<f64> {
        self.w[name].1.iter().map(|&x| x as f64).collect()
    }
    /// y = x · Wᵀ for W [out, in].
    fn linear(&self, x: &[Vec<f64>], name: &str) -> Vec<Vec<f64>> {
        let (shape, _) = &self.w[name];
        let (out, inp) = (shape[0], shape[1]);
        let w = self.get(name);
        x.iter()
            .map(|r| {
                (0..out)
                    .map(|o| (0..inp).map(|i| r[i] * w[o * inp + i]).sum())
                    .collect()
            })
            .collect()
    }
    fn rms(&self, x: &[Vec<f64>], name: &str) -> Vec<Vec<f64>> {
        let g = self.get(name);
        let eps = self.c["rms_norm_eps"].as_f64().unwrap();
        x.iter()
            .map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
                let inv = 1.0 / (ms + eps).sqrt();
                r.iter().zip(&g).map(|(v, g)| v * inv * g).collect()
            })
            .collect()
    }
    fn rope(&self, x: &mut [Vec<f64>], heads: usize) {
        let d = self.u("hidden_size") / self.u("num_attention_heads");
        let theta = self.c["rope_theta"].as_f64().unwrap();
        for (t, row) in x.iter_mut().enumerate() {
            for h in 0..heads {
                let s = &mut row[h * d..(h + 1) * d];
                let orig = s.to_vec();
                for j in 0..d / 2 {
                    let ang = t as f64 / theta.powf(2.0 * j as f64 / d as f64);
                    let (sin, cos) = ang.sin_cos();
                    s[j] = orig[j] * cos - orig[j + d / 2] * sin;
                    s[j + d / 2] = orig[j + d / 2] * cos + orig[j] * sin;
                }
            }
        }
    }
    fn logits(&self, ids: &[u32], window: Option<usize>) -> Vec<Vec<f64>> {
        let (hd, nh, nkv) = (
            self.u("hidden_size"),
            self.u("num_attention_heads"),
            self.u("num_key_value_heads"),
        );
        let (ne, k_top) = (self.u("num_local_experts"), self.u("num_experts_per_tok"));
        let d = hd / nh;
        let emb = self.get("model.embed_tokens.weight");
        let mut x: Vec<Vec<f64>> = ids
            .iter()
            .map(|&i| emb[i as usize * hd..(i as usize + 1) * hd].to_vec())
            .collect();
        let t_len = ids.len();
        for l in 0..self.u("num_hidden_layers") {
            let p = format!("model.layers.{l}");
            let h = self.rms(&x, &format!("{p}.input_layernorm.weight"));
            let mut q = self.linear(&h, &format!("{p}.self_attn.q_proj.weight"));
            let mut k = self.linear(&h, &format!("{p}.self_attn.k_proj.weight"));
            let v = self.linear(&h, &format!("{p}.self_attn.v_proj.weight"));
            self.rope(&mut q, nh);
            self.rope(&mut k, nkv);
            let mut a = vec![vec![0.0; nh * d]; t_len];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                for t in 0..t_len {
                    let keys: Vec<usize> = (0..=t)
                        .filter(|&j| window.is_none_or(|w| t - j < w))
                        .collect();
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            (0..d)
                                .map(|c| q[t][head * d + c] * k[j][kvh * d + c])
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (jj, &j) in keys.iter().enumerate() {
                        for c in 0..d {
                            a[t][head * d + c] += e[jj] / z * v[j][kvh * d + c];
                        }
                    }
                }
            }
            let o = self.linear(&a, &format!("{p}.self_attn.o_proj.weight"));
            for (xr, or) in x.iter_mut().zip(&o) {
                for (xv, ov) in xr.iter_mut().zip(or) {
                    *xv += ov;
                }
            }
            let h = self.rms(&x, &format!("{p}.post_attention_layernorm.weight"));
            let gate = self.linear(&h, &format!("{p}.block_sparse_moe.gate.weight"));
            for t in 0..t_len {
                let m = gate[t].iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = gate[t].iter().map(|g| (g - m).exp()).collect();
                let mut order: Vec<usize> = (0..ne).collect();
                order.sort_by(|&a, &b| e[b].partial_cmp(&e[a]).unwrap());
                let top = &order[..k_top];
                let z: f64 = top.iter().map(|&i| e[i]).sum();
                for &ex in top {
                    let m = format!("{p}.block_sparse_moe.experts.{ex}");
                    let row = vec![h[t].clone()];
                    let g1 = self.linear(&row, &format!("{m}.w1.weight"));
                    let g3 = self.linear(&row, &format!("{m}.w3.weight"));
                    let act: Vec<f64> = g1[0]
                        .iter()
                        .zip(&g3[0])
                        .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                        .collect();
                    let y = self.linear(&[act], &format!("{m}.w2.weight"));
                    for c in 0..hd {
                        x[t][c] += e[ex] / z * y[0][c];
                    }
                }
            }
        }
        let h = self.rms(&x, "model.norm.weight");
        self.linear(&h, "lm_head.weight")
    }
}

fn check(window: Option<usize>, t_len: usize) {
    let mut config = tiny_config();
    config["sliding_window"] = window.map_or(Value::Null, |w| w.into());
    let weights = tiny_weights(&config, 7);
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &config, &to_raw(&weights, Dtype::F32));
    let model = Model::load(dir.path()).unwrap();
    let mut rng = Lcg(99);
    let ids: Vec<u32> = (0..t_len)
        .map(|_| ((rng.next() + 1.0) * 25.0) as u32 % 50)
        .collect();
    let got = CpuBackend.download(&model.logits(&ids).unwrap()).unwrap();
    let want = Naive {
        w: &weights,
        c: &config,
    }
    .logits(&ids, window);
    let scale = want.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut worst = (0.0, 0);
    for (i, (g, w)) in got.data.iter().zip(want.iter().flatten()).enumerate() {
        assert!(g.is_finite(), "logit {i} is {g}");
        let err = (*g as f64 - w).abs() / scale;
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let i = worst.1;
    eprintln!(
        "window {window:?} T {t_len}: max error / max |logit| = {:.2e} at {i}",
        worst.0
    );
    assert!(
        worst.0 < REL_TOL,
        "logit {i}: got {}, expected {} (relative {:.2e})",
        got.data[i],
        want.iter().flatten().nth(i).unwrap(),
        worst.0
    );

    // NLL agrees with the log-softmax of the same logits.
    let nll = model.nll(&ids).unwrap();
    assert_eq!(nll.len(), t_len - 1);
    for (t, &n) in nll.iter().enumerate() {
        let row = &want[t];
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let expect = lse - row[ids[t + 1] as usize];
        assert!(
            (n as f64 - expect).abs() < 1e-4 * expect.abs().max(1.0),
            "nll {t}: {n} vs {expect}"
        );
    }
}

#[test]
fn logits_match_naive_f64_short() {
    check(None, 19);
}

#[test]
fn logits_match_naive_f64_across_attention_blocks() {
    // Longer than one 512-query attention block.
    check(None, 600);
}

#[test]
fn logits_match_naive_f64_sliding_window() {
    check(Some(5), 40);
    check(Some(300), 600);
}

#[test]
fn observer_sees_every_linear_input() {
    let config = tiny_config();
    let weights = tiny_weights(&config, 3);
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &config, &to_raw(&weights, Dtype::BF16));
    let ckpt = runtime::Checkpoint::open(dir.path()).unwrap();
    let arch = runtime::Mixtral::new(CpuBackend, ckpt.config().clone());
    let layer = ckpt.load_layer(0).unwrap();
    let ids: Vec<u32> = (0..30).collect();
    let x = arch.embed(&ckpt.load_embedding().unwrap(), &ids).unwrap();
    let mut seen: Vec<(LinearSite, Vec<usize>)> = Vec::new();
    let mut obs = |site: LinearSite, t: &candle_core::Tensor| seen.push((site, t.dims().to_vec()));
    let y = arch.layer_forward(&layer, &x, Some(&mut obs)).unwrap();
    assert_eq!(y.dims(), &[30, 16]);
    assert_eq!(seen[0], (LinearSite::Attention, vec![30, 16]));
    assert_eq!(seen[1], (LinearSite::AttentionOut, vec![30, 16]));
    let mut routed = 0;
    for pair in seen[2..].chunks(2) {
        let (LinearSite::ExpertUp(e), up) = &pair[0] else {
            panic!("{pair:?}")
        };
        assert_eq!(pair[1].0, LinearSite::ExpertDown(*e));
        assert_eq!(pair[1].1, vec![up[0], 24]);
        assert_eq!(up[1], 16);
        routed += up[0];
    }
    // Every token goes to exactly two experts.
    assert_eq!(routed, 60);
    // Same result without an observer.
    let y2 = arch.layer_forward(&layer, &x, None).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), y2.to_vec2::<f32>().unwrap());
}
