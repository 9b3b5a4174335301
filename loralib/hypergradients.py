"""Hypergradient estimators of BiDoRA's bi-level problem, independent of any bi-level framework.

The lower problem trains the directions θ (lora_A, lora_B, head) on the lower split, the upper problem the DoRA
magnitudes λ on a held-out split. With ``v = ∂L_up/∂θ`` the hypergradient is ``dL_up/dλ = ∂L_up/∂λ + implicit``,
and an estimator returns the implicit term, one tensor per λ:

==============  ====================================================  ==========================================
name            implicit term                                          lower-loss passes (forward + backward)
==============  ====================================================  ==========================================
first_order     none                                                   0
darts           −C v, central difference along v (H⁻¹ ≈ I)             2 (first order)
sama            −C (lr·J v), J = the AdamW step's Jacobian in g        2 (first order)
neumann         −C α Σ_{k≤K} (I − αH)^k v                              1 + K double backwards + 1
cg              −C x, x ≈ H⁻¹ v from K conjugate-gradient steps        1 + ≤ K double backwards + 1
damped_solve    −C z, z → (H + δI)⁻¹ v, warm-started across calls     4 (first order; 2 on a cold start)
==============  ====================================================  ==========================================

``C = ∂²L_low/∂λ∂θ`` and ``H = ∂²L_low/∂θ²`` are those of the lower loss on the lower batch the Trainer last stepped
on, at the current θ, λ (:class:`LowerProblem`). ``docs/hypergradients.md`` gives the derivations, costs, states
and limits. Nothing here registers with Betty: :func:`build_hypergradient` and :data:`ESTIMATORS` are the table.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.distributed.tensor import DTensor

Tensors = list[torch.Tensor]

__all__ = [
    "ESTIMATORS",
    "LowerProblem",
    "Hypergradient",
    "FirstOrder",
    "Darts",
    "Neumann",
    "ConjugateGradient",
    "SAMA",
    "DampedSolve",
    "adam_step_jacobian",
    "build_hypergradient",
]


def _same_everywhere(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The default ``reduce`` of one process: the tensors themselves."""
    return list(tensors)


