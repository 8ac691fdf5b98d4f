//! `bench kernels`: its options are checked before the GPU is opened, so a bad value is a named
//! usage error (exit code 2) on any machine.

use crate::util::{run_in, text};

fn bench_kernels(args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec!["bench", "kernels"];
    all.extend_from_slice(args);
    run_in(dir.path(), &all)
}

#[test]
fn bad_widths_and_groups_are_named_errors() {
    for (args, want) in [
        (&["--bits", "4,5"][..], "--bits: 5 is not one of 3, 4, 8"),
        (&["--moe-bits", "2"][..], "--moe-bits: 2 is not one of 3, 4, 8"),
        (
            &["--moe-groups", "-1,100"][..],
            "--moe-groups: 100 is neither -1 (per channel) nor a group size dividing 4096 and 14336",
        ),
        (
            &["--moe-groups", "0"][..],
            "--moe-groups: 0 is neither -1",
        ),
        // (a list that starts with -1 is read as values, so the error is the next check's)
        (
            &["--moe-groups", "-1,32", "--bits", "5"][..],
            "--bits: 5 is not one of 3, 4, 8",
        ),
    ] {
        let out = bench_kernels(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {}", text(&out));
        assert!(!stderr.contains("panicked"), "{args:?}: {}", text(&out));
    }
}

/// `bench reads` checks its widths and depths before it opens the GPU, too.
#[test]
fn bench_reads_names_bad_widths_and_depths() {
    for (args, want) in [
        (&["--bits", "4,2"][..], "--bits: 2 is not one of 3, 4, 8"),
        (
            &["--depths", "2,5"][..],
            "--depths: 5 is not one of [1, 2, 3, 4, 6, 8]",
        ),
        (&["--shapes", "4096"][..], "4096"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut all = vec!["bench", "reads"];
        all.extend_from_slice(args);
        let out = run_in(dir.path(), &all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {}", text(&out));
        assert!(!stderr.contains("panicked"), "{args:?}: {}", text(&out));
    }
}
