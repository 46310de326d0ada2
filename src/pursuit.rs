//! Pursuit encoders at inference, for any model with a linear decoder:
//! orthogonal matching pursuit (OMP) and matching pursuit (MP) over the
//! model's decoder rows, in place of the model's own encoder
//! (`sae encode|reconstruct|eval --encoder omp|mp --k N`).
//!
//! **Space and `b_dec`.** Everything happens in the model's normalised space.
//! The decoder is `x̂ = z·W_dec + b_dec` ([`Sae::decode_normalized`]: `b_dec`
//! is added whether or not the model subtracts it from its input,
//! `apply_b_dec_to_input` only concerns the encoder), so the part of `norm(x)`
//! the codes must explain is `r0 = norm(x) − b_dec`, always. Pursuit starts
//! from that residual, and `decode` of its codes gives back
//! `r0 − r_final + b_dec`, un-normalised.
//!
//! **Dictionary.** The decoder rows `W_dec [d_hidden, d_out]` (`W_enc.T` for
//! tied models). Atoms are compared by direction: the algorithms run on the
//! unit rows `d̃_j = d_j / ‖d_j‖` (an all-zero row stays zero and is never
//! usefully selected), and the codes returned are rescaled to the ORIGINAL
//! rows, `z_j = c̃_j / ‖d_j‖`, so that `sae decode` of them reconstructs.
//!
//! **OMP** (as scikit-learn's `orthogonal_mp`, codes may be negative):
//! `k` times, select `argmax_j |⟨r, d̃_j⟩|`, then refit all selected atoms'
//! coefficients by least squares (`G_S γ = D̃_S r0`, with `G_S` the Gram matrix
//! of the selected atoms, factorised by an incremental Cholesky) and set
//! `r = r0 − γ·D̃_S`. A row stops early, keeping its codes, when the atom it
//! selects is already in its support or is linearly dependent on it (the
//! Cholesky pivot `‖d̃‖² − ‖w‖²` falls to 1e-10 or below), where scikit-learn
//! also stops. The small linear algebra is in float64; the `[rows,
//! d_hidden]` correlations are float32. They come from the Gram matrix
//! `G = D̃·D̃ᵀ` when it fits (Batch-OMP, Rubinstein et al. 2008:
//! `D̃·r_t = D̃·r0 − Σ_s γ_s G[s]`, one matmul per row and then t rows of G
//! per step, gathered by `embedding_bag`), else from the residual (a full
//! matmul per step, k times the one-pass encoder's work).
//!
//! **MP** (SAELens's `MatchingPursuitSAE` encoder, `_encode_matching_pursuit`,
//! on the unit atoms): at most `k` steps of `j = argmax relu(⟨r, d̃_j⟩)`,
//! `c̃_j += relu(⟨r, d̃_j⟩)`, `r −= relu(⟨r, d̃_j⟩)·d̃_j`: codes are
//! non-negative, with no refit. A row stops after a step that left its
//! support unchanged (it re-selected an atom it had, or found no positive
//! correlation; that step's update is still applied, as in SAELens) or after
//! which `‖r‖ < residual_threshold` (when the threshold is > 0). On unit-norm
//! dictionaries (SAELens's matching-pursuit models) this is SAELens's
//! encoder exactly; on others it is SAELens's applied to the unit atoms,
//! i.e. textbook MP (`c_j += ⟨r, d_j⟩ / ‖d_j‖²`) restricted to positive
//! correlations.
//!
//! Both run batched over rows (a chunk of rows at a time, no per-row loops)
//! on the model's device.

use crate::config::OutputActivation;
use crate::metrics::CodeSource;
use crate::model::Sae;
use crate::{bail_user, Result};
use tch::{Device, Kind, Tensor};

/// Which pursuit, and its limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pursuit {
    /// Orthogonal matching pursuit with at most `k` atoms per row.
    Omp { k: i64 },
    /// Matching pursuit: at most `k` steps; a row also stops when its
    /// residual norm falls below `residual_threshold` (0: never).
    Mp { k: i64, residual_threshold: f64 },
}

