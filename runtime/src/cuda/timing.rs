//! Timing with CUDA events, for `mixtral-gptq bench kernels`: warm-up, then the median of many
//! runs, each run bracketed by its own pair of events.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::error::{drv, Result};
use super::kernels::GPTQ;

impl CudaDevice {
    /// Median milliseconds of `run(i)` over `iters` runs after `warmup` runs (i counts from 0 across
    /// both, so callers can rotate inputs with `i % copies`).
    pub fn median_ms(
        &self,
        warmup: usize,
        iters: usize,
        mut run: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        for i in 0..warmup {
            run(i)?;
        }
        self.synchronize()?;
        // Keep the GPU busy while the host queues the timed runs, so that host launch overhead does
        // not show up as idle time between an event and its kernel (10 ms covers 100 queued runs at up
        // to 100 us of host time each).
        self.busy_wait_ms(10.0)?;
        let events: Vec<_> = (0..=iters)
            .map(|_| self.timing_event())
            .collect::<Result<_>>()?;
        drv("recording an event", events[0].record(self.stream()))?;
        for i in 0..iters {
            run(warmup + i)?;
            drv("recording an event", events[i + 1].record(self.stream()))?;
        }
        self.synchronize()?;
        let mut times = Vec::with_capacity(iters);
        for w in events.windows(2) {
            times.push(drv("reading an event", w[0].elapsed_ms(&w[1]))? as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
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
        let ms = self.median_ms(3, iters, |_| {
            drv(
                "copying on the device",
                self.stream().memcpy_dtod(&src, &mut dst),
            )
        })?;
        Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
    }

    /// Median milliseconds of an empty kernel launch between two events (`bench_noop`).
    pub fn empty_kernel_ms(&self, warmup: usize, iters: usize) -> Result<f64> {
        let f = self.function(&GPTQ, "bench_noop")?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.median_ms(warmup, iters, |_| {
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
    pub fn stream_read_ms(
        &self,
        bufs: &[CudaSlice<u8>],
        warmup: usize,
        iters: usize,
    ) -> Result<f64> {
        let f = self.function(&GPTQ, "bench_stream_read")?;
        let sink = self.zeros::<u32>(1)?;
        let cfg = LaunchConfig {
            grid_dim: ((self.sm_count() * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.median_ms(warmup, iters, |i| {
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
