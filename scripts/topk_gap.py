#!/usr/bin/env python3
"""Top-k against SAELens's own trainer on the same activations (issue 23's
top-k gap): held-out FVU and dead fraction, SAELens's `rescale_acts_by_decoder_norm`
on and off, two seeds each side.

Both sides: no normalisation, SAELens's init (decoder rows of norm 0.1,
W_enc = W_dec.T), k 8, 512 latents, AuxK 1/32 with latents dead after 200
steps, Adam lr 1e-3, batch 256, 10 epochs over the first 90 % of the rows;
scored on the last 10 %. SAELens trains through SAETrainer.step (which also
clips gradients at 1.0, as its trainer does).

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
n = X.shape[0]; nv = n // 10; Xt, Xv = X[:n - nv], X[n - nv:]
TRAIN, VALID = os.path.join(OUT, "train.npy"), os.path.join(OUT, "valid.npy")
np.save(TRAIN, Xt); np.save(VALID, Xv)
def fvu(xhat, x):
    return float(((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
res = {}
for seed in (0, 1):
    for rescale in (True, False):
        torch.manual_seed(seed)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=64, d_sae=512, k=8, dtype="float32", device="cpu",
              apply_b_dec_to_input=True, normalize_activations="none", rescale_acts_by_decoder_norm=rescale,
              aux_loss_coefficient=1/32))
        cfg = SAETrainerConfig(total_training_samples=len(Xt) * 10, train_batch_size_samples=256, lr=1e-3,
              lr_end=1e-3, device="cpu", autocast=False, dead_feature_window=200)
        tr = SAETrainer(cfg, sae, data_provider=iter(()))
        x = torch.from_numpy(Xt); g = torch.Generator().manual_seed(seed)
        for ep in range(10):
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), 256):
                tr.step(x[perm[s:s + 256]]); tr.n_training_steps += 1
        with torch.no_grad():
            xv = torch.from_numpy(Xv); z = sae.encode(xv); xh = sae.decode(z)
            dead = int(((z != 0).sum(0) == 0).sum())
        res[f"saelens rescale={rescale} seed={seed}"] = (fvu(xh.numpy(), Xv), dead / 512)
        print(list(res.items())[-1], flush=True)
for seed in (0, 1):
    for rescale in ("true", "false"):
        cfgy = {"seed": seed, "data": {"train": TRAIN, "valid": VALID},
                "model": {"d_hidden": 512, "activation": "topk", "k": 8, "init_scheme": "sae", "decoder_init_norm": 0.1,
                          "rescale_acts_by_decoder_norm": rescale == "true"},
                "sparsity": {"penalty": "auxk", "weight": 0.03125},
                "train": {"epochs": 10, "batch_size": 256, "dead_window": 200, "optimizer": {"name": "adam", "lr": 1e-3}}}
        cfg_path, run = os.path.join(OUT, "sae.yaml"), os.path.join(OUT, "run")
        json.dump(cfgy, open(cfg_path, "w"))
        subprocess.run([SAE, "train", "-q", "--config", cfg_path, "--out", run, "--force"],
                       check=True, capture_output=True)
        v = json.load(open(os.path.join(run, "summary.json")))["valid"]
        print(("sae rescale=" + rescale + f" seed={seed}", (v["fvu"], v["dead_fraction"])), flush=True)
