//! Every kernel compiles with NVRTC for sm_90. Needs libnvrtc (CUDA 13) and CUDA's headers, no GPU:
//! `.ci/run` installs them from PyPI into a local folder and points MIXTRAL_GPTQ_CUDA_LIB_DIR at it.
//! Without them the test prints why it was skipped.

use runtime::cuda::{kernels, probe};

/// NVRTC and CUDA's headers, or `None` after printing why `test` is skipped.
fn nvrtc_or_skip(test: &str) -> Option<probe::NvrtcSetup> {
    probe::probe_nvrtc()
        .map_err(|e| eprintln!("SKIPPED {test}: {e}"))
        .ok()
}

#[test]
fn every_kernel_compiles_for_sm_90() {
    let Some(setup) = nvrtc_or_skip("every_kernel_compiles_for_sm_90") else {
        return;
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

/// Every tensor-core entry the launches can ask for (`runtime::cuda::gptq::tensor_core_entries`) is
/// in the compiled module: its name, NUL-terminated, is in the cubin's string table. A name the host
/// builds without a kernel behind it would otherwise fail only on a GPU, at its first launch.
#[test]
fn every_tensor_core_entry_the_launches_ask_for_exists() {
    let Some(setup) = nvrtc_or_skip("every_tensor_core_entry_the_launches_ask_for_exists") else {
        return;
    };
    let cubin = kernels::compile(&kernels::GPTQ, "sm_90", &setup).unwrap_or_else(|e| panic!("{e}"));
    let names = runtime::cuda::gptq::tensor_core_entries();
    assert!(names.len() >= 40, "only {} entries listed", names.len());
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| {
            let needle = format!("{name}\0");
            !cubin.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "entries the launches ask for but the module lacks: {missing:?}"
    );
    eprintln!("{} tensor-core entries present", names.len());
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

/// The register-pipelined GEMV entries issue their first weight loads before they wait for the
/// previous kernel (`pdl_wait_after_loads` in kernels/gptq.cu): in the SASS of every
/// `gptq_mmad_gemv_*` and `gptq_mmadg_gemv_*` function, each `griddepcontrol.wait` (ACQBULK) comes
/// after a weight load (LDG.E.NA.128) of its own code path. Without the guard ptxas hoisted the wait
/// to the top of every entry, which took away the loads' head start (BENCHMARKS.md). Needs NVRTC and
/// CUDA's `cuobjdump` and `nvdisasm` (`.ci/run` installs them from PyPI; MIXTRAL_GPTQ_CUDA_BIN_DIR
/// names their folder); without them the test prints why it was skipped.
#[test]
fn gemv_entries_load_weights_before_the_dependent_launch_wait() {
    let Some(setup) = nvrtc_or_skip("gemv_entries_load_weights_before_the_dependent_launch_wait")
    else {
        return;
    };
    let bin = std::env::var_os("MIXTRAL_GPTQ_CUDA_BIN_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("MIXTRAL_GPTQ_CUDA_LIB_DIR")
                .map(|l| std::path::PathBuf::from(l).join("../bin"))
        });
    let Some(bin) = bin.filter(|b| b.join("cuobjdump").is_file() && b.join("nvdisasm").is_file())
    else {
        eprintln!(
            "SKIPPED gemv_entries_load_weights_before_the_dependent_launch_wait: no cuobjdump and \
             nvdisasm (set MIXTRAL_GPTQ_CUDA_BIN_DIR)"
        );
        return;
    };
    let cubin = kernels::compile(&kernels::GPTQ, "sm_90", &setup).unwrap_or_else(|e| panic!("{e}"));
    let path = std::env::temp_dir().join(format!("gptq-sm_90-{}.cubin", std::process::id()));
    std::fs::write(&path, &cubin).unwrap();
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let paths = std::iter::once(bin.clone()).chain(std::env::split_paths(&path_var));
    let out = std::process::Command::new(bin.join("cuobjdump"))
        .arg("-sass")
        .arg(&path)
        .env("PATH", std::env::join_paths(paths).unwrap())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "cuobjdump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sass = String::from_utf8(out.stdout).unwrap();

    let mut checked = 0;
    for function in sass.split("Function : ").skip(1) {
        let name = function.split_whitespace().next().unwrap_or_default();
        if !(name.starts_with("gptq_mmad_gemv_") || name.starts_with("gptq_mmadg_gemv_")) {
            continue;
        }
        let (mut waits, mut loaded) = (0, false);
        for line in function.lines() {
            if line.contains("LDG.E.NA.128") {
                loaded = true;
            } else if line.contains("ACQBULK") {
                assert!(
                    loaded,
                    "{name}: griddepcontrol.wait {} comes before any weight load of its path",
                    waits + 1
                );
                waits += 1;
                loaded = false;
            }
        }
        assert!(waits > 0, "{name}: no griddepcontrol.wait found");
        eprintln!("{name}: {waits} waits, each after weight loads");
        checked += 1;
    }
    assert_eq!(
        checked, 26,
        "expected 18 gptq_mmad_gemv entries (plain, _gather, _gather_slice) and 8 gptq_mmadg_gemv (plain, _gather)"
    );
}
