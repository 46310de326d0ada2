#!/usr/bin/env python3
"""`make bench`: our training step against a plain PyTorch loop doing the same
maths with the same threads, alternating runs, in one process tree.

Cases (issue 6):
  S  seed 002 model: 20 -> 8, ReLU + sigmoid decoder + mean_abs, batch 32, 1000 rows (overhead-bound)
  M  ReLU + L1 (SAELens standard), 768 -> 8192, batch 1024 (matmul-bound)
  T  top-k k=32, 768 -> 16384, batch 1024 (PyTorch side: the dense top-k step)
  E  `sae encode` of 1,000,000 x 768 rows from a .npy file (768 -> 1024 ReLU model), rows/s
  OMP `sae encode --encoder omp --k 32` of 100,000 x 768 rows over 8192 atoms
     (a 768 -> 8192 top-k model), against the model's own encoder on the same rows
  DP M trained data-parallel, 2 ranks x 1 thread under torchrun (Gloo), against
     one process with 2 threads (buckets overlapping backward, and dist.bucket_mb: 0);
     with the share of the step spent waiting for collectives
  MT M at trained sparsity (issue 16): the same shapes, starting from weights whose
     L0 is about 1 % of d_hidden (from a short training run of ours, `trained_weights`),
     L1 weight 0.004 (where that L0 holds); both sides start from those weights
  SAELENS  M, MT and T against SAELens's own training step (issue 16): its trainer's
     `step` on its StandardTrainingSAE / TopKTrainingSAE, same data and threads
  SWITCH  ours with `train.sparse_step: always` against `never` on the M shape at code
     densities from 1 % to 30 %: where the sparse step stops paying (sparse_step::SWITCH_DENSITY)
  MEM  peak RSS of `sae train` and `sae eval` (issue 16): 768 -> 4096 / 16384 /
     65536 / 131072 top-k k=32, batch 1024, 8192 rows, 1 epoch (--quick: the
     first two), against the training state (parameters, gradients, Adam's two
     moments); the end-of-run phase against the training loop; and top-k
     selection over those latents against the encoder matmul that feeds it
  LOADED  S, M and T beside two busy processes (CPU spin loops the bench starts
     and stops, each bounded to 15 minutes), ours against the PyTorch loop under
     the same load, both with their defaults (ours: `train.threads: auto` and
     its OpenMP wait; PyTorch: its threads and libgomp's); and our quiet figure
     without the load, from the same defaults, in the same run
  LM  training rows from a language model (`data.model`): a GPT-2-shaped slice
     (scripts/bench_lm.py, random init; 4 blocks at d_model 512, --quick 2 at 256)
     on random token ids; the model forward alone (`sae activations`), the SAE
     step alone (512 -> 4096 top-k on the dumped rows) and `sae train` from the
     model, alternating; a 4-point `sae sweep` on one model pass against 4
     separate runs; the forward of the .pt2 (AOTInductor) against the .pt

Ours is timed by `sae train` itself (summary.json `seconds`: the training loop
only, no data loading); PyTorch's loop is timed the same way. Each case runs
ours and PyTorch alternately REPEATS times; the table takes the best of each.
The matmul peak is torch.mm at the M shape, measured in this same run.

Usage: bench.py SAE_BIN OUT_DIR [--quick] [--only S,M,MT,T,E,OOC,OMP,DP,SAELENS,SWITCH,MEM,LOADED,LM]
  --only runs the named parts and prints their figures without writing the table.
"""
import json, os, platform, subprocess, sys, time
import numpy as np
import torch
import torch.nn.functional as F

SAE, OUT = sys.argv[1], sys.argv[2]
QUICK = "--quick" in sys.argv
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
REPEATS = 2 if QUICK else 3
# `train.sparse_step: auto`'s switch density (src/sparse_step.rs SWITCH_DENSITY).
SWITCH_DENSITY = 0.15
ONLY = None
if "--only" in sys.argv:
    ONLY = set(sys.argv[sys.argv.index("--only") + 1].upper().split(","))
torch.set_num_threads(THREADS)
os.makedirs(OUT, exist_ok=True)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


CASES = {
    # name: d_in, d_hidden, batch, rows, epochs, kind
    "S": dict(d_in=20, d_hidden=8, batch=32, rows=1000, epochs=100, kind="seed002"),
    "M": dict(d_in=768, d_hidden=8192, batch=1024, rows=1024 * (6 if QUICK else 12), epochs=1, kind="l1"),
    # M-trained: M's shapes from weights at trained sparsity (see trained_weights).
    "MT": dict(d_in=768, d_hidden=8192, batch=1024, rows=1024 * (6 if QUICK else 12), epochs=1, kind="l1",
               weight=0.004, trained=True),
    "T": dict(d_in=768, d_hidden=16384, batch=1024, rows=1024 * (4 if QUICK else 8), epochs=1, kind="topk", k=32),
}


def flops_per_sample(c):
    """Matmul FLOPs per training sample of the dense maths: forward encoder and
    decoder (2*d*h each), backward dW_dec, dz, dW_enc (2*d*h each), plus the
    gradient through the encoder input (2*d*h) when b_dec is subtracted there."""
    return (10 if c["kind"] == "seed002" else 12) * c["d_in"] * c["d_hidden"]


def make_data(name, c):
    path = os.path.join(OUT, f"{name}.npy")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        np.save(path, rng.standard_normal((c["rows"], c["d_in"])).astype(np.float32))
    return path


def config(name, c, data, threads=None, extra_train=None, init=None):
    """The config of case c on data, written as OUT/name.yaml: starting from
    `init` (a model.init) if given, else from the trained weights for MT."""
    model = {"d_hidden": c["d_hidden"], "init_scheme": "sae"}
    if init is None and c.get("trained"):
        init = trained_weights()
    if init is not None:
        model["init"] = init
    sparsity = {"penalty": "l1", "weight": c.get("weight", 0.001)}
    log_every = 4 if c.get("trained") else 100000
    if c["kind"] == "seed002":
        model = {"d_hidden": 8, "activation": "relu", "decoder_activation": "sigmoid",
                 "apply_b_dec_to_input": False}
        sparsity = {"penalty": "mean_abs", "target": 0.05, "weight": 0.05}
    elif c["kind"] == "topk":
        model.update(activation="topk", k=c["k"])
        sparsity = {"penalty": "none"}
    cfg = {"seed": 0, "device": "cpu", "data": {"train": data}, "model": model,
           "sparsity": sparsity,
           "train": {"epochs": c["epochs"], "batch_size": c["batch"], "shuffle": True,
                     "log_every": log_every, "threads": threads or THREADS,
                     "optimizer": {"name": "adam", "lr": 1e-4}}}
    cfg["train"].update(extra_train or {})
    path = os.path.join(OUT, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return path


def trained_weights():
    """A 768 -> 8192 ReLU+L1 model at trained sparsity, from a short training
    run of ours on the M data (made once per bench run): 36 steps at L1 weight
    0.02 and lr 2e-3 bring L0 from ~4,000 down to a few hundred, then 48 steps
    at weight 0.004, where L0 settles near 1 % of d_hidden on this data. Returns
    the run directory (a `model.init`)."""
    global TRAINED
    if TRAINED is None:
        # Its own 12,288 rows (M's full-size data), so --quick starts from the same L0.
        c = dict(CASES["M"], rows=1024 * 12)
        data = make_data("MT-init", c)
        init = None
        for i, (weight, epochs) in enumerate(((0.02, 3), (0.004, 4))):
            name = f"MT-init{i + 1}"
            cfg = config(name, dict(c, weight=weight, epochs=epochs), data, init=init,
                         extra_train={"optimizer": {"name": "adam", "lr": 2e-3}})
            run_ours(name, cfg)
            init = os.path.join(OUT, f"run-{name}")
        TRAINED = init
        l0 = json.load(open(os.path.join(TRAINED, "summary.json")))["train"]["l0"]
        log(f"MT: trained weights in {TRAINED}, L0 {l0:.1f} of {c['d_hidden']} on the M data")
    return TRAINED


TRAINED = None


def load_weights(c):
    """The MT starting weights as torch tensors (W_enc, b_enc, W_dec, b_dec)."""
    from safetensors.torch import load_file
    w = load_file(os.path.join(trained_weights(), "model.safetensors"))
    return w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]