@dataclass
class LowerProblem:
    """The lower problem at the current point, as an estimator sees it.

    Attributes:
        params: θ, requires_grad=True.
        upper_params: λ, requires_grad=True for the duration of the call.
        loss: the lower TASK loss on the last lower batch at the current θ, λ; a pure function (same dropout masks
            every call, no side effects); a scalar, fp32 or fp64.
        penalty: a λ-independent regulariser of the lower loss (part of the lower Hessian in θ; it contributes nothing
            to ∂/∂λ, so the estimators skip it where only ∂/∂λ is needed).
        reduce: the element-wise mean over processes (identity in one process); every Hessian-vector product goes
            through it, so all processes hold the same iterates.
        optimizer: the Trainer's lower optimiser holding θ (sama).
        last_gradient: the gradient of θ that this optimiser consumed at its last step (after clipping and unscaling:
            the one its ``exp_avg`` / ``exp_avg_sq`` were updated with), one tensor per θ (sama).
        learning_rate: the learning rate used at that step (the scheduler's value then); a float for every param
            group, or one float per param group; None: the param groups' current ``lr`` (sama).
        grad_fn: how first-order gradients are taken, ``(loss, inputs) -> grads`` with None for an unused input;
            may be a backward()-into-``.grad`` implementation (reentrant checkpointing, FSDP) that leaves ``.grad`` as
            it found it. Every first-order gradient of the estimators goes through it.
    """

    params: list[torch.nn.Parameter]
    upper_params: list[torch.nn.Parameter]
    loss: Callable[[], torch.Tensor]
    penalty: Callable[[], torch.Tensor] | None = None
    reduce: Callable[[Sequence[torch.Tensor | None]], list[torch.Tensor | None]] = _same_everywhere
    optimizer: torch.optim.Optimizer | None = None
    last_gradient: Tensors | None = None
    learning_rate: float | Sequence[float] | None = None
    grad_fn: Callable = torch.autograd.grad

    def first_order_grads(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> Tensors:
        """``∂loss/∂inputs`` through :attr:`grad_fn`, zeros for inputs the loss does not use."""
        inputs = list(inputs)
        if self.grad_fn is torch.autograd.grad:
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        else:
            grads = self.grad_fn(loss, inputs)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]

    def total_loss(self) -> torch.Tensor:
        """The lower loss whose Hessian in θ the solvers use: task loss + penalty."""
        loss = self.loss()
        return loss if self.penalty is None else loss + self.penalty()


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _whole(t: torch.Tensor) -> torch.Tensor:
    """A reduction of sharded tensors as a whole: a ``DTensor`` result (FSDP2 shards; a sum over shards is a
    ``Partial``, whose ``float()`` is this process's share only) made whole; a plain tensor unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    """Σ⟨x, y⟩ accumulated in float64, as a Python float (identical on every process for identical inputs; over the
    whole tensors when they are FSDP2 shards)."""
    total = 0.0
    for x, y in zip(xs, ys):
        total += float(_whole(torch.dot(x.reshape(-1).double(), y.reshape(-1).double())))
    return total


def _zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> Tensors:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


@contextmanager
def _restoring(params: Sequence[torch.nn.Parameter]):
    """Save θ, run the body (which may perturb ``p.data``), then put θ back bit for bit, also on an error."""
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)


def _check_finite_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_iterations(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# The estimators
# ----------------------------------------------------------------------------------------------------------------
class Hypergradient:
    """An estimator of the implicit term of ``dL_up/dλ``. Subclasses set :attr:`name` and implement :meth:`implicit`.

    ``implicit(v, problem)`` takes ``v = ∂L_up/∂θ`` (already averaged over processes, one tensor per θ) and returns the
    implicit term, one tensor per λ (None: no implicit term). It leaves θ bit for bit as it found it and never touches
    ``.grad`` of θ or λ; the caller averages the returned term over processes.
    """

    name: ClassVar[str]
    second_order: ClassVar[bool] = False  # True: differentiates the lower loss twice (needs double backward)

    def implicit(self, v: Tensors, problem: LowerProblem) -> Tensors | None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"hypergradient {self.name!r} keeps no state, got keys {sorted(state)}")

    def reset(self) -> None:
        pass

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in _accepted_settings(type(self)))
        return f"{type(self).__name__}({settings})"


class FirstOrder(Hypergradient):
    """No implicit term: the magnitudes get their direct gradient ``∂L_up/∂λ`` only."""

    name = "first_order"

    def implicit(self, v: Tensors, problem: LowerProblem) -> None:
        return None


def _darts_difference(u: Sequence[torch.Tensor], problem: LowerProblem, alpha: float) -> Tensors:
    """``−C u`` by a central difference of ``∂L_task/∂λ`` along ``u``: Betty 0.2.1's ``darts`` operation for operation
    (``ε = alpha / (‖u‖ + 1e-15)``, ``θ + εu``, then ``− 2εu``), except that θ is put back from a copy (θ + εu − 2εu +
    εu ≠ θ in floats). The penalty is skipped: it does not depend on λ."""
    eps = alpha / torch.cat([1.0 * t.reshape(-1) for t in u]).norm().add_(1e-15).item()
    params, upper = problem.params, problem.upper_params
    with _restoring(params):
        for p, ui in zip(params, u):
            p.data.add_(ui.data, alpha=eps)
        grad_p = problem.first_order_grads(problem.loss(), upper)
        for p, ui in zip(params, u):
            p.data.sub_(ui.data, alpha=2 * eps)
        grad_n = problem.first_order_grads(problem.loss(), upper)
    return [(n - p).div_(2 * eps) for n, p in zip(grad_n, grad_p)]


class Darts(Hypergradient):
    """DARTS' finite difference read as implicit differentiation with ``H⁻¹ ≈ I`` (Liu et al. 2019; Betty's
    ``darts``): ``−C v ≈ (∇_λ L(θ − εv) − ∇_λ L(θ + εv)) / 2ε`` with ``ε = darts_alpha / ‖v‖``. Bit for bit Betty
    0.2.1's result; θ is restored exactly. Two first-order lower passes."""

    name = "darts"

    def __init__(self, darts_alpha: float = 0.01) -> None:
        self.darts_alpha = _check_finite_positive("darts_alpha", darts_alpha)

    def implicit(self, v: Tensors, problem: LowerProblem) -> Tensors:
        return _darts_difference(v, problem, self.darts_alpha)


