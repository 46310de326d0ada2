//! Synthetic data with known ground truth: each row is a sparse non-negative
//! combination of unit-norm feature directions, plus Gaussian noise. An SAE
//! that works should recover the directions (measured by MMCS, and by
//! SynthSAEBench's scores: `crate::ground_truth`).
//!
//! Two kinds. `fixed` (the default): exactly `active` features per row,
//! chosen uniformly, magnitudes uniform in [0.5, 1.5). `synthbench`: the
//! kinds of structure SynthSAEBench builds (its generator is sae_lens's
//! `sae_lens.synthetic`; this one is not bit-equal to it): features fire
//! independently with Zipfian probabilities (sae_lens's
//! `zipfian_firing_probabilities`: `1/rank^exponent` rescaled into
//! [min_prob, max_prob]), optionally correlated through a low-rank Gaussian
//! copula (sae_lens's `generate_random_low_rank_correlation_matrix` and
//! low-rank sampling: feature i fires where
//! `g @ F_i + e_i sqrt(1 - |F_i|^2) > sqrt(2) erfinv(1 - 2 p_i)`, `F` `[features, rank]` of N(0, scale^2)
//! entries, rows capped so that 1 - |F_i|^2 >= 0.01; the marginal rates stay
//! `p_i`), magnitudes `relu(1 + magnitude_std * N(0, 1))`, and a two-level
//! hierarchy: the first `features / (1 + children)` features are parents,
//! each with `children` children after them, and a child is zeroed wherever
//! its parent does not fire (sae_lens's parent deactivation).

use tch::{Device, Kind, Tensor};

/// How features fire and how strongly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SynthKind {
    /// Exactly `active` features per row, magnitudes uniform in [0.5, 1.5).
    Fixed { active: i64 },
    /// SynthSAEBench's kinds of structure (see the module).
    SynthBench {
        zipf_exponent: f64,
        max_prob: f64,
        min_prob: f64,
        magnitude_std: f64,
        /// Children per parent; 0: no hierarchy.
        children: i64,
        /// Rank of the firing correlations' factor; 0: independent firing.
        correlation_rank: i64,
        /// Scale of the factor's entries.
        correlation_scale: f64,
    },
}

#[derive(Debug, Clone)]
pub struct SynthParams {
    pub n: i64,
    pub d_in: i64,
    pub features: i64,
    pub kind: SynthKind,
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
    let acts = match p.kind {
        SynthKind::Fixed { active } => {
            // Which features fire: the `active` largest of uniform draws per row.
            let (_, idx) = Tensor::rand([p.n, p.features], opts).topk(active, 1, true, false);
            // How strongly: uniform in [0.5, 1.5), so an active feature is never ~0.
            let mags = Tensor::rand([p.n, active], opts) + 0.5;
            Tensor::zeros([p.n, p.features], opts).scatter(1, &idx, &mags)
        }
        SynthKind::SynthBench {
            zipf_exponent,
            max_prob,
            min_prob,
            magnitude_std,
            children,
            correlation_rank,
            correlation_scale,
        } => {
            let probs = zipf_probabilities(p.features, zipf_exponent, max_prob, min_prob);
            let fires = match correlation_rank {
                0 => probs
                    .unsqueeze(0)
                    .expand([p.n, p.features], false)
                    .bernoulli(),
                r => correlated_firing(&probs, p.n, r, correlation_scale),
            };
            let mags = (Tensor::randn([p.n, p.features], opts) * magnitude_std + 1.0).relu();
            let acts = fires * mags;
            match children {
                0 => acts,
                c => deactivate_orphans(&acts, c),
            }
        }
    };
    let x = acts.mm(&truth) + Tensor::randn([p.n, p.d_in], opts) * p.noise;
    Synth { x, truth, acts }
}

/// sae_lens's `zipfian_firing_probabilities`: `1/rank^exponent`, rescaled
/// linearly so the first is `max_prob` and the last `min_prob`.
pub fn zipf_probabilities(features: i64, exponent: f64, max_prob: f64, min_prob: f64) -> Tensor {
    if features == 1 {
        return Tensor::from_slice(&[max_prob as f32]);
    }
    let ranks = Tensor::arange_start(1, features + 1, (Kind::Float, Device::Cpu));
    let probs = ranks.pow_tensor_scalar(exponent).reciprocal();
    let (lo, hi) = (probs.min(), probs.max());
    (&probs - &lo) / (&hi - &lo) * (max_prob - min_prob) + min_prob
}

/// Firing indicators `[n, features]` (float) with marginal rates `probs`,
/// correlated through a low-rank Gaussian copula (see the module).
fn correlated_firing(probs: &Tensor, n: i64, rank: i64, scale: f64) -> Tensor {
    const MIN_DIAG: f64 = 0.01;
    let features = probs.size()[0];
    let opts = (Kind::Float, Device::Cpu);
    let factor = Tensor::randn([features, rank], opts) * scale;
    let sq = factor.square().sum_dim_intlist(1, true, Kind::Float);
    // Rows whose factor would leave less than MIN_DIAG of own variance are
    // scaled down to leave exactly that (sae_lens's cap).
    let cap = sq.gt(1.0 - MIN_DIAG);
    let shrink = (sq.reciprocal() * (1.0 - MIN_DIAG))
        .sqrt()
        .where_self(&cap, &sq.ones_like());
    let factor = factor * shrink;
    let diag_sqrt = (-factor.square().sum_dim_intlist(1, false, Kind::Float) + 1.0).sqrt();
    let thresholds = (-probs * 2.0 + 1.0).erfinv() * std::f64::consts::SQRT_2;
    let g = Tensor::randn([n, rank], opts);
    let e = Tensor::randn([n, features], opts);
    let z = g.mm(&factor.tr()) + e * diag_sqrt;
    z.gt_tensor(&thresholds).to_kind(Kind::Float)
}