impl Pursuit {
    /// The pursuit of a config's `eval` section (None: the model's own
    /// encoder only); `k` defaults to `model.k`, and for mp to `d_in`.
    pub fn from_config(cfg: &crate::config::Config, d_in: i64) -> Option<Pursuit> {
        use crate::config::EvalEncoder;
        let k = cfg.eval.k.or(cfg.model.k);
        match cfg.eval.encoder {
            EvalEncoder::Model => None,
            EvalEncoder::Omp => Some(Pursuit::Omp {
                k: k.expect("validated: eval.encoder omp has a k"),
            }),
            EvalEncoder::Mp => Some(Pursuit::Mp {
                k: k.unwrap_or(d_in),
                residual_threshold: cfg.eval.residual_threshold,
            }),
        }
    }

    /// At most this many atoms per row.
    pub fn k(&self) -> i64 {
        match *self {
            Pursuit::Omp { k } | Pursuit::Mp { k, .. } => k,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Pursuit::Omp { .. } => "omp",
            Pursuit::Mp { .. } => "mp",
        }
    }
}

/// Linear-algebra pivots at or below this count as linear dependence (OMP).
const PIVOT_EPS: f64 = 1e-10;
/// Bytes of working tensors per chunk of rows (bounds memory for any input).
const CHUNK_BYTES: i64 = 1 << 27;
/// OMP keeps the atoms' Gram matrix when it takes at most this many bytes
/// (d_hidden up to 23,170); larger dictionaries recompute correlations from
/// the residual, k matmuls instead of one.
const GRAM_BYTES: i64 = 2 << 30;

/// A pursuit encoder over one model's decoder rows.
#[derive(Debug)]
pub struct PursuitEncoder {
    pub method: Pursuit,
    /// Unit decoder rows `[h, d]`, float32 (correlations) and float64 (OMP's
    /// refits).
    unit32: Tensor,
    unit64: Tensor,
    /// OMP: the Gram matrix `D̃·D̃ᵀ [h, h]` (float32) of the unit atoms,
    /// when it fits in [`GRAM_BYTES`].
    gram: Option<Tensor>,
    /// Rows per chunk, when set (tests); otherwise from [`CHUNK_BYTES`].
    chunk_rows: Option<i64>,
    /// `1 / ‖d_j‖` (0 for an all-zero row), float32 `[h]`.
    inv_norm: Tensor,
    /// `[d]`, float32.
    b_dec: Tensor,
}

impl PursuitEncoder {
    /// Checks that `model`'s decoder is linear and maps codes to the space
    /// its input lives in; user errors otherwise.
    pub fn new(model: &Sae, method: Pursuit) -> Result<PursuitEncoder> {
        let name = method.name();
        if model.spec.decoder_activation != OutputActivation::None {
            bail_user!(
                "--encoder {name}: needs a linear decoder (z·W_dec + b_dec), but this model \
                 applies a sigmoid to its output (decoder_activation: sigmoid); use --encoder model"
            );
        }
        if model.is_deep() {
            bail_user!(
                "--encoder {name}: needs a linear decoder (z·W_dec + b_dec), but this model \
                 has hidden layers (model.hidden); use --encoder model"
            );
        }
        if model.w_skip.is_some() {
            bail_user!(
                "--encoder {name}: not for skip models (model.skip_connection: the \
                 reconstruction adds x @ W_skip.T, which a pursuit over the decoder rows \
                 ignores); use --encoder model"
            );
        }
        if model.is_transcoder() {
            bail_user!(
                "--encoder {name}: not for transcoders (this model reconstructs another \
                 array, {} columns, from its input); use --encoder model",
                model.d_out()
            );
        }
        let k = method.k();
        if k < 1 {
            bail_user!("--k {k}: must be at least 1");
        }
        let _guard = tch::no_grad_guard();
        let w = model.decoder_weight().detach().to_kind(Kind::Float);
        let norm = w.norm_scalaropt_dim(2, [1], false);
        // `a.where_self(cond, b)`: a where cond, else b.
        let inv_norm = norm
            .reciprocal()
            .where_self(&norm.gt(0.0), &norm.zeros_like());
        let unit32 = (&w * inv_norm.unsqueeze(1)).contiguous();
        let unit64 = unit32.to_kind(Kind::Double);
        let h = unit32.size()[0];
        let gram = (matches!(method, Pursuit::Omp { .. }) && 4 * h * h <= GRAM_BYTES)
            .then(|| unit32.mm(&unit32.tr()));
        Ok(PursuitEncoder {
            method,
            unit32,
            unit64,
            gram,
            chunk_rows: None,
            inv_norm,
            b_dec: model.b_dec.detach().to_kind(Kind::Float),
        })
    }

