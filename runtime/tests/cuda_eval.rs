//! The layer-major GPU evaluation (`runtime::cuda::eval`) against the f32 CPU reference on the
//! bundled model, and its dequantization kernel against `GptqWeight::dequantize`.
//!
//! Needs a CUDA device: `cargo test --release -p runtime --test cuda_eval -- --include-ignored`.
//! Without one, each test prints why it does not run and returns. `MIXTRAL_GPTQ_MOE_S` overrides
//! the fixture folder; `MIXTRAL_GPTQ_BRANCHES` (colon-separated directories of GPTQ branches of
//! the fixture, e.g. written by `mixtral-gptq quantize --rtn`) adds branches to the comparison.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use runtime::cuda::eval::{
    dequantize_on_device, evaluate_checkpoint, AttentionKernel, EvalOptions, EvalOutput,
};
use runtime::cuda::random::random_gptq;
use runtime::cuda::CudaDevice;
use runtime::{Backend, Checkpoint, CpuBackend, Model};

/// Relative difference of the perplexity over all windows, GPU against CPU (issue 6: 0.1 %).
const PPL_TOL: f64 = 1e-3;
/// The same for a single window: a 512-token chunk scores few predictions, and with bf16
/// activations (dense checkpoints) one window moved by 1.15e-3 on an H100 (2026-11-28).
const WINDOW_PPL_TOL: f64 = 3e-3;
/// ‖gpu − cpu‖ / ‖cpu‖ over a window's logits (issue 6: 1e-2 with 16-bit operands). The largest
/// single-element difference is reported, not asserted: a token whose top-2 experts are nearly
/// tied can pick another expert on the GPU and move by several percent (6e-2 seen).
const LOGITS_TOL: f64 = 1e-2;
/// Dequantized values are f16: half an ulp of f16 relative to the largest value.
const DEQUANT_TOL: f64 = 1e-3;
/// Mean NLL of a window, two GPU runs that differ only in chunking and attention kernel (GEMM
/// shapes, f16 tensor-core vs f32 attention). Single tokens can move more: a near-tied router
/// choice flips (1.85e-2 of the largest NLL seen on an H100).
const RERUN_TOL: f64 = 1e-3;

fn gpu() -> Option<&'static Arc<CudaDevice>> {
    static D: OnceLock<Result<Arc<CudaDevice>, String>> = OnceLock::new();
    match D.get_or_init(|| CudaDevice::new(0).map_err(|e| e.to_string())) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping: no usable CUDA device: {e}");
            None
        }
    }
}

fn fixture_dir() -> PathBuf {
    std::env::var_os("MIXTRAL_GPTQ_MOE_S")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s"))
}

/// Windows as the two conventions cut them: one 2048-token window of held-out text, and two
/// 512-token chunks led by BOS (different lengths evaluated together).
fn windows() -> &'static Vec<Vec<u32>> {
    static W: OnceLock<Vec<Vec<u32>>> = OnceLock::new();
    W.get_or_init(|| {
        let tokenizer = tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json"))
            .expect("fixture tokenizer");
        let text = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/eval/shakespeare.txt"),
        )
        .expect("fixture text");
        let ids = tokenizer
            .encode(text.as_str(), true)
            .expect("encoding")
            .get_ids()
            .to_vec();
        assert!(ids.len() >= 3072, "fixture text too short: {}", ids.len());
        let mut w = vec![ids[..2048].to_vec()];
        for k in 4..6 {
            let mut c = ids[k * 512..(k + 1) * 512].to_vec();
            c[0] = 1;
            w.push(c);
        }
        w
    })
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
}

fn rel_max(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|v| v.is_finite()), "GPU values are not finite");
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    num / b.iter().map(|y| (*y as f64).abs()).fold(1e-30, f64::max)
}

/// GPU evaluation of `dir` against the CPU model: perplexity per window within [`PPL_TOL`] and
/// the first window's logits within [`LOGITS_TOL`]. Returns the GPU output for further checks.
fn compare_with_cpu(dev: &Arc<CudaDevice>, dir: &std::path::Path) -> EvalOutput {
    let ck = Checkpoint::open(dir).expect("opening the checkpoint");
    let opts = EvalOptions {
        keep_logits_of: Some(0),
        phase_timing: true,
        ..EvalOptions::default()
    };
    let out = evaluate_checkpoint(dev, &ck, windows(), &opts).expect("GPU evaluation");
    let cpu = Model::from_checkpoint(CpuBackend::new(), &ck).expect("CPU model");
    let (mut all_c, mut all_g) = (Vec::new(), Vec::new());
    for (i, w) in windows().iter().enumerate() {
        let nc = cpu.nll(w).expect("CPU nll");
        let ng = &out.nll[i];
        assert_eq!(ng.len(), nc.len());
        let (pc, pg) = (mean(&nc).exp(), mean(ng).exp());
        let r = (pg / pc - 1.0).abs();
        eprintln!(
            "{}: window {i} ({} tokens): ppl cpu {pc:.5} gpu {pg:.5} (rel {r:.2e})",
            dir.display(),
            w.len()
        );
        assert!(
            r < WINDOW_PPL_TOL,
            "window {i}: perplexity differs by {r:.2e}"
        );
        all_c.extend(nc);
        all_g.extend_from_slice(ng);
    }
    let (pc, pg) = (mean(&all_c).exp(), mean(&all_g).exp());
    let r = (pg / pc - 1.0).abs();
    eprintln!(
        "{}: all windows: ppl cpu {pc:.5} gpu {pg:.5} (rel {r:.2e})",
        dir.display()
    );
    assert!(r < PPL_TOL, "perplexity differs by {r:.2e}");
    let lc = CpuBackend::new()
        .download(&cpu.logits(&windows()[0]).expect("CPU logits"))
        .expect("download");
    let lg = out.logits.as_ref().expect("kept logits");
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let e = norm(&mut lg.iter().zip(&lc.data).map(|(a, b)| *a as f64 - *b as f64))
        / norm(&mut lc.data.iter().map(|&b| b as f64));
    let vocab = lc.shape[1];
    let rows_off = lg
        .chunks(vocab)
        .zip(lc.data.chunks(vocab))
        .filter(|(a, b)| rel_max(a, b) > LOGITS_TOL)
        .count();
    eprintln!(
        "{}: logits of window 0: relative difference {e:.2e} (norm), {:.2e} (largest element); {rows_off} of {} tokens have a row off by more than {LOGITS_TOL}",
        dir.display(),
        rel_max(lg, &lc.data),
        lc.shape[0]
    );
    assert!(e < LOGITS_TOL, "logits differ by {e:.2e}");
    eprintln!(
        "{}: GPU total {:.1} ms, phases {:?}",
        dir.display(),
        out.total_ms,
        out.phase_ms
    );
    out
}

