//! Tokens per second of `Model::nll` on the CPU over 2048-token windows of the bundled fixture.
//!
//! `cargo run --release -p runtime --example nll_speed [model_dir] [windows]`

use std::time::Instant;

/// CPU seconds used so far by all threads of this process (Linux `/proc/self/stat`, 100 ticks a
/// second); `None` elsewhere. Unlike wall time it does not count time spent descheduled, so it is
/// the steadier figure on a loaded machine.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "fixtures/moe-s".into());
    let windows: usize = args.next().map_or(Ok(3), |s| s.parse())?;
    let model = runtime::Model::load(&dir)?;
    let vocab = model.config().vocab_size as u64;
    let mut state = 12345u64;
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((state >> 33) % vocab) as u32
            })
            .collect()
    };
    model.nll(&ids(2048))?; // warm-up
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let mut total = 0.0f64;
    let mut best = f64::INFINITY;
    for _ in 0..windows {
        let w = ids(2048);
        let t = Instant::now();
        total += model.nll(&w)?.iter().map(|&v| v as f64).sum::<f64>();
        best = best.min(t.elapsed().as_secs_f64());
    }
    let secs = start.elapsed().as_secs_f64();
    if let (Some(a), Some(b)) = (cpu_start, cpu_seconds()) {
        println!(
            "CPU time: {:.2} s per window (all threads) = {:.0} tokens per CPU-second",
            (b - a) / windows as f64,
            (windows * 2048) as f64 / (b - a)
        );
    }
    println!(
        "fastest window: {best:.2} s = {:.0} tokens/s",
        2048.0 / best
    );
    let t = Instant::now();
    let w = ids(2048);
    model.hidden(&w)?;
    println!(
        "hidden states alone: {:.2} s per window",
        t.elapsed().as_secs_f64()
    );
    println!(
        "{windows} x 2048 tokens in {secs:.2} s: {:.0} tokens/s (threads {}, mean nll {:.3})",
        (windows * 2048) as f64 / secs,
        rayon::current_num_threads(),
        total / (windows * 2047) as f64
    );
    Ok(())
}
