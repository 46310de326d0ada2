#!/usr/bin/env python3
"""Cost model of one data-parallel SAE training step (docs/SCALING.md).

Prints, per rank (GPU or CPU process): step time (compute + gradient
allreduce, which `sae` does not overlap), samples/s, the allreduce's share,
and memory (parameters, gradients, Adam moments, activations).

    python3 scripts/scale_model.py --d-in 768 --d-hidden 8192 --batch 4096 \
        --world 2 --flops 105e9 --link-gbps 8 [--k 32] [--latency-us 50]

Model (float32, untied, dense ReLU-style step; top-k with --k):
  parameters  P = 2*d_in*h + h + d_in;  state = 16 P bytes (param, grad, m, v)
  compute     12*b*d_in*h flops per rank (b = batch/world; forward 4, backward 8)
              top-k (sparse path): 2*b*d_in*h dense encoder + 10*b*k*d_in
  allreduce   ring: 2 (world-1)/world * 4P bytes over the link, plus
              2 (world-1) * latency; small per-step collectives (dead-latent
              maxima, 4h bytes; the stop flag) add ~4 latencies
  activations ~ b*h*4 bytes x 4 (pre-activations, codes and their gradients)
              + b*d_in*4 x 4 (input, reconstruction, their gradients)
"""

import argparse


def model(d_in, h, batch, world, flops, link_gbps, latency_us, k=None, eff=1.0):
    P = 2 * d_in * h + h + d_in
    b = batch / world
    if k:
        work = 2 * b * d_in * h + 10 * b * k * d_in
    else:
        work = 12 * b * d_in * h
    compute = work / (flops * eff)
    if world > 1:
        ring = 2 * (world - 1) / world * 4 * P / (link_gbps * 1e9 / 8)
        lat = (2 * (world - 1) + 4) * latency_us * 1e-6
        comm = ring + lat
    else:
        comm = 0.0
    step = compute + comm
    state = 16 * P
    acts = 4 * (b * h * 4) + 4 * (b * d_in * 4)
    return {
        "params": P,
        "compute_s": compute,
        "allreduce_s": comm,
        "step_s": step,
        "samples_per_s": batch / step,
        "allreduce_share": comm / step,
        "state_gib": state / 2**30,
        "activations_gib": acts / 2**30,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, required=True)
    p.add_argument("--d-hidden", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="global batch (rows)")
    p.add_argument("--world", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--flops", type=float, required=True, help="achieved FLOP/s of one rank")
    p.add_argument("--link-gbps", type=float, default=100.0, help="allreduce bandwidth per rank, Gbit/s")
    p.add_argument("--latency-us", type=float, default=20.0, help="per-message latency, microseconds")
    p.add_argument("--k", type=int, default=None, help="top-k: active latents per row (sparse step)")
    a = p.parse_args()
    if a.world < 1 or a.batch < a.world:
        p.error("--world must be >= 1 and --batch >= --world")
    r = model(a.d_in, a.d_hidden, a.batch, a.world, a.flops, a.link_gbps, a.latency_us, a.k)
    print(f"d_in {a.d_in}, d_hidden {a.d_hidden}, global batch {a.batch}, world {a.world}")
    print(f"  parameters            {r['params']:,}")
    print(f"  compute per step      {r['compute_s'] * 1e3:10.2f} ms")
    print(f"  gradient allreduce    {r['allreduce_s'] * 1e3:10.2f} ms ({r['allreduce_share']:.0%} of the step)")
    print(f"  step                  {r['step_s'] * 1e3:10.2f} ms -> {r['samples_per_s']:,.0f} samples/s")
    print(f"  memory per rank       {r['state_gib']:.2f} GiB state (param, grad, Adam) + "
          f"{r['activations_gib']:.2f} GiB activations")


if __name__ == "__main__":
    main()
