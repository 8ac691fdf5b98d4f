//! Recipe v1 step 4: window starts drawn as CPython's
//! `rnd = random.Random(seed); [rnd.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples)]`.

use crate::pyrandom::PyRandom;

/// The start offsets of `nsamples` windows of `seqlen` tokens in a stream of `stream_len` tokens.
///
/// Returns `None` when `stream_len <= seqlen` (CPython's `randint` would raise: the range
/// `[0, stream_len - seqlen - 1]` is empty).
pub fn window_starts(
    stream_len: usize,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Option<Vec<usize>> {
    let last = stream_len.checked_sub(seqlen)?.checked_sub(1)?;
    let mut rng = PyRandom::new(seed);
    (0..nsamples)
        .map(|_| rng.randint(0, last as u64).map(|start| start as usize))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_stay_inside_and_match_randint() {
        let starts = window_starts(100, 50, 10, 7).unwrap();
        assert!(starts.iter().all(|&s| s + 10 <= 99));
        let mut rng = PyRandom::new(7);
        let again: Vec<usize> = (0..50)
            .map(|_| rng.randint(0, 89).unwrap() as usize)
            .collect();
        assert_eq!(starts, again);
    }

    #[test]
    fn too_short_streams_have_no_windows() {
        assert_eq!(window_starts(10, 1, 10, 0), None);
        assert_eq!(window_starts(5, 1, 10, 0), None);
        assert_eq!(window_starts(11, 3, 10, 0), Some(vec![0, 0, 0]));
    }
}
