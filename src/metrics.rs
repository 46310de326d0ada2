//! Every metric's definition, once. All are computed in the space the model
//! sees (after input normalisation), like the training loss; with
//! `normalize: none` that is the data's own space.
//!
//! For data `x [n, d]`, reconstruction `x̂`, codes `z [n, h]`, threshold `t`
//! (0 for ReLU-like codes, 0.5 for sigmoid):
//! - `mse` = mean over all n·d elements of (x̂ − x)²
//! - `fvu` = Σ(x − x̂)² / Σ(x − x̄)², x̄ the per-column mean over rows
//! - `explained_variance` = 1 − fvu
//! - `l0` = mean over rows of #{j : z_j > t} (codes from a pursuit encoder,
//!   which may be negative, count where z_j ≠ 0: [`CodeSource::active`])
//! - `l1` = mean over rows of Σ_j |z_j|
//! - `mean_activation[j]` = mean over rows of z_j
//! - `kl_to_target` = Σ_j KL(ρ ‖ clamp(mean_activation[j], ε, 1−ε))
//! - `dead_fraction` = fraction of units with z_j > t on no row
//! - `dense_fraction` = fraction of units with z_j > t on more than 10% of rows
//! - `firing_histogram` = counts of units by firing frequency (fraction of
//!   rows with z_j > t): dead (0), then decades [1e-6,1e-5) … [1e-1,1]; a unit
//!   firing on fewer than 1e-6 of rows but not 0 counts in the first decade
//! - `mmcs` = mean over true features f of max_j cos(f, W_dec[j]), decoder
//!   rows mapped back to data space (multiplied by the normalisation scale)

use crate::model::Sae;
use crate::penalty::{kl_divergence, KL_EPS};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// A unit firing on more than this fraction of rows counts as dense.
pub const DENSE_THRESHOLD: f64 = 0.1;

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub rows: i64,
    pub mse: f64,
    pub fvu: f64,
    pub explained_variance: f64,
    pub l0: f64,
    pub l1: f64,
    pub dead_fraction: f64,
    pub dense_fraction: f64,
    pub kl_to_target: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmcs: Option<f64>,
    pub firing_histogram: Vec<HistogramBin>,
    /// Per unit; left out of summaries, shown by `sae eval --json`.
    #[serde(skip)]
    pub mean_activation: Vec<f64>,
    #[serde(skip)]
    pub firing_frequency: Vec<f64>,
}

/// One bin of the firing-frequency histogram: units with frequency in
/// `[lo, hi)` (the last bin includes 1; the dead bin is `lo = hi = 0`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HistogramBin {
    pub label: String,
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
}

/// Bins firing frequencies: dead, then one bin per decade from 1e-6 to 1.
pub fn firing_histogram(freq: &[f64]) -> Vec<HistogramBin> {
    let mut bins = vec![HistogramBin {
        label: "dead".into(),
        lo: 0.0,
        hi: 0.0,
        count: 0,
    }];
    for e in -6..0 {
        bins.push(HistogramBin {
            label: format!("1e{e}"),
            lo: 10f64.powi(e),
            hi: 10f64.powi(e + 1),
            count: 0,
        });
    }
    for &f in freq {
        let i = if f <= 0.0 {
            0
        } else {
            // Decade index: 1 for [1e-6, 1e-5) (and anything rarer), 6 for [0.1, 1].
            ((f.log10().floor() as i64 + 7).clamp(1, 6)) as usize
        };
        bins[i].count += 1;
    }
    bins
}

/// Evaluates `model` on raw (un-normalised) rows `x`, `batch` rows at a time.
/// `target` is the ρ for `kl_to_target`.
pub fn evaluate(
    model: &Sae,
    x: &Tensor,
    batch: i64,
    target: f64,
    truth: Option<&Tensor>,
) -> Metrics {
    evaluate_target(model, x, None, batch, target, truth)
}

