//! What a person reads after training: per-run plots, and the sweep table,
//! CSV and plots. Drawing primitives live in `plot.rs`.

use crate::metrics::{HistogramBin, Metrics};
use crate::model::Sae;
use crate::plot::{self, LineChart, Series};
use crate::Result;
use std::path::Path;

/// (step, loss, mse, sparsity_loss) from a run's metrics.jsonl.
pub fn read_loss_curve(run: &Path) -> Result<Vec<(f64, f64, f64, f64)>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        out.push((f("step"), f("loss"), f("mse"), f("sparsity_loss")));
    }
    Ok(out)
}

fn histogram_categories(h: &[HistogramBin]) -> Vec<String> {
    h.iter().map(|b| b.label.clone()).collect()
}

/// `RUN/plots/`: loss curves, firing-frequency histogram and, for square
/// image inputs, the decoder rows as tiles.
pub fn run_plots(run: &Path, model: &Sae, train: &Metrics) -> Result<()> {
    let dir = run.join("plots");
    let curve = read_loss_curve(run)?;
    let pick =
        |i: usize| -> Vec<(f64, f64)> { curve.iter().map(|r| (r.0, [r.1, r.2, r.3][i])).collect() };
    plot::line_chart(
        &dir.join("loss.png"),
        &LineChart {
            title: "Training loss",
            x_label: "step",
            y_label: "loss (log scale)",
            log_x: false,
            log_y: true,
            series: vec![
                Series {
                    name: "total loss".into(),
                    points: pick(0),
                    markers: false,
                    thin: false,
                },
                Series {
                    name: "mse".into(),
                    points: pick(1),
                    markers: false,
                    thin: false,
                },
                Series {
                    name: "sparsity penalty (unweighted)".into(),
                    points: pick(2),
                    markers: false,
                    thin: true,
                },
            ],
        },
    )?;
    let h = &train.firing_histogram;
    plot::bar_chart(
        &dir.join("firing_frequency.png"),
        "Latent firing frequency (training data)",
        "fraction of rows on which a latent is active (decade lower edge)",
        "latents",
        &histogram_categories(h),
        &[("latents".into(), h.iter().map(|b| b.count as f64).collect())],
    )?;
    let side = plot::square_side(model.d_out()).filter(|_| model.decoder_rows_in_output_space());
    if let Some(side) = side {
        let w = crate::metrics::decoder_rows_in_data_space(model).to_device(tch::Device::Cpu);
        let n = model.spec.d_hidden.min(256);
        let rows: Vec<Vec<f32>> = (0..n)
            .map(|i| Vec::<f32>::try_from(w.get(i)).unwrap_or_default())
            .collect();
        plot::image_tiles(
            &dir.join("decoder_tiles.png"),
            &format!("Decoder rows as {side}x{side} images (first {n} latents)"),
            &rows,
            side,
        )?;
    }
    Ok(())
}
