//! Scores against known features, with the definitions of SynthSAEBench
//! (`sae_lens.synthetic.evals`): how well the decoder rows match the true
//! feature vectors (MCC, uniqueness), how well each latent detects its
//! best-matching feature (precision, recall, F1, accuracy), and how the
//! reconstruction keeps the input's scale (shrinkage) and variance.
//!
//! Definitions (`W` the decoder rows `[h, d]`, `G` the true features
//! `[F, d]`, `C = |cos(W_i, G_j)|`, rows normalised with norms floored at 1e-8):
//! - `mcc`: the mean of `C` over a one-to-one matching of latents and
//!   features that maximises its sum (Hungarian; `min(h, F)` pairs).
//! - `uniqueness`: distinct `argmax_j C_ij` over latents, divided by `h`.
//! - per latent `i` and its best feature `j = argmax C_i`: a row is a true
//!   positive when the latent's code is not 0 and the feature's activation is
//!   above 0, and so on; precision `TP/(TP+FP)`, recall `TP/(TP+FN)` (0 when
//!   undefined), F1 their harmonic mean (0 when both are 0), accuracy
//!   `(TP+TN)/rows`; each the mean over latents.
//! - `shrinkage`: the mean over rows with `||x|| > 1e-6` of `||x_hat|| / ||x||`.
//! - `explained_variance`: `1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)`.
//! - `sae_l0` / `true_l0`: non-zero codes / activations per row; `dead_latents`:
//!   latents whose code is 0 on every row.

use crate::metrics::{chunk_rows, unit_rows, CodeSource};
use crate::model::Sae;
use serde::Serialize;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize)]
pub struct GroundTruthScores {
    pub mcc: f64,
    pub uniqueness: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1_score: f64,
    pub accuracy: f64,
    pub shrinkage: f64,
    pub explained_variance: f64,
    pub sae_l0: f64,
    pub true_l0: f64,
    pub dead_latents: i64,
}

/// `|cos|` between the rows of `a` `[n, d]` and `b` `[m, d]`, as
/// `sae_lens.util.cosine_similarities`.
fn abs_cosines(a: &Tensor, b: &Tensor) -> Tensor {
    unit_rows(a, 1e-8).matmul(&unit_rows(b, 1e-8).tr()).abs()
}

/// Scores `model` (its codes from `codes`) on rows `x` `[n, d]` whose true
/// feature activations are `acts` `[n, F]`, against the features `truth`
/// `[F, d]`; in row chunks.
pub fn score(
    model: &Sae,
    codes: &dyn CodeSource,
    x: &Tensor,
    acts: &Tensor,
    truth: &Tensor,
) -> GroundTruthScores {
    let _guard = tch::no_grad_guard();
    let dev = model.device();
    // Compared with features of the data's space, as `metrics::mmcs` does.
    let w = crate::metrics::decoder_rows_in_data_space(model).to_kind(Kind::Float);
    let cos = abs_cosines(&w, &truth.to_device(dev).to_kind(Kind::Float));
    let best = cos.argmax(1, false);
    let h = w.size()[0];
    let n = x.size()[0];
    let counts = Tensor::zeros([4, h], (Kind::Double, dev));
    let mut fired = Tensor::zeros([h], (Kind::Bool, dev));
    let (mut shrink_sum, mut shrink_rows) = (0.0, 0i64);
    let (mut sq_norm, mut sq_resid) = (0.0, 0.0);
    let mut sum_x = Tensor::zeros([x.size()[1]], (Kind::Double, dev));
    let (mut sae_nnz, mut true_nnz) = (0i64, 0i64);
    let chunk = chunk_rows(h, x.size()[1]);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let xb = x.narrow(0, start, len).to_device(dev).to_kind(Kind::Float);
        let ab = acts
            .narrow(0, start, len)
            .to_device(dev)
            .to_kind(Kind::Float);
        let xn = model.norm.apply(&xb);
        let z = codes.codes(model, &xn);
        let xhat = model
            .output_norm()
            .invert(&model.reconstruct_normalized(&xn, &z));
        let sae_fires = z.ne(0.0);
        let gt_fires = ab.index_select(1, &best).gt(0.0);
        let (s, g) = (&sae_fires, &gt_fires);
        let parts = [
            s.logical_and(g),
            s.logical_and(&g.logical_not()),
            s.logical_not().logical_and(g),
            s.logical_not().logical_and(&g.logical_not()),
        ];
        for (i, p) in parts.iter().enumerate() {
            let _ = counts
                .get(i as i64)
                .g_add_(&p.sum_dim_intlist(0, false, Kind::Double));
        }
        fired = fired.logical_or(&sae_fires.any_dim(0, false));
        let in_norm = xb.norm_scalaropt_dim(2, [-1], false);
        let valid = in_norm.gt(1e-6);
        let out_norm = xhat.norm_scalaropt_dim(2, [-1], false);
        shrink_sum += (out_norm.masked_select(&valid) / in_norm.masked_select(&valid))
            .sum(Kind::Double)
            .double_value(&[]);
        shrink_rows += valid.sum(Kind::Int64).int64_value(&[]);
        sum_x += xb.sum_dim_intlist(0, false, Kind::Double);
        sq_norm += xb.square().sum(Kind::Double).double_value(&[]);
        sq_resid += (&xb - &xhat).square().sum(Kind::Double).double_value(&[]);
        sae_nnz += sae_fires.sum(Kind::Int64).int64_value(&[]);
        true_nnz += ab.ne(0.0).sum(Kind::Int64).int64_value(&[]);
        start += len;
    }
    let (tp, fp, fnn, tn) = (counts.get(0), counts.get(1), counts.get(2), counts.get(3));
    let ratio = |num: &Tensor, den: &Tensor| {
        let pos = den.gt(0.0);
        (num / den.clamp_min(1e-300)).where_self(&pos, &num.zeros_like())
    };
    let precision = ratio(&tp, &(&tp + &fp));
    let recall = ratio(&tp, &(&tp + &fnn));
    let f1 = ratio(&(&precision * &recall * 2.0), &(&precision + &recall));
    let accuracy = (&tp + &tn) / (&tp + &fp + &fnn + &tn).clamp_min(1e-8);
    let mean = |t: &Tensor| t.mean(Kind::Double).double_value(&[]);
    let rows = n.max(1) as f64;
    let mean_x = sum_x / rows;
    let total_var = sq_norm / rows - mean_x.square().sum(Kind::Double).double_value(&[]);
    let mse = sq_resid / rows;
    let explained_variance = match total_var < 1e-10 {
        true => f64::from(u8::from(mse < 1e-10)),
        false => 1.0 - mse / total_var,
    };
    GroundTruthScores {
        mcc: mcc(&cos),
        uniqueness: best.unique_dim(0, false, false, false).0.size()[0] as f64 / h as f64,
        precision: mean(&precision),
        recall: mean(&recall),
        f1_score: mean(&f1),
        accuracy: mean(&accuracy),
        shrinkage: match shrink_rows {
            0 => 0.0,
            r => shrink_sum / r as f64,
        },
        explained_variance,
        sae_l0: sae_nnz as f64 / rows,
        true_l0: true_nnz as f64 / rows,
        dead_latents: fired.logical_not().sum(Kind::Int64).int64_value(&[]),
    }
}

