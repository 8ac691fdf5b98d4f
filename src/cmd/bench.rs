//! `mixtral-gptq bench kernels`: times the CUDA GPTQ kernels against cuBLAS and the copy bandwidth
//! measured in the same run, and prints a Markdown table (BENCHMARKS.md, "CUDA kernels"); `bench
//! reads` ([`reads`]) and `bench eval`.

use std::process::ExitCode;

use anyhow::{bail, Context};
use runtime::cuda::gptq::{mma_eligible, prepare, ActDtype, DeviceGptq, GemvKernel, WordLayout};
use runtime::cuda::random::{random_activations, random_gptq};
use runtime::cuda::timing::Timing;
use runtime::cuda::{bf16, f16, CudaDevice};

pub mod reads;

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
    /// Read-only launches with the tensor-core GEMV's access pattern (its grid, runs and loads in
    /// flight, nothing computed), next to the GEMV and a plain streaming read of the same bytes.
    Reads(reads::ReadsArgs),
    /// Layer-major perplexity throughput on a synthetic full-size Mixtral (or a branch on disk)
    /// against the dense bf16 floor measured in the same run.
    Eval(EvalBenchArgs),
}

/// Arguments of `mixtral-gptq bench eval`.
#[derive(Debug, clap::Args)]
pub struct EvalBenchArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Tokens of the evaluation to time (whole windows of --ctx; wikitext-2's test set is ~330k).
    #[arg(long, default_value_t = 330_000)]
    pub tokens: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Synthetic GPTQ variants as BITS:GROUP (group -1 = one group per row), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4:128,4:32,4:-1,3:128,8:128"
    )]
    pub variants: Vec<String>,
    /// Act-order (`g_idx` a random permutation of the groups) in the synthetic layers.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub act_order: bool,
    /// Decoder layers of the synthetic model (Mixtral-8x7B: 32).
    #[arg(long, default_value_t = 32)]
    pub layers: usize,
    /// Full evaluations per variant (the median is reported).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Tokens per chunk of the layer-major pass.
    #[arg(long, default_value_t = 65_536)]
    pub chunk_tokens: usize,
    /// Rows per expert GEMM call.
    #[arg(long, default_value_t = 32_768)]
    pub moe_rows: usize,
    /// Use the f32 reference attention kernel instead of the tensor-core one.
    #[arg(long)]
    pub reference_attention: bool,
    /// Time a model or branch directory instead of synthetic layers (random token ids).
    #[arg(long, value_name = "DIR")]
    pub model: Option<std::path::PathBuf>,
}

/// Which layers a kernel benchmark times, and on which device (`bench kernels`, `bench reads`).
#[derive(Debug, clap::Args)]
pub struct LayerArgs {
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
    /// Bit widths (3, 4, 8).
    #[arg(long, value_delimiter = ',', default_value = "4,3,8")]
    pub bits: Vec<u32>,
}

impl LayerArgs {
    /// Opens the device and measures its copy bandwidth, printing both.
    fn open_device(&self) -> anyhow::Result<(std::sync::Arc<CudaDevice>, f64)> {
        let dev = CudaDevice::new(self.device).context("opening the CUDA device")?;
        let copy = dev
            .copy_bandwidth_gbs(1 << 30, 20)
            .context("measuring copy bandwidth")?;
        println!(
            "device: {} ({}, {} SMs); measured device-to-device copy: {copy:.0} GB/s (read + write)",
            dev.name(),
            dev.arch(),
            dev.sm_count()
        );
        Ok((dev, copy))
    }

    /// The shapes as (K, N); a usage error names a malformed one. The widths are checked too.
    fn shapes(&self) -> anyhow::Result<Vec<(usize, usize)>> {
        check_bits("--bits", &self.bits)?;
        self.shapes.iter().map(|s| parse_shape(s)).collect()
    }
}

/// How a kernel benchmark times each case (`bench kernels`, `bench reads`).
#[derive(Debug, clap::Args)]
pub struct TimingArgs {
    /// Timed runs per case (median reported).
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Warm-up runs per case.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Runs queued back to back between one pair of CUDA events (each timed sample is their mean).
    /// 1 times every run alone between its own events, which adds the fixed cost of an event pair
    /// around a launch to every figure; 16 or more gives the steady state of a stream of launches,
    /// as a decoding step queues them. Applies to every timed case (ours, cuBLAS, read-only, empty).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub back_to_back: u64,
    /// Bytes the rotated input copies of one case should span at least (defeats the 50 MB L2).
    #[arg(long, default_value_t = 256 << 20)]
    pub rotate_bytes: usize,
}

