"""PEFT's adapter folder, loralib's one format: read PEFT LoRA / DoRA folders, write loralib adapters as PEFT folders.

* :func:`adapter_config_from_peft` (also ``AdapterConfig.from_peft``; defined in :mod:`loralib.config`, with the
  option tables): a PEFT ``LoraConfig`` or its dict -> an :class:`~loralib.AdapterConfig`. Every ``LoraConfig``
  field of PEFT 0.21 is either mapped, ignored because it does not change the adapter (listed in
  :data:`IGNORED_OPTIONS`), or refused by name when it has a non-default value loralib cannot represent
  (:data:`REFUSED_OPTIONS`). Nothing is dropped silently.
* :func:`write_adapter_folder` (``loralib.save_adapters``, ``export_peft``): loralib adapters -> a folder that
  ``PeftModel.from_pretrained`` / ``AutoPeftModelFor<Task>.from_pretrained`` load with the same outputs, and that
  :func:`load_peft_adapter` reloads bitwise, with the loralib settings PEFT cannot hold.
* :func:`load_peft_adapter`: a PEFT folder (PEFT's own saves included) -> loralib adapters on a model, with the
  outputs of ``PeftModel.from_pretrained``. :func:`loralib.load_adapters` recognises PEFT folders and calls it.

The folder (:data:`FOLDER_FILES`): ``adapter_config.json`` (PEFT's ``LoraConfig`` keys only: an extra key makes PEFT
warn), ``adapter_model.safetensors`` and ``README.md`` (:mod:`loralib.model_card`). The safetensors keys are PEFT
0.21's: ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``.lora_B.weight`` ``(out, r)`` for Linear and
Conv1D (loralib's orientation, Conv1D included), ``.lora_embedding_A`` ``(r, num_embeddings)`` and
``.lora_embedding_B`` ``(embedding_dim, r)`` for Embedding, ``.lora_magnitude_vector`` ``(out,)`` for DoRA, and the
``modules_to_save`` parameters under their plain names (``base_model.model.classifier.dense.weight``). The header
metadata (``__metadata__``, strings) holds ``"format": "pt"`` and what PEFT's config cannot: :data:`METADATA_KEYS`.

PEFT layouts read besides the 0.21 save: ``modules_to_save: null`` with the task head's keys in the file (older PEFT
releases), ``.base_layer.`` keys (the base weight of an adapted module, e.g. a resized ``embed_tokens``),
``adapter_model.bin`` (read with ``torch.load(weights_only=True)``), one adapter's subfolder of a several-adapter
save, magnitude keys ``lora_magnitude_vector`` with or without ``.weight``, and every task type. Frozen weights in
the file that no adapter owns (a task head PEFT wrote, a resized embedding) are copied into the model, as PEFT does.

Only the tests need ``peft`` installed; reading and writing the format does not.
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
    AdapterConfig,
    adapter_config_from_peft,
    matches_module_name,
)
from .files import atomic_write, atomic_write_text, read_safetensors
from .layers import LoRAEmbedding
from .model import adapter_layers, apply_adapters, get_adapter_config, saved_module_parameters, target_module_names
from .model_card import MODEL_CARD, model_card_text, write_model_card

__all__ = [
    "FOLDER_FILES",
    "IGNORED_OPTIONS",
    "METADATA_KEYS",
    "REFUSED_OPTIONS",
    "adapter_config_from_peft",
    "export_peft",
    "load_peft_adapter",
    "read_folder_metadata",
    "write_adapter_folder",
]

PREFIX = "base_model.model."
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
FOLDER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD)
FORMAT_VERSION = 2  # loralib's first format (version 1) was its own JSON schema; loralib.io still reads it
#: safetensors metadata key recording the loralib method (PEFT has no BiDoRA; its config would warn on a new key).
METHOD_METADATA_KEY = "loralib_method"
CONFIG_METADATA_KEY = "loralib_config"
CLASS_METADATA_KEY = "loralib_base_model_class"
MODULES_METADATA_KEY = "loralib_adapted_modules"
VERSION_METADATA_KEY = "loralib_format_version"
#: The loralib keys of the safetensors header, all strings: the method, the whole ``AdapterConfig`` (JSON), the
#: model class, ``{module: [out, in]}`` (JSON) and the format version.
METADATA_KEYS = (
    METHOD_METADATA_KEY,
    CONFIG_METADATA_KEY,
    CLASS_METADATA_KEY,
    MODULES_METADATA_KEY,
    VERSION_METADATA_KEY,
)

# ---- import -------------------------------------------------------------------------------------------------------
_SUFFIXES = {  # key suffix -> (role, is the Embedding layout); longest first where one ends another
    ".lora_A.weight": ("lora_A", False),
    ".lora_B.weight": ("lora_B", False),
    ".lora_embedding_A": ("lora_A", True),
    ".lora_embedding_B": ("lora_B", True),
    ".lora_magnitude_vector.weight": ("magnitude", None),  # PEFT's in-memory name, accepted by PEFT's loader
    ".lora_magnitude_vector": ("magnitude", None),
}
# PEFT's classification / QA classes make these heads saved modules (``key.endswith(name)``).
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def read_adapter_weights(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """``(tensors, safetensors metadata, path)`` of a folder's ``adapter_model.safetensors``, else of its
    ``adapter_model.bin`` (PEFT's ``safe_serialization=False``, read with ``torch.load(weights_only=True)``).

    Raises FileNotFoundError when neither file exists, ValueError when the file is unreadable or a tensor holds NaN
    or inf (naming the file and the tensor).
    """
    directory = Path(directory)
    weights = directory / ADAPTER_WEIGHTS
    if weights.is_file() or not (directory / ADAPTER_WEIGHTS_BIN).is_file():
        tensors, metadata = read_safetensors(weights)
        return tensors, metadata, weights
    weights = directory / ADAPTER_WEIGHTS_BIN
    try:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, a truncated zip, a non-tensor object: all mean "not loadable"
        raise ValueError(
            f"{weights} is not a readable PyTorch weights file ({type(err).__name__}); save the adapter again, "
            "preferably with save_pretrained(..., safe_serialization=True)"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(f"{weights} does not hold a dict of tensors by name, so it is no PEFT adapter file")
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {key!r} in {weights} contains NaN or inf values; refusing to load it")
    return {k: v.contiguous() for k, v in tensors.items()}, {}, weights


def read_folder_metadata(directory: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of a folder's adapter file, read without its tensors ({} for a ``.bin``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        if (Path(directory) / ADAPTER_WEIGHTS_BIN).is_file():
            return {}
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupted: {err})") from None


def _split_peft_keys(tensors: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict, dict, dict]:
    """``({module: {role: tensor}}, {module: uses the Embedding layout}, {module.param: base-layer tensor},
    {other key: tensor})``, keys without PEFT's ``base_model.model.`` prefix."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    base: dict[str, torch.Tensor] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(
                f"key {key!r} in {path} does not start with {PREFIX!r}, so the file is no PEFT LoRA adapter; save "
                "the adapter with PEFT's save_pretrained or loralib.save_adapters"
            )
        rest = key[len(PREFIX) :]
        for suffix, (role, is_embedding) in _SUFFIXES.items():
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                if role in adapters.get(module, {}):
                    raise ValueError(f"module {module!r} has two {role} tensors in {path}; keep one of them")
                adapters.setdefault(module, {})[role] = value
                if is_embedding is not None and embedding.setdefault(module, is_embedding) != is_embedding:
                    raise ValueError(f"module {module!r} in {path} has both Linear and Embedding LoRA keys")
                break
        else:
            parts = rest.split(".")
            if "base_layer" in parts[:-1] and parts.count("base_layer") == 1:
                module, _, param = rest.partition(".base_layer.")
                base[f"{module}.{param}"] = value
                continue
            if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts or "original_module" in parts:
                raise ValueError(
                    f"key {key!r} in {path} is not in the layout PEFT writes for one LoRA adapter (an adapter name "
                    "left in the key, i.e. several adapters in one file, or a LoRA variant loralib does not "
                    "support); save one adapter with PEFT's save_pretrained and load that folder"
                )
            other[rest] = value
    for module, parts in adapters.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise ValueError(f"module {module!r} in {path} lacks its lora_A or lora_B tensor; save the adapter again")
    for name in base:
        module = name.rpartition(".")[0]
        if module not in adapters:
            raise ValueError(
                f"{path} holds the base weight {PREFIX}{module}.base_layer.* of a module without LoRA tensors; "
                "save the adapter again with PEFT's save_pretrained"
            )
    return adapters, embedding, base, other


