//! Input normalisation, fitted on the training data and stored with the model
//! so inference applies the same map: `x_n = (x - shift) / scale`.
//! Whitening (`x_n = (x - mean) @ matrix`) is the exception: it is only held
//! while training and folded into the saved weights (`Sae::fold_whitening`).

use crate::config::NormalizeKind;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct Normalizer {
    pub kind: NormalizeKind,
    /// `[d_in]` tensors; both `None` for `NormalizeKind::None`.
    pub shift: Option<Tensor>,
    pub scale: Option<Tensor>,
    /// `NormalizeKind::Whiten` only (then `shift` and `scale` are `None`);
    /// boxed, as it is rare and six tensors wide.
    pub whiten: Option<Box<Whitening>>,
}

impl Clone for Normalizer {
    fn clone(&self) -> Self {
        Normalizer {
            kind: self.kind,
            shift: self.shift.as_ref().map(|t| t.copy()),
            scale: self.scale.as_ref().map(|t| t.copy()),
            whiten: self.whiten.as_deref().map(Whitening::map(Tensor::copy)),
        }
    }
}

/// PCA whitening as SAELens's `ActivationScaler.estimate_whitening`
/// (arXiv 2511.13981): with the training rows' mean `mean` and covariance
/// `C = E diag(lambda) E^T` (unbiased, `n - 1`), `matrix = E diag(lambda +
/// eps)^(-1/2)` and `inverse = diag(lambda + eps)^(1/2) E^T`, eigenvalues
/// clamped at 0 first. `x_w = (x - mean) @ matrix` has zero mean and
/// (for eps -> 0) identity covariance; `x = x_w @ inverse + mean`.
/// Float64, as SAELens keeps it so the fold into the weights is exact;
/// float32 copies are what batches are whitened with (SAELens casts to the
/// activations' dtype).
#[derive(Debug)]
pub struct Whitening {
    /// float64 `[d]`, `[d, d]`, `[d, d]`
    pub mean: Tensor,
    pub matrix: Tensor,
    pub inverse: Tensor,
    /// float32 copies of `mean` and `matrix`, `inverse`.
    mean32: Tensor,
    matrix32: Tensor,
    inverse32: Tensor,
}

impl Whitening {
    fn new(mean: Tensor, matrix: Tensor, inverse: Tensor) -> Whitening {
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        Whitening {
            mean32: f(&mean),
            matrix32: f(&matrix),
            inverse32: f(&inverse),
            mean,
            matrix,
            inverse,
        }
    }

    /// The same whitening with `f` applied to each float64 tensor.
    fn map(f: impl Fn(&Tensor) -> Tensor) -> impl Fn(&Whitening) -> Box<Whitening> {
        move |w| Box::new(Whitening::new(f(&w.mean), f(&w.matrix), f(&w.inverse)))
    }

    /// Every tensor, for replicating rank 0's across a data-parallel group.
    pub fn tensors_mut(&mut self) -> [&mut Tensor; 6] {
        [
            &mut self.mean,
            &mut self.matrix,
            &mut self.inverse,
            &mut self.mean32,
            &mut self.matrix32,
            &mut self.inverse32,
        ]
    }
}

/// Float64 sums for the mean and covariance, over chunks of rows.
struct CovarianceSums {
    count: i64,
    sum: Tensor,
    outer: Tensor,
}

impl CovarianceSums {
    fn new(d: i64) -> CovarianceSums {
        let dopts = (Kind::Double, Device::Cpu);
        CovarianceSums {
            count: 0,
            sum: Tensor::zeros([d], dopts),
            outer: Tensor::zeros([d, d], dopts),
        }
    }

    /// Adds rows `c [rows, d]` (any float kind, any device).
    fn add(&mut self, c: &Tensor) {
        let c = c.to_device(Device::Cpu).to_kind(Kind::Double);
        self.count += c.size()[0];
        self.sum += c.sum_dim_intlist(0, false, Kind::Double);
        self.outer += c.tr().mm(&c);
    }

