"""Reference trainer for seed 002 ("Sparse Autoencoder" tutorial), in plain
PyTorch: nn.Linear encoder with ReLU, nn.Linear decoder with sigmoid,
loss = MSELoss(decoded, x) + sum(sparsity_factor * |mean_batch(encoded) - 0.05|),
Adam, data standardised with numpy (population std) as the seed does.

The seed trains full-batch; --batch-size N with --order replays mini-batches.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim

import common


class SparseAutoencoder(nn.Module):
    def __init__(self, input_dim, hidden_dim, sparsity_factor=0.05, target=0.05):
        super(SparseAutoencoder, self).__init__()
        self.encoder = nn.Linear(input_dim, hidden_dim)
        self.decoder = nn.Linear(hidden_dim, input_dim)
        self.sparsity_factor = sparsity_factor
        self.target = target

    def forward(self, x):
        encoded = torch.relu(self.encoder(x))
        decoded = torch.sigmoid(self.decoder(encoded))
        return decoded

    def sparsity_penalty(self, encoded):
        rho = torch.mean(encoded, dim=0)
        return torch.sum(self.sparsity_factor * torch.abs(rho - self.target))


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--factor", type=float, default=0.05, help="sparsity_factor")
    p.add_argument("--target", type=float, default=0.05)
    args = p.parse_args()
    common.setup(args)

    X_train = common.load_data(args.data)
    mean = np.mean(X_train, axis=0)
    std = np.std(X_train, axis=0)
    X_train = (X_train - mean) / std
    X = torch.tensor(X_train, dtype=torch.float32)

    model = SparseAutoencoder(X.shape[1], args.hidden, args.factor, args.target)
    w = common.read_safetensors(args.init)
    with torch.no_grad():
        # nn.Linear stores weight as [out, in]: the transpose of W_enc / W_dec.
        model.encoder.weight.copy_(torch.from_numpy(w["W_enc"]).T)
        model.encoder.bias.copy_(torch.from_numpy(w["b_enc"]))
        model.decoder.weight.copy_(torch.from_numpy(w["W_dec"]).T)
        model.decoder.bias.copy_(torch.from_numpy(w["b_dec"]))

    optimizer = optim.Adam(model.parameters(), lr=args.lr, foreach=False)
    loss_fn = nn.MSELoss()
    log = common.LossLog(args.out)
    for epoch, idx in common.epoch_batches(len(X), args.epochs, args.batch_size, args.order):
        xb = X[idx]
        optimizer.zero_grad()
        y_pred = model(xb)
        reconstruction_loss = loss_fn(y_pred, xb)
        sparsity_loss = model.sparsity_penalty(torch.relu(model.encoder(xb)))
        loss = reconstruction_loss + sparsity_loss
        loss.backward()
        optimizer.step()
        # The tool reports the unweighted penalty; the seed folds the factor in.
        log.log(epoch, loss.item(), reconstruction_loss.item(),
                sparsity_loss.item() / args.factor)
    log.close()

    common.save_weights(
        args.out,
        model.encoder.weight.T,
        model.encoder.bias,
        model.decoder.weight.T,
        model.decoder.bias,
    )


if __name__ == "__main__":
    main()
