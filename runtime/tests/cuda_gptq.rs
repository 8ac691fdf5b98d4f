//! GPU kernels against a CPU dequantize-then-matmul reference in f64, on fresh random inputs.
//! Needs a CUDA device: run with `cargo test --release -p runtime --test cuda_gptq -- --ignored`.
//! Every output is poisoned with NaN before the kernel runs, so an unwritten element fails.

use half::{bf16, f16};
use rayon::prelude::*;
use runtime::cuda::gptq::{prepare, uniform_group_rows, ActDtype, GemvKernel, WordLayout};
use runtime::cuda::random::{random_activations, random_gptq, Rng};
use runtime::cuda::CudaDevice;
use runtime::qlinear::GptqWeight;
use std::sync::{Arc, OnceLock};

/// ‖y − ref‖ / ‖ref‖ allowed for f16/bf16 inputs with f32 outputs (issue 5).
const REL_TOL: f64 = 1e-3;

fn device() -> Arc<CudaDevice> {
    static DEV: OnceLock<Arc<CudaDevice>> = OnceLock::new();
    DEV.get_or_init(|| CudaDevice::new(0).unwrap_or_else(|e| panic!("{e}")))
        .clone()
}

/// y[m, n] = Σ_k x[m, k] · W[n, k] in f64, W from the host dequantizer (exact in f32).
fn reference(x: &[f64], m: usize, w: &GptqWeight) -> Vec<f64> {
    let (k, n) = (w.in_features, w.out_features);
    let wd = w.dequantize(); // [N, K]
    let mut y = vec![0f64; m * n];
    y.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        let xr = &x[r * k..(r + 1) * k];
        for (c, out) in row.iter_mut().enumerate() {
            let wr = &wd[c * k..(c + 1) * k];
            *out = xr.iter().zip(wr).map(|(a, b)| a * *b as f64).sum();
        }
    });
    y
}

fn rel_err(y: &[f32], r: &[f64]) -> f64 {
    assert!(
        y.iter().all(|v| v.is_finite()),
        "output has NaN/inf: some element was not written"
    );
    let num: f64 = y.iter().zip(r).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let den: f64 = r.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Auto,
    Gemv,
    /// Uploaded for the tensor-core GEMV (strip-major words), then
    /// [`CudaDevice::qmatmul_gemv_tensor_cores`] (every launch on the tensor cores).
    GemvTensorCore,
    /// Uploaded for the tensor-core GEMV, then the scalar GEMV on those strip-major words.
    GemvScalarStrips,
    /// Uploaded for the tensor-core GEMV, then the dequantize + cuBLAS path on those words.
    GemmStrips,
    /// [`Path::GemvTensorCore`] on tile-major words (3 bits).
    GemvTensorCoreTiles,
    /// [`Path::GemvScalarStrips`] on tile-major words.
    GemvScalarTiles,
    /// [`Path::GemmStrips`] on tile-major words.
    GemmTiles,
    /// Uploaded for the scalar GEMV only (row-major words).
    GemvScalarOnly,
    Gemm,
    /// Dequantized once ([`CudaDevice::prepare_dense`]), then two calls of [`CudaDevice::dense_matmul`].
    Prepared,
}

/// Runs one product on the GPU and returns its relative error.
fn check<T: ActDtype>(w: &GptqWeight, m: usize, path: Path, seed: u64) -> f64 {
    check_on::<T>(&device(), w, m, path, seed)
}

