// A small C ABI over libtorch's TorchScript module API, for
// src/export/torchscript.rs. It knows nothing about sparse autoencoders: it
// builds a scripted module from named tensors, simple attributes and
// TorchScript source, and reads a module's tensors and simple attributes
// back. Errors come back as a malloc'd C string, never as
// a C++ exception across the FFI boundary (src/shim_error.hpp).
//
// Tensors cross the boundary as `torch::Tensor*`, which is what tch's
// `Tensor::as_ptr()` / `Tensor::from_ptr()` hold (torch-sys's libtch).

#include "../shim_error.hpp"
#include <torch/script.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

using sae_shim::dup_string;
using sae_shim::guard;

} // namespace

extern "C" {

// Attribute kinds, shared with the Rust side.
enum SaeTsAttrKind {
  SAE_TS_STR = 0,
  SAE_TS_INT = 1,
  SAE_TS_BOOL = 2,
  SAE_TS_FLOAT = 3,
};

struct SaeTsAttr {
  const char *name;
  int32_t kind;
  const char *str_value;
  int64_t int_value;
  double float_value;
};

// Builds a module of class `class_name` with the given tensors (a parameter
// when is_param[i] != 0, else a buffer) and attributes, defines `source` (its
// methods, TorchScript), and saves it to `path`.
char *sae_ts_save(const char *path, const char *class_name, const char *source,
                  const char *const *tensor_names,
                  const torch::Tensor *const *tensors, const int32_t *is_param,
                  int32_t n_tensors, const SaeTsAttr *attrs, int32_t n_attrs) {
  return guard([&] {
    torch::jit::Module module{c10::QualifiedName(class_name)};
    for (int32_t i = 0; i < n_tensors; ++i) {
      at::Tensor t = tensors[i]->detach().clone().contiguous();
      if (is_param[i] != 0) {
        t.set_requires_grad(true);
        module.register_parameter(tensor_names[i], t, /*is_buffer=*/false);
      } else {
        module.register_buffer(tensor_names[i], t);
      }
    }
    for (int32_t i = 0; i < n_attrs; ++i) {
      const SaeTsAttr &a = attrs[i];
      switch (a.kind) {
      case SAE_TS_STR:
        module.register_attribute(a.name, c10::StringType::get(),
                                  std::string(a.str_value));
        break;
      case SAE_TS_INT:
        module.register_attribute(a.name, c10::IntType::get(), a.int_value);
        break;
      case SAE_TS_BOOL:
        module.register_attribute(a.name, c10::BoolType::get(),
                                  a.int_value != 0);
        break;
      case SAE_TS_FLOAT:
        module.register_attribute(a.name, c10::FloatType::get(),
                                  a.float_value);
        break;
      default:
        throw std::invalid_argument("unknown attribute kind for " +
                                    std::string(a.name));
      }
    }
    module.define(source);
    module.eval();
    module.save(path);
  });
}

typedef void (*sae_ts_tensor_cb)(void *ctx, const char *name, int32_t is_param,
                                 torch::Tensor *t);
typedef void (*sae_ts_attr_cb)(void *ctx, const char *name, int32_t kind,
                               const char *str_value, int64_t int_value,
                               double float_value);
typedef void (*sae_ts_method_cb)(void *ctx, const char *name);

// Loads the module at `path` on the CPU and reports its top-level
// parameters and buffers (`tensor_cb` takes ownership of each tensor), its
// top-level string/int/bool/float attributes, and its method names.
char *sae_ts_read(const char *path, void *ctx, sae_ts_tensor_cb tensor_cb,
                  sae_ts_attr_cb attr_cb, sae_ts_method_cb method_cb) {
  return guard([&] {
    torch::jit::Module module = torch::jit::load(path, torch::kCPU);
    for (const auto &p : module.named_parameters(/*recurse=*/false)) {
      tensor_cb(ctx, p.name.c_str(), 1,
                new torch::Tensor(p.value.detach().clone()));
    }
    for (const auto &b : module.named_buffers(/*recurse=*/false)) {
      tensor_cb(ctx, b.name.c_str(), 0,
                new torch::Tensor(b.value.detach().clone()));
    }
    for (const auto &a : module.named_attributes(/*recurse=*/false)) {
      const c10::IValue &v = a.value;
      if (v.isString()) {
        attr_cb(ctx, a.name.c_str(), SAE_TS_STR, v.toStringRef().c_str(), 0,
                0.0);
      } else if (v.isBool()) {
        attr_cb(ctx, a.name.c_str(), SAE_TS_BOOL, nullptr, v.toBool() ? 1 : 0,
                0.0);
      } else if (v.isInt()) {
        attr_cb(ctx, a.name.c_str(), SAE_TS_INT, nullptr, v.toInt(), 0.0);
      } else if (v.isDouble()) {
        attr_cb(ctx, a.name.c_str(), SAE_TS_FLOAT, nullptr, 0, v.toDouble());
      }
    }
    for (const auto &m : module.get_methods()) {
      method_cb(ctx, m.name().c_str());
    }
  });
}

} // extern "C"

#include <torch/version.h>

extern "C" {
// The libtorch version this binary was built against ("2.11.0"), for
// `sae info`.
const char *sae_torch_version() { return TORCH_VERSION; }
}
