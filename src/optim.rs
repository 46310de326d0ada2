//! Adam / AdamW in plain tensor ops, with the same arithmetic as
//! `torch.optim.Adam(foreach=False)`. Our own (not tch's) so its moments and
//! step count are ours to save in a checkpoint and restore.
//!
//! Small models are bound by per-op overhead, not arithmetic: ten ops per
//! parameter tensor dominate their step. So once every parameter has a
//! gradient, parameters, gradients and moments are re-pointed into one flat
//! buffer each and the update runs as ten ops in all. Elementwise maths does
//! not care how elements are grouped, so the result is bit-identical (unit
//! test below; checked against torch in `tests/torch_reference.rs`). Anyone
//! who swaps a parameter or moment tensor out (checkpoint restore, a frozen
//! parameter) breaks the aliasing; the data pointers are checked once per
//! step (in `zero_grad`, or in `step` when no `zero_grad` came first), and a
//! broken aliasing is rebuilt, or the per-tensor path is used for that step.

use crate::config::{OptimizerConfig, OptimizerName};
use tch::{Kind, TchError, Tensor};

#[derive(Debug)]
pub struct Adam {
    pub cfg: OptimizerConfig,
    pub step: i64,
    /// First and second moments, one per parameter, same order as given
    /// (views into `Flat` buffers once the flat path is on).
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    flat: Option<Flat>,
    /// The buffers `new` put the parameters and moments in, until the flat
    /// path takes them.
    pending: Option<Buffers>,
    /// `zero_grad` found every tensor still aliasing `flat` (backward only
    /// accumulates into the gradients in place, so `step` can trust it).
    verified: bool,
}

/// Elements updated at a time on the flat path (16 MiB of float32).
const UPDATE_CHUNK: i64 = 1 << 22;

/// Buffers the tensors of the flat path may already alias: parameters,
/// gradients, moments.
#[derive(Debug, Default)]
struct Buffers {
    param: Option<Tensor>,
    grad: Option<Tensor>,
    m: Option<Tensor>,
    v: Option<Tensor>,
}

/// One buffer each for parameters, gradients and moments; every tensor of
/// the optimiser is a view of its buffer at `offsets[i]`.
#[derive(Debug)]
struct Flat {
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    offsets: Vec<i64>,
}

impl Flat {
    /// The address element `offset` of `buf` has.
    fn addr(buf: &Tensor, offset: i64) -> usize {
        buf.data_ptr() as usize + offset as usize * buf.kind().elt_size_in_bytes()
    }

    /// Whether every tensor still aliases its place in the buffers.
    fn intact(&self, params: &[&mut Tensor], m: &[Tensor], v: &[Tensor]) -> bool {
        params.len() == self.offsets.len()
            && params.iter().enumerate().all(|(i, p)| {
                let o = self.offsets[i];
                let g = p.grad();
                g.defined()
                    && p.data_ptr() as usize == Self::addr(&self.param, o)
                    && g.data_ptr() as usize == Self::addr(&self.grad, o)
                    && m[i].data_ptr() as usize == Self::addr(&self.m, o)
                    && v[i].data_ptr() as usize == Self::addr(&self.v, o)
            })
    }