def run_ours(name, cfg):
    run = os.path.join(OUT, f"run-{name}")
    subprocess.run([SAE, "train", "-q", "--config", cfg, "--out", run, "--force"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = json.load(open(os.path.join(run, "summary.json")))
    return s["samples_per_second"]


def ours_l0(name):
    """Mean L0 over the logged steps of our last run of case `name`."""
    lines = open(os.path.join(OUT, f"run-{name}", "metrics.jsonl")).read().split("\n")
    l0 = [json.loads(l)["l0"] for l in lines if l.strip()]
    return sum(l0) / len(l0)


# Mean L0 of the codes during the last timed run of each baseline, for MT.
L0_SEEN = {}


def run_torch(c, data):
    """The plain PyTorch loop a user would write for the same maths."""
    torch.manual_seed(0)
    x = torch.from_numpy(np.load(data))
    d, h = c["d_in"], c["d_hidden"]
    if c["kind"] == "seed002":
        enc, dec = torch.nn.Linear(d, h), torch.nn.Linear(h, d)
        params = list(enc.parameters()) + list(dec.parameters())

        def step(xb):
            z = torch.relu(enc(xb))
            xh = torch.sigmoid(dec(z))
            return F.mse_loss(xh, xb) + 0.05 * (z.mean(0) - 0.05).abs().sum()
    else:
        if c.get("trained"):
            W_enc, b_enc, W_dec, b_dec = (torch.nn.Parameter(t) for t in load_weights(c))
        else:
            W_dec = torch.randn(h, d)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            W_enc = torch.nn.Parameter(W_dec.t().clone())
            W_dec = torch.nn.Parameter(W_dec)
            b_enc = torch.nn.Parameter(torch.zeros(h))
            b_dec = torch.nn.Parameter(torch.zeros(d))
        params = [W_enc, b_enc, W_dec, b_dec]
        weight = c.get("weight", 0.001)
        l0s = []
        if c.get("trained"):
            L0_SEEN["torch"] = l0s

        def step(xb):
            pre = (xb - b_dec) @ W_enc + b_enc
            if c["kind"] == "topk":
                v, i = pre.topk(c["k"], dim=-1)
                z = torch.zeros_like(pre).scatter(-1, i, v.relu())
                return F.mse_loss(z @ W_dec + b_dec, xb)
            z = torch.relu(pre)
            if c.get("trained") and len(l0s) < 4:
                # The L0 of the first steps (a count over the batch: ~1 % of a step).
                l0s.append((z > 0).sum().item() / z.shape[0])
            l1 = (z.abs() * W_dec.norm(dim=1)).sum(-1).mean()
            return F.mse_loss(z @ W_dec + b_dec, xb) + weight * l1
    opt = torch.optim.Adam(params, lr=1e-4)

    def train_step(xb):
        loss = step(xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return timed_epochs(x, c, train_step)


def timed_epochs(x, c, train_step):
    """Samples/s of `train_step` over c["epochs"] shuffled epochs of x in
    batches of c["batch"] (both baselines time their loops the same way)."""
    n, b = x.shape[0], c["batch"]
    samples = 0
    t0 = time.perf_counter()
    for _ in range(c["epochs"]):
        perm = torch.randperm(n)
        for s in range(0, n, b):
            xb = x[perm[s:s + b]]
            train_step(xb)
            samples += xb.shape[0]
    return samples / (time.perf_counter() - t0)


def run_saelens(c, data):
    """SAELens's own training step (sae_lens 6.x) for case c, timed like
    run_torch. Each batch goes through SAETrainer.step, the seam its `fit` loop
    calls: training_forward_pass (MSE + the architecture's loss: L1 weighted by
    decoder norms for M, the dead-latent aux loss for T, zero while no latent
    has been dead for dead_feature_window steps), the dead-latent statistics,
    backward, clip_grad_norm_(1.0), Adam (betas 0.9, 0.999) and the constant
    lr and coefficient schedulers. Left out, as in `fit` without wandb: the
    progress bar, logging, evals, checkpoints. Settings that make the maths
    ours: float32 on cpu, no autocast, no activation normalisation, b_dec
    subtracted from the input, unit-norm decoder rows at init (ours:
    init_scheme sae), top-k codes not rescaled by decoder norms. T uses
    SAELens's sparse top-k codes (use_sparse_activations, which its docs advise
    for float32 without autocast; 1.3x its dense default here)."""
    from sae_lens import (StandardTrainingSAE, StandardTrainingSAEConfig,
                          TopKTrainingSAE, TopKTrainingSAEConfig)
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    x = torch.from_numpy(np.load(data))
    n, b = x.shape[0], c["batch"]
    common = dict(d_in=c["d_in"], d_sae=c["d_hidden"], dtype="float32", device="cpu",
                  apply_b_dec_to_input=True, normalize_activations="none", decoder_init_norm=1.0)
    if c["kind"] == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=c["k"], rescale_acts_by_decoder_norm=False,
                                                    use_sparse_activations=True, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=c.get("weight", 0.001),
                                                            **common))
        if c.get("trained"):
            with torch.no_grad():
                for name, t in zip(("W_enc", "b_enc", "W_dec", "b_dec"), load_weights(c)):
                    getattr(sae, name).copy_(t)
    cfg = SAETrainerConfig(total_training_samples=n * c["epochs"], train_batch_size_samples=b,
                           lr=1e-4, lr_end=1e-4, device="cpu", autocast=False)
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))

    l0s = []
    if c.get("trained"):
        L0_SEEN["saelens"] = l0s

    def train_step(xb):
        out = trainer.step(xb)
        trainer.n_training_steps += 1
        if c.get("trained") and len(l0s) < 4:
            l0s.append((out.feature_acts > 0).sum().item() / xb.shape[0])
    return timed_epochs(x, c, train_step)


# SAELENS cases and their aims (issue 16): ours at least this many times
# SAELens's samples/s. M has none (the issue states it for M-trained: trained
# sparsity, the same weights on both sides); M starts from a fresh init.
SAELENS_AIMS = {"M": None, "MT": 3.0, "T": 5.0}


def bench_saelens():
    """Ours against SAELens's training step at the SAELENS_AIMS cases,
    alternating REPEATS rounds, best of each: [(name, ours, SAELens)], or
    None when sae_lens is not installed."""
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        return None
    rows = []
    for name in SAELENS_AIMS:
        c = CASES[name]
        data = make_data(name, c)
        cfg = config(name, c, data)
        ours, theirs = 0.0, 0.0
        for r in range(REPEATS):
            o, t = run_ours(name, cfg), run_saelens(c, data)
            ours, theirs = max(ours, o), max(theirs, t)
            log(f"SAELENS {name} round {r + 1}: ours {o:.0f}/s, SAELens {t:.0f}/s")
        rows.append((name, ours, theirs))
        if c.get("trained"):
            L0_SEEN["ours"] = ours_l0(name)
    return rows


def saelens_lines(rows):
    """The SAELens table (or the line saying it was not run) for table.md."""
    if rows is None:
        return ["SAELens baseline: NOT run (sae_lens is not installed in this venv; "
                "`make saelens` installs it)."]
    lines = ["SAELens baseline (issue 16): SAELens's own training step (`SAETrainer.step`: "
             "its training_forward_pass, backward, clip_grad_norm_, Adam; T with its sparse top-k codes), "
             "same data, batch and threads; "
             "M from a fresh init (the issue sets no aim for it), MT from the trained weights on both sides.",
             "",
             "| case | ours samples/s | SAELens samples/s | ratio | aim |",
             "|---|---|---|---|---|"]
    for name, o, t in rows:
        aim = SAELENS_AIMS[name]
        verdict = "none set" if aim is None else f">= {aim:.0f}x: {'met' if o / t >= aim else 'not met'}"
        lines.append(f"| {name} | {o:,.0f} | {t:,.0f} | {o / t:.2f}x | {verdict} |")
    return lines


def l0_line():
    """What L0 the MT runs saw (d_hidden 8192), for table.md."""
    seen = []
    if "ours" in L0_SEEN:
        seen.append(f"ours {L0_SEEN['ours']:.0f} (mean over logged steps)")
    for side in ("torch", "saelens"):
        if L0_SEEN.get(side):
            v = L0_SEEN[side]
            seen.append(f"{'PyTorch' if side == 'torch' else 'SAELens'} {sum(v) / len(v):.0f} (first {len(v)} steps)")
    return "MT: L0 during the timed steps, of 8192 latents: " + ", ".join(seen) + "."


