//! The model a run starts from: fresh weights, `model.init`'s weights,
//! `b_dec` estimated from the data, unit-norm decoder rows.

use super::plan::Data;
use crate::config::{Auto, BDecInit, Config};
use crate::data::dataset::permutation;
use crate::export;
use crate::model::{ModelSpec, Sae};
use crate::normalize::{Normalizer, WHITEN_CHUNK};
use crate::{bail_user, Result};
use anyhow::Context;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The initialised model for `cfg` on `device` (draws from libtorch's
/// global generator, seeded by the plan).
pub fn model(cfg: &Config, data: &Data, device: Device) -> Result<Sae> {
    let norm = fit_norm(cfg, data)?;
    let eps = cfg.data.whiten_eps;
    let out_norm = data
        .train_target
        .as_ref()
        .map(|y| Normalizer::fit(cfg.data.normalize, &y.to_kind(Kind::Float), eps));
    let d_out = data.train_target.as_ref().unwrap_or(&data.train).size()[1];
    let spec = ModelSpec::from_config(&cfg.model, data.train.size()[1]);
    let mut model = Sae::init(spec, &cfg.model, d_out, norm, out_norm, device).map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "initialising the model ({} x {} latents)",
            spec.d_in, spec.d_hidden
        ))
    })?;
    if let Some(init) = &cfg.model.init {
        if model.is_deep() {
            bail_user!("model.init: not supported for a deep model (model.hidden)");
        }
        load_init_weights(&mut model, Path::new(init))?;
    }
    if let Some(how) = cfg.model.b_dec_init {
        // In the space the decoder writes to: the (normalised) reconstruction target.
        let y = data
            .train_target
            .as_ref()
            .unwrap_or(&data.train)
            .to_kind(Kind::Float);
        let y = model.output_norm().apply(&y.to_device(device));
        model.b_dec = b_dec_init(how, &y, cfg.seed);
    }
    if cfg.train.unit_norm_decoder {
        normalize_decoder_rows(&mut model);
    }
    Ok(model)
}

/// The input normalisation fitted on the training rows, or their first
/// `data.norm_rows`. Streamed and model sources take one chunked pass in
/// float64 sums that also rejects non-finite rows: the same pass over the
/// same rows, so a model source and its streamed dump fit the same values.
fn fit_norm(cfg: &Config, data: &Data) -> Result<Normalizer> {
    let rows = match cfg.data.norm_rows {
        Auto::Value(n) => n.min(data.train.size()[0]),
        Auto::Auto => data.train.size()[0],
    };
    let x = data.train.narrow(0, 0, rows);
    if data.mapped.is_some() || data.model_source.is_some() {
        let origin = cfg.data.train.as_deref().or(cfg.data.model.as_deref());
        let (kind, eps) = (cfg.data.normalize, cfg.data.whiten_eps);
        return Normalizer::fit_chunked(kind, &x, WHITEN_CHUNK, origin.unwrap_or("data"), eps)
            .context("data.train");
    }
    Ok(Normalizer::fit(cfg.data.normalize, &x, cfg.data.whiten_eps))
}

/// Rows used to estimate `b_dec` (a seeded subset of larger data).
const B_DEC_INIT_ROWS: usize = 100_000;

/// `model.b_dec_init` on (normalised) rows `y [n, d]`.
fn b_dec_init(how: BDecInit, y: &Tensor, seed: u64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let n = y.size()[0] as usize;
    let y = if n > B_DEC_INIT_ROWS {
        let idx = &permutation(n, seed ^ 0xB_DEC)[..B_DEC_INIT_ROWS];
        y.index_select(0, &Tensor::from_slice(idx).to_device(y.device()))
    } else {
        y.shallow_clone()
    };
    match how {
        BDecInit::Zeros => y.zeros_like().select(0, 0).contiguous(),
        BDecInit::Mean => y.mean_dim(0, false, Kind::Float),
        BDecInit::GeometricMedian => geometric_median(&y).to_kind(Kind::Float),
    }
}

/// The geometric median of the rows of `points` (Weiszfeld's algorithm, as
/// SAELens `compute_geometric_median`: at most 100 iterations, stop when the
/// objective changes by less than 1e-20 of itself), in float64.
pub fn geometric_median(points: &Tensor) -> Tensor {
    let _guard = tch::no_grad_guard();
    const EPS: f64 = 1e-6;
    const MAXITER: usize = 100;
    const FTOL: f64 = 1e-20;
    let p = points.to_kind(Kind::Double);
    let weighted_average = |w: &Tensor| {
        (&p * w.unsqueeze(1)).sum_dim_intlist(0, false, Kind::Double) / w.sum(Kind::Double)
    };
    let objective = |m: &Tensor| {
        (&p - m)
            .norm_scalaropt_dim(2, [1], false)
            .sum(Kind::Double)
            .double_value(&[])
    };
    let ones = Tensor::ones([p.size()[0]], (Kind::Double, p.device()));
    let mut median = weighted_average(&ones);
    let mut obj = objective(&median);
    for _ in 0..MAXITER {
        let norms = (&p - &median).norm_scalaropt_dim(2, [1], false);
        let w = norms.clamp_min(EPS).reciprocal();
        median = weighted_average(&w);
        let prev = obj;
        obj = objective(&median);
        if (prev - obj).abs() <= FTOL * obj {
            break;
        }
    }
    median
}

