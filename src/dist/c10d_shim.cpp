// A small C ABI over PyTorch's own distributed engine (c10d), for
// src/dist/mod.rs: a TCPStore rendezvous, a Gloo or NCCL process group
// (NCCL from src/dist/c10d_nccl.cpp, a translation unit of its own), the
// collectives data-parallel training needs, and a gradient reducer that
// overlaps the allreduce with backward (as DDP's Reducer does). It knows
// nothing about sparse autoencoders. Errors come back as a malloc'd C
// string, never as a C++ exception across the FFI boundary
// (src/shim_error.hpp).
//
// Tensors cross the boundary as `at::Tensor*` (tch's `Tensor::as_ptr()`).

#include "../shim_error.hpp"
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#ifdef SAE_WITH_NCCL
// src/dist/c10d_nccl.cpp
c10::intrusive_ptr<c10d::Backend>
sae_nccl_backend(const c10::intrusive_ptr<c10d::Store> &store, int rank,
                 int world, std::chrono::milliseconds timeout, int device);
std::string sae_nccl_version();
#endif

namespace {

using sae_shim::dup_string;
using sae_shim::guard;

c10d::ReduceOp reduce_op(int32_t op) {
  switch (op) {
  case 1:
    return c10d::ReduceOp::MAX;
  case 2:
    return c10d::ReduceOp::MIN;
  default:
    return c10d::ReduceOp::SUM;
  }
}

// A run of parameters whose gradients are one contiguous range of the flat
// gradient buffer, allreduced as one tensor.
struct Bucket {
  int64_t lo = 0, hi = 0; // elements [lo, hi) of the flat buffer
  size_t params = 0;      // how many parameters it holds
  // Its gradients are finished after backward (by hand, not by autograd):
  // launched by `finish`, never by a hook.
  bool late = false;
  size_t pending = 0; // parameters whose gradient has not arrived this step
  bool launched = false;
  c10::intrusive_ptr<c10d::Work> work;
};

// DDP's Reducer in small: a post hook on each parameter's gradient
// accumulator counts the gradients of its bucket; once a bucket is complete
// (and every bucket before it has been launched: every rank launches them in
// the same order) its async allreduce starts while backward goes on.
struct Reducer {
  std::mutex mu;
  c10::intrusive_ptr<c10d::Backend> pg;
  // What the hooks are registered on (re-registered when it changes).
  std::vector<c10::TensorImpl *> impls;
  std::vector<std::shared_ptr<torch::autograd::Node>> accs;
  std::vector<uintptr_t> keys;
  std::vector<uint8_t> late;
  std::vector<int64_t> numels;
  int64_t bucket_bytes = 0;
  uint64_t generation = 0;
  std::vector<Bucket> buckets; // in launch order: reverse parameter order
  std::vector<size_t> bucket_of;
  // This step's.
  bool armed = false;
  at::Tensor flat;
  double scale = 1.0;
  size_t next = 0;            // the next bucket a hook may launch
  size_t early = 0;           // buckets launched during backward
  std::vector<size_t> order;  // buckets in the order they were launched
  std::string error;

  void unregister() {
    for (size_t i = 0; i < accs.size(); ++i) {
      accs[i]->del_post_hook(keys[i]);
    }
    accs.clear();
    keys.clear();
    impls.clear();
  }

  // Buckets over the parameters in reverse order (the order backward
  // finishes their gradients), each closed once it holds `bucket_bytes`, or
  // where lateness changes (a bucket is all hooked or all late).
  void plan(const std::vector<at::Tensor> &params) {
    buckets.clear();
    bucket_of.assign(params.size(), 0);
    std::vector<int64_t> offsets(params.size(), 0);
    for (size_t i = 1; i < params.size(); ++i) {
      offsets[i] = offsets[i - 1] + numels[i - 1];
    }
    int64_t bytes = 0;
    for (size_t j = params.size(); j-- > 0;) {
      int64_t size = numels[j] * static_cast<int64_t>(params[j].element_size());
      bool open = !buckets.empty() && bytes < bucket_bytes &&
                  buckets.back().late == (late[j] != 0);
      if (!open) {
        Bucket b;
        b.hi = offsets[j] + numels[j];
        b.late = late[j] != 0;
        buckets.push_back(b);
        bytes = 0;
      }
      buckets.back().lo = offsets[j];
      buckets.back().params += 1;
      bytes += size;
      bucket_of[j] = buckets.size() - 1;
    }
  }

