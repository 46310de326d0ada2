"""Reference trainer for the modern SAE recipes (issue 8), in plain PyTorch,
written from SAELens 6.x (saes/topk_sae.py, saes/batchtopk_sae.py,
saes/matryoshka_batchtopk_sae.py, saes/jumprelu_sae.py, saes/matching_pursuit_sae.py, training/sae_trainer.py, training/optim.py) and
dictionary_learning (unit-norm decoder). It does not import sae_lens or this
project; the autograd Functions below are SAELens's own, copied.

    sae_in     = x - b_dec                          (apply_b_dec_to_input)
    hidden_pre = sae_in @ W_enc + b_enc
    topk:      feature_acts = scatter(topk(hidden_pre, k)) of relu(values)
    abstopk:   feature_acts = scatter(topk(|hidden_pre|, k).indices) of the signed
               hidden_pre there (no ReLU; saes/abstopk_sae.py); AuxK ranks dead
               latents by |hidden_pre| and keeps the signed values
               (calculate_abstopk_aux_acts); a latent fires where its code is not 0
    batchtopk: feature_acts = the k*batch largest of relu(hidden_pre) over the batch;
               topk_threshold <- (1 - lr) topk_threshold + lr min(positive acts)  (float64)
    matryoshka_batchtopk: batchtopk's codes and threshold; levels = the
               --matryoshka-widths, d_sae appended when the last is not it
               (_validate_matryoshka_config); after the loss below, for each
               level but the last, decoded = z[:, prev:w] @ W_dec[prev:w] + decoded
               (decoded starting at b_dec, _iterable_decode) and
               loss = loss + mse(decoded, x), in increasing width
    matching_pursuit: tied, W_dec the only weight (W_enc = W_dec.T, no b_enc);
               feature_acts = _encode_matching_pursuit(x - b_dec, W_dec,
               --residual-threshold, max_iterations=k, stop_on_duplicate_support=True)
               (copied verbatim below), gradients through the pursuit; no penalty
    jumprelu:  threshold.clamp_(min=0) before the pass;
               feature_acts = JumpReLU.apply(hidden_pre, threshold, bandwidth)
    gated:     feature_acts = (pi_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag),
               pi_gate = sae_in @ W_enc + b_gate (saes/gated_sae.py); its penalty is
               mean_batch(sum_j relu(pi_gate_j) ||W_dec[j]||), and it adds the auxiliary
               loss mean over elements of (relu(pi_gate) @ W_dec + b_dec - x)^2
    sae_out    = feature_acts @ W_dec + b_dec
    --rescale-acts-by-decoder-norm (top-k, SAELens TopKTrainingSAE's default):
               hidden_pre = hidden_pre * ||W_dec_j|| before the selection; every
               decode (sae_out, AuxK) takes feature_acts * (1 / ||W_dec_j||)
               (act_times_W_dec); the saved weights fold the norms in
               (_fold_norm_topk: b_enc, W_enc times them, W_dec over them, the
               norms floored at 1e-8 as get_W_dec_norm does)
    mse        = F.mse_loss(sae_out, x)             (mean over elements: this
                                                     project's convention;
                                                     SAELens sums over d_in)
    l0 penalty = mean_batch(sum_j Step.apply(hidden_pre, threshold, bandwidth))
    tanh penalty (jumprelu, Anthropic's; SAELens jumprelu_sparsity_loss_mode "tanh"):
                 mean_batch(sum_j tanh(tanh_scale * feature_acts_j * ||W_dec_j||))
    quadratic_l0 penalty (jumprelu, Gemma Scope 2; SAELens "quadratic" mode):
                 mean_batch(2 / target_l0 * (l0 - target_l0) ** 2), l0 = sum_j Step(...)
    --pre-act-coefficient c: + c * mean_batch(sum_j relu(threshold_j - hidden_pre_j)
                 * dead_j * ||W_dec_j||) (calculate_pre_act_loss), 0 with no dead latent
    --ste-to-input: JumpReLU's and Step's straight-through estimate reaches
                 hidden_pre too (jumprelu_ste_to_input)
    auxk       = dead latents (not fired for more than --dead-window steps)
                 reconstruct the detached residual: mean over elements of
                 (topk_aux(where(dead, hidden_pre, -inf)) @ W_dec - residual)^2
                 times min(n_dead / k_aux, 1), k_aux = d_in // 2
    loss       = mse + coefficient(step) * penalty

--target Y.npy (a transcoder, `data.target`): the loss terms reconstruct Y's rows
    instead of x's (mse, AuxK's residual and k_aux = d_out // 2, Multi-TopK), and the
    encoder reads x itself (sparsify sparse_coder.py encode: `if not self.cfg.transcode:
    x = x - self.b_dec`; SAELens transcoders the same).
--skip-connection (sparsify sparse_coder.py, `skip_connection`): W_skip [d_out, d_in]
    starts at zeros and sae_out = sae_out + x @ W_skip.T after b_dec, x the encoder's
    input (`sae_out += x @ self.W_skip.mT`); AuxK's residual is taken from that sae_out;
    Multi-TopK's reconstruction leaves it out (sparsify decodes the 4k codes alone).
--fused: torch.optim.Adam(fused=True) (`train.optimizer.fused`).
--whiten-eps EPS: train on SAELens's covariance-whitened rows and fold the
    whitening into the saved weights (whitening.py; `data.normalize: whiten`).
--optimizer signum (sparsify trainer.py): ScheduleFreeWrapper(SignSGD(params), momentum)
    (schedulefree 1.4.1 wrap_schedulefree.py and sparsify sign_sgd.py, copied below), in
    train mode while training; the saved weights are its eval mode's (sparsify calls
    optimizer.eval() before saving). The LR schedule drives the base optimizer's lr.
--optimizer muon (sparsify trainer.py, muon.py copied below, its single-process path):
    Muon(params with ndim >= 2, lr, momentum, weight_decay=--muon-weight-decay) and
    torch.optim.Adam(the rest, lr); Muon's LR schedule has no warm-up (sparsify's
    get_linear_schedule_with_warmup(muon, 0, ...)), Adam's has --lr-warmup-steps.
--precision bf16 (`train.precision`): each step's forward pass and loss run under
    torch.autocast('cpu', dtype=torch.bfloat16); backward and the update outside.
--multi-topk (sparsify): loss += mse(decode(topk_acts(hidden_pre, 4k)), x) / 8, after the
    other terms. --k-decay-steps N (sparsify get_current_k): batch i (0-based) uses
    k_i = round(k0 (1 - i/N) + k i/N) while i < N, k0 = min(d_sae, 10 d_in), Python's round.

Recipe options: LR warm-up / cosine / linear decay with torch's schedulers
(SAELens get_lr_scheduler), sparsity-coefficient warm-up (SAELens
CoefficientScheduler), unit-norm decoder rows (remove the gradient component
parallel to each row before the step, renormalise after it), gradient clipping
(torch.nn.utils.clip_grad_norm_), b_dec initialised to the data mean.
"""