def _loralib_config(metadata: dict[str, str], weights: Path) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(
            f"the {CONFIG_METADATA_KEY} metadata of {weights} is not a valid loralib AdapterConfig ({err}); save the "
            "adapter again, or delete the loralib_* metadata to load the folder as a plain PEFT adapter"
        ) from None


def _check_agreement(config: AdapterConfig, peft: AdapterConfig, method: str | None, weights: Path) -> None:
    """The loralib metadata and ``adapter_config.json`` must describe the same adapter (an edited folder does not)."""
    if method is not None and (method not in METHODS or (method == "lora") != (peft.method == "lora")):
        raise ValueError(
            f"{weights} records {METHOD_METADATA_KEY}={method!r}, which contradicts use_dora="
            f"{peft.method != 'lora'} in {ADAPTER_CONFIG}; restore the folder as it was saved"
        )
    pairs = {
        "use_dora": (config.method != "lora", peft.method != "lora"),
        "r": (config.r, peft.r),
        "lora_alpha": (float(config.lora_alpha), float(peft.lora_alpha)),
        "use_rslora": (config.use_rslora, peft.use_rslora),
        "rank_pattern": (config.rank_pattern, peft.rank_pattern),
        "alpha_pattern": (
            {k: float(v) for k, v in config.alpha_pattern.items()},
            {k: float(v) for k, v in peft.alpha_pattern.items()},
        ),
    }
    for key, (ours, theirs) in pairs.items():
        if ours != theirs:
            raise ValueError(
                f"{ADAPTER_CONFIG} says {key}={theirs!r} but the loralib config in the metadata of {weights} says "
                f"{key}={ours!r}: the folder was edited after saving; restore it as it was saved"
            )


