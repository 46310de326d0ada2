// A small C ABI over libtorch's torch.export AOTInductor package loader
// (`torch::inductor::AOTIModelPackageLoader`), for src/lm/pt2.rs: read a
// package's metadata, load it on a device, run it on one tensor, free it.
// Errors come back as a malloc'd C string, never as a C++ exception across
// the FFI boundary (src/shim_error.hpp).
//
// Tensors cross the boundary as `torch::Tensor*`, which is what tch's
// `Tensor::as_ptr()` / `Tensor::from_ptr()` hold (torch-sys's libtch).

#include "../shim_error.hpp"
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdint>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using sae_shim::guard;

// The package's model name inside the archive: aoti_compile_and_package
// writes a single model called "model".
const char *const MODEL_NAME = "model";

// A failed run inside the package's own library (input checks under
// AOTI_RUNTIME_CHECK_INPUTS, an index out of bounds in a kernel) prints the
// reason to std::cerr ("Error: ...") and libtorch then throws a generic
// "run_func_(...) API call failed". So std::cerr is captured while a model
// runs (one run at a time in the process, under this mutex) and the reason
// joins the error; on success anything captured is passed on to std::cerr.
std::mutex cerr_mutex;

class CerrCapture {
public:
  CerrCapture() : old_(std::cerr.rdbuf(buf_.rdbuf())) {}
  ~CerrCapture() { std::cerr.rdbuf(old_); }
  std::string text() const { return buf_.str(); }

private:
  std::ostringstream buf_;
  std::streambuf *old_;
};

} // namespace

extern "C" {

struct SaePt2 {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

typedef void (*sae_pt2_kv_cb)(void *ctx, const char *key, const char *value);

// Reports each (key, value) of the metadata of the package at `path`
// (among them "AOTI_DEVICE_KEY": the device type it was compiled for)
// without loading its model.
char *sae_pt2_read_metadata(const char *path, void *ctx, sae_pt2_kv_cb cb) {
  return guard([&] {
    auto meta = torch::inductor::AOTIModelPackageLoader::
        load_metadata_from_package(path, MODEL_NAME);
    for (const auto &kv : meta) {
      cb(ctx, kv.first.c_str(), kv.second.c_str());
    }
  });
}

// Loads the package at `path`; `device_index` is -1 for the CPU, else the
// CUDA device's index. On success *out owns the model (sae_pt2_free).
char *sae_pt2_load(const char *path, int32_t device_index, SaePt2 **out) {
  *out = nullptr;
  return guard([&] {
    auto handle = std::make_unique<SaePt2>();
    handle->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        path, MODEL_NAME, /*run_single_threaded=*/false, /*num_runners=*/1,
        static_cast<c10::DeviceIndex>(device_index));
    *out = handle.release();
  });
}

// Runs the model on one input; on success *out is a new tensor, its first
// output (the caller owns it).
char *sae_pt2_run(SaePt2 *h, const torch::Tensor *input, torch::Tensor **out) {
  *out = nullptr;
  return guard([&] {
    std::vector<at::Tensor> inputs{*input};
    std::vector<at::Tensor> outputs;
    std::string captured;
    {
      std::lock_guard<std::mutex> lock(cerr_mutex);
      CerrCapture capture;
      try {
        outputs = h->loader->run(inputs);
      } catch (const c10::Error &e) {
        captured = capture.text();
        throw std::runtime_error(captured + "\n" +
                                 e.what_without_backtrace());
      } catch (const std::exception &e) {
        captured = capture.text();
        throw std::runtime_error(captured + "\n" + e.what());
      }
      captured = capture.text();
    }
    if (!captured.empty()) {
      std::cerr << captured;
    }
    if (outputs.empty()) {
      throw std::runtime_error("the package's model returned no output");
    }
    *out = new torch::Tensor(std::move(outputs[0]));
  });
}

void sae_pt2_free(SaePt2 *h) { delete h; }

} // extern "C"
