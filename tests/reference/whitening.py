"""Covariance whitening of the inputs and its fold into the weights, in
plain PyTorch, written from SAELens 6.x (training/activation_scaler.py
ActivationScaler.estimate_whitening and .scale; saes/sae.py
SAE.fold_activation_whitening; saes/gated_sae.py's override; saes/topk_sae.py
folding the decoder norms first). It does not import sae_lens.

    mean, C  = the rows' mean and unbiased covariance, accumulated in float64
    C        = E diag(l) E^T (torch.linalg.eigh), l <- clamp(l, 0) + eps
    M        = E diag(l)^(-1/2),  M^-1 = diag(l)^(1/2) E^T
    x_w      = (x - mean) @ M    (in the activations' dtype)

Folding (in float64, the statistics' precision), so the SAE reads raw x:
    W_enc <- M @ W_enc
    b_enc <- b_enc - mean @ W_enc'            (only without apply_b_dec_to_input;
    b_mag <- b_mag - (mean @ W_enc') exp(r_mag)  gated, the same condition)
    W_dec <- W_dec @ M^-1,  b_dec <- b_dec @ M^-1 + mean
"""

import torch


def estimate(X, eps):
    """(mean, M, M^-1) in float64 of the rows X [n, d], one accumulation
    chunk (SAELens accumulates per batch; this project per 8192 rows, so the
    same for the parity cases' few hundred rows)."""
    acts = X.to(torch.float64)
    count = acts.shape[0]
    sum_x = torch.zeros(acts.shape[1], dtype=torch.float64) + acts.sum(dim=0)
    sum_outer = torch.zeros(acts.shape[1], acts.shape[1], dtype=torch.float64) + acts.T @ acts
    acts_mean = sum_x / count
    cov = (sum_outer - count * torch.outer(acts_mean, acts_mean)) / (count - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues = eigenvalues.clamp(min=0) + eps
    matrix = (eigenvectors * eigenvalues.rsqrt()).contiguous()
    inverse = (eigenvalues.sqrt().unsqueeze(1) * eigenvectors.T).contiguous()
    return acts_mean, matrix, inverse


def whiten(X, whitening):
    mean, matrix, _ = whitening
    return (X - mean.to(X.dtype)) @ matrix.to(X.dtype)


@torch.no_grad()
def fold(tensors, whitening, apply_b_dec_to_input):
    """Folds into {"W_enc", "b_enc", "W_dec", "b_dec"[, "r_mag", "b_mag"]}
    (float32 tensors, decoder norms already folded); returns float32."""
    mean, matrix, inverse = whitening
    t = {k: v.detach().to(torch.float64) for k, v in tensors.items()}
    t["W_enc"] = matrix @ t["W_enc"]
    if not apply_b_dec_to_input:
        shift = mean @ t["W_enc"]
        t["b_enc"] = t["b_enc"] - shift
        if "b_mag" in t:
            t["b_mag"] = t["b_mag"] - shift * t["r_mag"].exp()
    t["W_dec"] = t["W_dec"] @ inverse
    t["b_dec"] = t["b_dec"] @ inverse + mean
    return {k: v.to(torch.float32) for k, v in t.items()}
