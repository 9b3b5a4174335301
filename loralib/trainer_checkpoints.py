"""Adapter-only checkpoints for any transformers ``Trainer``: :class:`AdapterCheckpointMixin` and
:class:`AdapterTrainer`.

A plain ``Trainer`` writes the whole model into every checkpoint, frozen base included: for a LoRA run of a 135M
model that is ~540 MB of weights per checkpoint, of which the adapters are well under 1 MB. The mixin makes the
Trainer's checkpoints hold only what training changes, keeps them resumable bitwise, and checks a checkpoint
against the model before it loads anything. Mix it in *before* the Trainer class::

    class AdapterTrainer(AdapterCheckpointMixin, transformers.Trainer): ...     # shipped: loralib.AdapterTrainer
    class AdapterSFTTrainer(AdapterCheckpointMixin, trl.SFTTrainer): ...
    class BiDoRATrainer(AdapterCheckpointMixin, transformers.Trainer): ...      # loralib.BiDoRATrainer

What the mixin changes is listed in :class:`AdapterCheckpointMixin`; everything else is the Trainer's own.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from .checkpoints import (
    OPTIMIZER,
    base_fingerprint,
    check_optimizer_groups,
    frozen_keys,
    last_complete_checkpoint,
    run_record,
    validate_checkpoint,
    write_run_record,
)
from .model import get_adapter_config

__all__ = ["AdapterCheckpointMixin", "AdapterTrainer"]


class AdapterCheckpointMixin:
    """Adapter-only, validated, resumable checkpoints for a ``transformers.Trainer`` subclass.

    Use it as the first base, before the Trainer class: ``class X(AdapterCheckpointMixin, Trainer)`` or
    ``class X(AdapterCheckpointMixin, trl.SFTTrainer)``. Method resolution order then runs the mixin's hook first and
    the Trainer's (or TRL's) through ``super()``::

        X -> AdapterCheckpointMixin -> Trainer -> object
        X -> AdapterCheckpointMixin -> SFTTrainer -> trl's _BaseTrainer -> Trainer -> object
        BiDoRATrainer -> AdapterCheckpointMixin -> Trainer -> object

    A class that puts the Trainer first (``class X(Trainer, AdapterCheckpointMixin)``) would silently get the
    Trainer's whole-model checkpoints; it is refused with a ``TypeError`` when the class is defined.

    What changes, for a model adapted with :func:`loralib.apply_adapters` (LoRA, DoRA, BiDoRA):

    * checkpoints (``checkpoint-N/model.safetensors``) hold only the trainable state: adapters, magnitudes,
      ``modules_to_save``, merge state and buffers; no frozen base weight under any of its names (a tied
      ``lm_head.weight`` included): :func:`loralib.checkpoints.frozen_keys`. ``save_model`` outside checkpoints
      still writes the whole model (``loralib.from_pretrained`` loads it). A model without adapters (full
      fine-tuning, even with some parameters frozen by hand) keeps whole-model checkpoints.
    * every checkpoint and the output folder get ``loralib_run.json``: the method, adapter config and a fingerprint
      of the frozen base (:func:`loralib.checkpoints.run_record`); :func:`loralib.load_checkpoint` uses it.
    * ``train(resume_from_checkpoint=...)`` validates the checkpoint against the model before anything is loaded
      (:func:`loralib.checkpoints.validate_checkpoint`: damaged or missing files, another method, rank, target set
      or base model raise :class:`~loralib.checkpoints.CheckpointError`, one sentence); ``True`` resumes from the
      newest *complete* checkpoint, skipping one a killed run left half written. Loading such a checkpoint reports
      no "missing keys" for the frozen base; ``optimizer.pt`` is checked to hold the same parameter groups.
    * a run resumed from a checkpoint at ``global_step >= max_steps`` is finished: it trains no further step
      (transformers otherwise trains one more whenever ``max_steps`` is not a multiple of the steps per epoch).
      ``train()`` then returns ``TrainOutput(global_step, training_loss=nan, metrics)``: the step count of the
      checkpoint and no loss, since this call computed none; the model is the checkpoint's (or the best one, with
      ``load_best_model_at_end``).

    Trainer methods overridden, each calling ``super()`` (so a subclass's own version, such as TRL's
    ``_save_checkpoint`` that writes a model card, still runs): ``train``, ``_run_epoch`` (the ``max_steps`` stop;
    transformers 5's per-epoch hook), ``_save_checkpoint`` / ``_save`` (the trainable state only),
    ``_issue_warnings_after_load`` and ``_load_optimizer_and_scheduler``. Hooks a subclass may override:
    :meth:`_run_method` (the method and whether the run is bi-level, checked against a resumed checkpoint) and
    :meth:`_run_record_extra` (more fields for ``loralib_run.json``).
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(AdapterCheckpointMixin):
            raise TypeError(f"{cls.__name__} lists transformers' Trainer before AdapterCheckpointMixin, whose hooks "
                            "would then never run: put the mixin first, class X(AdapterCheckpointMixin, Trainer)")

    # ---- what the run is -----------------------------------------------------------------------------------------
    def _run_method(self) -> tuple[str, bool]:
        """``(method, bilevel)`` of this run: the adapters' method (``"ft"`` without adapters) and False."""
        adapter = get_adapter_config(self.model)
        return (adapter.method if adapter is not None else "ft"), False

    def _run_record_extra(self) -> dict:
        """Fields added to ``loralib_run.json`` besides the method, base and adapters (default: ``max_steps``)."""
        return {"max_steps": self.args.max_steps}

    def _base_fingerprint(self) -> dict | None:
        """:func:`loralib.checkpoints.base_fingerprint` of the current model (computed once per model)."""
        cached = getattr(self, "_fingerprint_cache", None)
        if cached is None or cached[0] is not self.model:
            cached = (self.model, base_fingerprint(self.model))
            self._fingerprint_cache = cached
        return cached[1]

    def _run_record(self) -> dict:
        method, bilevel = self._run_method()
        return run_record(self.model, method=method, bilevel=bilevel, fingerprint=self._base_fingerprint(),
                          extra=self._run_record_extra())

    def _frozen_keys(self) -> set[str]:
        """State-dict keys of the frozen pretrained weights of an adapted model, tied aliases included (empty for
        a model without adapters): :func:`loralib.checkpoints.frozen_keys`."""
        return frozen_keys(self.model)

    # ---- training --------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None, trial=None, **kwargs):
        """``Trainer.train``, checking a checkpoint before it trusts it.

        Args:
            resume_from_checkpoint: a ``checkpoint-N`` folder, or True for the newest complete one in
                ``output_dir`` (:func:`loralib.checkpoints.last_complete_checkpoint`), or None / False.
            trial, **kwargs: as ``Trainer.train``.

        Returns the Trainer's ``TrainOutput``; for a checkpoint already at ``max_steps``, no step is trained and
        its ``training_loss`` is nan.

        Raises:
            ValueError: ``resume_from_checkpoint=True`` and ``output_dir`` holds no complete checkpoint.
            CheckpointError: the checkpoint is damaged or was written for another method, rank, target set or base
                (:func:`loralib.checkpoints.validate_checkpoint`), before anything is loaded.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from")
        if resume_from_checkpoint:
            resume_from_checkpoint = str(resume_from_checkpoint)
            method, bilevel = self._run_method()
            validate_checkpoint(resume_from_checkpoint, self.model, method=method, bilevel=bilevel,
                                optimizer=not (self.args.deepspeed or self.args.fsdp),
                                fingerprint=self._base_fingerprint())
        else:
            resume_from_checkpoint = None
        if self.args.should_save:
            write_run_record(self.args.output_dir, self._run_record())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _run_epoch(self, *args, **kwargs):
        # A checkpoint at max_steps is a finished run. transformers resumes inside its epoch and trains one step
        # past max_steps whenever max_steps is not a multiple of the steps per epoch (its stop test runs after a
        # step): stop before the first step instead. No loss was computed, so the call reports nan, not 0.
        state = self.state
        if 0 < state.max_steps <= state.global_step:
            self.control.should_training_stop = True
            if isinstance(getattr(self, "_tr_loss", None), torch.Tensor):
                self._tr_loss = torch.full_like(self._tr_loss, float("nan"))
            return None
        return super()._run_epoch(*args, **kwargs)

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        self._writing_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """In a checkpoint of an adapted model, only what training changes (adapters, magnitudes, head, merge
        state): the frozen base is the pretrained model's, and would otherwise be written into every checkpoint.
        ``save_model`` outside checkpoints writes the whole model. Both write ``loralib_run.json`` next to the
        weights. A ``state_dict`` given by the Trainer (DeepSpeed, FSDP) is saved as given."""
        frozen = self._frozen_keys() if getattr(self, "_writing_checkpoint", False) and state_dict is None else None
        if frozen:
            state_dict = {k: v for k, v in self.model.state_dict().items() if k not in frozen}
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            write_run_record(output_dir if output_dir is not None else self.args.output_dir, self._run_record())

    def _issue_warnings_after_load(self, load_result) -> None:
        # a checkpoint without the frozen base is complete: only other missing keys are worth a warning
        frozen = self._frozen_keys()
        load_result.missing_keys[:] = [k for k in load_result.missing_keys if k not in frozen]
        super()._issue_warnings_after_load(load_result)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # torch fails deep inside load_state_dict on optimiser state for other parameter groups: name the file first
        if checkpoint is not None and self.optimizer is not None and not (self.args.deepspeed or self.args.fsdp):
            check_optimizer_groups(Path(checkpoint) / OPTIMIZER, self.optimizer)
        super()._load_optimizer_and_scheduler(checkpoint)


class AdapterTrainer(AdapterCheckpointMixin, Trainer):
    """transformers' ``Trainer`` with adapter-only, validated checkpoints (:class:`AdapterCheckpointMixin`), for
    LoRA and DoRA models (and full fine-tuning, whose checkpoints stay whole). Arguments are the Trainer's.

    MRO: ``AdapterTrainer -> AdapterCheckpointMixin -> Trainer -> object``. For TRL, mix the same way:
    ``class AdapterSFTTrainer(AdapterCheckpointMixin, trl.SFTTrainer)``.
    """