class Neumann(Hypergradient):
    """``−C H⁻¹ v`` with ``H⁻¹ v ≈ α Σ_{k=0..K} (I − αH)^k v`` (``K = neumann_iterations``, ``α = neumann_alpha``;
    converges for positive definite H and ``α < 2/λ_max(H)``; Lorraine et al. 2020). Each Hessian-vector product
    (double backward of task loss + penalty) is averaged over the processes."""

    name = "neumann"
    second_order = True

    def __init__(self, neumann_iterations: int = 3, neumann_alpha: float = 1.0) -> None:
        self.neumann_iterations = _check_iterations("neumann_iterations", neumann_iterations)
        self.neumann_alpha = _check_finite_positive("neumann_alpha", neumann_alpha)

    def implicit(self, v: Tensors, problem: LowerProblem) -> Tensors:
        params, upper = problem.params, problem.upper_params
        in_grad = torch.autograd.grad(problem.total_loss(), params, create_graph=True)
        alpha = self.neumann_alpha
        term = [vi.detach() for vi in v]
        total = list(term)
        for _ in range(self.neumann_iterations):
            hvp = problem.reduce(torch.autograd.grad(in_grad, params, grad_outputs=term, retain_graph=True))
            term = [t - alpha * h for t, h in zip(term, hvp)]
            total = [s + t for s, t in zip(total, term)]
        weights = [-alpha * s for s in total]
        out = torch.autograd.grad(in_grad, upper, grad_outputs=weights, allow_unused=True)
        return _zeros_for_none(out, upper)


def _tensor_dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(_whole((x * y).sum()) for x, y in zip(xs, ys))


class ConjugateGradient(Hypergradient):
    """``−C x`` with ``x ≈ H⁻¹ v`` from ``cg_iterations`` conjugate-gradient steps on ``H x = v`` from 0 (Pedregosa
    2016, Rajeswaran et al. 2019). Stops early at a direction of non-positive curvature (H not positive definite
    there) or a zero residual. Each Hessian-vector product is averaged over the processes."""

    name = "cg"
    second_order = True

    def __init__(self, cg_iterations: int = 3) -> None:
        self.cg_iterations = _check_iterations("cg_iterations", cg_iterations)

    def implicit(self, v: Tensors, problem: LowerProblem) -> Tensors:
        params, upper = problem.params, problem.upper_params
        in_grad = torch.autograd.grad(problem.total_loss(), params, create_graph=True)
        x = [torch.zeros_like(vi) for vi in v]
        r = [vi.detach().clone() for vi in v]
        p = [ri.clone() for ri in r]
        rs = _tensor_dot(r, r)
        for _ in range(self.cg_iterations):
            if rs.item() == 0.0:
                break
            hp = problem.reduce(torch.autograd.grad(in_grad, params, grad_outputs=p, retain_graph=True))
            curvature = _tensor_dot(p, hp)
            if curvature.item() <= 0.0:
                break
            alpha = rs / curvature
            x = [xi + alpha * pi for xi, pi in zip(x, p)]
            r = [ri - alpha * hi for ri, hi in zip(r, hp)]
            rs_new = _tensor_dot(r, r)
            p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
            rs = rs_new
        out = torch.autograd.grad(in_grad, upper, grad_outputs=[-xi for xi in x], allow_unused=True)
        return _zeros_for_none(out, upper)


# ---- SAMA --------------------------------------------------------------------------------------------------------
def _param_groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, tuple[int, dict]]:
    return {id(p): (i, group) for i, group in enumerate(optimizer.param_groups) for p in group["params"]}


