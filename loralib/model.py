"""Model-level API: which modules get adapters, which parameters train at which level, merging.

:class:`~loralib.config.AdapterConfig` lives in :mod:`loralib.config`; it is imported here too, so
``from loralib.model import AdapterConfig`` keeps working.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.pytorch_utils import Conv1D

from . import config as _config
from .config import ALL_LINEAR, AdapterConfig, matches_module_name
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
    WeightsFollower,
    unsupported_weight,
)

# (method, base type) -> adapter class. Checked once at injection time, never in a forward.
_LAYER_CLASSES: dict[str, list[tuple[type[nn.Module], type[AdapterLayer]]]] = {
    "lora": [(nn.Linear, LoRALinear), (Conv1D, LoRAConv1D), (nn.Embedding, LoRAEmbedding)],
    "dora": [(nn.Linear, DoRALinear), (Conv1D, DoRAConv1D), (nn.Embedding, DoRAEmbedding)],
    "bidora": [(nn.Linear, BiDoRALinear), (Conv1D, BiDoRAConv1D)],
}

_CONFIG_ATTR = "_loralib_adapter_config"
#: The key under which the adapter config is stored in a transformers model's ``config`` (and so in ``config.json``
#: written by ``save_pretrained``); ``loralib.from_pretrained`` reads it back.
CONFIG_KEY = "loralib_adapter_config"


def output_head_name(model: nn.Module) -> str | None:
    """The name of the module producing the model's outputs, which ``target_modules="all-linear"`` leaves out.

    * ``model.get_output_embeddings()`` when the model defines one (the LM head: GPT-2's ``lm_head``);
    * otherwise, for a transformers task model (``model.base_model`` is a sub-module), the last ``nn.Linear`` /
      ``Conv1D`` registered outside ``base_model``: the final projection of the task head (RoBERTa's
      ``classifier.out_proj``, BERT's ``classifier``, GPT-2's ``score``, ``qa_outputs``);
    * otherwise (a base model such as ``RobertaModel``, a plain ``nn.Module``): None.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if isinstance(head, nn.Module):
        for name, module in model.named_modules():
            if module is head:
                return name or None
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return None
    inside_base = {id(m) for m in base.modules()}
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and id(module) not in inside_base:
            last = name
    return last


def target_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The names of the modules :func:`apply_adapters` adapts for ``config``, in ``named_modules`` order.

    A list ``target_modules`` matches name suffixes, a string is a full-match regex (:func:`matches_module_name`).
    ``"all-linear"`` selects every ``nn.Linear`` and transformers ``Conv1D`` except (1) the output head
    (:func:`output_head_name`), (2) modules inside ``modules_to_save`` and (3) the linear children of modules that
    read their weight directly (``nn.MultiheadAttention.out_proj``). PEFT 0.21 differs only in (1): it leaves out
    the ``get_output_embeddings()`` module, and for ``task_type="SEQ_CLS"`` a top-level ``classifier`` / ``score``
    *when that is itself a Linear*, so without ``modules_to_save`` it adapts RoBERTa's ``classifier.out_proj`` (and
    BERT's ``classifier`` when task_type is unset); loralib never adapts the head's final projection.
    """
    if config.target_modules != ALL_LINEAR:
        return [n for n, _ in model.named_modules() if n and matches_module_name(n, config.target_modules)]
    head = output_head_name(model)
    saved = [n for n, _ in model.named_modules() if n and matches_module_name(n, config.modules_to_save)]
    skipped_parents = [n for n, m in model.named_modules() if isinstance(m, _PARENTS_READING_CHILD_WEIGHTS)]
    names = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Linear, Conv1D)) or name == head:
            continue
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if any(not p or name.startswith(p + ".") for p in skipped_parents):
            continue
        names.append(name)
    return names


# Modules that read a child's ``weight`` themselves instead of calling the child: an adapter there would never run.
# nn.MultiheadAttention passes ``out_proj.weight`` to F.multi_head_attention_forward; the Transformer layers' fused
# inference path passes ``linear1.weight`` / ``linear2.weight`` (and the attention's) to one kernel.
_PARENTS_READING_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

_SUPPORTED = "floating-point nn.Linear, transformers Conv1D and nn.Embedding (LoRA/DoRA) layers"


def _quantised_kind(module: nn.Module) -> str | None:
    """A short description when ``module`` is a quantised layer (bitsandbytes, torch.ao), else None."""
    module_path = type(module).__module__
    if module_path.startswith("bitsandbytes"):
        return f"a bitsandbytes {type(module).__name__}"
    if ".quantized" in module_path or module_path.startswith(("torch.ao.nn.q", "torch.nn.q")):
        return f"a torch quantised {type(module).__name__}"
    weight = getattr(module, "weight", None)
    unsupported = unsupported_weight(weight) if isinstance(weight, torch.Tensor) else None
    if unsupported is not None:  # an integer weight, or a tensor subclass (torchao) that reports a float dtype
        return f"a {type(module).__name__} with {unsupported}"
    return None


def _adapter_class(method: str, module: nn.Module, name: str, parent: nn.Module | None) -> type[AdapterLayer]:
    quantised = _quantised_kind(module)
    if quantised is not None:
        raise TypeError(
            f"module {name!r} is {quantised}: loralib adapts only {_SUPPORTED}, not quantised layers "
            "(load the model in float32/bfloat16/float16 instead)"
        )
    if isinstance(parent, _PARENTS_READING_CHILD_WEIGHTS):
        raise TypeError(
            f"module {name!r} sits in a {type(parent).__name__}, which reads its weight directly instead of calling "
            "it, so an adapter there would never run; adapt other modules (e.g. write the block with nn.Linear calls)"
        )
    for base_type, adapter_type in _LAYER_CLASSES[method]:
        if isinstance(module, base_type):
            return adapter_type
    supported = ", ".join(t.__name__ for t, _ in _LAYER_CLASSES[method])
    raise TypeError(f"module {name!r} is a {type(module).__name__}; method {method!r} supports only {supported}")


@dataclass
class AdapterSummary:
    """What :func:`apply_adapters` did."""

    adapted_modules: list[str]
    saved_modules: list[str]
    trainable_parameters: int
    total_parameters: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        return (
            f"adapted {len(self.adapted_modules)} modules, {len(self.saved_modules)} trained whole (modules_to_save); "
            f"trainable params: {self.trainable_parameters:,} / {self.total_parameters:,} ({share:.3f}%)"
        )


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """All adapted layers of ``model`` with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def get_adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The :class:`AdapterConfig` applied to ``model``, or None."""
    return getattr(model, _CONFIG_ATTR, None)


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_adapters(model: nn.Module, config: AdapterConfig, verbose: bool = False) -> AdapterSummary:
    """Replace every module matched by ``config.target_modules`` with its adapter layer, in place.

    Freezes every other parameter, keeps ``modules_to_save`` trainable, and returns a summary.
    Raises if nothing matches, if a match is of an unsupported type, or if the model already has adapters.
    """
    if adapter_layers(model) or get_adapter_config(model) is not None:
        raise ValueError("this model already has adapters; apply_adapters can be called only once per model")
    targets = [(n, model.get_submodule(n)) for n in target_module_names(model, config)]
    if not targets:
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r}; "
            f"e.g. module names: {[n for n, _ in list(model.named_modules())[1:12]]}"
        )
    plan = [(n, m, _adapter_class(config.method, m, n, _parent(model, n))) for n, m in targets]
    saved = [n for n, _ in model.named_modules() if n and matches_module_name(n, config.modules_to_save)]
    if config.modules_to_save and not saved:
        raise ValueError(f"no module matched modules_to_save={config.modules_to_save!r}")
    overlap = sorted(t for t, _ in targets for s in saved if t == s or t.startswith(s + "."))
    if overlap:
        raise ValueError(f"modules {overlap} are adapted and also (inside) modules_to_save; keep the two apart")

    for param in model.parameters():
        param.requires_grad_(False)
    kwargs = dict(
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        init_lora_weights=config.init_lora_weights,
        detach_norm=config.detach_norm,
        autocast_adapter_dtype=config.autocast_adapter_dtype,
    )
    for name, module, cls in plan:
        # per-module rank and alpha (rank_pattern / alpha_pattern; config.r / config.lora_alpha otherwise)
        layer = cls.from_base(module, r=config.rank_for(name), lora_alpha=config.alpha_for(name), **kwargs)
        _set_submodule(model, name, layer)
    for name in saved:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    for _, layer in adapter_layers(model):
        for param in (layer.lora_A, layer.lora_B, getattr(layer, "magnitude", None)):
            if param is not None:
                param.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, config)
    # after any load_state_dict of the whole model: DoRA magnitudes still at init follow the loaded W0 (tied weights
    # loaded through another module included)
    model.register_load_state_dict_post_hook(WeightsFollower())
    _record_in_hf_config(model, config)
    _warn_on_adapters_that_never_run(model)

    summary = AdapterSummary(
        adapted_modules=[n for n, _, _ in plan],
        saved_modules=saved,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )
    if verbose:
        print(summary)
    return summary


def saved_module_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the ``modules_to_save`` (e.g. the task head), by qualified name."""
    config = get_adapter_config(model)
    if config is None:
        return {}
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if name and matches_module_name(name, config.modules_to_save):
            for pname, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params[f"{name}.{pname}"] = p
    return params


def direction_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The lower-level parameters of BiDoRA: every ``lora_A``, ``lora_B`` and the ``modules_to_save`` parameters."""
    params = [p for _, layer in adapter_layers(model) for p in (layer.lora_A, layer.lora_B)]
    return params + list(saved_module_parameters(model).values())


def magnitude_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The upper-level parameters of BiDoRA: every ``magnitude`` vector (empty for LoRA)."""
    return [layer.magnitude for _, layer in adapter_layers(model) if layer.decomposed]


def orthogonality_penalty(
    model: nn.Module, terms: dict[AdapterLayer, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> torch.Tensor:
    """Mean over decomposed layers of ``‖V̂ V̂ᵀ − I‖_F`` with ``V̂`` the row-normalised ``(out, in)`` direction.

    This is the paper's ``‖V̂ᵀV̂ − I‖_F`` written for PyTorch's ``(out, in)`` layout (the paper stores ``W`` as
    ``(in, out)`` with column norms): the Gram matrix of the unit direction vectors, whose diagonal is exactly 1.
    Computed in factored form (:meth:`AdapterLayer.orthogonality_distance`), never materialising the direction.

    ``terms``: what :func:`capture_norm_terms` recorded during a forward at the current parameters; each layer's row
    norm and ``W0 Aᵀ`` are then taken from that forward's graph (same value and gradient, at about half the cost).
    Layers that did not run in it, or ran without gradients, are computed from scratch.

    Raises:
        ValueError: the model has no DoRA/BiDoRA layer.
        NotImplementedError: the adapters are FSDP2-sharded (``DTensor``): the penalty reads A, B and W0 outside the
            forward, where FSDP2 holds only this process's shard of them.
    """
    layers = [layer for _, layer in adapter_layers(model) if layer.decomposed]
    if not layers:
        raise ValueError("orthogonality_penalty needs DoRA/BiDoRA layers; the model has none")
    if any(isinstance(layer.lora_A, DTensor) for layer in layers):
        raise NotImplementedError(
            "the orthogonality penalty is not available on an FSDP2-sharded model: it reads A, B and W0 outside the "
            "forward, where FSDP2 holds only this process's shard of them; train with orth_reg=0 (at Rotten "
            "Tomatoes N = 200 the study measured no difference between 0, 1e-5 and 1e-3 on any seed: docs/study.md)")
    terms = terms or {}
    return torch.stack([layer.orthogonality_distance(terms.get(layer)) for layer in layers]).sum() / len(layers)


@contextmanager
def capture_norm_terms(model: nn.Module) -> Iterator[dict[AdapterLayer, tuple[torch.Tensor, torch.Tensor]]]:
    """Record, for the penalty, the row norm ``n`` and ``W0 Aᵀ`` that the forward computes in each DoRA/BiDoRA layer::

        with capture_norm_terms(model) as terms:
            loss = model(**batch).loss
        loss = loss + orth_reg * orthogonality_penalty(model, terms=terms)

    ``terms`` is a plain dict ``{layer: (n, W0 Aᵀ)}`` owned by the caller: it holds graph tensors, so let it go once
    the penalty is computed, and use it only before the parameters change. Forwards in training mode or with
    gradients enabled record (the penalty ignores a record without gradient, e.g. from a ``no_grad`` forward); a layer
    run several times keeps one record, with gradient if any has one (at the same parameters they are equal). Nothing
    is left on the layers afterwards, even on an exception, so the model stays deep-copyable.
    """
    terms: dict[AdapterLayer, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = [layer for _, layer in adapter_layers(model) if layer.decomposed]
    outer = [layer.__dict__.get("_norm_terms_sink") for layer in layers]  # a nested capture restores the outer one
    try:
        for layer in layers:
            layer._norm_terms_sink = terms
        yield terms
    finally:
        for layer, previous in zip(layers, outer):
            if previous is None:
                layer.__dict__.pop("_norm_terms_sink", None)
            else:
                layer._norm_terms_sink = previous


def allow_joint_magnitude_training(model: nn.Module, allow: bool = True) -> None:
    """Let (or, with ``allow=False``, stop letting) a BiDoRA model's magnitudes train in the same step as its
    directions. BiDoRA layers refuse that by default, so that a BiDoRA model handed to a plain training loop (e.g.
    ``transformers.Trainer``) fails instead of silently training as DoRA; a loop that really means it calls this."""
    for _, layer in adapter_layers(model):
        layer.joint_magnitude_training = bool(allow)


@contextmanager
def magnitudes_trainable(model: nn.Module, trainable: bool = True) -> Iterator[None]:
    """Inside, the DoRA / BiDoRA magnitudes of ``model`` are trainable (``requires_grad``, and BiDoRA layers accept a
    training forward that differentiates them: the upper step) or, with ``trainable=False``, frozen (the lower level
    and BiDoRA's retraining phase); on exit every flag is as it was. The one switch for "who trains the magnitudes"."""
    layers = [layer for _, layer in adapter_layers(model) if layer.decomposed]
    before = [(layer.magnitude.requires_grad, layer.joint_magnitude_training) for layer in layers]
    for layer in layers:
        layer.magnitude.requires_grad_(trainable)
        layer.joint_magnitude_training = trainable
    try:
        yield
    finally:
        for layer, (grad, joint) in zip(reversed(layers), reversed(before)):
            layer.magnitude.requires_grad_(grad)
            layer.joint_magnitude_training = joint


def reset_directions(model: nn.Module) -> None:
    """Re-initialise every adapter direction (A random, B zero) and reset the ``modules_to_save`` modules."""
    for _, layer in adapter_layers(model):
        layer.reset_adapter_parameters()
    config = get_adapter_config(model)
    if config is None:
        return
    for name, module in model.named_modules():
        if name and matches_module_name(name, config.modules_to_save):
            for sub in module.modules():
                if hasattr(sub, "reset_parameters") and not isinstance(sub, AdapterLayer):
                    sub.reset_parameters()


def _check_not_shared(model: nn.Module) -> None:
    """Merging in place writes into ``weight``: refuse when another module uses the same tensor (tied weights)."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), set()).add(name)
    for name, layer in adapter_layers(model):
        others = owners[id(layer.weight)] - {name}
        if others:
            raise ValueError(
                f"the weight of {name!r} is shared with {sorted(others)} (tied weights); merging in place would change "
                "them too. Use merge_and_unload, which gives the adapted module its own weight."
            )


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its base weight in place; returns how many layers were merged (0 if all were)."""
    _check_not_shared(model)
    return sum(layer.merge() for _, layer in adapter_layers(model))


def unmerge_adapters(model: nn.Module) -> int:
    """Undo :func:`merge_adapters`; returns how many layers were unmerged."""
    return sum(layer.unmerge() for _, layer in adapter_layers(model))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain module holding the merged weight; returns the (same) model.

    The result has no loralib classes in it, so ``save_pretrained`` of vanilla transformers saves and reloads it.
    """
    layers = adapter_layers(model)
    plain = {name: layer.make_base_module() for name, layer in layers}
    for name, module in plain.items():
        if not all(torch.all(torch.isfinite(p)) for p in module.parameters()):
            raise ValueError(f"merging {name!r} produced non-finite weights")
    for name, module in plain.items():
        module.train(model.training)
        _set_submodule(model, name, module)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    _record_in_hf_config(model, None)
    return model


def _warn_on_adapters_that_never_run(model: nn.Module) -> None:
    """At the model's first forward, warn about adapted layers whose forward did not run (a parent that reads their
    weight itself, or a branch the model never takes): training would leave them, silently, at zero. The hooks are
    removed after that first forward, so later forwards pay nothing."""
    check = _FirstForwardCheck(model)
    check.handles = [layer.register_forward_hook(check.saw(name)) for name, layer in adapter_layers(model)]
    check.handles.append(model.register_forward_hook(check))


class _FirstForwardCheck:
    """Forward hooks of :func:`_warn_on_adapters_that_never_run` (a class, so that a hooked model still pickles)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ran: set[str] = set()
        self.handles: list = []

    def saw(self, name: str) -> _LayerRan:
        return _LayerRan(self.ran, name)

    def __call__(self, *_) -> None:
        for handle in self.handles:
            handle.remove()
        idle = [name for name, _ in adapter_layers(self.model) if name not in self.ran]
        if idle:
            warnings.warn(
                f"{len(idle)} adapted layer(s) did not run in the model's first forward: {idle[:5]}"
                f"{' ...' if len(idle) > 5 else ''}. Their adapters get no gradient and change nothing; check that "
                "the model calls these modules (some parents read a child's weight directly).",
                stacklevel=2,
            )


class _LayerRan:
    def __init__(self, ran: set[str], name: str) -> None:
        self.ran, self.name = ran, name

    def __call__(self, *_) -> None:
        self.ran.add(self.name)


def _record_in_hf_config(model: nn.Module, config: AdapterConfig | None) -> None:
    """Store (or, with None, remove) the adapter config in ``model.config`` so that ``save_pretrained`` writes it."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        return
    if config is not None:
        setattr(hf_config, CONFIG_KEY, config.to_dict())
    elif hasattr(hf_config, CONFIG_KEY):
        delattr(hf_config, CONFIG_KEY)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def __getattr__(name: str):
    # Moved to loralib.config with AdapterConfig: the old import paths keep working, with a DeprecationWarning.
    if name in ("METHODS", "pattern_key"):
        message = f"loralib.model.{name} moved to loralib.config.{name}; import it from there"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