impl TimingArgs {
    /// How each case is timed: `iters` samples after the warm-up, `--back-to-back` runs each.
    fn timing(&self, iters: usize) -> Timing {
        Timing {
            warmup: self.warmup,
            iters,
            back_to_back: self.back_to_back as usize,
        }
    }

    /// The line that says how the figures below were timed.
    fn describe(&self) -> String {
        if self.back_to_back == 1 {
            format!("times are medians of {} runs after {} warm-up runs, each run between its own CUDA events, inputs rotated over >= {} MiB", self.iters, self.warmup, self.rotate_bytes >> 20)
        } else {
            format!("times are medians of {} samples after {} warm-up runs, a sample being the mean of {} runs queued back to back between one pair of CUDA events, inputs rotated over >= {} MiB", self.iters, self.warmup, self.back_to_back, self.rotate_bytes >> 20)
        }
    }
}

/// Arguments of `mixtral-gptq bench kernels`.
#[derive(Debug, clap::Args)]
pub struct KernelArgs {
    #[command(flatten)]
    pub layers: LayerArgs,
    /// Rows of X for the GEMV path (X in f16, compared with cuBLAS f16).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub m: Vec<usize>,
    /// Rows of X for the GEMM path (X in bf16, compared with cuBLAS bf16 dense); 0 skips it.
    #[arg(long, default_value_t = 2048)]
    pub gemm_m: usize,
    #[command(flatten)]
    pub timing: TimingArgs,
    /// Experts for the fused-MoE timing (0 skips it).
    #[arg(long, default_value_t = 8)]
    pub moe_experts: usize,
    /// Bit widths of the fused-MoE timing's experts (act-order).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub moe_bits: Vec<u32>,
    /// Group sizes of the fused-MoE timing's experts (act-order; -1: per channel).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128",
        allow_hyphen_values = true
    )]
    pub moe_groups: Vec<i32>,
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
        BenchWhat::Reads(a) => reads::run(a),
        BenchWhat::Eval(a) => eval_bench(a),
    }
}

