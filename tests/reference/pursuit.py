"""References for `sae encode --encoder omp|mp` (tests/pursuit.rs).

    pursuit.py omp|mp MODEL.safetensors X.npy OURS.npy --k N [--residual-threshold R]

Rebuilds what the codes must explain from the saved model alone: the model's
normalised space, xn = (x - norm_shift) / norm_scale, residual r0 = xn - b_dec
(the decoder adds b_dec), dictionary the decoder rows W_dec scaled to unit
norm; codes for the original rows are the unit-atom codes divided by the row
norms. Then:

- omp: scikit-learn's `orthogonal_mp` (float64) with n_nonzero_coefs=k;
- mp: `encode_matching_pursuit` below, SAELens's `_encode_matching_pursuit`
  (sae_lens/saes/matching_pursuit_sae.py, sae-lens 6) transcribed to plain
  PyTorch with stop_on_duplicate_support=True; when sae_lens is importable
  its own function is also run and must agree with the transcription.

Prints one JSON line: the largest |ours - reference|, the largest
|reference|, and whether the supports (non-zero patterns) are equal.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import read_safetensors  # noqa: E402


def encode_matching_pursuit(sae_in_centered, W_dec, residual_threshold, max_iterations):
    """SAELens's `_encode_matching_pursuit`, stop_on_duplicate_support=True,
    without autograd."""
    residual = sae_in_centered.clone()
    stop_on_residual_threshold = residual_threshold > 0
    batch_size = residual.shape[0]
    d_sae, d_in = W_dec.shape
    if max_iterations is None:
        max_iterations = d_in
    acts = torch.zeros(batch_size, d_sae, dtype=residual.dtype)
    prev_support = torch.zeros(batch_size, d_sae, dtype=torch.bool)
    done = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_iterations):
        indices = (residual @ W_dec.T).relu().max(dim=1, keepdim=True).indices
        selected_dec = W_dec[indices.squeeze(1)]
        values = (residual * selected_dec).sum(dim=-1, keepdim=True).relu()
        masked_values = values * (~done).unsqueeze(1).to(values.dtype)
        acts.scatter_add_(1, indices, masked_values)
        residual = residual - masked_values * selected_dec
        support = acts != 0
        done = done | (support == prev_support).all(dim=1)
        prev_support = support
        if stop_on_residual_threshold:
            done = done | (residual.norm(dim=-1) < residual_threshold)
        if done.all():
            break
    return acts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("method", choices=["omp", "mp"])
    p.add_argument("model")
    p.add_argument("x")
    p.add_argument("ours")
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--residual-threshold", type=float, default=0.0)
    a = p.parse_args()

    w = read_safetensors(a.model)
    x = torch.from_numpy(np.load(a.x).astype(np.float32))
    if "norm_shift" in w:
        x = (x - torch.from_numpy(w["norm_shift"])) / torch.from_numpy(w["norm_scale"])
    r0 = x - torch.from_numpy(w["b_dec"])
    W = torch.from_numpy(w["W_dec"])
    norm = W.norm(dim=1)
    inv = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    unit = W * inv[:, None]

    if a.method == "omp":
        from sklearn.linear_model import orthogonal_mp

        coef = orthogonal_mp(
            unit.double().numpy().T, r0.double().numpy().T, n_nonzero_coefs=a.k
        )
        ref = torch.from_numpy(np.asarray(coef).T).float() * inv[None, :]
        extra = {}
    else:
        acts = encode_matching_pursuit(r0, unit, a.residual_threshold, a.k)
        extra = {}
        try:
            from sae_lens.saes.matching_pursuit_sae import _encode_matching_pursuit
        except ImportError:
            _encode_matching_pursuit = None
        if _encode_matching_pursuit is not None:
            with torch.no_grad():
                theirs = _encode_matching_pursuit(
                    r0, unit, a.residual_threshold, a.k, stop_on_duplicate_support=True
                )
            extra["saelens_max_abs"] = float((theirs - acts).abs().max())
        ref = acts * inv[None, :]

    ours = torch.from_numpy(np.load(a.ours))
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    out = {
        "max_abs": float((ours - ref).abs().max()),
        "ref_max_abs": float(ref.abs().max()),
        "support_equal": bool(((ours != 0) == (ref != 0)).all()),
        "ref_l0_max": int((ref != 0).sum(1).max()),
        "ref_l0_mean": float((ref != 0).sum(1).float().mean()),
    }
    out.update(extra)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