import math
import sys
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim.lr_scheduler as lr_scheduler

import common
import whitening as whitening_ref


# --- SAELens saes/jumprelu_sae.py (6.x), verbatim --------------------------

def rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


class Step(torch.autograd.Function):
    @staticmethod
    def forward(x, threshold, bandwidth, ste_to_input):
        return (x > threshold).to(x)

    @staticmethod
    def setup_context(ctx: Any, inputs, output) -> None:
        x, threshold, bandwidth, ste_to_input = inputs
        del output
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input

    @staticmethod
    def backward(ctx: Any, grad_output):
        x, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        ste = (1.0 / bandwidth) * rectangle((x - threshold) / bandwidth) * grad_output
        threshold_grad = torch.sum(-ste, dim=0)
        x_grad = ste if ctx.ste_to_input else None
        return x_grad, threshold_grad, None, None


class JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(x, threshold, bandwidth, ste_to_input):
        return (x * (x > threshold)).to(x)

    @staticmethod
    def setup_context(ctx: Any, inputs, output) -> None:
        x, threshold, bandwidth, ste_to_input = inputs
        del output
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input

    @staticmethod
    def backward(ctx: Any, grad_output):
        x, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        ste = (threshold / bandwidth) * rectangle((x - threshold) / bandwidth) * grad_output
        threshold_grad = torch.sum(-ste, dim=0)
        x_grad = (x > threshold) * grad_output
        if ctx.ste_to_input:
            x_grad = x_grad + ste
        return x_grad, threshold_grad, None, None


# --- SAELens saes/topk_sae.py, batchtopk_sae.py ----------------------------