/// [`check`] on a given device.
fn check_on<T: ActDtype>(dev: &CudaDevice, w: &GptqWeight, m: usize, path: Path, seed: u64) -> f64 {
    let (k, n) = (w.in_features, w.out_features);
    let xs: Vec<T> = random_activations(m * k, seed)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let x64: Vec<f64> = xs.iter().map(|v| v.to_f32() as f64).collect();
    let (kernel, layout) = match path {
        Path::GemvTensorCore | Path::GemvScalarStrips | Path::GemmStrips => {
            (GemvKernel::TensorCore, Some(WordLayout::StripMajor))
        }
        Path::GemvTensorCoreTiles | Path::GemvScalarTiles | Path::GemmTiles => {
            (GemvKernel::TensorCore, Some(WordLayout::TileMajor))
        }
        Path::GemvScalarOnly => (GemvKernel::Scalar, None),
        _ => (GemvKernel::Auto, None),
    };
    let dw = dev
        .upload_prepared_in(&prepare(w).unwrap(), kernel, layout)
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(layout) = layout {
        assert_eq!(dw.word_layout(), Some(layout), "{path:?}");
    }
    let xd = dev.upload(&xs).unwrap();
    let mut yd = dev.upload(&vec![f32::NAN; m * n]).unwrap();
    match path {
        Path::Auto => dev.qmatmul(&xd, m, &dw, &mut yd),
        Path::Gemv | Path::GemvScalarOnly => dev.qmatmul_gemv(&xd, m, &dw, &mut yd),
        Path::GemvTensorCore | Path::GemvTensorCoreTiles => {
            dev.qmatmul_gemv_tensor_cores(&xd, m, &dw, &mut yd)
        }
        Path::GemvScalarStrips | Path::GemvScalarTiles => {
            dev.qmatmul_gemv_scalar(&xd, m, &dw, &mut yd)
        }
        Path::GemmStrips | Path::GemmTiles => dev.qmatmul_gemm(&xd, m, &dw, &mut yd),
        Path::Gemm => dev.qmatmul_gemm(&xd, m, &dw, &mut yd),
        Path::Prepared => dev.prepare_dense(&dw).and_then(|d| {
            // The second call must not depend on state the first one left behind.
            dev.dense_matmul(&xd, m, &d, &mut yd)?;
            dev.upload(&vec![f32::NAN; m * n]).map(|p| yd = p)?;
            dev.dense_matmul(&xd, m, &d, &mut yd)
        }),
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let y = dev.download(&yd).unwrap();
    rel_err(&y, &reference(&x64, m, w))
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    bits: u32,
    gs: i32,
    k: usize,
    n: usize,
    act: bool,
    m: usize,
    bf: bool,
    path: Path,
    seed: u64,
) {
    run_case_on(&device(), bits, gs, k, n, act, m, bf, path, seed)
}

/// [`run_case`] on a given device.
#[allow(clippy::too_many_arguments)]
fn run_case_on(
    dev: &CudaDevice,
    bits: u32,
    gs: i32,
    k: usize,
    n: usize,
    act: bool,
    m: usize,
    bf: bool,
    path: Path,
    seed: u64,
) {
    let w = random_gptq(bits, gs, k, n, act, seed);
    let e = if bf {
        check_on::<bf16>(dev, &w, m, path, seed + 1)
    } else {
        check_on::<f16>(dev, &w, m, path, seed + 1)
    };
    let dt = if bf { "bf16" } else { "f16" };
    eprintln!("{bits}-bit g{gs} act={act} K={k} N={n} M={m} {dt} {path:?}: rel err {e:.2e}");
    assert!(
        e < REL_TOL,
        "{bits}-bit g{gs} act={act} K={k} N={n} M={m} {dt} {path:?}: rel err {e:.3e} >= {REL_TOL}"
    );
}

/// Mixtral's four shapes (K x N), every bit width, GEMV at M = 1, 5 and 16 and the cuBLAS path at
/// M = 256, cycling group size (128 with act-order, 32, per-channel) and input dtype.
#[test]
#[ignore = "needs a CUDA device"]
fn mixtral_shapes_match_reference() {
    let shapes = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)];
    let groups = [(128, true), (32, false), (-1, false)];
    let mut case = 0u64;
    for (si, &(k, n)) in shapes.iter().enumerate() {
        for (bi, bits) in [3u32, 4, 8].into_iter().enumerate() {
            let (gs, act) = groups[(si + bi) % 3];
            let w = random_gptq(bits, gs, k, n, act, 100 + case);
            for (mi, m) in [1usize, 5, 16, 256].into_iter().enumerate() {
                case += 1;
                let bf = (case + mi as u64).is_multiple_of(2);
                let e = if bf {
                    check::<bf16>(&w, m, Path::Auto, case)
                } else {
                    check::<f16>(&w, m, Path::Auto, case)
                };
                let dt = if bf { "bf16" } else { "f16" };
                eprintln!("{bits}-bit g{gs} act={act} K={k} N={n} M={m} {dt}: rel err {e:.2e}");
                assert!(
                    e < REL_TOL,
                    "{bits}-bit g{gs} act={act} K={k} N={n} M={m} {dt}: rel err {e:.3e}"
                );
            }
        }
    }
    // The layer-major GEMM path (dequantized once) at a full shape, act-order, bf16 X.
    run_case(4, 128, 14336, 4096, true, 64, true, Path::Prepared, 77);
}