def adam_step_jacobian(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                       gradient: Sequence[torch.Tensor]) -> tuple[Tensors, list[int]]:
    """The diagonal of ``J = ∂d/∂g`` at the optimiser's last step, per parameter, and the index of its param group.

    ``d(g) = m̂ / (√ŝ + eps)`` is torch's (decoupled-weight-decay) Adam/AdamW update direction, ``θ_{t+1} = θ_t −
    lr·wd·θ_t − lr·d(g)``, with ``m = β₁m₀ + (1−β₁)g``, ``s = β₂s₀ + (1−β₂)g²``, ``m̂ = m/(1−β₁ᵗ)``, ``√ŝ =
    √s/√(1−β₂ᵗ)`` and ``m``, ``s``, ``t`` read from the optimiser's state *after* that step (``exp_avg``,
    ``exp_avg_sq``, ``step``); ``gradient`` is the g it consumed. Then, elementwise,

        J = [(1−β₁)/D − m(1−β₂)g / (√(1−β₂ᵗ) √s D²)] / (1−β₁ᵗ),   D = √s/√(1−β₂ᵗ) + eps

    (the second term is 0 where s = 0, its limit). Weight decay does not depend on g and contributes nothing.

    Raises:
        ValueError: with a sentence, for no optimiser, no state yet, a state that is not Adam's (``exp_avg``,
            ``exp_avg_sq``, ``step``), amsgrad, maximize, Adam's coupled weight decay, or a parameter it does not hold.
    """
    if optimizer is None:
        raise ValueError("sama needs the lower optimiser (LowerProblem.optimizer) and it is None")
    groups = _param_groups_by_param(optimizer)
    if not optimizer.state:
        raise ValueError(f"sama reads the lower optimiser's state, and {type(optimizer).__name__} has none yet: "
                         "it needs at least one lower optimiser step first")
    if gradient is None or len(gradient) != len(params):
        raise ValueError("sama needs LowerProblem.last_gradient: the gradient (one tensor per θ) the lower optimiser "
                         "consumed at its last step")
    out, group_index = [], []
    for p, g in zip(params, gradient):
        if id(p) not in groups:
            raise ValueError(f"the lower optimiser {type(optimizer).__name__} does not hold a θ of shape "
                             f"{tuple(p.shape)}")
        index, group = groups[id(p)]
        state = optimizer.state.get(p, {})
        if not all(k in state for k in ("exp_avg", "exp_avg_sq", "step")) or "betas" not in group:
            if not state:
                raise ValueError(f"the lower optimiser has no state for a θ of shape {tuple(p.shape)} yet: sama "
                                 "needs a lower optimiser step on it first")
            raise ValueError(f"sama needs an Adam/AdamW-like lower optimiser (state exp_avg, exp_avg_sq, step and "
                             f"betas), got {type(optimizer).__name__} with state {sorted(state)}")
        if group.get("amsgrad", False) or group.get("maximize", False):
            raise ValueError("sama supports Adam/AdamW without amsgrad and maximize")
        decoupled = group.get("decoupled_weight_decay", "adamw" in type(optimizer).__name__.lower())
        if group.get("weight_decay", 0.0) and not decoupled:
            raise ValueError("sama supports decoupled weight decay (AdamW) only: Adam's coupled weight decay adds "
                             "wd·θ_t to the gradient, and θ_t is gone after the step; use AdamW")
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, t = float(group["eps"]), float(state["step"])
        m, s = state["exp_avg"], state["exp_avg_sq"]
        g = g.detach().to(m.dtype)
        bc1, bc2_sqrt = 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)
        root = s.sqrt()
        denom = root / bc2_sqrt + eps
        second = torch.where(root > 0, m * g * (1.0 - beta2) / (bc2_sqrt * root.clamp_min(torch.finfo(s.dtype).tiny)
                                                                 * denom * denom), torch.zeros_like(m))
        out.append(((1.0 - beta1) / denom - second) / bc1)
        group_index.append(index)
    return out, group_index


