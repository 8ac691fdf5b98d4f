//! Wall time of each [`Backend`] operation during `Model::nll` over 2048-token windows of the
//! bundled fixture, on the CPU backend (a delegating backend that times every call).
//!
//! `cargo run --release -p runtime --example op_profile [model_dir] [windows]`

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use runtime::{
    AttentionShape, Backend, Checkpoint, CpuBackend, HostTensor, Model, Result, Routing,
};

/// [`CpuBackend`] with the time spent in each operation (and each matmul shape) added up.
#[derive(Debug, Default)]
struct Timed {
    inner: CpuBackend,
    spent: RefCell<BTreeMap<String, (Duration, usize)>>,
}

impl Timed {
    fn time<R>(&self, what: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let mut spent = self.spent.borrow_mut();
        let e = spent.entry(what()).or_default();
        e.0 += t.elapsed();
        e.1 += 1;
        r
    }
}

type T = <CpuBackend as Backend>::Tensor;

impl Backend for Timed {
    type Tensor = T;
    fn name(&self) -> &'static str {
        "cpu-timed"
    }
    fn upload(&self, t: HostTensor) -> Result<T> {
        self.inner.upload(t)
    }
    fn shape(&self, t: &T) -> Vec<usize> {
        self.inner.shape(t)
    }
    fn download(&self, t: &T) -> Result<HostTensor> {
        self.time(|| "download".into(), || self.inner.download(t))
    }
    fn embedding(&self, table: &T, ids: &[u32]) -> Result<T> {
        self.time(|| "embedding".into(), || self.inner.embedding(table, ids))
    }
    fn matmul_t(&self, x: &T, w: &T) -> Result<T> {
        let what = || format!("matmul_t [_, {:?}]", w.dims());
        self.time(what, || self.inner.matmul_t(x, w))
    }
    fn add(&self, a: &T, b: &T) -> Result<T> {
        self.time(|| "add".into(), || self.inner.add(a, b))
    }
    fn rms_norm(&self, x: &T, weight: &T, eps: f32) -> Result<T> {
        self.time(|| "rms_norm".into(), || self.inner.rms_norm(x, weight, eps))
    }
    fn rope(&self, x: &T, head_dim: usize, positions: &[u32], theta: f64) -> Result<T> {
        self.time(
            || "rope".into(),
            || self.inner.rope(x, head_dim, positions, theta),
        )
    }
    fn attention(
        &self,
        q: &T,
        k: &T,
        v: &T,
        shape: AttentionShape,
        window: Option<usize>,
    ) -> Result<T> {
        self.time(
            || "attention".into(),
            || self.inner.attention(q, k, v, shape, window),
        )
    }
    fn silu_mul(&self, gate: &T, up: &T) -> Result<T> {
        self.time(|| "silu_mul".into(), || self.inner.silu_mul(gate, up))
    }
    fn gather_rows(&self, x: &T, rows: &[u32]) -> Result<T> {
        self.time(|| "gather_rows".into(), || self.inner.gather_rows(x, rows))
    }
    fn scatter_add_rows(&self, acc: &T, src: &T, rows: &[u32], weights: &[f32]) -> Result<T> {
        self.time(
            || "scatter_add_rows".into(),
            || self.inner.scatter_add_rows(acc, src, rows, weights),
        )
    }
    fn zeros(&self, rows: usize, cols: usize) -> Result<T> {
        self.time(|| "zeros".into(), || self.inner.zeros(rows, cols))
    }
    fn nll(&self, logits: &T, targets: &[u32]) -> Result<Vec<f32>> {
        self.time(|| "nll".into(), || self.inner.nll(logits, targets))
    }
    fn lm_head_nll(&self, hidden: &T, lm_head: &T, targets: &[u32]) -> Result<Vec<f32>> {
        self.time(
            || "lm_head_nll".into(),
            || self.inner.lm_head_nll(hidden, lm_head, targets),
        )
    }
    fn route_top_k(&self, logits: &T, k: usize) -> Result<Routing> {
        self.time(
            || "route_top_k".into(),
            || self.inner.route_top_k(logits, k),
        )
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "fixtures/moe-s".into());
    let windows: usize = args.next().map_or(Ok(2), |s| s.parse())?;
    let model = Model::from_checkpoint(Timed::default(), &Checkpoint::open(&dir)?)?;
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
    model.arch.backend.spent.borrow_mut().clear();
    let start = Instant::now();
    for _ in 0..windows {
        model.nll(&ids(2048))?;
    }
    let total = start.elapsed().as_secs_f64();
    let spent = model.arch.backend.spent.borrow();
    let mut rows: Vec<_> = spent.iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    println!("{windows} windows of 2048 tokens, {total:.2} s; per window:");
    for (what, (d, n)) in rows {
        let s = d.as_secs_f64() / windows as f64;
        println!(
            "{:>8.1} ms {:>5.1} %  {:>5} calls  {what}",
            s * 1e3,
            100.0 * s * windows as f64 / total,
            n / windows
        );
    }
    Ok(())
}