def _frozen_keys(
    model: nn.Module, config: AdapterConfig, other: dict[str, torch.Tensor], base: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(saved-module tensors, frozen base tensors)``: the file's keys outside the adapters, sorted into the
    ``modules_to_save`` parameters and the frozen weights PEFT loads into the base model (a task head written for
    PEFT's task classes, a resized embedding). Checked against ``model`` before anything changes."""
    saved_modules = [n for n, _ in model.named_modules() if n and matches_module_name(n, config.modules_to_save)]
    params = dict(model.named_parameters(remove_duplicate=False))
    saved: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = dict(base)
    for key, value in other.items():
        if any(key.startswith(m + ".") for m in saved_modules):
            saved[key] = value
        elif key in params:
            frozen[key] = value
        else:
            raise ValueError(
                f"{PREFIX}{key} in {path} names no parameter of this {type(model).__name__}; load the adapter into "
                "the model class it was saved from"
            )
    modules = dict(model.named_modules())
    for key, value in frozen.items():
        if key not in params:
            raise ValueError(f"{key} in {path} names no parameter of this {type(model).__name__}")
        if value.shape != params[key].shape:
            owner = modules.get(key.rpartition(".")[0])
            hint = (
                f"resize the model's vocabulary first (model.resize_token_embeddings({value.shape[0]})), as PEFT "
                "requires"
                if isinstance(owner, nn.Embedding) or key.endswith(("embed_tokens.weight", "lm_head.weight"))
                else "load the adapter into the model it was saved from"
            )
            raise ValueError(
                f"{key} in {path} has shape {tuple(value.shape)}, this model's has {tuple(params[key].shape)}: {hint}"
            )
    return saved, frozen


def load_peft_adapter(
    model: nn.Module, directory: str | os.PathLike, *, detach_norm: bool | None = None
) -> nn.Module:
    """Load a PEFT LoRA / DoRA folder (written by loralib or by PEFT) into ``model`` as loralib adapters.

    ``loralib.load_adapters(model, directory)`` does the same (it recognises PEFT folders); call this one to set
    ``detach_norm`` or to insist on a PEFT folder.

    A folder loralib wrote carries the whole loralib config in its safetensors metadata: the adapters come back
    exactly as saved (method BiDoRA included, ``detach_norm``, ``autocast_adapter_dtype``, ``"all-linear"``, the
    targets as written), bitwise, into a model of the class they were saved from. Any other PEFT folder is
    converted (:func:`adapter_config_from_peft`); the modules adapted are the ones in the file: when loralib's
    resolution of ``target_modules`` would pick others (PEFT leaves out targets inside ``modules_to_save`` silently,
    and ``"all-linear"`` differs for task heads), the config records the file's module names instead. For a
    classification / QA ``task_type`` the task head in the file becomes a saved module, as in PEFT's task classes,
    even when ``modules_to_save`` is null (older PEFT releases). Other frozen weights in the file (``.base_layer.``
    keys, a resized embedding) are copied into the model, as PEFT does.

    A model with adapters must match them (method, use_rslora, modules, per-module rank and alpha); merged layers
    are unmerged, loaded and merged again. Outputs equal ``PeftModel.from_pretrained(base, directory)``'s. Training
    differs only for DoRA, where PEFT detaches the norm in backward: PEFT's own DoRA folders train with loralib's
    exact gradients unless ``detach_norm=True``.

    Args:
        model: the base model (or one with matching loralib adapters), modified in place and returned.
        directory: the folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
        detach_norm: treat DoRA's row norm as a constant in backward, as PEFT does. None: the saved loralib setting,
            else False. Only for a model without adapters (an adapted model keeps its setting).

    Raises:
        FileNotFoundError: no folder, no config or no weights file.
        ValueError: a loralib version-1 folder, PEFT's several-adapters layout at the top of the folder, an
            unreadable file, NaN / inf in a tensor, a PEFT option loralib cannot represent, keys PEFT does not write
            for one LoRA adapter (e.g. adapter names), modules or parameters the model lacks, a model of another
            class than a loralib folder was saved from, or adapters that differ from the model's (each names what is
            wrong and what to do).
    """
    directory = Path(directory)
    kind, meta = adapter_kind(directory)
    if kind != "peft":
        raise ValueError(f"{directory} holds a loralib version-1 adapter, not a PEFT one; use loralib.load_adapters")
    peft_config = adapter_config_from_peft(meta, detach_norm=bool(detach_norm))
    tensors, metadata, weights = read_adapter_weights(directory)
    method = metadata.get(METHOD_METADATA_KEY)
    if CONFIG_METADATA_KEY in metadata:
        config = _loralib_config(metadata, weights)
        _check_agreement(config, peft_config, method, weights)
        saved_class = metadata.get(CLASS_METADATA_KEY)
        if saved_class is not None and saved_class != type(model).__name__:
            raise ValueError(
                f"adapters in {directory} were saved for a {saved_class}, this model is a {type(model).__name__}; "
                f"load them into a {saved_class}"
            )
        if detach_norm is not None:
            config = dataclasses.replace(config, detach_norm=detach_norm)
    else:
        config = peft_config
        if method is not None:  # export_peft of earlier loralib commits recorded only the method
            _check_agreement(config, peft_config, method, weights)
            config = dataclasses.replace(config, method=method)
    adapters, embedding, base, other = _split_peft_keys(tensors, weights)
    for module, parts in adapters.items():
        if ("magnitude" in parts) != (config.method != "lora"):
            raise ValueError(
                f"module {module!r} in {weights} {'has' if 'magnitude' in parts else 'lacks'} a DoRA magnitude "
                f"vector, but {ADAPTER_CONFIG} says use_dora={config.method != 'lora'}; restore the folder as saved"
            )

    modules = dict(model.named_modules())
    unknown = sorted(set(adapters) - set(modules))
    if unknown:
        raise ValueError(
            f"the PEFT adapter in {directory} adapts modules this {type(model).__name__} does not have: {unknown[:5]}; "
            "load it into the model it was trained on"
        )
    if CONFIG_METADATA_KEY not in metadata and get_adapter_config(model) is None:
        heads = [
            h for h in _TASK_HEADS.get(meta.get("task_type"), ())
            if h not in config.modules_to_save and any(k.startswith(h + ".") for k in other) and h in modules
        ]
        if heads:  # PEFT's task classes save the head whatever modules_to_save says (older releases wrote null)
            config = dataclasses.replace(config, modules_to_save=[*config.modules_to_save, *heads])
    live = get_adapter_config(model)
    saved, frozen = _frozen_keys(model, live if live is not None else config, other, base, weights)
    if live is None:
        if CONFIG_METADATA_KEY not in metadata and set(target_module_names(model, config)) != set(adapters):
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
    copy_adapter_tensors(model, loaded, weights, base=frozen)
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


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _peft_tensors_and_config(model: nn.Module, config: AdapterConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors under PEFT's names and PEFT's ``adapter_config.json`` for ``model``'s adapters."""
    layers = adapter_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        layer._require_defined("save the adapters")
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
        "base_model_name_or_path": base_model_name(model),
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
    return tensors, peft_config


def base_model_name(model: nn.Module) -> str | None:
    """The base model's Hub id or path (``model.config._name_or_path``), None for a model built from a config."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def write_adapter_folder(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    training_data: str | list[str] | None = None,
    metrics: dict | None = None,
    model_card: bool | str = True,
) -> Path:
    """Write the adapter folder: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, and ``README.md``.

    ``PeftModel.from_pretrained(base, directory)`` (or ``AutoPeftModelFor<Task>.from_pretrained(directory)`` when
    ``model.config._name_or_path`` names a saved base model) reproduces this model's outputs, without warnings;
    :func:`load_peft_adapter` reloads it bitwise. DoRA and BiDoRA are PEFT DoRA (``use_dora=True``). PEFT's config
    holds only PEFT's keys (an extra key makes PEFT warn); the loralib settings it cannot hold (method BiDoRA,
    ``detach_norm``, ``autocast_adapter_dtype``, ``"all-linear"``, the targets as written) are in the safetensors
    metadata (:data:`METADATA_KEYS`) and in the model card. Written for PEFT: ``task_type`` (:func:`peft_task_type`),
    ``rank_pattern`` / ``alpha_pattern``, ``modules_to_save``, and for ``target_modules="all-linear"`` the explicit
    module names (PEFT resolves ``all-linear`` differently for task heads).

    PEFT's classification / QA classes always treat the task head (``classifier`` / ``score`` / ``qa_outputs``) as
    a saved module and fail without its weights: for those task types the head's weights are written and its name
    added to PEFT's ``modules_to_save`` (loralib's own config is unchanged: reloaded by loralib, the head keeps its
    saved values and stays frozen unless it was a saved module). When the head itself carries adapters
    (``all-linear`` without ``modules_to_save``), ``task_type`` is left unset, as PEFT's task classes would drop
    them; ``PeftModel.from_pretrained`` loads such a folder exactly.

    The model card (:mod:`loralib.model_card`) records the method, the base model, rank, alpha, targets and the
    ``training_data`` / ``metrics`` passed. ``model_card``: True replaces a README.md loralib wrote and keeps any
    other (with a warning, no card written); ``"overwrite"`` always writes it; False writes none.

    A merged model saves the same folder as unmerged (the adapter tensors do not change when merged; the base
    weights are not written).

    Raises:
        ValueError: the model has no adapters, or ``model_card`` is not True, False or ``"overwrite"``.
    """
    if model_card not in (True, False, "overwrite"):
        raise ValueError(f"model_card must be True, False or 'overwrite', got {model_card!r}")
    config = require_adapter_config(model)
    layers = adapter_layers(model)
    tensors, peft_config = _peft_tensors_and_config(model, config)
    adapted = {name: list(layer.base_weight().shape) for name, layer in layers}
    metadata = {
        "format": "pt",
        METHOD_METADATA_KEY: config.method,
        CONFIG_METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True),
        CLASS_METADATA_KEY: type(model).__name__,
        MODULES_METADATA_KEY: json.dumps(adapted),
        VERSION_METADATA_KEY: str(FORMAT_VERSION),
    }
    directory = Path(directory)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(peft_config, indent=2) + "\n")
    if model_card is not False:
        text = model_card_text(
            method=config.method,
            config=config.to_dict(),
            adapted_modules=list(adapted),
            base_model=peft_config["base_model_name_or_path"],
            base_model_class=type(model).__name__,
            task_type=peft_config["task_type"],
            parameters=sum(t.numel() for t in tensors.values()),
            training_data=training_data,
            metrics=metrics,
        )
        write_model_card(directory, text, model_card)
    return directory


def export_peft(model: nn.Module, directory: str | os.PathLike, **card) -> Path:
    """The same as ``loralib.save_adapters`` (:func:`write_adapter_folder`): loralib has one adapter format, PEFT's.

    Kept for earlier callers; ``card`` takes ``training_data``, ``metrics`` and ``model_card``.
    """
    return write_adapter_folder(model, directory, **card)