class SAMA(Hypergradient):
    """SAMA (Choe et al., "Making Scalable Meta Learning Practical", NeurIPS 2023) on the Trainer's AdamW state:
    ``−C u`` with ``u = lr · J v`` (J: :func:`adam_step_jacobian`, the diagonal Jacobian of the AdamW update direction
    in the gradient at the last lower step, lr: the learning rate of that step), C applied by darts' central
    difference along u (``ε = darts_alpha / ‖u‖``, penalty skipped). Two first-order lower passes.

    Convention: the returned term is ``−lr · C · J v``, with lr included. Through one AdamW step ``θ_{t+1} = θ_t −
    lr·wd·θ_t − lr·d(g(θ_t, λ))`` the exact derivative of ``L_up(θ_{t+1}(λ))`` in λ (beyond the direct term) is
    ``−lr · C(θ_t) · J v`` with ``v = ∂L_up/∂θ`` at θ_{t+1}: this estimator evaluated with θ set to θ_t is that K=1
    unrolled derivative (SAMA's identity approximation of the base Jacobian makes no further change). Called after the
    step it evaluates C at the current θ = θ_{t+1}, a difference of order ``‖θ_{t+1} − θ_t‖``. Divide by lr for the
    convention without it (the update direction's Jacobian only).
    """

    name = "sama"

    def __init__(self, darts_alpha: float = 0.01) -> None:
        self.darts_alpha = _check_finite_positive("darts_alpha", darts_alpha)

    def preconditioned(self, v: Tensors, problem: LowerProblem) -> Tensors:
        """``u = lr · J v``, one tensor per θ."""
        jac, group_index = adam_step_jacobian(problem.optimizer, problem.params, problem.last_gradient)
        lr = problem.learning_rate
        groups = problem.optimizer.param_groups
        if lr is None:
            rates = [float(groups[i]["lr"]) for i in group_index]
        elif isinstance(lr, (int, float)):
            rates = [float(lr)] * len(group_index)
        else:
            if len(lr) != len(groups):
                raise ValueError(f"learning_rate has {len(lr)} values for {len(groups)} param groups")
            rates = [float(lr[i]) for i in group_index]
        return [(rate * j).to(vi.dtype) * vi.detach() for rate, j, vi in zip(rates, jac, v)]

    def implicit(self, v: Tensors, problem: LowerProblem) -> Tensors:
        return _darts_difference(self.preconditioned(v, problem), problem, self.darts_alpha)


