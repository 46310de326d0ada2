// libtorch's autocast state for src/autocast.rs: what Python's
// `torch.autocast(device_type, dtype)` does on entry and exit
// (torch/amp/autocast_mode.py), for any device type. tch's own
// `tch::autocast` only toggles CUDA's flag (at::autocast::set_enabled) and
// cannot choose the dtype (CUDA's default is float16).
//
// The state is thread-local in libtorch, as in Python. Errors come back as a
// malloc'd C string (src/shim_error.hpp).

#include "shim_error.hpp"
#include <ATen/autocast_mode.h>

#include <cstdint>

// What entering saves, for exiting to restore.
struct SaeAutocastPrev {
  int32_t enabled;
  int32_t dtype;
  int32_t cache_enabled;
};

static at::DeviceType device_of(int32_t device) {
  return device == 1 ? at::kCUDA : at::kCPU;
}

// `__enter__` of `torch.autocast(device, dtype=torch.bfloat16)`: remember
// the state, enable autocast on `device` (0 CPU, 1 CUDA) in bfloat16, count
// the nesting, cache casts.
extern "C" char *sae_autocast_enter_bf16(int32_t device, SaeAutocastPrev *prev) {
  return sae_shim::guard([&] {
    auto d = device_of(device);
    prev->cache_enabled = at::autocast::is_autocast_cache_enabled() ? 1 : 0;
    prev->enabled = at::autocast::is_autocast_enabled(d) ? 1 : 0;
    prev->dtype = static_cast<int32_t>(at::autocast::get_autocast_dtype(d));
    at::autocast::set_autocast_enabled(d, true);
    at::autocast::set_autocast_dtype(d, at::kBFloat16);
    at::autocast::increment_nesting();
    at::autocast::set_autocast_cache_enabled(true);
  });
}

// `__exit__`: the outermost exit drops the cached casts; the saved state
// comes back.
extern "C" char *sae_autocast_exit(int32_t device, const SaeAutocastPrev *prev) {
  return sae_shim::guard([&] {
    auto d = device_of(device);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(d, prev->enabled != 0);
    at::autocast::set_autocast_dtype(d, static_cast<at::ScalarType>(prev->dtype));
    at::autocast::set_autocast_cache_enabled(prev->cache_enabled != 0);
  });
}

// Whether autocast is on for `device` in this thread (for tests).
extern "C" int32_t sae_autocast_is_enabled(int32_t device) {
  return at::autocast::is_autocast_enabled(device_of(device)) ? 1 : 0;
}
