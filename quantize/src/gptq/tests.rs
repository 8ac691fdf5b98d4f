//! The solver against an independent numpy port of AutoGPTQ 0.6 (`quantize/tests/data/gptq_reference.py`),
//! and properties: GPTQ beats RTN on correlated inputs, 8-bit GPTQ reproduces W.

use super::*;
use crate::hessian::Hessian;

/// Fraction of codes allowed to differ from the reference (each by exactly one step): floating-point
/// summation order differs (Hessian GEMM, Cholesky, block-tail GEMM), and a weight sitting on a
/// rounding boundary can flip; the error feedback then moves later codes of that row a little.
const CODE_MISMATCH_FRACTION: f64 = 0.01;
/// Relative tolerance on scales computed from the original weight (gs = -1 and the first group).
const SCALE_REL_EXACT: f32 = 1e-6;
/// Relative tolerance on scales of later groups (computed from the error-updated weight).
const SCALE_REL: f32 = 1e-5;
/// Relative tolerance on the total loss.
const LOSS_REL: f64 = 1e-5;
/// Relative tolerance on the Hessian (f32 accumulation of a few hundred rows in a different order).
const HESSIAN_REL: f32 = 1e-5;

struct Shape {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    h: Hessian,
}

fn data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn load() -> (serde_json::Value, std::collections::HashMap<String, Shape>) {
    let dir = data_dir();
    let text = std::fs::read_to_string(dir.join("gptq_ref.json")).expect("gptq_ref.json");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut shapes = std::collections::HashMap::new();
    for (name, s) in json["shapes"].as_object().unwrap() {
        let get = |k: &str| s[k].as_u64().unwrap() as usize;
        let (rows, cols, tokens, batch) = (get("rows"), get("cols"), get("tokens"), get("batch"));
        let bytes = std::fs::read(dir.join(format!("gptq_ref_{name}.bin"))).unwrap();
        let f: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(f.len(), rows * cols + tokens * cols, "{name}.bin size");
        let (w, x) = f.split_at(rows * cols);
        let mut h = Hessian::new(cols);
        for chunk in x.chunks(batch * cols) {
            h.add_batch(chunk).unwrap();
        }
        assert_eq!(h.calls(), get("calls"));
        assert_eq!(h.tokens(), tokens);
        // Hessian against the reference's diagonal and first row.
        let diag = s["h_diag"].as_array().unwrap();
        let scale = diag
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .fold(0.0f32, f32::max);
        for (i, v) in diag.iter().enumerate() {
            let want = v.as_f64().unwrap() as f32;
            assert!(
                (h.matrix()[(i, i)] - want).abs() <= HESSIAN_REL * scale,
                "{name} H[{i},{i}]"
            );
        }
        for (j, v) in s["h_row0"].as_array().unwrap().iter().enumerate() {
            let want = v.as_f64().unwrap() as f32;
            assert!(
                (h.matrix()[(0, j)] - want).abs() <= HESSIAN_REL * scale,
                "{name} H[0,{j}]"
            );
        }
        shapes.insert(
            name.clone(),
            Shape {
                rows,
                cols,
                w: w.to_vec(),
                h,
            },
        );
    }
    (json, shapes)
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn matches_numpy_port_of_autogptq() {
    let (json, shapes) = load();
    let mut report = Vec::new();
    for case in json["cases"].as_array().unwrap() {
        let s = &shapes[case["shape"].as_str().unwrap()];
        let cfg = GptqConfig {
            bits: case["bits"].as_u64().unwrap() as u32,
            group_size: case["group_size"].as_i64().unwrap() as i32,
            act_order: case["act_order"].as_bool().unwrap(),
            static_groups: case["static_groups"].as_bool().unwrap(),
            sym: true,
            percdamp: 0.1,
            blocksize: BLOCKSIZE,
        };
        let label = format!("{} {:?}", case["shape"], cfg);
        let solved = fasterquant(&s.w, s.rows, s.cols, s.h.matrix().to_owned(), &cfg).unwrap();
        let q = &solved.quantized;
        let hex = case["codes"].as_str().unwrap().as_bytes();
        let want: Vec<u8> = hex
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
            .collect();
        assert_eq!(want.len(), q.codes.len(), "{label}");
        let mut mismatched = 0;
        for (i, (&a, &b)) in q.codes.iter().zip(&want).enumerate() {
            if a != b {
                mismatched += 1;
                assert!(a.abs_diff(b) == 1, "{label}: code {i} = {a}, reference {b}");
            }
        }
        let frac = mismatched as f64 / want.len() as f64;
        assert!(
            frac <= CODE_MISMATCH_FRACTION,
            "{label}: {mismatched} codes differ ({frac})"
        );
        // g_idx exactly.
        let g: Vec<i32> = case["g_idx"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect();
        assert_eq!(q.g_idx, g, "{label}: g_idx");
        // Scales and zeros in group-index order.
        let (scales, zeros) = (floats(&case["scales"]), floats(&case["zeros"]));
        assert_eq!(q.scales.len(), scales.len(), "{label}: scale count");
        assert_eq!(q.zeros, zeros, "{label}: zeros");
        let mut worst = 0.0f32;
        for (i, (&a, &b)) in q.scales.iter().zip(&scales).enumerate() {
            let rel = (a - b).abs() / b.abs();
            let tol = if i < s.rows {
                SCALE_REL_EXACT
            } else {
                SCALE_REL
            };
            assert!(
                rel <= tol,
                "{label}: scale {i} = {a}, reference {b} (rel {rel})"
            );
            worst = worst.max(rel);
        }
        // Loss: the same codes give the same terms up to f32 rounding.
        let want_loss = case["loss"].as_f64().unwrap();
        let rel_loss = (solved.stats.loss - want_loss).abs() / want_loss;
        assert!(
            rel_loss < LOSS_REL,
            "{label}: loss {} vs {want_loss}",
            solved.stats.loss
        );
        let damp = case["damp"].as_f64().unwrap() as f32;
        match solved.stats.conditioning {
            Conditioning::Damped {
                damp: d,
                retries: 0,
                ..
            } => {
                assert!(
                    (d - damp).abs() <= 1e-5 * damp,
                    "{label}: damp {d} vs {damp}"
                )
            }
            other => panic!("{label}: unexpected conditioning {other:?}"),
        }
        let dead = &json["shapes"][case["shape"].as_str().unwrap()]["dead"];
        assert_eq!(
            solved.stats.dead_columns,
            dead.as_array().unwrap().len(),
            "{label}"
        );
        report.push(format!(
            "{label}: {mismatched} codes differ, worst scale rel {worst:e}, loss rel {rel_loss:e}"
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// A deterministic pseudo-random stream (xorshift), so tests need no rand crate.
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            // Sum of 4 uniforms: roughly normal, mean 0.
            (0..4)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .sum::<f32>()
        })
        .collect()
}

/// `[tokens, cols]` inputs whose columns are strongly correlated (a low-rank mix plus noise).
fn correlated_inputs(tokens: usize, cols: usize) -> Vec<f32> {
    let rank = 8;
    let z = noise(1, tokens * rank);
    let mix = noise(2, rank * cols);
    let eps = noise(3, tokens * cols);
    (0..tokens * cols)
        .map(|i| {
            let (t, c) = (i / cols, i % cols);
            (0..rank)
                .map(|r| z[t * rank + r] * mix[r * cols + c])
                .sum::<f32>()
                + 0.1 * eps[i]
        })
        .collect()
}

fn output_error(w: &[f32], q: &[f32], x: &[f32], rows: usize, cols: usize) -> f64 {
    let tokens = x.len() / cols;
    let mut total = 0.0f64;
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let d: f32 = (0..cols)
                .map(|c| (w[r * cols + c] - q[r * cols + c]) * xt[c])
                .sum();
            total += (d * d) as f64;
        }
    }
    total
}

#[test]
fn gptq_beats_rtn_on_correlated_inputs() {
    let (rows, cols, tokens) = (32, 192, 512);
    let w: Vec<f32> = noise(4, rows * cols).iter().map(|v| v * 0.1).collect();
    let x = correlated_inputs(tokens, cols);
    let mut h = Hessian::new(cols);
    for chunk in x.chunks(64 * cols) {
        h.add_batch(chunk).unwrap();
    }
    for (bits, gs) in [(4, -1), (4, 32), (3, 128), (2, -1), (8, 64)] {
        let cfg = GptqConfig {
            bits,
            group_size: gs,
            act_order: true,
            static_groups: false,
            sym: true,
            percdamp: 0.1,
            blocksize: BLOCKSIZE,
        };
        let g = fasterquant(&w, rows, cols, h.matrix().to_owned(), &cfg).unwrap();
        let r = rtn(&w, rows, cols, &cfg, ScaleDivision::True).unwrap();
        let eg = output_error(&w, &dequantize(&g.quantized), &x, rows, cols);
        let er = output_error(&w, &dequantize(&r), &x, rows, cols);
        assert!(eg < er, "bits {bits} gs {gs}: GPTQ {eg} vs RTN {er}");
        // At low bits on correlated inputs the gain is large.
        if bits <= 4 {
            assert!(eg < 0.7 * er, "bits {bits} gs {gs}: GPTQ {eg} vs RTN {er}");
        }
    }
}

#[test]
fn eight_bit_gptq_reproduces_the_weight() {
    let (rows, cols, tokens) = (16, 256, 300);
    let w: Vec<f32> = noise(5, rows * cols);
    let x = correlated_inputs(tokens, cols);
    let mut h = Hessian::new(cols);
    h.add_batch(&x).unwrap();
    for gs in [-1, 128] {
        let cfg = GptqConfig {
            bits: 8,
            group_size: gs,
            act_order: true,
            static_groups: false,
            sym: true,
            percdamp: 0.1,
            blocksize: BLOCKSIZE,
        };
        let g = fasterquant(&w, rows, cols, h.matrix().to_owned(), &cfg).unwrap();
        let q = dequantize(&g.quantized);
        let wmax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = w
            .iter()
            .zip(&q)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        // One 8-bit step is 2·max/255; error feedback may push a weight a few steps.
        assert!(
            worst < 4.0 * 2.0 * wmax / 255.0,
            "gs {gs}: worst {worst}, max {wmax}"
        );
    }
}

#[test]
fn rtn_layout_and_starved_input_is_not_zeroed() {
    let (rows, cols) = (4, 96);
    let w: Vec<f32> = noise(6, rows * cols);
    let cfg = GptqConfig {
        bits: 4,
        group_size: 32,
        act_order: true,
        static_groups: false,
        sym: true,
        percdamp: 0.1,
        blocksize: BLOCKSIZE,
    };
    let r = rtn(&w, rows, cols, &cfg, ScaleDivision::True).unwrap();
    assert_eq!(r.groups(), 3);
    assert_eq!(
        r.g_idx,
        (0..cols as i32).map(|k| k / 32).collect::<Vec<_>>()
    );
    let q = dequantize(&r);
    for (a, b) in w.iter().zip(&q) {
        let step = 2.0 * w.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 15.0;
        assert!((a - b).abs() <= step, "{a} vs {b}");
    }
    // AutoGPTQ with an all-zero Hessian (an expert with no token) zeroes the whole weight: that is
    // why the driver must not call fasterquant for starved modules.
    let g = fasterquant(&w, rows, cols, Mat::zeros(cols, cols), &cfg).unwrap();
    assert_eq!(g.stats.dead_columns, cols);
    assert!(dequantize(&g.quantized).iter().all(|&v| v == 0.0));
}

#[test]
fn bad_settings_are_errors() {
    let cfg = GptqConfig {
        bits: 5,
        group_size: 32,
        act_order: false,
        static_groups: false,
        sym: true,
        percdamp: 0.1,
        blocksize: BLOCKSIZE,
    };
    let e = rtn(&[0.0; 8], 2, 4, &cfg, ScaleDivision::True)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bits") && e.contains('5'), "{e}");
    let cfg = GptqConfig { bits: 4, ..cfg };
    let e = rtn(&[0.0; 7], 2, 4, &cfg, ScaleDivision::True)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 x 4") && e.contains("7 values"), "{e}");
    let e = fasterquant(&[0.0; 8], 2, 4, Mat::zeros(3, 3), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Hessian") && e.contains("3 x 3"), "{e}");
}