# ---- damped solve -------------------------------------------------------------------------------------------------
class DampedSolve(Hypergradient):
    """``−C z`` with ``z`` a warm-started solution of the damped system ``A z = v``, ``A = H + δI`` (δ =
    ``damped_solve_damping``; H the lower Hessian of task loss + penalty on the lower batch, at the current θ, λ).

    Each call takes one step of Craig's method (conjugate gradients on the normal equations, which minimises the
    error ``‖z − A⁻¹v‖``) from the z of the previous call, with every product recomputed at the current point:

        r = v − A z,   z ← z + a·A r + b·A q,   (a, b) = argmin ‖A⁻¹v − z − a·A r − b·A q‖

    where q is the preimage of the previous call's step (the step was ``A q`` then). The error is computable without
    A⁻¹: ``(A r)ᵀ(A⁻¹v − z) = ‖r‖²`` and ``(A q)ᵀ(A⁻¹v − z) = qᵀr``, so (a, b) solve a 2×2 Gram system. Hence, for
    any symmetric non-singular A (positive definite or not, no curvature sign or step size needed): every call
    decreases ``‖z − A⁻¹v‖`` for the current θ, batch and v, at least by the minimal-error step's factor
    √(1 − 1/κ(A)²); and while they stay fixed the iterates are Craig's, exact after dim(θ) calls, with error ≤
    2((κ−1)/(κ+1))ᵏ·‖e₀‖ after k calls.

    Products from first-order gradients of task loss + penalty (``grad_fn``), no double backward: a central pair at
    ``θ ± εz`` gives ``A z`` and ``C z`` (``ε = darts_alpha/‖z‖``) and, as its mean, ∇θL(θ) to O(ε²); one forward
    difference each at ``θ + εr`` and ``θ + εq`` gives ``A r`` and ``A q``. Four lower passes per call (two on a
    cold start: z = 0, term 0, a central pair along r = v). The limit is set by the central ``A z`` (``r = 0``); the
    O(darts_alpha) error of the forward differences only changes the search directions. Every product is averaged
    over the processes, so z and q are the same on every process. State: z and q (CPU tensors in
    :meth:`state_dict`) and the call count.
    """

    name = "damped_solve"

    def __init__(self, darts_alpha: float = 0.01, damped_solve_damping: float = 1.0) -> None:
        self.darts_alpha = _check_finite_positive("darts_alpha", darts_alpha)
        damping = damped_solve_damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
                or damping < 0:
            raise ValueError(f"damped_solve_damping must be a finite number >= 0, got {damping!r}")
        self.damped_solve_damping = float(damping)
        self.reset()

    def reset(self) -> None:
        self._z: Tensors | None = None
        self._q: Tensors | None = None
        self.calls = 0

    # -- state --
    def state_dict(self) -> dict:
        def cpu(ts):
            return None if ts is None else [t.detach().to("cpu", copy=True) for t in ts]

        return {"z": cpu(self._z), "q": cpu(self._q), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        missing = {"z", "q", "calls"} - set(state)
        if missing:
            raise ValueError(f"damped_solve state lacks {sorted(missing)}")
        self._z, self._q, self.calls = state["z"], state["q"], int(state["calls"])

    @staticmethod
    def _placed(tensors: Tensors | None, params: Sequence[torch.Tensor]) -> Tensors | None:
        if tensors is None:
            return None
        if len(tensors) != len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
            raise ValueError("damped_solve state does not match the lower parameters (count or shapes differ); "
                             "reset() it for a new problem")
        return [t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, params)]

    # -- products --
    @staticmethod
    def _gradients_at(problem: LowerProblem, saved: Tensors, u: Tensors, eps: float,
                      inputs: list[torch.Tensor]) -> Tensors:
        """First-order gradients of task loss + penalty at ``θ + eps·u`` (θ = ``saved``)."""
        with torch.no_grad():
            for p, s, ui in zip(problem.params, saved, u):
                p.data.copy_(s).add_(ui, alpha=eps)
        return problem.first_order_grads(problem.total_loss(), inputs)

    def _cold_products(self, problem: LowerProblem, r: Tensors) -> Tensors:
        """``H r`` from a central pair along r, averaged over processes."""
        params = problem.params
        eps = self.darts_alpha / math.sqrt(_dot(r, r))
        with _restoring(params) as saved:
            plus = self._gradients_at(problem, saved, r, eps, params)
            minus = self._gradients_at(problem, saved, r, -eps, params)
        return problem.reduce([(a - b).div_(2 * eps) for a, b in zip(plus, minus)])

    def _warm_products(self, problem: LowerProblem, z: Tensors, q: Tensors | None, v: Tensors
                       ) -> tuple[Tensors, Tensors, Tensors | None, Tensors | None]:
        """``(C z, r = v − A z, H r, H q)``: a central pair along z, then forward differences along r and q from the
        pair's mean gradient; the H products averaged over processes (``H r``, ``H q`` None when r = 0)."""
        params, upper, alpha, delta = problem.params, problem.upper_params, self.darts_alpha, self.damped_solve_damping
        n = len(params)
        with _restoring(params) as saved:
            eps = alpha / math.sqrt(_dot(z, z))
            plus = self._gradients_at(problem, saved, z, eps, params + upper)
            minus = self._gradients_at(problem, saved, z, -eps, params + upper)
            hz = problem.reduce([(a - b).div_(2 * eps) for a, b in zip(plus[:n], minus[:n])])
            cz = [(a - b).div_(2 * eps) for a, b in zip(plus[n:], minus[n:])]
            base = [(a + b).mul_(0.5) for a, b in zip(plus[:n], minus[:n])]  # ∇θL(θ) + O(ε²)
            del plus, minus
            r = [vi - h - delta * zi for vi, h, zi in zip(v, hz, z)]
            if not _dot(r, r) > 0.0:
                return cz, r, None, None
            products = []
            for u in (r, q):
                if u is None:
                    products.append(None)
                    continue
                eps = alpha / math.sqrt(_dot(u, u))
                at = self._gradients_at(problem, saved, u, eps, params)
                products.append(problem.reduce([(a - b).div_(eps) for a, b in zip(at, base)]))
        return cz, r, products[0], products[1]

    # -- the estimator --
    def implicit(self, v: Tensors, problem: LowerProblem) -> Tensors:
        params, upper, delta = problem.params, problem.upper_params, self.damped_solve_damping
        v = [vi.detach() for vi in v]
        z, q = self._placed(self._z, params), self._placed(self._q, params)
        self.calls += 1
        if z is None or _dot(z, z) == 0.0:  # cold start
            z, q, r = [torch.zeros_like(vi) for vi in v], None, [vi.clone() for vi in v]
            implicit = [torch.zeros_like(x) for x in upper]
            hr = self._cold_products(problem, r) if _dot(r, r) > 0.0 else None
            hq = None
        else:
            if q is not None and not _dot(q, q) > 0.0:
                q = None
            cz, r, hr, hq = self._warm_products(problem, z, q, v)
            implicit = [c.neg_() for c in cz]
        rr = _dot(r, r)
        d = None if hr is None else [h + delta * ri for h, ri in zip(hr, r)]
        dd = 0.0 if d is None else _dot(d, d)
        if not (rr > 0.0 and math.isfinite(rr) and dd > 0.0 and math.isfinite(dd)):
            self._z, self._q = z, None  # converged (r = 0), or nothing sensible to step along
            return implicit
        a, b = rr / dd, 0.0
        if q is not None and hq is not None:
            p = [h + delta * qi for h, qi in zip(hq, q)]
            a, b = _two_directions(rr, dd, _dot(d, p), _dot(p, p), _dot(q, r), a)
        if b:
            self._z = [zi + a * di + b * pi for zi, di, pi in zip(z, d, p)]
            self._q = [a * ri + b * qi for ri, qi in zip(r, q)]
        else:
            self._z = [zi + a * di for zi, di in zip(z, d)]
            self._q = [a * ri for ri in r]
        return implicit


