#!/usr/bin/env python3
"""`make digits-table`: reconstruction at L0 ~ 10 on scikit-learn's digits,
held-out rows, for PCA, each architecture and each encoder; writes the table
to OUT_DIR/table.md (the Makefile puts it into BENCHMARKS.md, between
<!-- digits:begin --> and <!-- digits:end -->).

Every architecture trains from configs/digits.yaml with only the keys that
make it that architecture changed (so the recipe, the data and the seed are
the same), then `sae eval` on digits/digits_valid.npy with its own encoder
(`model`), OMP with 10 atoms and matching pursuit with at most 10 steps over
its decoder rows.

Usage: digits_table.py SAE_BIN DIGITS_DIR OUT_DIR
"""
import json, os, subprocess, sys, time
import numpy as np

SAE, DIGITS, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
TRAIN = os.path.join(DIGITS, "digits_train.npy")
VALID = os.path.join(DIGITS, "digits_valid.npy")
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "digits.yaml")
K = 10

# name, what it is, --set overrides of configs/digits.yaml
ARCHS = [
    ("topk", "configs/digits.yaml as shipped", []),
    ("batchtopk", "threshold calibrated to L0 10 on the training rows",
     ["model.activation=batchtopk", "model.calibrate_threshold=true"]),
    ("matryoshka_batchtopk", "widths [64, 512], threshold calibrated",
     ["model.activation=matryoshka_batchtopk", "model.matryoshka_widths=[64, 512]",
      "model.calibrate_threshold=true"]),
    ("jumprelu", "l0 penalty, weight 4e-4",
     ["model.activation=jumprelu", "model.k=null", "sparsity.penalty=l0", "sparsity.weight=0.0004"]),
    ("relu", "l1 penalty, weight 0.006",
     ["model.activation=relu", "model.k=null", "sparsity.penalty=l1", "sparsity.weight=0.006"]),
    ("matching_pursuit", "tied, at most 10 atoms (its own encoder is a pursuit)",
     ["model.activation=matching_pursuit", "model.tied=true", "sparsity.penalty=none",
      "train.input_noise=none"]),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(args):
    r = subprocess.run([SAE] + args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"sae {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def evaluate(model, encoder):
    extra = [] if encoder == "model" else ["--encoder", encoder, "--k", str(K)]
    m = json.loads(run(["eval", "--model", model, "--data", VALID, "--json"] + extra))
    return m["fvu"], m["l0"]


def pca_fvu(k):
    x, v = np.load(TRAIN).astype(np.float64), np.load(VALID).astype(np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    p = vt[:k]
    rec = (v - mean) @ p.T @ p + mean
    return float(((v - rec) ** 2).sum() / ((v - v.mean(0)) ** 2).sum())


def main():
    os.makedirs(OUT, exist_ok=True)
    sets = [f"data.train={TRAIN}", f"data.valid={VALID}"]
    rows = []
    for name, what, extra in ARCHS:
        run_dir = os.path.join(OUT, name)
        t0 = time.perf_counter()
        args = ["train", "-q", "--config", CONFIG, "--out", run_dir, "--force"]
        for s in sets + extra:
            args += ["--set", s]
        run(args)
        secs = time.perf_counter() - t0
        own, l0 = evaluate(run_dir, "model")
        omp, _ = evaluate(run_dir, "omp")
        mp, mp_l0 = evaluate(run_dir, "mp")
        log(f"{name}: own {own:.4f} (L0 {l0:.2f}), omp {omp:.4f}, mp {mp:.4f} (L0 {mp_l0:.2f}), {secs:.0f} s")
        rows.append((name, what, l0, own, omp, mp, mp_l0, secs))
    pca = pca_fvu(K)
    lines = [
        f"Digits (scikit-learn's 8x8 digits, pixels in [0, 1]; {np.load(TRAIN).shape[0]:,} training and "
        f"{np.load(VALID).shape[0]:,} held-out rows from `scripts/digits.py`); 512 latents; FVU on the "
        f"held-out rows; {time.strftime('%Y-%m-%d')}. `make digits-table` reruns it.",
        "",
        "| model | how | own encoder L0 | own encoder FVU | OMP k=10 FVU | MP k<=10 FVU (L0) | train s |",
        "|---|---|---|---|---|---|---|",
        f"| PCA | 10 components (fitted on the training rows) | 10 | {pca:.4f} | | | |",
    ]
    for name, what, l0, own, omp, mp, mp_l0, secs in rows:
        lines.append(f"| {name} | {what} | {l0:.2f} | {own:.4f} | {omp:.4f} | {mp:.4f} ({mp_l0:.2f}) | {secs:.0f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