/// Odd small shapes: one partial column tile, group sizes that divide K without being a power of
/// two, M across the GEMV launches (1, 3, and where the tensor cores run without act-order 9 = 8 + 1
/// and 16) and the cuBLAS path (17, 33), both dtypes.
#[test]
#[ignore = "needs a CUDA device"]
fn odd_shapes_match_reference() {
    let cases: &[(u32, i32, usize, usize, bool)] = &[
        (4, 24, 72, 40, true),
        (4, -1, 8, 8, false),
        (8, 20, 100, 12, true),
        (8, 4, 64, 132, false),
        (3, 32, 160, 96, true),
        (3, -1, 32, 32, false),
        (4, 32, 96, 264, true),
    ];
    let mut seed = 1000;
    for &(bits, gs, k, n, act) in cases {
        for m in [1usize, 3, 9, 16, 17, 33] {
            seed += 1;
            run_case(bits, gs, k, n, act, m, seed % 2 == 0, Path::Auto, seed);
        }
        // Both paths at the same M agree with the reference.
        run_case(bits, gs, k, n, act, 4, false, Path::Gemm, seed + 50);
        run_case(bits, gs, k, n, act, 20, true, Path::Gemv, seed + 60);
        run_case(
            bits,
            gs,
            k,
            n,
            act,
            40,
            seed % 2 == 1,
            Path::Prepared,
            seed + 70,
        );
    }
}

