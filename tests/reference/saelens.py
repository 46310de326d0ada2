"""Reference trainer for SAELens-style sparse autoencoders, in plain PyTorch
(the forward passes of SAELens' StandardSAE and TopKSAE, written out):

    sae_in     = x - b_dec                  (if apply_b_dec_to_input)
    hidden_pre = sae_in @ W_enc + b_enc
    standard:  feature_acts = relu(hidden_pre)
               l1_loss = mean_batch(l1_coefficient * (feature_acts * ||W_dec||_row).norm(p=1, dim=-1))
    topk:      feature_acts = zeros.scatter(topk(hidden_pre, k).indices, relu(topk values))
               no penalty (the top-k constraint is the sparsity)
    sae_out    = feature_acts @ W_dec + b_dec
    loss       = mse_loss(sae_out, x) + l1_loss

The reconstruction term is F.mse_loss (mean over all elements), the loss this
project specifies; SAELens itself sums over d_in before the batch mean.
Adam; no normalisation of the inputs, or with --whiten-eps SAELens's
covariance whitening folded into the saved weights (whitening.py).

--precision bf16: the forward pass and loss under
torch.autocast('cpu', dtype=torch.bfloat16) (common.autocast), backward and
the optimizer step outside, as torch's AMP recipe runs them.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import whitening as whitening_ref


class TopK(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        topk = torch.topk(x, k=self.k, dim=-1)
        values = torch.relu(topk.values)
        result = torch.zeros_like(x)
        result.scatter_(-1, topk.indices, values)
        return result


class SAE(nn.Module):
    def __init__(self, w, architecture, k, apply_b_dec_to_input):
        super().__init__()
        self.W_enc = nn.Parameter(torch.from_numpy(w["W_enc"]).clone())
        self.b_enc = nn.Parameter(torch.from_numpy(w["b_enc"]).clone())
        self.W_dec = nn.Parameter(torch.from_numpy(w["W_dec"]).clone())
        self.b_dec = nn.Parameter(torch.from_numpy(w["b_dec"]).clone())
        self.architecture = architecture
        self.activation_fn = TopK(k) if architecture == "topk" else nn.ReLU()
        self.apply_b_dec_to_input = apply_b_dec_to_input

    def encode(self, x):
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        return self.activation_fn(hidden_pre)

    def decode(self, feature_acts):
        return feature_acts @ self.W_dec + self.b_dec


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--architecture", choices=["standard", "topk"], required=True)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--l1-coefficient", type=float, default=0.0)
    p.add_argument("--no-b-dec-on-input", action="store_true")
    p.add_argument("--whiten-eps", type=float, default=None)
    args = p.parse_args()
    common.setup(args)

    X = torch.tensor(common.load_data(args.data), dtype=torch.float32).to(args.device)
    whitening = None
    if args.whiten_eps is not None:
        whitening = whitening_ref.estimate(X, args.whiten_eps)
        X = whitening_ref.whiten(X, whitening)
    w = common.read_safetensors(args.init)
    sae = SAE(w, args.architecture, args.k, not args.no_b_dec_on_input).to(args.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr, foreach=False)

    log = common.LossLog(args.out)
    for epoch, idx in common.epoch_batches(len(X), args.epochs, args.batch_size, args.order):
        sae_in = X[idx.to(args.device)]
        with common.autocast(args):
            feature_acts = sae.encode(sae_in)
            sae_out = sae.decode(feature_acts)
            mse_loss = F.mse_loss(sae_out, sae_in)
            if args.architecture == "standard":
                sparsity = (feature_acts * sae.W_dec.norm(dim=1)).norm(p=1, dim=-1)
                l1_loss = (args.l1_coefficient * sparsity).mean()
                penalty = sparsity.mean().item()
            else:
                l1_loss = torch.zeros((), dtype=sae_out.dtype)
                penalty = 0.0
            loss = mse_loss + l1_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.log(epoch, loss.item(), mse_loss.item(), penalty)
    log.close()

    w = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if whitening is not None:
        w = whitening_ref.fold(w, whitening, not args.no_b_dec_on_input)
    common.save_weights(args.out, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"])


if __name__ == "__main__":
    main()
