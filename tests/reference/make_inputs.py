"""Writes the inputs of one parity case into --out: x.npy (training data),
init.safetensors (initial weights, SAELens names and shapes) and, with
--order-epochs E, order.npy (int64 [E, n], one permutation of the rows per
epoch). Everything is drawn from --seed, so a case is reproducible.

Data kinds:
  classification  seed 002's data: sklearn's make_classification(n_samples=1000,
                  n_features=20, n_classes=2) re-done in numpy (sklearn is not a
                  dependency), then the 80% train split. float64.
  pixels          seed 004's kind of data: small 6x6 "images" of uint8 pixels,
                  each a few blurred strokes, some border pixels always 0.
  sparse          SAE-style data: each row a sparse non-negative combination of
                  unit-norm feature directions plus a little noise. float32.
Init kinds:
  linear          torch.nn.Linear defaults for encoder and decoder (the seeds).
  sae             SAELens: unit-norm decoder rows, W_enc = W_dec.T, b_enc = 0,
                  b_dec = the data mean.
"""

import argparse
import os

import numpy as np
import torch
import torch.nn as nn

import common


def make_classification(rng, n_samples=1000, n_features=20, n_informative=2,
                        n_redundant=2, n_clusters_per_class=2, class_sep=1.0):
    """Like sklearn.datasets.make_classification: Gaussian clusters at the
    vertices of a hypercube in the informative subspace, redundant features
    as random linear combinations of those, the rest pure noise; rows and
    columns shuffled."""
    n_clusters = 2 * n_clusters_per_class
    vertices = rng.choice([-class_sep, class_sep], size=(n_clusters, n_informative))
    X = np.zeros((n_samples, n_features))
    y = np.arange(n_samples) % 2
    cluster = (np.arange(n_samples) // 2) % n_clusters_per_class * 2 + y
    for c in range(n_clusters):
        rows = cluster == c
        A = 2 * rng.random((n_informative, n_informative)) - 1
        X[rows, :n_informative] = rng.standard_normal((rows.sum(), n_informative)) @ A + vertices[c]
    B = 2 * rng.random((n_informative, n_redundant)) - 1
    X[:, n_informative:n_informative + n_redundant] = X[:, :n_informative] @ B
    X[:, n_informative + n_redundant:] = rng.standard_normal(
        (n_samples, n_features - n_informative - n_redundant))
    X = X[rng.permutation(n_samples)][:, rng.permutation(n_features)]
    return X


def pixels(rng, n, side=6, n_strokes=10):
    protos = np.zeros((n_strokes, side, side))
    for s in range(n_strokes):
        r0, c0 = rng.integers(1, side - 1, size=2)
        dr, dc = rng.choice([-1, 0, 1], size=2)
        for t in range(3):
            r, c = min(max(r0 + t * dr, 1), side - 1), min(max(c0 + t * dc, 1), side - 1)
            protos[s, r, c] = 1.0
    protos = protos.reshape(n_strokes, -1)
    img = np.zeros((n, side * side))
    for i in range(n):
        k = rng.integers(1, 4)
        for s in rng.choice(n_strokes, size=k, replace=False):
            img[i] += rng.uniform(0.5, 1.0) * protos[s]
    img += rng.uniform(0, 0.15, size=img.shape) * (img > 0)
    img[:, 0] = 0.0  # a corner pixel that is always dark (a zero-range column)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def sparse(rng, n, d_in, n_features=48, active=3, noise=0.01):
    feats = rng.standard_normal((n_features, d_in))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    X = np.zeros((n, d_in))
    for i in range(n):
        idx = rng.choice(n_features, size=active, replace=False)
        X[i] = rng.uniform(0.5, 2.0, size=active) @ feats[idx]
    X += noise * rng.standard_normal(X.shape)
    return X.astype(np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data-kind", choices=["classification", "pixels", "sparse"], required=True)
    p.add_argument("--n", type=int, default=None, help="rows (pixels, sparse)")
    p.add_argument("--d-in", type=int, default=16, help="columns (sparse)")
    p.add_argument("--init-kind", choices=["linear", "sae"], required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--order-epochs", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", action="store_true",
                   help="also y.npy: a transcoder's target rows, tanh(x @ A) + 0.3 x, "
                        "A [d_in, d_in] Gaussian / sqrt(d_in) (drawn after everything else)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    if args.data_kind == "classification":
        X = make_classification(rng)
        test = rng.permutation(len(X))[: int(0.2 * len(X))]
        X = np.delete(X, test, axis=0)  # X_train: the 80% split
    elif args.data_kind == "pixels":
        X = pixels(rng, args.n)
    else:
        X = sparse(rng, args.n, args.d_in)
    np.save(os.path.join(args.out, "x.npy"), X)
    n, d_in = X.shape

    torch.manual_seed(args.seed)
    if args.init_kind == "linear":
        enc, dec = nn.Linear(d_in, args.hidden), nn.Linear(args.hidden, d_in)
        w = {"W_enc": enc.weight.T, "b_enc": enc.bias, "W_dec": dec.weight.T, "b_dec": dec.bias}
    else:
        W_dec = torch.randn(args.hidden, d_in)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        w = {"W_enc": W_dec.T, "b_enc": torch.zeros(args.hidden), "W_dec": W_dec,
             "b_dec": torch.from_numpy(X.astype(np.float64).mean(axis=0))}
    common.write_safetensors(os.path.join(args.out, "init.safetensors"), w)

    if args.order_epochs > 0:
        order = np.stack([rng.permutation(n) for _ in range(args.order_epochs)]).astype(np.int64)
        np.save(os.path.join(args.out, "order.npy"), order)

    if args.target:
        A = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
        Y = np.tanh(X.astype(np.float64) @ A) + 0.3 * X
        np.save(os.path.join(args.out, "y.npy"), Y.astype(np.float32))


if __name__ == "__main__":
    main()