/// The tensor-core GEMV (4 and 8 bits, K and N multiples of 32; 3 bits, K and groups multiples of
/// 128): every row count of one launch (M = 1..8), both dtypes, groups of 32, 64, 128, 256 and
/// per-channel, with and without act-order, split-K with idle warps (K = 96: 3 tiles for 8 warps)
/// and with many splits; M = 8 at 14336 x 4096, where X takes more than 48 KiB of shared memory
/// (M = 4 at 3 bits, its largest launch there, and M = 8 and 13 in launches of 4 rows); the entries
/// for narrow and for tall layers. The scalar GEMV is checked on the same layers too.
#[test]
#[ignore = "needs a CUDA device"]
fn mma_gemv_matches_reference() {
    let dev = device();
    // A second device handle without programmatic dependent launch: act-order X is then gathered
    // inside the kernel at small M instead of put in order first (`prepermutes`).
    let gathering = CudaDevice::new(0).unwrap_or_else(|e| panic!("{e}"));
    gathering.set_dependent_launch(false);
    let cases: &[(u32, i32, usize, usize, bool)] = &[
        (4, 32, 96, 64, true),
        (4, 128, 512, 96, false),
        (8, 64, 256, 32, false),
        (8, -1, 1024, 160, true),
        (4, -1, 2048, 256, false),
        (8, 32, 4096, 512, true),
        (8, 128, 2048, 512, true),
        (4, 128, 4096, 1024, true),
        (3, 128, 384, 32, true),
        (3, -1, 640, 96, false),
        (3, 256, 2048, 64, false),
        (3, 128, 4096, 1024, true),
        // K above 8192 on at most a strip per SM: the 4-bit `_tall` entries (`mmad_tall`) at M <= 4
        // (act-order: put in order first, M >= 2), whole blocks of tiles (g128) and single tiles
        // (257 tiles, per channel)
        (4, 128, 12288, 1024, true),
        (4, -1, 8224, 1024, false),
    ];
    let mut seed = 5000;
    for &(bits, gs, k, n, act) in cases {
        let w = random_gptq(bits, gs, k, n, act, seed);
        let p = prepare(&w).unwrap();
        let dw = dev
            .upload_prepared_as(&p, GemvKernel::TensorCore)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(dev.uses_mma_gemv(&dw), "{bits}-bit g{gs} {k}x{n}");
        if bits == 4 && k > 8192 && !act {
            let shape = dev.gemv_launch_shape::<f16>(&dw, 1).unwrap().unwrap();
            assert!(shape.entry.ends_with("_tall"), "{k}x{n}: {shape:?}");
        }
        let case = (bits, gs, k, n, act);
        let strips = [
            Path::GemvTensorCore,
            Path::GemvScalarStrips,
            Path::GemmStrips,
        ];
        on_tensor_core_words(&gathering, case, strips, (false, [0, 50, 60]), &mut seed);
        // The scalar kernel on its own words.
        run_case(
            bits,
            gs,
            k,
            n,
            act,
            5,
            seed % 2 == 0,
            Path::GemvScalarOnly,
            seed + 70,
        );
        if bits == 3 {
            // The same layer with tile-major words (`gptq_tile3` entries).
            let tiles = [
                Path::GemvTensorCoreTiles,
                Path::GemvScalarTiles,
                Path::GemmTiles,
            ];
            on_tensor_core_words(&gathering, case, tiles, (true, [80, 90, 95]), &mut seed);
        }
    }
    for (bits, bf, m) in [
        (4, false, 8),
        (4, true, 8),
        (8, false, 8),
        (8, true, 8),
        (3, false, 4),
        (3, true, 4),
    ] {
        seed += 1;
        run_case(
            bits,
            128,
            14336,
            4096,
            true,
            m,
            bf,
            Path::GemvTensorCore,
            seed,
        );
    }
    // 3 bits at K = 14336 (tile-major words by default): M = 8 and 13 in launches of at most 4
    // rows (gemv_launch_rows); the largest launch on tile-major words, act-order.
    for (m, act, path) in [
        (8, false, Path::Auto),
        (13, true, Path::Gemv),
        (4, true, Path::GemvTensorCoreTiles),
    ] {
        seed += 1;
        run_case(3, 128, 14336, 4096, act, m, m == 8, path, seed);
    }
    // Groups of unequal sizes (64, 32, 96 and 64 rows, ids 0, 1, 3, 7): the kernel reads each
    // tile's group from `ugroup` instead of dividing by a group size.
    for (bits, act) in [(4, false), (4, true), (8, true)] {
        let mut w = random_gptq(bits, 32, 256, 64, false, seed);
        let group_of = |r: usize| match r {
            0..64 => 0,
            64..96 => 1,
            96..192 => 3,
            _ => 7,
        };
        for (i, g) in w.g_idx.iter_mut().enumerate() {
            *g = group_of(if act { i * 37 % 256 } else { i });
        }
        assert_eq!(uniform_group_rows(&prepare(&w).unwrap()), 0);
        for m in [1usize, 3, 8] {
            seed += 1;
            let e = if m == 3 {
                check::<bf16>(&w, m, Path::GemvTensorCore, seed)
            } else {
                check::<f16>(&w, m, Path::GemvTensorCore, seed)
            };
            eprintln!("{bits}-bit uneven groups act={act} M={m}: rel err {e:.2e}");
            assert!(
                e < REL_TOL,
                "{bits}-bit uneven groups act={act} M={m}: rel err {e:.3e}"
            );
        }
    }
}

/// One layer (bits, group, K, N, act-order) on the words of one tensor-core layout, whose
/// tensor-core, scalar and GEMM paths are `paths`: every launch's row count on the tensor cores
/// (M = 1..8), act-order X gathered inside on `gathering` (M = 1 and 3), the scalar GEMV on those
/// words (M = 3; the fused MoE GEMV and the dequantize kernel read them too) and the GEMM path
/// (M = 2). `flip` swaps which runs take bf16 X; `offsets` are added to the seeds of the
/// tensor-core, scalar and GEMM runs.
fn on_tensor_core_words(
    gathering: &CudaDevice,
    (bits, gs, k, n, act): (u32, i32, usize, usize, bool),
    [tensor_cores, scalar, gemm]: [Path; 3],
    (flip, [tc_off, scalar_off, gemm_off]): (bool, [u64; 3]),
    seed: &mut u64,
) {
    for m in 1..=8usize {
        *seed += 1;
        let bf = seed.is_multiple_of(2) != flip;
        run_case(bits, gs, k, n, act, m, bf, tensor_cores, *seed + tc_off);
    }
    if act {
        for m in [1usize, 3] {
            *seed += 1;
            let bf = (m == 3) != flip;
            run_case_on(
                gathering,
                bits,
                gs,
                k,
                n,
                act,
                m,
                bf,
                tensor_cores,
                *seed + tc_off,
            );
        }
    }
    let s = *seed;
    run_case(
        bits,
        gs,
        k,
        n,
        act,
        3,
        (s % 2 == 1) != flip,
        scalar,
        s + scalar_off,
    );
    run_case(
        bits,
        gs,
        k,
        n,
        act,
        2,
        s.is_multiple_of(2) != flip,
        gemm,
        s + gemm_off,
    );
}

