"""loralib: LoRA, DoRA and BiDoRA adapters for PyTorch and Hugging Face transformers.

The whole BiDoRA algorithm lives in two files: :mod:`loralib.layers` (the weight-decomposed layer) and
:mod:`loralib.bilevel` (the two Betty problems: direction below, magnitude above).
"""

from .hf import from_pretrained
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
    AdapterConfig,
    AdapterSummary,
    adapter_layers,
    allow_joint_magnitude_training,
    apply_adapters,
    direction_parameters,
    get_adapter_config,
    magnitude_parameters,
    merge_adapters,
    merge_and_unload,
    orthogonality_penalty,
    reset_directions,
    saved_module_parameters,
    unmerge_adapters,
)
from .peft_compat import adapter_config_from_peft, export_peft, load_peft_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "AdapterSummary",
    "BiDoRATrainer",
    "BiDoRATrainingArguments",
    "BiDoRAConv1D",
    "BiDoRALinear",
    "DoRAConv1D",
    "DoRAEmbedding",
    "DoRALinear",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALinear",
    "adapter_config_from_peft",
    "adapter_layers",
    "allow_joint_magnitude_training",
    "adapter_state_dict",
    "apply_adapters",
    "direction_parameters",
    "export_peft",
    "from_pretrained",
    "get_adapter_config",
    "load_adapters",
    "load_peft_adapter",
    "magnitude_parameters",
    "merge_adapters",
    "merge_and_unload",
    "orthogonality_penalty",
    "read_adapter_config",
    "reset_directions",
    "save_adapters",
    "save_target_weights",
    "saved_module_parameters",
    "unmerge_adapters",
]


def __getattr__(name: str):
    # The trainer pulls in transformers.Trainer and accelerate: import it only when asked for.
    if name == "BiDoRATrainer":
        from .bidora_trainer import BiDoRATrainer

        return BiDoRATrainer
    if name == "BiDoRATrainingArguments":
        from .training_args import BiDoRATrainingArguments

        return BiDoRATrainingArguments
    raise AttributeError(f"module 'loralib' has no attribute {name!r}")
