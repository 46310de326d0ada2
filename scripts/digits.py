"""Writes scikit-learn's digits (8x8 images, 1,797 rows x 64) as .npy for
`sae train --config configs/digits.yaml`.

    python scripts/digits.py OUT_DIR

OUT_DIR/digits_train.npy (1,438 rows) and OUT_DIR/digits_valid.npy (359
rows, a fixed held-out split: a seeded permutation, seed 0), float32 pixel
intensities scaled from 0..16 to [0, 1] (no standardisation: the config
trains on these values as they are); OUT_DIR/digits_{train,valid}_labels.npy
hold the digit of each row, and OUT_DIR/digits_{train,valid}_labels.txt the
same as one line per row (for `sae latents --labels`).
"""

import os
import sys

import numpy as np
from sklearn.datasets import load_digits


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/digits.py OUT_DIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    n_valid = len(x) // 5  # 359
    valid, train = order[:n_valid], order[n_valid:]
    for name, rows in (("train", train), ("valid", valid)):
        np.save(os.path.join(out, f"digits_{name}.npy"), np.ascontiguousarray(x[rows]))
        np.save(os.path.join(out, f"digits_{name}_labels.npy"), y[rows])
        with open(os.path.join(out, f"digits_{name}_labels.txt"), "w") as f:
            f.writelines(f"digit {d}\n" for d in y[rows])
    print(f"{out}: digits_train.npy {x[train].shape}, digits_valid.npy {x[valid].shape}, float32 in [0, 1]")


if __name__ == "__main__":
    main()