  void launch(size_t b) {
    Bucket &bucket = buckets[b];
    bucket.launched = true;
    order.push_back(b);
    if (!error.empty()) {
      return;
    }
    try {
      at::NoGradGuard no_grad;
      auto slice = flat.narrow(0, bucket.lo, bucket.hi - bucket.lo);
      if (scale != 1.0) {
        slice.mul_(scale);
      }
      std::vector<at::Tensor> ts{slice};
      bucket.work = pg->allreduce(ts);
    } catch (const c10::Error &e) {
      error = e.what_without_backtrace();
    } catch (const std::exception &e) {
      error = e.what();
    }
  }

  // Launches the hooked buckets that are complete, in order.
  void launch_ready() {
    while (next < buckets.size()) {
      Bucket &b = buckets[next];
      if (!b.late) {
        if (b.pending > 0) {
          return;
        }
        launch(next);
        ++early;
      }
      ++next;
    }
  }

  void on_gradient(uint64_t gen, size_t i) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || gen != generation) {
      return;
    }
    Bucket &b = buckets[bucket_of[i]];
    if (b.late || b.pending == 0) {
      return;
    }
    b.pending -= 1;
    launch_ready();
  }
};

// Whether every parameter's gradient is the view of `flat` at its place.
bool grads_alias(const std::vector<at::Tensor> &params, const at::Tensor &flat) {
  auto base = static_cast<char *>(flat.data_ptr());
  int64_t offset = 0;
  for (const auto &p : params) {
    const auto &g = p.grad();
    if (!g.defined() || !g.is_contiguous() || g.scalar_type() != flat.scalar_type() ||
        g.device() != flat.device() ||
        g.data_ptr() != base + offset * static_cast<int64_t>(flat.element_size())) {
      return false;
    }
    offset += p.numel();
  }
  return offset == flat.numel();
}

} // namespace

struct SaePg {
  c10::intrusive_ptr<c10d::Backend> pg;
  std::shared_ptr<Reducer> reducer;
};

extern "C" {

// Joins the group: rank `rank` of `world`, rendezvous through the TCPStore
// at host:port (served by this process when `is_server`, else by rank 0 or
// torchrun's agent), keys under `prefix`. Waits at most `timeout_ms` for the
// peers, and every collective fails after that long. `backend`: 0 Gloo
// (CPU tensors), 1 NCCL on CUDA device `device`.
char *sae_pg_new(const char *host, int32_t port, int32_t is_server,
                 int32_t rank, int32_t world, const char *prefix,
                 int64_t timeout_ms, int32_t backend, int32_t device,
                 SaePg **out) {
  return guard([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = is_server != 0;
    opts.numWorkers = world;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(host, opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, tcp);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 1) {
#ifdef SAE_WITH_NCCL
      pg = sae_nccl_backend(store, rank, world, timeout, device);
#else
      throw std::runtime_error("NCCL is not built into this binary");
#endif
    } else {
      auto gloo = c10d::ProcessGroupGloo::Options::create_default(timeout);
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world,
                                                       gloo);
    }
    auto reducer = std::make_shared<Reducer>();
    reducer->pg = pg;
    *out = new SaePg{pg, reducer};
  });
}

// The NCCL version built in ("2.28.9"), or an empty string without NCCL.
// Malloc'd; the caller frees it.
char *sae_pg_nccl_version() {
#ifdef SAE_WITH_NCCL
  try {
    return dup_string(sae_nccl_version());
  } catch (...) {
    return dup_string("unknown version");
  }
#else
  return dup_string("");
#endif
}

void sae_pg_free(SaePg *pg) {
  if (pg != nullptr) {
    std::lock_guard<std::mutex> lock(pg->reducer->mu);
    pg->reducer->unregister();
  }
  delete pg;
}

// In place: `t` becomes the sum (op 0), max (1) or min (2) over the ranks.
char *sae_pg_allreduce(SaePg *pg, at::Tensor *t, int32_t op) {
  return guard([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    pg->pg->allreduce(ts, o)->wait();
  });
}

// In place: every rank's `t` becomes rank `root`'s.
char *sae_pg_broadcast(SaePg *pg, at::Tensor *t, int32_t root) {
  return guard([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    pg->pg->broadcast(ts, o)->wait();
  });
}

// `out` ([world, ...in's shape]) receives every rank's `in`, in rank order.
char *sae_pg_allgather(SaePg *pg, at::Tensor *out, at::Tensor *in) {
  return guard([&] {
    std::vector<at::Tensor> inputs{*in};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int64_t r = 0; r < out->size(0); ++r) {
      outputs[0].push_back(out->select(0, r));
    }
    pg->pg->allgather(outputs, inputs)->wait();
  });
}

char *sae_pg_barrier(SaePg *pg) {
  return guard([&] { pg->pg->barrier()->wait(); });
}