    /// OMP without the Gram matrix, as for dictionaries too large for it
    /// (for tests and benchmarks: both ways give the same codes).
    pub fn without_gram(mut self) -> Self {
        self.gram = None;
        self
    }

    /// At most `rows` rows per chunk (tests: several chunks, in parallel).
    pub fn with_chunk_rows(mut self, rows: i64) -> Self {
        self.chunk_rows = Some(rows.max(1));
        self
    }

    pub fn device(&self) -> Device {
        self.unit32.device()
    }

    /// Codes `[n, d_hidden]` (float32) of normalised rows `xn [n, d_in]`,
    /// for the model's original decoder rows.
    pub fn encode_normalized(&self, xn: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let r0 = xn.to_kind(Kind::Float) - &self.b_dec;
        let n = r0.size()[0];
        let (h, d) = (self.unit32.size()[0], self.unit32.size()[1]);
        // Per row: the [h] correlations (float32) and, for OMP, the [k, d]
        // selected atoms (float64).
        let per_row = match self.method {
            Pursuit::Omp { k } => 12 * h + 8 * k * d,
            Pursuit::Mp { .. } => 4 * h,
        };
        let chunk = self
            .chunk_rows
            .unwrap_or((CHUNK_BYTES / per_row.max(1)).clamp(16, n.max(16)));
        let ranges: Vec<(i64, i64)> = (0..n)
            .step_by(chunk as usize)
            .map(|start| (start, chunk.min(n - start)))
            .collect();
        let workers = match self.device() {
            Device::Cpu => (tch::get_num_threads().max(1) as usize).min(ranges.len()),
            _ => 1,
        };
        let out = if workers > 1 {
            self.chunks_in_parallel(&r0, &ranges, workers)
        } else {
            ranges
                .iter()
                .map(|&(start, len)| self.chunk(&r0.narrow(0, start, len)))
                .collect()
        };
        if out.is_empty() {
            return Tensor::zeros([0, h], (Kind::Float, self.device()));
        }
        Tensor::cat(&out, 0)
    }

    /// Codes of one chunk of centred rows.
    fn chunk(&self, rows: &Tensor) -> Tensor {
        match self.method {
            Pursuit::Omp { k } => self.omp(rows, k),
            Pursuit::Mp {
                k,
                residual_threshold,
            } => self.mp(rows, k, residual_threshold),
        }
    }

