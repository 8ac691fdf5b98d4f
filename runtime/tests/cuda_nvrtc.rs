//! Every kernel compiles with NVRTC for sm_90. Needs libnvrtc (CUDA 13) and CUDA's headers, no GPU:
//! `.ci/run` installs them from PyPI into a local folder and points MIXTRAL_GPTQ_CUDA_LIB_DIR at it.
//! Without them the test prints why it was skipped.

use runtime::cuda::{kernels, probe};

#[test]
fn every_kernel_compiles_for_sm_90() {
    let setup = match probe::probe_nvrtc() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIPPED every_kernel_compiles_for_sm_90: {e}");
            return;
        }
    };
    eprintln!(
        "NVRTC {:?} from {}, headers {:?}",
        kernels::nvrtc_version(),
        setup.nvrtc.location,
        setup.include_dirs
    );
    for k in kernels::ALL {
        let t = std::time::Instant::now();
        let cubin = kernels::compile_uncached(k, "sm_90", &setup).unwrap_or_else(|e| panic!("{e}"));
        // An ELF cubin.
        assert_eq!(
            &cubin[..4],
            b"\x7fELF",
            "{}: NVRTC output is not a cubin",
            k.name
        );
        eprintln!(
            "{}: {} bytes of sm_90 cubin in {:.1} s",
            k.name,
            cubin.len(),
            t.elapsed().as_secs_f64()
        );
    }
}

/// Fills the kernel cache (MIXTRAL_GPTQ_KERNEL_CACHE) with sm_90 cubins, so that a GPU machine can
/// skip NVRTC's first-use compile: `cargo test -p runtime --test cuda_nvrtc -- --ignored`.
#[test]
#[ignore = "writes the kernel cache; run by hand"]
fn precompile_cache_for_sm_90() {
    let setup = probe::probe_nvrtc().unwrap_or_else(|e| panic!("{e}"));
    for k in kernels::ALL {
        kernels::compile(k, "sm_90", &setup).unwrap_or_else(|e| panic!("{e}"));
    }
}
