// The NCCL process group for src/dist/c10d_shim.cpp, in a translation unit
// of its own: it needs the CUDA and NCCL headers (-DUSE_C10D_NCCL
// -DUSE_CUDA) and links libtorch_cuda, which exports ProcessGroupNCCL.
// Nothing here runs unless a run asks for NCCL, so the binary still starts
// and trains on machines without a GPU.

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/NCCLUtils.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <string>

c10::intrusive_ptr<c10d::Backend>
sae_nccl_backend(const c10::intrusive_ptr<c10d::Store> &store, int rank,
                 int world, std::chrono::milliseconds timeout, int device) {
  // One rank per GPU: this process's collectives and kernels run on `device`.
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world,
                                                        opts);
  // Bound to its GPU: barrier() and the communicator know the device.
  pg->setBoundDeviceId(
      at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
  return pg;
}

std::string sae_nccl_version() { return c10d::getNcclVersion(); }
