//! Comparison of branches against the unquantized model: one table per evaluation text, rendered
//! for the terminal and as Markdown, CSV and JSON.
//!
//! The binary fills one [`BranchSummary`] per branch directory (its `quantize_config.json`,
//! `quant_report.json`, weight files and stored `eval.json`) and one for the bf16 model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::perplexity::Convention;

/// What the comparison and the model card need to know about one branch (or the bf16 model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BranchSummary {
    /// Branch name (`main`, `gptq-4bit-128g-actorder_True`) or `bf16` for the unquantized model.
    pub name: String,
    /// Bits per weight; `None` for the unquantized model.
    pub bits: Option<u32>,
    /// Group size, -1 for none; `None` for the unquantized model.
    pub group_size: Option<i32>,
    /// Act-order (`desc_act`); `None` for the unquantized model.
    pub desc_act: Option<bool>,
    /// GPTQ damping (`damp_percent`), when known.
    pub damp_percent: Option<f64>,
    /// Calibration dataset, when known.
    pub dataset: Option<String>,
    /// Calibration sequence length, when known.
    pub seqlen: Option<usize>,
    /// Bytes of the weight files (`*.safetensors`).
    pub size_bytes: u64,
    /// Perplexity by `"{text}/{convention}"`.
    pub ppl: BTreeMap<String, f64>,
    /// Seconds the quantization took, when known.
    pub quant_seconds: Option<f64>,
}

impl BranchSummary {
    /// Whether this is the unquantized reference.
    pub fn is_baseline(&self) -> bool {
        self.bits.is_none()
    }

    /// The text names this summary has results for.
    fn texts(&self) -> impl Iterator<Item = &str> {
        self.ppl
            .keys()
            .filter_map(|k| k.split_once('/').map(|(t, _)| t))
    }

    /// The convention labels this summary has results for.
    fn conventions(&self) -> impl Iterator<Item = &str> {
        self.ppl
            .keys()
            .filter_map(|k| k.split_once('/').map(|(_, c)| c))
    }
}

/// One row of a comparison table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Branch name, `bf16` for the reference.
    pub branch: String,
    /// Bits, `None` for bf16.
    pub bits: Option<u32>,
    /// Group size (-1 = none), `None` for bf16.
    pub group_size: Option<i32>,
    /// Act-order, `None` for bf16.
    pub desc_act: Option<bool>,
    /// Bytes of the weight files.
    pub size_bytes: u64,
    /// Perplexity per convention (same order as [`Table::conventions`]).
    pub ppl: Vec<Option<f64>>,
    /// `100 · (ppl / ppl_bf16 − 1)` per convention.
    pub delta_pct: Vec<Option<f64>>,
    /// Quantization time in seconds.
    pub quant_seconds: Option<f64>,
}

/// The comparison for one evaluation text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// The text's name.
    pub text: String,
    /// Convention labels, columns of the perplexity and difference groups.
    pub conventions: Vec<String>,
    /// bf16 first, then the branches in the order given.
    pub rows: Vec<Row>,
}

/// Builds one table per evaluation text found in any summary (texts sorted by name; conventions
/// in the order gptq, llamacpp, then by context).
pub fn build_tables(baseline: &BranchSummary, branches: &[BranchSummary]) -> Vec<Table> {
    let all: Vec<&BranchSummary> = std::iter::once(baseline).chain(branches).collect();
    let mut texts: Vec<&str> = all.iter().flat_map(|s| s.texts()).collect();
    texts.sort_unstable();
    texts.dedup();
    let mut conventions: Vec<&str> = all.iter().flat_map(|s| s.conventions()).collect();
    conventions.sort_by_key(|c| match c.parse::<Convention>() {
        Ok(conv) => (conv.kind.name() != "gptq", conv.ctx, c.to_string()),
        Err(_) => (true, usize::MAX, c.to_string()),
    });
    conventions.dedup();
    texts
        .into_iter()
        .map(|text| {
            let convs: Vec<&str> = conventions
                .iter()
                .copied()
                .filter(|c| {
                    all.iter()
                        .any(|s| s.ppl.contains_key(&format!("{text}/{c}")))
                })
                .collect();
            let base: Vec<Option<f64>> = convs
                .iter()
                .map(|c| baseline.ppl.get(&format!("{text}/{c}")).copied())
                .collect();
            let rows = all
                .iter()
                .map(|s| {
                    let ppl: Vec<Option<f64>> = convs
                        .iter()
                        .map(|c| s.ppl.get(&format!("{text}/{c}")).copied())
                        .collect();
                    let delta_pct = ppl
                        .iter()
                        .zip(&base)
                        .map(|(p, b)| match (p, b) {
                            (Some(p), Some(b)) => Some(100.0 * (p / b - 1.0)),
                            _ => None,
                        })
                        .collect();
                    Row {
                        branch: s.name.clone(),
                        bits: s.bits,
                        group_size: s.group_size,
                        desc_act: s.desc_act,
                        size_bytes: s.size_bytes,
                        ppl,
                        delta_pct,
                        quant_seconds: s.quant_seconds,
                    }
                })
                .collect();
            Table {
                text: text.to_string(),
                conventions: convs.iter().map(|c| c.to_string()).collect(),
                rows,
            }
        })
        .collect()
}

