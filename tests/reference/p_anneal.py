"""Reference trainer for p-annealing (`sparsity.penalty: lp_anneal`), in plain
PyTorch, written from dictionary_learning's trainers/p_anneal.py
(PAnnealTrainer: `lp_norm`, the p schedule and the adaptive sparsity
coefficient in `loss`, copied below with its own names) and
trainers/trainer.py (`get_sparsity_warmup_fn`, ConstrainedAdam's unit-norm
decoder). It does not import dictionary_learning or this project.

    sae_in     = x - b_dec
    f          = relu(sae_in @ W_enc + b_enc)      (dictionary_learning AutoEncoder)
    x_hat      = f @ W_dec + b_dec
    mse        = F.mse_loss(x_hat, x)              (mean over elements: this
                                                    project's convention;
                                                    dictionary_learning sums over d_in)
    lp_loss    = lp_norm(f, p)                     ('Lp': mean((sum f^p)^(1/p)),
                                                    'Lp^p': mean(sum f^p))
    loss       = mse + lp_loss * (sparsity_coeff * sparsity_scale(step))
                 (dictionary_learning multiplies by the two factors one after
                 the other; this project by their product, equal once the
                 warm-up is over)

Steps are dictionary_learning's, 0-based: `--anneal-start` / `--anneal-end`
are this project's 1-based `sparsity.anneal_start` / `anneal_end` minus 1.
The run fails unless the coefficient changed at least `--min-changes` times,
so a parity case that never adapts it cannot pass.

--unit-norm-decoder: ConstrainedAdam (the gradient's component parallel to
each decoder row removed before the step, the rows renormalised after it);
the rows are normalised once at the start, as this project does.
"""

import json
import os

import torch
import torch.nn.functional as F

import common


class PAnneal:
    """PAnnealTrainer's sparsity state and its two methods, verbatim but
    for the autoencoder and the loss's other terms."""

    def __init__(self, sparsity_function, initial_sparsity_penalty, anneal_start,
                 anneal_end, p_start, p_end, n_sparsity_updates, sparsity_queue_length):
        self.sparsity_function = sparsity_function
        self.anneal_start = anneal_start
        self.anneal_end = anneal_end
        self.p_start = p_start
        self.p_end = p_end
        self.p = p_start
        self.next_p = None
        self.n_sparsity_updates = n_sparsity_updates
        self.sparsity_update_steps = torch.linspace(anneal_start, self.anneal_end,
                                                    self.n_sparsity_updates, dtype=int)
        self.p_values = torch.linspace(p_start, p_end, self.n_sparsity_updates)
        self.p_step_count = 0
        self.sparsity_coeff = initial_sparsity_penalty  # alpha
        self.sparsity_queue_length = sparsity_queue_length
        self.sparsity_queue = []

    def lp_norm(self, f, p):
        norm_sq = f.pow(p).sum(dim=-1)
        if self.sparsity_function == 'Lp^p':
            return norm_sq.mean()
        elif self.sparsity_function == 'Lp':
            return norm_sq.pow(1/p).mean()
        else:
            raise ValueError("Sparsity function must be 'Lp' or 'Lp^p'")

    def penalty(self, f, step):
        """`loss`'s sparsity part: the Lp norm at the current p (returned),
        then the queue and, when due, the coefficient and p updated."""
        lp_loss = self.lp_norm(f, self.p)
        self.lp_loss = lp_loss

        if self.next_p is not None:
            lp_loss_next = self.lp_norm(f, self.next_p)
            self.sparsity_queue.append([self.lp_loss.item(), lp_loss_next.item()])
            self.sparsity_queue = self.sparsity_queue[-self.sparsity_queue_length:]

        if step in self.sparsity_update_steps:
            # check to make sure we don't update on repeat step:
            if step >= self.sparsity_update_steps[self.p_step_count]:
                # Adapt sparsity penalty alpha
                if self.next_p is not None:
                    local_sparsity_new = torch.tensor([i[0] for i in self.sparsity_queue]).mean()
                    local_sparsity_old = torch.tensor([i[1] for i in self.sparsity_queue]).mean()
                    self.sparsity_coeff = self.sparsity_coeff * (local_sparsity_new / local_sparsity_old).item()
                # Update p
                self.p = self.p_values[self.p_step_count].item()
                if self.p_step_count < self.n_sparsity_updates-1:
                    self.next_p = self.p_values[self.p_step_count+1].item()
                else:
                    self.next_p = self.p_end
                self.p_step_count += 1
        return lp_loss


