"""The adapter state of a model as the folder formats see it: the tensors by saved name, the two files of an
adapter folder and how to tell loralib's from PEFT's, the check that saved adapters fit a model, and copying saved
tensors in. :mod:`loralib.io` (loralib's folders) and :mod:`loralib.peft_compat` (PEFT's) are both built on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import AdapterConfig
from .files import read_json
from .model import adapter_layers, get_adapter_config, saved_module_parameters

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_kind",
    "adapter_tensors",
    "check_same_adapters",
    "copy_adapter_tensors",
    "require_adapter_config",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def require_adapter_config(model: nn.Module) -> AdapterConfig:
    """The model's :class:`~loralib.config.AdapterConfig`; ValueError when it has no adapters."""
    config = get_adapter_config(model)
    if config is None:
        raise ValueError("the model has no adapters; call loralib.apply_adapters first")
    return config


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters themselves (not copies) by saved name: ``<module>.lora_A``, ``.lora_B``,
    ``.magnitude`` (DoRA / BiDoRA) and the ``modules_to_save`` parameters."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        tensors[f"{name}.lora_A"] = layer.lora_A
        tensors[f"{name}.lora_B"] = layer.lora_B
        if layer.decomposed:
            tensors[f"{name}.magnitude"] = layer.magnitude
    tensors.update(saved_module_parameters(model))
    return tensors


def adapter_kind(directory: str | os.PathLike) -> tuple[str, dict]:
    """``("loralib" | "peft", adapter_config)`` for an adapter folder.

    A loralib folder has a ``"format"`` key in ``adapter_config.json``, a PEFT one a ``"peft_type"`` key. Raises
    FileNotFoundError for a missing folder or config, ValueError for an unreadable config or for PEFT's several-
    adapter layout (adapters in subfolders and none at the top, which loralib refuses naming them).
    """
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        if directory.is_dir():
            subfolders = sorted(p.name for p in directory.iterdir() if (p / ADAPTER_CONFIG).is_file())
            if subfolders:
                raise ValueError(
                    f"{directory} holds several adapters in subfolders {subfolders} and none at its top; loralib loads "
                    f"one adapter: pass one adapter's folder, e.g. {directory / subfolders[0]}"
                )
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}; not an adapter directory")
    meta = read_json(path)
    if "format" in meta:
        return "loralib", meta
    if "peft_type" in meta:
        return "peft", meta
    raise ValueError(f"{path} is neither a loralib adapter config (no 'format' key) nor a PEFT one (no 'peft_type')")


def check_same_adapters(
    model: nn.Module, saved: AdapterConfig, saved_shapes: dict[str, list[int]], source: str | os.PathLike
) -> None:
    """Refuse (ValueError naming the setting and both values) to load adapters made with other settings.

    Compares the model's adapters with ``saved`` (the config of the adapters on disk) and ``saved_shapes``
    (``{module: [out, in]}``): method, use_rslora, the adapted modules and their shapes, and the rank and
    lora_alpha of every module (so rank_pattern / alpha_pattern count through their effect).
    """
    config = get_adapter_config(model)
    if config is None:
        raise ValueError("the model has no adapters; call loralib.apply_adapters first")
    for key in ("method", "use_rslora"):
        if getattr(config, key) != getattr(saved, key):
            raise ValueError(
                f"adapters in {source} have {key}={getattr(saved, key)!r}, "
                f"the model's adapters have {key}={getattr(config, key)!r}"
            )
    layers = adapter_layers(model)
    expected = {name: list(layer.base_weight().shape) for name, layer in layers}
    saved_shapes = {name: list(shape) for name, shape in saved_shapes.items()}
    if expected != saved_shapes:
        missing = sorted(set(saved_shapes) - set(expected))
        extra = sorted(set(expected) - set(saved_shapes))
        shapes = sorted(k for k in set(expected) & set(saved_shapes) if expected[k] != saved_shapes[k])
        raise ValueError(
            f"adapters in {source} do not fit this model (target_modules={saved.target_modules!r} there, "
            f"{config.target_modules!r} here): saved-only modules {missing}, model-only modules {extra}, "
            f"shape mismatches {shapes}"
        )
    patterns = {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}
    for name, layer in layers:
        for key, there, here in (
            ("r", saved.rank_for(name), layer.r),
            ("lora_alpha", float(saved.alpha_for(name)), layer.lora_alpha),
        ):
            if there == here:
                continue
            pattern = patterns[key]
            if getattr(saved, pattern) or getattr(config, pattern):
                raise ValueError(
                    f"adapters in {source} have {key}={there!r} for module {name!r} ({pattern}="
                    f"{getattr(saved, pattern)!r}), the model's adapters have {key}={here!r} "
                    f"({pattern}={getattr(config, pattern)!r})"
                )
            raise ValueError(f"adapters in {source} have {key}={there!r}, the model's adapters have {key}={here!r}")


def copy_adapter_tensors(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    source: str | os.PathLike,
    base: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy ``tensors`` (loralib names: ``<module>.lora_A`` ...) into the model's adapters and saved modules.

    The key sets and shapes must match exactly (ValueError otherwise). ``base`` holds frozen parameters of the
    model by name (a PEFT folder's ``.base_layer.`` weights, e.g. a resized embedding, or a task head PEFT needs),
    copied in as well; every one must exist with that shape. Merged layers are unmerged first (with the adapter they
    were merged with), loaded, and merged again, so the model computes the loaded adapter. A loaded DoRA magnitude
    is the file's value from then on: it is not re-initialised when W0 changes later.
    """
    config = get_adapter_config(model)
    if config is None:
        raise ValueError("the model has no adapters; call loralib.apply_adapters first")
    live = adapter_tensors(model)
    if set(tensors) != set(live):
        raise ValueError(
            f"adapter tensors in {source} do not match the model: missing {sorted(set(live) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(live))}"
        )
    for key, value in tensors.items():
        if value.shape != live[key].shape:
            raise ValueError(
                f"{key} in {source}: saved shape {tuple(value.shape)} != model shape {tuple(live[key].shape)}"
            )
    base = dict(base or {})
    frozen = dict(model.named_parameters(remove_duplicate=False))
    for key, value in base.items():
        if key not in frozen or key in live:
            raise ValueError(f"{key} in {source} is no frozen parameter of this {type(model).__name__}")
        if value.shape != frozen[key].shape:
            raise ValueError(
                f"{key} in {source}: saved shape {tuple(value.shape)} != model shape {tuple(frozen[key].shape)}"
            )
    layers = adapter_layers(model)
    merged = [layer for _, layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    with torch.no_grad():
        for key, value in base.items():
            frozen[key].copy_(value)
        for key, value in tensors.items():
            live[key].copy_(value)
    for _, layer in layers:
        if not any(layer._parameters[name].is_meta for name in layer._undefined):
            layer._undefined = frozenset()  # every adapter value came from the file
        if layer.decomposed:
            layer._magnitude_init = None  # the file's magnitude: never re-initialised
        layer.refresh()
    for layer in merged:
        layer.merge()