/// The fused MoE launch: 8 experts (act-order, distinct perms), 5 tokens, top-2, gate/up style
/// (x_div = 2, no scale) then down style (x_div = 1, routing weights) and the top-k sum.
#[test]
#[ignore = "needs a CUDA device"]
fn fused_moe_matches_reference() {
    let dev = device();
    // (bits, group, act-order, K, N, layout): the tensor-core fused kernel where the layout allows
    // it (3-bit g32 and the scalar layout: the scalar fused kernel), K = 4096 with the act-order X
    // copy; g32 at 4 and 8 bits on its own entry (`gptq_mmadg_moe_*`), with and without act-order.
    let cases = [
        (4u32, 128i32, true, 512usize, 384usize, GemvKernel::Auto),
        (4, 128, true, 512, 384, GemvKernel::Scalar),
        (4, 128, true, 4096, 1024, GemvKernel::Auto),
        (3, 32, true, 512, 384, GemvKernel::Auto),
        (3, 128, true, 512, 384, GemvKernel::Auto),
        // (65 strips: a single layer of this shape would be uploaded tile-major)
        (3, 128, false, 512, 2080, GemvKernel::Auto),
        (8, -1, false, 512, 384, GemvKernel::Auto),
        (8, -1, false, 512, 384, GemvKernel::Scalar),
        (4, 32, true, 512, 384, GemvKernel::Auto),
        (4, 32, false, 4096, 1024, GemvKernel::Auto),
        (8, 32, true, 4096, 1024, GemvKernel::Auto),
        (8, 32, false, 512, 384, GemvKernel::Auto),
    ];
    for (bits, gs, act_order, k, n, layout) in cases {
        let (experts, tokens, topk) = (8usize, 5usize, 2usize);
        let ws: Vec<GptqWeight> = (0..experts)
            .map(|e| random_gptq(bits, gs, k, n, act_order, 77 + e as u64))
            .collect();
        let dws = ws
            .iter()
            .map(|w| dev.upload_expert_as(&prepare(w).unwrap(), layout).unwrap())
            .collect();
        let table = dev.upload_experts(dws).unwrap_or_else(|e| panic!("{e}"));
        let tc = dev.moe_uses_tensor_cores::<bf16>(&table);
        let want_tc = layout == GemvKernel::Auto && !(bits == 3 && gs == 32);
        assert_eq!(
            tc, want_tc,
            "MoE {bits}-bit g{gs} act-order {act_order} {k}x{n} {layout:?}: tensor cores"
        );
        let mut rng = Rng::new(bits as u64);
        let mut ids = Vec::new();
        let mut rw = Vec::new();
        for _ in 0..tokens {
            let a = rng.below(experts as u64) as i32;
            let b = (a + 1 + rng.below(experts as u64 - 1) as i32) % experts as i32;
            ids.extend([a, b]);
            let p = rng.uniform() as f32;
            rw.extend([p, 1.0 - p]);
        }
        let pairs = tokens * topk;
        let xs: Vec<bf16> = random_activations(tokens * k, 5)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let x64: Vec<f64> = xs.iter().map(|v| v.to_f32() as f64).collect();
        let (xd, idd, rwd) = (
            dev.upload(&xs).unwrap(),
            dev.upload(&ids).unwrap(),
            dev.upload(&rw).unwrap(),
        );
        // Gate/up style: pair p reads token p / topk.
        let mut yd = dev.upload(&vec![f32::NAN; pairs * n]).unwrap();
        dev.moe_gemv(&xd, topk, &table, &idd, None, pairs, &mut yd)
            .unwrap_or_else(|e| panic!("{e}"));
        let y = dev.download(&yd).unwrap();
        let mut r = vec![0f64; pairs * n];
        for p in 0..pairs {
            let t = p / topk;
            let rr = reference(&x64[t * k..(t + 1) * k], 1, &ws[ids[p] as usize]);
            r[p * n..(p + 1) * n].copy_from_slice(&rr);
        }
        let e1 = rel_err(&y, &r);
        // Down style: one input row per pair, scaled by the routing weight, then summed per token.
        let xp: Vec<bf16> = random_activations(pairs * k, 6)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let xp64: Vec<f64> = xp.iter().map(|v| v.to_f32() as f64).collect();
        let xpd = dev.upload(&xp).unwrap();
        let mut ypd = dev.upload(&vec![f32::NAN; pairs * n]).unwrap();
        dev.moe_gemv(&xpd, 1, &table, &idd, Some(&rwd), pairs, &mut ypd)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut yt = dev.upload(&vec![f32::NAN; tokens * n]).unwrap();
        dev.moe_combine(&ypd, topk, tokens, n, &mut yt)
            .unwrap_or_else(|e| panic!("{e}"));
        let y2 = dev.download(&yt).unwrap();
        let mut r2 = vec![0f64; tokens * n];
        for p in 0..pairs {
            let rr = reference(&xp64[p * k..(p + 1) * k], 1, &ws[ids[p] as usize]);
            for c in 0..n {
                r2[(p / topk) * n + c] += rw[p] as f64 * rr[c];
            }
        }
        let e2 = rel_err(&y2, &r2);
        eprintln!("MoE {bits}-bit g{gs} act-order {act_order} {k}x{n} (tensor cores: {tc}): gate/up rel err {e1:.2e}, down+combine rel err {e2:.2e}");
        assert!(
            e1 < REL_TOL && e2 < REL_TOL,
            "MoE {bits}-bit g{gs} act-order {act_order} {k}x{n} (tensor cores: {tc}): {e1:.3e} / {e2:.3e}"
        );
    }
    // A layer with tile-major words is refused as an expert, with the reason.
    let p = prepare(&random_gptq(3, 128, 512, 2080, false, 9)).unwrap();
    let tiled = dev.upload_prepared(&p).unwrap();
    assert_eq!(tiled.word_layout(), Some(WordLayout::TileMajor));
    let e = dev.upload_experts(vec![tiled]).unwrap_err().to_string();
    assert!(e.contains("experts") && e.contains("tile-major"), "{e}");
}

