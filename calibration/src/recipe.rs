//! Recipe v1: how rows become text, and how many windows of which length are drawn.
//!
//! See `fixtures/README.md`, "Calibration recipe v1". The recipe is written into every saved
//! [`crate::CalibrationSet`] so that a branch records exactly what it was calibrated on.

use crate::error::{Error, Result};

/// The version of the recipe this crate implements, recorded in saved sets.
pub const RECIPE_VERSION: &str = "v1";

/// Mixtral's instruction format, the row template of recipe v1.
pub const DEFAULT_TEMPLATE: &str = "[INST] {instruction} [/INST] {response}";

/// The string columns of VMware/open-instruct, the only placeholders a template may use.
pub const COLUMNS: [&str; 5] = [
    "instruction",
    "alpaca_prompt",
    "response",
    "source",
    "task_name",
];

/// How many stream tokens recipe v1 reads per window token: rows are read until the stream holds
/// `STREAM_FACTOR * nsamples * seqlen` tokens.
pub const STREAM_FACTOR: usize = 4;

/// The parameters of recipe v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// Per-row text, with `{column}` placeholders (`{{`/`}}` for literal braces).
    pub template: String,
    /// Number of windows.
    pub nsamples: usize,
    /// Tokens per window.
    pub seqlen: usize,
    /// Seed of CPython's `random.Random(seed)` that draws the window starts.
    pub seed: u64,
}

impl Default for Recipe {
    /// The published branches' recipe: 128 windows of 8192 tokens, seed 0, Mixtral's format.
    fn default() -> Self {
        Self {
            template: DEFAULT_TEMPLATE.to_string(),
            nsamples: 128,
            seqlen: 8192,
            seed: 0,
        }
    }
}

impl Recipe {
    /// Rows are read until the stream holds this many tokens (`4 * nsamples * seqlen`).
    pub fn target_tokens(&self) -> usize {
        STREAM_FACTOR
            .saturating_mul(self.nsamples)
            .saturating_mul(self.seqlen)
    }

    /// Checks the numbers and parses the template.
    ///
    /// # Errors
    /// [`Error::BadRecipe`] for `nsamples == 0` or `seqlen == 0`; template errors from
    /// [`Template::parse`].
    pub fn validate(&self) -> Result<Template> {
        if self.nsamples == 0 {
            return Err(Error::BadRecipe {
                what: "nsamples",
                expected: ">= 1",
                got: "0".into(),
            });
        }
        if self.seqlen == 0 {
            return Err(Error::BadRecipe {
                what: "seqlen",
                expected: ">= 1",
                got: "0".into(),
            });
        }
        if self
            .nsamples
            .checked_mul(self.seqlen)
            .and_then(|n| n.checked_mul(4))
            .is_none()
        {
            return Err(Error::BadRecipe {
                what: "nsamples * seqlen",
                expected: "small enough to count in memory",
                got: format!("{} * {}", self.nsamples, self.seqlen),
            });
        }
        Template::parse(&self.template)
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    /// Index into [`COLUMNS`].
    Column(usize),
}

/// A parsed row template: literal text and column placeholders, Python `str.format` style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `{column}` placeholders; `{{` and `}}` are literal braces.
    ///
    /// # Errors
    /// [`Error::UnknownPlaceholder`] for a name outside [`COLUMNS`]; [`Error::BadTemplate`] for an
    /// unmatched brace.
    pub fn parse(template: &str) -> Result<Self> {
        let bad = |reason, at| Error::BadTemplate {
            template: template.to_string(),
            reason,
            at,
        };
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = template.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(bad("unmatched `}`", at)),
                '{' => {
                    let rest = &template[at + 1..];
                    let close = rest.find('}').ok_or_else(|| bad("unclosed `{`", at))?;
                    let name = &rest[..close];
                    let column = COLUMNS.iter().position(|&c| c == name).ok_or_else(|| {
                        Error::UnknownPlaceholder {
                            template: template.to_string(),
                            name: name.to_string(),
                            expected: COLUMNS.to_vec(),
                        }
                    })?;
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Column(column));
                    // Skip the name and the closing brace.
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Self { pieces })
    }

    /// The columns the template uses, as indices into [`COLUMNS`], in first-use order.
    pub fn columns(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for piece in &self.pieces {
            if let Piece::Column(c) = piece {
                if !out.contains(c) {
                    out.push(*c);
                }
            }
        }
        out
    }

    /// Fills the placeholders; `value(c)` gives the row's string for column `COLUMNS[c]`.
    pub fn render<'a>(&self, value: impl Fn(usize) -> &'a str) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Column(c) => out.push_str(value(*c)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(c: usize) -> &'static str {
        ["INS", "ALP", "RESP", "SRC", "TASK"][c]
    }

    #[test]
    fn default_template_renders_mixtral_format() {
        let t = Template::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(t.render(row), "[INST] INS [/INST] RESP");
        assert_eq!(t.columns(), vec![0, 2]);
    }

    #[test]
    fn all_columns_and_escaped_braces() {
        let t = Template::parse("{{x}} {task_name}/{source}: {alpaca_prompt}{response}{{").unwrap();
        assert_eq!(t.render(row), "{x} TASK/SRC: ALPRESP{");
        assert_eq!(t.columns(), vec![4, 3, 1, 2]);
        let t = Template::parse("é{instruction}é").unwrap();
        assert_eq!(t.render(row), "éINSé");
    }

    #[test]
    fn unknown_placeholder_is_an_error_naming_it() {
        let err = Template::parse("[INST] {question} [/INST]").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::UnknownPlaceholder { ref name, .. } if name == "question"));
        assert!(
            msg.contains("`{question}`") && msg.contains("alpaca_prompt"),
            "{msg}"
        );
    }

    #[test]
    fn unmatched_braces_are_errors() {
        assert!(matches!(
            Template::parse("a {instruction"),
            Err(Error::BadTemplate { at: 2, .. })
        ));
        assert!(matches!(
            Template::parse("a } b"),
            Err(Error::BadTemplate { at: 2, .. })
        ));
    }

    #[test]
    fn recipe_defaults_are_the_branch_defaults() {
        let r = Recipe::default();
        assert_eq!((r.nsamples, r.seqlen, r.seed), (128, 8192, 0));
        assert_eq!(r.template, DEFAULT_TEMPLATE);
        assert_eq!(r.target_tokens(), 4 * 128 * 8192);
        let zero = Recipe {
            nsamples: 0,
            ..Recipe::default()
        };
        assert!(matches!(
            zero.validate(),
            Err(Error::BadRecipe {
                what: "nsamples",
                ..
            })
        ));
    }
}