/// Where the metrics get their codes: the model's own encoder
/// ([`ModelEncoder`]) or another one (e.g. [`crate::pursuit::PursuitEncoder`]).
/// The reconstruction is always the model's decoder of these codes.
pub trait CodeSource {
    /// Codes `[rows, d_hidden]` of normalised rows `xn`.
    fn codes(&self, model: &Sae, xn: &Tensor) -> Tensor;
    /// Which codes count as active (for l0, firing frequencies, dead and
    /// dense units): above the activation's threshold by default.
    fn active(&self, model: &Sae, z: &Tensor) -> Tensor {
        model.spec.activation.active(z)
    }
}

/// The model's own encoder.
pub struct ModelEncoder;

impl CodeSource for ModelEncoder {
    fn codes(&self, model: &Sae, xn: &Tensor) -> Tensor {
        model.encode_normalized(xn)
    }
}

/// [`evaluate`] for a model that reconstructs `y` (row-aligned with `x`; a
/// transcoder) rather than `x`: the reconstruction metrics compare with `y`,
/// in the model's output space.
pub fn evaluate_target(
    model: &Sae,
    x: &Tensor,
    y: Option<&Tensor>,
    batch: i64,
    target: f64,
    truth: Option<&Tensor>,
) -> Metrics {
    evaluate_codes(model, x, y, batch, target, truth, &ModelEncoder)
}

/// [`evaluate_target`] with codes from `codes` instead of the model's encoder.
pub fn evaluate_codes(
    model: &Sae,
    x: &Tensor,
    y: Option<&Tensor>,
    batch: i64,
    target: f64,
    truth: Option<&Tensor>,
    codes: &dyn CodeSource,
) -> Metrics {
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let n = x.size()[0];
    let d = y.map_or(x.size()[1], |y| y.size()[1]);
    let batch = batch.min(chunk_rows(model.spec.d_hidden, d));
    let mut sums = Sums::new(d, model.spec.d_hidden, device);
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let rows = |t: &Tensor| {
            t.narrow(0, start, len)
                .to_device(device)
                .to_kind(Kind::Float)
        };
        sums.add(model, codes, &rows(x), y.map(rows));
        start += len;
    }
    sums.metrics(model, n, target, truth)
}

/// Bytes of per-chunk temporaries that evaluation and encoding allow
/// themselves (codes, pre-activations, masks: several `[rows, d_hidden]`
/// float32 tensors), so their memory does not grow with `d_hidden` beyond
/// the model: 4,096 rows up to 4,096 latents, 256 rows at 65,536.
pub const CHUNK_BUDGET_BYTES: i64 = 256 << 20;

/// Rows per chunk under [`CHUNK_BUDGET_BYTES`] for `h` latents and `d`
/// columns: about four float32 `[rows, h]` and four `[rows, d]` tensors at
/// once (at least 16 rows, so matmuls stay efficient).
pub fn chunk_rows(h: i64, d: i64) -> i64 {
    (CHUNK_BUDGET_BYTES / (16 * (h + d)).max(1)).max(16)
}

/// Float64 sums over the rows evaluated so far, in the model's spaces.
struct Sums {
    /// Σ(x̂ − x)² over all elements.
    sse: Tensor,
    /// Per output column: Σx and Σx².
    sum_x: Tensor,
    sum_x2: Tensor,
    /// Per unit: the rows it fires on, and Σz.
    fire: Tensor,
    act: Tensor,
    /// Σ|z| over all codes.
    l1: Tensor,
}

impl Sums {
    fn new(d: i64, h: i64, device: Device) -> Sums {
        let dopts = (Kind::Double, device);
        Sums {
            sse: Tensor::zeros([], dopts),
            sum_x: Tensor::zeros([d], dopts),
            sum_x2: Tensor::zeros([d], dopts),
            fire: Tensor::zeros([h], dopts),
            act: Tensor::zeros([h], dopts),
            l1: Tensor::zeros([], dopts),
        }
    }

