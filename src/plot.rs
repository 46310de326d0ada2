//! PNG plots (plotters, bitmap backend). The font is embedded, so plots need
//! no system fonts. Every file is written to a temp name, then renamed.

use crate::Result;
use anyhow::{anyhow, Context};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 560;

fn register_font() {
    REGISTER.call_once(|| {
        // The bytes are a valid TTF shipped with the crate; failure is a bug.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Renders into `path` through a temp file with a `.png` name (the backend
/// picks the format from the extension), then renames atomically.
fn render<F>(path: &Path, size: (u32, u32), draw: F) -> Result<()>
where
    F: FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
{
    register_font();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}.png", std::process::id()));
    let result = (|| -> Result<()> {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        draw(&root)?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        drop(root);
        std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// One named line on a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Draw markers at the points as well as the line.
    pub markers: bool,
    /// Dashed-looking thin line (baselines).
    pub thin: bool,
}

pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
}

fn bounds(vals: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (0.1, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 1.25, hi * 1.25)
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-9);
        (lo - pad, hi + pad)
    }
}

pub fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

/// Draws a line chart with axis labels and a legend.
pub fn line_chart(path: &Path, chart: &LineChart) -> Result<()> {
    let xs = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1) = bounds(xs, chart.log_x);
    let (y0, y1) = bounds(ys, chart.log_y);
    render(path, (WIDTH, HEIGHT), |root| {
        macro_rules! draw_with {
            ($xr:expr, $yr:expr) => {{
                let mut c = ChartBuilder::on(root)
                    .caption(chart.title, ("sans-serif", 22))
                    .margin(12)
                    .x_label_area_size(48)
                    .y_label_area_size(72)
                    .build_cartesian_2d($xr, $yr)
                    .map_err(|e| anyhow!("plot: {e}"))?;
                c.configure_mesh()
                    .x_desc(chart.x_label)
                    .y_desc(chart.y_label)
                    .label_style(("sans-serif", 14))
                    .axis_desc_style(("sans-serif", 16))
                    .draw()
                    .map_err(|e| anyhow!("plot: {e}"))?;
                for (i, s) in chart.series.iter().enumerate() {
                    let color = palette(i);
                    let width = if s.thin { 1 } else { 2 };
                    let pts: Vec<(f64, f64)> = s
                        .points
                        .iter()
                        .copied()
                        .filter(|(x, y)| {
                            x.is_finite()
                                && y.is_finite()
                                && (!chart.log_x || *x > 0.0)
                                && (!chart.log_y || *y > 0.0)
                        })
                        .collect();
                    c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(width)))
                        .map_err(|e| anyhow!("plot: {e}"))?
                        .label(s.name.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                        });
                    if s.markers {
                        c.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
                            .map_err(|e| anyhow!("plot: {e}"))?;
                    }
                }
                c.configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(|e| anyhow!("plot: {e}"))?;
            }};
        }
        match (chart.log_x, chart.log_y) {
            (false, false) => draw_with!(x0..x1, y0..y1),
            (true, false) => draw_with!((x0..x1).log_scale(), y0..y1),
            (false, true) => draw_with!(x0..x1, (y0..y1).log_scale()),
            (true, true) => draw_with!((x0..x1).log_scale(), (y0..y1).log_scale()),
        }
        Ok(())
    })
}

/// Grouped bar chart: one group per category, one bar per series.
pub fn bar_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let n_cat = categories.len().max(1);
    let n_ser = series.len().max(1);
    render(path, (WIDTH, HEIGHT), |root| {
        let mut c = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..n_cat as f64, 0.0..y_max)
            .map_err(|e| anyhow!("plot: {e}"))?;
        let cats = categories.to_vec();
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(n_cat * 2 + 1)
            .x_label_formatter(&move |x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.26 {
                    cats.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        let w = 0.8 / n_ser as f64;
        for (j, (name, vals)) in series.iter().enumerate() {
            let color = palette(j);
            c.draw_series(vals.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 + 0.1 + j as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.92, *v)], color.filled())
            }))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        }
        if series.len() > 1 || !series.is_empty() {
            c.configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        Ok(())
    })
}

/// Decoder rows of a model whose input is a `side x side` image, as a grid of
/// tiles; each tile scaled to its own max |value| (red +, blue −).
pub fn image_tiles(path: &Path, title: &str, rows: &[Vec<f32>], side: usize) -> Result<()> {
    let n = rows.len().max(1);
    let cols = (n as f64).sqrt().ceil() as usize;
    let grid_rows = n.div_ceil(cols);
    let px = (512 / (cols * side)).clamp(1, 16) as i32;
    let tile = side as i32 * px + 2;
    let w = (cols as i32 * tile + 20).max(300) as u32;
    let h = (grid_rows as i32 * tile + 60) as u32;
    render(path, (w, h), |root| {
        root.draw(&Text::new(title.to_string(), (10, 10), ("sans-serif", 20)))
            .map_err(|e| anyhow!("plot: {e}"))?;
        for (t, row) in rows.iter().enumerate() {
            let (gr, gc) = ((t / cols) as i32, (t % cols) as i32);
            let (ox, oy) = (10 + gc * tile, 44 + gr * tile);
            let m = row.iter().fold(1e-12f32, |a, v| a.max(v.abs()));
            for (i, v) in row.iter().enumerate() {
                let (r, c) = ((i / side) as i32, (i % side) as i32);
                let a = (v / m).clamp(-1.0, 1.0);
                let color = if a >= 0.0 {
                    RGBColor(255, (255.0 * (1.0 - a)) as u8, (255.0 * (1.0 - a)) as u8)
                } else {
                    RGBColor((255.0 * (1.0 + a)) as u8, (255.0 * (1.0 + a)) as u8, 255)
                };
                let (x, y) = (ox + c * px, oy + r * px);
                root.draw(&Rectangle::new([(x, y), (x + px, y + px)], color.filled()))
                    .map_err(|e| anyhow!("plot: {e}"))?;
            }
        }
        Ok(())
    })
}

/// The side of a square image with `d` pixels, if `d` is a square >= 4.
pub fn square_side(d: i64) -> Option<usize> {
    let s = (d as f64).sqrt().round() as i64;
    (s >= 2 && s * s == d).then_some(s as usize)
}
