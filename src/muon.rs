//! `train.optimizer.name: muon`, as sparsify trains it (sparsify/muon.py,
//! sparsify/trainer.py): Muon on the weights of two or more dimensions,
//! Adam (`torch.optim.Adam`'s defaults, this config's betas/eps/weight_decay)
//! on the rest (biases, thresholds), both at `train.optimizer.lr`.
//!
//! Muon, per matrix `W` with gradient `G`, op for op as sparsify:
//! - decoupled decay `W *= 1 - lr * muon_weight_decay` (0.1 unless set);
//! - momentum `m = lerp(m, G, 1 - momentum)`, Nesterov `G = lerp(G, m, momentum)`;
//! - `U` = five quintic Newton-Schulz iterations on `G` in bfloat16
//!   (`quintic_newtonschulz`: an approximate orthogonalisation);
//! - `W += -lr * 0.2 * sqrt(max(rows, cols)) * U` (sparsify's scale, from
//!   arXiv:2502.16982), which makes the learning rate independent of the
//!   number of latents.
//!
//! sparsify schedules Muon's rate without the warm-up that the Adam part
//! gets: its rate is `StepParams::matrix_lr`.

use crate::config::{OptimizerConfig, OptimizerName};
use crate::optim::{add_scaled_, Adam};
use tch::{Kind, TchError, Tensor};

/// Newton-Schulz iterations per step (sparsify's `ns_steps`).
const NS_STEPS: usize = 5;

#[derive(Debug)]
pub struct Muon {
    momentum: f64,
    weight_decay: f64,
    /// Positions (in the parameter list) of the matrices, which Muon
    /// updates, and of the rest, which `adam` does.
    pub matrices: Vec<usize>,
    pub rest: Vec<usize>,
    /// Muon's momentum buffer of each matrix, in `matrices` order.
    pub momentum_buf: Vec<Tensor>,
    /// Adam over `rest`, its moments in `rest` order.
    pub adam: Adam,
}

impl Muon {
    pub fn new(cfg: &OptimizerConfig, params: &[&Tensor]) -> Result<Muon, TchError> {
        let (matrices, rest): (Vec<usize>, Vec<usize>) =
            (0..params.len()).partition(|&i| params[i].dim() >= 2);
        let adam_cfg = OptimizerConfig {
            name: OptimizerName::Adam,
            fused: false,
            momentum: None,
            muon_weight_decay: None,
            ..cfg.clone()
        };
        let rest_params: Vec<&Tensor> = rest.iter().map(|&i| params[i]).collect();
        Ok(Muon {
            momentum: cfg.momentum(),
            weight_decay: cfg.muon_weight_decay(),
            momentum_buf: matrices
                .iter()
                .map(|&i| params[i].f_zeros_like())
                .collect::<Result<_, _>>()?,
            adam: Adam::new(&adam_cfg, &rest_params)?,
            matrices,
            rest,
        })
    }

    /// The parameters Adam updates, in its order.
    pub fn rest_of<'a>(&self, params: &'a mut [&mut Tensor]) -> Vec<&'a mut Tensor> {
        params
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| self.rest.contains(i))
            .map(|(_, p)| &mut **p)
            .collect()
    }

    /// One step: Muon on the matrices at `matrix_lr`, Adam on the rest at `lr`.
    pub fn step(&mut self, params: &mut [&mut Tensor], lr: f64, matrix_lr: f64) {
        {
            let _guard = tch::no_grad_guard();
            // sparsify decays every matrix of the group before any update.
            if self.weight_decay > 0.0 {
                for &i in &self.matrices {
                    let _ = params[i].g_mul_scalar_(1.0 - matrix_lr * self.weight_decay);
                }
            }
            let beta = self.momentum;
            for (j, &i) in self.matrices.iter().enumerate() {
                let p = &mut *params[i];
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                if beta > 0.0 {
                    let buf = &mut self.momentum_buf[j];
                    let _ = buf.lerp_(&g, 1.0 - beta);
                    // Nesterov (sparsify: in place on the gradient).
                    g = g.lerp(buf, beta);
                }
                let update = newton_schulz(&g, NS_STEPS);
                let size = p.size();
                let scale = 0.2 * (*size.iter().max().unwrap() as f64).powf(0.5);
                add_scaled_(p, &update, -matrix_lr * scale);
            }
        }
        self.adam.cfg.lr = lr;
        let mut rest = self.rest_of(params);
        self.adam.step(&mut rest);
    }
}

/// sparsify's `quintic_newtonschulz`, op for op: `g` in bfloat16, scaled to
/// spectral norm at most 1 (by its Frobenius norm), then `steps` quintic
/// iterations `X = a X + (b A + (c A) A) X`, `A = X X^T`, on the wide
/// orientation. Returns bfloat16, as sparsify adds it to the weight.
pub fn newton_schulz(g: &Tensor, steps: usize) -> Tensor {
    let (a, b, c) = (3.4445, -4.7750, 2.0315);
    let size = g.size();
    let tall = size[size.len() - 2] > size[size.len() - 1];
    let mut x = g.to_kind(Kind::BFloat16);
    if tall {
        x = x.mt();
    }
    x = &x / (x.norm_scalaropt_dim(2, [-2, -1], true) + 1e-7);
    for _ in 0..steps {
        let m = x.matmul(&x.mt());
        // Python's `b * A + c * A @ A` is `b * A + (c * A) @ A`.
        let poly = &m * b + (&m * c).matmul(&m);
        x = &x * a + poly.matmul(&x);
    }
    if tall {
        x = x.mt();
    }
    x
}