    /// The chunks on `workers` threads of one libtorch thread each. The
    /// pursuit loop is many small operations; run with several libtorch
    /// threads, each of them ends in an OpenMP barrier whose spinning threads
    /// cost more than the work (3x slower on a busy 2-core machine), while
    /// whole chunks side by side keep every core on useful work.
    fn chunks_in_parallel(
        &self,
        r0: &Tensor,
        ranges: &[(i64, i64)],
        workers: usize,
    ) -> Vec<Tensor> {
        let threads = tch::get_num_threads();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut done: Vec<(usize, Tensor)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    // Tensors are Send, not Sync: each worker gets its own
                    // handles (sharing storage), made here.
                    let enc = self.shallow_clone();
                    let r0 = r0.shallow_clone();
                    let next = &next;
                    scope.spawn(move || {
                        tch::set_num_threads(1);
                        let _guard = tch::no_grad_guard();
                        let mut got = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&(start, len)) = ranges.get(i) else {
                                break;
                            };
                            got.push((i, enc.chunk(&r0.narrow(0, start, len))));
                        }
                        got
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("pursuit worker failed"))
                .collect()
        });
        tch::set_num_threads(threads);
        done.sort_by_key(|(i, _)| *i);
        done.into_iter().map(|(_, t)| t).collect()
    }

    /// Another handle on the same tensors (for a worker thread).
    fn shallow_clone(&self) -> PursuitEncoder {
        PursuitEncoder {
            method: self.method,
            unit32: self.unit32.shallow_clone(),
            unit64: self.unit64.shallow_clone(),
            gram: self.gram.as_ref().map(Tensor::shallow_clone),
            chunk_rows: self.chunk_rows,
            inv_norm: self.inv_norm.shallow_clone(),
            b_dec: self.b_dec.shallow_clone(),
        }
    }

    /// Codes of raw rows (normalised as the model does first).
    pub fn encode(&self, model: &Sae, x: &Tensor) -> Tensor {
        self.encode_normalized(&model.norm.apply(x))
    }

    /// OMP on residuals `r0 [b, d]` (float32): codes `[b, h]`.
    // Kept whole (about 100 lines): the hot loop's steps (pick an atom,
    // extend the Cholesky factor's inverse, refit) all update the same
    // in-place batch state (idx, linv, y, gamma, active), and the comments
    // derive one recipe; split, that state would be threaded through every
    // helper on every iteration.
    fn omp(&self, r0: &Tensor, k: i64) -> Tensor {
        let b = r0.size()[0];
        let h = self.unit32.size()[0];
        let k = k.min(h);
        let dev = r0.device();
        let f64o = (Kind::Double, dev);
        let mut src = match &self.gram {
            Some(g) => Source::Gram {
                g,
                alpha0: r0.mm(&self.unit32.tr()),
                offsets: Tensor::arange(b, (Kind::Int64, dev)),
                r0: r0.to_kind(Kind::Double),
            },
            None => Source::Residual {
                r0: r0.to_kind(Kind::Double),
                atoms: Tensor::zeros([b, k, r0.size()[1]], f64o),
            },
        };
        // Slot t of each row: its t-th atom's index (0 once the row has
        // stopped), row t of the inverse `L⁻¹` of the Cholesky factor of the
        // selected atoms' Gram matrix (`G_S = L·Lᵀ`), and `y_t = (L⁻¹·rhs)_t`
        // with `rhs_s = ⟨d̃_s, r0⟩`, so that the refit is `γ = G_S⁻¹·rhs =
        // L⁻ᵀ·y`.
        let idx = Tensor::zeros([b, k], (Kind::Int64, dev));
        let linv = Tensor::zeros([b, k, k], f64o);
        let y = Tensor::zeros([b, k], f64o);
        let mut active = Tensor::ones([b], (Kind::Bool, dev));
        let mut gamma = Tensor::zeros([b, 0], f64o);
        let mut used = 0;
        for t in 0..k {
            let new = src
                .correlations(self, &idx.narrow(1, 0, t), &gamma)
                .abs()
                .argmax(1, false);
            let (sq, g, rhs) = src.atom(self, &new, &idx.narrow(1, 0, t));
            // `w = L⁻¹·(D̃_S·d̃_new)`: the new atom's row of the Cholesky
            // factor; its pivot `‖d̃_new‖² − ‖w‖²` is the squared distance
            // of the new atom from the span of the selected ones.
            let (w, pivot, dup) = match g {
                None => (None, sq, Tensor::zeros([b], (Kind::Bool, dev))),
                Some(g) => {
                    let w = (linv.narrow(1, 0, t).narrow(2, 0, t) * g.unsqueeze(1))
                        .sum_dim_intlist(2, false, Kind::Double);
                    let pivot = sq - w.square().sum_dim_intlist(1, false, Kind::Double);
                    let dup = idx
                        .narrow(1, 0, t)
                        .eq_tensor(&new.unsqueeze(1))
                        .any_dim(1, false);
                    (Some(w), pivot, dup)
                }
            };
            active = active
                .logical_and(&dup.logical_not())
                .logical_and(&pivot.gt(PIVOT_EPS));
            let on = active.to_kind(Kind::Double);
            let diag = pivot
                .clamp_min(PIVOT_EPS)
                .sqrt()
                .where_self(&active, &on.ones_like());
            src.keep(self, t, &new, &on);
            idx.narrow(1, t, 1)
                .copy_(&(new * active.to_kind(Kind::Int64)).unsqueeze(1));
            // Row t of L⁻¹ is `[−wᵀ·L⁻¹, 1] / diag` and `y_t = (rhs_t −
            // w·y) / diag`, elementwise over the batch: no per-row solver
            // calls. A stopped row gets the identity row and y_t = 0, which
            // leaves its γ as it was.
            linv.narrow(1, t, 1)
                .narrow(2, t, 1)
                .copy_(&diag.reciprocal().view([b, 1, 1]));
            let y_t = match &w {
                Some(w) => {
                    let lt = linv.narrow(1, 0, t).narrow(2, 0, t);
                    let row = (w.unsqueeze(2) * &lt).sum_dim_intlist(1, false, Kind::Double)
                        * (-&on / &diag).unsqueeze(1);
                    linv.narrow(1, t, 1)
                        .narrow(2, 0, t)
                        .copy_(&row.unsqueeze(1));
                    (rhs - (w * y.narrow(1, 0, t)).sum_dim_intlist(1, false, Kind::Double)) * &on
                        / &diag
                }
                None => rhs * &on / &diag,
            };
            y.narrow(1, t, 1).copy_(&y_t.unsqueeze(1));
            used = t + 1;
            gamma = (linv.narrow(1, 0, used).narrow(2, 0, used)
                * y.narrow(1, 0, used).unsqueeze(2))
            .sum_dim_intlist(1, false, Kind::Double);
            if active.any().int64_value(&[]) == 0 {
                break;
            }
        }
        let idx = idx.narrow(1, 0, used);
        let vals = gamma.to_kind(Kind::Float)
            * self
                .inv_norm
                .index_select(0, &idx.flatten(0, -1))
                .view([b, used]);
        Tensor::zeros([b, h], (Kind::Float, dev)).scatter_add(1, &idx, &vals)
    }

    /// MP (SAELens's `_encode_matching_pursuit` on the unit atoms) on
    /// residuals `r0 [b, d]` (float32): codes `[b, h]`.
    fn mp(&self, r0: &Tensor, k: i64, threshold: f64) -> Tensor {
        matching_pursuit(r0, &self.unit32, k, threshold) * self.inv_norm.unsqueeze(0)
    }
}

