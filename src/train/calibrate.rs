//! `model.calibrate_threshold` (batchtopk, matryoshka_batchtopk): once
//! training ends, the inference threshold is set from the training rows
//! instead of the running estimate, so that the saved model's own encoder
//! keeps `k` codes per row on average on them.
//!
//! Inference codes are `relu(pre) * (pre > t)`, so a row's L0 is the count of
//! its pre-activations above `t`. With `N = rows x k`, `t` is the
//! `(N + 1)`-th largest value of `relu(pre)` over all rows and latents:
//! exactly `N` codes exceed it (fewer only where values tie at the cut, or
//! where fewer than `N` are positive). It is found by a radix selection on
//! the float bits, a byte per pass: four passes over the rows, in chunks,
//! each a 256-bin count, so memory stays at one chunk's pre-activations
//! whatever the data size.

use crate::model::Sae;
use tch::{Kind, Tensor};

/// Rows encoded at a time.
const CHUNK: i64 = 4096;

/// The threshold for `k` codes per row on average over the rows of `x`
/// (un-normalised input), set on `model` as a scalar (as batchtopk trains
/// it); returns it.
pub fn calibrate_threshold(model: &mut Sae, x: &Tensor, k: i64) -> f64 {
    let t = kth_threshold(model, x, k);
    let device = model.device();
    model.threshold = Some(Tensor::from(t).to_kind(Kind::Double).to_device(device));
    t
}

/// The `(rows x k + 1)`-th largest `relu(pre)` over `x` (0 when there are
/// not that many values).
fn kth_threshold(model: &Sae, x: &Tensor, k: i64) -> f64 {
    let _guard = tch::no_grad_guard();
    let (n, h) = (x.size()[0], model.spec.d_hidden);
    // 1-based rank from the top of the value sought.
    let mut rank = n * k + 1;
    if rank > n * h {
        return 0.0;
    }
    // Non-negative float32 values order as their bit patterns do.
    let mut prefix: i64 = 0;
    for level in 0..4 {
        let shift = 24 - 8 * level;
        let counts = byte_counts(model, x, prefix, shift);
        let mut bin = 255;
        loop {
            let c = counts[bin as usize];
            if c >= rank || bin == 0 {
                break;
            }
            rank -= c;
            bin -= 1;
        }
        prefix = prefix * 256 + bin;
    }
    f32::from_bits(prefix as u32) as f64
}

/// Over all `relu(pre)` values of `x` whose float bits above `shift + 8`
/// equal `prefix`: how many have each value of the byte at `shift`.
fn byte_counts(model: &Sae, x: &Tensor, prefix: i64, shift: i64) -> [i64; 256] {
    let device = model.device();
    let n = x.size()[0];
    let mut total = Tensor::zeros([256], (Kind::Int64, device));
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let xb = x
            .narrow(0, start, len)
            .to_kind(Kind::Float)
            .to_device(device);
        let pre = model.pre_activations(&model.norm.apply(&xb));
        let bits = pre
            .relu()
            .to_kind(Kind::Float)
            .contiguous()
            .view_dtype(Kind::Int)
            .to_kind(Kind::Int64)
            .flatten(0, -1);
        let high = bits.bitwise_right_shift_tensor_scalar(shift);
        let selected = match shift {
            24 => high,
            _ => {
                let keep = bits.bitwise_right_shift_tensor_scalar(shift + 8).eq(prefix);
                high.masked_select(&keep) - prefix * 256
            }
        };
        total += selected.bincount::<Tensor>(None, 256);
        start += len;
    }
    let v = Vec::<i64>::try_from(&total.to_device(tch::Device::Cpu)).unwrap_or_default();
    let mut out = [0i64; 256];
    for (o, c) in out.iter_mut().zip(v) {
        *o = c;
    }
    out
}
