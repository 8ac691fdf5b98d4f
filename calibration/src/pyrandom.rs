//! CPython's `random.Random`, the parts recipe v1 needs: seeding from an integer, `getrandbits`,
//! `randbelow` and `randint`, bit for bit.
//!
//! Ports `Modules/_randommodule.c` (CPython 3.x: `init_genrand`, `init_by_array`, `genrand_uint32`,
//! `random_seed`, `_random_Random_getrandbits_impl`) and `Lib/random.py`
//! (`_randbelow_with_getrandbits`, `randrange`, `randint`). The generator is MT19937 (Matsumoto and
//! Nishimura 1998). `calibration/tests/data/randint.json` holds outputs of CPython itself, and
//! the tests below replay them.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// CPython's `random.Random`: MT19937 seeded the way `random.Random(seed)` seeds it.
#[derive(Clone)]
pub struct PyRandom {
    state: [u32; N],
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl PyRandom {
    /// `random.Random(seed)` for a non-negative integer seed.
    ///
    /// CPython splits `abs(seed)` into 32-bit words, least significant first (`0` gives the key
    /// `[0]`), and calls `init_by_array(key)`.
    pub fn new(seed: u64) -> Self {
        let low = seed as u32;
        let high = (seed >> 32) as u32;
        if high == 0 {
            Self::from_key(&[low])
        } else {
            Self::from_key(&[low, high])
        }
    }

    /// `init_by_array(key)`; an empty key behaves as CPython's `[0]`.
    pub fn from_key(key: &[u32]) -> Self {
        let key: &[u32] = if key.is_empty() { &[0] } else { key };
        let mut mt = Self::init_genrand(19_650_218);
        let state = &mut mt.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = state[i - 1] ^ (state[i - 1] >> 30);
            state[i] = (state[i] ^ prev.wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                state[0] = state[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = state[i - 1] ^ (state[i - 1] >> 30);
            state[i] = (state[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                state[0] = state[N - 1];
                i = 1;
            }
        }
        state[0] = 0x8000_0000; // MSB is 1, assuring a non-zero initial array
        mt
    }

    fn init_genrand(s: u32) -> Self {
        let mut state = [0u32; N];
        state[0] = s;
        for i in 1..N {
            state[i] = 1_812_433_253u32
                .wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: N }
    }

    fn twist(&mut self) {
        let mt = &mut self.state;
        for kk in 0..N {
            let y = (mt[kk] & UPPER_MASK) | (mt[(kk + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            mt[kk] = mt[(kk + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// `genrand_uint32`: the next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for `0 <= k <= 64`.
    ///
    /// For `k <= 32` CPython returns `genrand_uint32() >> (32 - k)`; above, it fills 32-bit words
    /// least significant first, the last word keeping only its top `k mod 32` bits.
    ///
    /// # Panics
    /// If `k > 64` (an internal misuse: recipe bounds are `u64`).
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!(k <= 64, "getrandbits({k}) exceeds 64 bits");
        if k == 0 {
            return 0;
        }
        if k <= 32 {
            return u64::from(self.next_u32() >> (32 - k));
        }
        let mut result = 0u64;
        let mut left = k;
        let mut shift = 0;
        while left > 0 {
            let mut word = self.next_u32();
            if left < 32 {
                word >>= 32 - left;
            }
            result |= u64::from(word) << shift;
            shift += 32;
            left = left.saturating_sub(32);
        }
        result
    }

    /// `_randbelow_with_getrandbits(n)`: uniform in `[0, n)` by rejection, `k = n.bit_length()`.
    ///
    /// Returns 0 for `n == 0` (CPython raises; callers here never pass 0).
    pub fn randbelow(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let k = 64 - n.leading_zeros();
        let mut r = self.getrandbits(k);
        while r >= n {
            r = self.getrandbits(k);
        }
        r
    }

    /// `randint(a, b)`: uniform in `[a, b]` (both ends included), as `a + randbelow(b - a + 1)`.
    ///
    /// Returns `None` if `b < a` (CPython raises `ValueError`) or if the range is all of `u64`.
    pub fn randint(&mut self, a: u64, b: u64) -> Option<u64> {
        let width = b.checked_sub(a)?.checked_add(1)?;
        Some(a + self.randbelow(width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference MT19937 output for `init_by_array([0x123, 0x234, 0x345, 0x456])`
    /// (Matsumoto and Nishimura's `mt19937ar.out`, first five values).
    #[test]
    fn matches_mt19937ar_reference_output() {
        let mut mt = PyRandom::from_key(&[0x123, 0x234, 0x345, 0x456]);
        let got: Vec<u32> = (0..5).map(|_| mt.next_u32()).collect();
        assert_eq!(
            got,
            [1067595299, 955945823, 477289528, 4107218783, 4228976476]
        );
    }

    #[derive(serde::Deserialize)]
    struct Case {
        seed: u64,
        a: u64,
        b: u64,
        values: Vec<u64>,
    }

    #[derive(serde::Deserialize)]
    struct Bits {
        seed: u64,
        k: u32,
        values: Vec<u64>,
    }

    #[derive(serde::Deserialize)]
    struct Table {
        python: String,
        randint: Vec<Case>,
        getrandbits: Vec<Bits>,
    }

    fn table() -> Table {
        let text = include_str!("../tests/data/randint.json");
        serde_json::from_str(text).expect("tests/data/randint.json parses")
    }

    /// `randint` against a table that CPython produced (`tests/data/randint.py`).
    #[test]
    fn randint_matches_cpython_table() {
        let table = table();
        assert!(
            table.randint.len() >= 20,
            "table from {} too small",
            table.python
        );
        for case in &table.randint {
            let mut rng = PyRandom::new(case.seed);
            let got: Vec<u64> = case
                .values
                .iter()
                .map(|_| rng.randint(case.a, case.b).expect("a <= b"))
                .collect();
            assert_eq!(
                got, case.values,
                "seed {} randint({}, {}) differs from CPython {}",
                case.seed, case.a, case.b, table.python
            );
        }
    }

    /// `getrandbits(k)` against CPython for k below, at and above 32.
    #[test]
    fn getrandbits_matches_cpython_table() {
        let table = table();
        for case in &table.getrandbits {
            let mut rng = PyRandom::new(case.seed);
            let got: Vec<u64> = case
                .values
                .iter()
                .map(|_| rng.getrandbits(case.k))
                .collect();
            assert_eq!(
                got, case.values,
                "seed {} getrandbits({})",
                case.seed, case.k
            );
        }
    }

    #[test]
    fn randint_rejects_empty_range() {
        let mut rng = PyRandom::new(0);
        assert_eq!(rng.randint(5, 4), None);
        assert_eq!(rng.randint(0, u64::MAX), None);
        assert_eq!(rng.randint(7, 7), Some(7));
    }
}
