//! Timing with CUDA events, for `mixtral-gptq bench kernels`: warm-up, then the median of many
//! runs, each run bracketed by its own pair of events.

use cudarc::driver::CudaSlice;

use super::device::CudaDevice;
use super::error::{drv, Result};

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
        let mut times = Vec::with_capacity(iters);
        let (start, end) = (self.timing_event()?, self.timing_event()?);
        for i in 0..iters {
            drv("recording an event", start.record(self.stream()))?;
            run(warmup + i)?;
            drv("recording an event", end.record(self.stream()))?;
            drv("waiting for an event", end.synchronize())?;
            times.push(drv("reading an event", start.elapsed_ms(&end))? as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
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
}