    /// Adds raw rows `xb` (float32, on the model's device) and, for a
    /// transcoder, their targets `yb`.
    fn add(&mut self, model: &Sae, codes: &dyn CodeSource, xb: &Tensor, yb: Option<Tensor>) {
        let xn = model.norm.apply(xb);
        let z = codes.codes(model, &xn);
        let xh = model.add_skip(&xn, model.decode_normalized_sparse(&z));
        let xn = match yb {
            Some(yb) => model.output_norm().apply(&yb),
            None => xn,
        };
        let xn = xn.to_kind(Kind::Double);
        self.sse += (xh.to_kind(Kind::Double) - &xn).square().sum(Kind::Double);
        self.sum_x += xn.sum_dim_intlist(0, false, Kind::Double);
        self.sum_x2 += xn.square().sum_dim_intlist(0, false, Kind::Double);
        // [rows, h] reductions in float32 (a sum with another dtype copies
        // its whole input into that dtype first), then float64 across chunks:
        // counts are exact below 2^24 rows per chunk.
        self.fire += codes
            .active(model, &z)
            .sum_dim_intlist(0, false, Kind::Float)
            .to_kind(Kind::Double);
        self.act += z
            .sum_dim_intlist(0, false, Kind::Float)
            .to_kind(Kind::Double);
        // Per-row L1 norms: no |z| copy.
        self.l1 += z.norm_scalaropt_dim(1, [1], false).sum(Kind::Double);
    }

    /// The metrics of `n` rows summed up (see the module's definitions).
    fn metrics(self, model: &Sae, n: i64, target: f64, truth: Option<&Tensor>) -> Metrics {
        let nf = n as f64;
        let d = self.sum_x.size()[0];
        let sse = self.sse.double_value(&[]);
        // Σ(x − x̄)² per column = Σx² − (Σx)²/n, in float64.
        let ss_tot = (self.sum_x2 - self.sum_x.square() / nf)
            .sum(Kind::Double)
            .double_value(&[]);
        let fvu = if ss_tot > 0.0 { sse / ss_tot } else { f64::NAN };
        let freq = self.fire / nf;
        let mean_act = self.act / nf;
        let kl = kl_divergence(target, &mean_act.clamp(KL_EPS, 1.0 - KL_EPS))
            .sum(Kind::Double)
            .double_value(&[]);
        let dead = freq
            .eq(0.0)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        let dense = freq
            .gt(DENSE_THRESHOLD)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        let l0 = freq.sum(Kind::Double).double_value(&[]);
        // Decoder rows are dictionary directions only when they map straight to
        // the output (not for deep models).
        let mmcs = truth
            .filter(|_| model.decoder_rows_in_output_space())
            .map(|t| mmcs(t, &decoder_rows_in_data_space(model)));
        Metrics {
            rows: n,
            mse: sse / (nf * d as f64),
            fvu,
            explained_variance: 1.0 - fvu,
            l0,
            l1: self.l1.double_value(&[]) / nf,
            dead_fraction: dead,
            dense_fraction: dense,
            kl_to_target: kl,
            mmcs,
            firing_histogram: firing_histogram(&to_vec(&freq)),
            mean_activation: to_vec(&mean_act),
            firing_frequency: to_vec(&freq),
        }
    }
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_device(tch::Device::Cpu).to_kind(Kind::Double)).unwrap_or_default()
}

/// Decoder directions `[h, d]` in the data's own space.
pub fn decoder_rows_in_data_space(model: &Sae) -> Tensor {
    let w = model.decoder_weight().detach();
    match &model.output_norm().scale {
        Some(scale) => w * scale,
        None => w,
    }
}

/// The rows of `t` scaled to unit L2 norm, norms floored at `floor` (a zero
/// row stays zero).
pub fn unit_rows(t: &Tensor, floor: f64) -> Tensor {
    t / t.norm_scalaropt_dim(2, [1], true).clamp_min(floor)
}

/// Mean max cosine similarity: for each true feature (row of `truth`), the
/// best cosine with any row of `rows`, averaged over true features.
pub fn mmcs(truth: &Tensor, rows: &Tensor) -> f64 {
    let _guard = tch::no_grad_guard();
    let device = rows.device();
    let unit = |t: &Tensor| unit_rows(&t.to_device(device).to_kind(Kind::Double), 1e-12);
    let cos = unit(truth).matmul(&unit(rows).tr());
    cos.amax(1, false).mean(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_by_decade() {
        let h = firing_histogram(&[0.0, 0.0, 1e-7, 2e-6, 0.05, 0.1, 0.99, 1.0]);
        let counts: Vec<usize> = h.iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![2, 2, 0, 0, 0, 1, 3]);
        assert_eq!(h[6].label, "1e-1");
    }
}
