//! Perplexity over a token stream under a named convention.
//!
//! Two conventions (fixtures/README.md "Perplexity conventions", gptq-spec.md section 3):
//!
//! - **gptq** (`gptq-2048`, the GPTQ paper's `llama_eval`): non-overlapping windows
//!   `ids[k*ctx .. (k+1)*ctx]` for `k < len / ctx` (the tail is dropped); every position but the
//!   last predicts the next token; `ppl = exp(Σ nll / predictions)` with `ctx - 1` predictions per
//!   window (the paper divides by `ctx` instead; the fixture reference divides by predictions).
//! - **llamacpp** (`llamacpp-512`, llama.cpp `perplexity`): the same chunks, but the first token of
//!   each chunk is replaced by BOS (id 1) and only positions `ctx/2 ..= ctx-2` are scored, each
//!   predicting the next token; `ppl = exp(mean nll)`.
//!
//! The model is behind the small [`Scorer`] trait, so the conventions are testable with a fake
//! model and any backend (CPU, CUDA) can plug in.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, ScorerError};
use crate::tokenize::BOS_ID;

/// A model that gives, for a window of ids, the negative log-likelihood (natural log) of
/// `window[t+1]` given `window[..=t]` for `t = 0 .. len-1` (so `len - 1` values).
pub trait Scorer {
    /// Scores one window; must return exactly `window.len() - 1` values.
    fn nll(&mut self, window: &[u32]) -> std::result::Result<Vec<f32>, ScorerError>;
}

/// Which rule picks windows and scored positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConventionKind {
    /// The GPTQ paper's: every prediction of non-overlapping windows.
    Gptq,
    /// llama.cpp `perplexity`'s: BOS-led chunks, second half scored.
    Llamacpp,
}

impl ConventionKind {
    /// The name used in labels (`gptq`, `llamacpp`).
    pub fn name(self) -> &'static str {
        match self {
            ConventionKind::Gptq => "gptq",
            ConventionKind::Llamacpp => "llamacpp",
        }
    }

    /// The context length the convention is named with (2048, 512).
    pub fn default_ctx(self) -> usize {
        match self {
            ConventionKind::Gptq => 2048,
            ConventionKind::Llamacpp => 512,
        }
    }
}

/// A convention with its context length, e.g. `gptq-2048` or `llamacpp-512`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Convention {
    /// The rule.
    pub kind: ConventionKind,
    /// Tokens per window.
    pub ctx: usize,
}

impl Convention {
    /// `gptq-2048`.
    pub const GPTQ_2048: Convention = Convention {
        kind: ConventionKind::Gptq,
        ctx: 2048,
    };
    /// `llamacpp-512`.
    pub const LLAMACPP_512: Convention = Convention {
        kind: ConventionKind::Llamacpp,
        ctx: 512,
    };
    /// Both standard conventions, in the order reports list them.
    pub const ALL: [Convention; 2] = [Convention::GPTQ_2048, Convention::LLAMACPP_512];

    /// Checks that the context length is usable (at least 2 for gptq, 4 for llamacpp).
    pub fn validate(self) -> Result<Self> {
        let min = match self.kind {
            ConventionKind::Gptq => 2,
            ConventionKind::Llamacpp => 4,
        };
        if self.ctx < min {
            return Err(Error::ContextTooSmall {
                convention: self.to_string(),
                ctx: self.ctx,
                min,
            });
        }
        Ok(self)
    }

    /// The positions `t` of a window whose prediction of `window[t+1]` is scored.
    pub fn scored_positions(self) -> std::ops::Range<usize> {
        match self.kind {
            ConventionKind::Gptq => 0..self.ctx - 1,
            ConventionKind::Llamacpp => self.ctx / 2..self.ctx - 1,
        }
    }

    /// Number of windows for a stream of `tokens` ids (the tail is dropped).
    pub fn windows(self, tokens: usize) -> usize {
        tokens / self.ctx
    }
}

impl fmt::Display for Convention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.kind.name(), self.ctx)
    }
}

impl FromStr for Convention {
    type Err = Error;

    /// Parses `gptq`, `llamacpp`, or either followed by `-<ctx>`.
    fn from_str(s: &str) -> Result<Self> {
        let unknown = || Error::UnknownConvention {
            name: s.to_string(),
        };
        let (name, ctx) = match s.rsplit_once('-') {
            Some((name, ctx)) => (name, Some(ctx.parse::<usize>().map_err(|_| unknown())?)),
            None => (s, None),
        };
        let kind = match name {
            "gptq" => ConventionKind::Gptq,
            "llamacpp" => ConventionKind::Llamacpp,
            _ => return Err(unknown()),
        };
        Convention {
            kind,
            ctx: ctx.unwrap_or(kind.default_ctx()),
        }
        .validate()
    }
}

