"""``AdapterConfig``: what to adapt and how, and its translation from PEFT's ``LoraConfig``.

Every field carries ``metadata={"help": ...}``, so ``transformers.HfArgumentParser`` turns the dataclass into
command-line options (``examples/NLU/run_glue.py`` parses it directly). The rules for each option are written
once, here: :meth:`AdapterConfig.__post_init__` checks the whole config and :func:`validate_adapter_options` the
per-layer options (rank, alpha, dropout, initialisation) that the layer constructors take too.

This module imports nothing from the rest of loralib, so every other module may import it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from dataclasses import dataclass, field

__all__ = [
    "ALL_LINEAR",
    "IGNORED_OPTIONS",
    "INIT_LORA_WEIGHTS",
    "METHODS",
    "REFUSED_OPTIONS",
    "AdapterConfig",
    "adapter_config_from_peft",
    "matches_module_name",
    "pattern_key",
    "validate_adapter_options",
]

METHODS = ("lora", "dora", "bidora")
#: ``target_modules`` shorthand: every Linear / Conv1D but the output head (see ``loralib.model.target_module_names``).
ALL_LINEAR = "all-linear"
INIT_LORA_WEIGHTS = ("kaiming", "gaussian")
_DEFAULT_TARGETS = ["query", "value"]


# ---- the rules ----------------------------------------------------------------------------------------------------
def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rank(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")


def _check_alpha(label: str, value: object) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{label} must be a positive finite number, got {value!r}")


def validate_adapter_options(
    *, r: object, lora_alpha: object, lora_dropout: object = 0.0, init_lora_weights: object = "kaiming"
) -> None:
    """Raise ValueError (naming the option and the value) unless the per-layer options are valid.

    ``r``: a positive integer (not a bool); ``lora_alpha``: a positive finite number; ``lora_dropout``: a number in
    [0, 1); ``init_lora_weights``: one of :data:`INIT_LORA_WEIGHTS`. :class:`AdapterConfig` and the adapter layers'
    constructors both check their options with this function.
    """
    _check_rank("r", r)
    _check_alpha("lora_alpha", lora_alpha)
    if not _is_number(lora_dropout) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if init_lora_weights not in INIT_LORA_WEIGHTS:
        raise ValueError(f"init_lora_weights must be 'kaiming' or 'gaussian', got {init_lora_weights!r}")


def _compiled(label: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{label} {pattern!r} is not a valid regex: {err}") from None


def _validated_pattern(label: str, pattern: object, integer: bool) -> dict:
    """A ``rank_pattern`` / ``alpha_pattern`` as a checked dict; a string is read as JSON (the command line)."""
    if pattern is None:
        return {}
    if isinstance(pattern, str):
        try:
            pattern = json.loads(pattern)
        except json.JSONDecodeError as err:
            raise ValueError(f"{label} is not valid JSON ({err.msg} at column {err.colno}): {pattern!r}") from None
    if not isinstance(pattern, dict):
        raise ValueError(f"{label} must be a dict {{module-name regex: value}}, got {pattern!r}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{label} keys must be non-empty strings, got {key!r}")
        _compiled(f"{label} key", key)
        if integer:
            _check_rank(f"{label}[{key!r}]", value)
        elif not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{label}[{key!r}] must be a positive number, got {value!r}")
    return dict(pattern)


def _validated_targets(target_modules: object, regex: str | None) -> list[str] | str:
    """``target_modules`` normalised: ``"all-linear"``, a regex string, or a non-empty list of name suffixes."""
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise ValueError(f"target_modules_regex must be a non-empty string, got {regex!r}")
        _compiled("target_modules_regex", regex)
        if isinstance(target_modules, (list, tuple)) and list(target_modules) != _DEFAULT_TARGETS:
            raise ValueError(
                f"give target_modules ({list(target_modules)!r}) or target_modules_regex ({regex!r}), not both"
            )
        target_modules = regex
    if isinstance(target_modules, (list, tuple)) and len(target_modules) == 1:
        only = target_modules[0]
        if isinstance(only, str) and only.lower() == ALL_LINEAR:  # `--target_modules all-linear`
            target_modules = only
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return ALL_LINEAR
        if not target_modules:
            raise ValueError("target_modules must not be empty")
        _compiled("target_modules", target_modules)
        return target_modules
    targets = list(target_modules) if isinstance(target_modules, (list, tuple)) else None
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of names or a regex, got {target_modules!r}")
    return targets


# ---- the config ---------------------------------------------------------------------------------------------------
@dataclass
class AdapterConfig:
    """What to adapt and how.

    Parameters:
        > What is adapted

        method: ``"lora"``, ``"dora"`` or ``"bidora"``.
        target_modules: module-name suffixes (``"query"`` matches ``...attention.self.query``), a single regex
            string that must match the full module name, or ``"all-linear"``: every ``nn.Linear`` and transformers
            ``Conv1D`` except the output head and the ``modules_to_save`` (see ``loralib.model.target_module_names``).
        target_modules_regex: a regex on full module names, the command-line spelling of a string
            ``target_modules`` (a command-line ``--target_modules x`` is a one-element suffix list). Moved into
            ``target_modules`` by ``__post_init__``, which then resets it to None.
        modules_to_save: module-name suffixes kept trainable without an adapter (e.g. the task head).

        > The update ``s · B A``

        r: rank of the update ``B A``.
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
        lora_dropout: dropout on the adapter input only, in [0, 1).
        use_rslora: scale by ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``"kaiming"`` (uniform, like ``nn.Linear``) or ``"gaussian"`` for ``lora_A``.
        rank_pattern: per-module ranks overriding ``r``, ``{key: rank}``. As in PEFT, ``key`` is a regex matched
            against the end of the module name at a dot boundary, ``re.match(rf"(.*\\.)?({key})$", name)``; the
            first matching key (in dict order) wins. E.g. ``{"layer.0.attention.self.query": 16}``. A string is
            read as JSON (so that ``HfArgumentParser`` can fill it, like ``TrainingArguments.lr_scheduler_kwargs``).
        alpha_pattern: per-module ``lora_alpha`` overriding ``lora_alpha``, ``{key: alpha}``, same matching rule
            and JSON strings.

        > DoRA / BiDoRA and precision

        detach_norm: treat the row norm as a constant in backward (the DoRA paper's cheaper approximation).
        autocast_adapter_dtype: on a float16 / bfloat16 base, create ``lora_A``, ``lora_B`` and ``magnitude`` in
            float32 (PEFT's default; half-precision adapters train poorly). False keeps the base dtype. An explicit
            ``model.half()`` / ``model.to(dtype)`` afterwards converts the adapters too.

    Saved (``to_dict``) with the keys above except ``target_modules_regex`` (folded into ``target_modules``).
    """

    # > What is adapted
    method: str = field(
        default="bidora",
        metadata={
            "help": "lora, dora (weight-decomposed: a trainable magnitude per output row) or bidora (DoRA whose "
            "magnitudes train at the upper level of a bi-level problem, on held-out data).",
            "choices": list(METHODS),
        },
    )
    target_modules: list[str] | str = field(
        default_factory=lambda: list(_DEFAULT_TARGETS),
        metadata={
            "help": "Modules to adapt: name suffixes ('query' matches '...attention.self.query'), or all-linear "
            "(every Linear / Conv1D but the output head and modules_to_save). For a regex on full module names use "
            "--target_modules_regex (one string in Python or YAML is a regex too)."
        },
    )
    target_modules_regex: str | None = field(
        default=None,
        metadata={
            "help": "A regex that module names must match in full (e.g. '.*layer\\.[0-5]\\..*(query|value)'); "
            "replaces target_modules."
        },
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata={"help": "Module name suffixes trained in full, without an adapter (e.g. a new task head)."},
    )
    # > The update s * B A
    r: int = field(
        default=8,
        metadata={
            "help": "Rank of the update B A. --lora_r is the same option, for torchrun command lines (torchrun "
            "reads --r as an abbreviation of its own --rdzv_* / --role options and stops).",
            "aliases": ["--lora_r"],
        },
    )
    lora_alpha: float = field(
        default=16.0,
        metadata={"help": "Scale numerator: the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with "
                  "--use_rslora)."},
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout probability on the adapter input only (the base path sees the clean "
                               "input), in [0, 1)."}
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rsLoRA: scale the update by lora_alpha / sqrt(r) instead of lora_alpha / r."}
    )
    init_lora_weights: str = field(
        default="kaiming",
        metadata={
            "help": "Initialisation of lora_A: kaiming (uniform, like nn.Linear) or gaussian (std 1 / r); lora_B "
            "starts at zero either way.",
            "choices": list(INIT_LORA_WEIGHTS),
        },
    )
    rank_pattern: dict[str, int] | str | None = field(
        default_factory=dict,
        metadata={
            "help": "Per-module ranks overriding r, as JSON: '{\"layer.0.attention.self.query\": 16}'. Each key is a "
            "regex for the end of the module name (at a dot); the first matching key wins (PEFT's rule)."
        },
    )
    alpha_pattern: dict[str, float] | str | None = field(
        default_factory=dict,
        metadata={"help": "Per-module lora_alpha overriding lora_alpha, as JSON ('{\"query\": 32}'); keys as for "
                  "rank_pattern."},
    )
    # > DoRA / BiDoRA and precision
    detach_norm: bool = field(
        default=False,
        metadata={"help": "DoRA / BiDoRA: treat the row norm ||W0 + s B A|| as a constant in backward (the DoRA "
                  "paper's cheaper approximation; PEFT always does). Default: exact gradients."},
    )
    autocast_adapter_dtype: bool = field(
        default=True,
        metadata={"help": "On a float16 / bfloat16 base model, create the adapter weights and magnitudes in float32 "
                  "(PEFT's default); false keeps the base dtype."},
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        validate_adapter_options(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            init_lora_weights=self.init_lora_weights,
        )
        self.target_modules = _validated_targets(self.target_modules, self.target_modules_regex)
        self.target_modules_regex = None
        if isinstance(self.modules_to_save, str):  # one name
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = list(self.modules_to_save or [])
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(f"modules_to_save must be a list of non-empty names, got {self.modules_to_save!r}")
        for label in ("use_rslora", "detach_norm", "autocast_adapter_dtype"):
            if not isinstance(getattr(self, label), bool):
                raise ValueError(f"{label} must be true or false, got {getattr(self, label)!r}")
        self.rank_pattern = _validated_pattern("rank_pattern", self.rank_pattern, integer=True)
        self.alpha_pattern = _validated_pattern("alpha_pattern", self.alpha_pattern, integer=False)

    def rank_for(self, name: str) -> int:
        """The rank of module ``name``: the first matching ``rank_pattern`` entry, else ``r``."""
        key = pattern_key(name, self.rank_pattern)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        """The ``lora_alpha`` of module ``name``: the first matching ``alpha_pattern`` entry, else ``lora_alpha``."""
        key = pattern_key(name, self.alpha_pattern)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    @classmethod
    def from_peft(cls, peft_config: object, *, detach_norm: bool = False) -> AdapterConfig:
        """The loralib config equivalent to a PEFT ``LoraConfig`` (or its dict, as in ``adapter_config.json``).

        See :func:`adapter_config_from_peft` (options loralib cannot represent raise ValueError naming the option).
        Imported DoRA trains with loralib's exact gradients unless ``detach_norm``.
        """
        return adapter_config_from_peft(peft_config, detach_norm=detach_norm)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        del data["target_modules_regex"]  # always None here: folded into target_modules
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)


def matches_module_name(name: str, patterns: list[str] | str) -> bool:
    """True when ``name`` ends with one of the suffixes ``patterns`` (at a dot), or fully matches the regex.

    ``"all-linear"`` is not a name pattern (it depends on module types): use ``loralib.model.target_module_names``.
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def pattern_key(name: str, pattern: dict[str, object]) -> str | None:
    """The first key of ``pattern`` (a ``rank_pattern`` / ``alpha_pattern``) matching module ``name``, or None.

    A key matches when ``re.match(rf"(.*\\.)?({key})$", name)`` does (PEFT's rule): the key is a regex for the end
    of the name, starting at a dot boundary (``"query"`` matches ``...self.query``, not ``...self.subquery``).
    """
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


# ---- PEFT's LoraConfig -> AdapterConfig -----------------------------------------------------------------------------
# PEFT's defaults for the options loralib maps (used when a dict leaves them out).
_PEFT_DEFAULTS = {
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "init_lora_weights": True,
}

#: Options that do not change the adapter's weights or outputs; accepted with any value.
IGNORED_OPTIONS = {
    "task_type": "what PEFT wrapper class to use",
    "auto_mapping": "the base-model class for AutoPeftModel",
    "peft_version": "the PEFT version that saved the file",
    "base_model_name_or_path": "where PEFT loads the base model from",
    "revision": "the base model's revision",
    "inference_mode": "whether PEFT freezes the adapter",
    "runtime_config": "runtime-only settings (ephemeral GPU offload), never saved",
    "fan_in_fan_out": "loralib reads the weight layout from the module type (Conv1D is (in, out)); PEFT itself "
    "overrides a wrong value per layer",
    "megatron_core": "only used with megatron_config, which is refused",
    "qalora_group_size": "only used with use_qalora, which is refused",
}

#: Options loralib cannot represent: ``{name: (accepted default values, reason)}``; other values raise ValueError.
REFUSED_OPTIONS: dict[str, tuple[tuple, str]] = {
    "bias": (("none",), "loralib never trains the base biases"),
    "lora_bias": ((False, None), "loralib's lora_B has no bias"),
    "exclude_modules": ((None, [], ""), "list the modules to adapt in target_modules instead"),
    "layers_to_transform": ((None, []), "select layers with a target_modules regex instead"),
    "layers_pattern": ((None, [], ""), "select layers with a target_modules regex instead"),
    "megatron_config": ((None, {}), "Megatron parallel layers are not supported"),
    "trainable_token_indices": ((None, [], {}), "trainable tokens are not supported"),
    "loftq_config": ((None, {}), "LoftQ changes the base weights"),
    "eva_config": ((None, {}), "EVA initialisation is not supported"),
    "corda_config": ((None, {}), "CorDA changes the base weights"),
    "lora_ga_config": ((None, {}), "LoRA-GA changes the base weights"),
    "velora_config": ((None, {}), "VeLoRA's custom backward is not supported"),
    "alora_invocation_tokens": ((None, []), "activated LoRA is not supported"),
    "use_qalora": ((False, None), "QALoRA is not supported"),
    "monteclora_config": ((None, {}), "MonteCLoRA is not supported"),
    "layer_replication": ((None, []), "layer replication is not supported"),
    "target_parameters": ((None, []), "loralib adapts modules, not bare parameters"),
    "use_bdlora": ((None, {}), "block-diagonal LoRA is not supported"),
    "arrow_config": ((None, {}), "Arrow routing is not supported"),
    "kasa_config": ((None, {}), "KaSA is not supported"),
    "ensure_weight_tying": ((False, None), "loralib does not adapt tied copies of a module together"),
}

_MAPPED = {"peft_type", "target_modules", *_PEFT_DEFAULTS}
# PEFT's init_lora_weights values with a loralib equivalent (True: Kaiming-uniform A, zero B).
_INIT = {True: "kaiming", "gaussian": "gaussian"}


def _plain(value: object) -> object:
    """PEFT enums (PeftType, TaskType) as their string values, sets as sorted lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _refuse(name: str, value: object, reason: str) -> ValueError:
    return ValueError(f"PEFT option {name}={value!r} is not supported by loralib ({reason})")


def adapter_config_from_peft(peft_config: object, *, detach_norm: bool = False) -> AdapterConfig:
    """The loralib :class:`~loralib.AdapterConfig` equivalent to a PEFT LoRA config.

    Args:
        peft_config: a ``peft.LoraConfig`` or its dict (the content of PEFT's ``adapter_config.json``).
        detach_norm: DoRA only. PEFT always detaches the row norm ``‖W0 + s·BA‖`` in backward (the DoRA paper's
            approximation); loralib by default gives the exact gradient. Imported DoRA adapters therefore train with
            exact gradients unless ``detach_norm=True``, which reproduces PEFT's gradients. The forward is the same.

    Mapping: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` (list, regex string or ``"all-linear"``),
    ``modules_to_save`` (duplicates removed), ``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
    ``use_dora`` (-> method ``"dora"``, else ``"lora"``), ``init_lora_weights`` (True -> ``"kaiming"``,
    ``"gaussian"``). :data:`IGNORED_OPTIONS` do not change the adapter.

    Raises:
        TypeError: ``peft_config`` is neither a config object with ``to_dict()`` nor a dict.
        ValueError: ``peft_type`` is not ``"LORA"``; ``target_modules`` is missing or empty; an option in
            :data:`REFUSED_OPTIONS` has a non-default value, ``init_lora_weights`` is anything but True /
            ``"gaussian"`` (pissa, olora, loftq, eva, corda, orthogonal, mica, lora_ga, False), or an option unknown
            to PEFT 0.21 is set (each names the option and its value); an invalid value (e.g. ``r=0``).
    """
    if isinstance(peft_config, dict):
        data = dict(peft_config)
    elif callable(getattr(peft_config, "to_dict", None)):
        data = peft_config.to_dict()
    else:
        raise TypeError(f"expected a PEFT LoraConfig or its dict, got a {type(peft_config).__name__}")
    data = {key: _plain(value) for key, value in data.items()}

    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"PEFT peft_type={peft_type!r} is not supported by loralib (only LORA: LoRA and DoRA)")
    for name, value in data.items():
        if name in _MAPPED or name in IGNORED_OPTIONS:
            continue
        if name in REFUSED_OPTIONS:
            defaults, reason = REFUSED_OPTIONS[name]
            if not any(value == d and type(value) is type(d) for d in defaults):
                raise _refuse(name, value, reason)
        elif value not in (None, False, {}, [], ""):
            raise _refuse(name, value, "an option unknown to this loralib (written by a newer PEFT?)")
    options = {key: data.get(key, default) for key, default in _PEFT_DEFAULTS.items()}

    init = options["init_lora_weights"]
    if init is True or init == "gaussian":
        init_lora_weights = _INIT[init]
    else:
        reason = "only True (Kaiming-uniform A, zero B) and 'gaussian' exist in loralib"
        if init is False:
            reason = "random B initialisation is a PEFT debugging option"
        raise _refuse("init_lora_weights", init, reason)

    targets = data.get("target_modules")
    if targets is None or targets == [] or targets == "":
        raise _refuse(
            "target_modules", targets, "pass the modules explicitly; PEFT's per-architecture default is not known here"
        )
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = ALL_LINEAR
    elif not isinstance(targets, str):
        targets = list(targets)

    modules_to_save = list(dict.fromkeys(options["modules_to_save"] or []))
    return AdapterConfig(
        method="dora" if options["use_dora"] else "lora",
        r=options["r"],
        lora_alpha=options["lora_alpha"],
        lora_dropout=options["lora_dropout"],
        target_modules=targets,
        modules_to_save=modules_to_save,
        use_rslora=bool(options["use_rslora"]),
        init_lora_weights=init_lora_weights,
        detach_norm=detach_norm,
        rank_pattern=dict(options["rank_pattern"] or {}),
        alpha_pattern=dict(options["alpha_pattern"] or {}),
    )
