"""BiDoRA's bi-level optimisation: who trains what, on which split, through which hypergradient.

* The **lower level** (:class:`LowerLevel`) owns the directions θ (``lora_A``, ``lora_B``, the task head) and the loss
  ``L_low = task loss + γ · orthogonality penalty`` on the lower (training) split. transformers' Trainer takes its
  optimisation steps (:mod:`loralib.bidora_trainer`): this module never steps θ.
* The **upper level** (:class:`UpperLevel`) owns the magnitudes λ and the loss ``L_up`` = the task loss on the
  held-out upper split. After every ``unroll_steps`` lower steps it takes one AdamW step on λ along the hypergradient

      dL_up/dλ = ∂L_up/∂λ + implicit term,    implicit ≈ −∂²L_low/∂λ∂θ · (∂²L_low/∂θ²)⁻¹ · ∂L_up/∂θ

  where the implicit term comes from an estimator of :mod:`loralib.hypergradients` (``darts``, the paper's, by
  default; ``first_order`` drops it). Both derivatives are taken in one backward of ``L_up``.
* The magnitudes stay inside the adapted layers: one model, two parameter sets, switched by
  :func:`loralib.model.magnitudes_trainable`.

Every evaluation of ``L_low`` inside a hypergradient runs under one per-step seed (the same dropout masks each
time) and ``L_up`` under its batch's seed, so the upper step moves neither the global RNG nor the batch; both losses
are the caller's (the Trainer's: label smoothing, ``compute_loss_func``, a ``compute_loss`` override). Under data
parallelism ``v = ∂L_up/∂θ``, the direct and implicit terms and every Hessian-vector product are averaged over the
processes: N processes compute what one process computes on the same global batch.

The two levels are Betty problems (``training_step(batch)`` is each level's loss on one batch); Betty's Engine and
its global hypergradient table are not used: the Trainer is the loop and the estimators are chosen from a local table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from betty.configs import Config
from betty.logging.logger_base import get_logger as betty_logger
from betty.problems import ImplicitProblem
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import seeded_rng
from .gradients import gradients, mean_over_processes, zeros_for_none
from .hypergradients import Hypergradient, LowerProblem
from .model import magnitudes_trainable

# Betty logs problem information at INFO on stdout; the Trainer does the logging.
betty_logger().setLevel(logging.WARNING)


class _Parameters(nn.Module):
    """A module whose only parameters are the given ones (shared, not copied): what Betty calls a problem's module."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


def _check_sharded(hypergradient: Hypergradient, by_backward: bool) -> None:
    """FSDP2-sharded parameters (``DTensor``) are reached by ``backward()`` only: ``torch.autograd.grad`` returns None
    for them, which would make every gradient silently zero."""
    if hypergradient.second_order:
        raise ValueError(
            f"hypergradient={hypergradient.name!r} differentiates the lower loss twice through torch.autograd.grad, "
            "which does not reach FSDP2-sharded parameters (FSDP2 reaches them only through backward()); use "
            "first_order, darts, sama or damped_solve (first-order gradients only) with a sharded model")
    if not by_backward:
        raise ValueError("the model's parameters are FSDP2-sharded (DTensor): torch.autograd.grad does not reach "
                         "them; build the UpperLevel with by_backward=True (and leaves=every other trainable leaf)")


