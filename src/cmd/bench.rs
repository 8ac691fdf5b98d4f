//! `mixtral-gptq bench kernels`: times the CUDA GPTQ kernels against cuBLAS and the copy bandwidth
//! measured in the same run, and prints a Markdown table (BENCHMARKS.md, "CUDA kernels").

use std::process::ExitCode;

use anyhow::{bail, Context};
use runtime::cuda::gptq::{prepare, ActDtype, DeviceGptq};
use runtime::cuda::random::{random_activations, random_gptq};
use runtime::cuda::{bf16, f16, CudaDevice};

/// Arguments of `mixtral-gptq bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to benchmark.
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchWhat {
    /// CUDA GPTQ kernels: time, bandwidth, ratio to cuBLAS, per shape, bits, group size and M.
    Kernels(KernelArgs),
}

/// Arguments of `mixtral-gptq bench kernels`.
#[derive(Debug, clap::Args)]
pub struct KernelArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Shapes as KxN, comma-separated (default: Mixtral's four).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096x14336,14336x4096,4096x4096,4096x1024"
    )]
    pub shapes: Vec<String>,
    /// Bit widths.
    #[arg(long, value_delimiter = ',', default_value = "4,3,8")]
    pub bits: Vec<u32>,
    /// Rows of X for the GEMV path (X in f16, compared with cuBLAS f16).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub m: Vec<usize>,
    /// Rows of X for the GEMM path (X in bf16, compared with cuBLAS bf16 dense); 0 skips it.
    #[arg(long, default_value_t = 2048)]
    pub gemm_m: usize,
    /// Timed runs per case (median reported).
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Warm-up runs per case.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Experts for the fused-MoE timing (0 skips it).
    #[arg(long, default_value_t = 8)]
    pub moe_experts: usize,
    /// Bytes the rotated input copies of one case should span at least (defeats the 50 MB L2).
    #[arg(long, default_value_t = 256 << 20)]
    pub rotate_bytes: usize,
}

fn parse_shape(s: &str) -> anyhow::Result<(usize, usize)> {
    let (k, n) = s
        .split_once('x')
        .with_context(|| format!("shape `{s}`: expected KxN"))?;
    Ok((
        k.trim()
            .parse()
            .with_context(|| format!("shape `{s}`: K"))?,
        n.trim()
            .parse()
            .with_context(|| format!("shape `{s}`: N"))?,
    ))
}

fn to_dtype<T: ActDtype>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// Runs `mixtral-gptq bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        BenchWhat::Kernels(a) => kernels(a),
    }
}