    /// Points parameters, gradients and moments into one buffer each. None
    /// when the tensors cannot share one buffer. A group that still aliases
    /// its buffer in `have` at these offsets keeps it (`Adam::new` starts
    /// parameters and moments flat; a rebuild after one tensor was swapped
    /// finds the others flat): no copy. Otherwise the group is copied into a
    /// fresh buffer and re-pointed before the next one is allocated, so the
    /// tensors it replaces are freed first: building costs at most one
    /// group's size in extra memory (at the first step, the gradients'), not
    /// all four (4 x the parameters, a third of the training peak at 65,536
    /// latents).
    fn build(
        params: &mut [&mut Tensor],
        m: &mut [Tensor],
        v: &mut [Tensor],
        have: Buffers,
    ) -> Option<Flat> {
        let first = params.first()?;
        let (kind, device) = (first.kind(), first.device());
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
        let same = params
            .iter()
            .zip(&grads)
            .all(|(p, g)| g.defined() && p.kind() == kind && p.device() == device);
        if !same || !matches!(kind, Kind::Float | Kind::Double) {
            return None;
        }
        let _guard = tch::no_grad_guard();
        let offsets: Vec<i64> = params
            .iter()
            .scan(0, |o, p| {
                let at = *o;
                *o += p.numel() as i64;
                Some(at)
            })
            .collect();
        let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let view = |buf: &Tensor, i: usize, like: &Tensor| {
            buf.narrow(0, offsets[i], like.numel() as i64)
                .view(like.size().as_slice())
        };
        // The buffer `ts` already alias, or a fresh copy of them.
        let gather = |ts: &[&Tensor], have: Option<Tensor>| match have {
            Some(buf)
                if buf.numel() as i64 == total
                    && buf.kind() == kind
                    && buf.device() == device
                    && ts.iter().enumerate().all(|(i, t)| {
                        t.is_contiguous() && t.data_ptr() as usize == Self::addr(&buf, offsets[i])
                    }) =>
            {
                (buf, false)
            }
            _ => {
                let flat: Vec<Tensor> = ts.iter().map(|t| t.detach().reshape([-1])).collect();
                (Tensor::cat(&flat, 0), true)
            }
        };
        let (m_buf, copied) = gather(&m.iter().collect::<Vec<_>>(), have.m);
        if copied {
            for (i, t) in m.iter_mut().enumerate() {
                *t = view(&m_buf, i, t);
            }
        }
        let (v_buf, copied) = gather(&v.iter().collect::<Vec<_>>(), have.v);
        if copied {
            for (i, t) in v.iter_mut().enumerate() {
                *t = view(&v_buf, i, t);
            }
        }
        let (param, copied) = gather(&params.iter().map(|p| &**p).collect::<Vec<_>>(), have.param);
        if copied {
            for (i, p) in params.iter_mut().enumerate() {
                let data = view(&param, i, p);
                p.set_data(&data);
            }
        }
        let (grad, copied) = gather(&grads.iter().collect::<Vec<_>>(), have.grad);
        if copied {
            for (i, g) in grads.iter().enumerate() {
                // The gradient is the same tensor autograd accumulates into
                // (in place, as backward runs without grad mode), so
                // re-pointing its data keeps the gradients landing in the
                // buffer.
                g.shallow_clone().set_data(&view(&grad, i, g));
            }
        }
        Some(Flat {
            param,
            grad,
            m: m_buf,
            v: v_buf,
            offsets,
        })
    }
}

/// One buffer for `ts` in order, zeros or a copy of their values, when
/// they can share one (one floating kind and device).
fn one_buffer(ts: &[&Tensor], zeros: bool) -> Result<Option<Tensor>, TchError> {
    let Some(first) = ts.first() else {
        return Ok(None);
    };
    let (kind, device) = (first.kind(), first.device());
    if !matches!(kind, Kind::Float | Kind::Double)
        || !ts.iter().all(|t| t.kind() == kind && t.device() == device)
    {
        return Ok(None);
    }
    let _guard = tch::no_grad_guard();
    Ok(Some(match zeros {
        true => Tensor::f_zeros(
            [ts.iter().map(|t| t.numel() as i64).sum::<i64>()],
            (kind, device),
        )?,
        false => {
            let flat: Vec<Tensor> = ts.iter().map(|t| t.detach().reshape([-1])).collect();
            Tensor::f_cat(&flat, 0)?
        }
    }))
}

/// Views of `buf` shaped like each of `like`, one after the other.
fn views_of(buf: &Tensor, like: &[&Tensor]) -> Vec<Tensor> {
    let mut at = 0;
    like.iter()
        .map(|t| {
            let n = t.numel() as i64;
            let v = buf.narrow(0, at, n).view(t.size().as_slice());
            at += n;
            v
        })
        .collect()
}