fn kernels(a: KernelArgs) -> anyhow::Result<ExitCode> {
    let shapes = a.layers.shapes()?;
    check_bits("--moe-bits", &a.moe_bits)?;
    // (the fused MoE's experts are 4096 x 14336 and 14336 x 4096)
    if let Some(g) = a
        .moe_groups
        .iter()
        .find(|&&g| g != -1 && (g <= 0 || 4096 % g != 0 || 14336 % g != 0))
    {
        bail!("--moe-groups: {g} is neither -1 (per channel) nor a group size dividing 4096 and 14336");
    }
    let (dev, copy) = a.layers.open_device()?;
    let tm = a.timing.timing(a.timing.iters);
    let tm30 = a.timing.timing(a.timing.iters.min(30));
    println!("{}", a.timing.describe());
    let empty = dev.empty_kernel(tm)?;
    println!("an empty kernel takes {:.2} us, timed the same way, and {:.1} us of host time to queue; \"read-only\" is one kernel that only streams the layer's bytes (same rotation), as an ordinary launch and, in the last column, as a dependent launch under the GEMV's rules (it issues its first loads, then waits for the previous launch); \"host\" is the host's time to queue one call", empty.device_ms * 1e3, empty.host_ms * 1e3);
    if dev.dependent_launch() {
        println!("the tensor-core GEMV and fused MoE run as programmatic dependent launches (each starts while the previous kernel finishes); \"no PDL\" times ours again with it off (ordinary launches; act-order X then gathered inside the kernel at small M)");
    } else {
        println!("programmatic dependent launch is off (before sm_90, or MIXTRAL_GPTQ_DEPENDENT_LAUNCH=0)");
    }
    println!();
    println!("| K x N | bits | group | act-order | M | X | path | time (us) | host (us) | GB/s | % of copy | cuBLAS (us) | cuBLAS / ours | other GEMV kernel (us) | other / ours | read-only (us) | read-only / ours | no PDL (us) | read-only as a dependent launch (us) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rng_seed = 1u64;
    for &(k, n) in &shapes {
        // cuBLAS baselines for this shape: f16 at each GEMV M, bf16 at the GEMM M.
        let dense_bytes = k * n * 2;
        let dcopies = a.timing.rotate_bytes.div_ceil(dense_bytes).clamp(2, 32);
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
                let t = dev.median_ms(tm, |i| {
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
            let t = dev.median_ms(tm30, |i| dev.dense_gemm(&xd, m, &ws[i % 2], k, n, &mut y))?;
            println!("| {k} x {n} | dense | | | {m} | bf16 | cuBLAS bf16 | {:.1} | | | | | {:.0} TFLOP/s |", t * 1e3, 2.0 * (m * k * n) as f64 / (t * 1e-3) / 1e12);
            base_bf16 = Some(t);
        }
        for &bits in &a.layers.bits {
            for (gs, act) in [(128, false), (128, true), (32, false), (-1, false)] {
                rng_seed += 1;
                let w = random_gptq(bits, gs, k, n, act, rng_seed);
                let p = prepare(&w)?;
                let ws = rotated_layers(&dev, &p, a.timing.rotate_bytes)?;
                let (wbytes, copies) = (ws[0].checkpoint_bytes(), ws.len());
                // The other GEMV kernel on the same layer, where both can run it: the tensor-core one
                // where the automatic choice is scalar and the reverse (each on its own layout).
                let other = if dev.uses_mma_gemv(&ws[0]) {
                    Some(GemvKernel::Scalar)
                } else if mma_eligible(&p) {
                    Some(GemvKernel::TensorCore)
                } else {
                    None
                };
                let other_ws: Vec<DeviceGptq> = match other {
                    Some(kind) => (0..copies)
                        .map(|_| dev.upload_prepared_as(&p, kind))
                        .collect::<Result<_, _>>()?,
                    None => Vec::new(),
                };
                // The floor for this layer's bytes: one kernel that only reads as many bytes, as
                // an ordinary launch and under the GEMV's dependent-launch rules.
                let (read_only, read_only_dep) = {
                    let bufs: Vec<_> = (0..copies)
                        .map(|_| dev.zeros::<u8>(wbytes.next_multiple_of(16)))
                        .collect::<Result<_, _>>()?;
                    let dep = if dev.dependent_launch() {
                        Some(dev.stream_read_ms(&bufs, true, tm)?)
                    } else {
                        None
                    };
                    (dev.stream_read_ms(&bufs, false, tm)?, dep)
                };
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
                    let mut run = |i: usize| dev.qmatmul(&xs[i % xc], m, &ws[i % copies], &mut y);
                    let timed = dev.median_times(tm, &mut run)?;
                    let t = timed.device_ms;
                    let no_pdl = without_dependent_launch(&dev, || dev.median_ms(tm, &mut run))?;
                    let bytes = wbytes + m * k * 2 + m * n * 4;
                    let gbs = bytes as f64 / (t * 1e-3) / 1e9;
                    let gemv = dev.qmatmul_uses_gemv(&ws[0], m);
                    let mma = gemv && dev.gemv_uses_tensor_cores(&ws[0], m);
                    let path = match (gemv, mma) {
                        (true, true) => "tensor-core GEMV",
                        (true, false) => "scalar GEMV",
                        _ => "dequant+cuBLAS",
                    };
                    let tile_major = ws[0].word_layout() == Some(WordLayout::TileMajor);
                    let path = format!("{path}{}", if tile_major { ", tile-major" } else { "" });
                    // The other GEMV kernel on the same inputs (the choice `GemvKernel::Auto` did not make).
                    let other_time = if gemv && !other_ws.is_empty() {
                        let ts = dev.median_ms(tm, |i| {
                            dev.qmatmul_gemv(&xs[i % xc], m, &other_ws[i % copies], &mut y)
                        })?;
                        format!("{:.2} | {:.2}x", ts * 1e3, ts / t)
                    } else {
                        " | ".to_string()
                    };
                    println!(
                        "| {k} x {n} | {bits} | {group} | {} | {m} | f16 | {path} | {:.2} | {:.1} | {gbs:.0} | {:.0} % | {:.2} | {:.2}x | {other_time} | {:.2} | {:.2} | {} | {} |",
                        if act { "yes" } else { "no" },
                        t * 1e3,
                        timed.host_ms * 1e3,
                        100.0 * gbs / copy,
                        base_f16[mi] * 1e3,
                        base_f16[mi] / t,
                        read_only * 1e3,
                        read_only / t,
                        us_or_blank(no_pdl),
                        us_or_blank(read_only_dep)
                    );
                }
                if let (Some(tb), true) = (base_bf16, gs == 128) {
                    let m = a.gemm_m;
                    // One set of activations, uploaded as bf16 here and as f16 below.
                    let xa = random_activations(m * k, 14);
                    let x: Vec<bf16> = to_dtype(&xa);
                    let xd = dev.upload(&x)?;
                    let mut y = dev.zeros::<f32>(m * n)?;
                    // One row per way of running the product (X's dtype, path, time in ms).
                    let row = |xt: &str, path: &str, t: f64| {
                        println!(
                            "| {k} x {n} | {bits} | {group} | {} | {m} | {xt} | {path} | {:.1} | | | | {:.1} (bf16) | {:.2} of dense | | | | | |",
                            if act { "yes" } else { "no" },
                            t * 1e3,
                            tb * 1e3,
                            tb / t
                        )
                    };
                    let t =
                        dev.median_ms(tm30, |i| dev.qmatmul(&xd, m, &ws[i % copies], &mut y))?;
                    row("bf16", "dequant+cuBLAS", t);
                    // Layer-major mode: the layer is dequantized once (timed on its own), then
                    // every call is the bf16 -> f16 conversion of X + cuBLAS f16.
                    let mut dense = dev.prepare_dense(&ws[0])?;
                    let td = dev.median_ms(tm30, |i| {
                        dev.dequant_into_dense(&ws[i % copies], &mut dense)
                    })?;
                    let tp = dev.median_ms(tm30, |_| dev.dense_matmul(&xd, m, &dense, &mut y))?;
                    row(
                        "bf16",
                        &format!("prepared dense (dequant once: {:.1} us)", td * 1e3),
                        tp,
                    );
                    // The same with f16 X, which needs no conversion: the difference is what the
                    // bf16 -> f16 copy of X costs.
                    let xh: Vec<f16> = to_dtype(&xa);
                    let xhd = dev.upload(&xh)?;
                    let th = dev.median_ms(tm30, |_| dev.dense_matmul(&xhd, m, &dense, &mut y))?;
                    row("f16", "prepared dense", th);
                }
            }
        }
    }
    if a.moe_experts > 0 {
        moe(&dev, &a, copy)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A usage error unless every width of `flag` is 3, 4 or 8.
fn check_bits(flag: &str, bits: &[u32]) -> anyhow::Result<()> {
    if let Some(b) = bits.iter().find(|b| ![3, 4, 8].contains(*b)) {
        bail!("{flag}: {b} is not one of 3, 4, 8");
    }
    Ok(())
}

/// Copies of one prepared layer on the device, enough to span `rotate_bytes` (2 to 64), so that
/// timed runs taking them in turn are not served by the cache.
fn rotated_layers(
    dev: &CudaDevice,
    p: &runtime::cuda::gptq::PreparedGptq,
    rotate_bytes: usize,
) -> anyhow::Result<Vec<DeviceGptq>> {
    let first = dev.upload_prepared(p)?;
    let copies = rotate_bytes.div_ceil(first.checkpoint_bytes()).clamp(2, 64);
    let mut ws = vec![first];
    for _ in 1..copies {
        ws.push(dev.upload_prepared(p)?);
    }
    Ok(ws)
}

/// `time()` again with programmatic dependent launch off, where it is on (then back on).
fn without_dependent_launch(
    dev: &CudaDevice,
    time: impl FnOnce() -> runtime::cuda::Result<f64>,
) -> anyhow::Result<Option<f64>> {
    if !dev.dependent_launch() {
        return Ok(None);
    }
    dev.set_dependent_launch(false);
    let t = time();
    dev.set_dependent_launch(true);
    Ok(Some(t?))
}

/// Milliseconds as microseconds with two decimals, or nothing.
fn us_or_blank(ms: Option<f64>) -> String {
    ms.map(|t| format!("{:.2}", t * 1e3)).unwrap_or_default()
}

/// Fused MoE GEMV at the experts' two shapes (w1/w3: 4096 x 14336, w2: 14336 x 4096), act-order
/// at each of `--moe-bits` and `--moe-groups`: one launch for every (token, slot) pair against one
/// qmatmul launch per pair.
fn moe(dev: &CudaDevice, a: &KernelArgs, copy: f64) -> anyhow::Result<()> {
    let (e, topk) = (a.moe_experts, 2usize);
    println!();
    println!("| fused MoE, {e} experts, act-order | bits | group | kernel | tokens | pairs | time (us) | GB/s (distinct experts read) | % of copy | per-pair qmatmul launches (us) | scalar fused kernel (us) | no PDL (us) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &bits in &a.moe_bits {
        for &group in &a.moe_groups {
            for (k, n) in [(4096usize, 14336usize), (14336, 4096)] {
                moe_shape(dev, a, copy, (k, n, e, topk), (bits, group))?;
            }
        }
    }
    Ok(())
}

/// The rows of [`moe`] at one expert shape.
fn moe_shape(
    dev: &CudaDevice,
    a: &KernelArgs,
    copy: f64,
    (k, n, e, topk): (usize, usize, usize, usize),
    (bits, group): (u32, i32),
) -> anyhow::Result<()> {
    let experts: Vec<_> = (0..e)
        .map(|i| random_gptq(bits, group, k, n, true, 500 + i as u64))
        .collect();
    let mut dws = Vec::new();
    let mut scalar_dws = Vec::new();
    let mut singles = Vec::new();
    for w in &experts {
        let p = prepare(w)?;
        dws.push(dev.upload_expert_as(&p, GemvKernel::Auto)?);
        scalar_dws.push(dev.upload_expert_as(&p, GemvKernel::Scalar)?);
        singles.push(dev.upload_prepared(&p)?);
    }
    let table = dev.upload_experts(dws)?;
    // The same experts in the scalar kernel's layout: the scalar fused kernel, for comparison.
    let scalar_table = dev.upload_experts(scalar_dws)?;
    let kernel = if dev.moe_uses_tensor_cores::<bf16>(&table) {
        "tensor-core"
    } else {
        "scalar"
    };
    let wbytes = singles[0].checkpoint_bytes();
    let tm = a.timing.timing(a.timing.iters);
    for tokens in [1usize, 4] {
        let pairs = tokens * topk;
        let ids: Vec<i32> = (0..pairs)
            .map(|p| ((p * 3 + p / topk) % e) as i32)
            .collect();
        let distinct = ids.iter().collect::<std::collections::BTreeSet<_>>().len();
        let idd = dev.upload(&ids)?;
        let x = dev.upload(&to_dtype::<bf16>(&random_activations(tokens * k, 21)))?;
        let mut y = dev.zeros::<f32>(pairs * n)?;
        let mut fused = |_: usize| dev.moe_gemv(&x, topk, &table, &idd, None, pairs, &mut y);
        let t = dev.median_ms(tm, &mut fused)?;
        let no_pdl = without_dependent_launch(dev, || dev.median_ms(tm, &mut fused))?;
        let ts = dev.median_ms(tm, |_| {
            dev.moe_gemv(&x, topk, &scalar_table, &idd, None, pairs, &mut y)
        })?;
        let xs: Vec<_> = (0..tokens)
            .map(|t| dev.upload(&to_dtype::<bf16>(&random_activations(k, 30 + t as u64))))
            .collect::<Result<_, _>>()?;
        let mut y1 = dev.zeros::<f32>(n)?;
        let t2 = dev.median_ms(tm, |_| {
            for p in 0..pairs {
                dev.qmatmul(&xs[p / topk], 1, &singles[ids[p] as usize], &mut y1)?;
            }
            Ok(())
        })?;
        let gbs = (distinct * wbytes) as f64 / (t * 1e-3) / 1e9;
        println!(
            "| {k} x {n} | {bits} | {group} | {kernel} | {tokens} | {pairs} | {:.2} | {gbs:.0} | {:.0} % | {:.2} | {:.2} | {} |",
            t * 1e3,
            100.0 * gbs / copy,
            t2 * 1e3,
            ts * 1e3,
            us_or_blank(no_pdl)
        );
    }
    Ok(())
}

/// Mixtral-8x7B's shape (config.json of mistralai/Mixtral-8x7B-Instruct-v0.1).
fn mixtral_8x7b(layers: usize) -> anyhow::Result<runtime::MixtralConfig> {
    let raw = serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "vocab_size": 32000,
        "max_position_embeddings": 32768, "sliding_window": null, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16"
    });
    Ok(runtime::MixtralConfig::from_value(
        raw,
        std::path::Path::new("<Mixtral-8x7B shape>"),
    )?)
}

/// Parameters a token passes through: attention, top-k experts, router and `lm_head`.
fn active_params(c: &runtime::MixtralConfig) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let d = c.head_dim() as f64;
    let attn = h * d * (2.0 * c.num_attention_heads as f64 + 2.0 * c.num_key_value_heads as f64);
    let experts = c.num_experts_per_tok as f64 * 3.0 * h * i;
    let router = c.num_local_experts as f64 * h;
    c.num_hidden_layers as f64 * (attn + experts + router) + c.vocab_size as f64 * h
}

