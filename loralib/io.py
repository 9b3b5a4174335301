"""Saving and loading adapters. The format is PEFT's (:mod:`loralib.peft_compat`); a model card comes with it.

:func:`save_adapters` writes ``adapter_config.json`` (PEFT's ``LoraConfig``), ``adapter_model.safetensors``
(PEFT's tensor names; the loralib settings PEFT cannot hold in the header metadata) and ``README.md``.
:func:`load_adapters` reads those folders, PEFT's own, and the folders of loralib's first format (version 1: its own
JSON schema with a ``"format": "loralib-adapter"`` key, written by earlier loralib commits).
"""

from __future__ import annotations

import json
import math
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
from .peft_compat import (
    CLASS_METADATA_KEY,
    CONFIG_METADATA_KEY,
    FORMAT_VERSION,
    MODULES_METADATA_KEY,
    PREFIX,
    load_peft_adapter,
    read_adapter_weights,
    read_folder_metadata,
    write_adapter_folder,
)

FORMAT = "loralib-adapter"
#: The version of loralib's first format (its own JSON schema), which :func:`load_adapters` still reads.
LEGACY_FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (``<module>.lora_A``, ``.lora_B``, ``.magnitude``) and the ``modules_to_save`` parameters."""
    require_adapter_config(model)
    for _, layer in adapter_layers(model):
        layer._require_defined("save the adapters")
    return {k: v.detach().cpu().contiguous() for k, v in adapter_tensors(model).items()}


def _live_tensors(model: nn.Module, config: AdapterConfig | None = None) -> dict[str, torch.Tensor]:
    """:func:`loralib.adapter_state.adapter_tensors` (the name ``loralib.bidora_trainer`` imports)."""
    return adapter_tensors(model)


def save_adapters(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    training_data: str | list[str] | None = None,
    metrics: dict | None = None,
    model_card: bool | str = True,
) -> Path:
    """Write the adapter folder in PEFT's format, with a model card; returns the directory.

    Files: ``adapter_config.json`` (PEFT's ``LoraConfig`` keys only), ``adapter_model.safetensors`` (PEFT's tensor
    names; the adapter and the ``modules_to_save`` weights, plus a classification head PEFT's task classes need) and
    ``README.md``. ``PeftModel.from_pretrained`` / ``AutoPeftModelFor<Task>.from_pretrained`` load the folder without
    warnings and with this model's outputs (PEFT computes DoRA's norm densely: fp32 outputs agree to about 1e-6);
    :func:`load_adapters` reloads it bitwise, BiDoRA and every other loralib setting included (they are in the
    safetensors metadata: :data:`loralib.peft_compat.METADATA_KEYS`).

    The card records the method, the base model (``model.config._name_or_path``), rank, alpha, targets, and
    ``training_data`` (a sentence or a list) and ``metrics`` (``{name: value}``, may nest) when given. A README.md
    that loralib did not write is kept (a warning says so, no card is written) unless ``model_card="overwrite"``;
    ``model_card=False`` writes no card. See :func:`loralib.peft_compat.write_adapter_folder`.
    """
    return write_adapter_folder(
        model, directory, training_data=training_data, metrics=metrics, model_card=model_card
    )


def _scalings(config: AdapterConfig, modules: list[str]) -> dict[str, float]:
    """``{module: lora_alpha / r}`` (``/ sqrt(r)`` with rsLoRA), as the layers compute it."""
    scaling = {}
    for name in modules:
        r = config.rank_for(name)
        scaling[name] = float(config.alpha_for(name)) / (math.sqrt(r) if config.use_rslora else r)
    return scaling


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """What a loralib adapter folder says about its adapter, validated, the same for both of loralib's formats.

    Returns ``{"format": "loralib-adapter", "version": 1 | 2, "config": AdapterConfig.to_dict(), "scaling": float
    | None (None when modules differ), "module_scaling": {module: float}, "base_model_class": str,
    "adapted_modules": {module: [out, in]}}``; for a version-2 folder (PEFT's format) also ``"peft_config"``, the
    content of ``adapter_config.json``. Reads no tensors.

    Raises FileNotFoundError when there is no ``adapter_config.json``, ValueError when it is not valid JSON, a PEFT
    folder not written by loralib (load it with :func:`load_adapters`), or of another format version.
    """
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    kind, meta = adapter_kind(directory)
    if kind == "peft":
        metadata = read_folder_metadata(directory)
        if CONFIG_METADATA_KEY not in metadata:
            raise ValueError(
                f"{directory} is a PEFT adapter folder not written by loralib (no {CONFIG_METADATA_KEY} in the "
                f"metadata of its weights); load it with loralib.load_adapters"
            )
        try:
            config = json.loads(metadata[CONFIG_METADATA_KEY])
            adapted = json.loads(metadata.get(MODULES_METADATA_KEY, "null"))
            version = int(metadata.get("loralib_format_version", FORMAT_VERSION))
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"the loralib metadata of {directory / ADAPTER_WEIGHTS} is damaged ({err})") from None
        if not isinstance(config, dict) or not isinstance(adapted, dict) or CLASS_METADATA_KEY not in metadata:
            raise ValueError(
                f"the loralib metadata of {directory / ADAPTER_WEIGHTS} is incomplete; save the adapter again"
            )
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{directory / ADAPTER_WEIGHTS} has loralib format version {version}, this loralib reads "
                f"{LEGACY_FORMAT_VERSION} and {FORMAT_VERSION}; upgrade loralib"
            )
        scaling = _scalings(AdapterConfig.from_dict(config), list(adapted))
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": config,
            "scaling": next(iter(scaling.values())) if len(set(scaling.values())) == 1 else None,
            "module_scaling": scaling,
            "base_model_class": metadata[CLASS_METADATA_KEY],
            "adapted_modules": adapted,
            "peft_config": meta,
        }
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a loralib adapter config (format={meta.get('format')!r})")
    if meta.get("version") != LEGACY_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {meta.get('version')}, this loralib reads {LEGACY_FORMAT_VERSION} (in "
            f"{ADAPTER_CONFIG}) and {FORMAT_VERSION} (PEFT's format); upgrade loralib"
        )
    missing = [key for key in ("config", "base_model_class", "adapted_modules") if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; it is not a complete loralib adapter config")
    if not isinstance(meta["config"], dict) or not isinstance(meta["adapted_modules"], dict):
        raise ValueError(f"{path}: 'config' and 'adapted_modules' must be JSON objects")
    return meta


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors of a loralib folder (either format) under loralib's names, without a model:
    ``<module>.lora_A`` ``(r, in)``, ``.lora_B`` ``(out, r)``, ``.magnitude`` and the ``modules_to_save``
    parameters (the frozen task head written for PEFT is left out). For analysis (``utils/weight_decomposition.py``).
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    if meta["version"] == LEGACY_FORMAT_VERSION:
        return files.read_safetensors(directory / ADAPTER_WEIGHTS)[0]
    config = AdapterConfig.from_dict(meta["config"])
    tensors, _, _ = read_adapter_weights(directory)
    names = {
        ".lora_A.weight": ".lora_A",
        ".lora_B.weight": ".lora_B",
        ".lora_embedding_A": ".lora_A",
        ".lora_embedding_B": ".lora_B",
        ".lora_magnitude_vector": ".magnitude",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        rest = key.removeprefix(PREFIX)
        for suffix, ours in names.items():
            if rest.endswith(suffix) and rest[: -len(suffix)] in meta["adapted_modules"]:
                out[rest[: -len(suffix)] + ours] = value
                break
        else:
            module = rest.rpartition(".")[0]
            parts = module.split(".")
            if any(matches_module_name(".".join(parts[:i]), config.modules_to_save) for i in range(1, len(parts) + 1)):
                out[rest] = value
    return out


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter folder into ``model``; returns it.

    Reads the folders :func:`save_adapters` writes (bitwise, every loralib setting included), PEFT's own LoRA / DoRA
    folders (the outputs of ``PeftModel.from_pretrained``; see :func:`loralib.peft_compat.load_peft_adapter` for the
    layouts) and loralib's version-1 folders. A model without adapters gets them applied from the saved config first.
    A model with adapters must have the same method, use_rslora, adapted modules, ranks and lora_alpha (per module);
    merged layers are unmerged, loaded and merged again.

    Raises:
        FileNotFoundError: no folder, no ``adapter_config.json`` or no weights file.
        ValueError: an unreadable file (invalid JSON, truncated safetensors), NaN / inf in a tensor, adapters made
            for another architecture or with other settings (naming the setting and both values), a PEFT option
            loralib cannot represent (naming it), a layout loralib does not read (saying what to do).
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
            f"this model is a {type(model).__name__}; load them into a {meta['base_model_class']}"
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