def switch_weights(rho):
    """A SAELens-format 768 -> 8192 ReLU model whose codes on standard-normal
    input have density rho: unit encoder columns (so each pre-activation is
    N(0, 1) + b_enc) and b_enc = -Phi^-1(1 - rho)."""
    from safetensors.torch import save_file
    d, h = 768, 8192
    path = os.path.join(OUT, f"switch-{rho:g}")
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(h, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    b = -torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - rho)).item()
    save_file({"W_enc": w_dec.t().contiguous(), "b_enc": torch.full((h,), b), "W_dec": w_dec,
               "b_dec": torch.zeros(d)}, os.path.join(path, "sae_weights.safetensors"))
    json.dump({"architecture": "standard", "d_in": d, "d_sae": h, "dtype": "float32",
               "apply_b_dec_to_input": True, "normalize_activations": "none"},
              open(os.path.join(path, "cfg.json"), "w"))
    return path


def bench_switch():
    """Ours on the M shape with `train.sparse_step: always` against `never`,
    from weights at each code density (switch_weights), alternating REPEATS
    rounds, best of each: [(target density, measured density, dense/s,
    sparse/s)]."""
    c = dict(CASES["M"])
    data = make_data("M", c)
    rows = []
    for rho in ([0.02, 0.1, 0.2] if QUICK else [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]):
        init = switch_weights(rho)
        rates = {}
        for r in range(REPEATS):
            for mode in ("never", "always"):
                cfg = config("SWITCH", c, data, init=init,
                             extra_train={"sparse_step": mode, "log_every": 1})
                rates[mode] = max(rates.get(mode, 0.0), run_ours("SWITCH", cfg))
        density = ours_l0("SWITCH") / c["d_hidden"]
        log(f"SWITCH density {rho:.0%} (measured {density:.1%}): dense {rates['never']:,.0f}/s, "
            f"sparse {rates['always']:,.0f}/s, {rates['always'] / rates['never']:.2f}x")
        rows.append((rho, density, rates["never"], rates["always"]))
    return rows


def switch_lines(rows):
    """The SWITCH table and where the sparse step stops paying."""
    lines = ["Sparse step switch point (M shape, 768 -> 8192 ReLU+L1, batch 1024; ours with "
             "`train.sparse_step: never` vs `always`, from weights at each code density):",
             "",
             "| code density (measured) | dense samples/s | sparse samples/s | sparse / dense |",
             "|---|---|---|---|"]
    cross = None
    for i, (rho, dens, dense, sparse) in enumerate(rows):
        lines.append(f"| {rho:.0%} ({dens:.1%}) | {dense:,.0f} | {sparse:,.0f} | {sparse / dense:.2f}x |")
        if cross is None and sparse < dense and i > 0:
            # Linear interpolation of the ratio between this density and the last.
            (d0, r0), (d1, r1) = (rows[i - 1][1], rows[i - 1][3] / rows[i - 1][2]), (dens, sparse / dense)
            cross = d0 + (1.0 - r0) * (d1 - d0) / (r1 - r0)
    lines += ["", f"The sparse step stops paying near {cross:.0%} density"
              if cross is not None else "The sparse step paid at every density measured",
              f"(`train.sparse_step: auto` switches at {SWITCH_DENSITY:.0%}, src/sparse_step.rs)."]
    return lines


