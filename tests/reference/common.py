"""Plumbing shared by the PyTorch reference trainers in this folder.

Nothing here knows about the Rust crate: it reads plain files (.npy data, a
safetensors init, an int64 .npy batch order), and writes what a test compares
(one JSON line of losses per optimisation step, and the final weights as a
safetensors file under SAELens names and shapes).

`safetensors` is not a dependency of the project venv, so the format (an
8-byte little-endian header length, a JSON header, then raw little-endian
tensor bytes) is read and written by hand here; only F32/F64 are needed.
"""

import argparse
import contextlib
import json
import os
import struct

import numpy as np
import torch

_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}


def read_safetensors(path):
    """Returns {name: float32 numpy array} of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        arr = np.frombuffer(raw[base + start : base + end], dtype=dtype)
        out[name] = arr.reshape(info["shape"]).astype(np.float32)
    return out


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: array-like} as float32 safetensors (names sorted)."""
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        arr = np.ascontiguousarray(t, dtype="<f4")
        b = arr.tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(b)],
        }
        blobs.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)  # pad so the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def base_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", required=True, help="training data .npy [n, d_in]")
    p.add_argument("--init", required=True, help="initial weights .safetensors "
                   "(W_enc [d_in,h], b_enc [h], W_dec [h,d_in], b_dec [d_in])")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", default="full", help="'full' or an integer")
    p.add_argument("--order", default=None,
                   help="int64 .npy [n] or [epochs, n]: row order of each epoch")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu",
                   help="cpu | cuda (saelens.py; scripts/gpu_bf16_check.sh)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the forward pass and loss under "
                   "torch.autocast('cpu', dtype=torch.bfloat16), backward outside")
    return p


def autocast(args):
    """The region a step's forward pass and loss run in: torch's autocast
    to bfloat16 on --device's type for --precision bf16, else nothing."""
    if args.precision == "bf16":
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup(args):
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)


def load_data(path):
    """The data as numpy float64 (what sklearn / numpy pipelines work in)."""
    return np.load(path).astype(np.float64)


def epoch_batches(n, epochs, batch_size, order_path):
    """Yields (epoch, index array) for every batch, epoch counted from 1."""
    if order_path is None:
        orders = np.arange(n, dtype=np.int64)[None, :]
    else:
        orders = np.load(order_path).astype(np.int64)
        if orders.ndim == 1:
            orders = orders[None, :]
    size = n if batch_size == "full" else int(batch_size)
    for epoch in range(1, epochs + 1):
        order = orders[min(epoch - 1, len(orders) - 1)]
        for start in range(0, n, size):
            yield epoch, torch.from_numpy(order[start : start + size].copy())


class LossLog:
    """One JSON line per step: step, epoch, loss, mse, sparsity_loss."""

    def __init__(self, out_dir):
        self.f = open(os.path.join(out_dir, "losses.jsonl"), "w")
        self.step = 0

    def log(self, epoch, loss, mse, sparsity):
        self.step += 1
        row = {
            "step": self.step,
            "epoch": epoch,
            "loss": float(loss),
            "mse": float(mse),
            "sparsity_loss": float(sparsity),
        }
        self.f.write(json.dumps(row) + "\n")

    def close(self):
        self.f.close()


def save_weights(out_dir, W_enc, b_enc, W_dec, b_dec):
    """Final weights under SAELens names and shapes."""
    write_safetensors(
        os.path.join(out_dir, "weights.safetensors"),
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
    )


# The unit-norm decoder of dictionary_learning's ConstrainedAdam: the gradient
# projected off each decoder row before the step, the rows renormalised after it.
@torch.no_grad()
def remove_parallel_gradient(W_dec):
    normed = W_dec / W_dec.norm(dim=1, keepdim=True)
    parallel = (W_dec.grad * normed).sum(dim=1, keepdim=True)
    W_dec.grad -= parallel * normed


@torch.no_grad()
def normalize_rows(W_dec):
    W_dec.data /= W_dec.norm(dim=1, keepdim=True)
