//! The compute floor of a perplexity evaluation of moe-s on this machine.
//!
//! Counts the FLOPs per token of the moe-s forward pass (lm_head, attention projections, the two
//! active experts and the router per layer, attention scores over a full window of `ctx`), measures
//! this machine's f32 GEMM rate with candle-core on the largest product of the pass
//! (`[ctx, 256] x [256, 32000]`, the lm_head), and prints the time a perfect implementation at that
//! rate would need for `tokens` tokens.
//!
//! `cargo run --release -p evaluate --example eval_floor -- [ctx] [tokens]`

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let ctx: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2048);
    let tokens: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(87 * 2048);
    let (hidden, inter, vocab, layers, heads, kv_heads, head_dim, active) =
        (256, 512, 32000, 4, 8, 2, 32, 2);
    let attn_proj = 2 * hidden * (heads * head_dim + 2 * kv_heads * head_dim + heads * head_dim);
    let experts = 2 * active * 3 * hidden * inter;
    let router = 2 * hidden * 8;
    let scores = 2 * 2 * heads * head_dim * ctx; // QK^T and AV over the full window
    let per_layer = attn_proj + experts + router + scores;
    let lm_head = 2 * hidden * vocab;
    let per_token = layers * per_layer + lm_head;
    println!("FLOPs per token (ctx {ctx}): lm_head {lm_head}, per layer {per_layer} (attention projections {attn_proj}, 2 experts {experts}, router {router}, scores {scores}), total {per_token}");

    // The GEMM rate, measured two ways on the lm_head product: whole (`[ctx, 256] x [256, 32000]`,
    // whose 262 MB output makes it partly memory-bound) and in 256-row chunks as `Model::nll` runs
    // it (32 MB outputs). The floor uses the faster: the best rate this machine showed.
    let device = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (ctx, hidden), &device)?;
    let w = Tensor::randn(0f32, 1.0, (vocab, hidden), &device)?;
    let flops = (2 * ctx * hidden * vocab) as f64;
    let whole = median_seconds(|| a.matmul(&w.t()?).map(|_| ()))?;
    let chunk = 256.min(ctx);
    let chunked = median_seconds(|| {
        for start in (0..ctx).step_by(chunk) {
            let rows = a.narrow(0, start, chunk.min(ctx - start))?;
            let _ = rows.matmul(&w.t()?)?;
        }
        Ok(())
    })?;
    let threads = candle_core::utils::get_num_threads();
    println!(
        "f32 GEMM [{ctx}x{hidden}]x[{hidden}x{vocab}] (candle-core, {threads} threads): whole {:.1} ms -> {:.1} GFLOP/s; in {chunk}-row chunks {:.1} ms -> {:.1} GFLOP/s",
        whole * 1e3,
        flops / whole / 1e9,
        chunked * 1e3,
        flops / chunked / 1e9
    );
    let rate = flops / whole.min(chunked);
    let total = per_token as f64 * tokens as f64;
    println!(
        "floor for {tokens} tokens: {:.2} TFLOP / {:.1} GFLOP/s = {:.1} s ({:.0} tokens/s)",
        total / 1e12,
        rate / 1e9,
        total / rate,
        rate / per_token as f64
    );
    Ok(())
}

/// Median wall time of 5 runs of `f` after one warm-up run.
fn median_seconds(mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
