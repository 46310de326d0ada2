#!/usr/bin/env python3
"""Top-k against SAELens's own trainer on the same activations (issue 23's
top-k gap): held-out FVU and dead fraction at k = 8 and 16, SAELens's
`rescale_acts_by_decoder_norm` on and off, two seeds each side.

Both sides: no normalisation, SAELens's init (decoder rows of norm 0.1,
W_enc = W_dec.T), 512 latents, AuxK 1/32 with latents dead after 200
steps, Adam lr 1e-3, batch 256, 10 epochs over the first 90 % of the rows;
scored on the last 10 %. SAELens trains through SAETrainer.step, which clips
the gradient norm at 1.0 as its trainer does; ours clips at 1/d_in, the same
clip (SAELens sums the squared error over d_in where we average it).

Usage: topk_gap.py SAE_BIN ACTS.npy OUT_DIR   (ACTS: e.g. `sae activations` of a model)
"""
import json, os, subprocess, sys
import numpy as np
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
SAE, ACTS, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(OUT, exist_ok=True)
X = np.load(ACTS).astype(np.float32)
n, d = X.shape; nv = n // 10; Xt, Xv = X[:n - nv], X[n - nv:]
TRAIN, VALID = os.path.join(OUT, "train.npy"), os.path.join(OUT, "valid.npy")
np.save(TRAIN, Xt); np.save(VALID, Xv)
WIDTH, EPOCHS, BATCH = 512, 10, 256
torch.set_num_threads(2)


def fvu(xhat, x):
    return float(((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def saelens(k, seed, rescale):
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=WIDTH, k=k, dtype="float32", device="cpu",
          apply_b_dec_to_input=True, normalize_activations="none", rescale_acts_by_decoder_norm=rescale,
          aux_loss_coefficient=1 / 32, decoder_init_norm=0.1))
    cfg = SAETrainerConfig(total_training_samples=len(Xt) * EPOCHS, train_batch_size_samples=BATCH, lr=1e-3,
          lr_end=1e-3, device="cpu", autocast=False, dead_feature_window=200)
    tr = SAETrainer(cfg, sae, data_provider=iter(()))
    x = torch.from_numpy(Xt); g = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), BATCH):
            tr.step(x[perm[s:s + BATCH]]); tr.n_training_steps += 1
    with torch.no_grad():
        xv = torch.from_numpy(Xv); z = sae.encode(xv); xh = sae.decode(z)
        dead = int(((z != 0).sum(0) == 0).sum())
    return fvu(xh.numpy(), Xv), dead / WIDTH


def ours(k, seed, rescale):
    cfgy = {"seed": seed, "data": {"train": TRAIN, "valid": VALID},
            "model": {"d_hidden": WIDTH, "activation": "topk", "k": k, "init_scheme": "sae",
                      "decoder_init_norm": 0.1, "rescale_acts_by_decoder_norm": rescale},
            "sparsity": {"penalty": "auxk", "weight": 0.03125},
            "train": {"epochs": EPOCHS, "batch_size": BATCH, "dead_window": 200, "grad_clip": 1 / d,
                      "optimizer": {"name": "adam", "lr": 1e-3}}}
    cfg_path, run = os.path.join(OUT, "sae.yaml"), os.path.join(OUT, "run")
    with open(cfg_path, "w") as f:
        json.dump(cfgy, f)
    subprocess.run([SAE, "train", "-q", "--config", cfg_path, "--out", run, "--force"],
                   check=True, capture_output=True)
    v = json.load(open(os.path.join(run, "summary.json")))["valid"]
    return v["fvu"], v["dead_fraction"]


rows = []
for k in (8, 16):
    for rescale in (False, True):
        cells = {}
        for side, fn in (("sae", ours), ("SAELens", saelens)):
            cells[side] = [fn(k, seed, rescale) for seed in (0, 1)]
            print(k, rescale, side, cells[side], flush=True)
        rows.append((k, rescale, cells))
lines = [f"Held-out FVU (dead fraction), seeds 0 / 1; {n:,} rows of d {d} ({nv:,} held out), "
         f"{WIDTH} latents, AuxK 1/32, 10 epochs, batch 256, lr 1e-3, same clip.", "",
         "| k | rescale | sae | SAELens |", "|---|---|---|---|"]
for k, rescale, cells in rows:
    fmt = lambda c: " / ".join(f"{f:.4f} ({dd:.1%})" for f, dd in c)
    lines.append(f"| {k} | {'on' if rescale else 'off'} | {fmt(cells['sae'])} | {fmt(cells['SAELens'])} |")
table = "\n".join(lines)
print(table)
with open(os.path.join(OUT, "table.md"), "w") as f:
    f.write(table + "\n")
