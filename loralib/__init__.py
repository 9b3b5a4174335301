"""loralib: LoRA, DoRA and BiDoRA adapters for PyTorch and Hugging Face transformers.

The whole BiDoRA algorithm lives in two files: :mod:`loralib.layers` (the weight-decomposed layer) and
:mod:`loralib.bilevel` (the two Betty problems: direction below, magnitude above).
"""

from .io import adapter_state_dict, export_peft, load_adapters, read_adapter_config, save_adapters, save_target_weights
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

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "AdapterSummary",
    "BiDoRAConv1D",
    "BiDoRALinear",
    "DoRAConv1D",
    "DoRAEmbedding",
    "DoRALinear",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALinear",
    "adapter_layers",
    "adapter_state_dict",
    "apply_adapters",
    "direction_parameters",
    "export_peft",
    "get_adapter_config",
    "load_adapters",
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
