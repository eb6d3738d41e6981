//! Line and scatter charts written as PNG files (plotters), for demos and training curves.
//!
//! Text is drawn with the bundled DejaVu Sans font (assets/fonts, Bitstream Vera licence), so no
//! system font library is needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeriesStyle {
    /// Connected line.
    Line,
    /// Dashed-looking thin line (drawn as small dots).
    Dotted,
    /// Unconnected markers.
    Points,
}

/// One named series of `(x, y)` points.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points in drawing order.
    pub points: Vec<(f64, f64)>,
    /// Drawing style.
    pub style: SeriesStyle,
}

impl Series {
    /// A line series.
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            style: SeriesStyle::Line,
        }
    }
    /// A dotted series.
    pub fn dotted(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            style: SeriesStyle::Dotted,
        }
    }
    /// A scatter series.
    pub fn points(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            style: SeriesStyle::Points,
        }
    }
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
        // Registration fails only for an unparsable font, which the bundled one is not.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// One chart of a figure: a title, axis labels and the series drawn in it.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Caption above the chart.
    pub title: String,
    /// Label of the horizontal axis.
    pub x_label: String,
    /// Label of the vertical axis.
    pub y_label: String,
    /// What is drawn, in legend order.
    pub series: Vec<Series>,
}

/// Draws `series` into a `width` x `height` PNG at `path` (written atomically).
pub fn draw_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    size: (u32, u32),
) -> Result<()> {
    let panel = Panel {
        title: title.to_string(),
        x_label: x_label.to_string(),
        y_label: y_label.to_string(),
        series: series.to_vec(),
    };
    draw_panels(path, std::slice::from_ref(&panel), size)
}

/// Draws `panels` stacked top to bottom, each `panel_size` (width, height) pixels, into one
/// PNG at `path` (written atomically). Every panel needs at least one finite point.
pub fn draw_panels(path: &Path, panels: &[Panel], panel_size: (u32, u32)) -> Result<()> {
    register_font();
    if panels.is_empty() {
        return Err(Error::Data(format!(
            "nothing to plot for {}: no charts",
            path.display()
        )));
    }
    let mut ranges = Vec::with_capacity(panels.len());
    for panel in panels {
        let range = finite_range(&panel.series).ok_or_else(|| {
            Error::Data(format!(
                "nothing to plot for {} (chart `{}`): no finite points",
                path.display(),
                panel.title
            ))
        })?;
        ranges.push(range);
    }
    let rows = u32::try_from(panels.len()).ok();
    let height = rows.and_then(|rows| panel_size.1.checked_mul(rows));
    let Some(height) = height else {
        return Err(Error::Data(format!(
            "{}: {} charts of height {} do not fit in one image; plot fewer metrics",
            path.display(),
            panels.len(),
            panel_size.1
        )));
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    // plotters picks the image format from the extension, so the temporary name ends in .png.
    let tmp = crate::fsutil::temp_sibling(path).with_extension("tmp.png");
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(&tmp, (panel_size.0, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((panels.len(), 1));
        for ((area, panel), range) in areas.iter().zip(panels).zip(&ranges) {
            draw_panel(area, panel, *range)?;
        }
        root.present()?;
        Ok(())
    };
    let result = draw();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Data(format!("cannot draw {}: {e}", path.display())));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// The x and y ranges (y padded by 5%) of the finite points of `series`, if any.
fn finite_range(series: &[Series]) -> Option<(f64, f64, f64, f64)> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut any = false;
    for (x, y) in series.iter().flat_map(|s| s.points.iter()) {
        if x.is_finite() && y.is_finite() {
            any = true;
            x0 = x0.min(*x);
            x1 = x1.max(*x);
            y0 = y0.min(*y);
            y1 = y1.max(*y);
        }
    }
    if !any {
        return None;
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    Some((x0, x1, y0 - pad, y1 + pad))
}

/// Draws one panel into its part of the image.
fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
    (x0, x1, y0, y1): (f64, f64, f64, f64),
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    // Whole numbers (epochs, iterations) without a trailing `.0`; others to 4 decimals.
    let x_tick = |x: &f64| {
        if x.fract() == 0.0 && x.abs() < 1e15 {
            format!("{x:.0}")
        } else {
            format!("{x:.4}")
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string()
        }
    };
    chart
        .configure_mesh()
        .x_label_formatter(&x_tick)
        .x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, s) in panel.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let anno = match s.style {
            SeriesStyle::Line => chart.draw_series(LineSeries::new(pts, color.stroke_width(2)))?,
            SeriesStyle::Dotted => chart.draw_series(
                pts.into_iter()
                    .map(move |p| Circle::new(p, 1, color.filled())),
            )?,
            SeriesStyle::Points => chart.draw_series(
                pts.into_iter()
                    .map(move |p| TriangleMarker::new(p, 6, color.filled())),
            )?,
        };
        anno.label(s.label.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
        });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}