impl Adam {
    /// Parameters and moments start in one buffer each (the parameters
    /// re-pointed there), before any step allocates: the flat path then
    /// copies only the gradients, once the first backward has made them.
    /// Its buffers are three times the parameters: a failed allocation is
    /// returned (libtorch's error), not a panic.
    pub fn new(cfg: &OptimizerConfig, params: &[&Tensor]) -> Result<Adam, TchError> {
        let pending = match one_buffer(params, false)? {
            Some(param) => {
                for (p, v) in params.iter().zip(views_of(&param, params)) {
                    // The parameter's own tensor (shared, as `p.grad()` is):
                    // its data re-pointed, as `Flat::build` does.
                    p.shallow_clone().set_data(&v);
                }
                Some(Buffers {
                    param: Some(param),
                    grad: None,
                    m: one_buffer(params, true)?,
                    v: one_buffer(params, true)?,
                })
            }
            None => None,
        };
        let moments = |buf: Option<&Tensor>| -> Result<Vec<Tensor>, TchError> {
            match buf {
                Some(b) => Ok(views_of(b, params)),
                None => params.iter().map(|p| p.f_zeros_like()).collect(),
            }
        };
        Ok(Adam {
            cfg: cfg.clone(),
            step: 0,
            exp_avg: moments(pending.as_ref().and_then(|b| b.m.as_ref()))?,
            exp_avg_sq: moments(pending.as_ref().and_then(|b| b.v.as_ref()))?,
            flat: None,
            pending,
            verified: false,
        })
    }

    /// (Re)builds the flat buffers, reusing the moments' own where they
    /// still alias them.
    fn rebuild(&mut self, params: &mut [&mut Tensor]) {
        let have = match self.flat.take() {
            Some(f) => Buffers {
                param: Some(f.param),
                grad: Some(f.grad),
                m: Some(f.m),
                v: Some(f.v),
            },
            None => match &self.pending {
                Some(b) => Buffers {
                    param: b.param.as_ref().map(Tensor::shallow_clone),
                    grad: None,
                    m: b.m.as_ref().map(Tensor::shallow_clone),
                    v: b.v.as_ref().map(Tensor::shallow_clone),
                },
                None => Buffers::default(),
            },
        };
        self.flat = Flat::build(params, &mut self.exp_avg, &mut self.exp_avg_sq, have);
        if self.flat.is_some() {
            self.pending = None;
        }
    }

    /// One update from the `.grad()` of each parameter. Parameters without a
    /// gradient are skipped, as torch does.
    pub fn step(&mut self, params: &mut [&mut Tensor]) {
        let intact = std::mem::take(&mut self.verified) || self.intact(params);
        if !intact {
            self.rebuild(params);
        }
        let _guard = tch::no_grad_guard();
        self.step += 1;
        match &mut self.flat {
            Some(f) if self.cfg.fused => fused_update(&self.cfg, self.step, f),
            Some(f) => Self::update_chunked(&self.cfg, self.step, f, UPDATE_CHUNK),
            None => {
                for (i, p) in params.iter_mut().enumerate() {
                    let grad = p.grad();
                    if grad.defined() {
                        let (m, v) = (&mut self.exp_avg[i], &mut self.exp_avg_sq[i]);
                        Self::update_one(&self.cfg, self.step, p, &grad, m, v);
                    }
                }
            }
        }
    }

    /// The gradients of `params` as one flat buffer, for a data-parallel
    /// sync between backward and [`Adam::step`] (built here if need be);
    /// `None` when the parameters cannot share one buffer.
    pub fn flat_grad(&mut self, params: &mut [&mut Tensor]) -> Option<Tensor> {
        if !self.intact(params) {
            self.rebuild(params);
        }
        self.verified = self.flat.is_some();
        self.flat.as_ref().map(|f| f.grad.shallow_clone())
    }

    /// The flat gradient buffer right after [`Adam::zero_grad`] found every
    /// tensor aliasing it (and cleared it): backward accumulates into it in
    /// place. `None` otherwise (no flat path yet: the first step).
    pub fn flat_grad_cleared(&self) -> Option<Tensor> {
        match (&self.flat, self.verified) {
            (Some(f), true) => Some(f.grad.shallow_clone()),
            _ => None,
        }
    }

    /// Whether the flat path is on and every tensor still aliases it.
    fn intact(&self, params: &[&mut Tensor]) -> bool {
        self.flat
            .as_ref()
            .is_some_and(|f| f.intact(params, &self.exp_avg, &self.exp_avg_sq))
    }

