"""``BiDoRATrainingArguments``: transformers' ``TrainingArguments`` plus the bi-level settings of BiDoRA."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .hypergradients import ESTIMATORS

HYPERGRADIENTS = tuple(ESTIMATORS)


@dataclass
class BiDoRATrainingArguments(TrainingArguments):
    """Every ``TrainingArguments`` field (``learning_rate``, ``max_steps``, ``eval_strategy``, ``report_to``, ...) and:

    Parameters that control the split:
        upper_fraction: BiDoRA only: share of the training set held out for the upper level (the magnitudes) when
            no ``upper_dataset`` is given; the lower level (directions, head) trains on the rest, and the held-out
            part is also the ``heldout`` split model selection uses. The baselines ignore it.
        heldout_fraction: LoRA, DoRA and full fine-tuning only: share of the training set held out as the
            ``heldout`` split for model selection (``metric_for_best_model``). Default None: none, they train on all
            of ``train_dataset`` as under a plain ``Trainer``. For BiDoRA leave it None (its held-out split is the
            upper split).
    Parameters that control the upper level:
        upper_learning_rate / upper_weight_decay: the magnitudes' AdamW settings (default: the lower ones).
        upper_batch_size: examples per upper step and process (default ``per_device_train_batch_size``).
        hypergradient: ``darts`` (finite differences, the paper's), ``neumann``, ``cg``, ``sama`` (darts through
            the Jacobian of the lower AdamW step), ``damped_solve`` (a warm-started solve of ``(H + δI) z = v``,
            converging to the damped implicit hypergradient) or ``first_order`` (no implicit term: the magnitudes get
            only their direct gradient on the held-out batch). See docs/hypergradients.md.
        unroll_steps: lower steps per upper step.
        darts_alpha: darts' step ``ε = darts_alpha / ‖v‖``.
        neumann_iterations / neumann_alpha: terms and step size of the Neumann series for ``H⁻¹ v``; it converges
            only for ``neumann_alpha < 2 / λ_max(H)`` (the lower Hessian's largest eigenvalue).
        cg_iterations: conjugate-gradient iterations for ``H⁻¹ v``.
        damped_solve_damping: ``δ`` of ``damped_solve``'s ``(H + δI)``; the lower Hessian is indefinite on real
            encoders, so δ must exceed ``|λ_min(H)|`` for the damped system to be positive definite.
    Parameters that control the lower level:
        orth_reg: weight of the orthogonality regulariser ``mean_layers ‖V̂ V̂ᵀ − I‖_F`` in the lower loss
            (DoRA / BiDoRA models).

    Raises:
        ValueError: naming the field, for a value out of range.

    Note:
        One ``TrainingArguments`` default is overridden: ``average_tokens_across_devices=False``. With True,
        transformers multiplies the loss of every model whose ``forward`` takes ``**kwargs`` by the number of
        processes, assuming the loss was divided by the global token count; sequence-classification heads (GLUE,
        proteins) return a batch mean and ignore that count, so under ``torchrun`` their gradient came out N times
        too large (and clipped differently) compared with one process at the same global batch. Instead,
        ``BiDoRATrainer`` weights each process's loss by its share of the global batch's items (label tokens that
        are not -100, shifted for a causal LM; rows otherwise), for the lower step, the upper loss and every lower
        loss of a hypergradient, so N processes train what one process trains at the same global batch for any
        loss (classification means, token-averaged LM losses over padded rows of uneven length); True is refused
        under ``torchrun``. With gradient accumulation (baselines only) the weighting is off and transformers'
        per-process normalisation applies.
    """

    # overridden TrainingArguments default (see the note above)
    average_tokens_across_devices: bool = field(
        default=False, metadata={"help": "scale the loss by the global token count (True: transformers' default)"}
    )
    # split
    upper_fraction: float = field(default=0.2, metadata={"help": "BiDoRA: held-out share of train for the upper "
                                                                 "level (and selection)"})
    heldout_fraction: float | None = field(default=None, metadata={
        "help": "lora / dora / ft: held-out share of train for model selection (default: none, train on all)"})
    # upper level
    upper_learning_rate: float | None = field(default=None, metadata={"help": "magnitudes' lr (default: lr)"})
    upper_weight_decay: float | None = field(default=None, metadata={"help": "magnitudes' weight decay"})
    upper_batch_size: int | None = field(default=None, metadata={"help": "upper batch per process"})
    hypergradient: str = field(default="darts", metadata={"help": "hypergradient", "choices": list(HYPERGRADIENTS)})
    unroll_steps: int = field(default=1, metadata={"help": "lower steps per upper step"})
    darts_alpha: float = field(default=0.01, metadata={"help": "darts: eps = darts_alpha / ||v||"})
    neumann_iterations: int = field(default=3, metadata={"help": "terms of the Neumann series"})
    neumann_alpha: float = field(default=1.0, metadata={"help": "Neumann step; converges below 2 / lambda_max(H)"})
    cg_iterations: int = field(default=3, metadata={"help": "conjugate-gradient iterations"})
    damped_solve_damping: float = field(
        default=1.0, metadata={"help": "damped_solve: delta of the damped lower Hessian H + delta*I (>= 0)"}
    )
    # lower level
    orth_reg: float = field(default=1e-5, metadata={"help": "orthogonality regulariser weight (lower loss)"})

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"{type(self).__name__}.{name} {rule}, got {getattr(self, name)!r}")

        def number(name: str, minimum: float, inclusive: bool = True, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "must be a finite number")
            if value < minimum or (not inclusive and value == minimum):
                fail(name, f"must be {'>=' if inclusive else '>'} {minimum}")

        def integer(name: str, minimum: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                fail(name, f"must be an integer >= {minimum}")

        number("upper_fraction", 0.0)
        if self.upper_fraction >= 1.0:
            fail("upper_fraction", "must be below 1")
        number("heldout_fraction", 0.0, optional=True)
        if self.heldout_fraction is not None and self.heldout_fraction >= 1.0:
            fail("heldout_fraction", "must be below 1")
        number("upper_learning_rate", 0.0, optional=True)
        number("upper_weight_decay", 0.0, optional=True)
        integer("upper_batch_size", 1, optional=True)
        if self.hypergradient not in HYPERGRADIENTS:
            fail("hypergradient", f"must be one of {HYPERGRADIENTS}")
        integer("unroll_steps", 1)
        number("darts_alpha", 0.0, inclusive=False)
        integer("neumann_iterations", 1)
        number("neumann_alpha", 0.0, inclusive=False)
        integer("cg_iterations", 1)
        number("damped_solve_damping", 0.0)
        number("orth_reg", 0.0)
        super().__post_init__()

    def hypergradient_settings(self) -> dict:
        """The estimators' settings (each estimator takes the ones it knows)."""
        return {
            "darts_alpha": self.darts_alpha, "neumann_iterations": self.neumann_iterations,
            "neumann_alpha": self.neumann_alpha, "cg_iterations": self.cg_iterations,
            "damped_solve_damping": self.damped_solve_damping,
        }

    @property
    def upper_lr(self) -> float:
        return self.learning_rate if self.upper_learning_rate is None else self.upper_learning_rate

    @property
    def upper_wd(self) -> float:
        return self.weight_decay if self.upper_weight_decay is None else self.upper_weight_decay