// Before backward: arms the reducer for one step. `params` (n of them) are
// the parameters in order, their gradients the views of the 1-D buffer
// `flat` one after another; `late[i]` marks a parameter whose gradient is
// finished after backward (launched by `sae_pg_overlap_finish` only). Each
// bucket is scaled by `scale` and summed over the ranks in place. `*armed`
// is 0 (nothing done) when the gradients do not alias `flat`.
char *sae_pg_overlap_begin(SaePg *pg, at::Tensor **params, int64_t n,
                           const uint8_t *late, at::Tensor *flat, double scale,
                           int64_t bucket_bytes, int32_t *armed) {
  return guard([&] {
    *armed = 0;
    std::vector<at::Tensor> ps;
    for (int64_t i = 0; i < n; ++i) {
      ps.push_back(*params[i]);
    }
    if (n == 0 || !flat->defined() || flat->dim() != 1 || !flat->is_contiguous() ||
        !grads_alias(ps, *flat)) {
      return;
    }
    Reducer &r = *pg->reducer;
    std::lock_guard<std::mutex> lock(r.mu);
    bool same = r.impls.size() == ps.size() && r.bucket_bytes == bucket_bytes;
    for (size_t i = 0; same && i < ps.size(); ++i) {
      same = r.impls[i] == ps[i].unsafeGetTensorImpl() &&
             r.late[i] == late[i] && r.numels[i] == ps[i].numel() &&
             torch::autograd::impl::try_get_grad_accumulator(ps[i]).get() ==
                 r.accs[i].get();
    }
    if (!same) {
      r.unregister();
      for (const auto &p : ps) {
        if (!p.requires_grad() || !p.is_leaf()) {
          return; // no accumulator to hook: the caller reduces after backward
        }
      }
      r.generation += 1;
      r.late.assign(late, late + n);
      r.numels.clear();
      r.bucket_bytes = bucket_bytes;
      std::weak_ptr<Reducer> weak = pg->reducer;
      uint64_t gen = r.generation;
      for (size_t i = 0; i < ps.size(); ++i) {
        r.numels.push_back(ps[i].numel());
        auto acc = torch::autograd::impl::grad_accumulator(ps[i]);
        TORCH_CHECK(acc, "parameter ", i, " has no gradient accumulator");
        auto hook = [weak, gen, i](const torch::autograd::variable_list &outputs,
                                   const torch::autograd::variable_list &) {
          if (auto red = weak.lock()) {
            red->on_gradient(gen, i);
          }
          return outputs;
        };
        r.keys.push_back(acc->add_post_hook(
            std::make_unique<torch::autograd::utils::LambdaPostHook>(hook)));
        r.accs.push_back(acc);
        r.impls.push_back(ps[i].unsafeGetTensorImpl());
      }
      r.plan(ps);
    }
    for (auto &b : r.buckets) {
      b.pending = b.params;
      b.launched = false;
      b.work.reset();
    }
    r.flat = *flat;
    r.scale = scale;
    r.next = 0;
    r.order.clear();
    r.early = 0;
    r.error.clear();
    r.armed = true;
    *armed = 1;
  });
}

// After backward (and any gradient finished by hand): launches the buckets
// no hook launched (in bucket order: the late ones last) and waits for every
// allreduce; `*early` counts the buckets started during backward. `*intact`
// is 0 when a gradient stopped aliasing the buffer
// during backward (the caller then reduces the gradients itself; the
// buffer's sums are then unused).
char *sae_pg_overlap_finish(SaePg *pg, at::Tensor **params, int64_t n,
                            int32_t *intact, int64_t *early) {
  return guard([&] {
    Reducer &r = *pg->reducer;
    std::lock_guard<std::mutex> lock(r.mu);
    *early = static_cast<int64_t>(r.early);
    if (!r.armed) {
      *intact = 0;
      return;
    }
    r.armed = false;
    for (size_t b = 0; b < r.buckets.size(); ++b) {
      if (!r.buckets[b].launched && !r.buckets[b].late) {
        r.launch(b);
      }
    }
    for (size_t b = 0; b < r.buckets.size(); ++b) {
      if (!r.buckets[b].launched) {
        r.launch(b);
      }
    }
    for (size_t b : r.order) {
      auto &work = r.buckets[b].work;
      if (work && r.error.empty()) {
        try {
          work->wait();
        } catch (const c10::Error &e) {
          r.error = e.what_without_backtrace();
        } catch (const std::exception &e) {
          r.error = e.what();
        }
      }
      work.reset();
    }
    std::vector<at::Tensor> ps;
    for (int64_t i = 0; i < n; ++i) {
      ps.push_back(*params[i]);
    }
    *intact = grads_alias(ps, r.flat) ? 1 : 0;
    r.flat = at::Tensor();
    if (!r.error.empty()) {
      throw std::runtime_error(r.error);
    }
  });
}

} // extern "C"