fn synthetic_layer(
    dev: &std::sync::Arc<CudaDevice>,
    c: &runtime::MixtralConfig,
    bits: u32,
    group: i32,
    act_order: bool,
) -> anyhow::Result<runtime::cuda::eval::DeviceLayer> {
    use runtime::cuda::eval::{synthetic_f32, synthetic_gptq, DeviceLinear};
    use std::sync::Arc;
    let (h, inter, d) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (qw, kw) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let mut seed = 100u64;
    let mut lin = |k: usize, n: usize| -> anyhow::Result<DeviceLinear> {
        seed += 1;
        // Weights of standard deviation about 1/sqrt(K): (q - z) spans about 2^b / sqrt(6).
        let scale = 6f32.sqrt() / ((1u32 << bits) as f32 * (k as f32).sqrt());
        Ok(DeviceLinear::Gptq(Arc::new(synthetic_gptq(
            dev, bits, group, k, n, act_order, scale, seed,
        )?)))
    };
    let attn = [lin(h, qw)?, lin(h, kw)?, lin(h, kw)?, lin(qw, h)?];
    let experts = (0..c.num_local_experts)
        .map(|_| Ok([lin(h, inter)?, lin(inter, h)?, lin(h, inter)?]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(runtime::cuda::eval::DeviceLayer {
        input_layernorm: Arc::new(synthetic_f32(dev, h, 0.9, 1.1, 1)?),
        post_attention_layernorm: Arc::new(synthetic_f32(dev, h, 0.9, 1.1, 2)?),
        gate: Arc::new(synthetic_f32(dev, c.num_local_experts * h, -0.05, 0.05, 3)?),
        attn,
        experts,
    })
}

fn eval_bench(a: EvalBenchArgs) -> anyhow::Result<ExitCode> {
    use runtime::cuda::eval::{
        evaluate_checkpoint, evaluate_windows, synthetic_bf16, synthetic_f32, time_dense_gemm,
        AttentionKernel, DeviceHead, EvalOptions, EvalOutput,
    };
    let dev = CudaDevice::new(a.device).context("opening the CUDA device")?;
    let checkpoint = a
        .model
        .as_ref()
        .map(runtime::Checkpoint::open)
        .transpose()
        .context("opening --model")?;
    let config = match &checkpoint {
        Some(ck) => ck.config().clone(),
        None => mixtral_8x7b(a.layers)?,
    };
    let windows_n = (a.tokens as f64 / a.ctx as f64).round().max(1.0) as usize;
    let tokens = windows_n * a.ctx;
    let mut rng = runtime::cuda::random::Rng::new(7);
    let windows: Vec<Vec<u32>> = (0..windows_n)
        .map(|_| {
            (0..a.ctx)
                .map(|_| rng.below(config.vocab_size as u64) as u32)
                .collect()
        })
        .collect();
    // The floor: dense bf16 GEMM rate at an expert's shape, measured now.
    let (m, k, n) = (16_384, config.hidden_size, config.intermediate_size);
    let gemm_ms = time_dense_gemm(&dev, m, k, n, 20).context("timing the dense GEMM")?;
    let rate = 2.0 * (m * k * n) as f64 / (gemm_ms * 1e-3);
    let params = active_params(&config);
    let floor_s = 2.0 * params * tokens as f64 / rate;
    println!(
        "device: {} ({}, {} SMs)",
        dev.name(),
        dev.arch(),
        dev.sm_count()
    );
    println!(
        "dense bf16 cuBLAS [{m} x {k}] x [{k} x {n}]: {gemm_ms:.3} ms = {:.0} TFLOP/s (median of 20)",
        rate / 1e12
    );
    println!(
        "active parameters per token: {:.3} B; floor for {tokens} tokens ({windows_n} windows of {}): {floor_s:.2} s",
        params / 1e9,
        a.ctx
    );
    let opts = EvalOptions {
        chunk_tokens: a.chunk_tokens,
        moe_rows: a.moe_rows,
        attention: if a.reference_attention {
            AttentionKernel::Reference
        } else {
            AttentionKernel::Auto
        },
        phase_timing: true,
        ..EvalOptions::default()
    };
    let report = |label: &str, runs: &[EvalOutput]| {
        let mut totals: Vec<f64> = runs.iter().map(|r| r.total_ms).collect();
        totals.sort_by(|x, y| x.total_cmp(y));
        let med = totals[totals.len() / 2] / 1e3;
        let r = &runs[runs.len() / 2];
        let mut layers = r.layer_ms.clone();
        layers.sort_by(|x, y| x.total_cmp(y));
        let finite = r.nll.iter().flatten().all(|v| v.is_finite());
        let mean_nll = r.nll.iter().flatten().map(|&v| v as f64).sum::<f64>()
            / r.nll.iter().map(Vec::len).sum::<usize>().max(1) as f64;
        println!();
        println!(
            "## {label}: {tokens} tokens in {med:.2} s = {:.0} tokens/s; floor {floor_s:.2} s; ratio {:.2}x the floor (median of {} run(s); mean NLL {mean_nll:.3}, finite: {finite})",
            tokens as f64 / med,
            med / floor_s,
            runs.len()
        );
        println!(
            "layer time: median {:.1} ms, min {:.1}, max {:.1} ({} layers)",
            layers[layers.len() / 2],
            layers[0],
            layers[layers.len() - 1],
            layers.len()
        );
        println!("| phase | seconds | share |");
        println!("|---|---|---|");
        let sum: f64 = r.phase_ms.iter().map(|p| p.1).sum();
        for (p, ms) in &r.phase_ms {
            println!(
                "| {} | {:.2} | {:.1} % |",
                p.name(),
                ms / 1e3,
                100.0 * ms / sum.max(1e-9)
            );
        }
        println!("| (GPU total) | {:.2} | |", sum / 1e3);
    };
    if let Some(ck) = &checkpoint {
        let mut runs = Vec::new();
        for _ in 0..a.repeats.max(1) {
            runs.push(evaluate_checkpoint(&dev, ck, &windows, &opts)?);
        }
        report(&format!("{}", ck.dir().display()), &runs);
        return Ok(ExitCode::SUCCESS);
    }
    for v in &a.variants {
        let (b, g) = v
            .split_once(':')
            .with_context(|| format!("--variants: `{v}` is not BITS:GROUP"))?;
        let bits: u32 = b
            .parse()
            .with_context(|| format!("--variants `{v}`: bits"))?;
        let group: i32 = g
            .parse()
            .with_context(|| format!("--variants `{v}`: group"))?;
        let layer = synthetic_layer(&dev, &config, bits, group, a.act_order)
            .with_context(|| format!("making a synthetic {bits}-bit g{group} layer"))?;
        let (h, vocab) = (config.hidden_size, config.vocab_size);
        let mut runs = Vec::new();
        for _ in 0..a.repeats.max(1) {
            let head = DeviceHead {
                embed: synthetic_f32(&dev, vocab * h, -1.0, 1.0, 11)?,
                norm: synthetic_f32(&dev, h, 0.9, 1.1, 12)?,
                lm_head: synthetic_bf16(&dev, vocab * h, -0.03, 0.03, 13)?,
            };
            let mut feed = |_l: usize| Ok(layer.clone());
            runs.push(evaluate_windows(
                &dev, &config, &windows, head, &mut feed, &opts,
            )?);
        }
        let act = if a.act_order {
            "act-order"
        } else {
            "no act-order"
        };
        report(
            &format!("synthetic Mixtral-8x7B shape, {bits}-bit g{group} {act}"),
            &runs,
        );
    }
    Ok(ExitCode::SUCCESS)
}
