#!/usr/bin/env python3
"""The language model of `make bench`'s LM part, exported for `data.model`.

Usage: bench_lm.py OUT_DIR pt|pt2 SHAPE_JSON

SHAPE_JSON: {"vocab", "ctx", "d_model", "heads", "mlp", "layers", "seed"}.
A GPT-2-shaped slice, random init from `seed` (no training: only its cost
matters): token + learned position embeddings, `layers` pre-LN blocks (causal
self-attention through scaled_dot_product_attention, GELU MLP), and
`UpTo(layers)`: ids int64 [B, ctx] -> the residual stream after the last
block, float32 [B, ctx, d_model].

pt:  `torch.jit.trace` to OUT_DIR/lm.pt (checked against eager at B = 1, 3, 8).
pt2: `torch.export` with a dynamic batch dimension, then
     `torch._inductor.aoti_compile_and_package` to OUT_DIR/lm.pt2 (checked
     against eager at B = 3, 8); prints the compile seconds.
Each kind runs in its own process so that bench.py can give the compile a
time limit. Both build the same weights (same seed, CPU).
"""
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.d, self.heads = d, heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, mlp)
        self.out = nn.Linear(mlp, d)

    def forward(self, x):
        t, hd = x.size(1), self.d // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(self.d, dim=-1)
        # -1 for the batch: the trace must not bake it in.
        q = q.reshape(-1, t, self.heads, hd).transpose(1, 2)
        k = k.reshape(-1, t, self.heads, hd).transpose(1, 2)
        v = v.reshape(-1, t, self.heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(-1, t, self.d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class UpTo(nn.Module):
    """ids int64 [B, T] -> the residual stream after block `layer` (1-based)."""

    def __init__(self, s, layer):
        super().__init__()
        self.tok = nn.Embedding(s["vocab"], s["d_model"])
        self.pos = nn.Parameter(torch.randn(s["ctx"], s["d_model"]) * 0.02)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.blocks = nn.ModuleList(
            [Block(s["d_model"], s["heads"], s["mlp"]) for _ in range(layer)])

    def forward(self, ids):
        x = self.tok(ids) + self.pos[: ids.size(1)]
        for b in self.blocks:
            x = b(x)
        return x


def build(s):
    torch.manual_seed(s["seed"])
    m = UpTo(s, s["layers"]).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def ids(s, b, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, s["vocab"], (b, s["ctx"]), generator=g)
    t[:, 0] = 0
    return t


def main():
    out, kind, s = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    os.makedirs(out, exist_ok=True)
    # The checks below call the package directly, without the input checks a
    # parent process may have asked for.
    os.environ.pop("AOTI_RUNTIME_CHECK_INPUTS", None)
    model = build(s)
    example = ids(s, 8)
    t0 = time.time()
    with torch.no_grad():
        ref = model(example)
        if kind == "pt":
            traced = torch.jit.trace(model, example)
            for b in (1, 3, 8):
                got = traced(example[:b])
                assert torch.allclose(got, ref[:b], atol=1e-4, rtol=0), (b, (got - ref[:b]).abs().max())
            path, tmp = os.path.join(out, "lm.pt"), os.path.join(out, "lm.tmp.pt")
            traced.save(tmp)
        elif kind == "pt2":
            batch = torch.export.Dim("batch")
            ep = torch.export.export(model, (example,), dynamic_shapes={"ids": {0: batch}})
            path, tmp = os.path.join(out, "lm.pt2"), os.path.join(out, "lm.tmp.pt2")
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
            loaded = torch._inductor.aoti_load_package(tmp)
            for b in (3, 8):
                got = loaded(example[:b])
                assert torch.allclose(got, ref[:b], atol=1e-4, rtol=0), (b, (got - ref[:b]).abs().max())
        else:
            sys.exit(f"bench_lm.py: unknown kind {kind!r} (pt or pt2)")
    os.replace(tmp, path)
    print(json.dumps({"kind": kind, "seconds": round(time.time() - t0, 1), "path": path}), flush=True)


if __name__ == "__main__":
    main()
