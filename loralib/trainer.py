"""The training engine shared by every example: BiDoRA and the baselines (ft, lora, dora) on one code path.

``train`` runs a Betty engine (:mod:`loralib.bilevel`): two problems for BiDoRA, one for the baselines. It adds what
Betty lacks: seeded data splits and resumable batch streams, evaluation and model selection without test peeking,
atomic checkpoints that resume bit for bit (parameters, optimisers, schedules, step counters, data positions, RNG),
adapter snapshots for the weight-decomposition analysis, a progress bar, a CSV log and TensorBoard.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .bilevel import (
    HYPERGRADIENTS,
    BatchStream,
    build_engine,
    distributed_setup,
    make_optimizer,
    make_scheduler,
    orthogonality_term,
    split_indices,
)
from .io import atomic_write, atomic_write_text, save_adapters, save_target_weights
from .model import (
    direction_parameters,
    get_adapter_config,
    magnitude_parameters,
    reset_directions,
)

METHODS = ("ft", "lora", "dora", "bidora")
CHECKPOINT_FORMAT = "loralib-trainer-checkpoint"
# Settings that do not change the trajectory: a run may be resumed with other values.
_RESUME_FREE = {"progress", "num_workers", "eval_batch_size", "device"}


@dataclass
class TrainerConfig:
    """Everything :func:`train` needs besides the model and data. Validated on construction.

    ``iterations`` counts lower-level (direction) steps; BiDoRA takes one upper step every ``unroll_steps`` of them.
    ``lr`` / ``weight_decay`` are the lower level's (all trainable parameters for the baselines); ``upper_*`` default
    to them. ``upper_fraction`` is the held-out share of the training set: BiDoRA trains the magnitudes on it; the
    baselines use it only for model selection (0: no held-out part). ``retrain_iterations > 0`` (BiDoRA only) adds a
    phase on all training data with the magnitudes frozen. ``snapshot_modules`` names the weights snapshotted for
    full fine-tuning (adapted runs snapshot their adapted modules).
    """

    method: str
    iterations: int
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.1
    upper_lr: float | None = None
    upper_weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_ratio: float = 0.1
    hypergradient: str = "darts"
    unroll_steps: int = 1
    darts_alpha: float = 0.01
    neumann_iterations: int = 3
    neumann_alpha: float = 1.0
    cg_iterations: int = 3
    orth_reg: float = 1e-5
    upper_fraction: float = 0.2
    retrain_iterations: int = 0
    retrain_lr: float | None = None
    retrain_weight_decay: float | None = None
    retrain_reinit: bool = True
    eval_every: int = 100
    checkpoint_every: int = 500
    snapshots: int = 4
    snapshot_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    select_on_dev: bool = False
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"TrainerConfig: {msg}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.method not in METHODS:
            fail(f"method must be one of {METHODS}, got {self.method!r}")
        for name, minimum in [
            ("iterations", 1),
            ("batch_size", 1),
            ("eval_batch_size", 1),
            ("unroll_steps", 1),
            ("neumann_iterations", 1),
            ("cg_iterations", 1),
            ("retrain_iterations", 0),
            ("eval_every", 1),
            ("checkpoint_every", 1),
            ("snapshots", 0),
            ("seed", 0),
            ("num_workers", 0),
        ]:
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                fail(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("lr", "darts_alpha", "eps", "neumann_alpha", "upper_lr", "retrain_lr"):
            value = getattr(self, name)
            if value is None and name in ("upper_lr", "retrain_lr"):
                continue
            if not is_num(value) or value <= 0:
                fail(f"{name} must be a positive number, got {value!r}")
        for name in ("weight_decay", "orth_reg", "upper_weight_decay", "retrain_weight_decay"):
            value = getattr(self, name)
            if value is None and name != "weight_decay" and name != "orth_reg":
                continue
            if not is_num(value) or value < 0:
                fail(f"{name} must be a number >= 0, got {value!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(is_num(b) and 0 <= b < 1 for b in betas):
            fail(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        if not is_num(self.warmup_ratio) or not 0 <= self.warmup_ratio <= 1:
            fail(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if self.hypergradient not in HYPERGRADIENTS:
            fail(f"hypergradient must be one of {HYPERGRADIENTS}, got {self.hypergradient!r}")
        if not is_num(self.upper_fraction) or not 0 <= self.upper_fraction < 1:
            fail(f"upper_fraction must be in [0, 1), got {self.upper_fraction!r}")
        if self.method == "bidora" and self.upper_fraction == 0:
            fail("bidora needs upper_fraction > 0 (the magnitudes are trained on that held-out split)")
        if self.retrain_iterations > 0 and self.method != "bidora":
            fail("retrain_iterations is a BiDoRA phase (magnitudes frozen); set it to 0 for ft/lora/dora")
        for name in ("retrain_reinit", "select_on_dev", "bf16", "progress"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            fail(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if isinstance(self.snapshot_modules, str):
            self.snapshot_modules = [self.snapshot_modules]
        if not isinstance(self.snapshot_modules, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.snapshot_modules
        ):
            fail(f"snapshot_modules must be a list of module-name suffixes, got {self.snapshot_modules!r}")
        self.snapshot_modules = list(self.snapshot_modules)

    # Effective per-level settings.
    @property
    def upper_lr_(self) -> float:
        return self.lr if self.upper_lr is None else self.upper_lr

    @property
    def upper_weight_decay_(self) -> float:
        return self.weight_decay if self.upper_weight_decay is None else self.upper_weight_decay

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainerConfig:
        if not isinstance(data, dict):
            raise ValueError(f"TrainerConfig: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainerConfig: unknown keys {unknown}; valid keys are {sorted(known)}")
        missing = sorted(k for k in ("method", "iterations") if k not in data)
        if missing:
            raise ValueError(f"TrainerConfig: missing required keys {missing}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainerConfig:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        try:
            return cls.from_dict(data or {})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


# ------------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------------
def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a loralib trainer checkpoint")
    return state


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _versions() -> dict:
    import betty
    import transformers

    from . import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "betty": getattr(betty, "__version__", "0.2.1"),
        "loralib": __version__,
    }


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class _Logs:
    """CSV log (always) and TensorBoard (when installed), rank 0 only. On resume, rows past the checkpoint go."""

    FIELDS = ["step", "phase", "lower_loss", "upper_loss", "lr", "upper_lr", "elapsed_s"]

    def __init__(self, output_dir: Path, resume_step: int | None) -> None:
        self.path = output_dir / "log.csv"
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 (closed in close())
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        except ImportError:
            pass

    def row(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for key in ("lower_loss", "upper_loss", "lr", "upper_lr"):
                if isinstance(row.get(key), float) and math.isfinite(row[key]):
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def metrics(self, step: int, split: str, metrics: dict) -> None:
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    train_dataset: Dataset,
    collate_fn: Callable,
    compute_loss: Callable[[nn.Module, dict], torch.Tensor],
    config: TrainerConfig,
    output_dir: str | os.PathLike,
    evaluate: Callable[[nn.Module, Dataset], dict] | None = None,
    eval_datasets: dict[str, Dataset] | None = None,
    select_metric: str | None = None,
    reinit_fn: Callable[[nn.Module], None] | None = None,
    extra_results: dict | None = None,
) -> dict:
    """Train ``model`` with ``config.method`` and write ``output_dir`` (results.json, log.csv, checkpoints/,
    snapshots/, adapter/); resumes from ``checkpoints/last.pt`` when present (the config must match).

    ``model`` is already adapted with :func:`loralib.apply_adapters` for lora/dora/bidora (the method must match), and
    not adapted for ft (its parameters with ``requires_grad`` are trained). ``collate_fn`` returns a dict of tensors;
    ``compute_loss(model, batch)`` returns the scalar task loss (for BiDoRA's lower level the trainer adds
    ``orth_reg · orthogonality_penalty``); under data parallelism it receives the DDP wrapper and must only call it.
    ``evaluate(model, dataset)`` returns metrics (higher is better for ``select_metric``).

    Selection (no test peeking): the checkpoint best on the held-out split (BiDoRA: the upper split; baselines: a
    held-out ``upper_fraction`` of train) by ``select_metric``, labelled ``"heldout"``; with ``select_on_dev``: best on
    the first of ``eval_datasets`` over time, labelled ``"dev_best_over_time"``; retraining runs, runs without a
    held-out split and runs without ``evaluate`` report the final model (``"final"``). The selected weights are left
    in ``model`` and saved to ``output_dir/adapter`` (adapted methods). Returns the results dict.
    """
    return _Run(
        model,
        train_dataset,
        collate_fn,
        compute_loss,
        config,
        Path(output_dir),
        evaluate,
        eval_datasets or {},
        select_metric,
        reinit_fn,
        extra_results or {},
    ).run()


class _Run:
    def __init__(
        self,
        model,
        train_dataset,
        collate_fn,
        compute_loss,
        config,
        output_dir,
        evaluate,
        eval_datasets,
        select_metric,
        reinit_fn,
        extra_results,
    ) -> None:
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        self.model, self.dataset, self.collate_fn, self.compute_loss = model, train_dataset, collate_fn, compute_loss
        self.cfg, self.out, self.evaluate, self.eval_datasets = config, output_dir, evaluate, eval_datasets
        self.select_metric, self.reinit_fn, self.extra = select_metric, reinit_fn, extra_results
        self._check_model()
        self.device = _resolve_device(config.device)
        self.strategy, self.backend, self.rank, self.world_size = distributed_setup(self.device)
        self.owns_process_group = self.strategy == "distributed" and not dist.is_initialized()
        self.is_main = self.rank == 0

        n = len(train_dataset)
        self.lower_idx, self.upper_idx = split_indices(n, config.upper_fraction, config.seed)
        self.all_idx = list(range(n))
        self.heldout = Subset(train_dataset, self.upper_idx) if self.upper_idx else None
        self.selection = self._selection()
        if self.selection != "final" and select_metric is None:
            raise ValueError(f"selection {self.selection!r} needs select_metric (a key returned by evaluate)")
        if config.select_on_dev and not eval_datasets:
            raise ValueError("select_on_dev needs eval_datasets")

        # Every parameter that may change during the run, by name (what a checkpoint must hold).
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.mutable = {names[id(p)]: p for p in _unique(p for p in model.parameters() if p.requires_grad)}
        if not self.mutable:
            raise ValueError("the model has no trainable parameters")
        self.total_iters = config.iterations + config.retrain_iterations
        k = config.snapshots
        self.snapshot_steps = sorted({max(1, round(self.total_iters * i / k)) for i in range(1, k + 1)}) if k else []

        self.global_step = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.elapsed = 0.0
        self.engine = None

    # ---- set-up ------------------------------------------------------------------------------------------------
    def _check_model(self) -> None:
        adapter = get_adapter_config(self.model)
        if self.cfg.method == "ft":
            if adapter is not None:
                raise ValueError(f"method 'ft' expects a model without adapters; this one has {adapter.method!r}")
        elif adapter is None:
            raise ValueError(f"method {self.cfg.method!r} expects a model adapted with loralib.apply_adapters")
        elif adapter.method != self.cfg.method:
            raise ValueError(f"config.method={self.cfg.method!r} but the model's adapters are {adapter.method!r}")
        if self.cfg.method == "bidora" and not magnitude_parameters(self.model):
            raise ValueError("bidora: the model has no magnitude parameters")

    def _selection(self) -> str:
        if self.evaluate is None or self.cfg.retrain_iterations > 0:
            return "final"
        if self.cfg.select_on_dev:
            return "dev_best_over_time"
        return "heldout" if self.heldout is not None else "final"

    def _phase(self, step: int) -> str:
        return "search" if step < self.cfg.iterations else "retrain"

    def _stream(self, indices, seed_offset: int) -> BatchStream:
        return BatchStream(
            self.dataset,
            indices,
            self.cfg.batch_size,
            self.collate_fn,
            seed=self.cfg.seed * 1000 + seed_offset,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.cfg.num_workers,
        )

    def _task_loss(self, module, batch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            loss = self.compute_loss(module, batch)
        return loss.float()

    def _build_engine(self, phase: str) -> None:
        cfg, model = self.cfg, self.model
        self.engine = None  # drop a previous phase's DDP wrapper before wrapping again
        if phase == "search" and cfg.method == "bidora":
            lower_params, upper_params = direction_parameters(model), magnitude_parameters(model)
            lower_total, upper_total = cfg.iterations, max(cfg.iterations // cfg.unroll_steps, 1)
            self.engine = build_engine(
                model=model,
                lower_params=lower_params,
                lower_loss=self._task_loss,
                lower_extra_loss=orthogonality_term(model, cfg.orth_reg),
                lower_stream=self._stream(self.lower_idx, 1),
                lower_optimizer=make_optimizer(lower_params, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps),
                lower_scheduler=None,
                upper_params=upper_params,
                upper_loss=self._task_loss,
                upper_stream=self._stream(self.upper_idx, 2),
                upper_optimizer=make_optimizer(
                    upper_params, cfg.upper_lr_, cfg.upper_weight_decay_, cfg.betas, cfg.eps
                ),
                hypergradient=cfg.hypergradient,
                unroll_steps=cfg.unroll_steps,
                darts_alpha=cfg.darts_alpha,
                neumann_iterations=cfg.neumann_iterations,
                neumann_alpha=cfg.neumann_alpha,
                cg_iterations=cfg.cg_iterations,
                device=self.device,
                strategy=self.strategy,
                backend=self.backend,
            )
            self._add_scheduler(self.engine.direction, lower_total)
            self._add_scheduler(self.engine.magnitude, upper_total)
            return
        if phase == "search":
            params = list(self.mutable.values())
            lr, wd, total, indices = cfg.lr, cfg.weight_decay, cfg.iterations, self.lower_idx
            extra = None
        else:
            for p in magnitude_parameters(model):
                p.requires_grad_(False)  # frozen at the learned values
            params = direction_parameters(model)
            lr = cfg.lr if cfg.retrain_lr is None else cfg.retrain_lr
            wd = cfg.weight_decay if cfg.retrain_weight_decay is None else cfg.retrain_weight_decay
            total, indices = cfg.retrain_iterations, self.all_idx
            extra = orthogonality_term(model, cfg.orth_reg)
        self.engine = build_engine(
            model=model,
            lower_params=params,
            lower_loss=self._task_loss,
            lower_extra_loss=extra,
            lower_stream=self._stream(indices, 1 if phase == "search" else 3),
            lower_optimizer=make_optimizer(params, lr, wd, cfg.betas, cfg.eps),
            device=self.device,
            strategy=self.strategy,
            backend=self.backend,
        )
        self._add_scheduler(self.engine.direction, total)

    def _add_scheduler(self, problem, total: int) -> None:
        # Attached after Betty rebuilt the optimiser, so the schedule drives the optimiser that really steps.
        problem.scheduler = make_scheduler(problem.optimizer, total, self.cfg.warmup_ratio)

    def _problems(self) -> dict:
        out = {"lower": self.engine.direction}
        if hasattr(self.engine, "magnitude"):
            out["upper"] = self.engine.magnitude
        return out

    def _reinit(self) -> None:
        if not self.cfg.retrain_reinit:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 7777)
            (self.reinit_fn or reset_directions)(self.model)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        problems = {}
        for key, problem in self._problems().items():
            problems[key] = {
                "optimizer": problem.optimizer.state_dict(),
                "scheduler": problem.scheduler.state_dict(),
                "count": problem._count,
                "stream": problem.stream.state_dict(),
            }
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "config": self.cfg.to_dict(),
            "global_step": self.global_step,
            "phase": self._phase(self.global_step - 1) if self.global_step else "search",
            "params": {n: p.detach().cpu().clone() for n, p in self.mutable.items()},
            "problems": problems,
            "rng": rng,
            "history": self.history,
            "best": self.best,
            "elapsed_s": self.elapsed + (time.perf_counter() - self._t0),
        }

    def _checkpoint(self) -> None:
        if self.is_main:
            save_checkpoint(self._state(), self.out / "checkpoints" / "last.pt")

    def _load(self, state: dict) -> None:
        saved = {k: v for k, v in state["config"].items() if k not in _RESUME_FREE}
        current = {k: v for k, v in self.cfg.to_dict().items() if k not in _RESUME_FREE}
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(
                f"{self.out}/checkpoints/last.pt was written with a different config (keys {diff}); use another "
                "output_dir or delete the checkpoint to start over"
            )
        with torch.no_grad():
            for name, p in self.mutable.items():
                p.copy_(state["params"][name])
        self.global_step, self.history, self.best = state["global_step"], state["history"], state["best"]
        self.elapsed = state["elapsed_s"]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def _restore_problems(self, state: dict) -> None:
        for key, problem in self._problems().items():
            saved = state["problems"][key]
            problem.optimizer.load_state_dict(saved["optimizer"])
            problem.scheduler.load_state_dict(saved["scheduler"])
            problem._count = saved["count"]
            problem.stream.load_state_dict(saved["stream"])

    # ---- evaluation and snapshots -----------------------------------------------------------------------------
    def _eval(self, step: int, logs: _Logs | None) -> dict[str, dict]:
        if self.evaluate is None or not self.is_main:
            return {}
        splits = dict(self.eval_datasets)
        if self.heldout is not None and self._phase(step - 1) == "search":
            splits = {"heldout": self.heldout, **splits}
        was_training = self.model.training
        self.model.eval()
        results = {}
        with torch.no_grad():
            for split, dataset in splits.items():
                metrics = {k: float(v) for k, v in self.evaluate(self.model, dataset).items()}
                results[split] = metrics
                self.history.append({"step": step, "phase": self._phase(step - 1), "split": split, **metrics})
                if logs is not None:
                    logs.metrics(step, split, metrics)
        self.model.train(was_training)
        self._update_best(step, results)
        return results

    def _update_best(self, step: int, results: dict) -> None:
        if self.selection == "final":
            return
        split = "heldout" if self.selection == "heldout" else next(iter(self.eval_datasets))
        if split not in results:
            return
        if self.select_metric not in results[split]:
            raise ValueError(f"select_metric {self.select_metric!r} not in the metrics {sorted(results[split])}")
        value = results[split][self.select_metric]
        if self.best is None or value > self.best["value"]:
            self.best = {
                "value": value,
                "step": step,
                "split": split,
                "eval": results,
                "params": {n: p.detach().cpu().clone() for n, p in self.mutable.items()},
            }

    def _snapshot(self, step: int) -> None:
        if not self.is_main:
            return
        directory = self.out / "snapshots"
        if self.cfg.method == "ft":
            if step == 0:
                save_target_weights(self.model, directory / "base_weights.safetensors", self.cfg.snapshot_modules)
            else:
                save_target_weights(
                    self.model, directory / f"step_{step}" / "target_weights.safetensors", self.cfg.snapshot_modules
                )
        elif step == 0:
            save_target_weights(self.model, directory / "base_weights.safetensors")
        else:
            save_adapters(self.model, directory / f"step_{step}")

    # ---- main loop -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self._t0 = time.perf_counter()
        ckpt_path = self.out / "checkpoints" / "last.pt"
        state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
        torch.manual_seed(cfg.seed)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            self._load(state)
        elif self.is_main:
            self._snapshot(0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        logs = _Logs(self.out, state["global_step"] if state else None) if self.is_main else None
        bar = tqdm(
            total=self.total_iters,
            initial=self.global_step,
            disable=not (cfg.progress and self.is_main),
            desc=f"{cfg.method}",
            dynamic_ncols=True,
        )
        resume_step = state["global_step"] if state is not None else 0
        try:
            phase = None
            while self.global_step < self.total_iters:
                step_phase = self._phase(self.global_step)
                if step_phase != phase:
                    phase_start = 0 if step_phase == "search" else cfg.iterations
                    if step_phase == "retrain" and self.global_step == cfg.iterations:
                        self._reinit()  # a checkpoint taken inside the retraining phase already holds the re-init
                    self._build_engine(step_phase)
                    if state is not None and resume_step > phase_start:
                        self._restore_problems(state)
                    state, phase = None, step_phase
                    self.engine.train()
                lrs = {k: p.optimizer.param_groups[0]["lr"] for k, p in self._problems().items()}
                self.engine.step()
                self.global_step += 1
                self._after_step(logs, bar, phase, lrs)
        finally:
            bar.close()
            if logs is not None:
                logs.close()
        return self._finish()

    def _after_step(self, logs: _Logs | None, bar, phase: str, lrs: dict) -> None:
        cfg, step = self.cfg, self.global_step
        problems = self._problems()
        lower, upper = problems["lower"], problems.get("upper")
        row = {
            "step": step,
            "phase": phase,
            "lower_loss": lower.last_loss,
            "upper_loss": upper.last_loss if upper is not None else "",
            "lr": lrs["lower"],  # the learning rates this step used (the schedules have already moved on)
            "upper_lr": lrs.get("upper", ""),
            "elapsed_s": round(self.elapsed + time.perf_counter() - self._t0, 3),
        }
        if logs is not None:
            logs.row(row)
        postfix = {"lower": f"{lower.last_loss:.4f}"}
        if upper is not None:
            postfix["upper"] = f"{upper.last_loss:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        end_of_phase = step == cfg.iterations or step == self.total_iters
        if step % cfg.eval_every == 0 or end_of_phase:
            self._eval(step, logs)
        if step in self.snapshot_steps:
            self._snapshot(step)
        if step % cfg.checkpoint_every == 0 or step == self.total_iters:
            self._checkpoint()

    def _finish(self) -> dict:
        cfg = self.cfg
        final_eval = {}
        if self.is_main and self.evaluate is not None:
            final_eval = {
                r["split"]: {k: v for k, v in r.items() if k not in ("step", "phase", "split")}
                for r in self.history
                if r["step"] == self.total_iters
            }
        report = final_eval
        selected_step = self.total_iters
        if self.selection != "final" and self.best is not None:
            with torch.no_grad():
                for name, p in self.mutable.items():
                    p.copy_(self.best["params"][name])
            report, selected_step = self.best["eval"], self.best["step"]
        adapter = get_adapter_config(self.model)
        wall = self.elapsed + time.perf_counter() - self._t0
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results = {
            "task": None,
            "model": None,
            "method": cfg.method,
            "rank": adapter.r if adapter is not None else None,
            "seed": cfg.seed,
            "selection": self.selection,
            "selected_step": selected_step,
            "eval": report,
            "final_eval": final_eval,
            "history": self.history,
            "config": cfg.to_dict(),
            "trainable_parameters": sum(p.numel() for p in self.mutable.values()),
            "total_parameters": sum(p.numel() for p in _unique(self.model.parameters())),
            "wall_time_s": wall,
            "peak_memory_bytes": int(peak),
            "world_size": self.world_size,
            "versions": _versions(),
        }
        results.update(self.extra)
        if self.is_main:
            if adapter is not None:
                save_adapters(self.model, self.out / "adapter")
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2))
        self.engine = None
        if self.owns_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return results
