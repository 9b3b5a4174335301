"""Saving and loading adapters (safetensors + JSON). PEFT import / export: :mod:`loralib.peft_compat`.

:func:`load_adapters` reads both loralib's own folders and PEFT LoRA / DoRA folders (told apart by the
``"format"`` key of ``adapter_config.json``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

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
    config = _require_config(model)
    directory = Path(directory)
    tensors = adapter_state_dict(model)
    meta = _metadata(model, config)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return directory


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``.

    Raises FileNotFoundError when the file is missing and ValueError (naming the file, the line and the column)
    when it is not UTF-8 JSON or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno} col {err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not valid adapter JSON (a {type(data).__name__}, not an object)")
    return data


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the safetensors file ``path``, tensors on the CPU.

    Raises FileNotFoundError when the file is missing, ValueError when it is not a readable safetensors file
    (truncated, corrupted) or when a floating-point tensor holds NaN or inf (naming the tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupted: {err})") from None
    for key, value in tensors.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {key!r} in {path} contains NaN or inf values; refusing to load it")
    return tensors, metadata


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


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The metadata written by :func:`save_adapters`, validated.

    Raises FileNotFoundError when there is no ``adapter_config.json``, ValueError when it is not valid JSON, not a
    loralib config (e.g. a PEFT one: use :func:`load_adapters`) or of another format version.
    """
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}; not a loralib adapter directory")
    meta = read_json(path)
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


def copy_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Copy ``tensors`` (loralib names: ``<module>.lora_A`` ...) into the model's adapters and saved modules.

    The key sets and shapes must match exactly (ValueError otherwise). Merged layers are unmerged first (with the
    adapter they were merged with), loaded, and merged again, so the model computes the loaded adapter.
    """
    config = get_adapter_config(model)
    if config is None:
        raise ValueError("the model has no adapters; call loralib.apply_adapters first")
    live = _live_tensors(model, config)
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
    merged = [layer for _, layer in adapter_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    with torch.no_grad():
        for key, value in tensors.items():
            live[key].copy_(value)
    for _, layer in adapter_layers(model):
        layer._norm_cache = None
    for layer in merged:
        layer.merge()


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
        from .peft_compat import load_peft_adapter

        return load_peft_adapter(model, directory)
    meta = read_adapter_config(directory)
    saved_config = AdapterConfig.from_dict(meta["config"])
    if meta["base_model_class"] != type(model).__name__:
        raise ValueError(
            f"adapters in {directory} were saved for a {meta['base_model_class']}, "
            f"this model is a {type(model).__name__}"
        )
    tensors, _ = read_safetensors(directory / ADAPTER_WEIGHTS)  # before applying anything: a bad file changes nothing
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
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return path


def __getattr__(name: str):
    # export_peft moved to loralib.peft_compat; `from loralib.io import export_peft` keeps working (imported lazily:
    # peft_compat imports this module).
    if name == "export_peft":
        from .peft_compat import export_peft

        return export_peft
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