/// Where OMP's per-step quantities come from: the correlations `D̃·r_t` of
/// the current residual, and the new atom's Gram entries and `⟨d̃, r0⟩`.
enum Source<'a> {
    /// Batch-OMP (Rubinstein et al. 2008): `D̃·r_t = α0 − Σ_s γ_s G[s]`,
    /// t rows of G per row and step, summed by one `embedding_bag`; the
    /// new atom's Gram entries are gathered from G. No residual.
    Gram {
        g: &'a Tensor,
        alpha0: Tensor,
        offsets: Tensor,
        r0: Tensor,
    },
    /// The residual `r0 − γ·D̃_S` (float64, from the kept atoms) times
    /// `D̃ᵀ`: a [b, d] x [d, h] matmul per step.
    Residual { r0: Tensor, atoms: Tensor },
}

impl Source<'_> {
    /// `D̃·r` for the residual left by the atoms `idx [b, t]` with
    /// coefficients `gamma [b, t]`: float32 `[b, h]`.
    fn correlations(&self, enc: &PursuitEncoder, idx: &Tensor, gamma: &Tensor) -> Tensor {
        let t = idx.size()[1];
        match self {
            Source::Gram { alpha0, .. } if t == 0 => alpha0.shallow_clone(),
            Source::Gram {
                g, alpha0, offsets, ..
            } => {
                let (fit, _, _, _) = Tensor::embedding_bag(
                    g,
                    &idx.flatten(0, -1),
                    &(offsets * t),
                    false,
                    0, // sum
                    false,
                    Some(gamma.to_kind(Kind::Float).flatten(0, -1)),
                    false,
                );
                alpha0 - fit
            }
            Source::Residual { r0, atoms } => {
                let r = if t == 0 {
                    r0.shallow_clone()
                } else {
                    r0 - gamma
                        .unsqueeze(1)
                        .bmm(&atoms.narrow(1, 0, t))
                        .squeeze_dim(1)
                };
                r.to_kind(Kind::Float).mm(&enc.unit32.tr())
            }
        }
    }

    /// For the new atoms `new [b]` after the atoms `idx [b, t]`:
    /// `‖d̃_new‖²`, the Gram entries `⟨d̃_s, d̃_new⟩ [b, t]` (None when t is
    /// 0) and `⟨d̃_new, r0⟩`, float64.
    fn atom(
        &self,
        enc: &PursuitEncoder,
        new: &Tensor,
        idx: &Tensor,
    ) -> (Tensor, Option<Tensor>, Tensor) {
        let t = idx.size()[1];
        match self {
            Source::Gram { g, r0, .. } => {
                let h = g.size()[0];
                let flat = g.view([-1]);
                let sq = flat.index_select(0, &(new * (h + 1)));
                let cross = (t > 0).then(|| {
                    flat.take(&(idx * h + new.unsqueeze(1)))
                        .to_kind(Kind::Double)
                });
                let rhs =
                    (enc.unit64.index_select(0, new) * r0).sum_dim_intlist(1, false, Kind::Double);
                (sq.to_kind(Kind::Double), cross, rhs)
            }
            Source::Residual { r0, atoms } => {
                let a = enc.unit64.index_select(0, new);
                let sq = a.square().sum_dim_intlist(1, false, Kind::Double);
                let cross =
                    (t > 0).then(|| atoms.narrow(1, 0, t).bmm(&a.unsqueeze(2)).squeeze_dim(2));
                let rhs = (&a * r0).sum_dim_intlist(1, false, Kind::Double);
                (sq, cross, rhs)
            }
        }
    }

    /// Keeps the new atoms in slot t (zero where `on` is 0: stopped rows).
    fn keep(&mut self, enc: &PursuitEncoder, t: i64, new: &Tensor, on: &Tensor) {
        if let Source::Residual { atoms, .. } = self {
            let a = enc.unit64.index_select(0, new) * on.unsqueeze(1);
            atoms.narrow(1, t, 1).copy_(&a.unsqueeze(1));
        }
    }
}