/// Zeroes each child where its parent is 0: parents are the first
/// `features / (1 + children)` features, parent `q`'s children the
/// `children` features from `parents + q * children`.
fn deactivate_orphans(acts: &Tensor, children: i64) -> Tensor {
    let features = acts.size()[1];
    let parents = features / (1 + children);
    let parent_on = acts.narrow(1, 0, parents).gt(0.0).to_kind(acts.kind());
    // Each child's parent on or off, [n, parents * children].
    let child_gate = parent_on.repeat_interleave_self_int(children, Some(1), None);
    let kids = acts.narrow(1, parents, parents * children) * child_gate;
    let rest = features - parents - parents * children;
    let mut parts = vec![acts.narrow(1, 0, parents), kids];
    if rest > 0 {
        parts.push(acts.narrow(1, parents + parents * children, rest));
    }
    Tensor::cat(&parts, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(children: i64) -> Synth {
        generate(&SynthParams {
            n: 4000,
            d_in: 16,
            features: 30,
            kind: SynthKind::SynthBench {
                zipf_exponent: 1.0,
                max_prob: 0.3,
                min_prob: 0.01,
                magnitude_std: 0.2,
                children,
                correlation_rank: 0,
                correlation_scale: 0.0,
            },
            noise: 0.0,
            seed: 3,
        })
    }

    /// Firing rates follow the Zipf probabilities (without a hierarchy),
    /// and rows are `acts @ truth`.
    #[test]
    fn synthbench_firing_follows_zipf() {
        let s = bench(0);
        let rate = s
            .acts
            .gt(0.0)
            .to_kind(Kind::Float)
            .mean_dim(0, false, Kind::Float);
        let want = zipf_probabilities(30, 1.0, 0.3, 0.01);
        let dev = (rate - &want).abs().max().double_value(&[]);
        assert!(
            dev < 0.03,
            "firing rates off the Zipf probabilities by {dev}"
        );
        assert!((want.get(0).double_value(&[]) - 0.3).abs() < 1e-6);
        assert!((want.get(29).double_value(&[]) - 0.01).abs() < 1e-6);
        let back = (s.acts.mm(&s.truth) - &s.x).abs().max().double_value(&[]);
        assert!(back < 1e-5, "x = acts @ truth: {back}");
    }

    /// Correlated firing keeps each feature's rate and correlates the
    /// features: the mean |correlation| between firing indicators rises
    /// well above independent firing's.
    #[test]
    fn synthbench_correlations_keep_rates_and_correlate() {
        let run = |rank: i64| {
            generate(&SynthParams {
                n: 20000,
                d_in: 8,
                features: 20,
                kind: SynthKind::SynthBench {
                    zipf_exponent: 0.5,
                    max_prob: 0.5,
                    min_prob: 0.2,
                    magnitude_std: 0.0,
                    children: 0,
                    correlation_rank: rank,
                    correlation_scale: 0.4,
                },
                noise: 0.0,
                seed: 5,
            })
        };
        let corr = |s: &Synth| {
            let f = s.acts.gt(0.0).to_kind(Kind::Float);
            let c = (&f - f.mean_dim(0, true, Kind::Float)) / f.std_dim(0, false, true);
            let m = c.tr().mm(&c) / 20000.0;
            (m.abs().sum(Kind::Float) - 20.0).double_value(&[]) / (20.0 * 19.0)
        };
        let (plain, correlated) = (run(0), run(4));
        let want = zipf_probabilities(20, 0.5, 0.5, 0.2);
        let rate = correlated
            .acts
            .gt(0.0)
            .to_kind(Kind::Float)
            .mean_dim(0, false, Kind::Float);
        let dev = (rate - want).abs().max().double_value(&[]);
        assert!(dev < 0.02, "correlated firing rates off by {dev}");
        let (a, b) = (corr(&plain), corr(&correlated));
        assert!(
            b > 3.0 * a && b > 0.05,
            "mean |corr| independent {a}, correlated {b}"
        );
    }

    /// A child never fires where its parent does not.
    #[test]
    fn synthbench_children_fire_only_with_their_parent() {
        let s = bench(2);
        let parents = 30 / 3;
        for q in 0..parents {
            let parent_off = s.acts.select(1, q).eq(0.0);
            for c in 0..2 {
                let child = s.acts.select(1, parents + q * 2 + c);
                let orphan = child.gt(0.0).logical_and(&parent_off);
                assert_eq!(
                    orphan.sum(Kind::Int64).int64_value(&[]),
                    0,
                    "parent {q} child {c}"
                );
            }
        }
        // Children still fire (with their parents).
        let kids = s
            .acts
            .narrow(1, parents, 2 * parents)
            .gt(0.0)
            .sum(Kind::Int64);
        assert!(kids.int64_value(&[]) > 0);
    }
}