/// Running the same product twice gives identical bits (the split-K sum has a fixed order).
#[test]
#[ignore = "needs a CUDA device"]
fn gemv_is_deterministic() {
    let dev = device();
    let w = random_gptq(4, 128, 4096, 4096, true, 9);
    let dw = dev.upload_gptq(&w).unwrap();
    let xs: Vec<f16> = random_activations(4096, 3)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let xd = dev.upload(&xs).unwrap();
    let mut outs = Vec::new();
    for _ in 0..3 {
        let mut yd = dev.upload(&vec![f32::NAN; 4096]).unwrap();
        dev.qmatmul(&xd, 1, &dw, &mut yd).unwrap();
        outs.push(dev.download(&yd).unwrap());
    }
    assert!(outs.windows(2).all(|p| p[0]
        .iter()
        .zip(&p[1])
        .all(|(a, b)| a.to_bits() == b.to_bits())));
}

/// Stream-order checks: the result of one call on an idle device (`ordinary`) is within the error
/// bound of the f64 reference, and what the queued calls left (`queued`) is that, bit for bit.
fn check_queued(
    what: &str,
    queued: &[f32],
    ordinary: &[f32],
    x64: &[f64],
    m: usize,
    w: &GptqWeight,
) {
    let e = rel_err(ordinary, &reference(x64, m, w));
    eprintln!("{what}: rel err {e:.2e}");
    assert!(e < REL_TOL, "{what}: rel err {e:.3e} >= {REL_TOL}");
    assert!(
        queued
            .iter()
            .zip(ordinary)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: back-to-back calls differ from one call on an idle device"
    );
}

