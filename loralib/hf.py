"""Adapted models as ordinary transformers models: ``save_pretrained`` and loading it back with the adapters.

``model.save_pretrained(dir)`` on an adapted model writes the whole state dict (frozen base, adapters, task head and
each layer's merge state) plus ``config.json``, in which :func:`loralib.apply_adapters` recorded the adapter config
under :data:`CONFIG_KEY`. :func:`from_pretrained` reads both and rebuilds the adapted model (merged or not).

A plain ``AutoModel...from_pretrained(dir)`` loads the weights it knows and drops the adapters; transformers then
lists the ``lora_A`` / ``lora_B`` / ``magnitude`` keys as UNEXPECTED in its load report (a logged warning). For a
merged model that plain load is the merged model itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import AdapterConfig
from .files import read_json
from .model import CONFIG_KEY, adapter_layers, apply_adapters

_ADAPTER_KEY = re.compile(r".*\.(lora_A|lora_B|magnitude|_extra_state)$")
_IGNORE_ON_LOAD = [r"\.lora_A$", r"\.lora_B$", r"\.magnitude$", r"\._extra_state$"]


@contextlib.contextmanager
def _adapter_keys_expected(model_class: type):
    """Inside, ``model_class.from_pretrained`` does not report the adapter keys as unexpected (they load next)."""
    had = "_keys_to_ignore_on_load_unexpected" in model_class.__dict__
    before = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected")
    model_class._keys_to_ignore_on_load_unexpected = list(before or []) + _IGNORE_ON_LOAD
    try:
        yield
    finally:
        if had:
            model_class._keys_to_ignore_on_load_unexpected = before
        else:
            del model_class._keys_to_ignore_on_load_unexpected


def _weight_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index ({err})") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"no model.safetensors (or model.safetensors.index.json) in {directory}; "
        "save the model with save_pretrained(safe_serialization=True)"
    )


def _adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of the saved model, read alone (``from_pretrained`` has already read the base)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensors.update({k: handle.get_tensor(k) for k in handle.keys() if _ADAPTER_KEY.fullmatch(k)})
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted: {err})") from None
    return tensors


def from_pretrained(model_class: type, pretrained_model_name_or_path: str | os.PathLike, base=None,
                    **kwargs) -> nn.Module:
    """Load a model written by ``save_pretrained`` of an adapted model, adapters (and merge state) included.

    ``model_class`` is the transformers class (``AutoModelForSequenceClassification`` works); ``kwargs`` go to its
    ``from_pretrained`` (``dtype=torch.bfloat16`` gives a bf16 base with fp32 adapters, as
    :func:`loralib.apply_adapters` would). Trainable flags are those of :func:`loralib.apply_adapters`.

    A :class:`loralib.BiDoRATrainer` checkpoint folder holds the trained tensors only (no pretrained base): it is
    loaded by :func:`loralib.load_checkpoint` on top of ``base`` (default: the base its ``loralib_run.json``
    records, checked against the recorded fingerprint). A folder whose weights leave some of the model's
    parameters out is never returned with them randomly initialised: it is refused, naming ``load_checkpoint``.

    Raises:
        ValueError: ``config.json`` records no adapters, the weights lack some adapter tensors or some pretrained
            weights (a checkpoint without a recorded base), or the base does not match the recorded one.
        FileNotFoundError: no safetensors weights in the folder.
    """
    directory = Path(pretrained_model_name_or_path)
    if base is not None or _trainable_only(directory):
        from .checkpoints import load_checkpoint

        return load_checkpoint(directory, base=base, model_class=model_class, **kwargs)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}; not a folder written by save_pretrained")
    data = read_json(config_path)
    if CONFIG_KEY not in data:
        raise ValueError(
            f"{config_path} records no loralib adapters (no {CONFIG_KEY!r}); load it with "
            f"{getattr(model_class, '__name__', model_class)}.from_pretrained"
        )
    adapter_config = AdapterConfig.from_dict(data[CONFIG_KEY])
    with contextlib.ExitStack() as stack:
        for cls in {model_class, *_concrete_classes(model_class, directory)}:
            stack.enter_context(_adapter_keys_expected(cls))
        model = model_class.from_pretrained(directory, **kwargs)
    uncovered = _uncovered_parameters(model, _saved_keys(directory))
    if uncovered:
        raise ValueError(
            f"{directory} holds no weights for {len(uncovered)} of the model's parameters (e.g. {uncovered[0]}): "
            "loaded alone they would be randomly initialised. A BiDoRATrainer checkpoint holds the trained tensors "
            "only: load it with loralib.load_checkpoint(folder, base=<the pretrained model the run started from>)"
        )
    apply_adapters(model, adapter_config)
    tensors = _adapter_tensors(directory)
    expected = {k for k in model.state_dict() if _ADAPTER_KEY.fullmatch(k)}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{directory} lacks adapter tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{directory} has adapter tensors this model does not: {unexpected[:5]}")
    model.load_state_dict(tensors, strict=False)
    for _, layer in adapter_layers(model):
        layer._norm_cache = None
    return model


def _saved_keys(directory: Path) -> set[str]:
    keys: set[str] = set()
    for path in _weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys.update(handle.keys())
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted: {err})") from None
    return keys


def _uncovered_parameters(model: nn.Module, saved: set[str]) -> list[str]:
    """Parameters of ``model`` (as loaded, before the adapters) that no saved key provides, under any of their tied
    names or with / without the base-model prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def present(name: str) -> bool:
        return (name in saved or f"{prefix}.{name}" in saved
                or (bool(prefix) and name.startswith(prefix + ".") and name[len(prefix) + 1:] in saved))

    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return sorted(group[0] for group in names.values() if not any(present(n) for n in group))


def _trainable_only(directory: Path) -> bool:
    """A folder that a BiDoRATrainer checkpoint wrote: its run record says so and its weights lack the base."""
    from .checkpoints import RUN_RECORD

    path = directory / RUN_RECORD
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        frozen = set(record["base"]["fingerprint"]["tensors"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if record.get("checkpoint_weights") != "trainable state only" or not frozen:
        return False
    try:
        return not (frozen & _saved_keys(directory))
    except (ValueError, FileNotFoundError):
        return False


def _concrete_classes(model_class: type, directory: Path) -> list[type]:
    """For an ``AutoModel...`` class, the concrete class it will build (whose attributes the loader reads)."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return []
    from transformers import AutoConfig

    try:
        return [mapping[type(AutoConfig.from_pretrained(directory))]]
    except (KeyError, ValueError):
        return []
