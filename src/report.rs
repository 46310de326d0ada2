//! What a person reads after training: per-run plots and `report.html`, and
//! the sweep table, CSV and plots. Drawing primitives live in `plot.rs`, the
//! page itself in `html/`.

use crate::html;
use crate::metrics::{HistogramBin, Metrics};
use crate::model::Sae;
use crate::plot::{self, LineChart, Series};
use crate::Result;
use serde_json::{json, Value};
use std::path::Path;
use tch::Tensor;

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

/// Validation rows shown in `report.html` next to their reconstructions.
const SAMPLE_ROWS: i64 = 8;
/// Rows of the codes map in `report.html` (fewer for wide dictionaries:
/// at most `PCA_ELEMENTS` codes).
const PCA_ROWS: i64 = 2000;
const PCA_ELEMENTS: i64 = 8 << 20;

/// `n` row indices spread evenly over `0..rows`.
fn spread(rows: i64, n: i64) -> Vec<i64> {
    let n = n.min(rows);
    (0..n).map(|i| i * rows / n.max(1)).collect()
}

fn rows_json(t: &Tensor) -> Value {
    let t = t.to_device(tch::Device::Cpu).to_kind(tch::Kind::Float);
    let rows: Vec<Value> = (0..t.size()[0])
        .map(|i| {
            let v = Vec::<f32>::try_from(t.get(i)).unwrap_or_default();
            Value::Array(v.iter().map(|&x| html::num(x as f64)).collect())
        })
        .collect();
    Value::Array(rows)
}

/// The page `RUN/report.html` shows: the run's metrics, config and plots,
/// a few validation rows (or training rows, without a validation split)
/// beside their reconstructions, and a 2-D PCA map of the codes coloured
/// by each row's strongest latent. Reads the run's files written so far.
pub fn run_report(
    run: &Path,
    model: &Sae,
    data: &crate::train::plan::Data,
    train_data: Option<&str>,
) -> Result<String> {
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let (x, target, split) = match &data.valid {
        Some(v) => (v, data.valid_target.as_ref(), "validation"),
        None => (&data.train, data.train_target.as_ref(), "training"),
    };
    let n = x.size()[0];
    let pick = |t: &Tensor, idx: &[i64]| {
        t.index_select(0, &Tensor::from_slice(idx).to_device(t.device()))
            .to_device(device)
            .to_kind(tch::Kind::Float)
    };
    // Originals (the target for a transcoder) and reconstructions, in data space.
    let idx = spread(n, SAMPLE_ROWS);
    let xs = pick(x, &idx);
    let recon = model.forward(&xs);
    let orig = match target {
        Some(y) => pick(y, &idx),
        None => xs,
    };
    let d_out = model.d_out();
    let image = plot::square_side(d_out).map(|s| json!([s, s]));
    // The codes map.
    let h = model.spec.d_hidden;
    let m = PCA_ROWS.min((PCA_ELEMENTS / h.max(1)).max(50));
    let idx_map = spread(n, m);
    let z = model.encode(&pick(x, &idx_map));
    let scores = crate::latents::pca_2d(&z);
    let active = model.spec.activation.active(&z).any_dim(1, false);
    let strongest = z
        .argmax(1, false)
        .where_self(&active, &z.argmax(1, false).full_like(-1));
    let xy =
        Vec::<f32>::try_from(scores.to_device(tch::Device::Cpu).flatten(0, -1)).unwrap_or_default();
    let colour = Vec::<i64>::try_from(strongest.to_device(tch::Device::Cpu)).unwrap_or_default();

    let mut plots = Vec::new();
    if let Ok(entries) = std::fs::read_dir(run.join("plots")) {
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        files.sort();
        for p in files {
            let bytes = std::fs::read(&p)?;
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            plots.push(json!([
                name,
                format!("data:image/png;base64,{}", html::base64(&bytes))
            ]));
        }
    }
    let read = |f: &str| std::fs::read_to_string(run.join(f)).unwrap_or_default();
    let summary: Value = serde_json::from_str(&read("summary.json")).unwrap_or(Value::Null);
    let name = run.display().to_string();
    let latents_cmd = format!(
        "sae latents --model {name} --data {} --out {}",
        train_data.unwrap_or("X.npy"),
        run.join("latents").display()
    );
    Ok(html::report_page(
        &format!("Run {name}"),
        &json!({
            "title": format!("Run {name}"),
            "subtitle": format!("{} → {} latents, {:?}", model.spec.d_in, h, model.spec.activation).replace(['{', '}'], ""),
            "summary": summary,
            "config": read("config.yaml"),
            "plots": plots,
            "sample": {"split": split, "rows": idx, "orig": rows_json(&orig), "recon": rows_json(&recon), "image": image},
            "pca": {"split": split, "rows": idx_map.len(), "xy": xy.iter().map(|&v| html::num(v as f64)).collect::<Vec<_>>(), "latent": colour},
            "latents": {"href": "latents/index.html", "exists": run.join("latents/index.html").is_file(), "command": latents_cmd},
        }),
    ))
}