/// Programmatic dependent launch keeps stream order: two layers written into one output back to
/// back, eight times (each launch may start while the one before runs), leave the second layer's
/// result, bit for bit what the second layer gives when launched on an idle device. The second
/// layer has act-order, so its X comes from the permutation kernel launched right before it.
#[test]
#[ignore = "needs a CUDA device"]
fn dependent_launches_keep_stream_order() {
    let dev = device();
    eprintln!("dependent launch: {}", dev.dependent_launch());
    let (k, n) = (4096, 14336);
    let upload = |w: &GptqWeight| dev.upload_prepared(&prepare(w).unwrap()).unwrap();
    let wa = upload(&random_gptq(4, 128, k, n, false, 31));
    let wb_host = random_gptq(4, 128, k, n, true, 32);
    let wb = upload(&wb_host);
    for m in [1, 16] {
        let xs: Vec<f16> = random_activations(m * k, 33 + m as u64)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let xd = dev.upload(&xs).unwrap();
        let mut yd = dev.upload(&vec![f32::NAN; m * n]).unwrap();
        for _ in 0..8 {
            dev.qmatmul(&xd, m, &wa, &mut yd).unwrap();
            dev.qmatmul(&xd, m, &wb, &mut yd).unwrap();
        }
        let queued = dev.download(&yd).unwrap();
        let mut yd = dev.upload(&vec![f32::NAN; m * n]).unwrap();
        dev.synchronize().unwrap();
        dev.qmatmul(&xd, m, &wb, &mut yd).unwrap();
        let ordinary = dev.download(&yd).unwrap();
        let x64: Vec<f64> = xs.iter().map(|v| v.to_f64()).collect();
        check_queued(&format!("M = {m}"), &queued, &ordinary, &x64, m, &wb_host);
    }
}

/// The GEMM path's launches of its own are dependent launches: the copy of bf16 X to f16 and the
/// dequantization may start while the previous call's cuBLAS product still reads the buffers they
/// are about to overwrite. Calls on two layers with different X, queued back to back eight times,
/// must leave what each gives on an idle device, bit for bit: layers dequantized once
/// (`dense_matmul`, the copy alone) and dequantized on every call (`qmatmul_gemm`).
#[test]
#[ignore = "needs a CUDA device"]
fn dependent_gemm_path_keeps_stream_order() {
    let dev = device();
    eprintln!("dependent launch: {}", dev.dependent_launch());
    let (m, k, n) = (256, 4096, 1024);
    let hosts = [
        random_gptq(4, 128, k, n, true, 41),
        random_gptq(4, 128, k, n, false, 44),
    ];
    let ws: Vec<_> = hosts
        .iter()
        .map(|w| dev.upload_prepared(&prepare(w).unwrap()).unwrap())
        .collect();
    let dense: Vec<_> = ws.iter().map(|w| dev.prepare_dense(w).unwrap()).collect();
    let xs: Vec<Vec<bf16>> = [42, 43]
        .iter()
        .map(|&seed| {
            random_activations(m * k, seed)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        })
        .collect();
    let xd: Vec<_> = xs.iter().map(|x| dev.upload(x).unwrap()).collect();
    for prepared in [true, false] {
        let call = |i: usize, y: &mut _| {
            if prepared {
                dev.dense_matmul(&xd[i], m, &dense[i], y)
            } else {
                dev.qmatmul_gemm(&xd[i], m, &ws[i], y)
            }
            .unwrap()
        };
        let mut yd: Vec<_> = (0..2)
            .map(|_| dev.upload(&vec![f32::NAN; m * n]).unwrap())
            .collect();
        for _ in 0..8 {
            for (i, y) in yd.iter_mut().enumerate() {
                call(i, y);
            }
        }
        for (i, y) in yd.iter().enumerate() {
            let queued = dev.download(y).unwrap();
            let mut yo = dev.upload(&vec![f32::NAN; m * n]).unwrap();
            dev.synchronize().unwrap();
            call(i, &mut yo);
            let ordinary = dev.download(&yo).unwrap();
            let x64: Vec<f64> = xs[i].iter().map(|v| v.to_f32() as f64).collect();
            let what = format!("prepared {prepared}, layer {i}");
            check_queued(&what, &queued, &ordinary, &x64, m, &hosts[i]);
        }
    }
}