    /// The update of the flat buffers, `chunk` elements at a time: the
    /// update's temporaries (three, each the size of what it updates) stay
    /// at a few chunks instead of three times the parameters. Elementwise
    /// maths, so the result is bit-identical to one update of everything
    /// (unit test below).
    fn update_chunked(cfg: &OptimizerConfig, step: i64, f: &mut Flat, chunk: i64) {
        let n = f.param.numel() as i64;
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let part = |t: &Tensor| t.narrow(0, start, len);
            let (mut p, mut m, mut v) = (part(&f.param), part(&f.m), part(&f.v));
            Self::update_one(cfg, step, &mut p, &part(&f.grad), &mut m, &mut v);
            start += len;
        }
    }

    /// torch's single-tensor Adam, op for op (also where `optimizer.fused`
    /// is set but the parameters are not in one flat buffer).
    fn update_one(
        cfg: &OptimizerConfig,
        step: i64,
        p: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
    ) {
        let [beta1, beta2] = cfg.betas;
        let (lr, wd) = (cfg.lr, cfg.weight_decay);
        let t = step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2 = 1.0 - beta2.powi(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        let mut grad = grad.shallow_clone();
        if wd != 0.0 {
            match cfg.name {
                // L2 penalty folded into the gradient.
                OptimizerName::Adam => grad = &grad + &*p * wd,
                // Decoupled decay, applied to the weight before the update.
                OptimizerName::Adamw => {
                    let _ = p.g_mul_scalar_(1.0 - lr * wd);
                }
                OptimizerName::Signum | OptimizerName::Muon => {
                    unreachable!("Adam runs as adam or adamw")
                }
            }
        }
        let _ = m.lerp_(&grad, 1.0 - beta1);
        let _ = v.g_mul_scalar_(beta2);
        let _ = v.addcmul_(&grad, &(&grad * (1.0 - beta2)));
        // In place where torch allocates: same arithmetic, fewer buffers.
        let mut denom = v.sqrt();
        let _ = denom.g_div_scalar_(bias_correction2_sqrt);
        let _ = denom.g_add_scalar_(cfg.eps);
        // torch: param.addcdiv_(exp_avg, denom, value=-step_size), whose
        // kernel computes param + (value * exp_avg) / denom: scale first,
        // then divide, or the result is off by an ulp in ~2% of elements.
        let mut update = &*m * (-step_size);
        let _ = update.g_div_(&denom);
        let _ = p.g_add_(&update);
    }

    /// Clears the gradients of `params` before the next backward pass: one
    /// op on the flat buffer when the parameters still alias it.
    pub fn zero_grad(&mut self, params: &mut [&mut Tensor]) {
        self.verified = self.intact(params);
        match &mut self.flat {
            Some(f) if self.verified => {
                let _ = f.grad.zero_();
            }
            _ => {
                for p in params.iter_mut() {
                    p.zero_grad();
                }
            }
        }
    }

    /// Gives every parameter its own storage again (after training), so
    /// nothing that saves a parameter also saves its neighbours' buffer.
    /// One buffer at a time (parameters, gradients, then each moment): a
    /// buffer is freed once its last tensor has moved out, before the next
    /// one is copied, so this needs one buffer's size, not four.
    pub fn unflatten(&mut self, params: &mut [&mut Tensor]) {
        self.verified = false;
        // `new`'s buffers too: without a flat path (a parameter never got
        // a gradient) the parameters still share one.
        let pending = self.pending.take();
        if self.flat.take().is_none() && pending.is_none() {
            return;
        }
        let _guard = tch::no_grad_guard();
        for p in params.iter_mut() {
            p.set_data(&p.detach().copy());
        }
        for p in params.iter_mut() {
            let mut g = p.grad();
            if g.defined() {
                g.set_data(&g.detach().copy());
            }
        }
        for t in self.exp_avg.iter_mut().chain(self.exp_avg_sq.iter_mut()) {
            *t = t.copy();
        }
    }
}