    /// The whitening of the rows added (SAELens's formulas, step by step).
    fn whitening(self, eps: f64) -> Whitening {
        let n = self.count as f64;
        let mean = &self.sum / n;
        // One row has no spread: n - 1 floored at 1 (a zero covariance).
        let cov = (&self.outer - mean.outer(&mean) * n) / (n - 1.0).max(1.0);
        let (values, vectors) = cov.linalg_eigh("L");
        let values = values.clamp_min(0.0) + eps;
        let matrix = (&vectors * values.rsqrt()).contiguous();
        let inverse = (values.sqrt().unsqueeze(1) * vectors.tr()).contiguous();
        Whitening::new(mean, matrix, inverse)
    }
}

/// Rows per chunk of the whitening's float64 sums in memory: the chunk the
/// training's streamed fits take, so both fit the same values.
pub const WHITEN_CHUNK: i64 = 8192;

impl Normalizer {
    pub fn identity() -> Normalizer {
        Normalizer {
            kind: NormalizeKind::None,
            shift: None,
            scale: None,
            whiten: None,
        }
    }

    fn whitened(w: Whitening) -> Normalizer {
        Normalizer {
            kind: NormalizeKind::Whiten,
            shift: None,
            scale: None,
            whiten: Some(Box::new(w)),
        }
    }

    /// Fits on `x [n, d]`. Standardize uses the population std (numpy's
    /// default, ddof=0); a constant column gets scale 1 rather than a 0 divide.
    /// `whiten_eps`: `data.whiten_eps` (whiten only).
    pub fn fit(kind: NormalizeKind, x: &Tensor, whiten_eps: f64) -> Normalizer {
        let (shift, scale) = match kind {
            NormalizeKind::None => return Normalizer::identity(),
            NormalizeKind::Whiten => {
                let _guard = tch::no_grad_guard();
                let (n, d) = (x.size()[0], x.size()[1]);
                let mut sums = CovarianceSums::new(d);
                let mut start = 0;
                while start < n {
                    let len = WHITEN_CHUNK.min(n - start);
                    sums.add(&x.narrow(0, start, len));
                    start += len;
                }
                return Normalizer::whitened(sums.whitening(whiten_eps));
            }
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
            whiten: None,
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
        whiten_eps: f64,
    ) -> crate::Result<Normalizer> {
        let _guard = tch::no_grad_guard();
        let (n, d) = (x.size()[0], x.size()[1]);
        let dopts = (Kind::Double, Device::Cpu);
        let mut sum = Tensor::zeros([d], dopts);
        let mut sum_sq = Tensor::zeros([d], dopts);
        let mut min = Tensor::full([d], f64::INFINITY, dopts);
        let mut max = Tensor::full([d], f64::NEG_INFINITY, dopts);
        let mut norm_sum = 0.0;
        let mut cov = (kind == NormalizeKind::Whiten).then(|| CovarianceSums::new(d));
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let c = x.narrow(0, start, len).to_kind(Kind::Double);
            check_finite_rows(&c, start, origin)?;
            if let Some(cov) = cov.as_mut() {
                cov.add(&c);
            }
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
            NormalizeKind::Whiten => {
                let cov = cov.expect("whiten keeps covariance sums");
                return Ok(Normalizer::whitened(cov.whitening(whiten_eps)));
            }
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
            whiten: None,
        })
    }

    pub fn apply(&self, x: &Tensor) -> Tensor {
        if let Some(w) = &self.whiten {
            return (x - &w.mean32).matmul(&w.matrix32);
        }
        match (&self.shift, &self.scale) {
            (Some(shift), Some(scale)) => (x - shift) / scale,
            _ => x.shallow_clone(),
        }
    }

    pub fn invert(&self, x: &Tensor) -> Tensor {
        if let Some(w) = &self.whiten {
            return x.matmul(&w.inverse32) + &w.mean32;
        }
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
            whiten: self
                .whiten
                .as_deref()
                .map(Whitening::map(|t| t.to_device(device))),
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