class LowerLevel(ImplicitProblem):
    """The lower problem: the directions θ and ``L_low(batch) = task_loss(batch) + penalty()``.

    Args:
        params: θ, the direction parameters (``loralib.direction_parameters(model)``).
        task_loss: the task loss of one lower batch, a float32 scalar (the Trainer's training loss, in full
            precision: the estimators' finite differences are noise in bf16 / fp16).
        penalty: the λ-independent regulariser of the lower loss (``γ · orthogonality_penalty``), or None.
        device: where the batches live (seeds the CUDA RNG there).
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        task_loss: Callable[[dict], torch.Tensor],
        penalty: Callable[[], torch.Tensor] | None,
        device: torch.device | str,
    ) -> None:
        super().__init__("direction", Config(log_step=-1), module=_Parameters(params))
        self._params, self._task_loss, self.penalty = list(params), task_loss, penalty
        self._strategy, self.device = "default", torch.device(device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._params

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def training_step(self, batch: dict) -> torch.Tensor:
        """The task part of ``L_low`` on ``batch`` (the penalty is added by the estimators that need it)."""
        return self._task_loss(batch)

    def at(self, batch: dict, seed: int, upper_params: Sequence[nn.Parameter], **optimizer_state) -> LowerProblem:
        """The lower problem at the current θ on ``batch`` as the estimators see it: ``loss()`` evaluates the task
        loss under ``seed`` (the same dropout masks every call, the global RNG untouched)."""

        def loss() -> torch.Tensor:
            with seeded_rng(seed, self.device):
                return self.training_step(batch)

        return LowerProblem(
            params=self._params, upper_params=list(upper_params), loss=loss, penalty=self.penalty,
            reduce=mean_over_processes, **optimizer_state,
        )


class UpperLevel(ImplicitProblem):
    """The upper problem: the magnitudes λ, trained on held-out batches through ``hypergradient``.

    Args:
        model: the adapted model (its magnitudes are made trainable for the upper step only).
        params: λ (``loralib.magnitude_parameters(model)``).
        task_loss: the task loss of one upper batch (the Trainer's training loss, without the lower penalty).
        lower: the lower level.
        hypergradient: an estimator of :mod:`loralib.hypergradients` (``build_hypergradient``).
        optimizer, scheduler: λ's optimiser and schedule (one scheduler step per upper step).
        by_backward: take first-order gradients through ``backward()`` into ``.grad`` (reentrant activation
            checkpointing, FSDP2); ``leaves`` are then every other trainable leaf, whose ``.grad`` is put back.

    Raises:
        ValueError: FSDP2-sharded parameters (``DTensor``) with ``by_backward=False`` or a second-order estimator
            (``autograd.grad`` does not reach them).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        task_loss: Callable[[dict], torch.Tensor],
        lower: LowerLevel,
        hypergradient: Hypergradient,
        optimizer: torch.optim.Optimizer,
        scheduler,
        by_backward: bool = False,
        leaves: Sequence[torch.Tensor] = (),
    ) -> None:
        super().__init__("magnitude", Config(log_step=-1), module=_Parameters(params), optimizer=optimizer,
                         scheduler=scheduler)
        self.model, self._params, self._task_loss, self.lower = model, list(params), task_loss, lower
        self.hypergradient, self.by_backward, self._leaves = hypergradient, by_backward, list(leaves)
        self._strategy, self.device = "default", lower.device
        if any(isinstance(p, DTensor) for p in self._params + lower.trainable_parameters()):
            _check_sharded(hypergradient, by_backward)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._params

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def training_step(self, batch: dict) -> torch.Tensor:
        """``L_up`` on ``batch``."""
        return self._task_loss(batch)

    def _grad(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor]):
        return gradients(loss, inputs, by_backward=self.by_backward, leaves=self._leaves)

    def kernels(self):
        """Second-order estimators differentiate ``L_low`` twice: fused attention kernels have no double backward;
        the math kernel computes the same attention and has one."""
        return sdpa_kernel(SDPBackend.MATH) if self.hypergradient.second_order else nullcontext()

    def hypergradient_of(
        self, upper_batch: dict, upper_seed: int, lower_batch: dict, lower_seed: int, **optimizer_state
    ) -> tuple[float, list[torch.Tensor]]:
        """``(L_up, dL_up/dλ)`` at the current θ: ``L_up`` on ``upper_batch`` (dropout seed ``upper_seed``), the
        implicit term through ``L_low`` on ``lower_batch`` (seed ``lower_seed``). ``optimizer_state``: what SAMA reads
        (``optimizer``, ``last_gradient``, ``learning_rate``). Both are averaged over processes."""
        mags, theta = self._params, self.lower.trainable_parameters()
        estimator = self.hypergradient
        with magnitudes_trainable(self.model):
            with seeded_rng(upper_seed, self.device):
                loss = self.training_step(upper_batch)
            if estimator.name == "first_order":
                total = mean_over_processes(zeros_for_none(self._grad(loss, mags), mags))
            else:
                grads = self._grad(loss, mags + theta)
                direct = mean_over_processes(zeros_for_none(grads[: len(mags)], mags))
                v = mean_over_processes(zeros_for_none(grads[len(mags) :], theta))
                problem = self.lower.at(lower_batch, lower_seed, mags, grad_fn=self._grad, **optimizer_state)
                with self.kernels():  # the whole implicit term: checkpointing recomputes with the same kernel
                    implicit = estimator.implicit(v, problem)
                implicit = mean_over_processes(zeros_for_none(implicit, mags))
                total = [d + i for d, i in zip(direct, implicit)]
        return float(mean_over_processes([loss.detach().float()])[0]), total

    def step(
        self, upper_batch: dict, upper_seed: int, lower_batch: dict, lower_seed: int, step: int, **optimizer_state
    ) -> float:
        """One magnitude step; returns ``L_up``. ``step`` (the lower step count) names the step in the error raised
        for a non-finite loss or hypergradient (nothing is updated then).

        Raises:
            FloatingPointError: a non-finite upper loss or hypergradient.
        """
        loss, grads = self.hypergradient_of(upper_batch, upper_seed, lower_batch, lower_seed, **optimizer_state)
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
