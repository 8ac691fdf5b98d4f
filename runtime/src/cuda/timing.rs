//! Timing with CUDA events, for `mixtral-gptq bench kernels`: warm-up, then the median of many
//! runs, each run bracketed by its own pair of events, or (back to back) the median of many
//! batches of runs queued one after another, each batch bracketed by a pair of events.

use std::time::Instant;

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::device::CudaDevice;
use super::error::{drv, CudaError, Result};
use super::launch::ExLaunch;

/// How a benchmark case is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Untimed runs first (the kernels compiled, workspaces grown, clocks up).
    pub warmup: usize,
    /// Timed samples; the median is reported.
    pub iters: usize,
    /// Runs per sample, queued back to back between one pair of events (the sample is their mean).
    /// 1: each run alone between its events, so that every figure also holds the fixed cost of an
    /// event pair around a launch; more: the steady state of a stream of launches, as a decoding
    /// step queues them.
    pub back_to_back: usize,
}

impl Timing {
    /// `iters` runs after `warmup`, each between its own pair of events.
    pub fn one_by_one(warmup: usize, iters: usize) -> Self {
        Self {
            warmup,
            iters,
            back_to_back: 1,
        }
    }
}

/// Median times of one benchmark case.
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    /// Device milliseconds per run, between events.
    pub device_ms: f64,
    /// Host milliseconds per run spent queueing it (the wall clock around the calls, which return
    /// before the device runs them).
    pub host_ms: f64,
}

/// Pieces in flight per warp that `bench_read_runs_d*` (kernels/gptq.cu) is compiled for.
pub const READ_RUNS_DEPTHS: [usize; 6] = [1, 2, 3, 4, 6, 8];

/// One read-only launch with the register-pipelined GEMV's access pattern
/// ([`CudaDevice::read_runs_ms`], `bench_read_runs_d*` in kernels/gptq.cu): `blocks` blocks (the
/// GEMV's 32-column strips) of `warps` warps (its k-splits); warp w of a block reads pieces
/// w·L .. w·L + L - 1 (L = `pieces_per_warp`) of the block's `pieces_per_strip` 512-byte pieces
/// (each lane 16 bytes of each), `depth` in flight, each next load issued once an earlier piece's
/// words are used. With `dependent`, a programmatic dependent launch under the GEMV's rules
/// (`bench_read_runs_d*_dep`: the next launch may start as this one's blocks leave, and each warp
/// issues only its first `depth` pieces before it waits for the previous launch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRuns {
    /// Blocks of the grid.
    pub blocks: usize,
    /// Warps per block (1 to 32).
    pub warps: usize,
    /// 512-byte pieces of one block's strip.
    pub pieces_per_strip: usize,
    /// Pieces of one warp's run (the last warps of a strip may have fewer, or none).
    pub pieces_per_warp: usize,
    /// Pieces in flight per warp: one of [`READ_RUNS_DEPTHS`].
    pub depth: usize,
    /// Piece t of every warp side by side (the grid reads one region at a time), instead of each
    /// strip's pieces in one run (the GEMV's strip-major layout).
    pub time_major: bool,
    /// Blocks per SM to allow (unused shared memory holds the others off), or 0 for as many as
    /// the SM takes.
    pub blocks_per_sm: usize,
    /// A programmatic dependent launch (as the GEMV's), or an ordinary one.
    pub dependent: bool,
}

impl ReadRuns {
    /// Bytes a buffer of this launch spans.
    pub fn buffer_bytes(&self) -> usize {
        512 * if self.time_major {
            self.blocks * self.warps * self.pieces_per_warp
        } else {
            self.blocks * self.pieces_per_strip
        }
    }
}

impl CudaDevice {
    /// Median device milliseconds per run of `run(i)` as `t` says ([`CudaDevice::median_times`]).
    pub fn median_ms(&self, t: Timing, run: impl FnMut(usize) -> Result<()>) -> Result<f64> {
        Ok(self.median_times(t, run)?.device_ms)
    }