#[test]
#[ignore = "needs a CUDA device"]
fn dequantization_matches_cpu() {
    let Some(dev) = gpu() else { return };
    for (bits, gs, k, n, act) in [
        (4, 128, 512, 256, true),
        (4, 32, 256, 96, true),
        (4, -1, 256, 64, false),
        (3, 128, 512, 64, true),
        (3, -1, 96, 32, false),
        (8, 128, 256, 40, true),
        (8, -1, 64, 12, false),
        (2, 32, 128, 32, true),
    ] {
        let w = random_gptq(bits, gs, k, n, act, 17);
        w.check().unwrap();
        let got = dequantize_on_device(dev, &w).unwrap();
        let want_nk = w.dequantize();
        let mut want = vec![0f32; k * n];
        for r in 0..n {
            for c in 0..k {
                want[c * n + r] = want_nk[r * k + c];
            }
        }
        let e = rel_max(&got, &want);
        eprintln!("dequant {bits}-bit g{gs} {k}x{n} act-order {act}: max rel {e:.2e}");
        assert!(e < DEQUANT_TOL, "{bits}-bit g{gs}: {e:.2e}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn fixture_dense_matches_cpu_and_chunking_changes_nothing() {
    let Some(dev) = gpu() else { return };
    let dir = fixture_dir();
    let out = compare_with_cpu(dev, &dir);
    // Small chunks, small expert and head blocks, and the reference attention kernel: the same
    // NLLs up to GEMM summation order and f16 rounding in attention.
    let ck = Checkpoint::open(&dir).unwrap();
    let opts = EvalOptions {
        chunk_tokens: 600,
        moe_rows: 100,
        head_rows: 300,
        attention: AttentionKernel::Reference,
        ..EvalOptions::default()
    };
    let small = evaluate_checkpoint(dev, &ck, windows(), &opts).unwrap();
    for (i, (a, b)) in small.nll.iter().zip(&out.nll).enumerate() {
        let r = (mean(a) / mean(b) - 1.0).abs();
        eprintln!(
            "window {i}: chunked + reference attention vs default: mean NLL rel {r:.2e}, largest token difference {:.2e} (relative to the largest NLL)",
            rel_max(a, b)
        );
        assert!(r < RERUN_TOL, "window {i}: {r:.2e}");
    }
}

#[test]
#[ignore = "needs a CUDA device and MIXTRAL_GPTQ_BRANCHES"]
fn fixture_branches_match_cpu() {
    let Some(dev) = gpu() else { return };
    let Some(list) = std::env::var_os("MIXTRAL_GPTQ_BRANCHES") else {
        eprintln!("skipping: MIXTRAL_GPTQ_BRANCHES is not set");
        return;
    };
    for dir in std::env::split_paths(&list) {
        compare_with_cpu(dev, &dir);
    }
}

/// With a sliding window (Mistral-style; Mixtral has none) the tensor-core and the reference
/// attention kernels agree, and the window changes the result.
#[test]
#[ignore = "needs a CUDA device"]
fn sliding_window_kernels_agree() {
    use runtime::cuda::eval::{evaluate_windows, read_layer, upload_head, upload_layer};
    let Some(dev) = gpu() else { return };
    let ck = Checkpoint::open(fixture_dir()).unwrap();
    let run = |window: Option<usize>, attention: AttentionKernel| {
        let mut c = ck.config().clone();
        c.sliding_window = window;
        let head = upload_head(dev, &ck).unwrap();
        let mut feed = |l: usize| upload_layer(dev, &read_layer(&ck, l)?);
        let opts = EvalOptions {
            attention,
            ..EvalOptions::default()
        };
        evaluate_windows(dev, &c, windows(), head, &mut feed, &opts).unwrap()
    };
    let tc = run(Some(100), AttentionKernel::Auto);
    let reference = run(Some(100), AttentionKernel::Reference);
    let full = run(None, AttentionKernel::Auto);
    for i in 0..windows().len() {
        let r = (mean(&tc.nll[i]) / mean(&reference.nll[i]) - 1.0).abs();
        let moved = (mean(&tc.nll[i]) / mean(&full.nll[i]) - 1.0).abs();
        eprintln!("window {i}: sliding window 100, tensor cores vs reference: {r:.2e}; vs no window: {moved:.2e}");
        assert!(r < RERUN_TOL, "window {i}: {r:.2e}");
        assert!(
            moved > RERUN_TOL,
            "window {i}: the sliding window changed nothing"
        );
    }
}
