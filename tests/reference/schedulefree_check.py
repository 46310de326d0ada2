"""recipes.py's copy of schedulefree's ScheduleFreeWrapper (around sparsify's
SignSGD) against the installed schedulefree package's own: a small model
trained for 30 steps under a warm-up, both in train mode (y) after every step
and in eval mode (x) at the end, must be bitwise equal. Prints one JSON line.
"""

import importlib.metadata
import json
import sys

import torch

import recipes
import schedulefree


def train(wrapper_cls, steps=30, warmup=10, lr=0.01, momentum=0.95):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 7))
    b = torch.nn.Parameter(torch.randn(7))
    base = recipes.SignSGD([w, b], lr=lr)
    opt = wrapper_cls(base, momentum=momentum)
    opt.train()
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda s: min(1.0, (s + 1) / warmup))
    g = torch.Generator().manual_seed(1)
    ys = []
    for _ in range(steps):
        x = torch.randn(32, 12, generator=g)
        loss = (torch.tanh(x @ w + b) - x[:, :7]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ys.append([w.detach().clone(), b.detach().clone()])
    opt.eval()
    return ys, [w.detach().clone(), b.detach().clone()]


def main():
    torch.set_num_threads(1)
    ours_y, ours_x = train(recipes.ScheduleFreeWrapper)
    theirs_y, theirs_x = train(schedulefree.ScheduleFreeWrapper)
    train_equal = all(
        torch.equal(a, b) for s, t in zip(ours_y, theirs_y) for a, b in zip(s, t))
    eval_equal = all(torch.equal(a, b) for a, b in zip(ours_x, theirs_x))
    # The eval weights differ from the train weights (the check can fail).
    moved = not torch.equal(ours_x[0], ours_y[-1][0])
    print(json.dumps({"train_equal": train_equal, "eval_equal": eval_equal,
                      "eval_differs_from_train": moved,
                      "schedulefree": importlib.metadata.version("schedulefree")}))
    sys.exit(0 if train_equal and eval_equal and moved else 1)


if __name__ == "__main__":
    main()
