"""How close is each hypergradient estimator to the exact hypergradient, on the real encoder, during its own search?

    python examples/study/hypergradient_size.py [--estimators damped_solve,darts,...] [--at 40,125] [--unroll 1,5]
        [--size 200] [--seed 0] [--out results/study/hypergradient_probe.json] [--table FILE] [--merge]
    python examples/study/hypergradient_size.py --at 3 --time-rounds 3 --estimators darts,damped_solve,sama,first_order

Setting: the study's BiDoRA search (examples/study/plan.py: all-MiniLM-L6-v2 on Rotten Tomatoes, N = 200, seed 0,
the demo config: lower batch 16, lr 5e-4, AdamW, 125 steps), trained through loralib.BiDoRATrainer once per estimator
with ``hypergradient=<name>`` from step 1 (so damped_solve's warm start is the one training gives it). The estimator
is read *at* the upper step of each step in ``--at``: a wrapper around ``UpperLevel.hypergradient_of`` keeps the
total hypergradient the Trainer's upper step computed (and its wall time), then, before the step is applied, computes
the references at the same point (θ_t after the lower step t, the magnitudes λ_t before the upper step) in float64
on a float64 copy of the model:

* Hessian: both the estimators and reference (a) use ``H = ∂²L_low/∂θ²`` and ``C = ∂²L_low/∂λ∂θ`` of the lower loss
  (task loss + orth_reg · orthogonality penalty) on the lower batch of step t, in training mode, with the dropout
  masks of that step's hypergradient seed ``mix_seed(seed, 0xDA475, t, 0)``; ``v = ∂L_up/∂θ`` and the direct term on
  the upper batch of that step with its own dropout seed (the Trainer's upper batch, not the whole held-out split).
* (a) the damped implicit hypergradient ``direct − C (H + δI)⁻¹ v`` for δ = 0.2λ, λ, 5λ with λ = 2·|λ_min(H)|:
  one float64 Lanczos run started from v (full reorthogonalisation) gives λ_min (Ritz value, with its residual
  bound) and, by shift invariance of the Krylov space, the MINRES solution of every damped system; each is checked
  by one more Hessian-vector product (the true relative residual ``‖(H + δI)x − v‖/‖v‖`` is reported).
* (b) the exact derivative of L_up(θ_t(λ), λ) through the K lower steps the Trainer took before the probe point
  (K in ``--unroll``): a functional float64 replay of those steps (the recorded batches, the CPU RNG state of each
  step (its dropout masks), the lower loss with its penalty, gradient clipping at max_grad_norm, AdamW with the
  param groups' weight decay, bias correction and the scheduled lr), with λ perturbed by the same δλ at every step
  and in L_up (the magnitudes in effect at each step are the recorded ones). The replay is checked against the
  Trainer's own steps: every recorded step replayed in float32 (default kernels, as the Trainer ran it) and the K-step
  float64 replay, both against the parameters the Trainer's optimiser produced.

Per estimator and probe point: total cosine and relative error to every reference, ‖implicit‖/‖direct‖ (implicit =
estimator total − the float64 direct term), and the seconds per upper step (median over the run). Writes the JSON
after every probe (partial results survive a kill) and, with ``--table``, a markdown table. ``--time-rounds``
times the estimators instead, interleaved at one point (a CPU shared with other jobs slows them alike).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import TrainerCallback

import loralib
from loralib.data import seeded_rng
from loralib.files import atomic_write_text
from loralib.model import magnitudes_trainable, orthogonality_penalty

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HESSIAN = ("H = d²L_low/dθ² and C = d²L_low/dλdθ of the lower loss (task loss + orth_reg * orthogonality penalty) on "
           "the lower batch of the probed step, training mode, dropout masks of that step's hypergradient seed "
           "mix_seed(seed, 0xDA475, step, rank) (the estimators' LowerProblem); v and the direct term on the Trainer's "
           "upper batch of that step under its batch seed")
DAMPING_FACTORS = (0.2, 1.0, 5.0)


# ---------------------------------------------------------------------------------------------------- small helpers
def flat(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1).double() for x in xs])


def unflat(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].reshape(t.shape).to(t.dtype))
        i += t.numel()
    return out


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / max(float(a.norm() * b.norm()), 1e-300))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def zeros_for_none(grads, like) -> list[torch.Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


class rng_state:  # noqa: N801 - a context manager used like seeded_rng
    """Run the body with the CPU RNG set to a recorded state (the Trainer's dropout masks of a step), then restore."""

    def __init__(self, state: torch.Tensor) -> None:
        self.state, self.fork = state, torch.random.fork_rng(devices=[])

    def __enter__(self):
        self.fork.__enter__()
        torch.set_rng_state(self.state)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


# ------------------------------------------------------------------------------------------ the functional losses
class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, orth_reg: float) -> None:
        super().__init__()
        self.model, self.orth_reg = model, orth_reg

    def forward(self, batch: dict, penalty: bool) -> torch.Tensor:
        loss = self.model(**batch).loss
        if penalty and self.orth_reg > 0:
            loss = loss + self.orth_reg * orthogonality_penalty(self.model)
        return loss


