"""Reference trainer for seed 004 (Geron, "Sparse Autoencoders"), the
TensorFlow listing rewritten in plain PyTorch: a sigmoid coding layer, a
linear output layer,

    hidden1_mean = mean_batch(hidden1)
    sparsity_loss = sum(kl_divergence(sparsity_target, hidden1_mean))
    reconstruction_loss = mean((outputs - X)^2)
    loss = reconstruction_loss + sparsity_weight * sparsity_loss

with Adam (lr 0.01, target 0.1, weight 0.2 in the listing). Inputs are scaled
to [0, 1] per column (min-max; a constant column is left unscaled), as MNIST
pixels are in the book.
"""

import numpy as np
import torch
import torch.nn as nn

import common


def kl_divergence(p, q):
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--target", type=float, default=0.1, help="sparsity_target")
    p.add_argument("--weight", type=float, default=0.2, help="sparsity_weight")
    args = p.parse_args()
    common.setup(args)

    x = common.load_data(args.data)
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    X = torch.tensor((x - lo) / span, dtype=torch.float32)

    n_inputs = X.shape[1]
    hidden_layer = nn.Linear(n_inputs, args.hidden)
    output_layer = nn.Linear(args.hidden, n_inputs)
    w = common.read_safetensors(args.init)
    with torch.no_grad():
        hidden_layer.weight.copy_(torch.from_numpy(w["W_enc"]).T)
        hidden_layer.bias.copy_(torch.from_numpy(w["b_enc"]))
        output_layer.weight.copy_(torch.from_numpy(w["W_dec"]).T)
        output_layer.bias.copy_(torch.from_numpy(w["b_dec"]))
    params = list(hidden_layer.parameters()) + list(output_layer.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr, foreach=False)

    log = common.LossLog(args.out)
    for epoch, idx in common.epoch_batches(len(X), args.epochs, args.batch_size, args.order):
        X_batch = X[idx]
        hidden1 = torch.sigmoid(hidden_layer(X_batch))
        outputs = output_layer(hidden1)
        hidden1_mean = torch.mean(hidden1, dim=0)  # batch mean
        sparsity_loss = torch.sum(kl_divergence(args.target, hidden1_mean))
        reconstruction_loss = torch.mean(torch.square(outputs - X_batch))  # MSE
        loss = reconstruction_loss + args.weight * sparsity_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.log(epoch, loss.item(), reconstruction_loss.item(), sparsity_loss.item())
    log.close()

    common.save_weights(
        args.out,
        hidden_layer.weight.T,
        hidden_layer.bias,
        output_layer.weight.T,
        output_layer.bias,
    )


if __name__ == "__main__":
    main()
