"""``BiDoRATrainer``: transformers' ``Trainer`` that trains BiDoRA's two levels (and runs the baselines unchanged).

The Trainer's own loop trains the lower level: the directions (``lora_A``, ``lora_B``) and the task head, with the
Trainer's optimiser, schedule, mixed precision, logging, evaluation and checkpoints. After every ``unroll_steps`` of
its optimiser steps, :class:`loralib.bilevel.UpperLevel` takes one step of the magnitudes on a batch of the held-out
upper split through Betty's hypergradient. The magnitudes are constants for the lower step (their
``requires_grad`` is off while this trainer owns the model): the Trainer's optimiser, its gradient clipping and its
DDP wrapper never see them. LoRA, DoRA and full fine-tuning models train exactly as under a plain ``Trainer``.

Overridden hooks: ``compute_loss`` (adds the orthogonality regulariser to BiDoRA's lower loss), ``training_step``
(keeps the lower batch for the hypergradient, stops on a non-finite loss), ``create_scheduler`` (builds the upper
level, whose schedule spans the same run), ``log`` (adds the upper loss and learning rate), and the checkpoint pair
``_save_optimizer_and_scheduler`` / ``_load_optimizer_and_scheduler`` (the upper optimiser, schedule and data
position; transformers' trl uses the same pair).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset
from transformers import Trainer, TrainerCallback, get_scheduler

from .bilevel import BatchStream, LowerLevel, UpperLevel, _mix_seed, lower_config, split_indices
from .io import _live_tensors
from .model import direction_parameters, get_adapter_config, magnitude_parameters, orthogonality_penalty
from .training_args import BiDoRATrainingArguments

BILEVEL_STATE = "bilevel_state.pt"
_LABEL_COLUMNS = ("label", "labels", "label_ids")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that was written to the end, or None.

    The Trainer writes ``trainer_state.json`` last, so a folder whose ``trainer_state.json`` is missing or does not
    parse (a run killed while saving) is incomplete: it is skipped, with a message on stderr.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))
    )
    for _, path in reversed(found):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (OSError, ValueError):
            print(f"skipping {path}: incompletely written (no readable trainer_state.json)", file=sys.stderr)
    return None


class BiDoRATrainer(Trainer):
    """A ``transformers.Trainer`` for BiDoRA (and, unchanged, for LoRA / DoRA / full fine-tuning baselines).

    Args:
        model: a model adapted with :func:`loralib.apply_adapters` (any method) or a plain one (full fine-tuning).
        args: :class:`loralib.BiDoRATrainingArguments` (``None``: defaults with ``output_dir="trainer_output"``).
        train_dataset: the training set. Unless ``upper_dataset`` is given, a seeded ``upper_fraction`` of it
            (seed ``data_seed`` or ``seed``) is held out: BiDoRA trains its magnitudes on it, every method is evaluated
            on it as the ``heldout`` split, and the lower level trains on the rest.
        eval_dataset: evaluation set(s); evaluated next to ``heldout`` (metrics ``eval_<split>_<metric>``).
        upper_dataset: an explicit upper split (then ``train_dataset`` is all lower data).
        retrain: BiDoRA's retraining phase: train the directions (and head) of a BiDoRA model on all of
            ``train_dataset`` with its learned magnitudes frozen (no split, no upper level; the lower loss keeps the
            orthogonality regulariser). Re-initialise the directions first if the phase should start fresh
            (:func:`loralib.reset_directions`).
        **kwargs: every other ``Trainer`` argument (``data_collator``, ``compute_metrics``, ``callbacks``, ...).

    Model selection (``load_best_model_at_end``) uses the held-out split: a bare ``metric_for_best_model`` such as
    ``"accuracy"`` means ``"heldout_accuracy"``; naming another split (``"validation_accuracy"``) is the user asking
    to select on it.

    Raises:
        TypeError: ``args`` is not a ``BiDoRATrainingArguments``.
        ValueError: a BiDoRA run without an upper split, or with a setting the bi-level step does not support
            (gradient accumulation, DeepSpeed, FSDP), each named.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: BiDoRATrainingArguments | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        upper_dataset: Dataset | None = None,
        retrain: bool = False,
        **kwargs,
    ) -> None:
        args = BiDoRATrainingArguments(output_dir="trainer_output") if args is None else args
        if not isinstance(args, BiDoRATrainingArguments):
            raise TypeError(f"BiDoRATrainer needs loralib.BiDoRATrainingArguments, got {type(args).__name__}")
        adapter = get_adapter_config(model) if model is not None else None
        self.method = adapter.method if adapter is not None else "ft"
        if retrain and self.method != "bidora":
            raise ValueError(f"retrain=True is BiDoRA's retraining phase; this model's adapters are {self.method!r}")
        self.bilevel = self.method == "bidora" and not retrain
        if retrain:
            lower_dataset = train_dataset
        else:
            lower_dataset, upper_dataset = self._split(train_dataset, upper_dataset, args)
        if self.bilevel:
            self._check_supported(args, upper_dataset)
        if self.method == "bidora":  # the upper level's (or, retraining, frozen): constants for the lower step
            for p in magnitude_parameters(model):
                p.requires_grad_(False)
        evals = {} if eval_dataset is None else dict(eval_dataset) if isinstance(eval_dataset, dict) else {
            "validation": eval_dataset
        }
        if upper_dataset is not None:
            evals = {"heldout": upper_dataset, **evals}
            if args.metric_for_best_model and not args.metric_for_best_model.startswith(tuple(evals)):
                args.metric_for_best_model = "heldout_" + args.metric_for_best_model.removeprefix("eval_")
        super().__init__(model=model, args=args, train_dataset=lower_dataset, eval_dataset=evals or None, **kwargs)
        self.upper_dataset = upper_dataset
        self.upper_level: UpperLevel | None = None
        self.upper_stream: BatchStream | None = None
        self._lower_batch: dict | None = None
        self._upper_losses: list[float] = []
        if self.bilevel:
            self.add_callback(_UpperStepCallback(self))

    # ---- set-up ------------------------------------------------------------------------------------------------
    def _split(self, train_dataset, upper_dataset, args) -> tuple[Dataset | None, Dataset | None]:
        if upper_dataset is not None or train_dataset is None or args.upper_fraction == 0:
            return train_dataset, upper_dataset
        seed = args.data_seed if args.data_seed is not None else args.seed
        lower_idx, upper_idx = split_indices(len(train_dataset), args.upper_fraction, seed)
        if hasattr(train_dataset, "select"):  # a datasets.Dataset stays one (column handling, set_format)
            return train_dataset.select(lower_idx), train_dataset.select(upper_idx)
        return Subset(train_dataset, lower_idx), Subset(train_dataset, upper_idx)

    def _check_supported(self, args: BiDoRATrainingArguments, upper_dataset) -> None:
        if upper_dataset is None:
            raise ValueError("BiDoRA needs an upper split: set upper_fraction > 0 or pass upper_dataset")
        unsupported = {
            "gradient_accumulation_steps > 1": args.gradient_accumulation_steps > 1,
            "deepspeed": bool(args.deepspeed),
            "fsdp": bool(args.fsdp),
        }
        named = [k for k, v in unsupported.items() if v]
        if named:
            raise ValueError(f"BiDoRATrainer does not support {', '.join(named)} for BiDoRA (the bi-level step is "
                             "built for plain data parallelism with one optimiser step per batch)")

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.bilevel and self.upper_level is None:  # the upper level's schedule spans the same run
            self._build_upper_level(num_training_steps)
        return scheduler

    def _build_upper_level(self, num_training_steps: int) -> None:
        args, model = self.args, self.model
        device = args.device
        # The levels call back into this trainer through a weak reference: a reference cycle would keep the trainer,
        # its DDP wrapper and the process group alive until interpreter exit, where gloo aborts while tearing down.
        trainer = weakref.ref(self)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        extra = (lambda: args.orth_reg * orthogonality_penalty(model)) if args.orth_reg > 0 else None
        lower = LowerLevel(
            direction_parameters(model),
            lambda batch: trainer()._fp32_task_loss(batch),
            extra,
            lower_config(args.hypergradient, args.darts_alpha, args.neumann_iterations, args.neumann_alpha,
                         args.cg_iterations),
            device,
        )
        magnitudes = magnitude_parameters(model)
        optimizer = torch.optim.AdamW(
            magnitudes, lr=args.upper_lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            weight_decay=args.upper_wd,
        )
        upper_steps = max(num_training_steps // args.unroll_steps, 1)
        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(upper_steps),
            num_training_steps=upper_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
        self.upper_level = UpperLevel(
            model, magnitudes, lambda batch: trainer()._task_loss(batch), lower, args.hypergradient, optimizer,
            scheduler, device,
        )
        seed = args.data_seed if args.data_seed is not None else args.seed
        self.upper_stream = BatchStream(
            self._model_columns(self.upper_dataset),
            range(len(self.upper_dataset)),
            args.upper_batch_size or args.per_device_train_batch_size,
            lambda features: dict(trainer().data_collator(features)),
            seed=_mix_seed(seed, 0xB1D0),
            device=device,
            rank=rank,
            world_size=world,
        )

    def _model_columns(self, dataset):
        """For a ``datasets.Dataset``, only the columns the model's forward takes (as the Trainer does)."""
        if not self.args.remove_unused_columns or not hasattr(dataset, "column_names"):
            return dataset
        accepted = set(inspect.signature(self.model.forward).parameters) | set(_LABEL_COLUMNS)
        unused = [c for c in dataset.column_names if c not in accepted]
        return dataset.remove_columns(unused) if unused else dataset

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest *complete* checkpoint
        (:func:`last_complete_checkpoint`), skipping one that a killed run left half written."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from")
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    # ---- losses ------------------------------------------------------------------------------------------------
    def _task_loss(self, batch: dict) -> torch.Tensor:
        """The Trainer's loss (``compute_loss_func``, label smoothing, ...) of the bare model, in its precision."""
        with self.compute_loss_context_manager():
            return Trainer.compute_loss(self, self.model, batch).float()

    def _fp32_task_loss(self, batch: dict) -> torch.Tensor:
        """The task loss without mixed precision: darts' finite differences are noise in bf16 / fp16."""
        model = self.model
        patched = "forward" in model.__dict__ and hasattr(model, "_original_forward")  # accelerate's autocast patch
        if patched:
            autocast_forward = model.__dict__["forward"]
            model.forward = model._original_forward
        try:
            return Trainer.compute_loss(self, model, batch).float()
        finally:
            if patched:
                model.forward = autocast_forward

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not (self.method == "bidora" and model.training and self.args.orth_reg > 0):
            return result
        # right after this forward, at the same parameters: the layers' row norms and W0·Aᵀ are reused
        penalty = self.args.orth_reg * orthogonality_penalty(self.model, reuse_forward=True)
        if return_outputs:
            return result[0] + penalty, result[1]
        return result + penalty

    # ---- the loop's hooks --------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.bilevel:
            self._lower_batch = inputs
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite lower-level loss ({loss.item()}) at step {self.state.global_step + 1}; stopping (the "
                "checkpoints written so far are kept; lower the learning rate)"
            )
        return loss

    def upper_step(self) -> None:
        """One magnitude step on the next held-out batch, at the directions the Trainer just stepped to."""
        step = self.state.global_step
        lower = self.upper_level.lower
        lower.cur_batch = self._prepare_inputs(self._lower_batch)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        lower.batch_seed = _mix_seed(self.args.seed, 0xDA475, step, rank)
        batch = self._prepare_inputs(self.upper_stream.next())
        self._upper_losses.append(self.upper_level.step(batch, step))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.bilevel and self._upper_losses and "loss" in logs:
            logs["upper_loss"] = round(sum(self._upper_losses) / len(self._upper_losses), 4)
            logs["upper_learning_rate"] = self.upper_level.optimizer.param_groups[0]["lr"]
            self._upper_losses = []
        super().log(logs, start_time)

    # ---- checkpoints: the trainable state only, and the upper level's next to the Trainer's optimiser ---------
    def _save_checkpoint(self, model, trial) -> None:
        self._writing_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """In a checkpoint of an adapted model, only what training changes (adapters, magnitudes, head, merge
        state): the frozen base is the pretrained model's, and a checkpoint of RoBERTa-large would otherwise hold it
        every time. ``save_model`` outside checkpoints writes the whole model (``loralib.from_pretrained`` loads it).
        """
        frozen = self._frozen_keys() if getattr(self, "_writing_checkpoint", False) and state_dict is None else None
        if frozen:
            state_dict = {k: v for k, v in self.model.state_dict().items() if k not in frozen}
        super()._save(output_dir, state_dict=state_dict)

    def _frozen_keys(self) -> set[str]:
        """State-dict keys of the frozen pretrained weights of an adapted model (empty for full fine-tuning)."""
        config = get_adapter_config(self.model)
        if config is None:
            return set()
        trainable = set(_live_tensors(self.model, config))  # names only: no copies of the tensors
        return {k for k, _ in self.model.named_parameters() if k not in trainable}

    def _issue_warnings_after_load(self, load_result) -> None:
        # a checkpoint without the frozen base is complete: only other missing keys are worth a warning
        frozen = self._frozen_keys()
        load_result.missing_keys[:] = [k for k in load_result.missing_keys if k not in frozen]
        super()._issue_warnings_after_load(load_result)


    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.bilevel and self.upper_level is not None and self.args.should_save:
            state = {
                "optimizer": self.upper_level.optimizer.state_dict(),
                "scheduler": self.upper_level.scheduler.state_dict(),
                "stream": self.upper_stream.state_dict(),
            }
            torch.save(state, os.path.join(output_dir, BILEVEL_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if not (self.bilevel and checkpoint is not None):
            return
        path = Path(checkpoint) / BILEVEL_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {checkpoint} was not written by a BiDoRA run of BiDoRATrainer")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.upper_level.optimizer.load_state_dict(state["optimizer"])
        self.upper_level.scheduler.load_state_dict(state["scheduler"])
        self.upper_stream.load_state_dict(state["stream"])


class _UpperStepCallback(TrainerCallback):
    """Runs the upper step after every ``unroll_steps`` lower steps, before the Trainer logs, evaluates or saves."""

    def __init__(self, trainer: BiDoRATrainer) -> None:
        self.trainer = weakref.ref(trainer)  # the trainer holds this callback: no reference cycle

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.unroll_steps == 0:
            self.trainer().upper_step()
        return control