/// The mean similarity of a one-to-one matching of rows and columns of
/// `sim` `[n, m]` that maximises its sum.
fn mcc(sim: &Tensor) -> f64 {
    let sim = sim.to_kind(Kind::Double).to_device(tch::Device::Cpu);
    let (n, m) = (sim.size()[0], sim.size()[1]);
    let sim = match n <= m {
        true => sim,
        false => sim.tr().contiguous(),
    };
    let (rows, cols) = (n.min(m) as usize, n.max(m) as usize);
    let v = Vec::<f64>::try_from(&sim.reshape([-1])).expect("a double tensor");
    let cost: Vec<f64> = v.iter().map(|s| 1.0 - s).collect();
    let assignment = hungarian(&cost, rows, cols);
    let total: f64 = assignment
        .iter()
        .enumerate()
        .map(|(r, &c)| v[r * cols + c])
        .sum();
    total / rows.max(1) as f64
}

/// Minimum-cost assignment of each of `rows` rows to a distinct column of
/// a `rows x cols` cost matrix (row-major), `rows <= cols`: the shortest
/// augmenting path form of the Hungarian algorithm, O(rows^2 cols).
/// Returns each row's column.
pub fn hungarian(cost: &[f64], rows: usize, cols: usize) -> Vec<usize> {
    assert!(rows <= cols && cost.len() == rows * cols);
    // Potentials u (rows) and v (columns), 1-based with a virtual column 0.
    let (mut u, mut v) = (vec![0.0; rows + 1], vec![0.0; cols + 1]);
    let mut owner = vec![0usize; cols + 1]; // row matched to each column (0: none)
    let mut way = vec![0usize; cols + 1];
    for row in 1..=rows {
        owner[0] = row;
        let mut col0 = 0;
        let mut min_to = vec![f64::INFINITY; cols + 1];
        let mut used = vec![false; cols + 1];
        loop {
            used[col0] = true;
            let r0 = owner[col0];
            let (mut delta, mut col1) = (f64::INFINITY, 0);
            for c in 1..=cols {
                if used[c] {
                    continue;
                }
                let reduced = cost[(r0 - 1) * cols + (c - 1)] - u[r0] - v[c];
                if reduced < min_to[c] {
                    min_to[c] = reduced;
                    way[c] = col0;
                }
                if min_to[c] < delta {
                    delta = min_to[c];
                    col1 = c;
                }
            }
            for c in 0..=cols {
                if used[c] {
                    u[owner[c]] += delta;
                    v[c] -= delta;
                } else {
                    min_to[c] -= delta;
                }
            }
            col0 = col1;
            if owner[col0] == 0 {
                break;
            }
        }
        // Flip the augmenting path back to the virtual column.
        loop {
            let prev = way[col0];
            owner[col0] = owner[prev];
            col0 = prev;
            if col0 == 0 {
                break;
            }
        }
    }
    let mut assignment = vec![0; rows];
    for c in 1..=cols {
        if owner[c] != 0 {
            assignment[owner[c] - 1] = c - 1;
        }
    }
    assignment
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against every assignment of a small matrix.
    #[test]
    fn hungarian_finds_the_cheapest_assignment() {
        let (rows, cols) = (3, 4);
        let cost = [
            4.0, 1.0, 3.0, 2.0, //
            2.0, 0.0, 5.0, 3.0, //
            3.0, 2.0, 2.0, 1.5,
        ];
        let got = hungarian(&cost, rows, cols);
        let total = |a: &[usize]| {
            a.iter()
                .enumerate()
                .map(|(r, &c)| cost[r * cols + c])
                .sum::<f64>()
        };
        let mut best = f64::INFINITY;
        for a in 0..cols {
            for b in 0..cols {
                for c in 0..cols {
                    if a != b && b != c && a != c {
                        best = best.min(total(&[a, b, c]));
                    }
                }
            }
        }
        assert_eq!(total(&got), best);
        let mut seen = got.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), rows, "distinct columns: {got:?}");
    }
}