class Functional:
    """A copy of the model in ``dtype`` whose losses are functions of θ and λ (``torch.func.functional_call``):
    ``loss(theta, mags, batch, penalty)`` is the Trainer's lower loss (penalty=True) or its upper loss."""

    def __init__(self, model: nn.Module, theta: Sequence[nn.Parameter], mags: Sequence[nn.Parameter],
                 orth_reg: float, dtype: torch.dtype) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        self.theta_names = ["model." + names[id(p)] for p in theta]
        self.mag_names = ["model." + names[id(p)] for p in mags]
        copied = copy.deepcopy(model).to(dtype)
        copied.train(model.training)
        for p in copied.parameters():
            p.requires_grad_(False)
        self.module, self.dtype = _LossModule(copied, orth_reg), dtype

    def loss(self, theta, mags, batch: dict, penalty: bool) -> torch.Tensor:
        params = dict(zip(self.theta_names, theta)) | dict(zip(self.mag_names, mags))
        with magnitudes_trainable(self.module.model):  # BiDoRA layers accept a forward that differentiates λ
            return functional_call(self.module, params, (batch, penalty), strict=False)


# -------------------------------------------------------------------------------------- the AdamW step, written out
def adamw_step(theta, grads, exp_avg, exp_avg_sq, steps, groups, max_grad_norm: float):
    """One step of the Trainer's optimiser as a function (differentiable): gradient clipping as
    ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max/(‖g‖ + 1e-6)`` clamped at 1), then torch's single-tensor
    AdamW per parameter with its group's lr, betas, eps and decoupled weight decay. ``steps`` are the step counts
    before the step. Returns (θ', m', s', clipped g)."""
    if max_grad_norm > 0:
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        grads = [g * coef for g in grads]
    new_theta, new_m, new_s = [], [], []
    for p, g, m, s, t, group in zip(theta, grads, exp_avg, exp_avg_sq, steps, groups):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        t = t + 1
        p = p * (1 - lr * wd)
        m = m + (g - m) * (1 - beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        s = s * beta2 + (1 - beta2) * g * g
        bc1, bc2_sqrt = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
        root = torch.sqrt(s.clamp_min(torch.finfo(s.dtype).tiny)) if s.requires_grad else s.sqrt()
        p = p - (lr / bc1) * m / (root / bc2_sqrt + eps)
        new_theta.append(p)
        new_m.append(m)
        new_s.append(s)
    return new_theta, new_m, new_s, grads


# ---------------------------------------------------------------------------------------------- the trainer
class ProbeTrainer(loralib.BiDoRATrainer):
    """BiDoRATrainer that records what a replay of its lower steps needs (batch, CPU RNG state, θ and λ before the
    step, the optimiser's state and hyperparameters, the clipped gradient) for the last ``keep`` steps, times every
    upper step, and calls ``probe(self, step, total, seconds, call)`` inside the upper step of each step in ``at``
    (after the estimator ran, before λ moves)."""

    def __init__(self, *args, at=(), keep: int = 5, probe=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.probe = set(at), probe
        self.history: deque[dict] = deque(maxlen=keep + 1)
        self.upper_seconds: list[float] = []
        self._pending: dict | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.bilevel:
            theta = self.upper_level.lower.trainable_parameters()
            self._pending = {
                "step": self.state.global_step + 1,
                "batch": {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()},
                "rng": torch.get_rng_state(),
                "theta": [p.detach().clone() for p in theta],
                "mags": [m.detach().clone() for m in self.upper_level.trainable_parameters()],
            }
        return super().training_step(model, inputs, num_items_in_batch)

    def _record_lower_step(self) -> None:
        super()._record_lower_step()
        if self._pending is None:
            return
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        theta = self.upper_level.lower.trainable_parameters()
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        record = self._pending
        record["grad"] = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in theta]
        record["groups"] = [{k: groups[id(p)][k] for k in ("lr", "betas", "eps", "weight_decay")} for p in theta]
        for key in ("exp_avg", "exp_avg_sq"):
            record[key] = [optimizer.state[p][key].detach().clone() if p in optimizer.state else torch.zeros_like(p)
                           for p in theta]
        record["steps"] = [float(optimizer.state[p]["step"]) if p in optimizer.state else 0.0 for p in theta]
        self.history.append(record)
        self._pending = None

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        upper = self.upper_level
        if upper is not None and "hypergradient_of" not in upper.__dict__:
            original = upper.hypergradient_of

            def timed(upper_batch, upper_seed, lower_batch, lower_seed, **optimizer_state):
                start = time.perf_counter()
                loss, total = original(upper_batch, upper_seed, lower_batch, lower_seed, **optimizer_state)
                seconds = time.perf_counter() - start
                self.upper_seconds.append(seconds)
                step = self.state.global_step
                if step in self.at and self.probe is not None:
                    call = {"upper_batch": upper_batch, "upper_seed": upper_seed, "lower_batch": lower_batch,
                            "lower_seed": lower_seed}
                    self.probe(self, step, [t.detach().clone() for t in total], seconds, call)
                return loss, total

            upper.hypergradient_of = timed
        return scheduler


class StopAfter(TrainerCallback):
    """Stop the run after the last probed step (the schedule stays the full run's)."""

    def __init__(self, last: int) -> None:
        self.last = last

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.last:
            control.should_training_stop = True
        return control


# ------------------------------------------------------------------------------------------ reference (a): Lanczos
def lanczos_damped(hvp, v: torch.Tensor, factors=DAMPING_FACTORS, max_iter: int = 250, check: int = 10,
                   eig_rtol: float = 1e-3, solve_rtol: float = 1e-6, required=(1.0, 5.0),
                   deadline: float | None = None, fixed: Sequence[float] = ()) -> dict:
    """Float64 Lanczos on the symmetric operator ``hvp`` started from ``v`` (full reorthogonalisation, twice).

    Every ``check`` iterations: λ_min and λ_max (Ritz values of T), the residual bound ‖Hy − θy‖ = |β_m s_m| of the
    λ_min Ritz pair (|θ − λ| ≤ it; ≤ it²/gap with gap the distance to the next Ritz value, an estimate), and for δ =
    f·2|λ_min| the MINRES iterate of (H + δI)x = v (least squares on the (m+1)×m tridiagonal), whose relative residual
    is exact up to the loss of orthogonality. Stops when the λ_min bound is ≤ eig_rtol·|λ_min| and the residual at
    the ``required`` factors is ≤ solve_rtol, or at max_iter / deadline. ``fixed``: further absolute dampings δ
    solved from the same Krylov space (key ``"d=<δ>"``). Returns the stats and ``solutions`` {key: (δ, x)}, keys
    ``"<factor>x"`` for the factors of 2|λ_min|."""
    n, beta0 = v.numel(), float(v.norm())
    q = torch.zeros(max_iter + 1, n, dtype=torch.float64)
    q[0] = v / beta0
    alphas, betas, stats = [], [], {}
    for j in range(max_iter):
        w = hvp(q[j])
        a = float(w @ q[j])
        for _ in range(2):  # full reorthogonalisation (twice is enough)
            w = w - q[: j + 1].T @ (q[: j + 1] @ w)
        b = float(w.norm())
        alphas.append(a)
        betas.append(b)
        breakdown = b <= 1e-12 * max(abs(x) for x in alphas)
        if not breakdown:
            q[j + 1] = w / b
        m = j + 1
        if m % check and not breakdown and m < max_iter and not (deadline and time.time() > deadline):
            continue
        t = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
        ritz, vecs = np.linalg.eigh(t)
        bound = abs(b * vecs[-1, 0])
        gap = ritz[1] - ritz[0] if m > 1 else float("inf")
        lam_min = float(ritz[0])
        lam = 2 * abs(lam_min)
        solves = {}
        for key, delta in [(f"{f:g}x", f * lam) for f in factors] + [(f"d={d:g}", d) for d in fixed]:
            tbar = np.zeros((m + 1, m))
            tbar[:m] = t + delta * np.eye(m)
            tbar[m, m - 1] = b
            rhs = np.zeros(m + 1)
            rhs[0] = beta0
            y, *_ = np.linalg.lstsq(tbar, rhs, rcond=None)
            solves[key] = (delta, y, float(np.linalg.norm(tbar @ y - rhs) / beta0))
        stats = {"iterations": m, "lambda_min": lam_min, "lambda_max": float(ritz[-1]),
                 "lambda_min_residual_bound": float(bound), "lambda_min_gap_bound": float(bound ** 2 / gap),
                 "lambda_min_relative_bound": float(min(bound, bound ** 2 / gap) / abs(lam_min)),
                 "damping_lambda": lam, "krylov_residuals": {k: r for k, (_, _, r) in solves.items()}}
        converged = (stats["lambda_min_relative_bound"] <= eig_rtol
                     and all(solves[f"{f:g}x"][2] <= solve_rtol for f in required))
        if converged or breakdown or m >= max_iter or (deadline and time.time() > deadline):
            stats["stopped"] = ("converged" if converged else "breakdown" if breakdown else
                                "max_iter" if m >= max_iter else "deadline")
            stats["solutions"] = {k: (d, q[:m].T @ torch.from_numpy(y)) for k, (d, y, _) in solves.items()}
            return stats
    raise AssertionError("unreachable")


def damped_reference(f64: Functional, theta, mags, call: dict, **lanczos) -> dict:
    """Reference (a) at θ, λ (float64): direct, v, λ_min/λ_max, and ``direct − C (H + δI)⁻¹ v`` per damping."""
    th = [t.detach().to(f64.dtype).requires_grad_() for t in theta]
    lm = [m.detach().to(f64.dtype).requires_grad_() for m in mags]
    with sdpa_kernel(SDPBackend.MATH):  # double backward
        with seeded_rng(call["upper_seed"]):
            upper = f64.loss(th, lm, call["upper_batch"], penalty=False)
        grads = zeros_for_none(torch.autograd.grad(upper, lm + th, allow_unused=True), lm + th)
        direct, v = flat(grads[: len(lm)]), flat(grads[len(lm):])
        with seeded_rng(call["lower_seed"]):
            lower = f64.loss(th, lm, call["lower_batch"], penalty=True)
        g_low = torch.autograd.grad(lower, th, create_graph=True)
        count = [0]

        def hvp(x: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            return flat(torch.autograd.grad(g_low, th, grad_outputs=unflat(x, th), retain_graph=True))

        def cross(x: torch.Tensor) -> torch.Tensor:
            out = torch.autograd.grad(g_low, lm, grad_outputs=unflat(x, th), retain_graph=True, allow_unused=True)
            return flat(zeros_for_none(out, lm))

        start = time.perf_counter()
        stats = lanczos_damped(hvp, v, **lanczos)
        solutions = stats.pop("solutions")
        totals, refs = {}, {}
        for key, (delta, x) in solutions.items():
            true_residual = float((hvp(x) + delta * x - v).norm() / v.norm())
            implicit = -cross(x)
            totals[key] = direct + implicit
            refs[key] = {"delta": delta, "true_relative_residual": true_residual,
                         "implicit_over_direct": float(implicit.norm() / direct.norm())}
        stats.update(hessian_vector_products=count[0], seconds=time.perf_counter() - start, damped=refs,
                     direct_norm=float(direct.norm()), v_norm=float(v.norm()),
                     rayleigh_v=float(v @ hvp(v) / (v @ v)))
    return {"stats": stats, "direct": direct, "totals": totals}


# ------------------------------------------------------------------------------------------ reference (b): unrolled
def replay_check(f32: Functional, history: Sequence[dict], theta_now, max_grad_norm: float) -> dict:
    """Each recorded lower step replayed in the Trainer's dtype (default attention kernels, as it ran): the clipped
    gradient against the one the optimiser consumed, and θ after the written-out AdamW step against the Trainer's."""
    after = [h["theta"] for h in list(history)[1:]] + [list(theta_now)]
    worst_grad, worst_theta, worst_update = 0.0, 0.0, 0.0
    for record, theta_next in zip(history, after):
        th = [t.clone().requires_grad_() for t in record["theta"]]
        with rng_state(record["rng"]):
            loss = f32.loss(th, record["mags"], record["batch"], penalty=True)
        grads = zeros_for_none(torch.autograd.grad(loss, th, allow_unused=True), th)
        with torch.no_grad():
            new, _, _, clipped = adamw_step([t.detach() for t in th], grads, record["exp_avg"], record["exp_avg_sq"],
                                            record["steps"], record["groups"], max_grad_norm)
        worst_grad = max(worst_grad, rel(flat(clipped), flat(record["grad"])))
        worst_theta = max(worst_theta, rel(flat(new), flat(theta_next)))
        worst_update = max(worst_update, rel(flat(new) - flat(record["theta"]),
                                             flat(theta_next) - flat(record["theta"])))
    return {"steps": [h["step"] for h in history], "max_grad_rel_error": worst_grad,
            "max_theta_rel_error": worst_theta, "max_update_rel_error": worst_update}


def unrolled_reference(f64: Functional, history: Sequence[dict], theta_now, mags_now, call: dict,
                       max_grad_norm: float) -> dict:
    """Reference (b): d/dλ L_up(θ_t(λ), λ) through the recorded lower steps, in float64, λ shifted by one δλ at every
    step and in L_up. Also θ_t of the replay against the Trainer's."""
    dt = f64.dtype
    delta = [torch.zeros_like(m, dtype=dt, requires_grad=True) for m in mags_now]
    th = [t.to(dt).requires_grad_() for t in history[0]["theta"]]
    start_theta = flat(th)
    m = [x.to(dt) for x in history[0]["exp_avg"]]
    s = [x.to(dt) for x in history[0]["exp_avg_sq"]]
    steps = list(history[0]["steps"])
    start = time.perf_counter()
    with sdpa_kernel(SDPBackend.MATH):
        for record in history:
            mags = [x.to(dt) + d for x, d in zip(record["mags"], delta)]
            with rng_state(record["rng"]):
                loss = f64.loss(th, mags, record["batch"], penalty=True)
            grads = zeros_for_none(torch.autograd.grad(loss, th, create_graph=True, allow_unused=True), th)
            th, m, s, _ = adamw_step(th, grads, m, s, steps, record["groups"], max_grad_norm)
            steps = [t + 1 for t in steps]
        with seeded_rng(call["upper_seed"]):
            upper = f64.loss(th, [x.to(dt) + d for x, d in zip(mags_now, delta)], call["upper_batch"], penalty=False)
        total = flat(zeros_for_none(torch.autograd.grad(upper, delta, allow_unused=True), delta))
    replayed, trainer = flat(th), flat(theta_now)
    return {"total": total, "stats": {
        "K": len(history), "steps": [h["step"] for h in history], "seconds": time.perf_counter() - start,
        "theta_rel_error_vs_trainer": rel(replayed, trainer),
        "update_rel_error_vs_trainer": rel(replayed - start_theta, trainer - start_theta)}}


# ------------------------------------------------------------------------------------------------------ a probe
def _describe(estimator) -> str:
    """``repr`` of an estimator; loralib's ``Hypergradient.__repr__`` fails for estimators without an ``__init__``
    (FirstOrder: it reads the settings ``args``, ``kwargs`` of ``object.__init__``)."""
    try:
        return repr(estimator)
    except AttributeError:
        return f"{type(estimator).__name__}()"


def measure(trainer: ProbeTrainer, step: int, total, seconds: float, call: dict, unroll=(1, 5),
            lanczos: dict | None = None) -> dict:
    """Every reference at the current point and the estimator's total against each."""
    model, upper = trainer.model, trainer.upper_level
    theta, mags = upper.lower.trainable_parameters(), upper.trainable_parameters()
    orth_reg, clip = trainer.args.orth_reg, trainer.args.max_grad_norm
    start = time.perf_counter()
    f64 = Functional(model, theta, mags, orth_reg, torch.float64)
    lanczos = dict(lanczos or {})
    if upper.hypergradient.name == "damped_solve":  # also the damped system the estimator converges to
        lanczos["fixed"] = (upper.hypergradient.damped_solve_damping,)
    ref_a = damped_reference(f64, theta, mags, call, **lanczos)
    direct = ref_a["direct"]
    refs = {f"damped_{k}": t for k, t in ref_a["totals"].items()}
    unrolled, check = {}, None
    history = list(trainer.history)
    if history and history[-1]["step"] == step:
        check = replay_check(Functional(model, theta, mags, orth_reg, theta[0].dtype), history[-max(unroll):],
                             theta, clip)
        for k in unroll:
            if len(history) >= k:
                out = unrolled_reference(f64, history[-k:], theta, mags, call, clip)
                refs[f"unrolled_K{k}"] = out["total"]
                unrolled[f"K{k}"] = out["stats"]
    del f64
    est = flat(total)
    implicit = est - direct
    compare = {name: {"cos": cos(est, ref), "rel_error": rel(est, ref)} for name, ref in refs.items()}
    direct_only = {name: {"cos": cos(direct, ref), "rel_error": rel(direct, ref)} for name, ref in refs.items()}
    # an implicit part within float32 rounding of the estimate (first_order: est − the float64 direct term) has no
    # direction: its cosine is left out
    rounding = float(implicit.norm()) <= 1e-5 * float(direct.norm())
    implicit_vs = {name: {"cos": None if rounding else cos(implicit, ref - direct),
                          "rel_error": rel(implicit, ref - direct)} for name, ref in refs.items()}
    between = {f"{a}~{b}": cos(refs[a], refs[b]) for i, a in enumerate(refs) for b in list(refs)[i + 1:]}
    ref_ratio = {name: float((ref - direct).norm() / direct.norm()) for name, ref in refs.items()}
    return {
        "step": step, "estimator": upper.hypergradient.name, "estimator_repr": _describe(upper.hypergradient),
        "seconds_this_upper_step": seconds, "hessian": HESSIAN, "lanczos": ref_a["stats"], "unrolled": unrolled,
        "replay_check": check, "estimate_vs": compare, "direct_only_vs": direct_only, "implicit_vs": implicit_vs,
        "implicit_over_direct": float(implicit.norm() / direct.norm()), "reference_implicit_over_direct": ref_ratio,
        "reference_cosines": between, "measure_seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------- interleaved timing
def time_estimators(trainer: ProbeTrainer, names: Sequence[str], rounds: int) -> dict:
    """Seconds of ``hypergradient_of`` per estimator at one point (the trainer's last lower batch, one upper batch),
    the estimators called in turn ``rounds`` times so that a CPU shared with other jobs slows them alike; the first
    call of each (damped_solve's cold start) is not counted. Returns per-estimator medians and the per-round ratios
    to darts."""
    from loralib.data import mix_seed  # noqa: PLC0415
    from loralib.hypergradients import build_hypergradient  # noqa: PLC0415

    upper, args = trainer.upper_level, trainer.args
    original = upper.hypergradient
    step = trainer.state.global_step
    lower_batch = trainer._prepare_inputs(trainer._lower_batch)
    lower_seed = mix_seed(args.seed, 0xDA475, step, 0)
    upper_batch = trainer._prepare_inputs(trainer.upper_stream.next())
    last = trainer.history[-1]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state = {"optimizer": optimizer, "last_gradient": last["grad"], "learning_rate": last["groups"][0]["lr"]}
    estimators = {n: build_hypergradient(n, **args.hypergradient_settings()) for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    hypergradient_of = type(upper).hypergradient_of  # the class's, not the probe's timed wrapper
    try:
        for r in range(rounds + 1):
            for n in names:
                upper.hypergradient = estimators[n]
                start = time.perf_counter()
                hypergradient_of(upper, upper_batch, trainer.upper_stream.batch_seed, lower_batch, lower_seed,
                                 **(state if n == "sama" else {}))
                if r:
                    seconds[n].append(time.perf_counter() - start)
    finally:
        upper.hypergradient = original
    out = {"rounds": rounds, "median_seconds": {n: statistics.median(t) for n, t in seconds.items()},
           "seconds": seconds}
    if "darts" in seconds:
        out["median_ratio_to_darts"] = {n: statistics.median(a / b for a, b in zip(t, seconds["darts"]))
                                        for n, t in seconds.items()}
    return out


# ---------------------------------------------------------------------------------------------------- the study
ESTIMATORS = ("damped_solve", "darts", "first_order", "sama", "damped_solve@measured", "neumann", "cg")


def estimator_flags(name: str, measured_delta: float | None) -> list[str]:
    import plan  # noqa: PLC0415 - examples/study on sys.path

    base = name.split("@")[0]
    flags = ["--hypergradient", base]
    if base == "neumann":  # the study's sensitivity arm
        flags += ["--neumann_alpha", str(plan.NEUMANN_ALPHA), "--neumann_iterations", str(plan.NEUMANN_ITERATIONS)]
    if name == "damped_solve@measured":
        flags += ["--damped_solve_damping", repr(measured_delta)]
    return flags


def table(record: dict) -> str:
    """The markdown table of a record."""
    lines = [
        "# Hypergradient estimators against float64 references (MiniLM, Rotten Tomatoes N = 200, seed 0)", "",
        f"Hessian: {record['hessian']}.", "",
        "References: damped_Fx = direct − C (H + δI)⁻¹ v with δ = F·2|λ_min(H)| (float64 Lanczos / MINRES; "
        "damped_d=D: δ = D, the damped_solve run's own δ); "
        "unrolled_KK = exact derivative through the last K lower AdamW steps the Trainer took (float64 replay). "
        "Estimates are read at the Trainer's upper step of the probed step (after the lower step, before λ moves). "
        "'direct' = the direct term alone (first-order), computed in the same run.", "",
        "| estimator | step | ref | cos | rel. err | implicit cos | direct-only cos | ‖impl‖/‖dir‖ est | "
        "‖impl‖/‖dir‖ ref | s / upper step (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in record["runs"].items():
        for step, p in sorted(run.get("probes", {}).items(), key=lambda kv: int(kv[0])):
            for ref, c in p["estimate_vs"].items():
                icos = p.get("implicit_vs", {}).get(ref, {}).get("cos")
                lines.append(
                    f"| {name} | {step} | {ref} | {c['cos']:.3f} | {c['rel_error']:.3f} | "
                    f"{'–' if icos is None else f'{icos:.3f}'} | "
                    f"{p['direct_only_vs'][ref]['cos']:.3f} | {p['implicit_over_direct']:.3f} | "
                    f"{p['reference_implicit_over_direct'][ref]:.3f} | "
                    f"{run.get('upper_seconds_median', float('nan')):.2f} |")
    lines += ["", "| estimator | step | λ_min | λ_max | Lanczos its | λ_min rel. bound | residual 0.2x / 1x / 5x "
              "(true) | replay θ err (1 step, f32) | K=1 / K=5 θ err (f64) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, run in record["runs"].items():
        for step, p in sorted(run.get("probes", {}).items(), key=lambda kv: int(kv[0])):
            lz = p["lanczos"]
            res = " / ".join(f"{lz['damped'][f'{f:g}x']['true_relative_residual']:.1e}" for f in DAMPING_FACTORS)
            chk = p["replay_check"] or {}
            unr = " / ".join(f"{u['theta_rel_error_vs_trainer']:.1e}" for u in p["unrolled"].values())
            lines.append(f"| {name} | {step} | {lz['lambda_min']:.4g} | {lz['lambda_max']:.4g} | {lz['iterations']} | "
                         f"{lz['lambda_min_relative_bound']:.1e} | {res} | "
                         f"{chk.get('max_theta_rel_error', float('nan')):.1e} | {unr} |")
    if record.get("timing"):
        t = record["timing"]
        lines += ["", f"Interleaved timing ({t['rounds']} rounds at step {t['at_step']} of a {t['trained_with']} run, "
                  "same batches; seconds of one hypergradient_of call, median; median per-round ratio to darts):", "",
                  "| estimator | s / upper step | ratio to darts |", "|---|---|---|"]
        for n, sec in t["median_seconds"].items():
            ratio = t.get("median_ratio_to_darts", {}).get(n, float("nan"))
            lines.append(f"| {n} | {sec:.2f} | {ratio:.2f} |")
    if record.get("notes"):
        lines += ["", *[f"* {n}" for n in record["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--at", default="40,125", help="probed steps (comma-separated)")
    p.add_argument("--unroll", default="1,5", help="K of the unrolled references (comma-separated)")
    p.add_argument("--estimators", default=",".join(ESTIMATORS),
                   help=f"runs, in order (damped_solve@measured: δ = 2|λ_min| measured at the first probe of the "
                        f"damped_solve run); choices {ESTIMATORS}")
    p.add_argument("--lanczos-max", type=int, default=250)
    p.add_argument("--lanczos-minutes", type=float, default=8.0, help="wall-clock cap of one Lanczos run")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "study")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "study" / "hypergradient_probe.json")
    p.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--merge", action="store_true",
                   help="add to the record in --out (runs already there are kept, not run again)")
    p.add_argument("--time-rounds", type=int, default=0,
                   help="instead of probing: train --at's first step with darts, then time every estimator in "
                        "--estimators at that point, interleaved, this many rounds (into the record's 'timing')")
    p.add_argument("--note", action="append", default=[], help="a line for the record's notes (repeatable)")
    p.add_argument("--measured-delta", type=float, default=None,
                   help="δ for damped_solve@measured (default: 2|λ_min| at the first probe of the damped_solve run, "
                        "from this invocation or, with --merge, from the record)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT / "examples"))  # grid.py (plan.py's per-method flags)
    sys.path.insert(0, str(ROOT / "examples" / "NLU"))
    import run_glue  # noqa: PLC0415
    from plan import BIDORA, RT, Cell  # noqa: PLC0415
    from run_study import ENV, model_dir, prepare_data  # noqa: PLC0415

    os.environ.update(ENV)
    torch.set_flush_denormal(True)
    at = sorted({int(x) for x in args.at.split(",")})
    unroll = tuple(sorted({int(x) for x in args.unroll.split(",")}))
    names = [n for n in args.estimators.split(",") if n]
    if bad := [n for n in names if n not in ESTIMATORS]:
        p.error(f"unknown estimators {bad}; choose from {ESTIMATORS}")
    cell = Cell(RT, args.size, BIDORA, args.seed)
    data = prepare_data(cell, args.work)
    record = {"setting": f"rt-n{args.size} seed {args.seed}, the study's BiDoRA search settings ({RT.config}), "
                         f"{cell.steps} lower steps scheduled, stopped after step {max(at)}",
              "hessian": HESSIAN, "probed_at": "inside the Trainer's upper step of the probed step: after the lower "
              "step, after the estimator computed its total, before the magnitudes are updated",
              "references": {"damped_Fx": "direct - C (H + F*2|lambda_min| I)^-1 v, float64 Lanczos from v + MINRES",
                             "unrolled_KK": "exact d/dlambda through the K lower steps before the probe, float64"},
              "runs": {}, "notes": []}
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text())
        record["runs"], record["notes"] = previous["runs"], previous.get("notes", [])
    record["notes"] += [n for n in args.note if n not in record["notes"]]
    measured_delta = args.measured_delta
    probes = record["runs"].get("damped_solve", {}).get("probes")
    if measured_delta is None and probes:
        measured_delta = probes[min(probes, key=int)]["lanczos"]["damping_lambda"]
    if args.time_rounds:
        names = [n for n in names if "@" not in n]
    for name in names if not args.time_rounds else ["darts"]:
        if name in record["runs"] and not args.time_rounds:
            continue
        if name == "damped_solve@measured":
            if measured_delta is None:
                record["notes"].append("damped_solve@measured skipped: no damped_solve probe measured λ_min first")
                continue
        out_dir = args.work / "hypergradient_probe" / name.replace("@", "_")
        flags = ["--config", str(ROOT / RT.config), "--model_name_or_path", str(model_dir(cell, args.work)),
                 "--train_file", str(data / "train.csv"), "--test_file", str(data / "test.csv"),
                 "--output_dir", str(out_dir), "--overwrite_output_dir", "--use_cpu", "true", *cell.flags(),
                 "--retrain_max_steps", "0", "--eval_strategy", "no", "--save_strategy", "no",
                 *estimator_flags(name, measured_delta)]
        groups = run_glue.parse_args(flags)
        targs = groups[-1]
        plan_ = run_glue.prepare(*groups)
        collate = plan_.collator  # run_glue's own padding (DataCollatorWithPadding)
        run = {"flags": estimator_flags(name, measured_delta), "probes": {}}
        if not args.time_rounds:
            record["runs"][name] = run
        if name == "damped_solve@measured":
            run["delta_choice"] = ("δ = 2|λ_min| measured by this script at the first probe of the damped_solve "
                                   "(δ = 1) run of the same setting and seed: chosen from a measurement on the same "
                                   "data, not independently")

        def probe(trainer, step, total, seconds, call, run=run, name=name):
            print(f"[{time.strftime('%H:%M:%S')}] {name} step {step}: measuring", file=sys.stderr, flush=True)
            deadline = time.time() + 60 * args.lanczos_minutes
            result = measure(trainer, step, total, seconds, call, unroll,
                             {"max_iter": args.lanczos_max, "deadline": deadline})
            run["probes"][str(step)] = result
            run["upper_seconds_median"] = statistics.median(trainer.upper_seconds)
            atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
            if args.table:
                atomic_write_text(args.table, table(record))
            lz = result["lanczos"]
            print(f"  done in {result['measure_seconds']:.0f} s: λ_min {lz['lambda_min']:.4g} ({lz['iterations']} "
                  f"its), " + ", ".join(f"{k} cos {v['cos']:.3f}" for k, v in result["estimate_vs"].items()),
                  file=sys.stderr, flush=True)

        trainer = ProbeTrainer(model=plan_.model, args=targs, train_dataset=plan_.data["train"],
                               data_collator=collate, at=() if args.time_rounds else at, keep=max(unroll),
                               probe=probe, callbacks=[StopAfter(min(at) if args.time_rounds else max(at))])
        start = time.perf_counter()
        trainer.train()
        if args.time_rounds:
            timing = time_estimators(trainer, names, args.time_rounds)
            record["timing"] = {"at_step": trainer.state.global_step, "trained_with": name, **timing}
            atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
            if args.table:
                atomic_write_text(args.table, table(record))
            print(json.dumps(record["timing"], indent=2))
            return 0
        run["train_seconds_with_probes"] = time.perf_counter() - start
        run["upper_seconds_median"] = statistics.median(trainer.upper_seconds)
        run["upper_seconds_mean"] = statistics.fmean(trainer.upper_seconds)
        if name == "damped_solve" and run["probes"] and args.measured_delta is None:
            first = run["probes"][min(run["probes"], key=int)]
            measured_delta = first["lanczos"]["damping_lambda"]
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
        if args.table:
            atomic_write_text(args.table, table(record))
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
