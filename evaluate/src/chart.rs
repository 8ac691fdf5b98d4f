//! The perplexity-against-size chart (PNG and SVG), one point per branch plus bf16.
//!
//! Text is drawn with DejaVu Sans bundled in `evaluate/assets` (plotters' `ab_glyph` feature), so
//! no system fonts or fontconfig are needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::compare::Table;
use crate::error::{Error, Result};

/// Chart width in pixels (PNG) or user units (SVG).
pub const WIDTH: u32 = 1000;
/// Chart height.
pub const HEIGHT: u32 = 640;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the bundled font as `sans-serif` once per process.
fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
                .map_err(|_| "the bundled DejaVu Sans font could not be parsed".to_string())
        })
        .clone()
}

/// One plotted point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Branch name.
    pub branch: String,
    /// Short label drawn beside the point (`4-bit g128`).
    pub label: String,
    /// Bits, `None` for bf16.
    pub bits: Option<u32>,
    /// Size in MB (decimal).
    pub size_mb: f64,
    /// Perplexity.
    pub ppl: f64,
}

/// The points of a table's chart for its first convention (rows without a value are skipped).
pub fn points(table: &Table) -> Vec<Point> {
    table
        .rows
        .iter()
        .filter_map(|r| {
            let ppl = r.ppl.first().copied().flatten()?;
            let label = match (r.bits, r.group_size) {
                (None, _) => "bf16".to_string(),
                (Some(b), Some(g)) if g > 0 => format!("{b}-bit g{g}"),
                (Some(b), _) => format!("{b}-bit"),
            };
            let label = if r.desc_act == Some(false) {
                format!("{label} (no act-order)")
            } else {
                label
            };
            let label = if r.branch == "main" {
                format!("{label} (main)")
            } else {
                label
            };
            Some(Point {
                branch: r.branch.clone(),
                label,
                bits: r.bits,
                size_mb: r.size_bytes as f64 / 1e6,
                ppl,
            })
        })
        .collect()
}

fn color(bits: Option<u32>) -> RGBColor {
    match bits {
        None => RGBColor(20, 20, 20),
        Some(3) => RGBColor(214, 39, 40),
        Some(4) => RGBColor(31, 119, 180),
        Some(8) => RGBColor(44, 160, 44),
        Some(_) => RGBColor(148, 103, 189),
    }
}

/// Draws the chart of `table` into `png` and `svg`; returns the points drawn.
pub fn draw(table: &Table, model: &str, png: &Path, svg: &Path) -> Result<Vec<Point>> {
    let pts = points(table);
    let chart_err = |path: &Path, e: String| Error::Chart {
        path: path.to_path_buf(),
        reason: e,
    };
    register_font().map_err(|e| chart_err(png, e))?;
    {
        let root = BitMapBackend::new(png, (WIDTH, HEIGHT)).into_drawing_area();
        plot(&root, table, model, &pts).map_err(|e| chart_err(png, e))?;
        root.present().map_err(|e| chart_err(png, e.to_string()))?;
    }
    {
        let root = SVGBackend::new(svg, (WIDTH, HEIGHT)).into_drawing_area();
        plot(&root, table, model, &pts).map_err(|e| chart_err(svg, e))?;
        root.present().map_err(|e| chart_err(svg, e.to_string()))?;
    }
    Ok(pts)
}