    /// Device and host time per run of `run(i)` as `t` says (i counts from 0 across the warm-up and
    /// every timed run, so callers can rotate inputs with `i % copies`).
    pub fn median_times(
        &self,
        t: Timing,
        mut run: impl FnMut(usize) -> Result<()>,
    ) -> Result<Timed> {
        let per = t.back_to_back.max(1);
        let iters = t.iters.max(1);
        for i in 0..t.warmup {
            run(i)?;
        }
        self.synchronize()?;
        // Single runs share events (run s lies between events s and s + 1); batches have a pair
        // each, so that the busy stretch queued before a batch stays outside its window.
        let chained = per == 1;
        let n_events = if chained { iters + 1 } else { 2 * iters };
        let events: Vec<_> = (0..n_events)
            .map(|_| self.timing_event())
            .collect::<Result<_>>()?;
        let mut host = Vec::with_capacity(iters);
        let mut i = t.warmup;
        // Keep the GPU busy while the host queues the timed runs, so that host launch overhead does
        // not show up as idle time between an event and its kernel: one busy stretch for all single
        // runs (10 ms covers 100 runs at up to 100 us of host time each), one per batch otherwise
        // (20 us of device time per queued run). Batches start on an idle device: a queue left to
        // fill over many batches makes the driver hold the host back, and the host figure would
        // then be the device's pace instead of the cost of queueing a call.
        if chained {
            self.busy_wait_ms(10.0)?;
            drv("recording an event", events[0].record(self.stream()))?;
        }
        // The events that open and close sample s.
        let window = |s: usize| {
            if chained {
                (s, s + 1)
            } else {
                (2 * s, 2 * s + 1)
            }
        };
        for s in 0..iters {
            let (open, close) = window(s);
            if !chained {
                self.synchronize()?;
                self.busy_wait_ms((per as f64 * 0.02).max(0.2))?;
                drv("recording an event", events[open].record(self.stream()))?;
            }
            let start = Instant::now();
            for _ in 0..per {
                run(i)?;
                i += 1;
            }
            host.push(start.elapsed().as_secs_f64() * 1e3 / per as f64);
            drv("recording an event", events[close].record(self.stream()))?;
        }
        self.synchronize()?;
        let mut times = Vec::with_capacity(iters);
        for s in 0..iters {
            let (open, close) = window(s);
            let ms = drv("reading an event", events[open].elapsed_ms(&events[close]))?;
            times.push(ms as f64 / per as f64);
        }
        Ok(Timed {
            device_ms: median(&mut times),
            host_ms: median(&mut host),
        })
    }

    /// Queues about `ms` milliseconds of device-to-device copies (a 256 MiB buffer, reused).
    fn busy_wait_ms(&self, ms: f64) -> Result<()> {
        let bytes = 256usize << 20;
        let mut ws = self
            .busy
            .lock()
            .map_err(|_| super::error::CudaError::BadInput {
                what: "busy buffer",
                expected: 0,
                got: 0,
            })?;
        if ws.is_none() {
            *ws = Some((self.zeros::<u8>(bytes)?, self.zeros::<u8>(bytes)?));
        }
        if let Some((a, b)) = ws.as_mut() {
            // ~2.9 TB/s on an H100 counting read + write: 256 MiB is about 0.18 ms.
            for _ in 0..((ms / 0.18).ceil() as usize).max(1) {
                drv("copying on the device", self.stream().memcpy_dtod(&*a, b))?;
            }
        }
        Ok(())
    }

    /// Device-to-device copy bandwidth in GB/s (bytes read + bytes written), median of `iters` copies
    /// of `bytes` bytes.
    pub fn copy_bandwidth_gbs(&self, bytes: usize, iters: usize) -> Result<f64> {
        let src: CudaSlice<u8> = self.upload(&vec![0x5Au8; bytes])?;
        let mut dst: CudaSlice<u8> = self.zeros(bytes)?;
        let ms = self.median_ms(Timing::one_by_one(3, iters), |_| {
            drv(
                "copying on the device",
                self.stream().memcpy_dtod(&src, &mut dst),
            )
        })?;
        Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
    }

    /// Median times of an empty kernel launch (`bench_noop`), timed as `t` says: on the device, the
    /// fixed cost of a launch; on the host, the driver's cost of queueing one.
    pub fn empty_kernel(&self, t: Timing) -> Result<Timed> {
        let f = self.gptq_function("bench_noop")?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.median_times(t, |_| {
            // SAFETY: `bench_noop` takes no arguments.
            drv(
                "launching bench_noop",
                unsafe { self.stream().launch_builder(&f).launch(cfg) }.map(|_| ()),
            )
        })
    }

