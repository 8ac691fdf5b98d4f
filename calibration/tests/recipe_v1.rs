//! Recipe v1 over the bundled parquet and Mixtral tokenizer, against the numbers the independent
//! Python implementation recorded in `fixtures/reference-ppl.json` (quoted in `fixtures/README.md`).

use std::path::PathBuf;
use std::sync::OnceLock;

use calibration::{build, CalibrationSet, Recipe, DEFAULT_TEMPLATE};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fixtures")
        .join(rel)
}

fn dataset() -> PathBuf {
    fixture("calibration/open-instruct-sample.parquet")
}

fn tokenizer() -> PathBuf {
    fixture("moe-s/tokenizer.json")
}

fn recipe(nsamples: usize, seqlen: usize) -> Recipe {
    Recipe {
        template: DEFAULT_TEMPLATE.to_string(),
        nsamples,
        seqlen,
        seed: 0,
    }
}

fn set_32x512() -> &'static CalibrationSet {
    static SET: OnceLock<CalibrationSet> = OnceLock::new();
    SET.get_or_init(|| build(&dataset(), &tokenizer(), &recipe(32, 512)).expect("32 x 512 builds"))
}

fn set_128x2048() -> &'static CalibrationSet {
    static SET: OnceLock<CalibrationSet> = OnceLock::new();
    SET.get_or_init(|| {
        build(&dataset(), &tokenizer(), &recipe(128, 2048)).expect("128 x 2048 builds")
    })
}

fn id_sum(set: &CalibrationSet) -> i64 {
    set.input_ids.iter().map(|&id| i64::from(id)).sum()
}

#[test]
fn reference_32x512_seed0() {
    let set = set_32x512();
    assert_eq!(set.meta.stream_tokens, 66_247, "stream length");
    assert_eq!(
        &set.window(0)[..8],
        &[28732, 1516, 28731, 13, 359, 17422, 3741, 7011]
    );
    assert_eq!(id_sum(set), 154_731_268, "sum of all ids in all windows");
    assert_eq!(
        (set.nsamples, set.seqlen, set.input_ids.len()),
        (32, 512, 32 * 512)
    );
}

#[test]
fn reference_128x2048_seed0() {
    let set = set_128x2048();
    assert_eq!(set.meta.stream_tokens, 1_048_932, "stream length");
    assert_eq!(
        &set.window(0)[..8],
        &[272, 27556, 286, 13, 1199, 11203, 28725, 4636]
    );
    assert_eq!(id_sum(set), 2_591_492_453, "sum of all ids in all windows");
}

/// The branch defaults (128 x 8192) on the bundled sample: its 3,000 rows fall short of the
/// 4,194,304-token target, so every row is read and the windows still come out.
/// Regression numbers from this implementation: the reference recorded no 128 x 8192 figures.
#[test]
fn branch_defaults_read_every_row_of_the_sample() {
    let set = build(&dataset(), &tokenizer(), &Recipe::default()).expect("128 x 8192 builds");
    assert_eq!(
        (set.meta.rows_read, set.meta.stream_tokens),
        (3000, 1_676_865)
    );
    assert_eq!(
        &set.window(0)[..8],
        &[1395, 22737, 12865, 690, 400, 581, 269, 13]
    );
    assert_eq!(id_sum(&set), 9_903_105_114);
}
