"""Run configuration of ``run_glue.py``: one dataclass, YAML files, command-line overrides.

Precedence: dataclass defaults < ``--config file.yaml`` < command-line options. Every YAML key is a field of
:class:`GlueRunConfig` and a command-line option of the same name (``lr: 1.0e-5`` <-> ``--lr 1e-5``).

YAML note: PyYAML reads ``1e-5`` (no dot) as a *string* (YAML 1.1); float fields accept such strings when they
parse as a number, so ``lr: 1e-5`` works. Optional fields take ``null`` in YAML and ``none`` on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from glue_tasks import TASK_NAMES, get_task

from loralib.io import atomic_write_text

METHODS = ("ft", "lora", "dora", "bidora")
# The upper level's hypergradient, as offered by loralib/bilevel.py (kept in sync by hand: this file does not import
# loralib). "first_order" drops the implicit term.
HYPERGRADIENTS = ("darts", "neumann", "cg", "first_order")
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class GlueRunConfig:
    """Everything one GLUE run needs. Defaults are the settings shared by all original BiDoRA GLUE scripts."""

    # model and adapters
    model_name_or_path: str = _f("roberta-base", "Hugging Face model id or local directory of the backbone.")
    task_name: str | None = _f(None, f"GLUE task, one of: {', '.join(TASK_NAMES)}. Required.")
    method: str = _f("bidora", f"Adaptation method, one of: {', '.join(METHODS)} (ft = full fine-tuning).")
    r: int = _f(4, "Adapter rank.")
    lora_alpha: float = _f(8.0, "Adapter scaling numerator: the update is scaled by lora_alpha / r.")
    lora_dropout: float = _f(0.0, "Dropout on the adapter input (the base path never sees it).")
    target_modules: list[str] | str = _f(["query", "value"], "Module name suffixes to adapt (list), or in YAML one "
                                         "regex string matched against full module names.")
    modules_to_save: list[str] = _f(["classifier"], "Modules trained in full but not adapted (the task head).")
    # data
    max_length: int = _f(128, "Maximum tokens per example (longer examples are truncated).")
    pad_to_max_length: bool = _f(False, "Pad every batch to max_length (original scripts) instead of to its "
                                 "longest example (faster, same results up to rounding).")
    train_file: str | None = _f(None, "Local training file (.csv/.tsv/.json/.jsonl, GLUE column names) instead of "
                                "the hub. With any local file, only local files are used.")
    validation_file: str | None = _f(None, "Local dev file (MNLI: the matched dev set).")
    validation_mismatched_file: str | None = _f(None, "Local MNLI mismatched dev file (MNLI only).")
    test_file: str | None = _f(None, "Local test file; labels optional (MNLI: the matched test set).")
    # optimisation (lower level: directions and head)
    batch_size: int = _f(32, "Training batch size (each level).")
    eval_batch_size: int = _f(64, "Evaluation batch size.")
    lr: float = _f(5e-5, "Learning rate of the lower level (adapter directions and head).")
    weight_decay: float = _f(0.1, "Decoupled weight decay of the lower level.")
    upper_lr: float | None = _f(None, "Learning rate of the upper level (magnitudes); none = same as lr.")
    upper_weight_decay: float | None = _f(None, "Decoupled weight decay of the upper level; none = weight_decay.")
    iterations: int = _f(10000, "Number of lower-level training steps (bi-level phase).")
    retrain_iterations: int = _f(0, "Steps of the retraining phase (fresh adapter and head, magnitudes frozen at "
                                 "their bi-level values, whole training set); 0 = no retraining.")
    retrain_lr: float | None = _f(None, "Learning rate of the retraining phase; none = same as lr.")
    retrain_weight_decay: float | None = _f(None, "Weight decay of the retraining phase; none = weight_decay.")
    # bi-level
    hypergradient: str = _f("darts", f"Hypergradient of the upper level, one of: {', '.join(HYPERGRADIENTS)}.")
    unroll_steps: int = _f(1, "Lower-level steps per upper-level step.")
    darts_alpha: float = _f(0.01, "DARTS finite-difference step: epsilon = darts_alpha / ||v||.")
    orth_reg: float = _f(1e-5, "Weight of the orthogonality regulariser on the normalised directions.")
    upper_fraction: float = _f(0.2, "Fraction of the training set held out (seeded split): BiDoRA trains the "
                               "magnitudes on it; every method selects its model on it (0: none, not for bidora).")
    # schedule and AdamW
    warmup_ratio: float = _f(0.1, "Linear warmup over this fraction of the iterations, then linear decay to 0.")
    betas: list[float] = _f([0.9, 0.98], "AdamW betas (two numbers).")
    eps: float = _f(1e-6, "AdamW epsilon.")
    # evaluation, output, runtime
    eval_every: int = _f(100, "Evaluate every this many steps.")
    checkpoint_every: int = _f(1000, "Write checkpoints/last.pt every this many steps (0 = only at the end).")
    select_on_dev: bool = _f(False, "Report the best dev score over time, as the original code did (optimistic); "
                             "by default the model is selected on held-out training data.")
    snapshots: int = _f(4, "Number of evenly spaced weight snapshots saved for the decomposition analysis.")
    seed: int = _f(0, "Random seed (data split, initialisation, shuffling, dropout).")
    output_dir: str | None = _f(None, "Directory of this run's outputs (results.json, log.csv, checkpoints).")
    overwrite: bool = _f(False, "Replace an existing output_dir instead of resuming from it.")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps.")
    bf16: bool = _f(False, "bfloat16 autocast (trainable parameters stay fp32; DARTS differences get noisier).")
    num_workers: int = _f(0, "DataLoader worker processes.")
    # model head and inputs beyond GLUE
    pooling: str = _f("cls", "Task head: cls (the model's own sequence-classification head) or mean (masked mean of "
                      "the last hidden states, for encoders trained with mean pooling such as sentence embedders).")
    space_residues: bool = _f(False, "Insert a space between characters of every text (protein models with "
                              "one token per residue, e.g. AntiBERTy).")
    # more optimisation and runtime options
    neumann_iterations: int = _f(3, "Neumann-series terms (hypergradient neumann).")
    cg_iterations: int = _f(3, "Conjugate-gradient iterations (hypergradient cg).")
    retrain_reinit: bool = _f(True, "Retraining phase: start from a fresh adapter and head (as the original) "
                              "instead of continuing from the bi-level ones.")
    no_token_cache: bool = _f(False, "Do not cache tokenised data (default cache: $LORALIB_CACHE_DIR or "
                              "~/.cache/loralib).")
    no_progress: bool = _f(False, "No progress bar.")

    # -- derived values ----------------------------------------------------------------------------------------
    @property
    def effective_upper_lr(self) -> float:
        return self.lr if self.upper_lr is None else self.upper_lr

    @property
    def effective_upper_weight_decay(self) -> float:
        return self.weight_decay if self.upper_weight_decay is None else self.upper_weight_decay

    @property
    def effective_retrain_lr(self) -> float:
        return self.lr if self.retrain_lr is None else self.retrain_lr

    @property
    def effective_retrain_weight_decay(self) -> float:
        return self.weight_decay if self.retrain_weight_decay is None else self.retrain_weight_decay

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (for results.json and :func:`save_config`)."""
        return dataclasses.asdict(self)

    def validate(self) -> GlueRunConfig:
        """Check types and ranges; returns self. Raises ValueError naming the offending field."""
        hints = _hints()
        for f in dataclasses.fields(self):
            _coerce(f.name, getattr(self, f.name), hints[f.name])
        if self.task_name is None:
            raise ValueError(f"task_name is required (one of: {', '.join(TASK_NAMES)})")
        get_task(self.task_name)
        _choice("method", self.method, METHODS)
        _choice("hypergradient", self.hypergradient, HYPERGRADIENTS)
        _choice("pooling", self.pooling, ("cls", "mean"))
        if not _DEVICE_RE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        positive = ["r", "lora_alpha", "max_length", "batch_size", "eval_batch_size", "lr", "iterations",
                    "neumann_iterations", "cg_iterations",
                    "unroll_steps", "darts_alpha", "eps", "eval_every"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = ["weight_decay", "retrain_iterations", "orth_reg", "checkpoint_every",
                        "snapshots", "num_workers"]
        for name in non_negative + ["upper_lr", "upper_weight_decay", "retrain_lr", "retrain_weight_decay"]:
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        for name in ("upper_lr", "retrain_lr"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be > 0 (or none)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0.0 <= self.upper_fraction < 1.0:
            raise ValueError(f"upper_fraction must be in [0, 1), got {self.upper_fraction}")
        if self.method == "bidora" and self.upper_fraction == 0:
            raise ValueError("bidora needs upper_fraction > 0 (the magnitudes are trained on the held-out part)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must not be empty")
        if self.validation_mismatched_file is not None and get_task(self.task_name).name != "mnli":
            raise ValueError("validation_mismatched_file is only for MNLI")
        return self


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GlueRunConfig))


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(GlueRunConfig)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Return ``value`` converted to the field type ``hint``, or raise ValueError ("expects ..., got ...")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for alt in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, alt)
            except ValueError:
                pass
        raise ValueError(f"{name} expects {' or '.join(_type_name(a) for a in args)}, got "
                         f"{type(value).__name__} {value!r}")
    bad = ValueError(f"{name} expects {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise bad
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        x = _as_float(value)
        if x is None or not x.is_integer():
            raise bad
        return int(x)
    if hint is float:
        if isinstance(value, bool):
            raise bad
        x = _as_float(value)
        if x is None:
            raise bad
        return x
    raise TypeError(f"unsupported field type {hint!r} for {name}")  # a bug in this file, not in the input


def _as_float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _unknown_key_error(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(FIELD_NAMES)}"
    return ValueError(f"{where}: unknown key {key!r}{hint}")


def config_from_dict(data: dict[str, Any], where: str = "config", validate: bool = True) -> GlueRunConfig:
    """Build a :class:`GlueRunConfig` from a mapping (unknown keys and wrong types raise ValueError)."""
    hints = _hints()
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key_error(str(key), where)
        try:
            values[key] = _coerce(key, value, hints[key])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    cfg = GlueRunConfig(**values)
    if validate:
        try:
            cfg.validate()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return cfg


def load_config(yaml_path: str | os.PathLike, validate: bool = True) -> GlueRunConfig:
    """Read a YAML run configuration (``yaml.safe_load``, flat keys = field names).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a mapping, an unknown key (with the closest valid key), a wrong type, an invalid value.
    """
    path = Path(yaml_path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return config_from_dict(data, where=str(path), validate=validate)


def save_config(cfg: GlueRunConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (atomically); :func:`load_config` reads it back equal."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _cli_scalar(hint: Any):
    """argparse ``type`` for a scalar (optional scalars accept 'none' / 'null')."""
    optional = typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            return _coerce("value", text, base)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_type_name(base)}, got {text!r}") from None

    convert.__name__ = _type_name(base)
    return convert


def build_arg_parser() -> argparse.ArgumentParser:
    """Parser with ``--config`` and one ``--<field>`` per :class:`GlueRunConfig` field (only given ones override)."""
    parser = argparse.ArgumentParser(
        description="BiDoRA / DoRA / LoRA / full fine-tuning on a GLUE task.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of options (keys = the option names below); command-line "
                        "options override it.")
    hints = _hints()
    defaults = GlueRunConfig()
    for f in dataclasses.fields(GlueRunConfig):
        hint = hints[f.name]
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {default})"
        flag = f"--{f.name}"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "betas":
            parser.add_argument(flag, nargs=2, type=_cli_scalar(float), metavar=("BETA1", "BETA2"), help=help_text)
        elif typing.get_origin(hint) is list or f.name == "target_modules":
            parser.add_argument(flag, nargs="+", metavar="NAME", help=help_text)
        else:
            parser.add_argument(flag, type=_cli_scalar(hint), help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> GlueRunConfig:
    """``--config`` YAML (optional) with command-line overrides, validated. Errors exit with a message (argparse)."""
    parser = build_arg_parser()
    ns = vars(parser.parse_args(argv))
    config_path = ns.pop("config", None)
    try:
        base = load_config(config_path, validate=False).to_dict() if config_path else {}
        where = f"{config_path} with command-line overrides" if config_path and ns else config_path or "command line"
        return config_from_dict({**base, **ns}, where=where)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