fn kernels(a: KernelArgs) -> anyhow::Result<ExitCode> {
    let dev = CudaDevice::new(a.device).context("opening the CUDA device")?;
    for &b in &a.bits {
        if ![3, 4, 8].contains(&b) {
            bail!("--bits: {b} is not one of 3, 4, 8");
        }
    }
    let shapes: Vec<(usize, usize)> = a
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<anyhow::Result<_>>()?;
    let copy = dev
        .copy_bandwidth_gbs(1 << 30, 20)
        .context("measuring copy bandwidth")?;
    println!(
        "device: {} ({}, {} SMs); measured device-to-device copy: {copy:.0} GB/s (read + write)",
        dev.name(),
        dev.arch(),
        dev.sm_count()
    );
    println!("times are medians of {} runs after {} warm-up runs, CUDA events, inputs rotated over >= {} MiB", a.iters, a.warmup, a.rotate_bytes >> 20);
    println!();
    println!("| K x N | bits | group | act-order | M | X | path | time (us) | GB/s | % of copy | cuBLAS (us) | cuBLAS / ours |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rng_seed = 1u64;
    for &(k, n) in &shapes {
        // cuBLAS baselines for this shape: f16 at each GEMV M, bf16 at the GEMM M.
        let dense_bytes = k * n * 2;
        let dcopies = a.rotate_bytes.div_ceil(dense_bytes).clamp(2, 32);
        let wh = random_activations(k * n, 11);
        let mut base_f16 = Vec::new();
        {
            let w16: Vec<f16> = to_dtype(&wh);
            let ws: Vec<_> = (0..dcopies)
                .map(|_| dev.upload(&w16))
                .collect::<Result<_, _>>()?;
            for &m in &a.m {
                let x: Vec<f16> = to_dtype(&random_activations(m * k, 12));
                let xd = dev.upload(&x)?;
                let mut y = dev.zeros::<f32>(m * n)?;
                let t = dev.median_ms(a.warmup, a.iters, |i| {
                    dev.dense_gemm(&xd, m, &ws[i % dcopies], k, n, &mut y)
                })?;
                base_f16.push(t);
            }
        }
        let mut base_bf16 = None;
        if a.gemm_m > 0 {
            let w16: Vec<bf16> = to_dtype(&wh);
            let ws: Vec<_> = (0..2).map(|_| dev.upload(&w16)).collect::<Result<_, _>>()?;
            let m = a.gemm_m;
            let x: Vec<bf16> = to_dtype(&random_activations(m * k, 13));
            let xd = dev.upload(&x)?;
            let mut y = dev.zeros::<f32>(m * n)?;
            let t = dev.median_ms(a.warmup, a.iters.min(30), |i| {
                dev.dense_gemm(&xd, m, &ws[i % 2], k, n, &mut y)
            })?;
            println!("| {k} x {n} | dense | | | {m} | bf16 | cuBLAS bf16 | {:.1} | | | | {:.0} TFLOP/s |", t * 1e3, 2.0 * (m * k * n) as f64 / (t * 1e-3) / 1e12);
            base_bf16 = Some(t);
        }
        for &bits in &a.bits {
            for (gs, act) in [(128, false), (128, true), (32, false), (-1, false)] {
                rng_seed += 1;
                let w = random_gptq(bits, gs, k, n, act, rng_seed);
                let p = prepare(&w)?;
                let probe: DeviceGptq = dev.upload_prepared(&p)?;
                let wbytes = probe.checkpoint_bytes();
                let copies = a.rotate_bytes.div_ceil(wbytes).clamp(2, 64);
                let mut ws = vec![probe];
                for _ in 1..copies {
                    ws.push(dev.upload_prepared(&p)?);
                }
                let group = if gs < 0 {
                    "-1".to_string()
                } else {
                    gs.to_string()
                };
                for (mi, &m) in a.m.iter().enumerate() {
                    let xc = 8usize;
                    let xs: Vec<_> = (0..xc)
                        .map(|c| {
                            dev.upload(&to_dtype::<f16>(&random_activations(m * k, 100 + c as u64)))
                        })
                        .collect::<Result<_, _>>()?;
                    let mut y = dev.zeros::<f32>(m * n)?;
                    let t = dev.median_ms(a.warmup, a.iters, |i| {
                        dev.qmatmul(&xs[i % xc], m, &ws[i % copies], &mut y)
                    })?;
                    let bytes = wbytes + m * k * 2 + m * n * 4;
                    let gbs = bytes as f64 / (t * 1e-3) / 1e9;
                    let path = if m <= runtime::cuda::GEMV_MAX_ROWS {
                        "GEMV"
                    } else {
                        "dequant+cuBLAS"
                    };
                    println!(
                        "| {k} x {n} | {bits} | {group} | {} | {m} | f16 | {path} | {:.2} | {gbs:.0} | {:.0} % | {:.2} | {:.2}x |",
                        if act { "yes" } else { "no" },
                        t * 1e3,
                        100.0 * gbs / copy,
                        base_f16[mi] * 1e3,
                        base_f16[mi] / t
                    );
                }
                if let (Some(tb), true) = (base_bf16, gs == 128) {
                    let m = a.gemm_m;
                    let x: Vec<bf16> = to_dtype(&random_activations(m * k, 14));
                    let xd = dev.upload(&x)?;
                    let mut y = dev.zeros::<f32>(m * n)?;
                    let t = dev.median_ms(a.warmup, a.iters.min(30), |i| {
                        dev.qmatmul(&xd, m, &ws[i % copies], &mut y)
                    })?;
                    println!(
                        "| {k} x {n} | {bits} | {group} | {} | {m} | bf16 | dequant+cuBLAS | {:.1} | | | {:.1} (bf16) | {:.2} of dense |",
                        if act { "yes" } else { "no" },
                        t * 1e3,
                        tb * 1e3,
                        tb / t
                    );
                    // Layer-major mode: the layer is dequantized once (timed on its own), then
                    // every call is the bf16 -> f16 conversion of X + cuBLAS f16.
                    let mut dense = dev.prepare_dense(&ws[0])?;
                    let td = dev.median_ms(a.warmup, a.iters.min(30), |i| {
                        dev.dequant_into_dense(&ws[i % copies], &mut dense)
                    })?;
                    let tp = dev.median_ms(a.warmup, a.iters.min(30), |_| {
                        dev.dense_matmul(&xd, m, &dense, &mut y)
                    })?;
                    println!(
                        "| {k} x {n} | {bits} | {group} | {} | {m} | bf16 | prepared dense (dequant once: {:.1} us) | {:.1} | | | {:.1} (bf16) | {:.2} of dense |",
                        if act { "yes" } else { "no" },
                        td * 1e3,
                        tp * 1e3,
                        tb * 1e3,
                        tb / tp
                    );
                }
            }
        }
    }
    if a.moe_experts > 0 {
        moe(&dev, &a, copy)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Fused MoE GEMV at w1's shape (4096 x 14336), 4-bit g128 act-order: one launch for every
/// (token, slot) pair against one qmatmul launch per pair.
fn moe(dev: &CudaDevice, a: &KernelArgs, copy: f64) -> anyhow::Result<()> {
    let (k, n, e, topk) = (4096usize, 14336usize, a.moe_experts, 2usize);
    let experts: Vec<_> = (0..e)
        .map(|i| random_gptq(4, 128, k, n, true, 500 + i as u64))
        .collect();
    let mut dws = Vec::new();
    let mut singles = Vec::new();
    for w in &experts {
        let p = prepare(w)?;
        dws.push(dev.upload_prepared(&p)?);
        singles.push(dev.upload_prepared(&p)?);
    }
    let table = dev.upload_experts(dws)?;
    let wbytes = singles[0].checkpoint_bytes();
    println!();
    println!("| fused MoE, {e} experts of 4096 x 14336, 4-bit g128 act-order | tokens | pairs | time (us) | GB/s (distinct experts read) | % of copy | per-pair qmatmul launches (us) |");
    println!("|---|---|---|---|---|---|---|");
    for tokens in [1usize, 4] {
        let pairs = tokens * topk;
        let ids: Vec<i32> = (0..pairs)
            .map(|p| ((p * 3 + p / topk) % e) as i32)
            .collect();
        let distinct = ids.iter().collect::<std::collections::BTreeSet<_>>().len();
        let idd = dev.upload(&ids)?;
        let x = dev.upload(&to_dtype::<bf16>(&random_activations(tokens * k, 21)))?;
        let mut y = dev.zeros::<f32>(pairs * n)?;
        let t = dev.median_ms(a.warmup, a.iters, |_| {
            dev.moe_gemv(&x, topk, &table, &idd, None, pairs, &mut y)
        })?;
        let xs: Vec<_> = (0..tokens)
            .map(|t| dev.upload(&to_dtype::<bf16>(&random_activations(k, 30 + t as u64))))
            .collect::<Result<_, _>>()?;
        let mut y1 = dev.zeros::<f32>(n)?;
        let t2 = dev.median_ms(a.warmup, a.iters, |_| {
            for p in 0..pairs {
                dev.qmatmul(&xs[p / topk], 1, &singles[ids[p] as usize], &mut y1)?;
            }
            Ok(())
        })?;
        let gbs = (distinct * wbytes) as f64 / (t * 1e-3) / 1e9;
        println!(
            "| | {tokens} | {pairs} | {:.2} | {gbs:.0} | {:.0} % | {:.2} |",
            t * 1e3,
            100.0 * gbs / copy,
            t2 * 1e3
        );
    }
    Ok(())
}