def get_sparsity_warmup_fn(total_steps, sparsity_warmup_steps=None):
    """dictionary_learning trainers/trainer.py."""
    def scale_fn(step):
        if not sparsity_warmup_steps:
            return 1.0
        return min(step / sparsity_warmup_steps, 1.0)
    return scale_fn




def main():
    p = common.base_parser(__doc__)
    p.add_argument("--coefficient", type=float, required=True,
                   help="initial_sparsity_penalty (sparsity.weight)")
    p.add_argument("--sparsity-function", choices=["Lp", "Lp^p"], default="Lp")
    p.add_argument("--p-start", type=float, default=1.0)
    p.add_argument("--p-end", type=float, required=True)
    p.add_argument("--anneal-start", type=int, required=True, help="0-based step")
    p.add_argument("--anneal-end", type=int, default=None, help="0-based step; default: steps")
    p.add_argument("--n-sparsity-updates", type=int, default=10)
    p.add_argument("--sparsity-queue-length", type=int, default=10)
    p.add_argument("--sparsity-warmup-steps", type=int, default=0)
    p.add_argument("--unit-norm-decoder", action="store_true")
    p.add_argument("--min-changes", type=int, default=3,
                   help="fail unless the coefficient changed this many times")
    args = p.parse_args()
    common.setup(args)

    X = torch.tensor(common.load_data(args.data), dtype=torch.float32)
    w = common.read_safetensors(args.init)
    W_enc = torch.nn.Parameter(torch.from_numpy(w["W_enc"]).clone())
    b_enc = torch.nn.Parameter(torch.from_numpy(w["b_enc"]).clone())
    W_dec = torch.nn.Parameter(torch.from_numpy(w["W_dec"]).clone())
    b_dec = torch.nn.Parameter(torch.from_numpy(w["b_dec"]).clone())
    if args.unit_norm_decoder:
        common.normalize_rows(W_dec)
    params = [W_enc, b_enc, W_dec, b_dec]
    optimizer = torch.optim.Adam(params, lr=args.lr, foreach=False)

    batches = list(common.epoch_batches(len(X), args.epochs, args.batch_size, args.order))
    steps = len(batches)
    anneal = PAnneal(args.sparsity_function, args.coefficient, args.anneal_start,
                     args.anneal_end if args.anneal_end is not None else steps,
                     args.p_start, args.p_end, args.n_sparsity_updates,
                     args.sparsity_queue_length)
    warmup = get_sparsity_warmup_fn(steps, args.sparsity_warmup_steps)

    log = common.LossLog(args.out)
    trace = []
    for step, (epoch, idx) in enumerate(batches):
        x = X[idx]
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        x_hat = f @ W_dec + b_dec
        mse = F.mse_loss(x_hat, x)
        weight = anneal.sparsity_coeff * warmup(step)
        p_now = anneal.p
        lp_loss = anneal.penalty(f, step)
        loss = mse + lp_loss * weight
        optimizer.zero_grad()
        loss.backward()
        if args.unit_norm_decoder:
            common.remove_parallel_gradient(W_dec)
        optimizer.step()
        if args.unit_norm_decoder:
            common.normalize_rows(W_dec)
        log.log(epoch, loss.item(), mse.item(), lp_loss.item())
        trace.append({"step": step + 1, "p": p_now, "sparsity_weight": weight})
    log.close()
    with open(os.path.join(args.out, "anneal.jsonl"), "w") as fh:
        fh.writelines(json.dumps(t) + "\n" for t in trace)

    coefficients = {round(t["sparsity_weight"], 15) for t in trace[args.sparsity_warmup_steps:]}
    if len(coefficients) - 1 < args.min_changes:
        raise SystemExit(f"the coefficient changed {len(coefficients) - 1} times after the "
                         f"warm-up, fewer than --min-changes {args.min_changes}")
    common.save_weights(args.out, W_enc, b_enc, W_dec, b_dec)


if __name__ == "__main__":
    main()