/// `bench reads`' pieces: the GEMV's launch as the plan makes it, and the read-only launches that
/// imitate it (residency held to the GEMV's, buffers and depths checked before launching), as
/// ordinary and as dependent launches, and the streaming read of the same bytes.
#[test]
#[ignore = "needs a CUDA device"]
fn read_only_runs_imitate_the_gemv_launch() {
    use runtime::cuda::timing::{ReadRuns, Timing};
    let dev = device();
    let (k, n) = (4096, 4096);
    for bits in [4u32, 3, 8] {
        let w = dev
            .upload_prepared(&prepare(&random_gptq(bits, 128, k, n, false, 7)).unwrap())
            .unwrap();
        let plan = dev
            .gemv_launch_shape::<f16>(&w, 1)
            .unwrap()
            .expect("the GEMV of one row runs on the tensor cores");
        eprintln!("{bits}-bit: {plan:?}");
        assert!(plan.register_pipelined, "{plan:?}");
        assert_eq!(plan.blocks, n / 32, "{plan:?}");
        assert_eq!(plan.warps_per_block, plan.splits, "{plan:?}");
        assert!(plan.splits * plan.tiles_per_warp >= k / 32, "{plan:?}");
        assert!(
            plan.resident_blocks_per_sm >= 1 && plan.tiles_in_flight >= 1,
            "{plan:?}"
        );
        assert!(dev.gemv_launch_shape::<f16>(&w, 64).unwrap().is_none());

        let b = bits as usize;
        let runs = ReadRuns {
            blocks: plan.blocks,
            warps: plan.warps_per_block,
            pieces_per_strip: k * b / 128,
            pieces_per_warp: plan.tiles_per_warp * b / 4,
            depth: 2,
            time_major: false,
            blocks_per_sm: plan.resident_blocks_per_sm,
            dependent: false,
        };
        // every piece of the layer's packed words once
        assert_eq!(runs.buffer_bytes(), k * n * b / 8);
        let tm = Timing::one_by_one(1, 3);
        for (time_major, dependent) in [(false, false), (true, false), (false, true), (true, true)]
        {
            let r = ReadRuns {
                time_major,
                dependent,
                ..runs
            };
            let bufs = vec![dev.zeros::<u8>(r.buffer_bytes()).unwrap()];
            let (ms, resident) = dev.read_runs_ms(&bufs, r, tm).unwrap();
            assert!(ms > 0.0 && ms.is_finite());
            assert_eq!(resident, plan.resident_blocks_per_sm, "{r:?}");
        }
        // The streaming read of the same bytes, as an ordinary and as a dependent launch (the
        // latter back to back, where it overlaps the previous launch).
        let words: Vec<_> = (0..2)
            .map(|_| dev.zeros::<u8>(runs.buffer_bytes()).unwrap())
            .collect();
        let queued = Timing {
            warmup: 1,
            iters: 3,
            back_to_back: 4,
        };
        for (dependent, t) in [(false, tm), (true, queued)] {
            let ms = dev.stream_read_ms(&words, dependent, t).unwrap();
            assert!(ms > 0.0 && ms.is_finite(), "{dependent}: {ms}");
        }
        let short = vec![dev.zeros::<u8>(runs.buffer_bytes() - 512).unwrap()];
        let e = dev.read_runs_ms(&short, runs, tm).unwrap_err().to_string();
        assert!(e.contains("read-only launch buffer"), "{e}");
        let bufs = vec![dev.zeros::<u8>(runs.buffer_bytes()).unwrap()];
        let e = dev
            .read_runs_ms(&bufs, ReadRuns { depth: 5, ..runs }, tm)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pieces in flight"), "{e}");
    }
}

/// Without a device, asking for one gives a named error, never a panic (runs everywhere).
#[test]
fn missing_cuda_is_a_named_error() {
    match CudaDevice::new(0) {
        Ok(d) => eprintln!("CUDA present ({}); nothing to check here", d.name()),
        Err(e) => {
            let s = e.to_string();
            eprintln!("no CUDA: {s}");
            assert!(
                s.contains("could not load")
                    || s.contains("include directory")
                    || s.contains("does not exist"),
                "{s}"
            );
        }
    }
}
