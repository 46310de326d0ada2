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