def topk_acts(x, k):
    topk_values, topk_indices = torch.topk(x, k=k, dim=-1, sorted=False)
    result = torch.zeros_like(x)
    result.scatter_(-1, topk_indices, topk_values.relu())
    return result


def batch_topk_acts(x, k):
    acts = x.relu()
    flat_acts = acts.flatten()
    num_samples = acts.shape[:-1].numel()
    acts_topk_flat = torch.topk(flat_acts, int(k * num_samples), dim=-1)
    return (
        torch.zeros_like(flat_acts)
        .scatter(-1, acts_topk_flat.indices, acts_topk_flat.values)
        .reshape(acts.shape)
    )


def abs_topk_acts(x, k):
    topk_indices = torch.topk(x.abs(), k=k, dim=-1, sorted=False).indices
    result = torch.zeros_like(x)
    result.scatter_(-1, topk_indices, x.gather(-1, topk_indices))
    return result


def calculate_abstopk_aux_acts(k_aux, hidden_pre, dead_neuron_mask):
    auxk_latents = torch.where(dead_neuron_mask[None], hidden_pre.abs(), -torch.inf)
    auxk_topk = auxk_latents.topk(k_aux, sorted=False)
    auxk_acts = torch.zeros_like(hidden_pre)
    auxk_acts.scatter_(-1, auxk_topk.indices, hidden_pre.gather(-1, auxk_topk.indices))
    return auxk_acts


def calculate_topk_aux_acts(k_aux, hidden_pre, dead_neuron_mask):
    auxk_latents = torch.where(dead_neuron_mask[None], hidden_pre, -torch.inf)
    auxk_topk = auxk_latents.topk(k_aux, sorted=False)
    auxk_acts = torch.zeros_like(hidden_pre)
    auxk_acts.scatter_(-1, auxk_topk.indices, auxk_topk.values)
    return auxk_acts


def act_times_W_dec(feature_acts, W_dec, rescale):
    if rescale:
        feature_acts = feature_acts * (1 / W_dec.norm(dim=-1))
    return feature_acts @ W_dec


def topk_aux_loss(sae_in, sae_out, hidden_pre, W_dec, dead_neuron_mask, rescale=False,
                  signed=False):
    """SAELens calculate_topk_aux_loss, without its coefficient, with the
    squared error averaged over elements (this project's mse convention)."""
    if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
        return sae_out.new_tensor(0.0)
    residual = (sae_in - sae_out).detach()
    k_aux = sae_in.shape[-1] // 2
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)
    aux_acts = calculate_abstopk_aux_acts if signed else calculate_topk_aux_acts
    auxk_acts = aux_acts(k_aux, hidden_pre, dead_neuron_mask)
    recons = act_times_W_dec(auxk_acts, W_dec, rescale)
    return (recons - residual).pow(2).mean() * scale


# --- SAELens training/optim.py ---------------------------------------------

def get_lr_scheduler(scheduler_name, optimizer, training_steps, lr, warm_up_steps,
                     decay_steps, lr_end):
    base_scheduler_steps = training_steps - warm_up_steps - decay_steps
    if scheduler_name == "constant":
        main = lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda steps: 1.0)
    elif scheduler_name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=base_scheduler_steps,
                                              eta_min=lr_end)
    elif scheduler_name == "linear":
        # Linear from lr to lr_end over the main phase (not in SAELens).
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=lr_end / lr,
                                     total_iters=base_scheduler_steps)
    else:
        raise ValueError(scheduler_name)
    if scheduler_name == "constant":
        lr_end = lr
    schedulers, milestones = [], []
    if warm_up_steps > 0:
        schedulers.append(lr_scheduler.LinearLR(optimizer, start_factor=1 / warm_up_steps,
                                                end_factor=1.0, total_iters=warm_up_steps - 1))
        milestones.append(warm_up_steps)
    schedulers.append(main)
    if decay_steps > 0:
        schedulers.append(lr_scheduler.LinearLR(optimizer, start_factor=lr_end / lr,
                                                end_factor=0.0, total_iters=decay_steps))
        milestones.append(training_steps - decay_steps)
    return lr_scheduler.SequentialLR(optimizer, schedulers=schedulers, milestones=milestones)


