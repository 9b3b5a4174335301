"""PEFT interoperability: read PEFT LoRA / DoRA configs and folders, write loralib adapters in PEFT's format.

* :func:`adapter_config_from_peft` (also ``AdapterConfig.from_peft``; defined in :mod:`loralib.config`, with the
  option tables): a PEFT ``LoraConfig`` or its dict -> an :class:`~loralib.AdapterConfig`. Every ``LoraConfig``
  field of PEFT 0.21 is either mapped, ignored because it does not change the adapter (listed in
  :data:`IGNORED_OPTIONS`), or refused by name when it has a non-default value loralib cannot represent
  (:data:`REFUSED_OPTIONS`). Nothing is dropped silently.
* :func:`load_peft_adapter`: a folder written by PEFT's ``save_pretrained`` -> loralib adapters on a model, with
  the same outputs. :func:`loralib.load_adapters` recognises PEFT folders and calls it.
* :func:`export_peft`: loralib adapters -> a folder ``PeftModel.from_pretrained`` loads with the same outputs.

Only ``export_peft``'s round-trip tests need ``peft`` installed; reading and writing the on-disk format does not.

PEFT's on-disk layout (0.21, one adapter): ``adapter_config.json`` (``LoraConfig.to_dict()``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
``.lora_B.weight`` ``(out, r)`` for Linear and Conv1D (the same orientation as loralib, Conv1D included),
``.lora_embedding_A`` ``(r, num_embeddings)`` and ``.lora_embedding_B`` ``(embedding_dim, r)`` for Embedding,
``.lora_magnitude_vector`` ``(out,)`` for DoRA (``embedding_dim`` for Embedding), and the ``modules_to_save``
parameters under their plain names (``base_model.model.classifier.dense.weight``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapter_state import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_kind,
    check_same_adapters,
    copy_adapter_tensors,
    require_adapter_config,
)
from .config import (  # the PEFT option tables live with AdapterConfig; re-exported here
    ALL_LINEAR,
    IGNORED_OPTIONS,
    METHODS,
    REFUSED_OPTIONS,
    adapter_config_from_peft,
)
from .files import atomic_write, atomic_write_text, read_safetensors
from .layers import LoRAEmbedding
from .model import adapter_layers, apply_adapters, get_adapter_config, saved_module_parameters, target_module_names

__all__ = ["IGNORED_OPTIONS", "REFUSED_OPTIONS", "adapter_config_from_peft", "export_peft", "load_peft_adapter"]

PREFIX = "base_model.model."
#: safetensors metadata key recording the loralib method (PEFT has no BiDoRA; its config would warn on a new key).
METHOD_METADATA_KEY = "loralib_method"

# ---- import -------------------------------------------------------------------------------------------------------
_SUFFIXES = {  # key suffix -> (role, is the Embedding layout)
    ".lora_A.weight": ("lora_A", False),
    ".lora_B.weight": ("lora_B", False),
    ".lora_embedding_A": ("lora_A", True),
    ".lora_embedding_B": ("lora_B", True),
    ".lora_magnitude_vector": ("magnitude", None),
}


def _split_peft_keys(
    tensors: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, bool], dict[str, torch.Tensor]]:
    """``({module: {role: tensor}}, {module: uses the Embedding layout}, {saved-module parameter: tensor})``."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"key {key!r} in {path} does not start with {PREFIX!r}; not a PEFT LoRA adapter file")
        rest = key[len(PREFIX) :]
        for suffix, (role, is_embedding) in _SUFFIXES.items():
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                adapters.setdefault(module, {})[role] = value
                if is_embedding is not None and embedding.setdefault(module, is_embedding) != is_embedding:
                    raise ValueError(f"module {module!r} in {path} has both Linear and Embedding LoRA keys")
                break
        else:
            parts = rest.split(".")
            if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts or "original_module" in parts:
                raise ValueError(
                    f"key {key!r} in {path} is not in the layout PEFT writes for one LoRA adapter (an adapter name "
                    "left in the key, i.e. several adapters in one file, or a LoRA variant loralib does not support)"
                )
            saved[rest] = value
    for module, parts in adapters.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise ValueError(f"module {module!r} in {path} lacks its lora_A or lora_B tensor")
    return adapters, embedding, saved


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike, *, detach_norm: bool = False) -> nn.Module:
    """Load a PEFT LoRA / DoRA folder (PEFT 0.21 ``save_pretrained``) into ``model`` as loralib adapters.

    ``loralib.load_adapters(model, directory)`` does the same (it recognises PEFT folders) with
    ``detach_norm=False``; call this one for ``detach_norm=True`` or to insist on a PEFT folder.

    A model without adapters gets them applied from the converted config (:func:`adapter_config_from_peft`). The
    modules adapted are the ones in the file: when loralib's resolution of ``target_modules`` would pick others
    (PEFT leaves out targets inside ``modules_to_save`` silently, and ``"all-linear"`` differs for task heads), the
    config records the file's module names instead. A model with adapters must match them (method, use_rslora,
    modules, per-module rank and alpha); merged layers are unmerged, loaded and merged again. A folder written by
    :func:`export_peft` from a BiDoRA model comes back as BiDoRA (recorded in the safetensors metadata).

    Outputs equal ``PeftModel.from_pretrained(base, directory)``'s. Training differs only for DoRA, where PEFT
    detaches the norm in backward: imported DoRA trains with loralib's exact gradients unless ``detach_norm=True``.

    Args:
        model: the base model (or one with matching loralib adapters), modified in place and returned.
        directory: the folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        detach_norm: treat DoRA's row norm as a constant in backward, as PEFT does (only for a model without
            adapters; an adapted model keeps its setting).

    Raises:
        FileNotFoundError: no folder, no config or no ``adapter_model.safetensors``.
        ValueError: a loralib folder, PEFT's several-adapters layout, an unreadable file, NaN / inf in a tensor, a
            PEFT option loralib cannot represent, keys PEFT does not write for one LoRA adapter (e.g. adapter names),
            modules the model lacks, or adapters that differ from the model's (each names what is wrong).
    """
    directory = Path(directory)
    kind, meta = adapter_kind(directory)
    if kind != "peft":
        raise ValueError(f"{directory} holds a loralib adapter, not a PEFT one; use loralib.load_adapters")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise ValueError(
            f"{directory} holds adapter_model.bin (a pickle); loralib reads only adapter_model.safetensors: "
            "save the adapter with PEFT's save_pretrained(..., safe_serialization=True)"
        )
    config = adapter_config_from_peft(meta, detach_norm=detach_norm)
    tensors, metadata = read_safetensors(weights)
    method = metadata.get(METHOD_METADATA_KEY)
    if method is not None:
        if method not in METHODS or (method == "lora") != (config.method == "lora"):
            raise ValueError(
                f"{weights} records {METHOD_METADATA_KEY}={method!r}, which contradicts use_dora="
                f"{config.method != 'lora'} in {ADAPTER_CONFIG}"
            )
        config = dataclasses.replace(config, method=method)
    adapters, embedding, saved = _split_peft_keys(tensors, weights)
    for module, parts in adapters.items():
        if ("magnitude" in parts) != (config.method != "lora"):
            raise ValueError(
                f"module {module!r} in {weights} {'has' if 'magnitude' in parts else 'lacks'} a DoRA magnitude "
                f"vector, but {ADAPTER_CONFIG} says use_dora={config.method != 'lora'}"
            )

    modules = dict(model.named_modules())
    unknown = sorted(set(adapters) - set(modules))
    if unknown:
        raise ValueError(
            f"the PEFT adapter in {directory} adapts modules this {type(model).__name__} does not have: {unknown[:5]}"
        )
    if get_adapter_config(model) is None:
        if set(target_module_names(model, config)) != set(adapters):
            in_model_order = [name for name in modules if name in adapters]
            config = dataclasses.replace(config, target_modules=in_model_order)
        apply_adapters(model, config)
    shapes = {module: [parts["lora_B"].shape[0], parts["lora_A"].shape[-1]] for module, parts in adapters.items()}
    check_same_adapters(model, config, shapes, directory)

    loaded: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        if embedding[name] != isinstance(layer, LoRAEmbedding):
            kind_there = "Embedding (lora_embedding_A/B)" if embedding[name] else "Linear (lora_A/B.weight)"
            raise ValueError(f"module {name!r} is a {type(layer).__name__} here but a {kind_there} in {weights}")
        for role, value in adapters[name].items():
            loaded[f"{name}.{role}"] = value
    loaded.update(saved)
    copy_adapter_tensors(model, loaded, weights)
    return model


