#!/usr/bin/env python3
"""The checks to run on a GPU machine (scripts/gpu_check.sh runs this; see
README "Checking on a GPU"), in one command of a few minutes:

  info     `sae info`, and which features this binary has (bf16, NCCL):
           an absent one prints a loud `MISSING: ...` line and its cells say so
  arch     every architecture, 200 steps on CUDA and on this machine's CPU from
           the same initial weights (model.init) and data: the loss curves'
           largest relative difference (FLAG above FLAG_REL)
  export   a CUDA-trained top-k model exported (TorchScript, SAELens,
           safetensors) and loaded here in Python on the CPU, against `sae
           reconstruct` of the run on the CPU
  speed    scripts/bench.py's M, MT and T shapes (its CASES) and a 768 -> 65,536
           top-k (X): ours (`sae train`'s own loop seconds) against a plain
           PyTorch loop and the same loop under torch.compile on the same
           device, fp32 and bf16 (`train.precision: bf16`; PyTorch: autocast)
  nccl     `dist.backend: nccl` at world size 1 (torchrun's variables, no
           peer) against no group: the loss curves' largest difference

Writes gpu_check.md (a markdown table) into OUT_DIR. `--dry-run`: the same
on the CPU with small sizes (the CPU stands in for CUDA, timings tiny,
torch.compile with its `eager` backend, gloo for NCCL), for `cargo test`
(tests/gpu_check.rs).

Usage: gpu_check.py SAE_BIN OUT_DIR [--dry-run]
"""
import json, os, socket, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from safetensors.torch import load_file

SAE, OUT_DIR = sys.argv[1], sys.argv[2]
DRY = "--dry-run" in sys.argv
DEV = "cpu" if DRY else "cuda"
STARTED = time.time()
# Seconds after which the remaining timing cells are skipped (said in the table).
BUDGET_S = 100 if DRY else 270
# Loss curves further apart than this (relative) are flagged.
FLAG_REL = 1e-2
WORK = tempfile.mkdtemp(prefix="gpu_check-")
os.makedirs(OUT_DIR, exist_ok=True)
ROWS = []  # (check, case, figure, result)
MISSING = []
SPEED = []  # (case, precision, ours, torch, compiled) in samples/s or a word


def log(*a):
    print(*a, flush=True)


def row(check, case, figure, result):
    ROWS.append((check, case, figure, result))
    log(f"  {check:7} {case:24} {figure}  [{result}]")


def missing(what):
    MISSING.append(what)
    log(f"MISSING: {what}")


def sae(*args, env=None, check=True):
    p = subprocess.run([SAE, *args], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"sae {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return p


def write_config(name, cfg):
    path = os.path.join(WORK, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return path


def train(name, cfg, env=None, check=True):
    run = os.path.join(WORK, f"run-{name}")
    p = sae("train", "-q", "--config", write_config(name, cfg), "--out", run, "--force",
            env=env, check=check)
    return run, p


def losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f if l.strip()]


def max_rel(a, b):
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def finish():
    """Writes the table (atomically) and exits: 1 if a check failed or was flagged."""
    machine = torch.cuda.get_device_name(0) if DEV == "cuda" and torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores{', dry run' if DRY else ''})"
    lines = [f"# gpu_check on {machine}", "",
             f"torch {torch.__version__}; {time.time() - STARTED:.0f} s; "
             f"{'dry run: the CPU stands in for CUDA' if DRY else 'CUDA against this machine CPU'}", ""]
    for m in MISSING:
        lines.append(f"MISSING: {m}  ")
    lines += ["", "| check | case | figure | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {r} |" for a, b, c, r in ROWS]
    lines += ["", f"Training speed on {DEV}, samples/s (ours: `sae train`'s loop; PyTorch: bench.py's step)", "",
              "| case | precision | ours | PyTorch | torch.compile |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(r)} |" for r in SPEED]
    table = "\n".join(lines) + "\n"
    path = os.path.join(OUT_DIR, "gpu_check.md")
    with open(path + ".tmp", "w") as f:
        f.write(table)
    os.replace(path + ".tmp", path)
    log("")
    log(table)
    log(f"wrote {path}")
    failed = [r for r in ROWS if r[3].startswith(("FAIL", "FLAG"))] + \
        [r for r in SPEED if "FAIL" in r]
    sys.exit(1 if failed else 0)