extern "C" {
    fn sae_fused_adam(
        param: *mut torch_sys::C_tensor,
        grad: *mut torch_sys::C_tensor,
        exp_avg: *mut torch_sys::C_tensor,
        exp_avg_sq: *mut torch_sys::C_tensor,
        step: *mut torch_sys::C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        decoupled: i32,
    ) -> *mut std::ffi::c_char;
}

extern "C" {
    fn sae_add_scaled_(
        t: *mut torch_sys::C_tensor,
        other: *mut torch_sys::C_tensor,
        alpha: f64,
    ) -> *mut std::ffi::c_char;
}

/// `t.add_(other, alpha=alpha)` (src/optim_shim.cpp): torch's one rounding
/// of `t + alpha * other`, as signum and Muon update their weights.
pub(crate) fn add_scaled_(t: &mut Tensor, other: &Tensor, alpha: f64) {
    let mut other = other.shallow_clone();
    // SAFETY: two live tensors of this process; `t` is updated in place and
    // no reference is kept.
    let err = unsafe { sae_add_scaled_(t.as_mut_ptr(), other.as_mut_ptr(), alpha) };
    if let Some(e) = crate::shim::take_error(err) {
        // Shapes and kinds are ours to get right: a failure is a bug.
        panic!("add_: {e}");
    }
}

