"""BiDoRA under TRL's ``SFTTrainer``: :class:`BiDoRASFTConfig` and :class:`BiDoRASFTTrainer`.

``BiDoRASFTTrainer`` is :class:`loralib.BiDoRATrainer` on top of ``trl.SFTTrainer``: SFTTrainer prepares the data
(chat template, EOS, tokenisation, labels, truncation, packing), collates it and computes the loss through its fused
LM head; BiDoRATrainer adds the upper level. The upper split is prepared by SFTTrainer's own ``_prepare_dataset``
with the train split's settings, so the magnitudes train on rows formatted, tokenised, truncated and packed exactly as
the directions' rows are. The upper step's loss evaluations (the upper loss and darts' lower-loss evaluations) leave
SFTTrainer's recorded metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``) and its token count as they were:
what is logged is what the lower steps produced.

TRL is optional (the ``test`` extra pins ``trl>=1.16,<2``): ``import loralib`` works without it, and importing this
module (or ``loralib.BiDoRASFTTrainer``) without it raises an ``ImportError`` saying what to install. The range is
checked at import because this module relies on SFTTrainer internals (``_prepare_dataset``, ``_metrics``,
``_total_train_tokens``, ``_formatting_func``, ``_skip_prepare_dataset``).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field

from packaging.version import Version

TRL_REQUIREMENT = "trl>=1.16,<2"
_TRL_MIN, _TRL_BELOW = Version("1.16"), Version("2")

if importlib.util.find_spec("trl") is None:
    raise ImportError(f"loralib.sft (BiDoRASFTTrainer, BiDoRASFTConfig) needs TRL: pip install '{TRL_REQUIREMENT}'")

import trl  # noqa: E402  (after the check above, so a missing TRL gets its one-sentence error)

if not _TRL_MIN <= Version(Version(trl.__version__).base_version) < _TRL_BELOW:
    raise ImportError(f"loralib.sft supports {TRL_REQUIREMENT} (it relies on SFTTrainer's dataset preparation and "
                      f"recorded metrics), found trl {trl.__version__}: pip install '{TRL_REQUIREMENT}'")

from datasets import IterableDataset  # noqa: E402
from torch import nn  # noqa: E402
from transformers.utils import is_torch_bf16_gpu_available  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from .bidora_trainer import BiDoRATrainer  # noqa: E402
from .hypergradients import ESTIMATORS  # noqa: E402
from .layers import AdapterLayer  # noqa: E402
from .model import get_adapter_config  # noqa: E402
from .training_args import BiDoRATrainingArguments  # noqa: E402

__all__ = ["TRL_REQUIREMENT", "BiDoRASFTConfig", "BiDoRASFTTrainer"]


@dataclass
class BiDoRASFTConfig(BiDoRATrainingArguments, SFTConfig):
    """``SFTConfig``'s fields (``max_length``, ``packing``, ``dataset_text_field``, ``completion_only_loss``,
    ``assistant_only_loss``, ...) and :class:`loralib.BiDoRATrainingArguments`' bi-level fields (``upper_fraction``,
    ``hypergradient``, ``upper_learning_rate``, ...), on one ``TrainingArguments``.

    MRO: ``BiDoRASFTConfig -> BiDoRATrainingArguments -> SFTConfig -> trl's _BaseConfig -> TrainingArguments``;
    ``__post_init__`` runs down the same chain (ours, the bi-level checks, SFTConfig's, TRL's base, transformers').

    Defaults. A dataclass takes each field's default from the last class of the reversed MRO that declares it, and
    ``BiDoRATrainingArguments`` carries every ``TrainingArguments`` field: without the declarations below, the five
    defaults TRL changes would silently fall back to transformers' (lr 5e-5, logging every 500 steps, ...). Each is
    therefore written here, reconciled:

    * ``learning_rate=2e-5``, ``logging_steps=10``: TRL's (no clash with BiDoRA). Adapters usually want a larger
      learning rate (~1e-4); ``upper_learning_rate`` defaults to ``learning_rate``.
    * ``bf16=None``: resolved before the parents' checks to True only on an accelerator with bf16 (TRL's default
      there) and False on the CPU (``use_cpu``, or no bf16 accelerator) and with ``fp16``. TRL turns it on
      everywhere, which transformers refuses on a CPU machine without ``use_cpu`` and which makes CPU runs slow and
      darts' finite differences noisy. (``fp16`` itself is refused by the trainer: the upper step has no loss
      scaling.)
    * ``gradient_checkpointing=None`` (off; transformers' ``activation_checkpointing`` alias): TRL turns it on. The
      upper step evaluates the loss again (darts: three forward/backward passes per upper step), and checkpointing
      would recompute every one of them. When it is turned on, ``use_reentrant=False`` is filled in unless given
      (``activation_checkpointing_kwargs``): reentrant checkpointing refuses second-order hypergradients.
    * ``average_tokens_across_devices=False``: BiDoRA's. Under ``torchrun`` BiDoRATrainer weights each process's loss
      by its share of the global batch's label tokens itself (lower step, upper loss, the hypergradient's lower
      losses: the global token mean everywhere), and refuses True, which would rescale the loss a second time.

    Raises:
        ValueError: as :class:`loralib.BiDoRATrainingArguments` and ``SFTConfig`` do, naming the field.
    """

    learning_rate: float = field(default=2e-5, metadata={"help": "initial AdamW learning rate (TRL's SFT default)"})
    logging_steps: float = field(default=10, metadata={
        "help": "log every X update steps (integer, or a ratio of the total steps in [0, 1)); TRL's default"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; default: on where an accelerator supports bf16, off on the CPU and with fp16"})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "deprecated alias of activation_checkpointing; default off (TRL: on), non-reentrant when on",
        "nargs": "?", "const": True})
    average_tokens_across_devices: bool = field(default=False, metadata={
        "help": "scale the loss by the global token count (TRL's default True; see the class docstring)"})

    def __post_init__(self) -> None:
        if self.bf16 is None:  # before TRL's base, which would make it True on any machine
            self.bf16 = not self.fp16 and not self.use_cpu and is_torch_bf16_gpu_available()
        super().__post_init__()
        on = getattr(self, "activation_checkpointing", None) or self.gradient_checkpointing
        if on:
            name = "activation_checkpointing_kwargs" if hasattr(self, "activation_checkpointing_kwargs") else (
                "gradient_checkpointing_kwargs")
            kwargs = dict(getattr(self, name) or {})
            kwargs.setdefault("use_reentrant", False)
            setattr(self, name, kwargs)
            self.gradient_checkpointing_kwargs = kwargs  # the alias TRL reads


class BiDoRASFTTrainer(BiDoRATrainer, SFTTrainer):
    """``trl.SFTTrainer`` training BiDoRA's two levels (and LoRA / DoRA / full fine-tuning baselines unchanged).

    MRO: ``BiDoRASFTTrainer -> BiDoRATrainer -> (BiDoRATrainer's checkpoint mixin) -> SFTTrainer -> trl's
    _BaseTrainer -> Trainer``: every loralib class comes before SFTTrainer, and each hook calls ``super()``. So
    ``compute_loss`` is BiDoRA's (the orthogonality penalty on the lower loss) around SFTTrainer's (fused LM head,
    metrics); ``training_step`` and ``log`` are BiDoRA's (lower batch kept, upper loss logged), then SFTTrainer's
    (activation offloading, metrics), then the Trainer's; ``evaluate`` names TRL's metrics by split
    (``eval_heldout_mean_token_accuracy``), otherwise ``evaluate``, ``prediction_step`` and the dataset preparation are
    SFTTrainer's; checkpoints are loralib's (trainable state, ``bilevel_state.pt``) around
    SFTTrainer's (model card); ``__init__`` splits first (BiDoRATrainer), then SFTTrainer prepares the lower and
    evaluation splits, then this class prepares the upper split.

    Data. ``train_dataset`` may be raw conversations (``messages``; the tokenizer needs a chat template), raw text
    (``dataset_text_field``), prompt-completion pairs or pre-tokenised rows (``input_ids``). For BiDoRA the seeded
    ``upper_fraction`` is held out of the raw rows first (as :class:`loralib.BiDoRATrainer` does), then SFTTrainer
    prepares the lower rest as its train split; the upper split (held out, or ``upper_dataset``) is prepared with the
    same call and the same settings (``packing``, not ``eval_packing``), and it is also evaluated as the ``heldout``
    split (prepared as SFTTrainer prepares evaluation data).

    Args:
        model: a model adapted with :func:`loralib.apply_adapters` (or a plain one for full fine-tuning); not a name
            or path (apply the adapters first) and not a PEFT model.
        args: a :class:`BiDoRASFTConfig` (``None``: its defaults with ``output_dir="trainer_output"``).
        train_dataset / eval_dataset / upper_dataset / retrain: as for :class:`loralib.BiDoRATrainer`;
            ``train_dataset`` is required (as for SFTTrainer).
        data_collator / processing_class / formatting_func / **kwargs: as for ``trl.SFTTrainer``.

    Raises:
        TypeError: ``model`` is missing or a name, or ``args`` is not a ``BiDoRASFTConfig`` (SFTTrainer would turn it
            into a plain ``SFTConfig`` and drop the bi-level settings).
        ValueError: ``peft_config`` is given; the adapters sit on the output embeddings (TRL's fused LM head reads
            ``lm_head.weight`` and would ignore them); a held-out split is needed from an ``IterableDataset``; a
            second-order hypergradient (``neumann``, ``cg``) with the fused LM head, whose backward cannot be
            differentiated again; and everything :class:`loralib.BiDoRATrainer` and ``trl.SFTTrainer`` refuse.
    """

    def __init__(
        self,
        model: nn.Module,
        args: BiDoRASFTConfig | None = None,
        *,
        train_dataset=None,
        eval_dataset=None,
        upper_dataset=None,
        retrain: bool = False,
        data_collator=None,
        processing_class=None,
        formatting_func=None,
        peft_config=None,
        **kwargs,
    ) -> None:
        if model is None or isinstance(model, str):
            raise TypeError("BiDoRASFTTrainer needs a model object adapted with loralib.apply_adapters (or a plain one "
                            f"for full fine-tuning), got {model!r}: load the model and apply the adapters first")
        if peft_config is not None:
            raise ValueError("BiDoRASFTTrainer trains loralib adapters, not PEFT ones: drop peft_config and adapt the "
                             "model with loralib.apply_adapters (loralib.adapter_config_from_peft converts a "
                             "LoraConfig)")
        args = BiDoRASFTConfig(output_dir="trainer_output") if args is None else args
        if not isinstance(args, BiDoRASFTConfig):
            raise TypeError(f"BiDoRASFTTrainer needs loralib.BiDoRASFTConfig, got {type(args).__name__} (SFTTrainer "
                            "would turn it into a plain SFTConfig without the bi-level settings)")
        self._refuse_adapted_output_embeddings(model)
        self._refuse_iterable_split(model, args, train_dataset, upper_dataset, retrain)
        if get_adapter_config(model) is None:
            warnings.warn("the model has no loralib adapters: BiDoRASFTTrainer trains it as full fine-tuning on all "
                          "of train_dataset, with no upper level (upper_fraction is not used); for BiDoRA, adapt it "
                          "first with loralib.apply_adapters(model, loralib.AdapterConfig(method='bidora', ...))",
                          stacklevel=2)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         upper_dataset=upper_dataset, retrain=retrain, data_collator=data_collator,
                         processing_class=processing_class, formatting_func=formatting_func, **kwargs)
        if self.upper_dataset is not None:
            self.upper_dataset = self._prepare_upper_dataset(self.upper_dataset)

    # ---- evaluation: TRL's metrics under the split's own prefix ----------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``SFTTrainer.evaluate``, with TRL's metrics (``mean_token_accuracy``, ``entropy``, ``num_tokens``) named
        by the split like the loss (``eval_heldout_mean_token_accuracy``); SFTTrainer names them ``eval_<metric>``
        whatever the split, so with the ``heldout`` and ``validation`` splits the second would overwrite the first."""
        outer = getattr(self, "_metric_key_prefix", None)
        self._metric_key_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                    metric_key_prefix=metric_key_prefix)
        finally:
            self._metric_key_prefix = outer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = getattr(self, "_metric_key_prefix", None)
        recorded = self._metrics["eval"]
        if not self.model.training and prefix not in (None, "eval") and recorded:
            logs.update({f"{prefix}_{key}": sum(values) / len(values) for key, values in recorded.items()})
            recorded.clear()  # SFTTrainer's log then adds nothing under the bare "eval_" names
        super().log(logs, start_time)

    # ---- set-up ------------------------------------------------------------------------------------------------
    @staticmethod
    def _refuse_adapted_output_embeddings(model: nn.Module) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, AdapterLayer):
            raise ValueError("BiDoRASFTTrainer cannot train adapters on the output embeddings (lm_head): TRL's fused "
                             "LM head multiplies by lm_head.weight directly and would ignore them; remove it from "
                             "target_modules")

    def _refuse_iterable_split(self, model, args, train_dataset, upper_dataset, retrain: bool) -> None:
        """The upper split is indexed (a seeded split, a resumable stream): it cannot come from a stream."""
        if retrain:
            return
        if isinstance(upper_dataset, IterableDataset):
            raise ValueError("upper_dataset must be a datasets.Dataset (the upper level draws seeded batches by "
                             "index), not an IterableDataset")
        adapter = get_adapter_config(model)
        share = self._held_out_share(adapter.method if adapter is not None else "ft", args)
        if upper_dataset is None and share > 0 and isinstance(train_dataset, IterableDataset):
            raise ValueError(f"a held-out share of {share} cannot be split from an IterableDataset: pass a "
                             "datasets.Dataset, or an explicit upper_dataset")

    def _prepare_upper_dataset(self, dataset):
        """The upper split as SFTTrainer prepares its train split: same processing class, formatting function,
        packing choice (``packing``, where its ``heldout`` evaluation follows ``eval_packing``), truncation and
        labels. Nothing is done with ``dataset_kwargs={"skip_prepare_dataset": True}`` (the rows must then be
        trainer-ready, as the train rows must)."""
        if self._skip_prepare_dataset:
            return dataset
        return self._prepare_dataset(dataset, self.processing_class, self.args, self.args.packing,
                                     self._formatting_func, "upper")

    def _model_columns(self, dataset):
        """The columns SFTTrainer keeps for its collator (``input_ids``, ``labels``, ``seq_lengths`` for packing)."""
        if not hasattr(dataset, "column_names"):
            return dataset
        return self._remove_unused_columns(dataset, description="upper")

    def _check_supported(self) -> None:
        super()._check_supported()
        estimator = ESTIMATORS[self.args.hypergradient]
        if estimator.second_order and self._loss_through_fused_head():
            raise ValueError(
                f"hypergradient={self.args.hypergradient!r} differentiates the lower loss twice, which TRL's fused LM "
                "head cannot do (its backward is not differentiable): use a first-order hypergradient (darts, sama, "
                "first_order, damped_solve)"
            )

    def _loss_through_fused_head(self) -> bool:
        """Whether SFTTrainer's training loss goes through its fused LM head (not through full logits: a
        ``compute_loss_func`` or label smoothing with the ``nll`` loss)."""
        full_logits = self.compute_loss_func is not None or (
            self.label_smoother is not None and self.args.loss_type == "nll")
        return not full_logits
