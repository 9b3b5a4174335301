"""Model-level API: which modules get adapters, which parameters train at which level, merging."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layers import (
    AdapterLayer,
    BiDoRAConv1D,
    BiDoRALinear,
    DoRAConv1D,
    DoRAEmbedding,
    DoRALinear,
    LoRAConv1D,
    LoRAEmbedding,
    LoRALinear,
)

METHODS = ("lora", "dora", "bidora")

# (method, base type) -> adapter class. Checked once at injection time, never in a forward.
_LAYER_CLASSES: dict[str, list[tuple[type[nn.Module], type[AdapterLayer]]]] = {
    "lora": [(nn.Linear, LoRALinear), (Conv1D, LoRAConv1D), (nn.Embedding, LoRAEmbedding)],
    "dora": [(nn.Linear, DoRALinear), (Conv1D, DoRAConv1D), (nn.Embedding, DoRAEmbedding)],
    "bidora": [(nn.Linear, BiDoRALinear), (Conv1D, BiDoRAConv1D)],
}

_CONFIG_ATTR = "_loralib_adapter_config"


@dataclass
class AdapterConfig:
    """What to adapt and how.

    Args:
        method: ``"lora"``, ``"dora"`` or ``"bidora"``.
        r: rank of the update ``B A``.
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
        lora_dropout: dropout on the adapter input only, in [0, 1).
        target_modules: module-name suffixes (``"query"`` matches ``...attention.self.query``), or a single regex
            string that must match the full module name.
        modules_to_save: module-name suffixes kept trainable without an adapter (e.g. the task head).
        use_rslora: scale by ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``"kaiming"`` (uniform, like ``nn.Linear``) or ``"gaussian"`` for ``lora_A``.
        detach_norm: treat the row norm as a constant in backward (the DoRA paper's cheaper approximation).
    """

    method: str = "bidora"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False
    init_lora_weights: str = "kaiming"
    detach_norm: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, (int, float))
            or not (0.0 <= self.lora_dropout < 1.0)
        ):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in ("kaiming", "gaussian"):
            raise ValueError(f"init_lora_weights must be 'kaiming' or 'gaussian', got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"target_modules is not a valid regex: {err}") from None
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"target_modules must be a non-empty list of names or a regex, got {self.target_modules!r}"
                )
        self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)


def matches_module_name(name: str, patterns: list[str] | str) -> bool:
    """True when ``name`` ends with one of the suffixes ``patterns`` (at a dot), or fully matches the regex."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _adapter_class(method: str, module: nn.Module, name: str) -> type[AdapterLayer]:
    for base_type, adapter_type in _LAYER_CLASSES[method]:
        if isinstance(module, base_type):
            return adapter_type
    supported = ", ".join(t.__name__ for t, _ in _LAYER_CLASSES[method])
    raise TypeError(f"module {name!r} is a {type(module).__name__}; method {method!r} supports only {supported}")


@dataclass
class AdapterSummary:
    """What :func:`apply_adapters` did."""

    adapted_modules: list[str]
    saved_modules: list[str]
    trainable_parameters: int
    total_parameters: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        return (
            f"adapted {len(self.adapted_modules)} modules, kept {len(self.saved_modules)} trainable; "
            f"trainable params: {self.trainable_parameters:,} / {self.total_parameters:,} ({share:.3f}%)"
        )


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """All adapted layers of ``model`` with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def get_adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The :class:`AdapterConfig` applied to ``model``, or None."""
    return getattr(model, _CONFIG_ATTR, None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_adapters(model: nn.Module, config: AdapterConfig, verbose: bool = False) -> AdapterSummary:
    """Replace every module matched by ``config.target_modules`` with its adapter layer, in place.

    Freezes every other parameter, keeps ``modules_to_save`` trainable, and returns a summary.
    Raises if nothing matches, if a match is of an unsupported type, or if the model already has adapters.
    """
    if adapter_layers(model) or get_adapter_config(model) is not None:
        raise ValueError("this model already has adapters; apply_adapters can be called only once per model")
    targets = [(n, m) for n, m in model.named_modules() if n and matches_module_name(n, config.target_modules)]
    if not targets:
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r}; "
            f"e.g. module names: {[n for n, _ in list(model.named_modules())[1:12]]}"
        )
    plan = [(name, module, _adapter_class(config.method, module, name)) for name, module in targets]
    saved = [n for n, _ in model.named_modules() if n and matches_module_name(n, config.modules_to_save)]
    if config.modules_to_save and not saved:
        raise ValueError(f"no module matched modules_to_save={config.modules_to_save!r}")
    overlap = sorted(t for t, _ in targets for s in saved if t == s or t.startswith(s + "."))
    if overlap:
        raise ValueError(f"modules {overlap} are adapted and also (inside) modules_to_save; keep the two apart")

    for param in model.parameters():
        param.requires_grad_(False)
    kwargs = dict(
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        init_lora_weights=config.init_lora_weights,
        detach_norm=config.detach_norm,
    )
    for name, module, cls in plan:
        _set_submodule(model, name, cls.from_base(module, r=config.r, **kwargs))
    for name in saved:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    for _, layer in adapter_layers(model):
        for param in (layer.lora_A, layer.lora_B, getattr(layer, "magnitude", None)):
            if param is not None:
                param.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, config)

    summary = AdapterSummary(
        adapted_modules=[n for n, _, _ in plan],
        saved_modules=saved,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )
    if verbose:
        print(summary)
    return summary


