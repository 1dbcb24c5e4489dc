//! A PNG of the training curves: loss per epoch (left) and kNN top-1 per epoch (right).
//!
//! Drawn with `plotters` into an RGB buffer and encoded with `image`. Text needs a font:
//! the first file that exists among `$MOCO_PLOT_FONT` and [`FONT_CANDIDATES`] is
//! registered once (through plotters' `ab_glyph` support, so no fontconfig or freetype is
//! needed). Without a usable font the same chart is drawn without any text (axes, grid,
//! lines and points only) rather than failing.
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::metrics::EpochMetrics;
use crate::error::{Error, Result};

/// Width of the PNG in pixels.
pub const PLOT_WIDTH: u32 = 900;
/// Height of the PNG in pixels.
pub const PLOT_HEIGHT: u32 = 450;

/// Font files tried, in order, after `$MOCO_PLOT_FONT` (TrueType or OpenType).
pub const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/gnu-free/FreeSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/google-noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/ubuntu/Ubuntu-R.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/System/Library/Fonts/Helvetica.ttc",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The font family name fonts are registered under.
const FAMILY: &str = "sans-serif";

/// Registers the first usable font once; whether one was registered.
fn font_available() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let env = std::env::var_os("MOCO_PLOT_FONT");
        let candidates = env
            .iter()
            .map(std::path::PathBuf::from)
            .chain(FONT_CANDIDATES.iter().map(std::path::PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // Validate before leaking so that unusable files cost nothing.
            if ab_glyph_ok(&bytes) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Whether plotters' `ab_glyph` backend can parse these font bytes.
fn ab_glyph_ok(bytes: &[u8]) -> bool {
    // `register_font` parses with ab_glyph's `FontRef::try_from_slice`; a file that is not
    // a font (or empty) fails there too. A cheap pre-check of the sfnt magic avoids leaking
    // obviously wrong files.
    matches!(
        bytes.get(..4),
        Some([0, 1, 0, 0]) | Some(b"OTTO") | Some(b"true") | Some(b"ttcf")
    )
}

/// Writes a PNG ([`PLOT_WIDTH`] x [`PLOT_HEIGHT`]) with the training loss per epoch (left
/// panel) and the kNN top-1 accuracy per epoch in % (right panel), with `title` on top.
///
/// Records whose value is `None` are left out of that panel's line (so epoch 0, which has
/// no loss, still shows in the kNN panel); records need not be sorted. The file is written
/// atomically (`<path>.tmp`, then renamed). If no font is found, the chart is drawn
/// without text. Errors if `records` is empty.
///
/// ```
/// use moco::train::metrics::EpochMetrics;
/// use moco::train::plot::plot_metrics;
/// let records: Vec<EpochMetrics> = (0..5)
///     .map(|e| EpochMetrics {
///         loss: (e > 0).then(|| 8.0 - e as f64),
///         knn_top1: Some(0.1 + 0.1 * e as f64),
///         ..EpochMetrics::new(e, 1.0)
///     })
///     .collect();
/// let dir = tempfile::tempdir().unwrap();
/// let png = dir.path().join("curves.png");
/// plot_metrics(&records, &png, "MoCo on synthetic data").unwrap();
/// assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
/// ```
pub fn plot_metrics(records: &[EpochMetrics], path: &Path, title: &str) -> Result<()> {
    if font_available() {
        match render(records, title, true) {
            Ok(buf) => return write_png(path, &buf),
            // A font that loads but fails to render: fall back to no text.
            Err(RenderError::Plot(_)) => {}
            Err(RenderError::Empty) => return Err(empty_error(path)),
        }
    }
    plot_metrics_without_text(records, path)
}

/// Like [`plot_metrics`] but draws no text at all (no title, captions, tick labels or
/// axis names): what [`plot_metrics`] falls back to when no font is available.
pub fn plot_metrics_without_text(records: &[EpochMetrics], path: &Path) -> Result<()> {
    match render(records, "", false) {
        Ok(buf) => write_png(path, &buf),
        Err(RenderError::Empty) => Err(empty_error(path)),
        Err(RenderError::Plot(e)) => Err(Error::Other(format!(
            "{}: drawing the plot failed: {e}",
            path.display()
        ))),
    }
}

fn empty_error(path: &Path) -> Error {
    Error::invalid(format!("{}: no metrics records to plot", path.display()))
}

fn write_png(path: &Path, rgb: &[u8]) -> Result<()> {
    use image::ImageEncoder;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(rgb, PLOT_WIDTH, PLOT_HEIGHT, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Other(format!("{}: encoding PNG: {e}", path.display())))?;
    super::checkpoint::write_atomic(path, &png)
}

enum RenderError {
    Empty,
    Plot(String),
}

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for RenderError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        RenderError::Plot(e.to_string())
    }
}