/// Bytes as decimal megabytes or gigabytes, as the Hub shows sizes (`59.3 MB`, `23.81 GB`).
pub fn format_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

/// Seconds as `12.3 s`, `4m 05s` or `1h 02m`.
pub fn format_duration(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{seconds:.1} s")
    } else if seconds < 3600.0 {
        format!(
            "{}m {:02}s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    } else {
        format!(
            "{}h {:02}m",
            (seconds / 3600.0) as u64,
            ((seconds % 3600.0) / 60.0) as u64
        )
    }
}

/// Group size as TheBloke's README writes it (`None` for -1).
pub fn format_group_size(group_size: Option<i32>) -> String {
    match group_size {
        None => "-".into(),
        Some(g) if g <= 0 => "None".into(),
        Some(g) => g.to_string(),
    }
}

fn format_bits(bits: Option<u32>) -> String {
    bits.map_or("bf16".into(), |b| b.to_string())
}

fn format_act(desc_act: Option<bool>) -> String {
    match desc_act {
        None => "-".into(),
        Some(true) => "Yes".into(),
        Some(false) => "No".into(),
    }
}

fn format_ppl(p: Option<f64>) -> String {
    p.map_or("-".into(), |p| format!("{p:.4}"))
}

fn format_delta(d: Option<f64>, baseline: bool) -> String {
    match d {
        _ if baseline => "ref".into(),
        // Print a difference that rounds to zero as `+0.00 %`, never `-0.00 %`.
        Some(d) if d.abs() < 0.005 => "+0.00 %".into(),
        Some(d) => format!("{d:+.2} %"),
        None => "-".into(),
    }
}

impl Table {
    /// Column headers.
    pub fn headers(&self) -> Vec<String> {
        let mut h: Vec<String> = ["branch", "bits", "group size", "act-order", "size on disk"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        h.extend(self.conventions.iter().map(|c| format!("ppl {c}")));
        h.extend(self.conventions.iter().map(|c| format!("vs bf16 {c}")));
        h.push("quantization time".into());
        h
    }

    /// Cells as displayed (terminal and Markdown).
    pub fn cells(&self) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .map(|r| {
                let baseline = r.bits.is_none();
                let mut c = vec![
                    r.branch.clone(),
                    format_bits(r.bits),
                    format_group_size(r.group_size),
                    format_act(r.desc_act),
                    format_size(r.size_bytes),
                ];
                c.extend(r.ppl.iter().map(|p| format_ppl(*p)));
                c.extend(r.delta_pct.iter().map(|d| format_delta(*d, baseline)));
                c.push(r.quant_seconds.map_or("-".into(), format_duration));
                c
            })
            .collect()
    }

    /// A title line saying what the table measures.
    pub fn title(&self) -> String {
        format!(
            "Perplexity on `{}` ({}; lower is better; difference relative to bf16)",
            self.text,
            self.conventions.join(", ")
        )
    }