# ---- export -------------------------------------------------------------------------------------------------------
_TASK_MAPPINGS = (  # transformers auto-class mapping -> PEFT task_type, most specific first
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
)


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class, from transformers' auto-class mappings.

    ``*ForSequenceClassification`` -> ``"SEQ_CLS"``, token classification -> ``"TOKEN_CLS"``, question answering
    -> ``"QUESTION_ANS"``, seq2seq LM -> ``"SEQ_2_SEQ_LM"``, causal LM (``GPT2LMHeadModel``) -> ``"CAUSAL_LM"``,
    a base model (``RobertaModel``) -> ``"FEATURE_EXTRACTION"``; None for anything else (masked LM, plain modules),
    which ``PeftModel.from_pretrained`` loads as a generic PEFT model.
    """
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    name = type(model).__name__
    for mapping_name, task in _TASK_MAPPINGS:
        for value in getattr(modeling_auto, mapping_name, {}).values():
            if name == value or (isinstance(value, (tuple, list)) and name in value):
                return task
    return None


# PEFT's task classes make these heads saved modules (``key.endswith(name)``) and expect their weights in the file.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT 0.21's LoRA format; returns the folder.

    ``PeftModel.from_pretrained(base, directory)`` (or ``AutoPeftModelFor<Task>.from_pretrained(directory)`` when
    ``model.config._name_or_path`` names a saved base model) then reproduces this model's outputs. DoRA and BiDoRA
    both export as PEFT DoRA (``use_dora=True``); PEFT has no BiDoRA, so the loralib method is recorded in the
    safetensors metadata (``"loralib_method"``), which PEFT ignores and :func:`load_peft_adapter` reads back.
    Written: ``task_type`` (:func:`peft_task_type`), ``rank_pattern`` / ``alpha_pattern``, ``modules_to_save``,
    and for ``target_modules="all-linear"`` the explicit module names (PEFT resolves ``all-linear`` differently for
    task heads). ``detach_norm`` has no PEFT equivalent (PEFT always detaches the norm).

    PEFT's classification / QA classes always treat the task head (``classifier`` / ``score`` / ``qa_outputs``) as
    a saved module and fail without its weights: for those task types the head's (possibly untrained) weights are
    written and its name added to ``modules_to_save``, so importing the folder back makes the head trainable. When
    the head itself carries adapters (``all-linear`` without ``modules_to_save``), ``task_type`` is left unset, as
    PEFT's task classes would drop them; ``PeftModel.from_pretrained`` loads such a folder exactly.

    Raises:
        ValueError: the model has no adapters, or they are merged (PEFT expects the pristine base weights).
    """
    config = require_adapter_config(model)
    layers = adapter_layers(model)
    if any(layer.merged for _, layer in layers):
        raise ValueError("unmerge the adapters before exporting to PEFT (PEFT expects the pristine base weights)")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        embedding = isinstance(layer, LoRAEmbedding)
        tensors[f"{PREFIX}{name}.{'lora_embedding_A' if embedding else 'lora_A.weight'}"] = layer.lora_A
        tensors[f"{PREFIX}{name}.{'lora_embedding_B' if embedding else 'lora_B.weight'}"] = layer.lora_B
        if layer.decomposed:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.magnitude
    for key, value in saved_module_parameters(model).items():
        tensors[PREFIX + key] = value
    task_type, modules_to_save = peft_task_type(model), list(config.modules_to_save)
    heads = _TASK_HEADS.get(task_type, ())
    wrapped = [name for name, _ in model.named_modules() if heads and name.endswith(heads)]
    if any(n == w or n.startswith(w + ".") for n, _ in layers for w in wrapped):
        task_type = None  # PEFT's task class would turn the adapted head into a saved module, dropping its adapter
    else:
        for head in wrapped:
            for pname, param in model.get_submodule(head).named_parameters():
                tensors.setdefault(f"{PREFIX}{head}.{pname}", param)
        modules_to_save += [h for h in heads if h not in modules_to_save and any(w.endswith(h) for w in wrapped)]
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    targets = config.target_modules
    if targets == ALL_LINEAR:
        targets = [name for name, _ in layers]
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": _number(config.lora_alpha),
        "lora_dropout": config.lora_dropout,
        "target_modules": targets,
        "modules_to_save": modules_to_save or None,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": {key: _number(value) for key, value in config.alpha_pattern.items()},
        "use_dora": config.method != "lora",
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": any(isinstance(layer, Conv1D) for _, layer in layers),
        "bias": "none",
        "init_lora_weights": True if config.init_lora_weights == "kaiming" else config.init_lora_weights,
        "inference_mode": True,
    }
    metadata = {"format": "pt", METHOD_METADATA_KEY: config.method}
    directory = Path(directory)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(peft_config, indent=2) + "\n")
    return directory