/// SAELens's `_encode_matching_pursuit` (`stop_on_duplicate_support`
/// true): codes `[b, h]` of centred rows `r0 [b, d]` over the atoms `dict
/// [h, d]` as they are (not normalised), at most `k` steps. Differentiable
/// as SAELens's: the selections are made without autograd, and gradients
/// flow to `r0` and `dict` through the selected coefficients
/// `relu(<r, d_j>)` and the residual updates (the `matching_pursuit`
/// architecture trains through this; `--encoder mp` calls it on unit
/// atoms without autograd).
pub fn matching_pursuit(r0: &Tensor, dict: &Tensor, k: i64, threshold: f64) -> Tensor {
    let b = r0.size()[0];
    let h = dict.size()[0];
    let dev = r0.device();
    let mut r = r0.shallow_clone();
    let mut acts = Tensor::zeros([b, h], (r0.kind(), dev));
    let mut prev = Tensor::zeros([b, h], (Kind::Bool, dev));
    let mut done = Tensor::zeros([b], (Kind::Bool, dev));
    for _ in 0..k {
        let idx = tch::no_grad(|| r.mm(&dict.tr()).relu().argmax(1, true));
        let sel = dict.index_select(0, &idx.squeeze_dim(1));
        let values = (&r * &sel).sum_dim_intlist(-1, true, r.kind()).relu();
        let masked = values * done.logical_not().to_kind(r.kind()).unsqueeze(1);
        acts = acts.scatter_add(1, &idx, &masked);
        r = &r - &masked * &sel;
        let stop = tch::no_grad(|| {
            let support = acts.ne(0.0);
            done = done.logical_or(&support.eq_tensor(&prev).all_dim(1, false));
            prev = support;
            if threshold > 0.0 {
                done = done.logical_or(&r.norm_scalaropt_dim(2, [-1], false).lt(threshold));
            }
            done.all().int64_value(&[]) != 0
        });
        if stop {
            break;
        }
    }
    acts
}