def _two_directions(rr: float, dd: float, dp: float, pp: float, qr: float, a_me: float) -> tuple[float, float]:
    """(a, b) minimising ``‖e − a d − b p‖`` given ``dᵀe = rr`` and ``pᵀe = qr`` (the 2×2 Gram system); the
    minimal-error step ``(a_me, 0)`` when the system is ill-conditioned or predicts a smaller decrease."""
    det = dd * pp - dp * dp
    if not (pp > 0.0 and det > 1e-12 * dd * pp):
        return a_me, 0.0
    a = (pp * rr - dp * qr) / det
    b = (dd * qr - dp * rr) / det
    if not (math.isfinite(a) and math.isfinite(b)) or a * rr + b * qr < a_me * rr:
        return a_me, 0.0
    return a, b


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------
ESTIMATORS: dict[str, type[Hypergradient]] = {
    cls.name: cls for cls in (FirstOrder, Darts, Neumann, ConjugateGradient, SAMA, DampedSolve)
}


def _accepted_settings(cls: type[Hypergradient]) -> list[str]:
    """The keyword settings ``cls.__init__`` names (none for a class without its own ``__init__``)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind in kinds]


def build_hypergradient(name: str, **settings) -> Hypergradient:
    """The estimator ``name`` built from the settings it accepts (the others are ignored, so a caller can pass all).

    Raises:
        ValueError: for an unknown name (naming the choices) or a setting out of range (naming it).
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown hypergradient {name!r}; choose one of {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    return cls(**{k: v for k, v in settings.items() if k in _accepted_settings(cls)})