# ---------------------------------------------------------------- info
log(f"== sae info ({SAE})")
try:
    info = sae("info").stdout
except (OSError, RuntimeError) as e:
    log(str(e))
    row("info", "sae info", "did not run (libtorch not found?)", "FAIL")
    finish()
log(info.rstrip())
if not DRY and "GPU usable: yes" not in info:
    missing("a usable GPU: `sae info` says none (is LD_LIBRARY_PATH the machine's torch/lib?)")
    row("info", "GPU", "not usable", "FAIL")
    finish()
else:
    row("info", "device", DEV, "ok")
HAS_NCCL = "nccl not built in" not in info and "nccl" in info.split("data-parallel backends:")[-1].split("\n")[0]
torch.manual_seed(0)
np_rng = np.random.default_rng(0)


def synth(name, n, d, seed):
    path = os.path.join(WORK, f"{name}.npy")
    sae("data", "synth", "--out", path, "--n", str(n), "--d-in", str(d),
        "--features", str(4 * d), "--active", "4", "--seed", str(seed))
    return path


def base_cfg(data, d_hidden, batch, epochs, init=None, device=DEV):
    model = {"d_hidden": d_hidden, "init_scheme": "sae"}
    if init:
        model["init"] = init
    return {"seed": 0, "device": device, "data": {"train": data}, "model": model,
            "sparsity": {},
            "train": {"epochs": epochs, "batch_size": batch, "log_every": 10,
                      "optimizer": {"name": "adam", "lr": 1e-3}}}


# bf16: a one-step probe (a binary without train.precision rejects the key).
probe_data = synth("probe", 64, 8, 9)
probe = base_cfg(probe_data, 16, 64, 1)
probe["train"]["precision"] = "bf16"
_, p = train("probe-bf16", probe, check=False)
HAS_BF16 = p.returncode == 0
if not HAS_BF16:
    why = "the binary rejects the key" if "precision" in p.stderr else (p.stderr.strip() or "?")[-160:]
    missing(f"train.precision: bf16 ({why}): the bf16 cells of ours are MISSING")
if not HAS_NCCL:
    missing("dist.backend: nccl (`sae info`: "
            + next((l for l in info.splitlines() if "backends" in l), "no backends line") + ")")

# ---------------------------------------------------------------- arch
# (name, model keys, sparsity keys, train keys)
ARCHS = [
    ("relu", {"activation": "relu"}, {"penalty": "l1", "weight": 0.001}, {}),
    ("sigmoid", {"activation": "sigmoid"}, {"penalty": "kl"}, {}),
    ("topk", {"activation": "topk", "k": 8}, {"penalty": "auxk", "weight": 0.03}, {"dead_window": 20}),
    ("abstopk", {"activation": "abstopk", "k": 8}, {"penalty": "auxk", "weight": 0.03}, {"dead_window": 20}),
    ("batchtopk", {"activation": "batchtopk", "k": 8}, {"penalty": "auxk", "weight": 0.03}, {"dead_window": 20}),
    ("jumprelu", {"activation": "jumprelu"}, {"penalty": "l0", "weight": 0.01}, {}),
    ("gated", {"activation": "gated"}, {"penalty": "l1", "weight": 0.001}, {}),
    ("matryoshka_batchtopk", {"activation": "matryoshka_batchtopk", "k": 8}, {"penalty": "none"}, {}),
    ("matching_pursuit", {"activation": "matching_pursuit", "k": 4, "tied": True}, {"penalty": "none"}, {}),
    # data.stream: batches to CUDA from pinned memory, one ahead.
    ("topk streamed", {"activation": "topk", "k": 8}, {"penalty": "auxk", "weight": 0.03}, {"dead_window": 20}),
]
d, h, batch = (16, 64, 32) if DRY else (128, 1024, 256)
# 200 steps (the dry run: 40); runs side by side, CPU threads shared out.
per_epoch, epochs = 20, (2 if DRY else 10)
PARALLEL = 4
log(f"== every architecture, {per_epoch * epochs} steps, {DEV} against cpu ({d} -> {h}, batch {batch})")
arch_data = synth("arch", per_epoch * batch, d, 1)
arch_valid = synth("arch-valid", 2 * batch, d, 2)
w_dec = np_rng.standard_normal((h, d)).astype(np.float32)
w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
arch_init = os.path.join(WORK, "arch-init.safetensors")
save_file({"W_enc": np.ascontiguousarray(w_dec.T), "b_enc": np.zeros(h, np.float32),
           "W_dec": w_dec, "b_dec": np.zeros(d, np.float32)}, arch_init)