    /// Median milliseconds of one kernel that only reads a whole buffer (`bench_stream_read`,
    /// 16-byte loads, a grid of the blocks the device keeps resident), the buffers taken in turn so
    /// that the cache does not serve them: the practical floor of a kernel streaming those bytes.
    /// With `dependent`, under the GEMV's launch rules (`bench_stream_read_dep`, a programmatic
    /// dependent launch: the next launch may start as this one's blocks leave, and each thread issues
    /// only its first loads before it waits for the previous launch); it is then an ordinary launch
    /// where the device has no dependent launch ([`CudaDevice::dependent_launch`]).
    pub fn stream_read_ms(
        &self,
        bufs: &[CudaSlice<u8>],
        dependent: bool,
        t: Timing,
    ) -> Result<f64> {
        let dependent = dependent && self.dependent_launch();
        let entry = if dependent {
            "bench_stream_read_dep"
        } else {
            "bench_stream_read"
        };
        let f = self.gptq_function(entry)?;
        let sink = self.zeros::<u32>(1)?;
        let cfg = LaunchConfig {
            grid_dim: ((self.sm_count() * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.median_ms(t, |i| {
            let b = &bufs[i % bufs.len()];
            let n16 = b.len() / 16;
            let mut l = ExLaunch::new(self.stream());
            l.buf(b).size_t(n16).buf(&sink);
            // SAFETY: (const uint4*, size_t, u32*) as `bench_stream_read*` takes them; b holds at
            // least n16 16-byte words (device allocations are 256-byte aligned), sink one u32. The
            // `_dep` entry waits before anything but its first loads of b, which no kernel writes.
            drv(format!("launching {entry}"), unsafe {
                l.launch(&f, cfg, dependent)
            })
        })
    }

    /// Median milliseconds of one read-only launch with the register-pipelined GEMV's access
    /// pattern ([`ReadRuns`], `bench_read_runs_d*` in kernels/gptq.cu), the buffers taken in turn
    /// so that the cache does not serve them (each at least [`ReadRuns::buffer_bytes`]), and the
    /// blocks per SM the driver kept resident.
    pub fn read_runs_ms(
        &self,
        bufs: &[CudaSlice<u8>],
        r: ReadRuns,
        t: Timing,
    ) -> Result<(f64, usize)> {
        if !READ_RUNS_DEPTHS.contains(&r.depth) {
            return Err(CudaError::Unsupported {
                field: "read-only pieces in flight per warp",
                value: r.depth.to_string(),
                reason: "bench_read_runs is compiled for 1, 2, 3, 4, 6 and 8",
            });
        }
        if !(1..=32).contains(&r.warps) || r.blocks == 0 || r.pieces_per_warp == 0 {
            return Err(CudaError::Unsupported {
                field: "read-only launch",
                value: format!("{r:?}"),
                reason: "1 to 32 warps per block, at least one block and one piece per warp",
            });
        }
        let need = r.buffer_bytes();
        if need >= 64 << 30 {
            return Err(CudaError::Unsupported {
                field: "read-only launch buffer (bytes)",
                value: need.to_string(),
                reason: "the kernel indexes pieces with 32 bits: under 64 GiB",
            });
        }
        if let Some(b) = bufs.iter().find(|b| b.len() < need) {
            return Err(CudaError::BadInput {
                what: "read-only launch buffer (bytes)",
                expected: need,
                got: b.len(),
            });
        }
        let dependent = r.dependent && self.dependent_launch();
        let entry = format!(
            "bench_read_runs_d{}{}",
            r.depth,
            if dependent { "_dep" } else { "" }
        );
        let f = self.gptq_function(&entry)?;
        let threads = (r.warps * 32) as u32;
        // Dynamic shared memory (unused) keeps the SM to `blocks_per_sm` blocks, as the GEMV's
        // registers and shared memory keep it; the driver reserves 1 KiB per block.
        let mut smem = 0usize;
        if let Some(want) = std::num::NonZeroUsize::new(r.blocks_per_sm) {
            let per_sm = drv(
                "reading the shared memory per SM",
                self.context().attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
                ),
            )? as usize;
            smem = ((per_sm / want).saturating_sub(1024) & !127).min(self.smem_optin());
            while smem >= 1024 && self.resident_blocks(&f, &entry, threads, smem)? < want.get() {
                smem -= 1024;
            }
        }
        let resident = self.resident_blocks(&f, &entry, threads, smem)?;
        Self::allow_smem(&f, smem as u32, &entry)?;
        let sink = self.zeros::<u32>(1)?;
        let cfg = LaunchConfig {
            grid_dim: (r.blocks as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (p, l, tm, zero) = (
            r.pieces_per_strip as i32,
            r.pieces_per_warp as i32,
            r.time_major as i32,
            0i32,
        );
        let ms = self.median_ms(t, |i| {
            let b = &bufs[i % bufs.len()];
            let mut lb = ExLaunch::new(self.stream());
            lb.buf(b).int(p).int(l).int(tm).int(zero).buf(&sink);
            // SAFETY: (const uint4*, int, int, int, u32, u32*) as `bench_read_runs_d*` takes
            // them; b holds every piece the grid reads (checked above), sink one u32. The `_dep`
            // entries wait before anything but their first pieces of b, which no kernel writes.
            drv(format!("launching {entry}"), unsafe {
                lb.launch(&f, cfg, dependent)
            })
        })?;
        Ok((ms, resident))
    }
}

/// The median of `v` (sorted in place); `v` is not empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