    /// Aligned plain-text table for the terminal.
    pub fn to_terminal(&self) -> String {
        let headers = self.headers();
        let cells = self.cells();
        let widths: Vec<usize> = (0..headers.len())
            .map(|i| {
                cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([headers[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |row: &[String]| {
            row.iter()
                .enumerate()
                .map(|(i, c)| {
                    if i == 0 {
                        format!("{c:<w$}", w = widths[i])
                    } else {
                        format!("{c:>w$}", w = widths[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        let mut out = format!("{}\n{}\n", self.title(), line(&headers));
        out.push_str(&format!(
            "{}\n",
            widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  ")
        ));
        for row in &cells {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }

    /// GitHub-flavoured Markdown table with a heading.
    pub fn to_markdown(&self) -> String {
        let headers = self.headers();
        let mut out = format!("### {}\n\n| {} |\n", self.title(), headers.join(" | "));
        out.push_str(&format!(
            "|{}\n",
            headers
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { " --- |" } else { " ---: |" })
                .collect::<String>()
        ));
        for row in self.cells() {
            let mut row = row;
            row[0] = format!("`{}`", row[0]);
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        out
    }

    /// CSV with raw numbers (bytes, seconds, full-precision perplexities); empty cells where unknown.
    pub fn to_csv(&self) -> String {
        let mut header = vec![
            "text",
            "branch",
            "bits",
            "group_size",
            "desc_act",
            "size_bytes",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        header.extend(self.conventions.iter().map(|c| format!("ppl_{c}")));
        header.extend(self.conventions.iter().map(|c| format!("delta_pct_{c}")));
        header.push("quant_seconds".into());
        let opt = |v: Option<String>| v.unwrap_or_default();
        let mut out = header.join(",") + "\n";
        for r in &self.rows {
            let mut cells = vec![
                csv_field(&self.text),
                csv_field(&r.branch),
                opt(r.bits.map(|b| b.to_string())),
                opt(r.group_size.map(|g| g.to_string())),
                opt(r.desc_act.map(|d| d.to_string())),
                r.size_bytes.to_string(),
            ];
            cells.extend(r.ppl.iter().map(|p| opt(p.map(|p| p.to_string()))));
            cells.extend(r.delta_pct.iter().map(|d| opt(d.map(|d| d.to_string()))));
            cells.push(opt(r.quant_seconds.map(|s| s.to_string())));
            out.push_str(&(cells.join(",") + "\n"));
        }
        out
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn summary(
        name: &str,
        bits: Option<u32>,
        gs: Option<i32>,
        size: u64,
        ppl: &[(&str, f64)],
    ) -> BranchSummary {
        BranchSummary {
            name: name.into(),
            bits,
            group_size: gs,
            desc_act: bits.map(|_| true),
            damp_percent: bits.map(|_| 0.1),
            dataset: None,
            seqlen: None,
            size_bytes: size,
            ppl: ppl.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            quant_seconds: bits.map(|_| 125.0),
        }
    }

    #[test]
    fn tables_per_text_with_differences_to_bf16() {
        let base = summary(
            "bf16",
            None,
            None,
            59_300_000,
            &[
                ("shakespeare/llamacpp-512", 73.0),
                ("shakespeare/gptq-2048", 73.4),
                ("python/gptq-2048", 21.0),
            ],
        );
        let b = summary(
            "main",
            Some(4),
            Some(-1),
            12_000_000,
            &[
                ("shakespeare/gptq-2048", 73.4 * 1.01),
                ("shakespeare/llamacpp-512", 73.0 * 1.02),
            ],
        );
        let tables = build_tables(&base, &[b]);
        assert_eq!(tables.len(), 2);
        let (py, sh) = (&tables[0], &tables[1]);
        assert_eq!(py.text, "python");
        assert_eq!(py.conventions, vec!["gptq-2048"]);
        assert_eq!(py.rows[1].ppl, vec![None]);
        assert_eq!(
            sh.conventions,
            vec!["gptq-2048", "llamacpp-512"],
            "gptq first"
        );
        assert_eq!(sh.rows[0].branch, "bf16");
        let d = sh.rows[1]
            .delta_pct
            .iter()
            .map(|d| d.unwrap())
            .collect::<Vec<_>>();
        assert!(
            (d[0] - 1.0).abs() < 1e-9 && (d[1] - 2.0).abs() < 1e-9,
            "{d:?}"
        );

        let term = sh.to_terminal();
        assert!(
            term.contains("+1.00 %") && term.contains("+2.00 %") && term.contains("ref"),
            "{term}"
        );
        assert!(
            term.contains("59.3 MB") && term.contains("12.0 MB") && term.contains("None"),
            "{term}"
        );
        assert!(term.contains("2m 05s"), "{term}");
        let md = sh.to_markdown();
        assert_eq!(md.lines().filter(|l| l.starts_with('|')).count(), 4, "{md}");
        assert!(
            md.contains("| `main` | 4 | None | Yes | 12.0 MB | 74.1340 |"),
            "{md}"
        );
        let csv = sh.to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].split(',').count(), lines[2].split(',').count());
        assert!(
            lines[1].starts_with("shakespeare,bf16,,,,59300000,73.4,73,"),
            "{csv}"
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(23_810_000_000), "23.81 GB");
        assert_eq!(format_size(512), "0.5 kB");
        assert_eq!(format_duration(3725.0), "1h 02m");
        assert_eq!(format_group_size(Some(-1)), "None");
        assert_eq!(format_group_size(Some(32)), "32");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }
}