def arch_run(name, model, sparsity, tr, device, tag):
    cfg = base_cfg(arch_data, h, batch, epochs, init=arch_init, device=device)
    cfg["model"].update(model)
    if name == "matryoshka_batchtopk":
        cfg["model"]["matryoshka_widths"] = [h // 4, h // 2]
    cfg["sparsity"].update(sparsity)
    cfg["train"].update(tr, threads=max(1, (os.cpu_count() or 1) // PARALLEL))
    if name.endswith("streamed"):
        cfg["data"].update(valid=arch_valid, stream=True)
    run, _ = train(f"arch-{name.replace(' ', '-')}-{tag}", cfg)
    return run


RUNS = {}
with ThreadPoolExecutor(PARALLEL) as pool:
    jobs = {(a[0], tag): pool.submit(arch_run, *a, device, tag)
            for a in ARCHS for device, tag in ((DEV, "dev"), ("cpu", "cpu"))}
    for name, *_ in ARCHS:
        try:
            runs = {tag: jobs[(name, tag)].result() for tag in ("dev", "cpu")}
            RUNS[name] = runs["dev"]
            a, b = losses(runs["dev"]), losses(runs["cpu"])
            rel = max_rel(a, b)
            row("arch", name, f"max rel dloss {rel:.2e} over {len(b)} logged steps",
                "ok" if rel <= FLAG_REL else f"FLAG (> {FLAG_REL:g})")
        except Exception as e:  # one architecture failing leaves the others' rows
            log(str(e))
            row("arch", name, "did not train", "FAIL")
log(f"   ({time.time() - STARTED:.0f} s so far)")

# ---------------------------------------------------------------- export
log(f"== a {DEV}-trained top-k model, exported, loaded in Python on the CPU")
x_np = np.load(arch_data)[:256]
x_path = os.path.join(WORK, "export-x.npy")
np.save(x_path, x_np)
x = torch.from_numpy(x_np)
try:
    run = RUNS["topk"]
    ref_path = os.path.join(WORK, "export-ref.npy")
    sae("reconstruct", "--model", run, "--data", x_path, "--out", ref_path, "--device", "cpu")
    ref = torch.from_numpy(np.load(ref_path))
    scale = ref.abs().max().item()

    def verdict(out):
        diff = (out - ref).abs().max().item()
        return f"max abs diff {diff:.2e} (outputs up to {scale:.2f})", "ok" if diff <= 1e-4 * max(scale, 1) else "FAIL"

    ts = os.path.join(WORK, "model.pt")
    sae("export", "--model", run, "--format", "torchscript", "--out", ts)
    m = torch.jit.load(ts, map_location="cpu")
    with torch.no_grad():
        row("export", "torchscript (python, cpu)", *verdict(m(x)))
    lens = os.path.join(WORK, "saelens")
    sae("export", "--model", run, "--format", "saelens", "--out", lens)
    cfg = json.load(open(os.path.join(lens, "cfg.json")))
    w = load_file(os.path.join(lens, "sae_weights.safetensors"))
    k = cfg.get("k") or (cfg.get("architecture_config") or {}).get("k") or 8
    xin = x - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    pre = xin @ w["W_enc"] + w["b_enc"]
    top = pre.topk(int(k), dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    row("export", f"saelens {cfg.get('architecture', '?')} (python, cpu)", *verdict(z @ w["W_dec"] + w["b_dec"]))
    st = os.path.join(WORK, "model.safetensors")
    sae("export", "--model", run, "--format", "safetensors", "--out", st)
    w = load_file(st)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(8, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    row("export", "safetensors (python, cpu)", *verdict(z @ w["W_dec"] + w["b_dec"]))
except Exception as e:
    log(str(e))
    row("export", "torchscript/saelens/safetensors", "failed", "FAIL")

log(f"   ({time.time() - STARTED:.0f} s so far)")

# ---------------------------------------------------------------- speed
# scripts/bench.py's shape definitions (CASES, its config and MT weights),
# imported as a module: it reads its own arguments at import.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
argv = sys.argv
sys.argv = ["bench.py", SAE, os.path.join(WORK, "bench"), "--quick"]
import bench  # noqa: E402

sys.argv = argv
CASES = {n: dict(bench.CASES[n]) for n in ("M", "MT", "T")}
CASES["X"] = dict(CASES["T"], d_hidden=65536)  # the 768 -> 65,536 top-k
# Steps timed per cell: a few seconds each on an H100.
STEPS = {"M": 200, "MT": 200, "T": 150, "X": 60}
if DRY:
    for n, c in CASES.items():
        c.update(d_in=32, d_hidden=1024 if n == "X" else 256, batch=64, rows=64 * 12)
    STEPS = {n: 8 for n in CASES}
    # bench.trained_weights trains on CASES["M"] (12,288 rows, 84 steps): narrow here too.
    bench.CASES["M"] = dict(bench.CASES["M"], d_in=32, d_hidden=256)
for c in CASES.values():
    c["rows"] = c["batch"] * 12
bench_config = bench.config


def on_device(*a, **kw):
    """bench.config's file, on DEV and logging once (a logged step reads back)."""
    path = bench_config(*a, **kw)
    cfg = json.load(open(path))
    cfg["device"] = DEV
    cfg["train"]["threads"] = os.cpu_count()
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


bench.config = on_device
bench.OUT = os.path.join(WORK, "bench")
bench.THREADS = os.cpu_count()
torch.set_num_threads(os.cpu_count())


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def ours(name, c, data, bf16):
    epochs = max(1, -(-STEPS[name] // (c["rows"] // c["batch"])))
    extra = {"log_every": 10 ** 9}
    if bf16:
        extra["precision"] = "bf16"
    path = bench.config(f"{name}-{'bf16' if bf16 else 'fp32'}", dict(c, epochs=epochs), data,
                        extra_train=extra)
    run = os.path.join(WORK, f"run-speed-{name}")
    sae("train", "-q", "--config", path, "--out", run, "--force")
    return json.load(open(os.path.join(run, "summary.json")))["samples_per_second"]


def torch_loop(name, c, data, bf16, compiled):
    """bench.py's plain PyTorch step (l1 or dense top-k) on DEV, Adam at lr
    1e-4; samples/s over STEPS[name] steps after 3 warm-up steps (torch.compile
    compiles in those)."""
    torch.manual_seed(0)
    x = torch.from_numpy(np.load(data)).to(DEV)
    d, h = c["d_in"], c["d_hidden"]
    if c.get("trained"):
        params = [torch.nn.Parameter(t.to(DEV)) for t in bench.load_weights(c)]
    else:
        w = torch.randn(h, d, device=DEV)
        w /= w.norm(dim=1, keepdim=True)
        params = [torch.nn.Parameter(w.t().clone()), torch.nn.Parameter(torch.zeros(h, device=DEV)),
                  torch.nn.Parameter(w), torch.nn.Parameter(torch.zeros(d, device=DEV))]
    W_enc, b_enc, W_dec, b_dec = params
    weight = c.get("weight", 0.001)

    def loss_of(xb):
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=bf16):
            pre = (xb - b_dec) @ W_enc + b_enc
            if c["kind"] == "topk":
                v, i = pre.topk(c["k"], dim=-1)
                z = torch.zeros_like(pre).scatter(-1, i, v.relu())
                return F.mse_loss((z @ W_dec + b_dec).float(), xb)
            z = torch.relu(pre)
            l1 = (z.abs() * W_dec.norm(dim=1)).sum(-1).mean()
            return F.mse_loss((z @ W_dec + b_dec).float(), xb) + weight * l1

    step = torch.compile(loss_of, backend="eager" if DRY else "inductor") if compiled else loss_of
    opt = torch.optim.Adam(params, lr=1e-4)
    n, b = x.shape[0], c["batch"]
    perm = torch.randperm(n, device=DEV)

    def run(steps):
        for s in range(steps):
            at = (s * b) % (n - b + 1)
            loss = step(x[perm[at:at + b]])
            opt.zero_grad()
            loss.backward()
            opt.step()

    run(3)
    sync()
    t0 = time.perf_counter()
    run(STEPS[name])
    sync()
    return STEPS[name] * b / (time.perf_counter() - t0)


log(f"== speed on {DEV}: ours, PyTorch, torch.compile (samples/s)")
for name, c in CASES.items():
    data = bench.make_data(f"speed-{name}-{c['d_in']}", c)
    for bf16 in (False, True):
        prec = "bf16" if bf16 else "fp32"
        cells = []
        for what in ("ours", "torch", "compile"):
            if time.time() - STARTED > BUDGET_S:
                cells.append("skipped (time)")
                continue
            if what == "ours" and bf16 and not HAS_BF16:
                cells.append("MISSING")
                continue
            try:
                v = ours(name, c, data, bf16) if what == "ours" else \
                    torch_loop(name, c, data, bf16, what == "compile")
                cells.append(f"{v:,.0f}")
            except Exception as e:
                log(f"{name} {prec} {what}: {str(e)[-600:]}")
                cells.append("FAIL")
        SPEED.append((f"{name} ({c['d_in']} -> {c['d_hidden']}, batch {c['batch']})", prec, *cells))
        log(f"  speed   {name:3} {prec}: ours {cells[0]}, torch {cells[1]}, torch.compile {cells[2]}")

log(f"   ({time.time() - STARTED:.0f} s so far)")

# ---------------------------------------------------------------- nccl
backend = "gloo" if DRY else "nccl"
log(f"== {backend} at world size 1 against no group")
if backend == "nccl" and not HAS_NCCL:
    row("dist", "nccl, world size 1", "not built in", "MISSING")
else:
    try:
        cfg = base_cfg(arch_data, h, batch, 2)
        cfg["model"].update(activation="topk", k=8)
        cfg["sparsity"] = {"penalty": "auxk", "weight": 0.03}
        cfg["train"].update(log_every=1, dead_window=5)
        alone, _ = train("dist-none", cfg)
        cfg["dist"] = {"backend": backend}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        grouped, _ = train(f"dist-{backend}", cfg, env=env)
        got = json.load(open(os.path.join(grouped, "summary.json")))
        rel = max_rel(losses(grouped), losses(alone))
        ok = got.get("world_size") == 1 and got.get("backend") == backend and rel <= FLAG_REL
        row("dist", f"{backend}, world size 1",
            f"max rel dloss {rel:.2e} over {len(losses(alone))} steps (backend {got.get('backend')})",
            "ok" if ok else "FLAG")
    except Exception as e:
        log(str(e))
        row("dist", f"{backend}, world size 1", "failed", "FAIL")

# ---------------------------------------------------------------- table
finish()