impl CodeSource for PursuitEncoder {
    fn codes(&self, _model: &Sae, xn: &Tensor) -> Tensor {
        self.encode_normalized(xn)
    }

    /// Pursuit codes are signed (OMP): a latent is active when non-zero.
    fn active(&self, _model: &Sae, z: &Tensor) -> Tensor {
        z.ne(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::ModelSpec;
    use crate::normalize::Normalizer;

    fn model(d: i64, h: i64, tied: bool) -> Sae {
        let cfg = ModelConfig {
            d_hidden: h,
            tied,
            ..ModelConfig::default()
        };
        let spec = ModelSpec::from_config(&cfg, d);
        let m = Sae::init(spec, &cfg, d, Normalizer::identity(), None, Device::Cpu).unwrap();
        let _ = m.b_dec.detach().uniform_(-1.0, 1.0);
        m
    }

    /// OMP with k atoms recovers rows that are exact combinations of k
    /// decoder rows (orthogonal directions of arbitrary norms, where
    /// recovery is guaranteed) to float precision, with codes for the
    /// original rows; MP's residual never grows.
    #[test]
    fn omp_recovers_exact_combinations() {
        let _rng = crate::seeded();
        tch::manual_seed(3);
        let (d, h, k, n) = (24, 20, 3, 50);
        let m = model(d, h, false);
        let (q, _) = Tensor::linalg_qr(
            &Tensor::randn([d, h], (Kind::Float, Device::Cpu)),
            "reduced",
        );
        let scale = Tensor::rand([h, 1], (Kind::Float, Device::Cpu)) * 3.0 + 0.2;
        let m = Sae {
            w_dec: Some(q.tr().contiguous() * scale),
            ..m
        };
        // Random supports of k atoms with coefficients of either sign.
        let idx = Tensor::rand([n, h], (Kind::Float, Device::Cpu))
            .argsort(1, false)
            .narrow(1, 0, k);
        let vals = (Tensor::rand([n, k], (Kind::Float, Device::Cpu)) + 0.5)
            * (Tensor::randint(2, [n, k], (Kind::Float, Device::Cpu)) * 2.0 - 1.0);
        let z = Tensor::zeros([n, h], (Kind::Float, Device::Cpu)).scatter(1, &idx, &vals);
        let x = m.decode(&z);
        let enc = PursuitEncoder::new(&m, Pursuit::Omp { k }).unwrap();
        let got = enc.encode(&m, &x);
        let err = (&got - &z).abs().max().double_value(&[]);
        assert!(err < 1e-4, "OMP codes differ by {err}");
        let recon = m.decode(&got);
        assert!((recon - &x).abs().max().double_value(&[]) < 1e-4);
        let mp = PursuitEncoder::new(
            &m,
            Pursuit::Mp {
                k: 10,
                residual_threshold: 0.0,
            },
        )
        .unwrap();
        let zm = mp.encode(&m, &x);
        assert!(
            zm.ge(0.0).all().int64_value(&[]) != 0,
            "MP codes are non-negative"
        );
        let r0 = (&x - &m.b_dec).square().sum(Kind::Double).double_value(&[]);
        let r = (m.decode(&zm) - &x)
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
        assert!(r <= r0, "MP residual grew: {r} > {r0}");
    }

    /// The Gram-matrix correlations (Batch-OMP) and the residual ones
    /// select the same atoms and give the same codes.
    #[test]
    fn omp_gram_equals_residual() {
        let _rng = crate::seeded();
        tch::manual_seed(5);
        let m = model(16, 48, false);
        let x = Tensor::randn([300, 16], (Kind::Float, Device::Cpu));
        let gram = PursuitEncoder::new(&m, Pursuit::Omp { k: 6 }).unwrap();
        assert!(gram.gram.is_some());
        let resid = PursuitEncoder::new(&m, Pursuit::Omp { k: 6 })
            .unwrap()
            .without_gram();
        let (a, b) = (gram.encode(&m, &x), resid.encode(&m, &x));
        assert!(a.ne(0.0).eq_tensor(&b.ne(0.0)).all().int64_value(&[]) != 0);
        let scale = b.abs().max().double_value(&[]);
        let err = (a - b).abs().max().double_value(&[]) / scale;
        assert!(err < 1e-5, "codes differ by {err} of the largest");
    }

    /// Chunks encoded by parallel workers give the codes of one chunk.
    #[test]
    fn chunks_in_parallel_equal_one_chunk() {
        let _rng = crate::seeded();
        tch::manual_seed(6);
        let m = model(16, 48, false);
        let x = Tensor::randn([301, 16], (Kind::Float, Device::Cpu));
        let threads = tch::get_num_threads();
        tch::set_num_threads(2);
        for p in [
            Pursuit::Omp { k: 5 },
            Pursuit::Mp {
                k: 7,
                residual_threshold: 0.5,
            },
        ] {
            let whole = PursuitEncoder::new(&m, p).unwrap().encode(&m, &x);
            let parts = PursuitEncoder::new(&m, p)
                .unwrap()
                .with_chunk_rows(16)
                .encode(&m, &x);
            // Equal but for matmul blocking (chunk sizes differ).
            let err = (&whole - &parts).abs().max().double_value(&[]);
            assert!(err < 1e-5, "{p:?}: chunked codes differ by {err}");
        }
        assert_eq!(tch::get_num_threads(), 2, "thread count restored");
        tch::set_num_threads(threads);
    }

    /// Tied models use W_enc.T as the dictionary; `k` larger than the
    /// dictionary is capped; a sigmoid decoder is refused.
    #[test]
    fn tied_models_and_refusals() {
        let _rng = crate::seeded();
        tch::manual_seed(4);
        let m = model(8, 5, true);
        let x = Tensor::randn([7, 8], (Kind::Float, Device::Cpu));
        let enc = PursuitEncoder::new(&m, Pursuit::Omp { k: 9 }).unwrap();
        let z = enc.encode(&m, &x);
        assert_eq!(z.size(), vec![7, 5]);
        let mut s = model(8, 5, false);
        s.spec.decoder_activation = OutputActivation::Sigmoid;
        let e = PursuitEncoder::new(&s, Pursuit::Omp { k: 2 }).unwrap_err();
        assert!(e.to_string().contains("sigmoid"), "{e}");
        assert_eq!(crate::error::exit_code(&e), 2);
    }
}
