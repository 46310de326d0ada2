#!/usr/bin/env python3
"""Adam's moment updates on subnormal float32 values vs normal ones, with and
without flush-to-zero (torch.set_flush_denormal): why `sae train` flushes
subnormals on x86 CPUs. A latent that no longer fires gets zero gradients, and
its moments decay (exp_avg by 0.9, exp_avg_sq by 0.999 per step) through the
subnormal range, where each operation on them is several times slower.

Usage: third_party/venv/bin/python scripts/denormal_bench.py
"""
import torch, time
torch.set_num_threads(1)
n = 8192 * 768
def bench(x, label):
    g = torch.zeros_like(x)
    m, v = x.clone(), x.clone().abs()
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            # Adam's moment updates of a latent that no longer fires (grad 0).
            m.mul_(0.9).add_(g, alpha=0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            u = m / (v.sqrt() + 1e-8)
        best = min(best, (time.perf_counter() - t0) / 10)
    return best
normal = torch.full((n,), 1e-3)
sub = torch.full((n,), 1e-39)  # subnormal in float32
for ftz in (False, True):
    torch.set_flush_denormal(ftz)
    a, b = bench(normal, "normal"), bench(sub, "subnormal")
    print(f"flush_denormal={ftz}: normal {a*1e3:.2f} ms, subnormal {b*1e3:.2f} ms, ratio {b/a:.2f}x")