class CoefficientScheduler:
    """Linearly warms up a scalar value from 0.0 to a final value (SAELens)."""

    def __init__(self, warm_up_steps, final_value):
        self.warm_up_steps = warm_up_steps
        self.final_value = final_value
        self.current_step = 0
        self.current_value = 0.0 if warm_up_steps > 0 else final_value

    def step(self):
        if self.current_step < self.warm_up_steps:
            self.current_value = self.final_value * ((self.current_step + 1) / self.warm_up_steps)
        else:
            self.current_value = self.final_value
        self.current_step += 1

    @property
    def value(self):
        return self.current_value


# --- SAELens saes/matching_pursuit_sae.py (6.x), verbatim ------------------

def _encode_matching_pursuit(
    sae_in_centered: torch.Tensor,
    W_dec: torch.Tensor,
    residual_threshold: float,
    max_iterations: int | None,
    stop_on_duplicate_support: bool,
) -> torch.Tensor:
    residual = sae_in_centered.clone()

    stop_on_residual_threshold = residual_threshold > 0

    # Handle multi-dimensional inputs by flattening all but the last dimension
    original_shape = residual.shape
    if residual.ndim > 2:
        residual = residual.reshape(-1, residual.shape[-1])

    batch_size = residual.shape[0]
    d_sae, d_in = W_dec.shape

    if max_iterations is None:
        max_iterations = d_in  # Sensible upper bound

    acts = torch.zeros(batch_size, d_sae, device=W_dec.device, dtype=residual.dtype)
    prev_support = torch.zeros(batch_size, d_sae, dtype=torch.bool, device=W_dec.device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=W_dec.device)

    for _ in range(max_iterations):
        with torch.no_grad():
            indices = (residual @ W_dec.T).relu().max(dim=1, keepdim=True).indices
            indices_flat = indices.squeeze(1)  # [batch_size]

        selected_dec = W_dec[indices_flat]  # [batch_size, d_in]
        values = (residual * selected_dec).sum(dim=-1, keepdim=True).relu()

        active_mask = (~done).unsqueeze(1)
        masked_values = (values * active_mask.to(values.dtype)).to(acts.dtype)

        acts.scatter_add_(1, indices, masked_values)

        residual = residual - masked_values * selected_dec

        if stop_on_duplicate_support or stop_on_residual_threshold:
            with torch.no_grad():
                support = acts != 0
                if stop_on_duplicate_support:
                    done = done | (support == prev_support).all(dim=1)
                    prev_support = support
                if stop_on_residual_threshold:
                    done = done | (residual.norm(dim=-1) < residual_threshold)

                if done.all():
                    break

    if len(original_shape) > 2:
        acts = acts.reshape(*original_shape[:-1], acts.shape[-1])

    return acts


# --- sparsify sign_sgd.py, verbatim ---------------------------------------

class SignSGD(torch.optim.Optimizer):
    """Steepest descent in the L-infty norm. From <https://arxiv.org/abs/1802.04434>"""

    def __init__(self, params, lr: float = 1e-3):
        if lr <= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")

        defaults = {"lr": lr}
        super(SignSGD, self).__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        assert closure is None, "Closure is not supported."

        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-lr)


# --- schedulefree 1.4.1 wrap_schedulefree.py (ScheduleFreeWrapper), verbatim
# but for the docstring, closures and state_dict plumbing -------------------

