"""loralib: LoRA, DoRA and BiDoRA adapters for PyTorch and Hugging Face transformers.

The whole BiDoRA algorithm lives in three files: :mod:`loralib.layers` (the weight-decomposed layer),
:mod:`loralib.bilevel` (the two levels: direction below, magnitude above) and :mod:`loralib.hypergradients` (the
estimators of the upper level's implicit term).

The public names below are imported on first use (PEP 562): ``import loralib.files`` (the reporting scripts'
atomic writer) does not load torch and transformers, and the trainer (transformers' ``Trainer``, accelerate) loads
only when asked for. ``loralib.X`` and ``from loralib import X`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "AdapterConfig": "config",
    "adapter_config_from_peft": "config",
    "AdapterLayer": "layers",
    "BiDoRAConv1D": "layers",
    "BiDoRALinear": "layers",
    "DoRAConv1D": "layers",
    "DoRAEmbedding": "layers",
    "DoRALinear": "layers",
    "LoRAConv1D": "layers",
    "LoRAEmbedding": "layers",
    "LoRALinear": "layers",
    "AdapterSummary": "model",
    "adapter_layers": "model",
    "allow_joint_magnitude_training": "model",
    "apply_adapters": "model",
    "direction_parameters": "model",
    "get_adapter_config": "model",
    "magnitude_parameters": "model",
    "merge_adapters": "model",
    "merge_and_unload": "model",
    "orthogonality_penalty": "model",
    "capture_norm_terms": "model",
    "magnitudes_trainable": "model",
    "reset_directions": "model",
    "saved_module_parameters": "model",
    "unmerge_adapters": "model",
    "adapter_state_dict": "io",
    "load_adapters": "io",
    "read_adapter_config": "io",
    "save_adapters": "io",
    "save_target_weights": "io",
    "export_peft": "peft_compat",
    "load_peft_adapter": "peft_compat",
    "from_pretrained": "hf",
    "load_checkpoint": "checkpoints",
    "disable_adapters": "runtime",
    "print_trainable_parameters": "runtime",
    "refresh": "runtime",
    "BiDoRATrainer": "bidora_trainer",
    "AdapterCheckpointMixin": "trainer_checkpoints",
    "AdapterTrainer": "trainer_checkpoints",
    "BiDoRATrainingArguments": "training_args",
    "build_hypergradient": "hypergradients",
    # TRL's SFTTrainer (optional: needs trl, so left out of __all__ and `from loralib import *`)
    "BiDoRASFTConfig": "sft",
    "BiDoRASFTTrainer": "sft",
}

__all__ = [
    "AdapterCheckpointMixin",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterSummary",
    "AdapterTrainer",
    "BiDoRAConv1D",
    "BiDoRALinear",
    "BiDoRATrainer",
    "BiDoRATrainingArguments",
    "DoRAConv1D",
    "DoRAEmbedding",
    "DoRALinear",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALinear",
    "adapter_config_from_peft",
    "adapter_layers",
    "adapter_state_dict",
    "allow_joint_magnitude_training",
    "apply_adapters",
    "build_hypergradient",
    "capture_norm_terms",
    "direction_parameters",
    "disable_adapters",
    "export_peft",
    "from_pretrained",
    "get_adapter_config",
    "load_adapters",
    "load_checkpoint",
    "load_peft_adapter",
    "magnitude_parameters",
    "magnitudes_trainable",
    "merge_adapters",
    "merge_and_unload",
    "orthogonality_penalty",
    "print_trainable_parameters",
    "read_adapter_config",
    "refresh",
    "reset_directions",
    "save_adapters",
    "save_target_weights",
    "saved_module_parameters",
    "unmerge_adapters",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if name.isidentifier() and not name.startswith("__"):  # a submodule not imported yet: `loralib.model.X`
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from .bidora_trainer import BiDoRATrainer
    from .checkpoints import load_checkpoint
    from .config import AdapterConfig, adapter_config_from_peft
    from .hf import from_pretrained
    from .hypergradients import build_hypergradient
    from .io import adapter_state_dict, load_adapters, read_adapter_config, save_adapters, save_target_weights
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
    from .model import (
        AdapterSummary,
        adapter_layers,
        allow_joint_magnitude_training,
        apply_adapters,
        capture_norm_terms,
        direction_parameters,
        get_adapter_config,
        magnitude_parameters,
        magnitudes_trainable,
        merge_adapters,
        merge_and_unload,
        orthogonality_penalty,
        reset_directions,
        saved_module_parameters,
        unmerge_adapters,
    )
    from .peft_compat import export_peft, load_peft_adapter
    from .runtime import disable_adapters, print_trainable_parameters, refresh
    from .sft import BiDoRASFTConfig as BiDoRASFTConfig  # optional (trl): not in __all__
    from .sft import BiDoRASFTTrainer as BiDoRASFTTrainer
    from .trainer_checkpoints import AdapterCheckpointMixin, AdapterTrainer
    from .training_args import BiDoRATrainingArguments
