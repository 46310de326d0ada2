//! Input normalisation, fitted on the training data and stored with the model
//! so inference applies the same map: `x_n = (x - shift) / scale`.

use crate::config::NormalizeKind;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct Normalizer {
    pub kind: NormalizeKind,
    /// `[d_in]` tensors; both `None` for `NormalizeKind::None`.
    pub shift: Option<Tensor>,
    pub scale: Option<Tensor>,
}

impl Clone for Normalizer {
    fn clone(&self) -> Self {
        Normalizer {
            kind: self.kind,
            shift: self.shift.as_ref().map(|t| t.copy()),
            scale: self.scale.as_ref().map(|t| t.copy()),
        }
    }
}

impl Normalizer {
    pub fn identity() -> Normalizer {
        Normalizer {
            kind: NormalizeKind::None,
            shift: None,
            scale: None,
        }
    }

    /// Fits on `x [n, d]`. Standardize uses the population std (numpy's
    /// default, ddof=0); a constant column gets scale 1 rather than a 0 divide.
    pub fn fit(kind: NormalizeKind, x: &Tensor) -> Normalizer {
        let (shift, scale) = match kind {
            NormalizeKind::None => return Normalizer::identity(),
            NormalizeKind::Standardize => {
                let mean = x.mean_dim(0, false, Kind::Float);
                let std = x.std_dim(0, false, false);
                (mean, std)
            }
            NormalizeKind::Minmax => {
                let min = x.amin(0, false);
                let max = x.amax(0, false);
                (min.shallow_clone(), max - min)
            }
            NormalizeKind::ExpectedNorm => {
                // x_n = x * sqrt(d) / mean_rows(||x||), as one scale per column.
                let d = x.size()[1];
                let mean_norm = x
                    .to_kind(Kind::Double)
                    .norm_scalaropt_dim(2, [1], false)
                    .mean(Kind::Double)
                    .double_value(&[]);
                let scale = mean_norm / (d as f64).sqrt();
                let opts = (Kind::Float, x.device());
                (Tensor::zeros([d], opts), Tensor::full([d], scale, opts))
            }
        };
        let ones = scale.ones_like();
        let scale = ones.where_self(&scale.le(0.0), &scale);
        Normalizer {
            kind,
            shift: Some(shift),
            scale: Some(scale),
        }
    }

    /// Like [`Normalizer::fit`] for data too large to copy (a memory-mapped
    /// tensor): one pass over `chunk`-row slices with float64 accumulators.
    /// Also rejects non-finite values, naming the row. `origin` names the data.
    pub fn fit_chunked(
        kind: NormalizeKind,
        x: &Tensor,
        chunk: i64,
        origin: &str,
    ) -> crate::Result<Normalizer> {
        let _guard = tch::no_grad_guard();
        let (n, d) = (x.size()[0], x.size()[1]);
        let dopts = (Kind::Double, Device::Cpu);
        let mut sum = Tensor::zeros([d], dopts);
        let mut sum_sq = Tensor::zeros([d], dopts);
        let mut min = Tensor::full([d], f64::INFINITY, dopts);
        let mut max = Tensor::full([d], f64::NEG_INFINITY, dopts);
        let mut norm_sum = 0.0;
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let c = x.narrow(0, start, len).to_kind(Kind::Double);
            check_finite_rows(&c, start, origin)?;
            sum += c.sum_dim_intlist(0, false, Kind::Double);
            sum_sq += c.square().sum_dim_intlist(0, false, Kind::Double);
            min = min.minimum(&c.amin(0, false));
            max = max.maximum(&c.amax(0, false));
            norm_sum += c
                .norm_scalaropt_dim(2, [1], false)
                .sum(Kind::Double)
                .double_value(&[]);
            start += len;
        }
        let nf = n as f64;
        let (shift, scale) = match kind {
            NormalizeKind::None => return Ok(Normalizer::identity()),
            NormalizeKind::Standardize => {
                let mean = &sum / nf;
                let var = (sum_sq / nf - mean.square()).clamp_min(0.0);
                (mean, var.sqrt())
            }
            NormalizeKind::Minmax => (min.shallow_clone(), max - min),
            NormalizeKind::ExpectedNorm => {
                let scale = norm_sum / nf / (d as f64).sqrt();
                (Tensor::zeros([d], dopts), Tensor::full([d], scale, dopts))
            }
        };
        let (shift, scale) = (shift.to_kind(Kind::Float), scale.to_kind(Kind::Float));
        let scale = scale.ones_like().where_self(&scale.le(0.0), &scale);
        Ok(Normalizer {
            kind,
            shift: Some(shift),
            scale: Some(scale),
        })
    }

    pub fn apply(&self, x: &Tensor) -> Tensor {
        match (&self.shift, &self.scale) {
            (Some(shift), Some(scale)) => (x - shift) / scale,
            _ => x.shallow_clone(),
        }
    }

    pub fn invert(&self, x: &Tensor) -> Tensor {
        match (&self.shift, &self.scale) {
            (Some(shift), Some(scale)) => x * scale + shift,
            _ => x.shallow_clone(),
        }
    }

    pub fn to_device(&self, device: Device) -> Normalizer {
        Normalizer {
            kind: self.kind,
            shift: self.shift.as_ref().map(|t| t.to_device(device)),
            scale: self.scale.as_ref().map(|t| t.to_device(device)),
        }
    }
}

/// Fails naming the first row of `rows` (which starts at row `first`) that
/// holds NaN or Inf.
pub fn check_finite_rows(rows: &Tensor, first: i64, origin: &str) -> crate::Result<()> {
    let finite = rows.isfinite().all_dim(1, false);
    if !bool::try_from(finite.all()).unwrap_or(false) {
        let bad = finite.logical_not().nonzero().int64_value(&[0, 0]);
        crate::bail_user!(
            "{origin}: row {} has a non-finite value; remove such rows first",
            first + bad
        );
    }
    Ok(())
}

/// [`check_finite_rows`] over `x` in `chunk`-row slices (no copy of `x`).
pub fn check_finite_chunked(x: &Tensor, chunk: i64, origin: &str) -> crate::Result<()> {
    let _guard = tch::no_grad_guard();
    let n = x.size()[0];
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        check_finite_rows(&x.narrow(0, start, len), start, origin)?;
        start += len;
    }
    Ok(())
}
