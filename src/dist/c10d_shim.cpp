// A small C ABI over PyTorch's own distributed engine (c10d), for
// src/dist/mod.rs: a TCPStore rendezvous, a Gloo process group, and the
// collectives data-parallel training needs. It knows nothing about sparse
// autoencoders. Errors come back as a malloc'd C string, never as
// a C++ exception across the FFI boundary (src/shim_error.hpp).
//
// Tensors cross the boundary as `at::Tensor*` (tch's `Tensor::as_ptr()`).

#include "../shim_error.hpp"
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

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

} // namespace

struct SaePg {
  c10::intrusive_ptr<c10d::Backend> pg;
};

extern "C" {

// Joins the group: rank `rank` of `world`, rendezvous through the TCPStore
// at host:port (served by this process when `is_server`, else by rank 0 or
// torchrun's agent), keys under `prefix`. Waits at most `timeout_ms` for the
// peers, and every collective fails after that long.
char *sae_pg_new(const char *host, int32_t port, int32_t is_server,
                 int32_t rank, int32_t world, const char *prefix,
                 int64_t timeout_ms, SaePg **out) {
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
    auto gloo = c10d::ProcessGroupGloo::Options::create_default(timeout);
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world,
                                                          gloo);
    *out = new SaePg{pg};
  });
}

void sae_pg_free(SaePg *pg) { delete pg; }

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

} // extern "C"