class ScheduleFreeWrapper:
    def __init__(self,
                 base : torch.optim.Optimizer,
                 weight_decay_at_y : float = 0.0,
                 momentum : float = 0.9,
                 weight_lr_power : float = 2,
                 r : float = 0):

        self.base = base
        self.weight_decay_at_y = weight_decay_at_y
        self.weight_lr_power = weight_lr_power
        self.r = r
        self.momentum = momentum
        self.train_mode = False

    def zero_grad(self, set_to_none=True):
        return self.base.zero_grad(set_to_none)

    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @torch.no_grad()
    def eval(self):
        if self.train_mode:
            for group in self.param_groups:
                for p in group['params']:
                    state = self.state[p]
                    if 'z' in state:
                        # Set p to x
                        p.lerp_(end=state['z'], weight=1-1/self.momentum)
        self.train_mode = False

    @torch.no_grad()
    def train(self):
        if not self.train_mode:
            for group in self.param_groups:
                for p in group['params']:
                    state = self.state[p]
                    if 'z' in state:
                        # Set p to y
                        p.lerp_(end=state['z'], weight=1-self.momentum)
        self.train_mode = True

    @staticmethod
    def swap(x, y):
        x.view(torch.uint8).bitwise_xor_(y.view(torch.uint8))
        y.view(torch.uint8).bitwise_xor_(x.view(torch.uint8))
        x.view(torch.uint8).bitwise_xor_(y.view(torch.uint8))

    @torch.no_grad()
    def step(self):
        if not self.train_mode:
            raise Exception("Optimizer was not in train mode when step is called.")

        for group in self.param_groups:
            lr = group['lr']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]

                if 'z' not in state:
                    state['z'] = torch.clone(p, memory_format=torch.preserve_format)

                z = state['z']

                # Apply weight_decay_at_y
                if self.weight_decay_at_y != 0.0:
                    z.sub_(p, alpha=lr*self.weight_decay_at_y)
                    p.sub_(p, alpha=lr*self.weight_decay_at_y*(1-self.momentum))

                # Unextrapolate p converting from y -> x
                p.lerp_(end=z, weight=1-1/self.momentum)

                # Swap x into z buffer temporarily
                self.swap(z, p)

                # Now state['z'] is x and p is z.

        #######
        # Apply step to z
        self.base.step()

        ######
        for group in self.param_groups:
            weight_lr_power = self.weight_lr_power
            r = self.r
            k = group.get('k', 0)
            d = group.get('d', 1.0)
            lr = group['lr']*d
            lr_max = group['lr_max'] = max(lr, group.get('lr_max', 0))

            weight = ((k+1)**r) * (lr_max**weight_lr_power)
            weight_sum = group['weight_sum'] = group.get('weight_sum', 0.0) + weight

            ckp1 = weight/weight_sum

            for p in group['params']:
                if p.grad is None:
                    continue

                state = self.state[p]
                z = state['z']

                # Swap x back out of z buffer, leaving p as x
                self.swap(z, p)

                # Update x
                p.lerp_(end=z, weight=ckp1)

                # Now set p to y
                p.lerp_(end=state['z'], weight=1-self.momentum)

            group['k'] = k+1


# --- sparsify muon.py: quintic_newtonschulz verbatim; Muon's single-process
# path (no DDP: world size 1), verbatim otherwise ---------------------------

def quintic_newtonschulz(G, steps):
    assert G.ndim >= 2
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT

    # Ensure spectral norm is at most 1
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    # Perform the NS iterations
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X

    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.1,
                 ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]

            if group["weight_decay"] > 0.0:
                for p in params:
                    p.mul_(1 - group["lr"] * group["weight_decay"])

            beta = group["momentum"]
            for i in range(0, len(params)):
                p = params[i]
                state = self.state[p]

                g = p.grad
                assert g is not None

                # Apply momentum
                if beta > 0.0:
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(g)

                    buf = state["exp_avg"].lerp_(g, 1 - beta)
                    g = g.lerp_(buf, beta) if group["nesterov"] else buf

                if g.ndim == 4:  # for the case of conv filters
                    g = g.view(len(g), -1)

                g = quintic_newtonschulz(g, steps=group["ns_steps"])
                scale = 0.2 * max(params[i].shape) ** 0.5
                params[i].add_(g, alpha=-group["lr"] * scale)


# The unit-norm decoder (remove_parallel_gradient, normalize_rows): common.py.


BATCHTOPK = ("batchtopk", "matryoshka_batchtopk")