fn plot<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    table: &Table,
    model: &str,
    pts: &[Point],
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let convention = table.conventions.first().cloned().unwrap_or_default();
    if pts.is_empty() {
        return Err(format!("no perplexity values for `{}` to plot", table.text));
    }
    let (xmin, xmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(p.size_mb), b.max(p.size_mb))
    });
    let (ymin, ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(p.ppl), b.max(p.ppl))
    });
    let xpad = ((xmax - xmin) * 0.08).max(xmax * 0.05);
    let ypad = ((ymax - ymin) * 0.12).max(ymax * 0.002);
    // Leave room on the right for labels of the largest points.
    let x_range = (xmin - xpad).max(0.0)..xmax + xpad * 2.5;
    let y_range = ymin - ypad..ymax + ypad;

    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "{model}: perplexity vs size on disk — {} ({convention})",
                table.text
            ),
            ("sans-serif", 24).into_font(),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range.clone(), y_range)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("size on disk (MB, weight files)")
        .y_desc(format!("perplexity, {convention} (lower is better)"))
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()
        .map_err(err)?;

    if let Some(base) = pts.iter().find(|p| p.bits.is_none()) {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x_range.start, base.ppl), (x_range.end, base.ppl)],
                6,
                4,
                RGBColor(120, 120, 120).stroke_width(1),
            ))
            .map_err(err)?
            .label("bf16 perplexity")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(120, 120, 120)));
    }
    for bits in [None, Some(3), Some(4), Some(8)] {
        let group: Vec<&Point> = pts.iter().filter(|p| p.bits == bits).collect();
        if group.is_empty() {
            continue;
        }
        let c = color(bits);
        let name = bits.map_or("bf16 (unquantized)".to_string(), |b| {
            format!("{b}-bit GPTQ")
        });
        chart
            .draw_series(
                group
                    .iter()
                    .map(|p| Circle::new((p.size_mb, p.ppl), 6, c.filled())),
            )
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| Circle::new((x + 10, y), 6, c.filled()));
    }
    // Labels beside the points, nudged down when they would overlap an earlier one.
    let mut placed: Vec<(i32, i32, i32, i32)> = Vec::new();
    let font: TextStyle = ("sans-serif", 15).into_font().into();
    let mut order: Vec<&Point> = pts.iter().collect();
    order.sort_by(|a, b| b.ppl.total_cmp(&a.ppl));
    for p in order {
        let (px, py) = chart.backend_coord(&(p.size_mb, p.ppl));
        let (w, h) = root.estimate_text_size(&p.label, &font).map_err(err)?;
        let (w, h) = (w as i32, h as i32);
        let mut x = px + 10;
        let mut y = py - h / 2;
        while placed
            .iter()
            .any(|&(x0, y0, x1, y1)| x < x1 && x + w > x0 && y < y1 && y + h > y0)
        {
            y += h + 2;
        }
        placed.push((x, y, x + w, y + h));
        if (y - (py - h / 2)).abs() > h {
            root.draw(&PathElement::new(
                vec![(px + 4, py + 4), (x, y + h / 2)],
                RGBColor(150, 150, 150),
            ))
            .map_err(err)?;
            x += 2;
        }
        root.draw(&Text::new(
            p.label.clone(),
            (x, y),
            font.color(&color(p.bits)),
        ))
        .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::{build_tables, BranchSummary};

    fn summary(
        name: &str,
        bits: Option<u32>,
        gs: Option<i32>,
        size: u64,
        ppl: f64,
    ) -> BranchSummary {
        BranchSummary {
            name: name.into(),
            bits,
            group_size: gs,
            desc_act: bits.map(|_| true),
            damp_percent: None,
            dataset: None,
            seqlen: None,
            size_bytes: size,
            ppl: [("shakespeare/gptq-2048".to_string(), ppl)]
                .into_iter()
                .collect(),
            quant_seconds: None,
        }
    }

    #[test]
    fn png_and_svg_of_the_right_size_with_one_point_per_row() {
        let base = summary("bf16", None, None, 59_000_000, 73.417);
        let branches = vec![
            summary("main", Some(4), Some(-1), 14_000_000, 73.68),
            summary(
                "gptq-3bit--1g-actorder_True",
                Some(3),
                Some(-1),
                12_000_000,
                74.9,
            ),
            summary(
                "gptq-8bit--1g-actorder_True",
                Some(8),
                Some(-1),
                22_000_000,
                73.413,
            ),
            summary(
                "gptq-8bit-128g-actorder_True",
                Some(8),
                Some(128),
                22_300_000,
                73.424,
            ),
        ];
        let table = &build_tables(&base, &branches)[0];
        let dir = tempfile::tempdir().unwrap();
        let (png, svg) = (dir.path().join("c.png"), dir.path().join("c.svg"));
        let pts = draw(table, "moe-s", &png, &svg).unwrap();
        assert_eq!(pts.len(), 5);
        if let Some(keep) = std::env::var_os("EVALUATE_KEEP_CHART") {
            // For looking at the chart by eye: EVALUATE_KEEP_CHART=/tmp/x cargo test -p evaluate chart
            std::fs::create_dir_all(&keep).unwrap();
            std::fs::copy(&png, Path::new(&keep).join("chart.png")).unwrap();
            std::fs::copy(&svg, Path::new(&keep).join("chart.svg")).unwrap();
        }
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), WIDTH);
        assert_eq!(
            u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
            HEIGHT
        );
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.contains(&format!(r#"width="{WIDTH}" height="{HEIGHT}""#)),
            "{}",
            &text[..200]
        );
        // 5 data points + 4 legend markers (bf16, 3-, 4-, 8-bit).
        assert_eq!(text.matches("<circle").count(), 5 + 4);
        assert!(text.contains("8-bit g128") && text.contains("perplexity vs size"));
    }
}
