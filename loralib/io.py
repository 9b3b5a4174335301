"""Saving and loading adapters (safetensors + JSON), and export to PEFT's on-disk format."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import LoRAEmbedding
from .model import (
    AdapterConfig,
    adapter_layers,
    apply_adapters,
    get_adapter_config,
    matches_module_name,
    saved_module_parameters,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "loralib-adapter"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` for a temporary file in the same folder, then rename it to ``path``: a crash never
    leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, newlines untouched) to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.encode("utf-8")))


def _require_config(model: nn.Module) -> AdapterConfig:
    config = get_adapter_config(model)
    if config is None:
        raise ValueError("the model has no adapters; call loralib.apply_adapters first")
    return config


def _live_tensors(model: nn.Module, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The adapter parameters themselves, by saved name (not copies)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        tensors[f"{name}.lora_A"] = layer.lora_A
        tensors[f"{name}.lora_B"] = layer.lora_B
        if layer.decomposed:
            tensors[f"{name}.magnitude"] = layer.magnitude
    tensors.update(saved_module_parameters(model))
    return tensors


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (``<module>.lora_A``, ``.lora_B``, ``.magnitude``) and the ``modules_to_save`` parameters."""
    config = _require_config(model)
    return {k: v.detach().cpu().contiguous() for k, v in _live_tensors(model, config).items()}


def _metadata(model: nn.Module, config: AdapterConfig) -> dict:
    layers = adapter_layers(model)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config.to_dict(),
        "scaling": layers[0][1].scaling,
        "base_model_class": type(model).__name__,
        "adapted_modules": {name: list(layer.base_weight().shape) for name, layer in layers},
    }


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter (and task-head) weights and the config to ``directory``; returns the directory."""
    config = _require_config(model)
    directory = Path(directory)
    tensors = adapter_state_dict(model)
    meta = _metadata(model, config)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The metadata written by :func:`save_adapters`, validated."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}; not a loralib adapter directory")
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a loralib adapter config (format={meta.get('format')!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')}, this loralib reads {FORMAT_VERSION}")
    return meta


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model``.

    A model without adapters gets them applied from the saved config first. Raises if the saved adapters were made
    for another architecture, method, rank or set of modules.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    saved_config = AdapterConfig.from_dict(meta["config"])
    if meta["base_model_class"] != type(model).__name__:
        raise ValueError(
            f"adapters in {directory} were saved for a {meta['base_model_class']}, "
            f"this model is a {type(model).__name__}"
        )
    config = get_adapter_config(model)
    if config is None:
        apply_adapters(model, saved_config)
        config = saved_config
    for key in ("method", "r"):
        if getattr(config, key) != getattr(saved_config, key):
            raise ValueError(
                f"adapters in {directory} have {key}={getattr(saved_config, key)!r}, "
                f"the model's adapters have {key}={getattr(config, key)!r}"
            )
    expected = _metadata(model, config)["adapted_modules"]
    if expected != meta["adapted_modules"]:
        missing = sorted(set(meta["adapted_modules"]) - set(expected))
        extra = sorted(set(expected) - set(meta["adapted_modules"]))
        shapes = sorted(
            k for k in set(expected) & set(meta["adapted_modules"]) if expected[k] != meta["adapted_modules"][k]
        )
        raise ValueError(
            f"adapters in {directory} do not fit this model: saved-only modules {missing}, model-only modules {extra}, "
            f"shape mismatches {shapes}"
        )
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    live = _live_tensors(model, config)
    if set(tensors) != set(live):
        raise ValueError(
            f"adapter tensors do not match: missing {sorted(set(live) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(live))}"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            if value.shape != live[key].shape:
                raise ValueError(f"{key}: saved shape {tuple(value.shape)} != model shape {tuple(live[key].shape)}")
            live[key].copy_(value)
    for _, layer in adapter_layers(model):
        layer._norm_cache = None
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
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return path


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's LoRA format.

    DoRA and BiDoRA both export as PEFT DoRA (``use_dora=True``); ``PeftModel.from_pretrained`` on the same base
    model then reproduces this model's outputs.
    """
    config = _require_config(model)
    layers = adapter_layers(model)
    if any(layer.merged for _, layer in layers):
        raise ValueError("unmerge the adapters before exporting to PEFT (PEFT expects the pristine base weights)")
    tensors: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    for name, layer in layers:
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if isinstance(layer, LoRAEmbedding)
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{prefix}{name}.{a_key}"] = layer.lora_A
        tensors[f"{prefix}{name}.{b_key}"] = layer.lora_B
        if layer.decomposed:
            tensors[f"{prefix}{name}.lora_magnitude_vector"] = layer.magnitude
    for key, value in saved_module_parameters(model).items():
        tensors[prefix + key] = value
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save or None,
        "use_dora": config.method != "lora",
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": any(type(layer).__name__.endswith("Conv1D") for _, layer in layers),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    atomic_write(directory / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write(
        directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2))
    )
    return directory