class SAE(nn.Module):
    def __init__(self, w, args):
        super().__init__()
        self.W_enc = nn.Parameter(torch.from_numpy(w["W_enc"]).clone())
        self.b_enc = nn.Parameter(torch.from_numpy(w["b_enc"]).clone())
        self.W_dec = nn.Parameter(torch.from_numpy(w["W_dec"]).clone())
        self.b_dec = nn.Parameter(torch.from_numpy(w["b_dec"]).clone())
        self.args = args
        if args.architecture == "jumprelu":
            self.threshold = nn.Parameter(
                torch.full((self.W_enc.shape[1],), args.init_threshold, dtype=torch.float32))
        self.k = args.k
        if args.architecture in BATCHTOPK:
            self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.double))
        if args.architecture == "matching_pursuit":
            # SAELens MatchingPursuitTrainingSAE: tied, W_enc is W_dec.T and
            # there is no encoder bias.
            del self.W_enc
            del self.b_enc
        if args.architecture == "gated":
            # SAELens _init_weights_gated (b_gate from the init's b_enc).
            self.b_gate = self.b_enc
            del self.b_enc
            h = self.W_enc.shape[1]
            self.r_mag = nn.Parameter(torch.zeros(h))
            self.b_mag = nn.Parameter(torch.zeros(h))
        if args.skip_connection:
            d_out, d_in = self.W_dec.shape[1], self.W_enc.shape[0]
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in))

    def encode_with_hidden_pre(self, x):
        a = self.args
        if a.architecture == "gated":
            sae_in = x - self.b_dec
            gating_pre_activation = sae_in @ self.W_enc + self.b_gate
            active_features = (gating_pre_activation > 0).to(x.dtype)
            magnitude_pre_activation = sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag
            feature_magnitudes = torch.relu(magnitude_pre_activation)
            return active_features * feature_magnitudes, magnitude_pre_activation
        if a.architecture == "matching_pursuit":
            # MatchingPursuitTrainingSAE.encode_with_hidden_pre
            acts = _encode_matching_pursuit(x - self.b_dec, self.W_dec, a.residual_threshold,
                                            max_iterations=a.k, stop_on_duplicate_support=True)
            return acts, torch.zeros_like(acts)
        sae_in = x if a.target else x - self.b_dec
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        if a.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        if a.architecture == "topk":
            acts = topk_acts(hidden_pre, self.k)
        elif a.architecture == "abstopk":
            acts = abs_topk_acts(hidden_pre, a.k)
        elif a.architecture in BATCHTOPK:
            acts = batch_topk_acts(hidden_pre, a.k)
        else:
            acts = JumpReLU.apply(hidden_pre, self.threshold, a.bandwidth, a.ste_to_input)
        return acts, hidden_pre

    @torch.no_grad()
    def update_topk_threshold(self, acts_topk):
        positive_mask = acts_topk > 0
        lr = self.args.topk_threshold_lr
        if positive_mask.any():
            min_positive = acts_topk[positive_mask].min().to(self.topk_threshold.dtype)
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * min_positive


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--architecture",
                   choices=["topk", "abstopk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk",
                            "matching_pursuit"],
                   required=True)
    p.add_argument("--matryoshka-widths", type=lambda v: [int(w) for w in v.split(",")],
                   default=[])
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--residual-threshold", type=float, default=1e-2)
    p.add_argument("--penalty", choices=["none", "auxk", "l0", "l1", "tanh", "quadratic_l0"],
                   default="none")
    p.add_argument("--target-l0", type=float, default=None)
    p.add_argument("--tanh-scale", type=float, default=4.0)
    p.add_argument("--pre-act-coefficient", type=float, default=0.0)
    p.add_argument("--ste-to-input", action="store_true")
    p.add_argument("--fused", action="store_true", help="torch.optim.Adam(fused=True)")
    p.add_argument("--optimizer", choices=["adam", "signum", "muon"], default="adam")
    p.add_argument("--momentum", type=float, default=0.95)
    p.add_argument("--muon-weight-decay", type=float, default=0.1)
    p.add_argument("--multi-topk", action="store_true")
    p.add_argument("--k-decay-steps", type=int, default=0)
    p.add_argument("--coefficient", type=float, default=0.0)
    p.add_argument("--dead-window", type=int, default=1000)
    p.add_argument("--bandwidth", type=float, default=0.05)
    p.add_argument("--init-threshold", type=float, default=0.01)
    p.add_argument("--topk-threshold-lr", type=float, default=0.01)
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant")
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--lr-decay-steps", type=int, default=0)
    p.add_argument("--lr-end", type=float, default=0.0)
    p.add_argument("--sparsity-warmup-steps", type=int, default=0)
    p.add_argument("--unit-norm-decoder", action="store_true")
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--b-dec-mean", action="store_true", help="b_dec = mean of the data rows")
    p.add_argument("--rescale-acts-by-decoder-norm", action="store_true")
    p.add_argument("--target", default=None, help="a transcoder's target rows .npy")
    p.add_argument("--skip-connection", action="store_true")
    p.add_argument("--whiten-eps", type=float, default=None)
    args = p.parse_args()
    common.setup(args)

    X = torch.tensor(common.load_data(args.data), dtype=torch.float32)
    whitening = None
    if args.whiten_eps is not None:
        if args.target is not None:
            sys.exit("recipes.py: --whiten-eps with --target is not modelled here")
        whitening = whitening_ref.estimate(X, args.whiten_eps)
        X = whitening_ref.whiten(X, whitening)
    Y = X if args.target is None else torch.tensor(common.load_data(args.target),
                                                   dtype=torch.float32)
    w = common.read_safetensors(args.init)
    sae = SAE(w, args)
    levels = list(args.matryoshka_widths)
    if args.architecture == "matryoshka_batchtopk" and (
            not levels or levels[-1] != sae.W_dec.shape[0]):
        levels.append(sae.W_dec.shape[0])
    if args.b_dec_mean:
        with torch.no_grad():
            sae.b_dec.copy_(X.mean(dim=0))
    if args.unit_norm_decoder:
        common.normalize_rows(sae.W_dec)
    params = list(sae.parameters())
    batches = list(common.epoch_batches(len(X), args.epochs, args.batch_size, args.order))

    def schedule(opt, warm_up_steps):
        return get_lr_scheduler(args.lr_schedule, opt, len(batches), args.lr,
                                warm_up_steps, args.lr_decay_steps, args.lr_end)

    if args.optimizer == "signum":
        base = SignSGD(params, lr=args.lr)
        optimizers = [ScheduleFreeWrapper(base, momentum=args.momentum)]
        optimizers[0].train()
        # The scheduler sets the base's lr, which the wrapper reads.
        schedulers = [schedule(base, args.lr_warmup_steps)]
    elif args.optimizer == "muon":
        muon_params = [p for p in params if p.ndim >= 2]
        muon = Muon(muon_params, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.muon_weight_decay)
        adam = torch.optim.Adam([p for p in params if p.ndim < 2], lr=args.lr, foreach=False)
        optimizers = [muon, adam]
        schedulers = [schedule(muon, 0), schedule(adam, args.lr_warmup_steps)]
    elif args.fused:
        optimizers = [torch.optim.Adam(params, lr=args.lr, fused=True)]
        schedulers = [schedule(optimizers[0], args.lr_warmup_steps)]
    else:
        optimizers = [torch.optim.Adam(params, lr=args.lr, foreach=False)]
        schedulers = [schedule(optimizers[0], args.lr_warmup_steps)]
    coefficient = CoefficientScheduler(args.sparsity_warmup_steps, args.coefficient)
    since_fired = torch.zeros(sae.W_dec.shape[0])

    log = common.LossLog(args.out)
    initial_k = min(sae.W_dec.shape[0], round(X.shape[1] * 10))
    for global_step, (epoch, idx) in enumerate(batches):
        sae_in = X[idx]
        target = Y[idx]
        if args.k_decay_steps > 0:
            if global_step >= args.k_decay_steps:
                sae.k = args.k
            else:
                progress = global_step / args.k_decay_steps
                sae.k = round(initial_k * (1 - progress) + args.k * progress)
        if args.architecture == "jumprelu":
            with torch.no_grad():
                sae.threshold.data.clamp_(min=0.0)
        dead = since_fired > args.dead_window
        # --precision bf16: forward pass and loss under CPU autocast, backward outside.
        with common.autocast(args):
            feature_acts, hidden_pre = sae.encode_with_hidden_pre(sae_in)
            sae_out = act_times_W_dec(feature_acts, sae.W_dec,
                                      args.rescale_acts_by_decoder_norm) + sae.b_dec
            if args.skip_connection:
                sae_out = sae_out + sae_in @ sae.W_skip.T
            mse_loss = F.mse_loss(sae_out, target)
            if args.penalty == "auxk":
                penalty = topk_aux_loss(target, sae_out, hidden_pre, sae.W_dec, dead,
                                        args.rescale_acts_by_decoder_norm,
                                        signed=args.architecture == "abstopk")
            elif args.penalty == "l0":
                l0 = torch.sum(Step.apply(hidden_pre, sae.threshold, args.bandwidth,
                                          args.ste_to_input), dim=-1)
                penalty = l0.mean()
            elif args.penalty == "quadratic_l0":
                l0 = torch.sum(Step.apply(hidden_pre, sae.threshold, args.bandwidth,
                                          args.ste_to_input), dim=-1)
                penalty = (2 / args.target_l0 * (l0 - args.target_l0) ** 2).mean()
            elif args.penalty == "tanh":
                W_dec_norm = sae.W_dec.norm(dim=1)
                penalty = torch.tanh(args.tanh_scale * feature_acts * W_dec_norm).sum(dim=-1).mean()
            elif args.penalty == "l1":
                # SAELens GatedTrainingSAE.calculate_aux_loss (gate L1 only here).
                sae_in_centered = sae_in - sae.b_dec * True
                pi_gate_act = torch.relu(sae_in_centered @ sae.W_enc + sae.b_gate)
                penalty = torch.sum(pi_gate_act * sae.W_dec.norm(dim=1), dim=-1).mean()
            else:
                penalty = torch.zeros((), dtype=sae_out.dtype)
            loss = mse_loss + penalty * coefficient.value
            if args.pre_act_coefficient > 0:
                # calculate_pre_act_loss, in this project's term order (after the penalty).
                if dead.any():
                    per_item = ((sae.threshold - hidden_pre).relu() * dead
                                * sae.W_dec.norm(dim=1)).sum(dim=-1)
                    loss = loss + per_item.mean() * args.pre_act_coefficient
                else:
                    loss = loss + torch.zeros(())
            if args.architecture == "gated":
                via_gate_reconstruction = pi_gate_act @ sae.W_dec + sae.b_dec
                loss = loss + (via_gate_reconstruction - sae_in).pow(2).mean()
            with torch.no_grad():
                did_fire = feature_acts.bool().float().sum(-2).bool()
                since_fired += 1
                since_fired[did_fire] = 0
            if args.multi_topk:
                wide = topk_acts(hidden_pre, min(4 * sae.k, hidden_pre.shape[1]))
                loss = loss + F.mse_loss(act_times_W_dec(wide, sae.W_dec, False) + sae.b_dec,
                                         target) / 8
            if args.architecture == "matryoshka_batchtopk":
                # SAELens MatryoshkaBatchTopKTrainingSAE.training_forward_pass
                # (the outer level is the base loss above).
                decoded = sae.b_dec
                prev_width = 0
                for width in levels[:-1]:
                    inner_feature_acts = feature_acts[:, prev_width:width]
                    decoded = inner_feature_acts @ sae.W_dec[prev_width:width] + decoded
                    prev_width = width
                    loss = loss + F.mse_loss(decoded, sae_in)
            if args.architecture in BATCHTOPK:
                sae.update_topk_threshold(feature_acts)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        if args.unit_norm_decoder:
            common.remove_parallel_gradient(sae.W_dec)
        if args.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        if args.unit_norm_decoder:
            common.normalize_rows(sae.W_dec)
        for scheduler in schedulers:
            scheduler.step()
        coefficient.step()
        log.log(epoch, loss.item(), mse_loss.item(), penalty.item())
    log.close()
    if args.optimizer == "signum":
        # sparsify saves schedule-free's eval-mode (averaged) weights.
        optimizers[0].eval()

    if args.architecture == "matching_pursuit":
        # As this project saves a tied model: W_enc = W_dec.T, b_enc as it started.
        W_enc, b_enc = sae.W_dec.T, torch.from_numpy(w["b_enc"])
    else:
        W_enc = sae.W_enc
        b_enc = sae.b_gate if args.architecture == "gated" else sae.b_enc
    W_dec = sae.W_dec
    if args.rescale_acts_by_decoder_norm:
        with torch.no_grad():
            n = sae.W_dec.norm(dim=-1).clamp(min=1e-8)
            b_enc = b_enc * n
            W_dec = W_dec / n.unsqueeze(1)
            W_enc = W_enc * n.unsqueeze(1).T
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": sae.b_dec}
    if args.architecture == "gated":
        tensors["r_mag"] = sae.r_mag
        tensors["b_mag"] = sae.b_mag
    if whitening is not None:
        # After the decoder norms (SAELens TopKSAE.fold_activation_whitening).
        tensors.update(whitening_ref.fold(tensors, whitening, apply_b_dec_to_input=True))
    if args.architecture == "jumprelu":
        # Saved projected to >= 0 (the same map at inference: relu(pre) * (pre > t)).
        tensors["threshold"] = sae.threshold.detach().clamp(min=0.0)
    if args.architecture in BATCHTOPK:
        tensors["threshold"] = torch.ones_like(sae.b_enc) * sae.topk_threshold.item()
    if args.skip_connection:
        tensors["W_skip"] = sae.W_skip
    common.write_safetensors(f"{args.out}/weights.safetensors", tensors)


if __name__ == "__main__":
    main()
