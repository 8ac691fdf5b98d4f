//! `mixtral-gptq bench reads`: read-only launches with the tensor-core GEMV's access pattern, timed
//! in the same run as the GEMV itself and as one plain streaming read of the same bytes. They show
//! how much of the GEMV's time its weight stream alone takes (its grid, warps, runs and loads in
//! flight, nothing computed), and what another layout of the words or more loads in flight per warp
//! would change, before either is built into the kernel.

use std::process::ExitCode;

use anyhow::bail;
use runtime::cuda::gptq::{prepare, GemvLaunchShape};
use runtime::cuda::random::{random_activations, random_gptq};
use runtime::cuda::timing::{ReadRuns, Timing, READ_RUNS_DEPTHS};
use runtime::cuda::{f16, CudaDevice};

use super::{rotated_layers, to_dtype, without_dependent_launch, LayerArgs, TimingArgs};

/// Arguments of `mixtral-gptq bench reads` (layers of group size 128 without act-order, M = 1, f16 X).
#[derive(Debug, clap::Args)]
pub struct ReadsArgs {
    #[command(flatten)]
    pub layers: LayerArgs,
    /// 512-byte pieces in flight per warp to try, besides the GEMV's own (1, 2, 3, 4, 6 or 8).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub depths: Vec<usize>,
    #[command(flatten)]
    pub timing: TimingArgs,
}

