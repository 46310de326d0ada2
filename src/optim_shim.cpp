// torch's fused CPU/CUDA Adam and AdamW kernels (`torch.optim.Adam(fused=True)`)
// for src/optim.rs, which tch does not wrap. One call updates one flat
// parameter buffer with its gradient and moments. Errors come back as a
// malloc'd C string (src/shim_error.hpp).
//
// Tensors cross the boundary as `at::Tensor*` (tch's `Tensor::as_ptr()`).

#include "shim_error.hpp"
#include <ATen/ATen.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdint>
#include <vector>

extern "C" char *sae_fused_adam(at::Tensor *param, at::Tensor *grad, at::Tensor *exp_avg,
                                at::Tensor *exp_avg_sq, at::Tensor *step, double lr,
                                double beta1, double beta2, double weight_decay, double eps,
                                int32_t decoupled) {
  return sae_shim::guard([&] {
    std::vector<at::Tensor> p{*param}, g{*grad}, m{*exp_avg}, v{*exp_avg_sq}, s{*step};
    std::vector<at::Tensor> none;
    if (decoupled != 0) {
      at::_fused_adamw_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps, false, false);
    } else {
      at::_fused_adam_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps, false, false);
    }
  });
}

// `self.add_(other, alpha=alpha)`, which tch wraps without `alpha`: one
// rounding of `self + alpha * other` (fused multiply-add on CPU), which a
// multiply then an add would not reproduce. `other` may be of a narrower
// kind (Muon's bfloat16 update into a float32 weight).
extern "C" char *sae_add_scaled_(at::Tensor *self, at::Tensor *other, double alpha) {
  return sae_shim::guard([&] { self->add_(*other, alpha); });
}