/// The result of one perplexity run: what was measured and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Perplexity {
    /// Label, e.g. `gptq-2048`.
    pub convention: String,
    /// The rule.
    pub kind: ConventionKind,
    /// Tokens per window.
    pub ctx: usize,
    /// Tokens in the encoded text (BOS included).
    pub tokens: usize,
    /// Windows evaluated (`tokens / ctx`).
    pub windows: usize,
    /// Scored predictions (windows × scored positions per window).
    pub predictions: usize,
    /// Sum of the scored negative log-likelihoods (nats).
    pub nll_sum: f64,
    /// `exp(nll_sum / predictions)`.
    pub ppl: f64,
    /// Wall-clock seconds spent scoring.
    pub seconds: f64,
}

impl Perplexity {
    /// One line that states everything needed to compare the number.
    pub fn summary(&self) -> String {
        format!(
            "{}: ppl {:.4} | ctx {} | {} tokens | {} windows | {} scored predictions | {:.1} s",
            self.convention,
            self.ppl,
            self.ctx,
            self.tokens,
            self.windows,
            self.predictions,
            self.seconds
        )
    }
}

/// Evaluates `ids` under `convention` with `scorer`.
///
/// `progress(done, total)` is called after each window (and once with `done = 0`).
///
/// # Errors
/// [`Error::TextTooShort`] if there is not one whole window; scorer errors, wrong lengths and
/// non-finite values are reported with the window index.
pub fn evaluate(
    scorer: &mut dyn Scorer,
    ids: &[u32],
    convention: Convention,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let convention = convention.validate()?;
    let ctx = convention.ctx;
    let windows = convention.windows(ids.len());
    if windows == 0 {
        return Err(Error::TextTooShort {
            convention: convention.to_string(),
            tokens: ids.len(),
            ctx,
        });
    }
    let scored = convention.scored_positions();
    let start = Instant::now();
    let mut nll_sum = 0f64;
    let mut predictions = 0usize;
    let mut window = vec![0u32; ctx];
    progress(0, windows);
    for k in 0..windows {
        window.copy_from_slice(&ids[k * ctx..(k + 1) * ctx]);
        if convention.kind == ConventionKind::Llamacpp {
            window[0] = BOS_ID;
        }
        let nll = scorer.nll(&window).map_err(|source| Error::Scorer {
            window: k,
            windows,
            source,
        })?;
        if nll.len() != ctx - 1 {
            return Err(Error::ScorerLength {
                window: k,
                expected: ctx - 1,
                got: nll.len(),
            });
        }
        for t in scored.clone() {
            let value = nll[t];
            if !value.is_finite() {
                return Err(Error::NonFinite {
                    window: k,
                    position: t,
                    value,
                });
            }
            nll_sum += f64::from(value);
        }
        predictions += scored.len();
        progress(k + 1, windows);
    }
    Ok(Perplexity {
        convention: convention.to_string(),
        kind: convention.kind,
        ctx,
        tokens: ids.len(),
        windows,
        predictions,
        nll_sum,
        ppl: (nll_sum / predictions as f64).exp(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model: records each window it sees and returns NLL = f(window[t], window[t+1], t),
    /// so a test can recompute exactly which positions must be summed.
    struct Fake {
        seen: Vec<Vec<u32>>,
    }

    fn fake_nll(cur: u32, next: u32, t: usize) -> f32 {
        ((cur % 7) as f32) * 0.25 + ((next % 5) as f32) * 0.125 + (t % 3) as f32 * 0.0625
    }

    impl Scorer for Fake {
        fn nll(&mut self, w: &[u32]) -> std::result::Result<Vec<f32>, ScorerError> {
            self.seen.push(w.to_vec());
            Ok((0..w.len() - 1)
                .map(|t| fake_nll(w[t], w[t + 1], t))
                .collect())
        }
    }

    fn stream(n: usize) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..n as u32)
            .map(|i| 3 + (i * 2654435761u32) % 31991)
            .collect();
        ids[0] = BOS_ID;
        ids
    }

    /// Sums are exact in f64 for these dyadic values, so compare for equality.
    #[test]
    fn gptq_scores_every_prediction_of_whole_windows() {
        let ids = stream(2 * 16 + 5);
        let mut fake = Fake { seen: vec![] };
        let conv: Convention = "gptq-16".parse().unwrap();
        let r = evaluate(&mut fake, &ids, conv, &mut |_, _| {}).unwrap();
        assert_eq!(
            fake.seen,
            vec![ids[0..16].to_vec(), ids[16..32].to_vec()],
            "windows, tail dropped, no BOS added"
        );
        let mut expected = 0f64;
        for k in 0..2 {
            for t in 0..15 {
                expected += f64::from(fake_nll(ids[k * 16 + t], ids[k * 16 + t + 1], t));
            }
        }
        assert_eq!((r.windows, r.predictions, r.tokens, r.ctx), (2, 30, 37, 16));
        assert_eq!(r.nll_sum, expected);
        assert_eq!(r.ppl, (expected / 30.0).exp());
        assert_eq!(r.convention, "gptq-16");
    }

    #[test]
    fn llamacpp_replaces_first_token_and_scores_second_half() {
        let ids = stream(3 * 16 + 15);
        let mut fake = Fake { seen: vec![] };
        let conv = Convention {
            kind: ConventionKind::Llamacpp,
            ctx: 16,
        };
        let r = evaluate(&mut fake, &ids, conv, &mut |_, _| {}).unwrap();
        assert_eq!(fake.seen.len(), 3);
        let mut expected = 0f64;
        for (k, w) in fake.seen.iter().enumerate() {
            assert_eq!(w[0], BOS_ID, "chunk {k} starts with BOS");
            assert_eq!(
                &w[1..],
                &ids[k * 16 + 1..(k + 1) * 16],
                "chunk {k} otherwise unchanged"
            );
            // positions 8..=14 predict tokens 9..=15
            for t in 8..15 {
                expected += f64::from(fake_nll(w[t], w[t + 1], t));
            }
        }
        assert_eq!(r.predictions, 3 * 7);
        assert_eq!(r.nll_sum, expected);
        assert_eq!(r.ppl, (expected / 21.0).exp());
    }

    #[test]
    fn standard_conventions_score_the_documented_positions() {
        assert_eq!(Convention::GPTQ_2048.scored_positions(), 0..2047);
        // llama.cpp: first = n_ctx/2 = 256, last scored logit at n_ctx-2 = 510.
        assert_eq!(Convention::LLAMACPP_512.scored_positions(), 256..511);
        assert_eq!(Convention::LLAMACPP_512.scored_positions().len(), 255);
        assert_eq!(Convention::GPTQ_2048.windows(179_497), 87);
        assert_eq!(Convention::LLAMACPP_512.windows(179_497), 350);
    }

    #[test]
    fn parsing_and_labels() {
        assert_eq!(
            "gptq-2048".parse::<Convention>().unwrap(),
            Convention::GPTQ_2048
        );
        assert_eq!(
            "llamacpp".parse::<Convention>().unwrap(),
            Convention::LLAMACPP_512
        );
        assert_eq!(
            "llamacpp-1024".parse::<Convention>().unwrap().to_string(),
            "llamacpp-1024"
        );
        for bad in ["wikitext", "gptq-x", "llamacpp-2", "gptq-0"] {
            assert!(bad.parse::<Convention>().is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_window() {
        struct Short;
        impl Scorer for Short {
            fn nll(&mut self, w: &[u32]) -> std::result::Result<Vec<f32>, ScorerError> {
                Ok(vec![1.0; w.len() - 2])
            }
        }
        let ids = stream(40);
        let err =
            evaluate(&mut Short, &ids, "gptq-16".parse().unwrap(), &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ScorerLength {
                    window: 0,
                    expected: 15,
                    got: 14
                }
            ),
            "{err}"
        );
        let err = evaluate(
            &mut Short,
            &ids[..10],
            "gptq-16".parse().unwrap(),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("10 tokens"), "{err}");

        struct Nan;
        impl Scorer for Nan {
            fn nll(&mut self, w: &[u32]) -> std::result::Result<Vec<f32>, ScorerError> {
                let mut v = vec![1.0; w.len() - 1];
                v[3] = f32::NAN;
                Ok(v)
            }
        }
        let err = evaluate(&mut Nan, &ids, "gptq-16".parse().unwrap(), &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NonFinite {
                    window: 0,
                    position: 3,
                    ..
                }
            ),
            "{err}"
        );
        // llamacpp-16 does not score position 3, so the NaN there is not read.
        assert!(evaluate(
            &mut Nan,
            &ids,
            "llamacpp-16".parse().unwrap(),
            &mut |_, _| {}
        )
        .is_ok());
    }

    #[test]
    fn progress_reports_each_window() {
        let ids = stream(50);
        let mut calls = vec![];
        evaluate(
            &mut Fake { seen: vec![] },
            &ids,
            "gptq-16".parse().unwrap(),
            &mut |d, t| calls.push((d, t)),
        )
        .unwrap();
        assert_eq!(calls, vec![(0, 3), (1, 3), (2, 3), (3, 3)]);
    }
}
