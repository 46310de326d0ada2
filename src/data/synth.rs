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
//! `p_i`), magnitudes `relu(1 + magnitude_std * N(0, 1))`, and a hierarchy
//! (sae_lens's `generate_hierarchy` and `hierarchy_modifier`): trees of
//! `depth` levels below their roots, `children` children per node, numbered
//! breadth first as sae_lens does: the roots are the first
//! `features / (1 + children + .. + children^depth)` features, then each
//! level in turn, node j's children at `j * children ..` of the next level;
//! the features left over are free. Level by level from the top, a child is
//! zeroed wherever its parent does not fire (parent deactivation); with
//! `exclusive`, where several children of one node fire, one of them drawn
//! uniformly survives (sae_lens's mutual exclusion, its random-score
//! winner), before the next level is gated by them. `compensate` (sae_lens's
//! `compensate_probabilities`) raises a child's probability by
//! `1 / p_parent`, and with `exclusive` by `1 + (sum of its siblings' p) /
//! p_parent` too (capped at 1), so each feature fires at about its Zipf
//! rate. Depth 1 without exclusion is the original two-level generator,
//! draw for draw.

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
        /// Levels below the roots (1: parents and children).
        depth: i64,
        /// At most one child of a node fires in a row.
        exclusive: bool,
        /// Children's probabilities raised to make up for the gating.
        compensate: bool,
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
            depth,
            exclusive,
            compensate,
            correlation_rank,
            correlation_scale,
        } => {
            let tree = Tree::new(p.features, children, depth, exclusive);
            let probs = zipf_probabilities(p.features, zipf_exponent, max_prob, min_prob);
            let probs = match (compensate, &tree) {
                (true, Some(t)) => t.compensate(&probs),
                _ => probs,
            };
            let fires = match correlation_rank {
                0 => probs
                    .unsqueeze(0)
                    .expand([p.n, p.features], false)
                    .bernoulli(),
                r => correlated_firing(&probs, p.n, r, correlation_scale),
            };
            let mags = (Tensor::randn([p.n, p.features], opts) * magnitude_std + 1.0).relu();
            let acts = fires * mags;
            match &tree {
                None => acts,
                Some(t) => t.apply(&acts),
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

/// The hierarchy's layout: level `l`'s features are `start[l] ..
/// start[l] + len[l]`, node j of a level the parent of the next level's
/// `j * children .. (j + 1) * children`.
pub struct Tree {
    children: i64,
    exclusive: bool,
    levels: Vec<(i64, i64)>,
}

impl Tree {
    /// `None` without children; `features` holds at least one tree (checked
    /// by the caller: [`tree_size`]).
    pub fn new(features: i64, children: i64, depth: i64, exclusive: bool) -> Option<Tree> {
        if children == 0 {
            return None;
        }
        let roots = features / tree_size(children, depth).expect("checked by the caller");
        let (mut start, mut len) = (0, roots);
        let mut levels = Vec::new();
        for _ in 0..=depth {
            levels.push((start, len));
            start += len;
            len *= children;
        }
        Some(Tree {
            children,
            exclusive,
            levels,
        })
    }

    /// Parent deactivation, then (`exclusive`) one surviving child per
    /// node, level by level from the top.
    fn apply(&self, acts: &Tensor) -> Tensor {
        let (n, features) = (acts.size()[0], acts.size()[1]);
        let c = self.children;
        let mut acts = acts.shallow_clone();
        for pair in self.levels.windows(2) {
            let ((ps, pl), (cs, cl)) = (pair[0], pair[1]);
            let parent_on = acts.narrow(1, ps, pl).gt(0.0).to_kind(acts.kind());
            // Each child's parent on or off, [n, pl * c].
            let gate = parent_on.repeat_interleave_self_int(c, Some(1), None);
            let mut kids = acts.narrow(1, cs, cl) * gate;
            if self.exclusive {
                // sae_lens's winner: the largest of uniform scores among the
                // siblings that fire.
                let groups = kids.reshape([n, pl, c]);
                let on = groups.gt(0.0);
                let scores = Tensor::rand([n, pl, c], (Kind::Float, Device::Cpu))
                    .masked_fill(&on.logical_not(), -1.0);
                let winner = scores.argmax(2, true);
                let keep = on
                    .zeros_like()
                    .scatter_value(2, &winner, 1)
                    .logical_and(&on);
                kids = (groups * keep.to_kind(acts.kind())).reshape([n, cl]);
            }
            let rest = features - cs - cl;
            let mut parts = vec![acts.narrow(1, 0, cs), kids];
            if rest > 0 {
                parts.push(acts.narrow(1, cs + cl, rest));
            }
            acts = Tensor::cat(&parts, 1);
        }
        acts
    }

    /// sae_lens's `compute_probability_correction_factors` applied to
    /// `probs` and capped at 1: a child's probability over its parent's
    /// (base) one, times `1 + (its siblings' summed p) / p_parent` when
    /// siblings exclude each other.
    fn compensate(&self, probs: &Tensor) -> Tensor {
        let base = Vec::<f32>::try_from(probs).expect("float probabilities");
        let mut out: Vec<f64> = base.iter().map(|&p| f64::from(p)).collect();
        let c = self.children as usize;
        for pair in self.levels.windows(2) {
            let ((ps, pl), (cs, _)) = (pair[0], pair[1]);
            for j in 0..pl as usize {
                let parent = f64::from(base[ps as usize + j]);
                let first = cs as usize + j * c;
                let siblings: f64 = base[first..first + c].iter().map(|&p| f64::from(p)).sum();
                for (k, o) in out[first..first + c].iter_mut().enumerate() {
                    let own = f64::from(base[first + k]);
                    let mut factor = 1.0 / parent;
                    if self.exclusive {
                        factor *= 1.0 + (siblings - own).max(0.0) / parent;
                    }
                    *o = (own * factor).min(1.0);
                }
            }
        }
        let out: Vec<f32> = out.iter().map(|&p| p as f32).collect();
        Tensor::from_slice(&out)
    }
}

/// Features in one tree: `1 + children + .. + children^depth` (`None` on
/// overflow).
pub fn tree_size(children: i64, depth: i64) -> Option<i64> {
    let (mut size, mut level) = (1i64, 1i64);
    for _ in 0..depth {
        level = level.checked_mul(children)?;
        size = size.checked_add(level)?;
    }
    Some(size)
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
                depth: 1,
                exclusive: false,
                compensate: false,
                correlation_rank: 0,
                correlation_scale: 0.0,
            },
            noise: 0.0,
            seed: 3,
        })
    }

    /// Trees of depth 3 with 2 children (15 features each) in 50
    /// features: 3 trees, 5 free features.
    fn deep(exclusive: bool, compensate: bool, seed: u64) -> Synth {
        generate(&SynthParams {
            n: 40000,
            d_in: 8,
            features: 50,
            kind: SynthKind::SynthBench {
                zipf_exponent: 1.0,
                max_prob: 0.5,
                min_prob: 0.01,
                magnitude_std: 0.2,
                children: 2,
                depth: 3,
                exclusive,
                compensate,
                correlation_rank: 0,
                correlation_scale: 0.0,
            },
            noise: 0.0,
            seed,
        })
    }

    /// `(feature, parent)` of every child in [`deep`]'s layout, and the
    /// first of each pair of siblings.
    fn deep_layout() -> (Vec<(i64, i64)>, Vec<i64>) {
        let tree = Tree::new(50, 2, 3, false).unwrap();
        assert_eq!(tree.levels, vec![(0, 3), (3, 6), (9, 12), (21, 24)]);
        let mut pairs = vec![];
        let mut groups = vec![];
        for w in tree.levels.windows(2) {
            let ((ps, pl), (cs, _)) = (w[0], w[1]);
            for j in 0..pl {
                groups.push(cs + 2 * j);
                for k in 0..2 {
                    pairs.push((cs + 2 * j + k, ps + j));
                }
            }
        }
        (pairs, groups)
    }

    fn on(s: &Synth) -> Tensor {
        s.acts.gt(0.0)
    }

    /// Depth 3, exclusive (compensated, so the deepest level fires often):
    /// wherever a feature fires its parent fires (so its whole line of
    /// ancestors), no two children of one node fire together, and every
    /// level still fires.
    #[test]
    fn deep_exclusive_hierarchy_holds() {
        let s = deep(true, true, 7);
        let fired = on(&s);
        let (pairs, groups) = deep_layout();
        for &(child, parent) in &pairs {
            let orphan = fired
                .select(1, child)
                .logical_and(&fired.select(1, parent).logical_not());
            assert_eq!(
                orphan.sum(Kind::Int64).int64_value(&[]),
                0,
                "{child} without {parent}"
            );
        }
        for &first in &groups {
            let together = fired
                .narrow(1, first, 2)
                .sum_dim_intlist(1, false, Kind::Int64)
                .max()
                .int64_value(&[]);
            assert!(together <= 1, "children {first}.. fire {together} together");
        }
        let leaves = fired.narrow(1, 21, 24).sum(Kind::Int64).int64_value(&[]);
        assert!(leaves > 5000, "the deepest level fired {leaves} times");
        // Without exclusion siblings do fire together.
        let free = on(&deep(false, true, 7));
        let most = free
            .narrow(1, 3, 2)
            .sum_dim_intlist(1, false, Kind::Int64)
            .max()
            .int64_value(&[]);
        assert!(most >= 2, "non-exclusive siblings never co-fire");
    }

    /// Roots and free features keep their Zipf rates under the hierarchy;
    /// with `compensate` every feature (children at all depths, exclusive)
    /// fires at about its Zipf rate, which it falls well below without.
    #[test]
    fn deep_hierarchy_rates_are_kept() {
        let want = Vec::<f32>::try_from(zipf_probabilities(50, 1.0, 0.5, 0.01)).unwrap();
        let rates = |s: &Synth| {
            Vec::<f32>::try_from(on(s).to_kind(Kind::Float).mean_dim(0, false, Kind::Float))
                .unwrap()
        };
        let plain = rates(&deep(true, false, 8));
        let kept = rates(&deep(true, true, 8));
        for f in (0..3).chain(45..50) {
            let (r, w) = (plain[f], want[f]);
            assert!(
                (r - w).abs() < 0.015,
                "root/free feature {f}: rate {r}, Zipf {w}"
            );
        }
        let mut worst: f32 = 0.0;
        for f in 3..45 {
            let (r, w) = (kept[f], want[f]);
            worst = worst.max((r - w).abs() / w);
            assert!(
                plain[f] < 0.7 * w,
                "feature {f} uncompensated: {} vs {w}",
                plain[f]
            );
        }
        println!("compensated rates: worst relative deviation {worst}");
        assert!(
            worst < 0.25,
            "compensated rates off their Zipf rates by {worst} (relative)"
        );
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
                    depth: 1,
                    exclusive: false,
                    compensate: false,
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