/// The flat buffers' update by torch's fused kernel (src/optim_shim.cpp),
/// `step` already counted, as torch passes its state step.
fn fused_update(cfg: &OptimizerConfig, step: i64, f: &mut Flat) {
    // Filled on the device: a copy from the host would wait for it.
    let mut step = Tensor::full([], step as f64, (Kind::Float, f.param.device()));
    let [beta1, beta2] = cfg.betas;
    let decoupled = i32::from(cfg.name == OptimizerName::Adamw);
    // SAFETY: five live tensors of this process; the kernel updates the
    // parameter and moments in place and keeps no reference to them.
    let err = unsafe {
        sae_fused_adam(
            f.param.as_mut_ptr(),
            f.grad.as_mut_ptr(),
            f.m.as_mut_ptr(),
            f.v.as_mut_ptr(),
            step.as_mut_ptr(),
            cfg.lr,
            beta1,
            beta2,
            cfg.weight_decay,
            cfg.eps,
            decoupled,
        )
    };
    if let Some(e) = crate::shim::take_error(err) {
        // Shapes and kinds are ours to get right: a failure is a bug.
        panic!("fused Adam: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const SHAPES: [&[i64]; 4] = [&[7, 5], &[5], &[5, 7], &[7]];

    fn leaf(t: &Tensor) -> Tensor {
        t.detach().copy().set_requires_grad(true)
    }

    /// Gives each parameter the gradient `g` (through a backward pass, as
    /// training does, so the flat gradient buffer is what autograd fills).
    fn backward(params: &[Tensor], grads: &[Tensor]) {
        let loss = params
            .iter()
            .zip(grads)
            .map(|(p, g)| (p * g).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap();
        loss.backward();
    }

    /// The flat update in chunks (of a size no vector width divides, over
    /// more elements than one thread's share) is bit-identical to one update
    /// of the whole buffer, with and without weight decay.
    #[test]
    fn chunked_update_is_bit_identical() {
        let _rng = crate::seeded();
        tch::manual_seed(5);
        let n = 100_003;
        let randn = || Tensor::randn([n], (Kind::Float, Device::Cpu));
        let (p0, m0, v0) = (randn(), randn() * 0.1, randn().square() * 0.01);
        for (name, weight_decay) in [(OptimizerName::Adam, 0.0), (OptimizerName::Adamw, 0.01)] {
            let cfg = OptimizerConfig {
                name,
                weight_decay,
                lr: 0.01,
                ..OptimizerConfig::default()
            };
            let flat = || Flat {
                param: p0.copy(),
                grad: Tensor::zeros([n], (Kind::Float, Device::Cpu)),
                m: m0.copy(),
                v: v0.copy(),
                offsets: vec![0],
            };
            let (mut whole, mut chunked) = (flat(), flat());
            for step in 1..=3 {
                let g = randn() * 10f64.powi(step as i32 - 2);
                whole.grad.copy_(&g);
                chunked.grad.copy_(&g);
                Adam::update_chunked(&cfg, step, &mut whole, n);
                Adam::update_chunked(&cfg, step, &mut chunked, 1000 + 7);
                for (a, b, what) in [
                    (&whole.param, &chunked.param, "param"),
                    (&whole.m, &chunked.m, "exp_avg"),
                    (&whole.v, &chunked.v, "exp_avg_sq"),
                ] {
                    assert!(a.equal(b), "{name:?} step {step}: {what} differs");
                }
            }
        }
    }

    /// The flat path gives bit-identical parameters and moments to torch's
    /// per-tensor update, also when a parameter or a moment is swapped out
    /// between steps (checkpoint restore), which forces a rebuild.
    #[test]
    fn flat_update_is_bit_identical_to_per_tensor_update() {
        let _rng = crate::seeded();
        tch::manual_seed(3);
        let configs = [
            (OptimizerName::Adam, 0.0),
            (OptimizerName::Adam, 0.01),
            (OptimizerName::Adamw, 0.01),
        ];
        for (name, weight_decay) in configs {
            let cfg = OptimizerConfig {
                name,
                weight_decay,
                lr: 0.01,
                ..OptimizerConfig::default()
            };
            let init: Vec<Tensor> = SHAPES
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
                .collect();
            let mut ours: Vec<Tensor> = init.iter().map(leaf).collect();
            let mut refs: Vec<Tensor> = init.iter().map(leaf).collect();
            let mut ref_m: Vec<Tensor> = init.iter().map(|t| t.zeros_like()).collect();
            let mut ref_v: Vec<Tensor> = init.iter().map(|t| t.zeros_like()).collect();
            let mut adam = Adam::new(&cfg, &ours.iter().collect::<Vec<_>>()).unwrap();
            for step in 1..=8i64 {
                if step == 4 {
                    ours[2] = leaf(&ours[2]);
                }
                if step == 6 {
                    adam.exp_avg[1] = adam.exp_avg[1].copy();
                }
                let grads: Vec<Tensor> = SHAPES
                    .iter()
                    .map(|s| {
                        Tensor::randn(*s, (Kind::Float, Device::Cpu))
                            * 10f64.powi(step as i32 % 5 - 3)
                    })
                    .collect();
                adam.zero_grad(&mut ours.iter_mut().collect::<Vec<_>>());
                backward(&ours, &grads);
                adam.step(&mut ours.iter_mut().collect::<Vec<_>>());
                assert!(adam.flat.is_some(), "step {step}: flat path not taken");

                for p in refs.iter_mut() {
                    p.zero_grad();
                }
                backward(&refs, &grads);
                let _guard = tch::no_grad_guard();
                for i in 0..refs.len() {
                    let g = refs[i].grad();
                    Adam::update_one(&cfg, step, &mut refs[i], &g, &mut ref_m[i], &mut ref_v[i]);
                }
                for i in 0..refs.len() {
                    assert!(
                        ours[i].equal(&refs[i]),
                        "{name:?} wd {weight_decay} step {step} param {i}"
                    );
                    assert!(adam.exp_avg[i].equal(&ref_m[i]), "step {step} exp_avg {i}");
                    assert!(
                        adam.exp_avg_sq[i].equal(&ref_v[i]),
                        "step {step} exp_avg_sq {i}"
                    );
                }
            }
            // Flat: each parameter starts where the previous one ends.
            let adjacent = |ps: &[Tensor]| {
                ps.windows(2).all(|w| {
                    w[0].data_ptr() as usize + w[0].numel() * 4 == w[1].data_ptr() as usize
                })
            };
            assert!(adjacent(&ours));
            // Unflattened: same values, storage of their own.
            let before: Vec<Tensor> = ours.iter().map(|p| p.detach().copy()).collect();
            adam.unflatten(&mut ours.iter_mut().collect::<Vec<_>>());
            assert!(adam.flat.is_none());
            assert!(!adjacent(&ours));
            for (p, b) in ours.iter().zip(&before) {
                assert!(p.equal(b));
            }
        }
    }
}