/// The decoder rows as a tensor and the dimension along which a row's
/// entries lie: `(W_dec, 1)`, or `(W_enc, 0)` when tied (rows are columns).
pub(super) fn decoder_rows(model: &mut Sae) -> (&mut Tensor, i64) {
    match &mut model.w_dec {
        Some(w) => (w, 1),
        None => (&mut model.w_enc, 0),
    }
}

/// Scales every decoder row to unit L2 norm, in place.
pub fn normalize_decoder_rows(model: &mut Sae) {
    let _guard = tch::no_grad_guard();
    let (w, dim) = decoder_rows(model);
    let norms = w.norm_scalaropt_dim(2, [dim], true).clamp_min(1e-12);
    let _ = w.g_div_(&norms);
}

/// `model.init`: copies `W_enc`, `b_enc`, `W_dec`, `b_dec` and the
/// architecture's other tensors (`threshold`, gated's `r_mag` and `b_mag`,
/// a skip model's `W_skip`)
/// into a fresh model from any format `--model` takes (run directory,
/// `.safetensors`, TorchScript file, SAELens directory) or a bare
/// safetensors file with those SAELens-named tensors. The architecture comes
/// from the config; the shapes must agree with it. One line on stderr says
/// which tensors came from the file and which start fresh.
fn load_init_weights(model: &mut Sae, path: &Path) -> Result<()> {
    if !path.exists() {
        bail_user!("model.init: {}: no such file", path.display());
    }
    let w = export::load_weights(&path.to_string_lossy()).context("model.init")?;
    let (d, h) = (model.spec.d_in, model.spec.d_hidden);
    let dev = model.device();
    let fit = |t: Tensor, name: &str, shape: &[i64]| -> Result<Tensor> {
        if t.size() != shape {
            bail_user!(
                "model.init: {}: `{name}` has shape {:?}, but the configured model needs {:?}",
                path.display(),
                t.size(),
                shape
            );
        }
        Ok(t.to_device(dev))
    };
    model.w_enc = fit(w.w_enc, "W_enc", &[d, h])?;
    model.b_enc = fit(w.b_enc, "b_enc", &[h])?;
    let w_dec = fit(w.w_dec, "W_dec", &[h, model.d_out()])?;
    if !model.spec.tied {
        model.w_dec = Some(w_dec);
    }
    model.b_dec = fit(w.b_dec, "b_dec", &[model.d_out()])?;
    let mut copied = vec!["W_enc", "b_enc", "b_dec"];
    if !model.spec.tied {
        copied.insert(2, "W_dec");
    }
    let mut unused = Vec::new();
    let mut fresh = Vec::new();
    match (w.w_skip, model.w_skip.is_some()) {
        (Some(t), true) => {
            model.w_skip = Some(fit(t, "W_skip", &[model.d_out(), d])?);
            copied.push("W_skip");
        }
        (Some(_), false) => unused.push("W_skip".to_string()),
        (None, true) => fresh.push("W_skip"),
        (None, false) => {}
    }
    for (name, t) in w.extra {
        let t = fit(t, &name, &[h])?;
        let slot = match name.as_str() {
            "threshold" => model.threshold.as_mut(),
            "r_mag" => model.gate.as_mut().map(|g| &mut g.r_mag),
            "b_mag" => model.gate.as_mut().map(|g| &mut g.b_mag),
            _ => None,
        };
        match slot {
            // batchtopk's threshold is one running value while training.
            Some(s) if s.dim() == 0 => *s = t.mean(Kind::Float),
            Some(s) => *s = t,
            None => {
                unused.push(name);
                continue;
            }
        }
        copied.extend(export::EXTRA_INIT_TENSORS.iter().find(|n| **n == name));
    }
    let has = |n: &str| match n {
        "threshold" => model.threshold.is_some(),
        _ => model.gate.is_some(),
    };
    fresh.extend(
        export::EXTRA_INIT_TENSORS
            .into_iter()
            .filter(|n| has(n) && !copied.contains(n)),
    );
    let mut line = format!("model.init: {} from {}", copied.join(", "), path.display());
    if !fresh.is_empty() {
        line += &format!("; {} start fresh (not in the file)", fresh.join(", "));
    }
    if !unused.is_empty() {
        line += &format!(
            "; {} in the file not used by this activation",
            unused.join(", ")
        );
    }
    eprintln!("sae: {line}");
    Ok(())
}