def saved_module_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the ``modules_to_save`` (e.g. the task head), by qualified name."""
    config = get_adapter_config(model)
    if config is None:
        return {}
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if name and matches_module_name(name, config.modules_to_save):
            for pname, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params[f"{name}.{pname}"] = p
    return params


def direction_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The lower-level parameters of BiDoRA: every ``lora_A``, ``lora_B`` and the ``modules_to_save`` parameters."""
    params = [p for _, layer in adapter_layers(model) for p in (layer.lora_A, layer.lora_B)]
    return params + list(saved_module_parameters(model).values())


def magnitude_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The upper-level parameters of BiDoRA: every ``magnitude`` vector (empty for LoRA)."""
    return [layer.magnitude for _, layer in adapter_layers(model) if layer.decomposed]


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """Mean over decomposed layers of ``‖V̂ V̂ᵀ − I‖_F`` with ``V̂`` the row-normalised ``(out, in)`` direction.

    This is the paper's ``‖V̂ᵀV̂ − I‖_F`` written for PyTorch's ``(out, in)`` layout (the paper stores ``W`` as
    ``(in, out)`` with column norms): the Gram matrix of the unit direction vectors, whose diagonal is exactly 1.
    Computed in factored form (:meth:`AdapterLayer.orthogonality_distance`), never materialising the direction.
    """
    layers = [layer for _, layer in adapter_layers(model) if layer.decomposed]
    if not layers:
        raise ValueError("orthogonality_penalty needs DoRA/BiDoRA layers; the model has none")
    return torch.stack([layer.orthogonality_distance() for layer in layers]).sum() / len(layers)


def reset_directions(model: nn.Module) -> None:
    """Re-initialise every adapter direction (A random, B zero) and reset the ``modules_to_save`` modules."""
    for _, layer in adapter_layers(model):
        layer.reset_adapter_parameters()
    config = get_adapter_config(model)
    if config is None:
        return
    for name, module in model.named_modules():
        if name and matches_module_name(name, config.modules_to_save):
            for sub in module.modules():
                if hasattr(sub, "reset_parameters") and not isinstance(sub, AdapterLayer):
                    sub.reset_parameters()


def _check_not_shared(model: nn.Module) -> None:
    """Merging in place writes into ``weight``: refuse when another module uses the same tensor (tied weights)."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), set()).add(name)
    for name, layer in adapter_layers(model):
        others = owners[id(layer.weight)] - {name}
        if others:
            raise ValueError(
                f"the weight of {name!r} is shared with {sorted(others)} (tied weights); merging in place would change "
                "them too. Use merge_and_unload, which gives the adapted module its own weight."
            )


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its base weight in place; returns how many layers were merged (0 if all were)."""
    _check_not_shared(model)
    return sum(layer.merge() for _, layer in adapter_layers(model))


def unmerge_adapters(model: nn.Module) -> int:
    """Undo :func:`merge_adapters`; returns how many layers were unmerged."""
    return sum(layer.unmerge() for _, layer in adapter_layers(model))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain module holding the merged weight; returns the (same) model.

    The result has no loralib classes in it, so ``save_pretrained`` of vanilla transformers saves and reloads it.
    """
    layers = adapter_layers(model)
    plain = {name: layer.make_base_module() for name, layer in layers}
    for name, module in plain.items():
        if not all(torch.all(torch.isfinite(p)) for p in module.parameters()):
            raise ValueError(f"merging {name!r} produced non-finite weights")
    for name, module in plain.items():
        module.train(model.training)
        _set_submodule(model, name, module)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
