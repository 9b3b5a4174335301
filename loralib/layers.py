"""Adapter layers: the LoRA / DoRA / BiDoRA math, in one place.

Every adapted layer is a subclass of the module it replaces (``nn.Linear``, transformers' ``Conv1D``,
``nn.Embedding``), so the pretrained state-dict keys (``weight``, ``bias``) are unchanged. All layers see their
pretrained weight as ``W0`` with shape ``(out, in)``; the three base classes only say how to read that weight and how
to apply it, and :class:`AdapterLayer` does the rest:

* LoRA:            ``y = W0 x + b + s · B A drop(x)``
* DoRA / BiDoRA:   ``y = (m / n) ⊙ (W0 x + s · B A drop(x)) + b``,  ``n = ‖W0 + s·BA‖`` per output row.

BiDoRA differs from DoRA only in *who trains* ``magnitude`` (the upper level of the bi-level problem), not in the
math, so :class:`BiDoRALinear` and friends only carry a different name.

Numerics of the norm
--------------------
``n`` is computed without materialising ``W0 + s·BA``::

    n² = ‖W0‖² + 2s · rowsum((W0 Aᵀ) ⊙ B) + s² · rowsum((B (A Aᵀ)) ⊙ B)

which costs one rank-r product with ``W0`` (``out·in·r`` multiply-adds) instead of a dense ``out × in`` matrix.
The three terms are accumulated in at least float32. The factored sum can lose digits by cancellation when a row of
``s·BA`` nearly cancels the same row of ``W0`` (``n ≪ ‖W0‖``): its absolute error is about ``eps · ‖W0‖²``, so
``n²`` is clamped below at ``eps · ‖W0‖²`` (never zero or negative, no ``inf`` gradient from ``sqrt``). In
fine-tuning ``s·BA`` is small against ``W0`` and the relative error stays at the level of the dtype's epsilon; a
test compares the factored norm with the dense one. :meth:`AdapterLayer.direction` (used by the regulariser and the
analysis) materialises the dense matrix on purpose.

State derived from the weights
------------------------------
What a layer derives from its Parameters is cached, keyed on the Parameters themselves (:func:`_tensor_key`: the
object, its memory, its version counter, dtype, device, shape; never on a converted copy): the eval-mode ``n`` (on
A, B and W0) and ``‖W0‖²`` / ``W0 W0ᵀ`` (on W0). Every write autograd sees changes a key; ``.to()`` and loads drop
the caches outright; writes it cannot see (``.data``, fused optimisers) need :func:`loralib.refresh`. A DoRA
magnitude that still holds its initial value ``‖W0‖`` (bitwise, and not loaded from a state dict) follows W0: when
W0 changes under it (pretrained weights loaded after ``apply_adapters``, a dtype move), it is re-initialised, at the
load or at the next eager forward, so the order of "adapt" and "load" does not matter. Trained or loaded
magnitudes (any value other than the initial one) never move.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.pytorch_utils import Conv1D

from .config import validate_adapter_options

__all__ = [
    "AdapterLayer",
    "LoRALinear",
    "DoRALinear",
    "BiDoRALinear",
    "LoRAConv1D",
    "DoRAConv1D",
    "BiDoRAConv1D",
    "LoRAEmbedding",
    "DoRAEmbedding",
]


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _full_precision_region(device: torch.device):
    """A context in which autocast is off on ``device``: the norm and the merge are sums of many terms whose
    cancellation a half-precision matmul would ruin, and they are cheap (rank-r) anyway."""
    if device.type in ("cpu", "cuda", "xpu", "mps", "hpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


# A number per tensor object for as long as it lives (never reused, unlike id() and addresses): a Parameter replaced
# by a new one (transformers' loading, load_state_dict(assign=True), accelerate) never matches an old key.
_TENSOR_TOKENS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_NEXT_TOKEN = itertools.count()


def _tensor_key(tensor: Tensor | None) -> tuple | None:
    """What identifies the current contents of ``tensor``, a registered Parameter (never a temporary): the object
    itself (a token), its memory (data pointer, of the local shard for a DTensor: ``.data = ...`` and
    ``vector_to_parameters`` move it), its version counter (bumped by every in-place write autograd sees: ``copy_``,
    ``mul_``, optimiser steps, ``load_state_dict``), dtype, device, shape and strides. None when the tensor has no
    storage to key on (functorch wrappers): then nothing is cached."""
    if tensor is None:
        return None
    local = getattr(tensor, "_local_tensor", None)  # DTensor
    memory = tensor if local is None else local
    try:
        version = -1 if tensor.is_inference() else tensor._version
        if local is not None and not local.is_inference():
            version = (version, local._version)
        key = (memory.data_ptr(), version, tensor.dtype, tensor.device, tuple(tensor.shape), memory.stride())
        token = _TENSOR_TOKENS.get(tensor)
        if token is None:
            token = _TENSOR_TOKENS[tensor] = next(_NEXT_TOKEN)
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return (token, *key)


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Bitwise equal (same dtype, shape and device, the same bits: a NaN equals the same NaN, which memory without
    values, e.g. after ``to_empty``, may hold)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point() or a.is_meta:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(torch.equal(a.detach().contiguous().view(bits), b.detach().contiguous().view(bits)))


def unsupported_weight(weight: Tensor) -> str | None:
    """Why ``weight`` cannot be a base weight (a short description), or None when it can.

    Plain floating-point tensors can, and so can ``torch.distributed.tensor.DTensor`` (FSDP2, tensor-parallel
    loading) whose local shard is one. Every other tensor subclass is refused, whatever dtype it reports: torchao's
    quantised weights (``Int8WeightOnly`` and friends) report ``float32`` and ``is_floating_point()`` but hold
    integers, and their kernels implement neither the norm nor the merge.
    """
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(weight, dtensor):
        return unsupported_weight(weight._local_tensor)
    if type(weight) not in (Tensor, nn.Parameter):
        return f"a {type(weight).__name__} weight (a tensor subclass, such as torchao's quantised weights)"
    if not weight.is_floating_point():
        return f"a {weight.dtype} weight"
    return None


class AdapterLayer(nn.Module):
    """Mixin holding the adapter parameters and the forward / merge math shared by every layer type.

    Subclasses provide :meth:`base_weight`, :meth:`_set_base_weight`, :meth:`_base_forward` (the unadapted layer's
    own output, bias included) and :meth:`_adapter_input` (``A drop(x)``, shape ``(..., r)``).
    """

    #: True for DoRA / BiDoRA (a trainable ``magnitude`` rescales each output row).
    decomposed: bool = False
    #: "lora" | "dora" | "bidora"; also the name used in saved configs.
    method: str = "lora"

    #: Whether autocast changes the base op's output dtype (matmuls: yes; embedding lookups: no). When it does not,
    #: the adapter's add runs outside autocast too, so the layer returns the dtype the pretrained layer returns.
    _base_op_autocasts: bool = True
    #: BiDoRA: the magnitude belongs to the upper level; a training forward in which it needs a gradient is refused
    #: unless ``joint_magnitude_training`` is set (the bi-level trainer's upper step, or an explicit custom loop).
    magnitude_is_upper_level: bool = False
    joint_magnitude_training: bool = False
    #: Set (per instance) only inside ``loralib.model.capture_norm_terms``: a caller-owned dict into which each
    #: forward that computes the exact norm (training, or gradients enabled) records this layer's ``(n, W0 Aᵀ)`` for
    #: the orthogonality penalty to reuse. Never left on a layer after the context: a graph held by a module would
    #: break ``copy.deepcopy`` and pin memory.
    _norm_terms_sink: dict | None = None
    #: Set (per instance) only inside ``loralib.disable_adapters``: the forward returns the base layer's output.
    adapter_disabled: bool = False
    #: DoRA: the magnitude's initial value while the magnitude may still follow W0 (None once it was loaded).
    _magnitude_init: Tensor | None = None
    #: The key (:func:`_tensor_key`) of W0 when the layer last looked at it (None: look at the next forward).
    _w0_seen: tuple | None = None
    #: Names of the adapter parameters whose values are not defined yet. Non-empty only for a layer built over a W0
    #: on the meta device: transformers' ``from_pretrained`` builds the model there, so adapters applied in a model
    #: class's ``__init__`` are, and so are builds under ``torch.device("meta")``; the memory they get later
    #: (``torch.empty``, ``to_empty``) holds no values. A name leaves the set when its value arrives (a load of its
    #: key, transformers' loader, :meth:`reset_adapter_parameters`); the rest are initialised from the W0 then in
    #: place by :meth:`_define_adapter`, the first time the layer sees real memory (a load, a mode switch, which is
    #: how ``from_pretrained`` ends, a forward, a merge, a save). ``to_empty`` of any layer initialises every one
    #: at once (:meth:`_apply`).
    _undefined: frozenset[str] = frozenset()
    #: The base weight's shape when the adapter was made (None: not recorded, a layer pickled by an older loralib).
    _weight_shape: tuple | None = None

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    scaling: float
    r: int

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _init_adapter(
        self,
        r: int,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: str = "kaiming",
        detach_norm: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        validate_adapter_options(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                 init_lora_weights=init_lora_weights)
        unsupported = unsupported_weight(self.weight)
        if unsupported is not None:
            raise TypeError(
                f"{type(self).__name__} needs a floating-point base weight, got {unsupported} "
                "(quantised layers are not supported: adapt the floating-point model)"
            )
        weight = self.base_weight()
        out_features, in_features = weight.shape
        # fp32 adapters on a half-precision base (PEFT's default too): half-precision A, B and m train poorly.
        adapter_dtype = torch.float32 if autocast_adapter_dtype and weight.dtype in _HALF_DTYPES else weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.init_lora_weights = init_lora_weights
        self.detach_norm = bool(detach_norm)
        self._weight_shape = tuple(self.weight.shape)  # what lora_A / lora_B were made to fit
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        # m / n at merge time (DoRA), needed to unmerge; saved through get_extra_state (the key set of the state dict
        # must not depend on the merge state). A plain attribute that _apply converts as the weights are (.to(),
        # .half()), not a buffer: transformers' from_pretrained replaces every non-persistent buffer with
        # torch.empty after loading, which would lose the loaded value of a layer built in a model's __init__.
        self._merge_scale: Tensor | None = None
        self._norm_cache: tuple[tuple, Tensor] | None = None
        self.reset_adapter_parameters()
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(self.weight, dtensor):  # A and B replicated on the weight's mesh
            self._distribute_adapter_like(self.weight)
        if self.decomposed:
            with torch.no_grad():  # ‖W0‖_row exactly the way the forward computes n with B = 0: m / n = 1
                self.magnitude = nn.Parameter(self._initial_magnitude(adapter_dtype))
            self._magnitude_init = None if weight.is_meta else self.magnitude.detach().clone()
        if weight.is_meta:  # no values yet, for W0 or for the adapter: defined once W0 has them (_define_adapter)
            self._undefined = frozenset(self._adapter_names())
        self._w0_seen = self._w0_key()

    def _adapter_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B", "magnitude") if self.decomposed else ("lora_A", "lora_B")

    def _distribute_adapter_like(self, weight: Tensor) -> None:
        from torch.distributed.tensor import Replicate, distribute_tensor

        mesh = weight.device_mesh
        for name in ("lora_A", "lora_B"):
            local = getattr(self, name).detach()  # initialised on every rank alike, made identical by rank 0's copy
            replicated = distribute_tensor(local, mesh, [Replicate()] * mesh.ndim)
            setattr(self, name, nn.Parameter(replicated))

    def reset_adapter_parameters(self) -> None:
        """Re-initialise the direction: A random (Kaiming-uniform or Gaussian), B zero (so ΔW = 0)."""
        self._init_direction(("lora_A", "lora_B"))
        if not self.lora_A.is_meta and not self.lora_B.is_meta:
            self._undefined = self._undefined - {"lora_A", "lora_B"}
        self._invalidate_caches()

    @torch.no_grad()
    def _init_direction(self, names) -> None:
        if "lora_A" in names:
            if self.init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if "lora_B" in names:
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def _define_adapter(self, materialised: bool = False) -> bool:
        """Give the adapter parameters of :attr:`_undefined` the values a layer built over the current W0 would
        have (A random, B zero, DoRA's magnitude ‖W0‖_row), leaving those whose values a loader put there. Which
        is which, by the route that gave them memory:

        * ``materialised`` (``to_empty``, seen by :meth:`_apply`): every one holds garbage.
        * transformers' ``from_pretrained`` (it marks each module it finished, and each parameter it loaded from
          the checkpoint, with ``_is_hf_initialized``, and materialises the missing ones with ``torch.empty``):
          the unmarked ones.
        * any other loader that assigns new Parameters (accelerate's ``set_module_tensor_to_device``, a user's
          ``layer.lora_A = Parameter(...)``): none, they are the loaded values.
        * still on the meta device while W0 is not (``load_state_dict(base_weights, strict=False, assign=True)``,
          torchtune's order): they get memory on W0's device here, and values.

        Returns False, changing nothing, while W0 is still on the meta device (no values to start from).
        """
        if not self._undefined:
            return True
        weight = self.base_weight()
        params = {name: self._parameters.get(name) for name in self._undefined}
        if weight.is_meta or any(p is None for p in params.values()):
            return False
        on_meta = {name for name, p in params.items() if p.is_meta}
        dtensor = _dtensor_type()
        if dtensor is not None and any(isinstance(params[name], dtensor) for name in on_meta):
            return False  # sharded by FSDP while on meta: to_empty gives it memory
        for name in on_meta:
            p = params[name]
            params[name] = nn.Parameter(torch.empty_like(p, device=weight.device), requires_grad=p.requires_grad)
            setattr(self, name, params[name])
        if materialised:
            todo = set(params)
        elif getattr(self, "_is_hf_initialized", False):
            todo = {name for name, p in params.items() if not getattr(p, "_is_hf_initialized", False)}
        else:
            todo = on_meta
        self._init_direction(todo)
        if "magnitude" in todo:
            magnitude = self.magnitude
            magnitude.copy_(self._initial_magnitude(magnitude.dtype))
            self._magnitude_init = magnitude.detach().clone()
        elif "magnitude" in params:
            self._magnitude_init = None  # loaded: the user's magnitude, never re-initialised
        self._undefined = frozenset()
        self._invalidate_caches()
        self._w0_seen = self._w0_key()
        return True

    def _check_shape(self) -> None:
        """Raise (a sentence, not a shape error deep in torch) when the base weight no longer has the shape the
        adapter was made for: resized after ``apply_adapters`` (``resize_token_embeddings`` rewrites an
        embedding's weight in place)."""
        shape = tuple(self.weight.shape)
        if self._weight_shape is not None and shape != self._weight_shape:
            raise RuntimeError(
                f"this {type(self).__name__}'s base weight changed shape from {self._weight_shape} to {shape} after "
                "the adapters were applied (resize_token_embeddings, or a new weight assigned): lora_A / lora_B no "
                "longer fit it. Resize the base model first, then apply the adapters (PEFT's order too)"
            )

    def _require_defined(self, doing: str) -> None:
        """Raise (a sentence, not a meta-tensor error) when adapter values are still undefined."""
        if self._undefined and not self._define_adapter():
            raise RuntimeError(
                f"cannot {doing}: this {type(self).__name__} was built on the meta device and its "
                f"{', '.join(sorted(self._undefined))} have no values yet: its base weight is still on the meta "
                "device. Load the model's weights first (load_state_dict(..., assign=True), or to_empty() and then "
                "load_state_dict; adapter values missing from the state dict are then initialised), or load the "
                "pretrained model and apply the adapters to it (loralib.from_pretrained)"
            )

    # ---- state derived from the weights ----------------------------------------------------------------------
    # One cache design: a derived tensor is stored as ``(key, value)`` under its own attribute (``_norm_cache``,
    # ``_w0_sq_cache``, ``_w0_gram_cache``, ``_w0_gram_sq_cache``), the key made of :func:`_tensor_key` of each
    # Parameter it is computed from (the registered Parameter itself, never a converted copy), so that every write
    # autograd sees (in-place ops, ``copy_``, ``load_state_dict``, transformers' loading, which assigns new
    # Parameters, ``vector_to_parameters``, which moves ``.data``) makes it stale. Device and dtype moves
    # (``_apply``) and loads drop every cache outright. Writes autograd cannot see (``.data`` writes, fused
    # optimisers) are caught by ``train()`` (mode switches) and by :func:`loralib.refresh`.
    _CACHES = ("_norm_cache", "_w0_sq_cache", "_w0_gram_cache", "_w0_gram_sq_cache")

    def _invalidate_caches(self) -> None:
        """Forget every cached quantity (the eval-mode norm, ‖W0‖², W0 W0ᵀ): after a merge, an unmerge or a load."""
        self._norm_cache = None
        for name in self._CACHES[1:]:
            self.__dict__.pop(name, None)

    def _w0_key(self) -> tuple | None:
        return _tensor_key(self._parameters.get("weight"))

    def _cached(self, name: str, sources: tuple[Tensor, ...], compute, extra: tuple = ()) -> Tensor:
        """``compute()``, remembered under ``name`` while every tensor of ``sources`` is unchanged (its key)."""
        keys = tuple(_tensor_key(t) for t in sources)
        if any(k is None for k in keys):
            return compute()
        key = (*extra, *keys)
        entry = self.__dict__.get(name)
        if entry is not None and entry[0] == key and (not entry[1].is_inference() or torch.is_inference_mode_enabled()):
            return entry[1]
        value = compute()
        self.__dict__[name] = (key, value)
        return value

    def _w0_cached(self, name: str, acc: torch.dtype, compute) -> Tensor:
        """``compute()`` of the frozen W0 (no gradient flows to it), cached while W0 is unchanged."""
        weight = self._parameters.get("weight")  # None when the weight is parametrised: computed each time
        if weight is None or weight.requires_grad or torch.compiler.is_compiling():
            return compute()
        return self._cached(name, (weight,), compute, extra=(acc,))

    def _initial_magnitude(self, dtype: torch.dtype | None = None) -> Tensor:
        """``‖W0‖`` per row, bitwise what :meth:`weight_norm` gives with ``B = 0`` (the factored ``n²`` is then
        ``‖W0‖² + 0 + 0``): the value of a fresh DoRA magnitude, in ``dtype`` (the magnitude's by default)."""
        weight, a = self.base_weight(), self.lora_A
        acc = _accumulation_dtype(torch.promote_types(weight.dtype, a.dtype))
        with _full_precision_region(weight.device):
            w0_sq = self._base_row_norm_sq(acc)
            norm = self._floored_sqrt(w0_sq, w0_sq, acc, a.dtype)
        return norm.to(dtype or self.magnitude.dtype)

    @torch.no_grad()
    def _follow_w0(self) -> None:
        """A DoRA magnitude still at its initial value (never trained, set or loaded) is the initial value *for the
        current W0*: re-initialise it after W0 changed (pretrained weights loaded after ``apply_adapters``, a dtype
        move), so the layer is its base layer at step 0 whatever the order. Once the magnitude differs from the value
        it was initialised with (an optimiser step), or was itself in a loaded state dict, it is never touched."""
        self._w0_seen = self._w0_key()
        if self._w0_seen is None or not self.decomposed or self.merged:  # no key: a functorch wrapper, nothing to do
            return
        init = self.__dict__.get("_magnitude_init")
        magnitude, weight = self._parameters.get("magnitude"), self._parameters.get("weight")
        if init is None or magnitude is None or weight is None or weight.requires_grad:
            return
        if weight.is_meta or magnitude.is_meta:
            return
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(magnitude, dtensor) != isinstance(init, dtensor):
            if not isinstance(magnitude, dtensor):
                return  # an FSDP2 forward (unsharded magnitude, sharded record): loads follow on the sharded tensors
            if not _same_values(magnitude.full_tensor(), init):  # sharded after adapting: the record is whole
                return
        elif not _same_values(magnitude, init):
            return
        value = self._initial_magnitude(magnitude.dtype)
        if not _same_values(value, magnitude):
            magnitude.copy_(value)
        self._magnitude_init = value

    def _check_w0(self) -> None:
        """Eager forwards only: follow W0 when it changed since the layer last looked (a cheap key comparison)."""
        if self._undefined and not self._define_adapter():
            return
        key = self._w0_key()
        if key is not None and key != self._w0_seen:
            self._follow_w0()

    def refresh(self) -> None:
        """Recompute everything derived from the weights: after writes autograd cannot see (``.data`` writes, fused
        optimisers, collectives). See :func:`loralib.refresh`."""
        self._invalidate_caches()
        self._define_adapter()
        self._follow_w0()

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / .cuda() / to_empty / share_memory_: the weights may move to memory a freed tensor had
        # (a float -> half -> float round trip can land where it started, same version), so forget every cache; the
        # stored initial magnitude is converted exactly as the magnitude is, so the two stay comparable bitwise.
        # torch's to_empty (and any move of a meta W0, which only to_empty can do): memory without values, for W0
        # as for the adapter, which is then initialised (its magnitude follows W0 when W0 is loaded)
        emptied = getattr(fn, "__qualname__", "") == "Module.to_empty.<locals>.<lambda>" or (
            bool(self._undefined) and self.base_weight().is_meta
        )
        module = super()._apply(fn, recurse)
        for name in ("_magnitude_init", "_merge_scale"):
            value = self.__dict__.get(name)
            if value is not None:
                self.__dict__[name] = fn(value)
        if emptied and not self.base_weight().is_meta:
            self.merged, self._merge_scale = False, None  # the memory holds no merged weight either
            self._undefined = frozenset(self._adapter_names())
            self._define_adapter(materialised=True)
        self._invalidate_caches()
        self._w0_seen = None  # the next forward (or load) looks at W0 again
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

        def loaded(name: str) -> bool:
            # torch.distributed.checkpoint's set_model_state_dict fills the keys its state dict lacks with the
            # model's own tensors: a parameter "loaded" from itself received nothing
            value = state_dict.get(prefix + name)
            return value is not None and value is not self._parameters.get(name)

        if self._undefined:
            self._undefined = frozenset(n for n in self._undefined if not loaded(n))
        if self.decomposed and loaded("magnitude"):
            self._magnitude_init = None  # the user's magnitude: never re-initialised
        self._invalidate_caches()
        self._check_w0()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._define_adapter()  # values for a layer built on the meta device whose W0 has them now (never garbage)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def train(self, mode: bool = True):
        # The eval-mode norm cache is keyed on the version counters of A, B and W0, which fused optimisers
        # (transformers' default adamw_torch_fused) do not bump: every change of mode starts it afresh.
        self._norm_cache = None
        module = super().train(mode)
        self._define_adapter()  # transformers' from_pretrained ends with eval(): a layer built in __init__ gets values
        return module

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, method={self.method}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
        )

    # ---- layer-type specific hooks (overridden below) -------------------------------------------------------
    def base_weight(self) -> Tensor:
        """The frozen weight ``W0`` as an ``(out, in)`` view."""
        raise NotImplementedError

    def _set_base_weight(self, weight_out_in: Tensor) -> None:
        raise NotImplementedError

    def _base_forward(self, x: Tensor) -> Tensor:
        """What the unadapted layer returns for ``x`` (``W0 x + b``), computed exactly the way it computes it."""
        raise NotImplementedError

    def _adapter_input(self, x: Tensor) -> Tensor:
        """``A drop(x)``, shape ``(..., r)``."""
        raise NotImplementedError

    def _bias(self) -> Tensor | None:
        return self.bias

    # ---- the math ---------------------------------------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """``s · B A`` as an ``(out, in)`` matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def weight_norm(self) -> Tensor:
        """``‖W0 + s·BA‖`` per output row, factored (see the module docstring), differentiable in A and B."""
        return self._norm_terms()[0]

    def _norm_terms(self) -> tuple[Tensor, Tensor]:
        """``(n, C)`` with ``C = W0 Aᵀ`` (out × r), both in the accumulation dtype (the regulariser reuses ``C``)."""
        weight, a, b, s = self.base_weight(), self.lora_A, self.lora_B, self.scaling
        acc = _accumulation_dtype(torch.promote_types(weight.dtype, a.dtype))
        adapter_dtype = a.dtype
        with _full_precision_region(weight.device):
            w0_sq = self._base_row_norm_sq(acc)
            weight, a, b = weight.to(acc), a.to(acc), b.to(acc)
            w0_at = weight @ a.T
            cross = (w0_at * b).sum(dim=1)
            quad = ((b @ (a @ a.T)) * b).sum(dim=1)
            n_sq = w0_sq + (2.0 * s) * cross + (s * s) * quad
            return self._floored_sqrt(n_sq, w0_sq, acc, adapter_dtype), w0_at

    @staticmethod
    def _floored_sqrt(n_sq: Tensor, w0_sq: Tensor, acc: torch.dtype, adapter_dtype: torch.dtype) -> Tensor:
        # The floor keeps n (and m = n at init) a normal number of the magnitude's dtype: in fp16 an all-zero row
        # would otherwise give m = 0 and m / n = 0 / 0.
        tiny = max(torch.finfo(acc).tiny, torch.finfo(adapter_dtype).tiny ** 2)
        floor = torch.finfo(acc).eps * w0_sq + tiny
        return n_sq.clamp_min(floor).sqrt()

    def _base_row_norm_sq(self, acc: torch.dtype) -> Tensor:
        """``‖W0‖²`` per row in ``acc``. W0 is frozen in fine-tuning: cached (else a full pass over W0 per step)."""
        return self._w0_cached(
            "_w0_sq_cache", acc, lambda: torch.linalg.vector_norm(self.base_weight().to(acc), dim=1).square()
        )

    def orthogonality_distance(self, terms: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``‖V̂ V̂ᵀ − I‖_F`` for the unit direction rows ``V̂ = D⁻¹ V``, ``V = W0 + s·BA``, ``D = diag(n)``.

        Never forms ``V̂`` or any ``(out, out)`` matrix that autograd has to keep. With ``C = W0 Aᵀ``,
        ``Q = [C, B]`` (out × 2r) and ``S = [[0, s·I], [s·I, s²·AAᵀ]]``, ``V Vᵀ = P + Q S Qᵀ`` where ``P = W0 W0ᵀ``
        is constant while W0 is frozen. With ``u = 1 / n²``::

            ‖D⁻¹ V Vᵀ D⁻¹‖²_F = uᵀ (P∘P) u + 2·Σ S ∘ (Rᵀ P R) + tr(S T S T),   R = diag(u) Q,  T = Qᵀ diag(u) Q
            ‖G − I‖²_F = ‖G‖²_F − 2·tr G + out,                              tr G = Σ u_i (P_ii + (Q S Qᵀ)_ii)

        Cost: ``out²·2r`` per step plus the cached ``P`` and ``P∘P`` (``2·out²`` floats per layer). The sum cancels
        ``out`` against ``‖G‖²_F ≈ out + Σ_{i≠j} cos²_ij``: accurate while the rows are far from orthonormal (as
        pretrained weights are); it is clamped at zero so it can never turn negative by rounding.

        ``terms``: ``(n, W0 Aᵀ)`` recorded by a forward of this layer at the *current* parameters (see
        ``loralib.model.capture_norm_terms``); reusing them saves the rank-r pass over ``W0``, and since they belong
        to that forward's graph the value and the gradient are the same. Ignored (recomputed) when ``n`` carries no
        gradient, e.g. a forward run under ``no_grad`` by reentrant gradient checkpointing.
        """
        weight, a, b, s = self.base_weight(), self.lora_A, self.lora_B, self.scaling
        acc = _accumulation_dtype(torch.promote_types(weight.dtype, a.dtype))
        if terms is None or not terms[0].requires_grad:
            terms = self._norm_terms()
        with _full_precision_region(weight.device):
            return self._orthogonality_distance(weight, a.to(acc), b.to(acc), s, acc, *terms)

    def _orthogonality_distance(
        self, weight: Tensor, a: Tensor, b: Tensor, s: float, acc: torch.dtype, norm: Tensor, w0_at: Tensor
    ) -> Tensor:
        gram = self._w0_cached("_w0_gram_cache", acc, lambda: weight.to(acc) @ weight.to(acc).T)
        gram_sq = self._w0_cached("_w0_gram_sq_cache", acc, lambda: gram.square())
        r = self.r
        eye = torch.eye(r, dtype=acc, device=a.device)
        mix = torch.cat([torch.cat([torch.zeros_like(eye), s * eye], 1), torch.cat([s * eye, (s * s) * (a @ a.T)], 1)])
        q = torch.cat([w0_at, b], dim=1)  # (out, 2r)
        u = norm.to(acc).square().reciprocal()
        scaled = u.unsqueeze(1) * q
        t = q.T @ scaled
        frob_sq = u @ (gram_sq @ u) + 2.0 * (mix * (scaled.T @ (gram @ scaled))).sum() + (mix @ t @ mix @ t).trace()
        trace = (u * (gram.diagonal() + ((q @ mix) * q).sum(dim=1))).sum()
        return (frob_sq - 2.0 * trace + weight.shape[0]).clamp_min(0.0).sqrt()

    def direction(self) -> Tensor:
        """The normalised direction ``(W0 + s·BA) / n`` as a dense ``(out, in)`` matrix (rows of unit norm)."""
        adapted = self.base_weight() + self.delta_weight()
        return adapted / self.weight_norm().to(adapted.dtype).unsqueeze(1)

    def _norm_for_forward(self) -> Tensor:
        if not torch.compiler.is_compiling():
            self._check_w0()  # W0 changed since the last look (a load, copy_, a dtype move): follow it
        norm_needs_grad = torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        if self.training or norm_needs_grad or torch.compiler.is_compiling():
            self._norm_cache = None  # a step may follow, and fused optimisers update A, B without a version bump
            norm, w0_at = self._norm_terms()
            if self._norm_terms_sink is not None:  # inside capture_norm_terms only
                self._record_norm_terms(norm, w0_at)
            return norm.detach() if self.detach_norm else norm
        # Inference: the norm only changes when A, B or W0 change; reuse it so DoRA costs what LoRA costs.
        with torch.no_grad():
            sources = (self.lora_A, self.lora_B, self._parameters.get("weight"))
            return self._cached("_norm_cache", sources, self.weight_norm)

    def _record_norm_terms(self, norm: Tensor, w0_at: Tensor) -> None:
        # A layer run several times in one forward (shared weights) computes the same terms each time; keep one that
        # carries a gradient if any does (a no_grad run, e.g. reentrant checkpointing, must not replace it).
        sink = self._norm_terms_sink
        if norm.requires_grad or self not in sink:
            sink[self] = (norm, w0_at)

    def forward(self, x: Tensor) -> Tensor:
        # The base output is the unadapted layer's own (bias included, same kernels, same autocast behaviour), so an
        # adapter at its initial state returns exactly what the pretrained layer returns, in every dtype.
        if not torch.compiler.is_compiling():
            if self._undefined:
                self._require_defined("run a forward")
            self._check_shape()
        base = self._base_forward(x)
        if self.merged or self.adapter_disabled:
            return base
        # s is applied to the rank-r activations (cheap), and the add is fused into the B matmul (addmm).
        low_rank = self._adapter_input(x) * self.scaling
        flat = base.reshape(-1, base.shape[-1])
        if low_rank.dtype == base.dtype and self._base_op_autocasts:
            out = torch.addmm(flat, low_rank.reshape(-1, self.r), self.lora_B.T)
        else:  # fp32 adapters on a half base outside autocast, or a base op that autocast leaves alone (embedding):
            with _full_precision_region(flat.device):  # add in fp32, round once to the base layer's dtype
                out = torch.addmm(flat.to(low_rank.dtype), low_rank.reshape(-1, self.r), self.lora_B.T)
            out = out.to(base.dtype)
        out = out.view(base.shape)
        if not self.decomposed:
            return out
        if self.magnitude_is_upper_level and self.training and self.magnitude.requires_grad:
            self._check_joint_magnitude_training()
        norm = self._norm_for_forward()
        scale = self._scale(norm).to(out.dtype)
        bias = self._bias()
        if bias is None:
            return out * scale
        # (m/n) ⊙ (W0 x + ΔW x) + b, written around the biased base output: out·scale + b·(1 − scale).
        return torch.addcmul(bias.to(out.dtype) * (1 - scale), out, scale)

    def _check_joint_magnitude_training(self) -> None:
        if torch.is_grad_enabled() and not self.joint_magnitude_training:
            raise RuntimeError(
                "a BiDoRA layer is training its magnitude together with its direction, which is DoRA, not BiDoRA: "
                "train BiDoRA models with loralib.BiDoRATrainer (the magnitudes are its upper level). A custom loop "
                "that means to train both jointly says so with loralib.allow_joint_magnitude_training(model)."
            )

    # ---- merge --------------------------------------------------------------------------------------------------
    def _merge_dtype(self) -> torch.dtype:
        return _accumulation_dtype(torch.promote_types(self.base_weight().dtype, self.lora_A.dtype))

    def _magnitude_scale(self) -> Tensor:
        """``m / n`` per output row, in the merge dtype (at least float32)."""
        self._check_w0()  # a merge right after W0 changed: the magnitude follows first, as in a forward
        return self._scale(self.weight_norm())

    def _scale(self, norm: Tensor) -> Tensor:
        """``m / n`` per output row in ``n``'s dtype (the accumulation dtype). A half-precision magnitude
        (``autocast_adapter_dtype=False`` on a half base, or a model converted with ``.half()``) holds ``‖W0‖``
        rounded to its precision, so it meets ``n`` rounded the same way: ``m / n`` is then exactly 1 at
        initialisation, as with a full-precision magnitude (the rounding is invisible to the gradient)."""
        magnitude = self.magnitude
        if magnitude.dtype in _HALF_DTYPES and norm.dtype != magnitude.dtype:
            norm = norm + (norm.to(magnitude.dtype).to(norm.dtype) - norm).detach()
        return magnitude.to(norm.dtype) / norm

    def merged_weight(self) -> Tensor:
        """The single ``(out, in)`` weight equivalent to this layer (without bias), in the base weight's dtype.

        Computed in at least float32 and rounded once to the base dtype, so a bf16 model stays bf16."""
        weight = self.base_weight()
        if self.merged:
            return weight.detach().clone()
        self._require_defined("merge")
        self._check_shape()
        acc = self._merge_dtype()
        with _full_precision_region(weight.device):
            adapted = weight.to(acc) + self.delta_weight().to(acc)
            if self.decomposed:
                adapted = adapted * self._magnitude_scale().to(acc).unsqueeze(1)
        return adapted.to(weight.dtype).detach()

    @torch.no_grad()
    def merge(self) -> bool:
        """Fold the adapter into ``weight``. Returns False (and changes nothing) when already merged.

        Raises:
            ValueError: the result would be non-finite, or (DoRA) ``m / n`` is zero or non-finite for a row.
        """
        if self.merged:
            return False
        if self.adapter_disabled:
            raise RuntimeError("cannot merge inside loralib.disable_adapters: leave the with-block first")
        self._require_defined("merge")
        scale = None
        if self.decomposed:
            with _full_precision_region(self.base_weight().device):
                scale = self._magnitude_scale().to(self._merge_dtype())
            if not torch.all(torch.isfinite(scale)) or torch.any(scale == 0):
                raise ValueError("cannot merge: magnitude / norm is zero or non-finite for some output rows")
        merged = self.merged_weight()
        if not torch.all(torch.isfinite(merged)):
            raise ValueError("merge produced non-finite weights; the adapter or base weight is corrupted")
        self._set_base_weight(merged)
        self._merge_scale = scale
        self.merged = True
        self._invalidate_caches()
        self._w0_seen = self._w0_key()  # our own write: the magnitude does not follow it
        return True

    @torch.no_grad()
    def unmerge(self) -> bool:
        """Undo :meth:`merge` (exact up to rounding). Returns False when not merged."""
        if not self.merged:
            return False
        weight = self.base_weight()
        acc = self._merge_dtype()
        with _full_precision_region(weight.device):
            restored = weight.to(acc)
            if self.decomposed:
                if self._merge_scale is None:
                    raise RuntimeError("merged DoRA layer has no stored merge scale; cannot unmerge")
                restored = restored / self._merge_scale.to(device=restored.device, dtype=acc).unsqueeze(1)
            restored = restored - self.delta_weight().to(acc)
        self._set_base_weight(restored)
        self._merge_scale = None
        self.merged = False
        self._invalidate_caches()
        self._w0_seen = self._w0_key()
        return True

    def make_base_module(self) -> nn.Module:
        """A plain module of the base type carrying the merged weight (for ``merge_and_unload``)."""
        raise NotImplementedError

    # Merge state is serialised with the state dict, so a saved merged model cannot be merged twice after loading.
    # It is one float64 tensor, ``[merged, *merge_scale]``, because safetensors (and so ``save_pretrained`` and
    # transformers' Trainer checkpoints) store tensors only; float64 holds an fp32 / fp64 scale exactly.
    def get_extra_state(self) -> Tensor:
        flag = torch.tensor([1.0 if self.merged else 0.0], dtype=torch.float64)
        if self._merge_scale is None:
            return flag
        return torch.cat([flag, self._merge_scale.detach().to(device="cpu", dtype=torch.float64)])

    def set_extra_state(self, state: Tensor | dict) -> None:
        if type(state).__name__ == "_EXTRA_STATE":
            # torch.distributed.checkpoint's set_model_state_dict (full state dict, strict=False) passes this
            # placeholder for an extra-state key its state dict lacks (base weights only): nothing to load
            return
        if not isinstance(state, (dict, Tensor)):
            raise TypeError(f"{type(self).__name__}: saved merge state is a {type(state).__name__}, not a tensor")
        if isinstance(state, dict):  # written by loralib 0.1.0
            merged, scale = bool(state.get("merged", False)), state.get("merge_scale")
        else:
            state = torch.as_tensor(state)
            if state.ndim != 1 or state.numel() not in (1, 1 + self.base_weight().shape[0]):
                raise ValueError(
                    f"{type(self).__name__}: saved merge state has shape {tuple(state.shape)}, expected (1,) or "
                    f"({1 + self.base_weight().shape[0]},); it was saved from another layer"
                )
            merged, scale = bool(state[0].item()), (state[1:] if state.numel() > 1 else None)
        if merged and self.decomposed and scale is None:
            raise ValueError(f"{type(self).__name__}: saved state says merged but holds no merge scale")
        weight = self.base_weight()
        self.merged = merged
        device = "cpu" if weight.is_meta else weight.device  # a meta W0 gets memory later: keep the value on the CPU
        self._merge_scale = None if scale is None else scale.to(device=device, dtype=self._merge_dtype())
        self._invalidate_caches()


class WeightsFollower:
    """A ``load_state_dict`` post-hook that :func:`loralib.apply_adapters` registers on the model: once the whole
    state dict is in, every DoRA magnitude still at its initial value follows its (possibly newly loaded) W0. The
    layers also look after their own load; this catches W0 loaded through another module (tied weights). A class,
    not a closure, so that a hooked model deep-copies and pickles."""

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        for layer in module.modules():
            if isinstance(layer, AdapterLayer):
                layer._check_w0()


# ------------------------------------------------------------------------------------------------------------------
# nn.Linear
# ------------------------------------------------------------------------------------------------------------------
class LoRALinear(AdapterLayer, nn.Linear):
    """``nn.Linear`` with a LoRA adapter. ``weight`` is ``(out, in)`` as in PyTorch."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int,
        device=None,
        dtype=None,
        **adapter_kwargs,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter(r, **adapter_kwargs)

    @classmethod
    def from_base(cls, base: nn.Linear, *, r: int, **adapter_kwargs) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, sharing (not copying) its ``weight`` and ``bias``."""
        layer = cls.__new__(cls)
        with torch.device("meta"):
            nn.Linear.__init__(layer, base.in_features, base.out_features, bias=base.bias is not None)
        layer.weight, layer.bias = base.weight, base.bias
        layer.train(base.training)
        layer._init_adapter(r, **adapter_kwargs)
        return layer

    def base_weight(self) -> Tensor:
        return self.weight

    def _set_base_weight(self, weight_out_in: Tensor) -> None:
        self.weight.copy_(weight_out_in)

    def _base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _adapter_input(self, x: Tensor) -> Tensor:
        return F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)

    def make_base_module(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter(self.merged_weight().clone(), requires_grad=False)
        plain.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return plain


class DoRALinear(LoRALinear):
    """``nn.Linear`` with DoRA: ``y = (m / ‖W0 + s·BA‖) ⊙ (W0 x + s·B A drop(x)) + b``."""

    decomposed = True
    method = "dora"


class BiDoRALinear(DoRALinear):
    """DoRA math; ``magnitude`` is trained by the upper level of the bi-level problem (see ``loralib.bilevel``)."""

    method = "bidora"
    magnitude_is_upper_level = True


# ------------------------------------------------------------------------------------------------------------------
# transformers' Conv1D (GPT-2): weight stored (in, out), y = x @ weight + bias
# ------------------------------------------------------------------------------------------------------------------
class LoRAConv1D(AdapterLayer, Conv1D):
    """transformers ``Conv1D`` (fan_in_fan_out weight ``(in, out)``) with a LoRA adapter."""

    def __init__(self, nf: int, nx: int, *, r: int, **adapter_kwargs) -> None:
        Conv1D.__init__(self, nf, nx)
        self._init_adapter(r, **adapter_kwargs)

    @classmethod
    def from_base(cls, base: Conv1D, *, r: int, **adapter_kwargs) -> LoRAConv1D:
        layer = cls.__new__(cls)
        with torch.device("meta"):
            Conv1D.__init__(layer, base.nf, base.weight.shape[0])
        layer.weight, layer.bias = base.weight, base.bias
        layer.train(base.training)
        layer._init_adapter(r, **adapter_kwargs)
        return layer

    def base_weight(self) -> Tensor:
        return self.weight.T

    def _set_base_weight(self, weight_out_in: Tensor) -> None:
        self.weight.copy_(weight_out_in.T)

    def _base_forward(self, x: Tensor) -> Tensor:
        # Conv1D.forward's own kernel (addmm with the bias), with reshape so that non-contiguous inputs work too.
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)

    def _adapter_input(self, x: Tensor) -> Tensor:
        return F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)

    def make_base_module(self) -> Conv1D:
        with torch.device("meta"):
            plain = Conv1D(self.nf, self.weight.shape[0])
        plain.weight = nn.Parameter(self.merged_weight().T.contiguous(), requires_grad=False)
        plain.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return plain


class DoRAConv1D(LoRAConv1D):
    decomposed = True
    method = "dora"


class BiDoRAConv1D(DoRAConv1D):
    method = "bidora"
    magnitude_is_upper_level = True


# ------------------------------------------------------------------------------------------------------------------
# nn.Embedding: a linear map from one-hot ids, W0 = weightᵀ with shape (embedding_dim, num_embeddings)
# ------------------------------------------------------------------------------------------------------------------
class LoRAEmbedding(AdapterLayer, nn.Embedding):
    """``nn.Embedding`` with a LoRA adapter. Seen as a linear map of one-hot ids, ``W0 = weightᵀ`` is
    ``(embedding_dim, num_embeddings)``; ``lora_A`` is ``(r, num_embeddings)``, ``lora_B`` ``(embedding_dim, r)``.
    Dropout is never applied (the input is token ids)."""

    _base_op_autocasts = False

    def __init__(
        self, num_embeddings: int, embedding_dim: int, *, r: int, padding_idx: int | None = None, **adapter_kwargs
    ) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx=padding_idx)
        self._init_adapter(r, **adapter_kwargs)

    @classmethod
    def from_base(cls, base: nn.Embedding, *, r: int, **adapter_kwargs) -> LoRAEmbedding:
        if base.max_norm is not None:
            raise ValueError("embeddings with max_norm rewrite their weight in place and cannot be adapted")
        layer = cls.__new__(cls)
        with torch.device("meta"):
            nn.Embedding.__init__(
                layer,
                base.num_embeddings,
                base.embedding_dim,
                padding_idx=base.padding_idx,
                scale_grad_by_freq=base.scale_grad_by_freq,
                sparse=base.sparse,
            )
        layer.weight = base.weight
        layer.train(base.training)
        layer._init_adapter(r, **adapter_kwargs)
        return layer

    def _init_adapter(self, r: int, **adapter_kwargs) -> None:
        adapter_kwargs = {**adapter_kwargs, "lora_dropout": 0.0}
        super()._init_adapter(r, **adapter_kwargs)

    def _bias(self) -> Tensor | None:
        return None

    def base_weight(self) -> Tensor:
        return self.weight.T

    def _set_base_weight(self, weight_out_in: Tensor) -> None:
        self.weight.copy_(weight_out_in.T)

    def _embed(self, ids: Tensor, table: Tensor) -> Tensor:
        return F.embedding(ids, table, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)

    def _base_forward(self, x: Tensor) -> Tensor:
        return self._embed(x, self.weight)

    def _adapter_input(self, x: Tensor) -> Tensor:
        return self._embed(x, self.lora_A.T)

    def make_base_module(self) -> nn.Embedding:
        with torch.device("meta"):
            plain = nn.Embedding(
                self.num_embeddings,
                self.embedding_dim,
                padding_idx=self.padding_idx,
                scale_grad_by_freq=self.scale_grad_by_freq,
                sparse=self.sparse,
            )
        plain.weight = nn.Parameter(self.merged_weight().T.contiguous(), requires_grad=False)
        return plain


class DoRAEmbedding(LoRAEmbedding):
    decomposed = True
    method = "dora"