/// Runs `bench reads`.
pub fn run(a: ReadsArgs) -> anyhow::Result<ExitCode> {
    let shapes = a.layers.shapes()?;
    if let Some(d) = a.depths.iter().find(|d| !READ_RUNS_DEPTHS.contains(d)) {
        bail!("--depths: {d} is not one of {READ_RUNS_DEPTHS:?}");
    }
    let tm = a.timing.timing(a.timing.iters);
    let (dev, copy) = a.layers.open_device()?;
    println!(
        "{}; GB/s counts the packed words (K x N x bits / 8) in every row",
        a.timing.describe()
    );
    println!("\"runs\" launches read only, with the GEMV's grid: one block per 32-column strip, one warp per k-split reading its run of 512-byte pieces, each next load issued once an earlier piece is used; \"strip-major\" is where the GEMV's words lie, \"time-major\" puts piece t of every warp side by side");
    println!();
    println!("| K x N | bits | launch | layout | pieces in flight per warp | warps per block | blocks per SM | time (us) | GB/s | % of copy | GEMV without PDL / this |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut seed = 1u64;
    for &(k, n) in &shapes {
        for &bits in &a.layers.bits {
            seed += 1;
            let p = prepare(&random_gptq(bits, 128, k, n, false, seed))?;
            let ws = rotated_layers(&dev, &p, a.timing.rotate_bytes)?;
            let Some(plan) = dev.gemv_launch_shape::<f16>(&ws[0], 1)? else {
                println!("| {k} x {n} | {bits} | the GEMV of one row is not on the tensor cores | | | | | | | | |");
                continue;
            };
            if !plan.register_pipelined {
                println!("| {k} x {n} | {bits} | {}: not the register-pipelined GEMV, not imitated | | | | | | | | |", plan.entry);
                continue;
            }
            shape_rows(&dev, &a, tm, copy, (k, n, bits), &ws, &plan)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The rows of one layer: the GEMV with and without dependent launch, the streaming read, and the
/// read-only runs at each depth and layout.
fn shape_rows(
    dev: &CudaDevice,
    a: &ReadsArgs,
    tm: Timing,
    copy: f64,
    (k, n, bits): (usize, usize, u32),
    ws: &[runtime::cuda::gptq::DeviceGptq],
    plan: &GemvLaunchShape,
) -> anyhow::Result<()> {
    let words = k * n * bits as usize / 8;
    let b = bits as usize;
    // 512-byte pieces: a 32 x 32 tile holds 128 b bytes (3 bits: tiles come in fours).
    let runs = |depth: usize, time_major: bool, blocks_per_sm: usize| ReadRuns {
        blocks: plan.blocks,
        warps: plan.warps_per_block,
        pieces_per_strip: k * b / 128,
        pieces_per_warp: plan.tiles_per_warp * b / 4,
        depth,
        time_major,
        blocks_per_sm,
        dependent: false,
    };
    let own = plan.tiles_in_flight * b / 4;
    let row = |launch: &str,
               layout: &str,
               depth: String,
               warps: String,
               per_sm: String,
               t: f64,
               base: f64| {
        let gbs = words as f64 / (t * 1e-3) / 1e9;
        println!(
            "| {k} x {n} | {bits} | {launch} | {layout} | {depth} | {warps} | {per_sm} | {:.2} | {gbs:.0} | {:.0} % | {:.2}x |",
            t * 1e3,
            100.0 * gbs / copy,
            base / t
        );
    };

    let xc = 8usize;
    let xs: Vec<_> = (0..xc)
        .map(|c| dev.upload(&to_dtype::<f16>(&random_activations(k, 100 + c as u64))))
        .collect::<Result<_, _>>()?;
    let mut y = dev.zeros::<f32>(n)?;
    let mut gemv = |i: usize| dev.qmatmul(&xs[i % xc], 1, &ws[i % ws.len()], &mut y);
    let t = dev.median_ms(tm, &mut gemv)?;
    let no_pdl = without_dependent_launch(dev, || dev.median_ms(tm, &mut gemv))?;
    let base = no_pdl.unwrap_or(t);
    let (warps, per_sm) = (
        plan.warps_per_block.to_string(),
        plan.resident_blocks_per_sm.to_string(),
    );
    let gemv_row = |name: &str, t: f64| {
        row(
            name,
            "strip-major",
            own.to_string(),
            warps.clone(),
            per_sm.clone(),
            t,
            base,
        )
    };
    gemv_row(&format!("GEMV `{}`", plan.entry), t);
    if let Some(t) = no_pdl {
        gemv_row("the same GEMV without dependent launch", t);
    }

    // The streaming read takes exactly the layer's words; the runs' buffers span their layouts
    // (time-major leaves the holes of the strips' short last runs).
    let rotated = |bytes: usize| -> anyhow::Result<Vec<_>> {
        let copies = a.timing.rotate_bytes.div_ceil(bytes).clamp(2, 64);
        Ok((0..copies)
            .map(|_| dev.zeros::<u8>(bytes))
            .collect::<Result<_, _>>()?)
    };
    let stream_bufs = rotated(words)?;
    let (sblocks, swarps) = (dev.sm_count() * 8, 8);
    let mut launches = vec![(false, "streaming read (`bench_stream_read`)")];
    if dev.dependent_launch() {
        launches.push((
            true,
            "streaming read as a dependent launch (`bench_stream_read_dep`)",
        ));
    }
    for (dependent, label) in launches {
        let t = dev.stream_read_ms(&stream_bufs, dependent, tm)?;
        row(
            label,
            "linear",
            "4 x 16 bytes per thread".into(),
            swarps.to_string(),
            format!("up to {}", sblocks / dev.sm_count()),
            t,
            base,
        );
    }
    let bufs = rotated(
        runs(1, true, 0)
            .buffer_bytes()
            .max(runs(1, false, 0).buffer_bytes()),
    )?;
    let mut depths: Vec<usize> = a.depths.clone();
    if READ_RUNS_DEPTHS.contains(&own) {
        depths.push(own);
    }
    depths.sort_unstable();
    depths.dedup();
    for time_major in [false, true] {
        let layout = if time_major {
            "time-major"
        } else {
            "strip-major"
        };
        for &d in &depths {
            let (t, resident) =
                dev.read_runs_ms(&bufs, runs(d, time_major, plan.resident_blocks_per_sm), tm)?;
            let label = if d == own {
                "runs (the GEMV's depth)"
            } else {
                "runs"
            };
            row(
                label,
                layout,
                d.to_string(),
                warps.clone(),
                resident.to_string(),
                t,
                base,
            );
        }
    }
    if READ_RUNS_DEPTHS.contains(&own) && dev.dependent_launch() {
        for time_major in [false, true] {
            let r = ReadRuns {
                dependent: true,
                ..runs(own, time_major, plan.resident_blocks_per_sm)
            };
            let (t, resident) = dev.read_runs_ms(&bufs, r, tm)?;
            row(
                "runs (the GEMV's depth) as a dependent launch",
                if time_major {
                    "time-major"
                } else {
                    "strip-major"
                },
                own.to_string(),
                warps.clone(),
                resident.to_string(),
                t,
                base,
            );
        }
    }
    if READ_RUNS_DEPTHS.contains(&own) {
        let (t, resident) = dev.read_runs_ms(&bufs, runs(own, false, 0), tm)?;
        row(
            "runs (the GEMV's depth), as many blocks per SM as fit",
            "strip-major",
            own.to_string(),
            warps.clone(),
            resident.to_string(),
            t,
            base,
        );
    }
    Ok(())
}