# LOADED: how both loops fare on a shared machine (issue 22).
LOADED_CASES = ("S", "M", "T")
# The wait default's quiet cost is measured on these (issue 22: S, M, MT, T).
QUIET_CASES = ("S", "M", "MT", "T")
# libgomp's own spin count when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set.
LIBGOMP_SPINCOUNT = "300000"
# Aims: ours against PyTorch's loop under the load, and ours under the load
# against ours quiet (a fair share of 2 cores beside two busy processes is
# about two thirds of them).
LOADED_AIM_RATIO, LOADED_AIM_SLOWDOWN = 3.0, 2.0
# Variables that choose how OpenMP workers wait: unset for "defaults".
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def busy_processes(n, seconds=900):
    """n CPU-bound processes that end by themselves after `seconds` (the bench
    also stops them), so a killed bench leaves nothing spinning for long."""
    code = f"import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def run_ours_default(name, c, data, env_extra=None):
    """Ours with its defaults: no train.threads, no OpenMP variables (but
    `env_extra`)."""
    path = config(f"{name}-default", c, data)
    cfg = json.load(open(path))
    del cfg["train"]["threads"]
    with open(path, "w") as f:
        json.dump(cfg, f)
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update(env_extra or {})
    run = os.path.join(OUT, f"run-{name}-default")
    subprocess.run([SAE, "train", "-q", "--config", path, "--out", run, "--force"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    s = json.load(open(os.path.join(run, "summary.json")))
    return s["samples_per_second"], s["omp_wait"]


def bench_loaded():
    """Per case: ours quiet, then ours and PyTorch alternately beside two busy
    processes; best and worst of REPEATS each. PyTorch runs in this process,
    whose OpenMP was started with libgomp's defaults."""
    if any(k in os.environ for k in OMP_VARS):
        log(f"LOADED: note: {', '.join(k for k in OMP_VARS if k in os.environ)} set in the "
            "bench's environment: the PyTorch loop runs with it, ours without")
    rows, wait, cost = [], None, []
    quiet_best = {}
    for name in QUIET_CASES:
        # What the wait default costs where nothing else runs: against
        # libgomp's own spin count, alternating.
        c = CASES[name]
        data = make_data(name, c)
        ours, libgomp = [], []
        for _ in range(REPEATS):
            rate, wait = run_ours_default(name, c, data)
            ours.append(rate)
            libgomp.append(run_ours_default(name, c, data, {"GOMP_SPINCOUNT": LIBGOMP_SPINCOUNT})[0])
        log(f"LOADED quiet {name}: ours {max(ours):.0f}/s, with libgomp's wait {max(libgomp):.0f}/s")
        cost.append((name, max(ours), max(libgomp)))
        quiet_best[name] = max(ours)
    for name in LOADED_CASES:
        c = CASES[name]
        data = make_data(name, c)
        busy = busy_processes(2)
        try:
            time.sleep(0.5)
            ours, theirs = [], []
            for r in range(REPEATS):
                ours.append(run_ours_default(name, c, data)[0])
                theirs.append(run_torch(c, data))
                log(f"LOADED {name} round {r + 1}: ours {ours[-1]:.0f}/s, PyTorch {theirs[-1]:.0f}/s")
        finally:
            for p in busy:
                p.kill()
                p.wait()
        rows.append((name, quiet_best[name], max(ours), min(ours), max(theirs), min(theirs)))
    return rows, wait, cost


def loaded_lines(res):
    rows, wait, cost = res
    lines = ["Loaded machine (LOADED): S, M and T beside two busy processes (Python spin loops, "
             "started and stopped by the bench), both loops with their defaults: ours "
             f"`train.threads: auto` ({THREADS} threads here), OpenMP wait: {wait}; PyTorch "
             f"{THREADS} threads, libgomp's wait. Best (worst) of {REPEATS} alternating runs; "
             "quiet: ours on the same machine without the load, in the same run.",
             "",
             "| case | ours quiet samples/s | ours loaded | PyTorch loaded | ours / PyTorch loaded "
             f"(aim >= {LOADED_AIM_RATIO:.0f}x) | ours quiet / loaded (aim <= {LOADED_AIM_SLOWDOWN:.0f}x) |",
             "|---|---|---|---|---|---|"]
    for name, quiet, o, o_min, t, t_min in rows:
        ratio, slow = o / t, quiet / o
        met = lambda ok: "" if ok else " (missed)"
        lines.append(f"| {name} | {quiet:,.0f} | {o:,.0f} ({o_min:,.0f}) | {t:,.0f} ({t_min:,.0f}) | "
                     f"{ratio:.2f}x{met(ratio >= LOADED_AIM_RATIO)} | "
                     f"{slow:.2f}x{met(slow <= LOADED_AIM_SLOWDOWN)} |")
    lines += ["", "Quiet cost of that wait default: ours as shipped against ours with libgomp's own "
              f"(GOMP_SPINCOUNT={LIBGOMP_SPINCOUNT}), nothing else running, best of {REPEATS} "
              "alternating: " + ", ".join(f"{n} {o / g:.2f}x ({o:,.0f} vs {g:,.0f}/s)" for n, o, g in cost)
              + " (aim: no more than a few percent below 1.00x)."]
    return lines


def bench_dp():
    """M as 2 ranks x 1 thread (torchrun, Gloo, one machine) against one
    process x 2 threads, alternating; best of each. The DP runs as shipped
    (gradient buckets overlapping backward) and with `dist.bucket_mb: 0`
    (one allreduce after backward). Returns (single, dp, collective share of
    the best DP run, dp with bucket_mb 0)."""
    c = CASES["M"]
    data = make_data("M", c)
    single_cfg = config("M", c, data)
    dp_cfg = config("DP", c, data, threads=1)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run = os.path.join(OUT, "run-DP")
    def run_dp(*more):
        subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "--no-python",
                        SAE, "train", "-q", "--config", dp_cfg, "--out", run, "--force", *more],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.load(open(os.path.join(run, "summary.json")))

    single, dp, share, dp0 = 0.0, 0.0, 0.0, 0.0
    for r in range(REPEATS):
        single = max(single, run_ours("M", single_cfg))
        s = run_dp()
        rate = s["samples_per_second"]
        if rate > dp:
            dp, share = rate, s["collective_seconds"] / s["seconds"]
        rate0 = run_dp("--set", "dist.bucket_mb=0")["samples_per_second"]
        dp0 = max(dp0, rate0)
        log(f"DP round {r + 1}: 1 x {THREADS} threads {single:.0f}/s, 2 ranks x 1 thread {rate:.0f}/s "
            f"({s['overlapped_buckets']} buckets overlapped backward; collectives waited "
            f"{s['collective_seconds'] / s['seconds']:.0%} of the loop), "
            f"one allreduce after backward (bucket_mb 0) {rate0:.0f}/s")
    return single, dp, share, dp0


def matmul_peak():
    a, w = torch.randn(1024, 768), torch.randn(768, 8192)
    for _ in range(3):
        a @ w
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ w
        best = max(best, 5 * 2 * 1024 * 768 * 8192 / (time.perf_counter() - t0))
    return best / 1e9


def bench_encode():
    rows = 200_000 if QUICK else 1_000_000
    data = os.path.join(OUT, f"E-{rows}.npy")
    if not os.path.exists(data):
        log(f"E: writing {rows} x 768 float32 ({rows * 768 * 4 / 1e9:.1f} GB)")
        arr = np.lib.format.open_memmap(data, mode="w+", dtype=np.float32, shape=(rows, 768))
        rng = np.random.default_rng(0)
        for s in range(0, rows, 100_000):
            arr[s:s + 100_000] = rng.standard_normal((min(100_000, rows - s), 768), dtype=np.float32)
        arr.flush()
        del arr
    small = os.path.join(OUT, "E-train.npy")
    np.save(small, np.random.default_rng(1).standard_normal((2048, 768)).astype(np.float32))
    cfg = os.path.join(OUT, "E.yaml")
    json.dump({"device": "cpu", "data": {"train": small}, "model": {"d_hidden": 1024},
               "train": {"epochs": 1, "batch_size": 1024}}, open(cfg, "w"))
    run = os.path.join(OUT, "run-E")
    subprocess.run([SAE, "train", "-q", "--config", cfg, "--out", run, "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    out = os.path.join(OUT, "E-codes.npy")
    t0 = time.perf_counter()
    subprocess.run([SAE, "encode", "--model", run, "--data", data, "--out", out], check=True)
    dt = time.perf_counter() - t0
    os.remove(out)
    io = io_only_seconds(data, out, rows * 1024 * 4)
    log(f"E: encode {dt:.1f} s; the same reads and writes alone {io:.1f} s")
    return rows, rows / dt, 2 * 768 * 1024 * rows / dt / 1e9, rows / io


def io_only_seconds(src, dst, out_bytes, chunk=64 << 20):
    """Seconds to do E's I/O without its computing: read `src` and write
    `out_bytes` to `dst` (then fsync, as `sae encode` does before its
    rename), in 64 MiB pieces from one thread: what the disk and page cache
    allow at best."""
    buf = bytes(chunk)
    t0 = time.perf_counter()
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
        left = out_bytes
        while True:
            piece = f.read(chunk)
            if left > 0:
                g.write(buf[:min(chunk, left)])
                left -= chunk
            if not piece and left <= 0:
                break
        os.fsync(g.fileno())
    dt = time.perf_counter() - t0
    os.remove(dst)
    return dt


def bench_omp():
    """Seconds of `sae encode` with the model's encoder and with OMP (k = 32),
    alternating (two rounds with --quick, one otherwise: OMP takes minutes),
    best of each; rows, and OMP's codes L0."""
    rows = 20_000 if QUICK else 100_000
    data = os.path.join(OUT, f"OMP-{rows}.npy")
    if not os.path.exists(data):
        np.save(data, np.random.default_rng(2).standard_normal((rows, 768), dtype=np.float32))
    train = os.path.join(OUT, "OMP-train.npy")
    np.save(train, np.random.default_rng(3).standard_normal((4096, 768)).astype(np.float32))
    cfg = os.path.join(OUT, "OMP.yaml")
    json.dump({"device": "cpu", "data": {"train": train},
               "model": {"d_hidden": 8192, "activation": "topk", "k": 32},
               "sparsity": {"penalty": "none"}, "train": {"epochs": 1, "batch_size": 1024}},
              open(cfg, "w"))
    run = os.path.join(OUT, "run-OMP")
    subprocess.run([SAE, "train", "-q", "--config", cfg, "--out", run, "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    out = os.path.join(OUT, "OMP-codes.npy")
    best = {"model": float("inf"), "omp": float("inf")}
    for r in range(2 if QUICK else 1):
        for enc in ("model", "omp"):
            extra = ["--encoder", "omp", "--k", "32"] if enc == "omp" else []
            t0 = time.perf_counter()
            subprocess.run([SAE, "encode", "--model", run, "--data", data, "--out", out] + extra,
                           check=True)
            best[enc] = min(best[enc], time.perf_counter() - t0)
            log(f"OMP round {r + 1}: {enc} encoder {best[enc]:.1f} s")
    z = np.load(out, mmap_mode="r")
    l0 = float((np.asarray(z[:1000]) != 0).sum(1).mean())
    os.remove(out)
    return rows, best["model"], best["omp"], l0


def run_capped(cmd, cap_bytes):
    """Runs cmd inside a cgroup-v1 memory cap; returns (returncode, peak bytes)
    or None when no cgroup can be made here."""
    base = "/sys/fs/cgroup/memory"
    cg = os.path.join(base, f"sae-bench-{os.getpid()}")
    try:
        os.makedirs(cg, exist_ok=True)
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
            f.write(str(cap_bytes))
    except OSError as e:
        log(f"out-of-core: no cgroup memory cap possible here ({e}); skipped")
        return None
    try:
        # The child joins the cgroup before exec, so only it is capped.
        def enter():
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        r = subprocess.run(cmd, preexec_fn=enter, stdout=subprocess.DEVNULL)
        peak = int(open(os.path.join(cg, "memory.max_usage_in_bytes")).read())
        return r.returncode, peak
    finally:
        try:
            os.rmdir(cg)
        except OSError:
            pass


def bench_out_of_core(data, rows):
    """The E data file (rows x 768 float32) trained from memory (uncapped) and
    streamed from a memory map under a cap of half the file size."""
    size = os.path.getsize(data)
    cap = size // 2
    cfg = os.path.join(OUT, "OOC.yaml")
    json.dump({"device": "cpu", "seed": 0, "data": {"train": data},
               "model": {"d_hidden": 256, "init_scheme": "sae"},
               "sparsity": {"penalty": "l1", "weight": 0.001},
               "train": {"epochs": 1, "batch_size": 4096, "log_every": 100000, "threads": THREADS}},
              open(cfg, "w"))
    rates = {"memory": 0.0, "stream": 0.0, "peak": 0}
    # Alternating rounds, best of each (as for S, M, T): single runs vary by
    # several percent on this machine.
    for _ in range(REPEATS):
        for mode in ("memory", "stream"):
            # Cold page cache for both (root only; otherwise the file may be cached).
            subprocess.run(["sync"])
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3")
                rates["cold"] = True
            except OSError:
                rates["cold"] = False
            run = os.path.join(OUT, f"run-OOC-{mode}")
            cmd = [SAE, "train", "-q", "--config", cfg, "--out", run, "--force",
                   "--set", f"data.stream={'true' if mode == 'stream' else 'false'}"]
            if mode == "stream":
                res = run_capped(cmd, cap)
                if res is None:
                    return None
                rc, peak = res
                if rc != 0:
                    return {"size": size, "cap": cap, "rc": rc}
                rates["peak"] = max(rates["peak"], peak)
            else:
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rate = json.load(open(os.path.join(run, "summary.json")))["samples_per_second"]
            log(f"OOC {mode}: {rate:,.0f} samples/s")
            rates[mode] = max(rates[mode], rate)
    return {"size": size, "cap": cap, "rc": 0, **rates}


# MEM (issue 16): training and evaluation memory against the state size.
MEM_SIZES = [4096, 16384] if QUICK else [4096, 16384, 65536, 131072]
MEM_ROWS, MEM_D_IN, MEM_K = 8192, 768, 32


# Runs argv[2:] with stdout discarded, from a fresh small interpreter, and
# writes the child's ru_maxrss (KiB) to argv[1]; exits with its exit code.
PEAK_WRAPPER = """
import os, sys
null = os.open(os.devnull, os.O_WRONLY)
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, null, 1)])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_peak(cmd):
    """Runs cmd (stdout discarded); returns (its peak RSS in bytes, wall
    seconds, the time.time() it ended). The peak is wait4's ru_maxrss for
    this one child, taken by a small wrapper interpreter: a child spawned
    straight from this process would count this process's own memory (often
    GBs by now) in its ru_maxrss, which includes the memory before exec."""
    t0 = time.perf_counter()
    peak_file = os.path.join(OUT, "peak.txt")
    r = subprocess.run([sys.executable, "-S", "-c", PEAK_WRAPPER, peak_file] + cmd)
    wall, ended = time.perf_counter() - t0, time.time()
    if r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, cmd)
    return int(open(peak_file).read()) * 1024, wall, ended


def bench_mem():
    """For each MEM_SIZES d_hidden: `sae train` (THREADS threads) then `sae
    eval` of the run on its training rows. Returns [dict(h, state, train,
    eval, loop, end, wall)]: bytes, and seconds of the training loop
    (summary.json `seconds`), of the end of the run (from the last step's
    metrics.jsonl write, at the end of the one epoch, to the exit:
    checkpoint, evaluation, model files, plots, report) and of the whole
    command."""
    out = []
    for h in MEM_SIZES:
        c = dict(d_in=MEM_D_IN, d_hidden=h, batch=1024, rows=MEM_ROWS, epochs=1, kind="topk", k=MEM_K)
        data = make_data("MEM", c)
        cfg = config(f"MEM-{h}", c, data)
        run = os.path.join(OUT, f"run-MEM-{h}")
        train_peak, wall, ended = run_peak([SAE, "train", "-q", "--config", cfg, "--out", run, "--force"])
        loop = json.load(open(os.path.join(run, "summary.json")))["seconds"]
        end = ended - os.path.getmtime(os.path.join(run, "metrics.jsonl"))
        eval_peak, _, _ = run_peak([SAE, "eval", "--model", run, "--data", data])
        # Parameters W_enc, W_dec, b_enc, b_dec (float32); with gradients and
        # Adam's two moments, four times their bytes.
        state = 4 * 4 * (2 * MEM_D_IN * h + h + MEM_D_IN)
        r = dict(h=h, state=state, train=train_peak, eval=eval_peak, loop=loop, end=end, wall=wall)
        log(f"MEM {h}: state {state / 1e9:.2f} GB, train peak {train_peak / 1e9:.2f} GB, "
            f"eval peak {eval_peak / 1e9:.2f} GB (aim {mem_aim(state) / 1e9:.2f} GB); "
            f"loop {loop:.1f} s, end of run {end:.1f} s, whole command {wall:.1f} s")
        out.append(r)
    return out


def mem_aim(state):
    """Issue 16's memory aim: peak RSS at most 1.5 x state + 1 GB."""
    return 1.5 * state + 1e9


def bench_topk():
    """Top-k selection (k = MEM_K) on CPU over [1024, h] float32
    pre-activations against the [1024, 768] x [768, h] encoder matmul that
    produces them, THREADS threads, best of 5, at 65,536 and 131,072 latents
    (also with --quick: a second each): [(h, matmul s, topk s)]."""
    out = []
    for h in (65536, 131072):
        x, w = torch.randn(1024, MEM_D_IN), torch.randn(MEM_D_IN, h)
        pre = x @ w
        best = {"mm": float("inf"), "topk": float("inf")}
        for _ in range(5):
            for name, f in (("mm", lambda: x @ w), ("topk", lambda: pre.topk(MEM_K, dim=-1))):
                t0 = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t0)
        log(f"MEM top-k over {h} latents: matmul {best['mm'] * 1e3:.1f} ms, "
            f"topk({MEM_K}) {best['topk'] * 1e3:.1f} ms ({best['topk'] / best['mm']:.2f}x the matmul)")
        out.append((h, best["mm"], best["topk"]))
        del x, w, pre
    return out


def mem_lines(rows, topk):
    """The MEM table and the top-k line for table.md."""
    lines = [f"Memory (issue 16): 768 -> d_hidden top-k k={MEM_K}, batch 1024, {MEM_ROWS:,} rows of "
             f"standard-normal float32, 1 epoch, {THREADS} threads. Peak RSS (wait4 ru_maxrss) of "
             "`sae train` and of `sae eval --model RUN --data DATA`; state = parameters + gradients + "
             "Adam's two moments (4 x parameter bytes); aim: peak <= 1.5 x state + 1 GB. "
             "End of run: from the last step to the exit (checkpoint, evaluation, model files, "
             "plots, report); aim: faster than the one epoch of training.",
             "",
             "| d_hidden | state GB | train peak GB | eval peak GB | aim GB | peak aim | "
             "training loop s | end of run s | end-of-run aim |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        aim = mem_aim(r["state"])
        met = r["train"] <= aim and r["eval"] <= aim
        lines.append(f"| {r['h']:,} | {r['state'] / 1e9:.2f} | {r['train'] / 1e9:.2f} | "
                     f"{r['eval'] / 1e9:.2f} | {aim / 1e9:.2f} | {'met' if met else 'not met'} | "
                     f"{r['loop']:.1f} | {r['end']:.1f} | {'met' if r['end'] < r['loop'] else 'not met'} |")
    for h, mm, tk in topk:
        lines += ["", f"Top-k on CPU over {h:,} latents ([1024, {h}] float32, k={MEM_K}, {THREADS} threads): "
                  f"topk {tk * 1e3:.1f} ms vs the [1024,768] x [768,{h}] encoder matmul {mm * 1e3:.1f} ms "
                  f"({tk / mm:.2f}x)."]
    return lines


# LM: rows made by a language model as training runs (`data.model`). The
# model is scripts/bench_lm.py's GPT-2-shaped slice, random init (only its
# cost matters); --quick takes a smaller one (the same code paths).
LM_SHAPE = (dict(vocab=8192, ctx=128, d_model=256, heads=4, mlp=1024, layers=2, seed=0) if QUICK
            else dict(vocab=8192, ctx=128, d_model=512, heads=8, mlp=2048, layers=4, seed=0))
# Random ids with BOS (0) at position 0, which gives no row: 127 rows a
# sequence. Full: 1,032 x 127 = 131,064 rows, two of training's windows of
# 65,536 rows (src/train/batches.rs STREAM_WINDOW_ROWS): the run's set-up
# computes the first, the training loop the second.
LM_SEQS = 544 if QUICK else 1032
LM_PT2_SEQS = 128 if QUICK else 256
LM_GROUP = 8                   # data.model_batch / --batch-size
LM_WINDOW_ROWS = 16 * 4096     # src/train/batches.rs STREAM_WINDOW_ROWS
LM_SAMPLE_ROWS = 65_536        # src/train/plan.rs MODEL_SAMPLE_ROWS (data.norm_rows: auto)
LM_SAE = dict(d_hidden=4096, k=32, batch=1024, lr=1e-3)
LM_GRID = {"model.k": [16, 32], "train.optimizer.lr": [1e-3, 3e-4]}
# The .pt2 is left out when its compile takes longer than this.
LM_PT2_TIMEOUT = 180


def lm_shape_text():
    s = LM_SHAPE
    return (f"token + position embeddings (vocab {s['vocab']:,}), {s['layers']} pre-LN blocks at d_model "
            f"{s['d_model']}, {s['heads']} heads, MLP {s['mlp']}, ctx {s['ctx']}, random init (seed {s['seed']}), "
            f"the residual stream after block {s['layers']}")


def lm_models():
    """The LM part's model files, made once per generating code (a hash of
    scripts/bench_lm.py, the shape and the torch version names their folder):
    {"pt": path, "pt2": path or None, "pt2_seconds": compile s or None,
    "pt2_note": why there is none}."""
    import hashlib
    import signal
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_lm.py")
    shape = json.dumps(LM_SHAPE, sort_keys=True)
    key = hashlib.sha256(open(script, "rb").read() + shape.encode() + torch.__version__.encode()).hexdigest()[:12]
    d = os.path.join(OUT, f"lm-{key}")
    os.makedirs(d, exist_ok=True)
    got = {"pt2_note": None}
    for kind in ("pt", "pt2"):
        path, meta = os.path.join(d, f"lm.{kind}"), os.path.join(d, f"lm.{kind}.json")
        if not os.path.exists(path):
            log(f"LM: exporting lm.{kind} into {d}")
            # Its own process group, so a compile past the limit ends with
            # the compiler processes it started.
            p = subprocess.Popen([sys.executable, script, d, kind, shape], stdout=subprocess.PIPE,
                                 text=True, start_new_session=True)
            try:
                out, _ = p.communicate(timeout=LM_PT2_TIMEOUT if kind == "pt2" else None)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                got["pt2_note"] = f"its compile took longer than {LM_PT2_TIMEOUT} s here"
                log(f"LM: lm.pt2 not compiled: {got['pt2_note']}")
                got["pt2"], got["pt2_seconds"] = None, None
                continue
            if p.returncode != 0:
                if kind == "pt":
                    raise subprocess.CalledProcessError(p.returncode, script)
                got["pt2_note"] = f"its export failed (exit {p.returncode}, above)"
                got["pt2"], got["pt2_seconds"] = None, None
                continue
            with open(meta, "w") as f:
                f.write(out.strip().splitlines()[-1])
        got[kind] = path
        got[f"{kind}_seconds"] = json.load(open(meta))["seconds"]
        log(f"LM: lm.{kind} made in {got[f'{kind}_seconds']:.0f} s ({path})")
    return got


def lm_tokens(n):
    """Random ids [n, ctx] (int64), BOS = 0 at position 0."""
    path = os.path.join(OUT, f"lm-tokens-{n}.npy")
    if not os.path.exists(path):
        t = np.random.default_rng(0).integers(1, LM_SHAPE["vocab"], (n, LM_SHAPE["ctx"]), dtype=np.int64)
        t[:, 0] = 0
        np.save(path, t)
    return path


def lm_config(name, data, **sae):
    """The LM part's SAE config on `data` (data.* keys), as OUT/name.yaml;
    returns (path, the config)."""
    s = dict(LM_SAE, **sae)
    cfg = {"seed": 0, "device": "cpu", "data": data,
           "model": {"d_hidden": s["d_hidden"], "activation": "topk", "k": s["k"], "init_scheme": "sae"},
           "sparsity": {"penalty": "none"},
           "train": {"epochs": 1, "batch_size": s["batch"], "shuffle": True, "log_every": 100000,
                     "threads": THREADS, "optimizer": {"name": "adam", "lr": s["lr"]}}}
    path = os.path.join(OUT, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return path, cfg


def lm_forward(model, tokens):
    """`sae activations` of tokens through model into /dev/shm (dropped
    after), THREADS threads: (rows, the seconds it prints: the model and
    the write, not the loading, whole-command seconds)."""
    import re
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else OUT
    out = os.path.join(shm, f"sae-bench-lm-{os.getpid()}.npy")
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    t0 = time.perf_counter()
    r = subprocess.run([SAE, "activations", "-q", "--model", model, "--tokens", tokens, "--out", out,
                        "--exclude-positions", "0", "--batch-size", str(LM_GROUP), "--device", "cpu"],
                       check=True, stdout=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    os.remove(out)
    m = re.search(r"^(\d+) rows x \d+ from \d+ sequences in ([\d.]+) s", r.stdout, re.M)
    if not m:
        raise RuntimeError(f"sae activations printed no rate: {r.stdout!r}")
    return int(m.group(1)), float(m.group(2)), wall


def lm_train(name, cfg, extra=()):
    """One `sae train`: dict(rate: summary samples_per_second, loop: its
    seconds, wall: the whole command, end: from the last step to the exit,
    setup: the rest (start, data, the first window))."""
    run = os.path.join(OUT, f"run-{name}")
    t0 = time.perf_counter()
    subprocess.run([SAE, "train", "-q", "--config", cfg, "--out", run, "--force", *extra],
                   check=True, stdout=subprocess.DEVNULL)
    wall, ended = time.perf_counter() - t0, time.time()
    s = json.load(open(os.path.join(run, "summary.json")))
    end = ended - os.path.getmtime(os.path.join(run, "metrics.jsonl"))
    return dict(rate=s["samples_per_second"], loop=s["seconds"], wall=wall, end=end,
                setup=wall - s["seconds"] - end, samples=round(s["samples_per_second"] * s["seconds"]))


def bench_lm():
    """The LM part: the model forward alone, the SAE step alone (on the
    dumped rows, in memory) and training from the model, alternating
    REPEATS rounds (best of each); a 4-point sweep on one model pass against
    4 separate runs (once); the forward of .pt2 against .pt (alternating)."""
    import itertools
    import re
    import shutil
    models = lm_models()
    tokens = lm_tokens(LM_SEQS)
    data = {"model": models["pt"], "tokens": tokens, "exclude_positions": [0], "model_batch": LM_GROUP}
    model_cfg, model_dict = lm_config("LM-model", data)
    # The rows training sees, once (also a warm-up of the files).
    acts = os.path.join(OUT, "lm-acts.npy")
    subprocess.run([SAE, "activations", "-q", "--config", model_cfg, "--out", acts],
                   check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)})
    rows = int(np.load(acts, mmap_mode="r").shape[0])
    step_cfg, _ = lm_config("LM-step", {"train": acts})
    res = {"rows": rows, "seqs": LM_SEQS, "models": models}
    best = {"fwd": None, "step": None, "model": None}
    for r in range(REPEATS):
        n, secs, wall = lm_forward(models["pt"], tokens)
        assert n == rows, (n, rows)
        if best["fwd"] is None or n / secs > best["fwd"]["rate"]:
            best["fwd"] = dict(rate=n / secs, seconds=secs, wall=wall)
        seen = {}
        for side, cfg in (("step", step_cfg), ("model", model_cfg)):
            seen[side] = t = lm_train(f"LM-{side}", cfg)
            if best[side] is None or t["rate"] > best[side]["rate"]:
                best[side] = t
        log(f"LM round {r + 1}: forward {n / secs:,.0f} rows/s, step {seen['step']['rate']:,.0f}/s, from the "
            f"model {seen['model']['rate']:,.0f}/s (loop {seen['model']['loop']:.1f} s, whole command "
            f"{seen['model']['wall']:.1f} s)")
    res.update(best)
    # Sweep of 4 points on one model pass against the 4 points as separate runs.
    sweep_dir = os.path.join(OUT, "sweep-LM")
    shutil.rmtree(sweep_dir, ignore_errors=True)
    sweep_cfg = os.path.join(OUT, "LM-sweep.yaml")
    with open(sweep_cfg, "w") as f:
        json.dump({"base": model_dict, "grid": LM_GRID}, f)
    t0 = time.perf_counter()
    r = subprocess.run([SAE, "sweep", "--config", sweep_cfg, "--out", sweep_dir, "--jobs", "1"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sweep_wall = time.perf_counter() - t0
    m = re.search(r"the model ran on (\d+) sequences for (\d+) point\(s\) in ([\d.]+) s", r.stderr)
    if not m:
        raise RuntimeError(f"sae sweep did not say how many sequences the model ran on:\n{r.stderr}")
    points = [dict(zip(LM_GRID, v)) for v in itertools.product(*LM_GRID.values())]
    separate = 0.0
    for i, p in enumerate(points):
        t = lm_train(f"LM-point{i}", model_cfg, [a for k, v in p.items() for a in ("--set", f"{k}={v}")])
        separate += t["wall"]
    res["sweep"] = dict(wall=sweep_wall, trained=float(m.group(3)), sequences=int(m.group(1)),
                        points=int(m.group(2)), separate=separate)
    log(f"LM sweep: {len(points)} points on one model pass {sweep_wall:.1f} s (the model ran on "
        f"{m.group(1)} sequences; trained in {m.group(3)} s), as separate runs {separate:.1f} s")
    # .pt2 against .pt: the forward alone on fewer sequences.
    if models["pt2"]:
        few = lm_tokens(LM_PT2_SEQS)
        rates = {"pt": 0.0, "pt2": 0.0}
        for r in range(REPEATS):
            for kind in ("pt", "pt2"):
                n, secs, _ = lm_forward(models[kind], few)
                rates[kind] = max(rates[kind], n / secs)
            log(f"LM .pt2 round {r + 1}: .pt {rates['pt']:,.0f} rows/s, .pt2 {rates['pt2']:,.0f} rows/s (best so far)")
        res["pt2"] = rates
    with open(os.path.join(OUT, "LM.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def lm_sample_sequences(rows, per_seq):
    """Sequences the model runs on for a run's `data.norm_rows` sample (auto:
    the first LM_SAMPLE_ROWS rows), in whole groups of LM_GROUP
    (src/lm/source.rs `head`, `rows_of`)."""
    seqs = (min(rows, LM_SAMPLE_ROWS) - 1) // per_seq + 1
    return min(-(-seqs // LM_GROUP) * LM_GROUP, LM_SEQS)


def lm_within(x):
    return "yes" if 0.9 <= x <= 1.1 else ("no: overhead beyond the sum" if x < 0.9 else "no: below the sum")


def lm_lines(res):
    """The LM section of table.md."""
    rows, seqs = res["rows"], res["seqs"]
    fwd, step, model, sw = res["fwd"], res["step"], res["model"], res["sweep"]
    per_seq = rows // seqs
    # The aim as the summary counts it: the from-model loop against the sum.
    aim = (1 / fwd["rate"] + 1 / step["rate"]) / (1 / model["rate"])
    # The loop's clock starts after the set-up, which computed the first window.
    w1 = min(rows, LM_WINDOW_ROWS)
    in_loop = (rows / step["rate"] + (rows - w1) / fwd["rate"]) / model["loop"]
    # The whole command: every sequence the model ran on (the windows, which
    # the sweep counts, and the norm_rows sample), every step.
    sample = lm_sample_sequences(rows, per_seq)
    ran = sw["sequences"] + sample
    work = ran * per_seq / fwd["rate"] + rows / step["rate"]
    body = model["wall"] - model["end"]
    dump_then_train = fwd["wall"] + step["wall"]
    grid = " x ".join(f"{k} {v}" for k, v in LM_GRID.items())
    lines = [f"Training from a language model (`data.model`): {lm_shape_text()}, as a TorchScript trace. "
             f"{seqs:,} sequences of random ids with BOS at position 0, which gives no row "
             f"(`data.exclude_positions: [0]`): {rows:,} rows; `data.model_batch` {LM_GROUP}. SAE "
             f"{LM_SHAPE['d_model']} -> {LM_SAE['d_hidden']} top-k k={LM_SAE['k']}, batch {LM_SAE['batch']}, "
             f"1 epoch, lr {LM_SAE['lr']:g}. {THREADS} threads everywhere; the three measurements alternate, "
             f"best of {REPEATS} rounds each.",
             "",
             "| measurement | rows/s | seconds | whole command s |",
             "|---|---|---|---|",
             f"| model forward alone (`sae activations` to /dev/shm: the rate it prints, forward and write) "
             f"| {fwd['rate']:,.0f} | {fwd['seconds']:.1f} | {fwd['wall']:.1f} |",
             f"| SAE step alone (`sae train` on those rows in memory: summary.json, training loop) "
             f"| {step['rate']:,.0f} | {step['loop']:.1f} | {step['wall']:.1f} |",
             f"| from the model (`sae train` with `data.model`: summary.json, training loop) "
             f"| {model['rate']:,.0f} | {model['loop']:.1f} | {model['wall']:.1f} |",
             "",
             f"Aim, from the model ≈ forward + step within 10 %: (1/r_fwd + 1/r_step) / (1/r_model) = "
             f"{aim:.2f} as summary.json counts the loop, but the loop's clock starts after the set-up has "
             f"run the model on the first window ({w1:,} of the {rows:,} rows). Counting only the forward "
             f"done inside the loop, ({rows:,} / r_step + {rows - w1:,} / r_fwd) / loop = **{in_loop:.2f}** "
             f"(1.0 = exactly the sum, < 0.9 = overhead beyond it): within 10 %: {lm_within(in_loop)}.",
             "",
             f"The whole from-model command, {model['wall']:.1f} s: set-up {model['setup']:.1f} s (start; "
             f"the model on the first {min(rows, LM_SAMPLE_ROWS):,} rows, {sample:,} sequences, for the "
             f"`data.norm_rows` sample; then on the first window), loop {model['loop']:.1f} s, end of run "
             f"{model['end']:.1f} s. The model ran on {ran:,} sequences for the corpus's {seqs:,} "
             f"({ran / seqs:.2f}x): {sw['sequences']:,} for the windows (the sweep's count below, the same "
             f"windows; a group of {LM_GROUP} sequences that two windows share runs in both) and {sample:,} "
             f"for the sample. That forward and every step take {work:.1f} s at the rates "
             f"above, against the command less its end of run, {body:.1f} s: {work / body:.2f}. Dumping the "
             f"rows and then training on the dump (whole commands) takes {fwd['wall']:.1f} + "
             f"{step['wall']:.1f} = {dump_then_train:.1f} s, against {model['wall']:.1f} s from the model "
             f"({dump_then_train / model['wall']:.2f}x).",
             "",
             f"Sweep of {sw['points']} points ({grid}) from the model, `sae sweep --jobs 1`: "
             f"{sw['wall']:.1f} s whole command (the points train together: the model ran on "
             f"{sw['sequences']:,} sequences for their windows, and on the sample once before; "
             f"{sw['trained']:.1f} s from the first point's set-up to the last one's end) against the {sw['points']} points as separate `sae train` "
             f"runs, {sw['separate']:.1f} s: **{sw['separate'] / sw['wall']:.2f}x** (one round)."]
    m = res["models"]
    if res.get("pt2"):
        p = res["pt2"]
        lines += ["", f"Model forward alone, the AOTInductor `.pt2` (`torch.export` with a dynamic batch, then "
                  f"`aoti_compile_and_package`: {m['pt2_seconds']:.0f} s to compile here) against the "
                  f"TorchScript `.pt`, {LM_PT2_SEQS} sequences, batch {LM_GROUP}: {p['pt2']:,.0f} vs "
                  f"{p['pt']:,.0f} rows/s: **{p['pt2'] / p['pt']:.2f}x**."]
    else:
        lines += ["", f"`.pt2`: not measured ({m['pt2_note']})."]
    return lines


def main():
    # The peak is re-measured around every case and the best kept, so a
    # momentarily busy machine does not understate it.
    peaks = [matmul_peak()]
    log(f"torch matmul peak (1024x768 @ 768x8192, {THREADS} threads): {peaks[0]:.1f} GFLOP/s")
    rows = []
    for name, c in CASES.items():
        if ONLY is not None and name not in ONLY:
            continue
        peaks.append(matmul_peak())
        data = make_data(name, c)
        cfg = config(name, c, data)
        ours, theirs = [], []
        for r in range(REPEATS):
            ours.append(run_ours(name, cfg))
            theirs.append(run_torch(c, data))
            log(f"{name} round {r + 1}: ours {ours[-1]:.0f}/s, PyTorch {theirs[-1]:.0f}/s")
        o, t = max(ours), max(theirs)
        rows.append((name, o, t, o / t, o * flops_per_sample(c) / 1e9))
        if c.get("trained"):
            L0_SEEN["ours"] = ours_l0(name)
    peaks.append(matmul_peak())
    peak = max(peaks)
    if ONLY is not None:
        # No table from a partial run: drop an old one so it is not reported again.
        if os.path.exists(os.path.join(OUT, "table.md")):
            os.remove(os.path.join(OUT, "table.md"))
        for name, o, t, ratio, gf in rows:
            log(f"{name}: ours {o:,.0f}/s, PyTorch {t:,.0f}/s, {ratio:.2f}x, {gf:.1f} GFLOP/s of {peak:.1f}")
        if "DP" in ONLY:
            single, dp, share, dp0 = bench_dp()
            log(f"DP: 2 ranks x 1 thread {dp:,.0f}/s vs 1 process x {THREADS} threads {single:,.0f}/s: "
                f"{dp / single:.2f}x; collectives waited {share:.0%} of rank 0's loop; "
                f"one allreduce after backward (bucket_mb 0) {dp0:,.0f}/s: {dp0 / single:.2f}x")
        if "OMP" in ONLY:
            o_rows, o_model, o_omp, o_l0 = bench_omp()
            log(f"OMP: {o_rows:,} rows, model encoder {o_model:.1f} s, OMP k=32 {o_omp:.1f} s "
                f"(L0 {o_l0:.1f}): {o_omp / o_model:.1f}x")
        if "MT" in ONLY:
            log(l0_line())
        if "SWITCH" in ONLY:
            for line in switch_lines(bench_switch()):
                log(line)
        if "SAELENS" in ONLY:
            sl = bench_saelens()
            if sl is None:
                log(saelens_lines(sl)[0])
            for name, o, t in sl or []:
                log(f"SAELENS {name}: ours {o:,.0f}/s, SAELens {t:,.0f}/s, {o / t:.2f}x "
                    f"(aim: {SAELENS_AIMS[name] or 'none'})")
            if sl:
                log(l0_line())
        if ONLY & {"E", "OOC"}:
            e_rows, e_rate, e_gf, e_io = bench_encode() if "E" in ONLY else (1_000_000, 0, 0, 0)
            if "E" in ONLY:
                log(f"E: {e_rate:,.0f} rows/s, {e_gf:.1f} GFLOP/s; I/O alone {e_io:,.0f} rows/s")
            if "OOC" in ONLY:
                ooc = bench_out_of_core(os.path.join(OUT, f"E-{e_rows}.npy"), e_rows)
                log(f"OOC: {ooc}")
                if ooc and ooc.get("rc") == 0:
                    log(f"OOC: stream/memory = {ooc['stream'] / ooc['memory']:.0%}")
        if "MEM" in ONLY:
            for line in mem_lines(bench_mem(), bench_topk()):
                log(line)
        if "LOADED" in ONLY:
            for line in loaded_lines(bench_loaded()):
                log(line)
        if "LM" in ONLY:
            for line in lm_lines(bench_lm()):
                log(line)
        return
    e_rows, e_rate, e_gf, e_io = bench_encode()
    # --quick: the 0.6 GB file's half is below what the process itself needs
    # (libtorch alone is ~0.3 GB), so a capped run would only be killed.
    ooc = "quick" if QUICK else bench_out_of_core(os.path.join(OUT, f"E-{e_rows}.npy"), e_rows)
    dp_single, dp_rate, dp_share, dp_after = bench_dp()
    o_rows, o_model, o_omp, o_l0 = bench_omp()
    switch = bench_switch()
    sl = bench_saelens()
    if sl is None:
        log(saelens_lines(sl)[0])
    mem, topk = bench_mem(), bench_topk()
    loaded = bench_loaded()
    lm = bench_lm()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except Exception:
        pass
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} cores, {THREADS} threads for both sides; "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.",
        f"torch matmul peak (1024x768 @ 768x8192): best {peak:.1f} GFLOP/s of {len(peaks)} measurements "
        f"around the cases (min {min(peaks):.1f}).",
        "",
        "| case | ours samples/s | PyTorch samples/s | ratio | our matmul GFLOP/s | peak GFLOP/s | fraction of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, o, t, ratio, gf in rows:
        lines.append(f"| {name} | {o:,.0f} | {t:,.0f} | {ratio:.2f}x | {gf:.1f} | {peak:.1f} | {gf / peak:.0%} |")
    lines.append(f"| E (encode {e_rows:,} x 768 -> 1024) | {e_rate:,.0f} rows/s | | | {e_gf:.1f} | {peak:.1f} | {e_gf / peak:.0%} |")
    e_bound = 2 * 768 * 1024 * e_io / 1e9
    lines += ["", f"E's reads and writes alone (the input read and {e_rows * 1024 * 4 / 1e9:.1f} GB written and "
              f"fsynced, no computing) run at {e_io:,.0f} rows/s here, i.e. at most {e_bound / peak:.0%} of "
              f"the matmul peak's rate; encode reaches {e_rate / e_io:.0%} of that I/O-only rate."]
    if ooc == "quick":
        lines += ["", "Out-of-core: not run with --quick (half of its 0.6 GB file is less than the "
                  "process's own footprint)."]
    elif ooc is None:
        lines += ["", "Out-of-core: skipped (no cgroup memory cap available on this machine)."]
    elif ooc["rc"] != 0:
        lines += ["", f"Out-of-core: FAILED (exit {ooc['rc']}) streaming a {ooc['size'] / 2**30:.2f} GiB file "
                  f"under a {ooc['cap'] / 2**30:.2f} GiB cap."]
    else:
        lines += ["", f"Out-of-core (768 -> 256 ReLU+L1, batch 4096, 1 epoch over {e_rows:,} rows): "
                  f"a {ooc['size'] / 2**30:.2f} GiB file streamed (`data.stream: true`) under a "
                  f"{ooc['cap'] / 2**30:.2f} GiB cgroup memory cap (peak {ooc['peak'] / 2**30:.2f} GiB) trains at "
                  f"{ooc['stream']:,.0f} samples/s vs {ooc['memory']:,.0f} in memory uncapped: "
                  f"{ooc['stream'] / ooc['memory']:.0%}"
                  f"{' (page cache dropped before each run)' if ooc['cold'] else ' (page cache not dropped: no root)'}."]
    lines += ["", f"Data-parallel (M, 768 -> 8192 ReLU+L1, global batch 1024): 2 ranks x 1 thread under "
              f"torchrun (Gloo, this machine) {dp_rate:,.0f} samples/s vs 1 process x {THREADS} threads "
              f"{dp_single:,.0f}: {dp_rate / dp_single:.2f}x, the gradient allreduce in 25 MiB buckets "
              f"overlapping backward (`dist.bucket_mb`); waiting for it (the other rank included) takes "
              f"{dp_share:.0%} of rank 0's training loop. With one allreduce of the 50 MB of gradients after "
              f"backward (`dist.bucket_mb: 0`): {dp_after:,.0f} samples/s, {dp_after / dp_single:.2f}x."]
    lines += ["", f"OMP (`sae encode --encoder omp --k 32`, {o_rows:,} x 768 rows, 8192 atoms of a 768 -> 8192 "
              f"top-k model, codes written as .npy): {o_omp:.1f} s vs the model's own encoder {o_model:.1f} s: "
              f"{o_omp / o_model:.1f}x (aim: at most 10x); mean L0 of the OMP codes {o_l0:.1f}."]
    lines += [""] + saelens_lines(sl)
    lines += ["", l0_line()]
    lines += [""] + switch_lines(switch)
    lines += [""] + mem_lines(mem, topk)
    lines += [""] + loaded_lines(loaded)
    lines += [""] + lm_lines(lm)
    lines += ["", "GFLOP/s counts the dense maths (12 * d_in * d_hidden per training sample; 10 for S),",
              "also where our path does less work, so there it is an effective rate: T and MT (the sparse",
              "step: the firing codes' rows and columns instead of five of the six dense matmuls) and M (b_dec's gradient as a vector",
              "product instead of the input-gradient matmul: 10 * d_in * d_hidden really done, so the",
              "matmuls run at 10/12 of the rate shown). Out-of-core: timing starts once the first",
              "window (streamed) or the whole file (in memory) is loaded.",
              "Ours runs with its allocator tuning (glibc mallopt: large buffers reused, not re-mmapped);",
              "PyTorch with the default allocator, as a user's script runs."]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
