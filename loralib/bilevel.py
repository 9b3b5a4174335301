"""BiDoRA's bi-level optimisation on Betty: directions (A, B, head) below, magnitudes above.

The lower problem trains the direction parameters on the lower split with
``task loss + γ · orthogonality_penalty``; the upper problem trains the magnitude vectors on the upper split with the
task loss, through Betty's hypergradient (the magnitudes stay inside the adapted layers: one model, two parameter
sets). The same machinery runs single-level baselines (one problem, no upper level), so every method goes through
the same code path.

What this module adds around Betty 0.2.1 (see docs/ and the Betty notes for why each exists):

* both problems return exactly their own parameters from ``trainable_parameters()`` / ``parameters()``: Betty
  otherwise rebuilds the optimiser over every module parameter, frozen pretrained weights included;
* batches come from :class:`BatchStream` (seeded, epoch-shuffled, resumable at ``(epoch, position)``, sharded per
  rank) as plain dicts, and every loss evaluation of a batch runs under a per-batch RNG seed, so the two finite-
  difference evaluations of ``darts`` (and the re-evaluations of ``neumann`` / ``cg``) see the same dropout masks;
* ``darts`` restores the lower parameters exactly (Betty's add/subtract round trip changes them by rounding);
* ``cg`` is a correct conjugate-gradient solve (the 0.2.1 release updates the search direction from the old
  residual and never converges);
* DDP on CPU (gloo) as well as CUDA (nccl): the device is chosen from ``LOCAL_RANK``, the magnitudes are kept out of
  the lower problem's DDP reducer and their hypergradient is all-reduced explicitly.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from betty import hypergradient as betty_hypergradient
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.hypergradient.darts import darts as betty_darts
from betty.logging.logger_base import get_logger as betty_logger
from betty.problems import ImplicitProblem
from betty.utils import neg_with_none, replace_none_with_zero
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

from .model import allow_joint_magnitude_training, joint_magnitude_training, orthogonality_penalty

HYPERGRADIENTS = ("darts", "neumann", "cg", "first_order")
LossFn = Callable[[nn.Module, dict], torch.Tensor]

# Betty logs problem/engine information at INFO on stdout; our trainer has its own progress bar and CSV log.
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
_BETTY_TYPE = {"darts": "loralib_darts", "neumann": "neumann", "cg": "loralib_cg", "first_order": "loralib_darts"}


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


# ------------------------------------------------------------------------------------------------------------------
# Optimisers and schedules that survive Betty's rebuild (class(params, **defaults); LambdaLR by introspection).
# ------------------------------------------------------------------------------------------------------------------
def make_optimizer(
    params: Sequence[nn.Parameter], lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-6
) -> torch.optim.Optimizer:
    """AdamW semantics through ``Adam(decoupled_weight_decay=True)``: Betty cannot rebuild ``AdamW`` on torch 2.13."""
    return torch.optim.Adam(
        list(params), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True
    )


class LinearWarmupDecay:
    """Multiplier for ``LambdaLR``: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def __init__(self, total: int, warmup_ratio: float) -> None:
        self.total = max(int(total), 1)
        self.warmup = int(math.ceil(self.total * warmup_ratio))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total - step) / max(self.total - self.warmup, 1))


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float):
    """``LambdaLR`` with :class:`LinearWarmupDecay` (Betty can rebuild a LambdaLR; not OneCycleLR/SequentialLR)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmupDecay(total, warmup_ratio))


def orthogonality_term(model: nn.Module, orth_reg: float) -> Callable[[], torch.Tensor] | None:
    """BiDoRA's lower-loss regulariser ``γ · mean_layers ‖V̂ᵀV̂ − I‖_F`` as a ``lower_extra_loss`` (None when γ = 0).

    The lower loss is ``task loss + orthogonality_term``; V̂ depends on A and B only, never on the magnitudes.
    """
    if orth_reg == 0:
        return None
    return lambda: orth_reg * orthogonality_penalty(model)


# ------------------------------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------------------------------
class _StreamProblem(ImplicitProblem):
    """An ImplicitProblem with an explicit parameter list, batches from a :class:`BatchStream`, a per-batch seed."""

    def __init__(
        self,
        name: str,
        config: Config,
        module: nn.Module,
        params: Sequence[nn.Parameter],
        loss_fn: Callable[[dict], torch.Tensor],
        stream: BatchStream,
        optimizer,
        scheduler,
        extra_loss: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(name, config, module=module, optimizer=optimizer, scheduler=scheduler)
        self._params = list(params)
        self._loss_fn = loss_fn
        self._extra_loss = extra_loss  # batch-independent term (the orthogonality penalty), no upper dependence
        self.skip_upper_independent = False
        self.stream = stream
        self.last_loss = float("nan")
        self.grad_observer: Callable[[list[nn.Parameter]], None] | None = None  # tests read the (hyper)gradient here

    # Exactly our parameters: never Betty's default list(module.parameters()), which includes frozen weights.
    def trainable_parameters(self):
        return self._params

    def parameters(self):
        return self._params

    def get_batch(self):
        return self.stream.next()

    def training_step(self, batch):
        with seeded_rng(self.stream.batch_seed, torch.device(self.device)):
            loss = self._loss_fn(batch)
        if self._extra_loss is not None and not self.skip_upper_independent:
            loss = loss + self._extra_loss()
        return loss

    def get_loss(self, batch):
        loss, loss_dict = super().get_loss(batch)
        self.last_loss = loss_dict["loss"]
        return loss, loss_dict

    def patch_data_loader(self, loader):  # our streams shard themselves
        return loader

    def grad_callback(self):
        if self._strategy == "distributed" and self._world_size > 1:
            self._all_reduce_grads()
        if self.grad_observer is not None:
            self.grad_observer(self._params)

    def _all_reduce_grads(self) -> None:
        """Average gradients that DDP's reducer does not handle (those set by Betty directly)."""


