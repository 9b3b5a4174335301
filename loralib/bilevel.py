"""BiDoRA's bi-level optimisation: directions (A, B, head) below, magnitudes above, as two Betty problems.

The lower problem (:class:`LowerLevel`) holds the direction parameters and the loss ``task loss + γ ·
orthogonality_penalty`` on the lower split; transformers' Trainer takes its optimisation steps
(:mod:`loralib.bidora_trainer`). The upper problem (:class:`UpperLevel`) trains the magnitude vectors on the held-out
upper split with the task loss, through a hypergradient: ``darts`` (finite differences), ``neumann``, ``cg`` or
``first_order`` (direct term only). The magnitudes stay inside the adapted layers: one model, two parameter sets.

What this module adds around Betty 0.2.1 (see docs/ and the Betty notes for why each exists):

* both problems return exactly their own parameters from ``trainable_parameters()`` / ``parameters()``;
* every evaluation of the lower loss for the hypergradient runs under one per-step RNG seed, so the two finite-
  difference evaluations of ``darts`` (and the re-evaluations of ``neumann`` / ``cg``) see the same dropout masks;
* ``darts`` restores the lower parameters exactly (Betty's add/subtract round trip changes them by rounding) and
  skips the regulariser in its evaluations (it does not depend on the magnitudes);
* ``cg`` is a correct conjugate-gradient solve (the 0.2.1 release updates the search direction from the old
  residual and never converges); ``neumann`` is Betty's series with the step size it is given;
* under data parallelism ``v``, the direct and implicit terms and every Hessian-vector product are averaged over the
  processes: N processes compute what one process computes on the same global batch;
* :class:`BatchStream`: seeded, epoch-shuffled, resumable, per-rank sharded batches (the upper split's).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from betty import hypergradient as betty_hypergradient
from betty.configs import Config
from betty.hypergradient.darts import darts as betty_darts
from betty.logging.logger_base import get_logger as betty_logger
from betty.problems import ImplicitProblem
from betty.utils import neg_with_none, replace_none_with_zero
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

from .model import joint_magnitude_training

HYPERGRADIENTS = ("darts", "neumann", "cg", "first_order")

# Betty logs problem information at INFO on stdout; the Trainer does the logging.
betty_logger().setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------------------------------
# Hypergradient functions registered with Betty under our own names (Betty reads the name from the lower Config).
# ------------------------------------------------------------------------------------------------------------------
def _exact_darts(vector, curr, prev, sync):
    """Betty's ``darts``, then the lower parameters are put back bit for bit (θ + εv − 2εv + εv ≠ θ in floats).

    Its two evaluations differentiate the lower loss with respect to the upper parameters only, so terms of the lower
    loss that do not depend on them (the orthogonality penalty: V̂ is independent of the magnitudes) are skipped.
    """
    saved = [p.detach().clone() for p in curr.meta_trainable_parameters()]
    curr.skip_upper_independent = True
    try:
        out = betty_darts(vector, curr, prev, sync)
    finally:
        curr.skip_upper_independent = False
    with torch.no_grad():
        for p, s in zip(curr.meta_trainable_parameters(), saved):
            p.copy_(s)
    return out


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys))


def _conjugate_gradient(vector, curr, prev, sync):
    """Implicit term ``−∂²L_tr/∂λ∂θ · H⁻¹ v`` with ``H⁻¹ v`` from ``cg_iterations`` steps of conjugate gradient.

    Standard CG on ``H x = v`` (``H`` the lower Hessian on the lower problem's current batch): the search direction
    is built from the *new* residual, and the loop stops early if a direction of non-positive curvature shows up
    (``H`` not positive definite there) or the residual vanishes.
    """
    params = curr.trainable_parameters()
    in_loss = curr.training_step_exec(curr.cur_batch)
    in_grad = torch.autograd.grad(in_loss, params, create_graph=True)
    x = [torch.zeros_like(v) for v in vector]
    r = [v.detach().clone() for v in vector]
    p = [v.clone() for v in r]
    rs = _dot(r, r)
    for _ in range(curr.config.cg_iterations):
        if rs.item() == 0.0:
            break
        hp = mean_over_processes(torch.autograd.grad(in_grad, params, grad_outputs=p, retain_graph=True))
        curvature = _dot(p, hp)
        if curvature.item() <= 0.0:
            break
        alpha = rs / curvature
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * hi for ri, hi in zip(r, hp)]
        rs_new = _dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    x = [neg_with_none(xi) for xi in x]
    if sync:
        torch.autograd.backward(in_grad, inputs=prev.trainable_parameters(), grad_tensors=x)
        return None
    return torch.autograd.grad(in_grad, prev.trainable_parameters(), grad_outputs=x, allow_unused=True)


def _neumann(vector, curr, prev, sync):
    """Implicit term ``−∂²L_tr/∂λ∂θ · H⁻¹ v`` with ``H⁻¹ v ≈ α Σ_{k=0..K} (I − αH)^k v`` (``K = neumann_iterations``,
    ``α = neumann_alpha``; converges for ``α < 2 / λ_max(H)``). Betty's own, except that under data parallelism
    each Hessian-vector product is averaged over the processes: the series of the global batch's Hessian."""
    params = curr.trainable_parameters()
    in_loss = curr.training_step_exec(curr.cur_batch)
    in_grad = torch.autograd.grad(in_loss, params, create_graph=True)
    alpha = curr.config.neumann_alpha
    term = [v.detach() for v in vector]
    total = list(term)
    for _ in range(curr.config.neumann_iterations):
        hvp = mean_over_processes(torch.autograd.grad(in_grad, params, grad_outputs=term, retain_graph=True))
        term = [t - alpha * h for t, h in zip(term, hvp)]
        total = [s + t for s, t in zip(total, term)]
    weights = [-alpha * s for s in total]
    if sync:
        torch.autograd.backward(in_grad, inputs=prev.trainable_parameters(), grad_tensors=weights)
        return None
    return torch.autograd.grad(in_grad, prev.trainable_parameters(), grad_outputs=weights, allow_unused=True)


def mean_over_processes(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The element-wise mean of ``tensors`` over the processes of a data-parallel run (unchanged in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors)
    out = []
    for t in tensors:
        if t is not None:
            t = t.detach().clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(dist.get_world_size())
        out.append(t)
    return out


betty_hypergradient.jvp_fn_mapping["loralib_darts"] = _exact_darts
betty_hypergradient.jvp_fn_mapping["loralib_neumann"] = _neumann
betty_hypergradient.jvp_fn_mapping["loralib_cg"] = _conjugate_gradient


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------
def split_indices(n: int, upper_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(n)`` into (lower, upper) with ``round(n · upper_fraction)`` upper items."""
    if not 0.0 <= upper_fraction < 1.0:
        raise ValueError(f"upper_fraction must be in [0, 1), got {upper_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_upper = int(round(n * upper_fraction))
    if upper_fraction > 0 and (n_upper == 0 or n_upper == n):
        raise ValueError(f"cannot split {n} examples with upper_fraction={upper_fraction}: one side would be empty")
    return sorted(perm[n_upper:]), sorted(perm[:n_upper])


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so different streams/epochs/positions never share a seed."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class BatchStream:
    """Endless, seeded, epoch-shuffled batches over ``indices`` of ``dataset``; resumable at ``(epoch, position)``.

    Each epoch is a fresh ``torch.randperm`` from a generator seeded with ``(seed, epoch)``. Under data parallelism
    every global batch of ``batch_size · world_size`` items is cut into one slice per rank; the incomplete last global
    batch of an epoch is dropped so all ranks take the same number of steps. Each batch also carries a seed (for the
    dropout masks of every evaluation of that batch), a function of ``(seed, epoch, position, rank)`` only.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        batch_size: int,
        collate_fn: Callable,
        seed: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.batch_size, self.collate_fn, self.seed = batch_size, collate_fn, seed
        self.device, self.rank, self.world_size, self.num_workers = torch.device(device), rank, world_size, num_workers
        if len(self.indices) < batch_size * world_size:
            raise ValueError(
                f"{len(self.indices)} examples cannot fill one batch of {batch_size} x {world_size} process(es); "
                "lower the batch size or use more data"
            )
        self.epoch, self.position = 0, 0
        self._iterator: Iterator | None = None
        self.batch_seed = 0

    def __len__(self) -> int:
        """Batches per epoch (per rank)."""
        return len(self.indices) // (self.batch_size * self.world_size)

    def _epoch_batches(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.indices), generator=gen).tolist()
        span = self.batch_size * self.world_size
        start = self.rank * self.batch_size
        return [
            [self.indices[i] for i in order[b * span + start : b * span + start + self.batch_size]]
            for b in range(len(self))
        ]

    def _start_iterator(self) -> None:
        batches = self._epoch_batches()[self.position :]
        loader = DataLoader(
            self.dataset, batch_sampler=batches, collate_fn=self.collate_fn, num_workers=self.num_workers
        )
        self._iterator = iter(loader)

    def next(self) -> dict:
        """The next batch as a dict of tensors on ``device``; sets :attr:`batch_seed`."""
        if self.position >= len(self):
            self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._start_iterator()
        batch = next(self._iterator)
        if not isinstance(batch, Mapping):
            raise TypeError(f"collate_fn must return a mapping of tensors (e.g. a dict), got {type(batch).__name__}")
        self.batch_seed = _mix_seed(self.seed, 0x5EED, self.epoch, self.position, self.rank)
        self.position += 1
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._iterator = int(state["epoch"]), int(state["position"]), None


@contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Run the body with the global RNG (CPU, and the current CUDA device) seeded, then restore it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


class ParameterHolder(nn.Module):
    """A module whose only parameters are the given ones (shared, not copied)."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


# ------------------------------------------------------------------------------------------------------------------
# The two levels as driven by transformers' Trainer (loralib.BiDoRATrainer): the Trainer's loop takes the lower
# (direction) steps with its own optimiser; after every ``unroll_steps`` of them :meth:`UpperLevel.step` takes one
# magnitude step through Betty's hypergradient. No Betty Engine: its loop is the Trainer's.
# ------------------------------------------------------------------------------------------------------------------
_TRAINER_BETTY_TYPE = {"darts": "loralib_darts", "neumann": "loralib_neumann", "cg": "loralib_cg"}


class LowerLevel(ImplicitProblem):
    """Betty's view of the lower problem: the direction parameters (lora_A, lora_B, head) and their loss
    ``task_loss(batch) + extra_loss()`` on the lower batch the Trainer last stepped on (``cur_batch``).

    The hypergradients evaluate this loss (darts twice, at ``θ ± εv``; neumann and cg through its Hessian) under the
    per-step seed ``batch_seed``, so every evaluation sees the same dropout masks.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        task_loss: Callable[[dict], torch.Tensor],
        extra_loss: Callable[[], torch.Tensor] | None,
        config: Config,
        device: torch.device,
    ) -> None:
        super().__init__("direction", config, module=ParameterHolder(params))
        self._params, self._task_loss, self._extra_loss = list(params), task_loss, extra_loss
        self._strategy, self.device = "default", torch.device(device)
        self.skip_upper_independent = False
        self.batch_seed = 0

    def trainable_parameters(self):
        return self._params

    def parameters(self):
        return self._params

    def attention_kernels(self):
        """neumann / cg differentiate the lower loss twice: fused attention kernels have no double backward, the
        math kernel computes the same attention and has one. (The whole implicit term runs inside, so that
        gradient checkpointing recomputes with the same kernel.)"""
        second_order = self.config.type in ("loralib_neumann", "loralib_cg")
        return sdpa_kernel(SDPBackend.MATH) if second_order else nullcontext()

    def training_step(self, batch):
        with seeded_rng(self.batch_seed, self.device), self.attention_kernels():
            loss = self._task_loss(batch)
        if self._extra_loss is not None and not self.skip_upper_independent:
            loss = loss + self._extra_loss()
        return loss


class UpperLevel(ImplicitProblem):
    """The upper problem: the magnitude vectors, trained on held-out batches through the hypergradient
    ``dL_up/dλ = ∂L_up/∂λ + implicit term`` (``first_order``: the direct term only).

    Under data parallelism ``v = ∂L_up/∂θ``, the direct gradient and the implicit term are each averaged over the
    processes (and neumann / cg average every Hessian-vector product), so N processes compute what one process
    computes on the same global batch.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        task_loss: Callable[[dict], torch.Tensor],
        lower: LowerLevel,
        hypergradient: str,
        optimizer: torch.optim.Optimizer,
        scheduler,
        device: torch.device,
    ) -> None:
        if hypergradient not in HYPERGRADIENTS:
            raise ValueError(f"hypergradient must be one of {HYPERGRADIENTS}, got {hypergradient!r}")
        config = Config(type=lower.config.type, first_order=True, retain_graph=True, log_step=-1)
        super().__init__("magnitude", config, module=ParameterHolder(params), optimizer=optimizer, scheduler=scheduler)
        self.model, self._params, self._task_loss, self.lower = model, list(params), task_loss, lower
        self.hypergradient = hypergradient
        self._strategy, self.device = "default", torch.device(device)

    def trainable_parameters(self):
        return self._params

    def parameters(self):
        return self._params

    def hypergradient_of(self, batch: dict) -> tuple[float, list[torch.Tensor]]:
        """``(upper loss, dL_up/dλ)`` on ``batch`` at the current directions; needs ``lower.cur_batch`` set."""
        mags, lower_params = self._params, self.lower.trainable_parameters()
        with joint_magnitude_training(self.model), _requiring_grad(mags):
            loss = self._task_loss(batch)
            grads = torch.autograd.grad(loss, mags + lower_params, allow_unused=True)
            direct = mean_over_processes(replace_none_with_zero(grads[: len(mags)], mags))
            total = direct
            if self.hypergradient != "first_order":
                vector = mean_over_processes(replace_none_with_zero(grads[len(mags) :], lower_params))
                with self.lower.attention_kernels():
                    jvp = betty_hypergradient.jvp_fn_mapping[self.lower.config.type]
                    implicit = jvp(vector, self.lower, self, False)
                implicit = mean_over_processes(replace_none_with_zero(implicit, mags))
                total = [d + i for d, i in zip(direct, implicit)]
        return float(mean_over_processes([loss.detach().float()])[0]), total

    def step(self, batch: dict, step: int) -> float:
        """One magnitude step on ``batch``; returns the upper loss. ``step`` (the lower step count) names the step in
        the error raised for a non-finite loss or hypergradient (nothing is updated then)."""
        loss, grads = self.hypergradient_of(batch)
        if not math.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads):
            what = f"loss {loss}" if not math.isfinite(loss) else "hypergradient"
            raise FloatingPointError(
                f"non-finite upper-level (magnitude) {what} at step {step}; stopping (lower the learning rates)"
            )
        for p, g in zip(self._params, grads):
            p.grad = g.to(p.dtype)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


@contextmanager
def _requiring_grad(params: Sequence[nn.Parameter]):
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, value in zip(params, before):
            p.requires_grad_(value)


def lower_config(hypergradient: str, darts_alpha: float, neumann_iterations: int, neumann_alpha: float,
                 cg_iterations: int) -> Config:
    """Betty's ``Config`` of the lower problem (Betty reads the hypergradient settings from it)."""
    return Config(
        type=_TRAINER_BETTY_TYPE.get(hypergradient, "loralib_darts"),
        darts_alpha=darts_alpha,
        neumann_iterations=neumann_iterations,
        neumann_alpha=neumann_alpha,
        cg_iterations=cg_iterations,
        log_step=-1,
    )
