"""Run-time controls of an adapted model: :func:`refresh` after writes autograd cannot see, :func:`disable_adapters`
(the base model's outputs, bitwise) and :func:`print_trainable_parameters` (PEFT's one-line summary).

What a layer derives from its weights (DoRA's eval-mode norm, ``‖W0‖²``, ``W0 W0ᵀ``, a magnitude still at its initial
value ``‖W0‖``) follows every change autograd can see on its own: in-place ops and ``copy_``, ``load_state_dict``
(whole model or any submodule, ``strict=False`` and ``assign=True`` too), transformers' loading (new Parameters),
``torch.nn.utils.vector_to_parameters``, ``.to()`` / ``.half()`` / ``.bfloat16()`` / ``.cuda()``. What it cannot see
needs :func:`refresh`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .layers import AdapterLayer
from .model import adapter_layers

__all__ = ["disable_adapters", "print_trainable_parameters", "refresh", "trainable_parameter_counts"]


def refresh(model: nn.Module) -> None:
    """Recompute, in every adapted layer of ``model`` (or in ``model`` itself when it is one), what is derived from
    the weights, after writes that bump no version counter, which the layers cannot notice:

    * writes through ``.data`` (``layer.weight.data.copy_(w)``, ``p.data = ...`` loaders, some checkpoint readers);
    * fused / foreach optimisers stepping A, B outside training mode (``torch.optim.AdamW(fused=True)``, transformers'
      ``adamw_torch_fused``; a ``model.train()`` / ``model.eval()`` switch clears the eval-mode norm too);
    * collectives writing into parameters in place (a broadcast of the base weights).

    Afterwards the outputs are those of a model built from the current weights: the eval-mode norm and the cached
    ``‖W0‖²`` / ``W0 W0ᵀ`` are recomputed, and a DoRA / BiDoRA magnitude still holding its initial value (never
    trained, set or loaded) is re-initialised to ``‖W0‖`` of the current W0, as :func:`loralib.apply_adapters` would
    have set it had the weights been there first. Trained or loaded magnitudes are never changed.
    """
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.refresh()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every adapted layer of ``model`` returns its base layer's output, bitwise (the adapters are skipped,
    not zeroed: nothing is written), e.g. the reference model of DPO or a KL penalty::

        with loralib.disable_adapters(model):
            reference_logits = model(**batch).logits

    The forward checks one plain attribute, so ``torch.compile`` guards on it (no graph break). Nests; on exit
    every layer is as it was. Merged layers hold the adapter in their weight, so they are refused (ValueError):
    unmerge first. Merging inside the block is refused too.
    """
    layers = adapter_layers(model)
    merged = [name or type(layer).__name__ for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(
            f"cannot disable the adapters of merged layers {merged[:5]}{' ...' if len(merged) > 5 else ''}: their "
            "weight holds the adapter, so no forward can skip it; call loralib.unmerge_adapters(model) first"
        )
    before = [layer.__dict__.get("adapter_disabled") for _, layer in layers]
    for _, layer in layers:
        layer.adapter_disabled = True
    try:
        yield model
    finally:
        for (_, layer), previous in zip(layers, before):
            if previous is None:
                layer.__dict__.pop("adapter_disabled", None)  # back to the class default
            else:
                layer.adapter_disabled = previous


def trainable_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter elements, as :func:`print_trainable_parameters` counts them.

    ``total``: every parameter of the model once (tied weights count once), adapters included. ``trainable``:
    the parameters with ``requires_grad`` (``lora_A``, ``lora_B``, DoRA magnitudes, the ``modules_to_save``
    parameters), plus the magnitudes of BiDoRA layers, which are trained (by the upper level) although
    :class:`loralib.BiDoRATrainer` keeps their ``requires_grad`` off outside its upper step.
    """
    upper = {id(layer.magnitude) for _, layer in adapter_layers(model) if layer.magnitude_is_upper_level}
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad or id(param) in upper:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print ``trainable params: N || all params: M || trainable%: P`` (PEFT's line) and return ``(N, M)``.

    Counts as :func:`trainable_parameter_counts`: all parameters once, trainable ones being those with
    ``requires_grad`` plus BiDoRA's magnitudes (both levels of BiDoRA together).
    """
    trainable, total = trainable_parameter_counts(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
    return trainable, total