class DirectionProblem(_StreamProblem):
    """Lower level: lora_A, lora_B and the task head (or every trainable parameter for a single-level run)."""

    def __init__(self, *args, ignore_in_ddp: Sequence[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ignore_in_ddp = list(ignore_in_ddp)

    def patch_module(self):
        if self._strategy == "distributed" and self._ignore_in_ddp:
            # The magnitudes live in this module but are the upper problem's; the reducer must not wait for them.
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.module, self._ignore_in_ddp
            )
        super().patch_module()


class MagnitudeProblem(_StreamProblem):
    """Upper level: the magnitude vectors (held by a small module; the same Parameter objects as in the layers)."""

    def backward(self, loss, params, paths, create_graph=False, retain_graph=True, allow_unused=True):
        """Direct gradient and ``v = ∂L_up/∂θ`` in ONE backward pass (Betty takes two), then the implicit term.

        Same result as Betty's ``Problem.backward`` for our two-level graph (one path upper → lower → upper, no
        gradient accumulation); anything else goes to Betty's own code.
        """
        if len(paths) != 1 or len(paths[0]) != 3 or not self.gradient_accumulation_boundary():
            return super().backward(loss, params, paths, create_graph, retain_graph, allow_unused)
        lower = paths[0][1]
        lower_params = lower.meta_trainable_parameters()
        grads = torch.autograd.grad(loss, list(params) + list(lower_params), allow_unused=True)
        self.set_grads(params, grads[: len(params)])
        vector = replace_none_with_zero(grads[len(params) :], lower_params)
        betty_hypergradient.jvp_fn_mapping[lower.config.type](vector, lower, self, True)

    def patch_module(self):
        # Never wrapped in DDP (its forward is never called); the gradient is averaged in grad_callback instead.
        self.module.to(self.device)
        if self._strategy == "distributed" and self._world_size > 1:
            self.synchronize_params(self._params)

    def _all_reduce_grads(self) -> None:
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self._world_size)


class ParameterHolder(nn.Module):
    """A module whose only parameters are the given ones (shared, not copied)."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


class LoralibEngine(Engine):
    """Betty's Engine with a device of our choosing and DDP on CPU (gloo) as well as CUDA (nccl)."""

    def __init__(self, problems, config, dependencies, device: torch.device) -> None:
        self._requested_device = torch.device(device)
        super().__init__(problems=problems, config=config, dependencies=dependencies)

    def configure_systems(self):
        if self._strategy == "distributed":
            if not dist.is_initialized():
                dist.init_process_group(backend=self._backend)
            self._world_size, self._rank = dist.get_world_size(), dist.get_rank()
            self._local_rank = int(os.environ.get("LOCAL_RANK", self._rank))
            if self._requested_device.type == "cuda":
                torch.cuda.set_device(self._local_rank)
                self.device = torch.device("cuda", self._local_rank)
            else:
                self.device = torch.device("cpu")
        elif self._strategy == "default":
            self.device = self._requested_device
        else:
            raise ValueError(f"strategy {self._strategy!r} is not supported here (use 'default' or 'distributed')")
        return {
            "strategy": self._strategy,
            "backend": self._backend,
            "world_size": self._world_size,
            "rank": self._rank,
            "local_rank": self._local_rank,
        }

    def step(self) -> None:
        """One lower-level step (and the upper step when an unroll cycle completes)."""
        self.global_step += 1
        self.train_step()


