//! Synthetic data with known ground truth: each row is a sparse non-negative
//! combination of unit-norm feature directions, plus Gaussian noise. An SAE
//! that works should recover the directions (measured by MMCS).

use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
pub struct SynthParams {
    pub n: i64,
    pub d_in: i64,
    pub features: i64,
    /// Active features per row.
    pub active: i64,
    /// Standard deviation of the additive noise.
    pub noise: f64,
    pub seed: u64,
}

pub struct Synth {
    /// `[n, d_in]`
    pub x: Tensor,
    /// Ground-truth directions `[features, d_in]`, unit norm.
    pub truth: Tensor,
    /// Each row's feature activations `[n, features]` (`x = acts @ truth + noise`).
    pub acts: Tensor,
}

/// Generates the data on the CPU from `seed` (libtorch's CPU generator).
pub fn generate(p: &SynthParams) -> Synth {
    tch::manual_seed(p.seed as i64);
    let opts = (Kind::Float, Device::Cpu);
    let truth = Tensor::randn([p.features, p.d_in], opts);
    let truth = &truth / truth.norm_scalaropt_dim(2, [1], true);
    // Which features fire: the `active` largest of uniform draws per row.
    let (_, idx) = Tensor::rand([p.n, p.features], opts).topk(p.active, 1, true, false);
    // How strongly: uniform in [0.5, 1.5), so an active feature is never ~0.
    let mags = Tensor::rand([p.n, p.active], opts) + 0.5;
    let coeffs = Tensor::zeros([p.n, p.features], opts).scatter(1, &idx, &mags);
    let x = coeffs.mm(&truth) + Tensor::randn([p.n, p.d_in], opts) * p.noise;
    Synth {
        x,
        truth,
        acts: coeffs,
    }
}
