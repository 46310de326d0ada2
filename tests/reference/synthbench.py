"""SynthSAEBench's scores of a trained model, computed by sae_lens itself
(sae_lens.synthetic.evals, sae_lens >= 6.28), for tests/ground_truth.rs to
compare with `sae eval --truth --truth-acts`.

    synthbench.py X.npy ACTS.npy TRUTH.npy W_DEC.npy CODES.npy XHAT.npy

X: the rows; ACTS: their true feature activations; TRUTH: the features;
W_DEC: the model's decoder rows; CODES / XHAT: `sae encode` / `sae reconstruct`
of X. Prints one JSON object with the field names of `sae eval --json`'s
`ground_truth`.
"""
import json
import sys

import numpy as np
import torch
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.synthetic.evals import (
    DeadLatentsCalculator,
    L0Calculator,
    ShrinkageCalculator,
    compute_classification_metrics,
    feature_uniqueness,
    mean_correlation_coefficient,
)

x, acts, truth, w_dec, codes, xhat = (torch.from_numpy(np.load(p)) for p in sys.argv[1:7])
cls = compute_classification_metrics(codes, acts, w_dec, truth)
shrink, ev = ShrinkageCalculator(), ExplainedVarianceCalculator()
shrink.add_batch(xhat, x)
ev.add_batch(xhat, x)
sae_l0, true_l0, dead = L0Calculator(), L0Calculator(), DeadLatentsCalculator(w_dec.shape[0])
sae_l0.add_batch(codes)
true_l0.add_batch(acts)
dead.add_batch(codes)
print(json.dumps({
    "mcc": mean_correlation_coefficient(w_dec, truth),
    "uniqueness": feature_uniqueness(w_dec, truth),
    "precision": cls.precision,
    "recall": cls.recall,
    "f1_score": cls.f1_score,
    "accuracy": cls.accuracy,
    "shrinkage": shrink.compute(),
    "explained_variance": ev.compute(),
    "sae_l0": sae_l0.compute(),
    "true_l0": true_l0.compute(),
    "dead_latents": dead.compute(),
}))