def distributed_setup(device: torch.device) -> tuple[str, str, int, int]:
    """(strategy, backend, rank, world_size) from torchrun's environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return "default", "gloo", 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    return "distributed", backend, int(os.environ.get("RANK", "0")), world_size


def build_engine(
    *,
    model: nn.Module,
    lower_params: Sequence[nn.Parameter],
    lower_loss: Callable[[nn.Module, dict], torch.Tensor],
    lower_stream: BatchStream,
    lower_optimizer: torch.optim.Optimizer,
    lower_scheduler=None,
    lower_extra_loss: Callable[[], torch.Tensor] | None = None,
    upper_params: Sequence[nn.Parameter] = (),
    upper_loss: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    upper_stream: BatchStream | None = None,
    upper_optimizer: torch.optim.Optimizer | None = None,
    upper_scheduler=None,
    hypergradient: str = "darts",
    unroll_steps: int = 1,
    darts_alpha: float = 0.01,
    neumann_iterations: int = 3,
    neumann_alpha: float = 1.0,
    cg_iterations: int = 3,
    device: torch.device | str = "cpu",
    strategy: str = "default",
    backend: str = "gloo",
) -> LoralibEngine:
    """Wire one model into a Betty engine: a lower (direction) problem and, when ``upper_params`` is non-empty, an
    upper (magnitude) problem that receives the hypergradient.

    ``lower_loss(module, batch)`` receives the lower module as Betty holds it (DDP-wrapped under data parallelism; it
    should only call it); ``upper_loss(model, batch)`` receives the bare model. ``lower_extra_loss()`` is an optional
    batch-independent term of the lower loss that must not depend on the upper parameters (BiDoRA's orthogonality
    penalty, see :func:`orthogonality_term`); darts skips it in its finite-difference evaluations.
    Train with :meth:`LoralibEngine.step`; ``engine.direction`` / ``engine.magnitude`` are the two problems.
    """
    if hypergradient not in HYPERGRADIENTS:
        raise ValueError(f"hypergradient must be one of {HYPERGRADIENTS}, got {hypergradient!r}")
    bilevel = len(upper_params) > 0
    if bilevel:  # the magnitudes need gradients in the forward passes (the upper problem's), never a lower step
        allow_joint_magnitude_training(model)
    lower_config = Config(
        type=_BETTY_TYPE[hypergradient],
        unroll_steps=unroll_steps if bilevel else 1,
        darts_alpha=darts_alpha,
        neumann_iterations=neumann_iterations,
        neumann_alpha=neumann_alpha,
        cg_iterations=cg_iterations,
        log_step=-1,
    )
    upper_ids = {id(p) for p in upper_params}
    ignore = [n for n, p in model.named_parameters() if id(p) in upper_ids]
    lower = DirectionProblem(
        "direction",
        lower_config,
        module=model,
        params=lower_params,
        loss_fn=None,
        stream=lower_stream,
        optimizer=lower_optimizer,
        scheduler=lower_scheduler,
        ignore_in_ddp=ignore,
        extra_loss=lower_extra_loss,
    )
    lower._loss_fn = lambda batch: lower_loss(lower.module, batch)
    problems: list = [lower]
    dependencies: dict = {"u2l": {}, "l2u": {}}
    if bilevel:
        if upper_loss is None or upper_stream is None or upper_optimizer is None:
            raise ValueError("a bi-level engine needs upper_loss, upper_stream and upper_optimizer")
        upper = MagnitudeProblem(
            "magnitude",
            # first_order=True is what makes Betty add the implicit term; retain_graph for Betty's own backward, which
            # differentiates the upper loss twice (our MagnitudeProblem.backward needs one pass).
            Config(type=_BETTY_TYPE[hypergradient], first_order=True, retain_graph=True, log_step=-1),
            module=ParameterHolder(upper_params),
            params=upper_params,
            loss_fn=lambda batch: upper_loss(model, batch),
            stream=upper_stream,
            optimizer=upper_optimizer,
            scheduler=upper_scheduler,
        )
        problems.append(upper)
        dependencies["l2u"] = {lower: [upper]}
        # first_order: no upper-to-lower path, so the upper level gets its direct gradient only.
        dependencies["u2l"] = {} if hypergradient == "first_order" else {upper: [lower]}
    config = EngineConfig(train_iters=0, valid_step=10**12, logger_type="none", strategy=strategy, backend=backend)
    return LoralibEngine(problems, config, dependencies, device=torch.device(device))


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
