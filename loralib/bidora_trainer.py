"""``BiDoRATrainer``: transformers' ``Trainer`` that trains BiDoRA's two levels (and runs the baselines unchanged).

The Trainer's own loop trains the lower level: the directions (``lora_A``, ``lora_B``) and the task head, with the
Trainer's optimiser, schedule, mixed precision, logging, evaluation and checkpoints. After every ``unroll_steps`` of
its optimiser steps, :class:`loralib.bilevel.UpperLevel` takes one step of the magnitudes on a batch of the held-out
upper split through Betty's hypergradient. The magnitudes are constants for the lower step (their
``requires_grad`` is off while this trainer owns the model): the Trainer's optimiser, its gradient clipping and its
DDP wrapper never see them. LoRA, DoRA and full fine-tuning models train exactly as under a plain ``Trainer``.

Overridden hooks: ``compute_loss`` (adds the orthogonality regulariser to BiDoRA's lower loss), ``training_step``
(keeps the lower batch for the hypergradient, stops on a non-finite loss), ``_inner_training_loop`` (freezes the
magnitudes for the lower level and refuses settings the upper step cannot honour, once per attempt of
``auto_find_batch_size``), ``create_scheduler`` (builds the upper level afresh for every ``train()`` and every
attempt: its schedule spans the same run, its batch follows the train batch), ``call_model_init`` (``model_init`` /
hyperparameter search), ``log`` (adds the upper loss and learning rate), and the checkpoint pair
``_save_optimizer_and_scheduler`` / ``_load_optimizer_and_scheduler`` (the upper optimiser, schedule, data position
and hypergradient state; transformers' trl uses the same pair). Checkpoints of the trainable state only, their
checks before a resume, the run record and the stop at ``max_steps`` come from
:class:`loralib.trainer_checkpoints.AdapterCheckpointMixin` (MRO: ``BiDoRATrainer -> AdapterCheckpointMixin ->
Trainer``), shared with :class:`loralib.AdapterTrainer`.

The upper loss and every lower-loss evaluation inside a hypergradient are the user's training loss:
``self.compute_loss`` (a subclass's override, ``compute_loss_func``, label smoothing), called on a copy of the batch,
without the lower penalty where it does not belong, with the trainer's recorded state left as it was. With
``torch_compile`` the Trainer's compiled wrapper runs the lower step and the upper step runs the same parameters
through the uncompiled module (``self.model``; AOTAutograd has no double backward, which the second-order
hypergradients need); with dynamo's ``eager`` backend a run equals the uncompiled one bitwise (tested).
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from transformers import Trainer, TrainerCallback, get_scheduler

from .bilevel import LowerLevel, UpperLevel
from .checkpoints import last_complete_checkpoint  # noqa: F401  (scripts import it from here)
from .data import BatchStream, mix_seed, split_indices
from .gradients import share_of_global_batch, world
from .hypergradients import ESTIMATORS, build_hypergradient
from .model import (
    adapter_layers,
    capture_norm_terms,
    direction_parameters,
    get_adapter_config,
    magnitude_parameters,
    magnitudes_trainable,
    orthogonality_penalty,
)
from .trainer_checkpoints import AdapterCheckpointMixin
from .training_args import BiDoRATrainingArguments

BILEVEL_STATE = "bilevel_state.pt"
#: version 2: adds the hypergradient's name and state (warm starts); version 1 (no "version" key) had neither.
BILEVEL_STATE_VERSION = 2
#: trainer attributes that a ``compute_loss`` may record into (TRL's metrics and token counts): the upper step's
#: loss evaluations put them back as they were.
_RECORDED_STATE = ("_metrics", "_total_train_tokens")
_LABEL_COLUMNS = ("label", "labels", "label_ids")


class BiDoRATrainer(AdapterCheckpointMixin, Trainer):
    """A ``transformers.Trainer`` for BiDoRA (and, unchanged, for LoRA / DoRA / full fine-tuning baselines).

    Args:
        model: a model adapted with :func:`loralib.apply_adapters` (any method) or a plain one (full fine-tuning);
            or None with ``model_init`` (every model it returns must have the same method).
        args: :class:`loralib.BiDoRATrainingArguments` (``None``: defaults with ``output_dir="trainer_output"``).
        train_dataset: the training set. For BiDoRA, unless ``upper_dataset`` is given, a seeded ``upper_fraction``
            of it (seed ``data_seed`` or ``seed``) is held out: the magnitudes train on it, it is evaluated as the
            ``heldout`` split, and the lower level trains on the rest. LoRA, DoRA and full fine-tuning train on all
            of it unless ``heldout_fraction`` (or ``upper_dataset``) asks for a held-out selection split.
        eval_dataset: evaluation set(s); evaluated next to ``heldout`` (metrics ``eval_<split>_<metric>``).
        upper_dataset: an explicit upper split (then ``train_dataset`` is all lower data).
        retrain: BiDoRA's retraining phase: train the directions (and head) of a BiDoRA model on all of
            ``train_dataset`` with its learned magnitudes frozen (no split, no upper level; the lower loss keeps the
            orthogonality regulariser). Re-initialise the directions first if the phase should start fresh
            (:func:`loralib.reset_directions`).
        **kwargs: every other ``Trainer`` argument (``data_collator``, ``compute_metrics``, ``callbacks``, ...).

    Model selection (``load_best_model_at_end``) uses the held-out split when there is one: a bare
    ``metric_for_best_model`` such as ``"accuracy"`` means ``"heldout_accuracy"``; naming another split
    (``"validation_accuracy"``) is the user asking to select on it. A test split (``"test_accuracy"``) is refused.

    Raises:
        TypeError: ``args`` is not a ``BiDoRATrainingArguments``.
        ValueError: a BiDoRA run without an upper split, or with a setting the bi-level step does not support
            (gradient accumulation, DeepSpeed, FSDP, fp16, Liger kernels, a second-order hypergradient under reentrant
            activation checkpointing), each named with what to do instead.
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
        self.retrain, self.method = retrain, None
        self.upper_level: UpperLevel | None = None
        self.upper_stream: BatchStream | None = None
        self._lower_batch: dict | None = None
        self._lower_optimizer_state: dict = {}
        self._upper_losses: list[float] = []
        self._loss_evaluation_depth = 0
        if model is not None:
            self._adopt(model)
        if retrain:
            lower_dataset = train_dataset
        else:
            lower_dataset, upper_dataset = self._split(train_dataset, upper_dataset, args)
        self.upper_dataset = upper_dataset
        evals = {} if eval_dataset is None else dict(eval_dataset) if isinstance(eval_dataset, dict) else {
            "validation": eval_dataset
        }
        if upper_dataset is not None:
            evals = {"heldout": upper_dataset, **evals}
            if args.metric_for_best_model and not args.metric_for_best_model.removeprefix("eval_").startswith(
                    tuple(evals)):
                args.metric_for_best_model = "heldout_" + args.metric_for_best_model.removeprefix("eval_")
        _refuse_test_selection(args.metric_for_best_model, evals)
        super().__init__(model=model, args=args, train_dataset=lower_dataset, eval_dataset=evals or None, **kwargs)
        if self.bilevel:  # early, with the constructor's model; again at each train start with the final one
            self._check_supported()
        self.add_callback(_UpperStepCallback(self))

    # ---- set-up ------------------------------------------------------------------------------------------------
    @property
    def bilevel(self) -> bool:
        """Whether this run trains two levels (a BiDoRA model outside the retraining phase)."""
        return self.method == "bidora" and not self.retrain

    def _adopt(self, model: nn.Module) -> None:
        """Take the method from ``model`` (the constructor's, or each one ``model_init`` returns)."""
        adapter = get_adapter_config(model)
        method = adapter.method if adapter is not None else "ft"
        if self.method is not None and method != self.method:
            raise ValueError(f"model_init returned a {method!r} model, but this trainer was set up for {self.method!r} "
                             "models: every model of a hyperparameter search must use the same method")
        if self.retrain and method != "bidora":
            raise ValueError(f"retrain=True is BiDoRA's retraining phase; this model's adapters are {method!r}")
        if getattr(self, "_split_before_method", None) is not None:  # model_init: the split was made before
            made, wanted = self._split_before_method, self._held_out_share(method, self.args)
            if made != wanted:
                raise ValueError(
                    f"model_init returned a {method!r} model, whose held-out share is {wanted} "
                    f"({'upper_fraction' if method == 'bidora' else 'heldout_fraction'}), but train_dataset was split "
                    f"at {made} before the method was known: set heldout_fraction={wanted}")
        self.method = method

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self._adopt(model)
        return model

    def _split(self, train_dataset, upper_dataset, args) -> tuple[Dataset | None, Dataset | None]:
        """``(lower, held-out)``: BiDoRA holds out ``upper_fraction`` (its upper split); LoRA, DoRA and full
        fine-tuning hold out ``heldout_fraction`` only when it is set (a selection split the user asked for) and
        otherwise train on all of ``train_dataset``. An explicit ``upper_dataset`` is the held-out split of any
        method. With ``model_init`` the method is not known yet: the split follows ``heldout_fraction`` when set,
        else ``upper_fraction`` (BiDoRA's), and a model whose method wants another share is refused (:meth:`_adopt`:
        a LoRA ``model_init`` needs ``heldout_fraction``, 0 for all of the data)."""
        if upper_dataset is not None or train_dataset is None:
            return train_dataset, upper_dataset
        if self.method is None:  # model_init: checked against the method of its first model (_adopt)
            fraction = args.upper_fraction if args.heldout_fraction is None else args.heldout_fraction
            self._split_before_method = fraction
        else:
            fraction = self._held_out_share(self.method, args)
        if fraction == 0:
            return train_dataset, None
        seed = args.data_seed if args.data_seed is not None else args.seed
        lower_idx, upper_idx = split_indices(len(train_dataset), fraction, seed)
        if hasattr(train_dataset, "select"):  # a datasets.Dataset stays one (column handling, set_format)
            return train_dataset.select(lower_idx), train_dataset.select(upper_idx)
        return Subset(train_dataset, lower_idx), Subset(train_dataset, upper_idx)

    @staticmethod
    def _held_out_share(method: str, args: BiDoRATrainingArguments) -> float:
        if method != "bidora":
            return args.heldout_fraction or 0.0
        if args.heldout_fraction not in (None, args.upper_fraction):
            raise ValueError(f"heldout_fraction={args.heldout_fraction} is the baselines' selection split; BiDoRA "
                             f"holds out upper_fraction={args.upper_fraction} (its upper split, also its held-out "
                             "split): set upper_fraction instead")
        return args.upper_fraction

    def _check_supported(self) -> None:
        """Refuse, with what to do instead, every setting the upper step cannot honour (checked at each train start,
        once the model, its activation checkpointing and the arguments are final)."""
        args = self.args
        if self.upper_dataset is None:
            raise ValueError("BiDoRA needs an upper split: set upper_fraction > 0 or pass upper_dataset")
        reasons = {
            "gradient_accumulation_steps > 1": (args.gradient_accumulation_steps > 1,
                                                "one upper step follows each optimiser step of one batch"),
            "deepspeed": (bool(args.deepspeed), "the upper step differentiates the unsharded model"),
            "fsdp": (bool(args.fsdp), "the Trainer's FSDP path is untested with BiDoRA; loralib.bilevel itself runs "
                                      "on FSDP2-sharded models with first_order, darts, sama or damped_solve: see "
                                      "docs/hypergradients.md, 'Sharded models'"),
            "fp16": (bool(args.fp16), "the upper step has no loss scaling, so its small gradients would underflow; "
                                      "use bf16=True or full precision"),
            "use_liger_kernel": (bool(args.use_liger_kernel),
                                 "Liger's fused losses compute their gradients inside the forward pass, which the "
                                 "hypergradient's repeated loss evaluations cannot use"),
        }
        named = [f"{k} ({why})" for k, (bad, why) in reasons.items() if bad]
        if named:
            raise ValueError(f"BiDoRATrainer does not support {'; '.join(named)} for BiDoRA")
        if _reentrant_checkpointing(self.model) and ESTIMATORS[args.hypergradient].second_order:
            raise ValueError(
                f"hypergradient={args.hypergradient!r} differentiates the lower loss twice, which reentrant activation "
                "checkpointing cannot do: set activation_checkpointing_kwargs={'use_reentrant': False} (or "
                "gradient_checkpointing_kwargs, its older name), or use a first-order hypergradient (darts, sama, "
                "first_order, damped_solve)"
            )

    def _inner_training_loop(self, *args, **kwargs):
        """One training attempt (``auto_find_batch_size`` may make several): BiDoRA's magnitudes are frozen for the
        lower level for its duration (the Trainer's optimiser, clipping and DDP never see them), then put back."""
        if self.args.average_tokens_across_devices and world()[1] > 1:
            raise ValueError(
                "average_tokens_across_devices=True: BiDoRATrainer weights each process's loss by its share of the "
                "global batch's items itself (so N processes train what one does, for any loss); transformers would "
                "also rescale it (multiplying a classification loss by the number of processes): set it to False")
        if self.method != "bidora":
            return super()._inner_training_loop(*args, **kwargs)
        if self.bilevel:
            self._check_supported()
        with magnitudes_trainable(self.model, False):
            return super()._inner_training_loop(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.bilevel:  # afresh for every train() and attempt: the upper schedule spans this run
            self._build_upper_level(num_training_steps)
        return scheduler

    def _upper_batch_size(self) -> int:
        """``upper_batch_size`` (default: the per-device train batch), scaled like the train batch when
        ``auto_find_batch_size`` has reduced it."""
        args = self.args
        current = max(self._train_batch_size // max(1, args.n_gpu), 1)
        if args.upper_batch_size is None:
            return current
        return max(1, (args.upper_batch_size * current) // args.per_device_train_batch_size)

    def _build_upper_level(self, num_training_steps: int) -> None:
        args, model = self.args, self.model
        # The levels call back into this trainer through a weak reference: a reference cycle would keep the trainer,
        # its DDP wrapper and the process group alive until interpreter exit, where gloo aborts while tearing down.
        trainer = weakref.ref(self)
        rank, size = world()
        penalty = (lambda: args.orth_reg * orthogonality_penalty(model)) if args.orth_reg > 0 else None
        theta, magnitudes = direction_parameters(model), magnitude_parameters(model)
        lower = LowerLevel(theta, lambda batch: trainer()._lower_task_loss(batch), penalty, args.device)
        optimizer = torch.optim.AdamW(
            magnitudes, lr=args.upper_lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            weight_decay=args.upper_wd,
        )
        upper_steps = max(num_training_steps // args.unroll_steps, 1)
        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(upper_steps),
            num_training_steps=upper_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
        by_backward = _reentrant_checkpointing(model)
        leaves = [p for p in model.parameters() if p.requires_grad] + magnitudes if by_backward else []
        self.upper_level = UpperLevel(
            model, magnitudes, lambda batch: trainer()._upper_task_loss(batch), lower,
            build_hypergradient(args.hypergradient, **args.hypergradient_settings()), optimizer, scheduler,
            by_backward=by_backward, leaves=leaves,
        )
        seed = args.data_seed if args.data_seed is not None else args.seed
        self.upper_stream = BatchStream(
            self._model_columns(self.upper_dataset),
            range(len(self.upper_dataset)),
            self._upper_batch_size(),
            lambda features: dict(trainer().data_collator(features)),
            seed=mix_seed(seed, 0xB1D0),
            device=args.device,
            rank=rank,
            world_size=size,
        )
        self._lower_optimizer_state = {}
        _warn_half_precision_base(model, args.hypergradient)

    def _model_columns(self, dataset):
        """For a ``datasets.Dataset``, only the columns the model's forward takes (as the Trainer does)."""
        if not self.args.remove_unused_columns or not hasattr(dataset, "column_names"):
            return dataset
        accepted = set(inspect.signature(self.model.forward).parameters) | set(_LABEL_COLUMNS)
        unused = [c for c in dataset.column_names if c not in accepted]
        return dataset.remove_columns(unused) if unused else dataset

    # ---- losses ------------------------------------------------------------------------------------------------
    @contextmanager
    def _loss_evaluation(self):
        """``compute_loss`` as a function: no lower penalty inside, and what a ``compute_loss`` records on the
        trainer (TRL's metrics and token counts) put back afterwards."""
        saved = {name: copy.deepcopy(getattr(self, name)) for name in _RECORDED_STATE if hasattr(self, name)}
        self._loss_evaluation_depth += 1
        try:
            yield
        finally:
            self._loss_evaluation_depth -= 1
            for name, value in saved.items():
                setattr(self, name, value)

    def _users_loss(self, batch: dict) -> torch.Tensor:
        """The training loss the Trainer's step uses, on a copy of ``batch`` (``compute_loss`` may pop labels),
        weighted by this process's share of the global batch (so the mean over processes is the global mean)."""
        share = self._share_of_global_batch(batch)
        result = self.compute_loss(self.model, dict(batch))
        loss = (result[0] if isinstance(result, tuple) else result).float()
        return loss if share is None else loss * share

    def _upper_task_loss(self, batch: dict) -> torch.Tensor:
        """``L_up``: the training loss in the run's precision, without the lower penalty."""
        with self._loss_evaluation(), self.compute_loss_context_manager():
            return self._users_loss(batch)

    def _lower_task_loss(self, batch: dict) -> torch.Tensor:
        """The task part of ``L_low`` in full precision (the estimators' finite differences are noise in bf16)."""
        model = self.model
        patched = "forward" in model.__dict__ and hasattr(model, "_original_forward")  # accelerate's autocast patch
        if patched:
            autocast_forward = model.__dict__["forward"]
            model.forward = model._original_forward
        try:
            with self._loss_evaluation():
                return self._users_loss(batch)
        finally:
            if patched:
                model.forward = autocast_forward

    def _share_of_global_batch(self, batch: dict) -> float | None:
        """This process's share of the global batch's items (:func:`loralib.gradients.share_of_global_batch`):
        label tokens that are not -100 (``labels[..., 1:]`` for a causal LM, whose loss shifts them; ``shift_labels``
        when the collator gives them), else rows. None in one process and with gradient accumulation (whose loss
        transformers normalises over the accumulated micro-batches)."""
        if world()[1] == 1 or self.args.gradient_accumulation_steps > 1:
            return None
        labels = batch.get("shift_labels")
        if labels is None:
            labels = batch.get("labels")
            if torch.is_tensor(labels) and labels.dim() > 1 and getattr(self, "_loss_shifts_labels", False):
                labels = labels[..., 1:]
        if torch.is_tensor(labels):
            count = labels.ne(-100).sum()
        else:  # a loss without labels: every row counts once
            count = torch.tensor(next((len(v) for v in batch.values() if torch.is_tensor(v)), 1))
        return share_of_global_batch(count.to(self.args.device))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._loss_evaluation_depth or not model.training:  # the levels' evaluations and the Trainer's evaluation
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # the lower step: this process's share of the global batch (counted before compute_loss may pop the labels)
        share = self._share_of_global_batch(inputs)
        penalised = self.method == "bidora" and self.args.orth_reg > 0
        # the penalty reuses the row norms and W0·Aᵀ that this forward computes (same parameters, same graph)
        with capture_norm_terms(self.model) if penalised else nullcontext() as terms:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if share is not None:
            loss = loss * share
        if penalised:  # the same on every process (replicated parameters): not weighted
            loss = loss + self.args.orth_reg * orthogonality_penalty(self.model, terms=terms)
        return (loss, outputs) if return_outputs else loss

    # ---- the loop's hooks --------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.bilevel:
            self._lower_batch = dict(inputs)  # a copy: nothing the step does to its batch reaches the upper step
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite lower-level loss ({loss.item()}) at step {self.state.global_step + 1}; stopping (the "
                "checkpoints written so far are kept; lower the learning rate)"
            )
        return loss

    def _record_lower_step(self) -> None:
        """Before the lower optimiser steps: the gradient it is about to consume (after clipping) and its learning
        rate, for the estimators that differentiate through that step (SAMA)."""
        if not (self.bilevel and self.upper_level is not None and self.upper_level.hypergradient.name == "sama"):
            return
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        theta = self.upper_level.lower.trainable_parameters()
        self._lower_optimizer_state = {
            "optimizer": optimizer,
            "last_gradient": [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in theta],
            "learning_rate": [group["lr"] for group in optimizer.param_groups],
        }

    def upper_step(self) -> None:
        """One magnitude step on the next held-out batch, at the directions the Trainer just stepped to."""
        step = self.state.global_step
        rank, _ = world()
        lower_batch = self._prepare_inputs(self._lower_batch)
        lower_seed = mix_seed(self.args.seed, 0xDA475, step, rank)
        upper_batch = self._prepare_inputs(self.upper_stream.next())
        loss = self.upper_level.step(upper_batch, self.upper_stream.batch_seed, lower_batch, lower_seed, step,
                                     **self._lower_optimizer_state)
        self._upper_losses.append(loss)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.bilevel and self._upper_losses and "loss" in logs:
            logs["upper_loss"] = round(sum(self._upper_losses) / len(self._upper_losses), 4)
            logs["upper_learning_rate"] = self.upper_level.optimizer.param_groups[0]["lr"]
            self._upper_losses = []
        super().log(logs, start_time)

    # ---- checkpoints: the trainable state only (AdapterCheckpointMixin), the upper level's next to the optimiser -
    def _run_method(self) -> tuple[str, bool]:
        """``(method, bilevel)`` that a resumed checkpoint must have been written with."""
        return self.method, self.bilevel

    def _run_record_extra(self) -> dict:
        args = self.args
        split = {"upper_fraction": args.upper_fraction if self.bilevel else None,
                 "heldout_fraction": None if self.bilevel else args.heldout_fraction,
                 "upper_dataset": self.upper_dataset is not None, "retrain": self.retrain}
        return {"split": split, **super()._run_record_extra(),
                "hypergradient": args.hypergradient if self.bilevel else None}

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.bilevel and self.upper_level is not None and self.args.should_save:
            state = {
                "version": BILEVEL_STATE_VERSION,
                "optimizer": self.upper_level.optimizer.state_dict(),
                "scheduler": self.upper_level.scheduler.state_dict(),
                "stream": self.upper_stream.state_dict(),
                "hypergradient": self.upper_level.hypergradient.name,
                "hypergradient_state": self.upper_level.hypergradient.state_dict(),
            }
            torch.save(state, os.path.join(output_dir, BILEVEL_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # the mixin checks optimizer.pt's parameter groups first
        if not (self.bilevel and checkpoint is not None):
            return
        path = Path(checkpoint) / BILEVEL_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {checkpoint} was not written by a BiDoRA run of BiDoRATrainer")
        state = torch.load(path, map_location="cpu", weights_only=True)
        estimator = self.upper_level.hypergradient
        version = state.get("version", 1)
        if version > BILEVEL_STATE_VERSION:
            raise ValueError(f"{path} has version {version}, newer than this loralib reads "
                             f"({BILEVEL_STATE_VERSION}): upgrade loralib to resume it")
        if version == 1:
            if estimator.state_dict():
                raise ValueError(f"{path} was written by an older loralib, which kept no hypergradient state: "
                                 f"hypergradient={estimator.name!r} cannot resume from it; start the run afresh")
        elif state["hypergradient"] != estimator.name:
            raise ValueError(f"{checkpoint} was trained with hypergradient={state['hypergradient']!r}, not "
                             f"{estimator.name!r}: resume with the same hypergradient")
        else:
            estimator.load_state_dict(state["hypergradient_state"])
        self.upper_level.optimizer.load_state_dict(state["optimizer"])
        self.upper_level.scheduler.load_state_dict(state["scheduler"])
        self.upper_stream.load_state_dict(state["stream"])


class _UpperStepCallback(TrainerCallback):
    """The upper level's hooks in the Trainer's loop: records the lower step (``on_pre_optimizer_step``) and runs
    the upper step after every ``unroll_steps`` lower steps, before the Trainer logs, evaluates or saves."""

    def __init__(self, trainer: BiDoRATrainer) -> None:
        self.trainer = weakref.ref(trainer)  # the trainer holds this callback: no reference cycle

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer()._record_lower_step()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer()
        if trainer.bilevel and state.global_step % args.unroll_steps == 0:
            trainer.upper_step()
        return control


def _refuse_test_selection(metric: str | None, evals: dict) -> None:
    """No model selection on a test split: ``metric_for_best_model`` naming one (``test_accuracy``) is refused."""
    if not metric:
        return
    name = metric.removeprefix("eval_")
    split = next((s for s in sorted(evals, key=len, reverse=True) if name.startswith(f"{s}_")), name.split("_")[0])
    if split.startswith("test"):
        raise ValueError(f"metric_for_best_model={metric!r} selects the model on the test split {split!r}, which makes "
                         "its test score optimistic: select on the held-out split (heldout_<metric>) or a dev split")


def _warn_half_precision_base(model: nn.Module, hypergradient: str) -> None:
    """The implicit terms are finite differences of gradients along v: on a bf16 / fp16 base (the adapters in fp32)
    they drown in the base's rounding. Measured on SmolLM2-135M (DoRA r 8 on q/v, same state and batches): darts'
    implicit term from a bf16 base has cosine 0.27 with the float32 one, and 0.16 between step sizes ε and 2ε (float32:
    0.99999996); the plain gradient still agrees (0.9989)."""
    if hypergradient == "first_order":
        return
    half = {layer.base_weight().dtype for _, layer in adapter_layers(model)} & {torch.bfloat16, torch.float16}
    if half:
        warnings.warn(
            f"the adapted base weights are {', '.join(sorted(str(d) for d in half))}: hypergradient={hypergradient!r} "
            "takes finite differences of gradients, which a half-precision base turns mostly into rounding noise "
            "(examples/NLG/README.md); load the base in float32 for BiDoRA, or use hypergradient='first_order'",
            stacklevel=3,
        )


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether some module of ``model`` runs reentrant activation checkpointing (``use_reentrant=True``, or unset:
    torch's default then), whose backward ``torch.autograd.grad`` cannot see into."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is None:  # not transformers' mechanism: nothing to read
                continue
            keywords = getattr(func, "keywords", None) or {}
            if keywords.get("use_reentrant", True) is not False:
                return True
    return False
