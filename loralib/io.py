"""Saving and loading adapters (safetensors + JSON). PEFT import / export: :mod:`loralib.peft_compat`.

:func:`load_adapters` reads both loralib's own folders and PEFT LoRA / DoRA folders (told apart by the
``"format"`` key of ``adapter_config.json``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import files
from .adapter_state import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_kind,
    adapter_tensors,
    check_same_adapters,
    copy_adapter_tensors,
    require_adapter_config,
)
from .config import AdapterConfig, matches_module_name
from .model import adapter_layers, apply_adapters, get_adapter_config
from .peft_compat import load_peft_adapter

FORMAT = "loralib-adapter"
FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (``<module>.lora_A``, ``.lora_B``, ``.magnitude``) and the ``modules_to_save`` parameters."""
    require_adapter_config(model)
    return {k: v.detach().cpu().contiguous() for k, v in adapter_tensors(model).items()}


def _live_tensors(model: nn.Module, config: AdapterConfig | None = None) -> dict[str, torch.Tensor]:
    """:func:`loralib.adapter_state.adapter_tensors` (the name ``loralib.bidora_trainer`` imports)."""
    return adapter_tensors(model)


def _metadata(model: nn.Module, config: AdapterConfig) -> dict:
    layers = adapter_layers(model)
    scalings = {name: layer.scaling for name, layer in layers}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config.to_dict(),
        # one number when every module shares it (older readers use it), else None: see module_scaling
        "scaling": next(iter(scalings.values())) if len(set(scalings.values())) == 1 else None,
        "module_scaling": scalings,
        "base_model_class": type(model).__name__,
        "adapted_modules": {name: list(layer.base_weight().shape) for name, layer in layers},
    }


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter (and task-head) weights and the config to ``directory``; returns the directory."""
    config = require_adapter_config(model)
    directory = Path(directory)
    tensors = adapter_state_dict(model)
    meta = _metadata(model, config)
    files.atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    files.atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(meta, indent=2))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The metadata written by :func:`save_adapters`, validated.

    Raises FileNotFoundError when there is no ``adapter_config.json``, ValueError when it is not valid JSON, not a
    loralib config (e.g. a PEFT one: use :func:`load_adapters`) or of another format version.
    """
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}; not a loralib adapter directory")
    meta = files.read_json(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a loralib adapter config (format={meta.get('format')!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')}, this loralib reads {FORMAT_VERSION}")
    missing = [key for key in ("config", "base_model_class", "adapted_modules") if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; it is not a complete loralib adapter config")
    if not isinstance(meta["config"], dict) or not isinstance(meta["adapted_modules"], dict):
        raise ValueError(f"{path}: 'config' and 'adapted_modules' must be JSON objects")
    return meta


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_adapters`, or a PEFT LoRA / DoRA folder, into ``model``; returns it.

    A model without adapters gets them applied from the saved config first (for PEFT, the converted config: see
    :func:`loralib.peft_compat.load_peft_adapter`). A model with adapters must have the same method, use_rslora,
    adapted modules, ranks and lora_alpha (per module); merged layers are unmerged, loaded and merged again.

    Raises:
        FileNotFoundError: no folder, no ``adapter_config.json`` or no ``adapter_model.safetensors``.
        ValueError: an unreadable file (invalid JSON, truncated safetensors), NaN / inf in a tensor, adapters made
            for another architecture or with other settings (naming the setting and both values), a PEFT option
            loralib cannot represent (naming it).
    """
    directory = Path(directory)
    kind, _ = adapter_kind(directory)
    if kind == "peft":
        return load_peft_adapter(model, directory)
    meta = read_adapter_config(directory)
    saved_config = AdapterConfig.from_dict(meta["config"])
    if meta["base_model_class"] != type(model).__name__:
        raise ValueError(
            f"adapters in {directory} were saved for a {meta['base_model_class']}, "
            f"this model is a {type(model).__name__}"
        )
    # read before applying anything: a bad file changes nothing
    tensors, _ = files.read_safetensors(directory / ADAPTER_WEIGHTS)
    if get_adapter_config(model) is None:
        apply_adapters(model, saved_config)
    check_same_adapters(model, saved_config, meta["adapted_modules"], directory)
    copy_adapter_tensors(model, tensors, directory / ADAPTER_WEIGHTS)
    return model


def save_target_weights(
    model: nn.Module, path: str | os.PathLike, target_modules: list[str] | str | None = None
) -> Path:
    """Save the current ``(out, in)`` weight of each adapted module (merged view) as float32 safetensors.

    For a model without adapters (full fine-tuning) pass ``target_modules`` to pick the modules by name.
    """
    tensors: dict[str, torch.Tensor] = {}
    layers = adapter_layers(model)
    if layers:
        for name, layer in layers:
            tensors[f"{name}.weight"] = layer.merged_weight().float().cpu().contiguous()
    else:
        if target_modules is None:
            raise ValueError("the model has no adapters: pass target_modules to choose which weights to save")
        for name, module in model.named_modules():
            if (
                name
                and matches_module_name(name, target_modules)
                and isinstance(getattr(module, "weight", None), torch.Tensor)
            ):
                weight = module.weight.detach()
                if type(module).__name__ == "Conv1D" or isinstance(module, nn.Embedding):
                    weight = weight.T
                tensors[f"{name}.weight"] = weight.float().cpu().contiguous()
        if not tensors:
            raise ValueError(f"no module with a weight matched target_modules={target_modules!r}")
    path = Path(path)
    files.atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return path


# Moved names: the old import paths keep working, with a DeprecationWarning.
_MOVED = {
    "atomic_write": "loralib.files",
    "atomic_write_text": "loralib.files",
    "read_json": "loralib.files",
    "read_safetensors": "loralib.files",
    "export_peft": "loralib.peft_compat",
}


def __getattr__(name: str):
    if name == "export_peft":
        from .peft_compat import export_peft as moved
    elif name in _MOVED:
        moved = getattr(files, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"loralib.io.{name} moved to {_MOVED[name]}.{name}; import it from there", DeprecationWarning, stacklevel=2
    )
    return moved
