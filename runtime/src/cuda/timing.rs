//! Timing with CUDA events, for `mixtral-gptq bench kernels`: warm-up, then the median of many
//! runs, each run bracketed by its own pair of events, or (back to back) the median of many
//! batches of runs queued one after another, each batch bracketed by a pair of events.

use std::time::Instant;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::error::{drv, Result};
use super::kernels::GPTQ;

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
        let f = self.function(&GPTQ, "bench_noop")?;
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
    pub fn stream_read_ms(&self, bufs: &[CudaSlice<u8>], t: Timing) -> Result<f64> {
        let f = self.function(&GPTQ, "bench_stream_read")?;
        let sink = self.zeros::<u32>(1)?;
        let cfg = LaunchConfig {
            grid_dim: ((self.sm_count() * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.median_ms(t, |i| {
            let b = &bufs[i % bufs.len()];
            let n16 = b.len() / 16;
            let mut l = self.stream().launch_builder(&f);
            l.arg(b).arg(&n16).arg(&sink);
            // SAFETY: (const uint4*, size_t, u32*) as `bench_stream_read` takes them; b holds at
            // least n16 16-byte words (device allocations are 256-byte aligned); sink one u32.
            drv(
                "launching bench_stream_read",
                unsafe { l.launch(cfg) }.map(|_| ()),
            )
        })
    }
}

/// The median of `v` (sorted in place); `v` is not empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