/// One panel's points, sorted by epoch.
fn series(records: &[EpochMetrics], f: impl Fn(&EpochMetrics) -> Option<f64>) -> Vec<(i64, f64)> {
    let mut pts: Vec<(i64, f64)> = records
        .iter()
        .filter_map(|m| f(m).filter(|v| v.is_finite()).map(|v| (m.epoch as i64, v)))
        .collect();
    pts.sort_by_key(|p| p.0);
    pts
}

/// A padded value range that covers `pts`, optionally clamped to `[lo, hi]`.
fn y_range(pts: &[(i64, f64)], clamp: Option<(f64, f64)>) -> std::ops::Range<f64> {
    let (mut min, mut max) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    if !min.is_finite() {
        (min, max) = clamp.unwrap_or((0.0, 1.0));
    }
    let pad = if max > min {
        0.08 * (max - min)
    } else {
        (0.1 * max.abs()).max(1e-3)
    };
    let (mut lo, mut hi) = (min - pad, max + pad);
    if let Some((cl, ch)) = clamp {
        lo = lo.max(cl);
        hi = hi.min(ch);
        if hi <= lo {
            (lo, hi) = (cl, ch);
        }
    }
    lo..hi
}

/// Renders the chart into an RGB buffer.
fn render(
    records: &[EpochMetrics],
    title: &str,
    text: bool,
) -> std::result::Result<Vec<u8>, RenderError> {
    if records.is_empty() {
        return Err(RenderError::Empty);
    }
    let first = records.iter().map(|m| m.epoch).min().unwrap_or(0) as i64;
    let last = records.iter().map(|m| m.epoch).max().unwrap_or(0) as i64;
    let x_range = if last > first {
        first..last
    } else {
        (first - 1).max(0)..last + 1
    };
    let loss = series(records, |m| m.loss);
    let knn = series(records, |m| m.knn_top1.map(|v| 100.0 * v));

    let mut buf = vec![0u8; (PLOT_WIDTH * PLOT_HEIGHT * 3) as usize];
    {
        let root =
            BitMapBackend::with_buffer(&mut buf, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = if text && !title.is_empty() {
            root.titled(title, (FAMILY, 22))?
        } else {
            root.clone()
        };
        let panels = body.split_evenly((1, 2));
        let panel_specs = [
            (
                &panels[0],
                &loss,
                y_range(&loss, None),
                "training loss",
                "loss",
                BLUE,
            ),
            (
                &panels[1],
                &knn,
                y_range(&knn, Some((0.0, 100.0))),
                "kNN top-1 (%)",
                "top-1 %",
                RED,
            ),
        ];
        for (area, pts, yr, caption, ydesc, color) in panel_specs {
            draw_panel(area, pts, x_range.clone(), yr, text, caption, ydesc, color)?;
        }
        root.present()?;
    }
    Ok(buf)
}

#[allow(clippy::too_many_arguments)]
fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    pts: &[(i64, f64)],
    x_range: std::ops::Range<i64>,
    y_range: std::ops::Range<f64>,
    text: bool,
    caption: &str,
    y_desc: &str,
    color: RGBColor,
) -> std::result::Result<(), RenderError> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(caption, (FAMILY, 18))
            .x_label_area_size(36)
            .y_label_area_size(56);
    }
    let mut chart = builder.build_cartesian_2d(x_range, y_range)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(y_desc)
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 14))
            .x_label_formatter(&|x| format!("{x}"))
            .draw()?;
    } else {
        chart.configure_mesh().draw()?;
        let plot = chart.plotting_area().strip_coord_spec();
        let (w, h) = plot.dim_in_pixel();
        plot.draw(&Rectangle::new(
            [(0, 0), (w as i32 - 1, h as i32 - 1)],
            BLACK.stroke_width(1),
        ))?;
    }
    chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    Ok(())
}
