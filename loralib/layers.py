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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

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


def _validate(r: int, lora_alpha: float, lora_dropout: float, init_lora_weights: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"r must be a positive integer, got {r!r} ({type(r).__name__})")
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got {r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    if lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha}")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if init_lora_weights not in ("kaiming", "gaussian"):
        raise ValueError(f"init_lora_weights must be 'kaiming' or 'gaussian', got {init_lora_weights!r}")


class AdapterLayer(nn.Module):
    """Mixin holding the adapter parameters and the forward / merge math shared by every layer type.

    Subclasses provide :meth:`base_weight`, :meth:`_set_base_weight`, :meth:`_base_matmul` (``W0 x`` without bias)
    and :meth:`_adapter_input` (``A drop(x)``, shape ``(..., r)``).
    """

    #: True for DoRA / BiDoRA (a trainable ``magnitude`` rescales each output row).
    decomposed: bool = False
    #: "lora" | "dora" | "bidora"; also the name used in saved configs.
    method: str = "lora"

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
    ) -> None:
        _validate(r, lora_alpha, lora_dropout, init_lora_weights)
        weight = self.base_weight()
        out_features, in_features = weight.shape
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.init_lora_weights = init_lora_weights
        self.detach_norm = bool(detach_norm)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self._merge_scale: Tensor | None = None  # m / n at merge time (DoRA), needed to unmerge
        self._norm_cache: tuple[tuple[int, ...], Tensor] | None = None
        self.reset_adapter_parameters()
        if self.decomposed:
            with torch.no_grad():
                norm = self.weight_norm()  # equals ‖W0‖_row exactly the way the forward computes it: m / n = 1
            self.magnitude = nn.Parameter(norm.to(weight.dtype))

    def reset_adapter_parameters(self) -> None:
        """Re-initialise the direction: A random (Kaiming-uniform or Gaussian), B zero (so ΔW = 0)."""
        with torch.no_grad():
            if self.init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        self._norm_cache = None

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

    def _base_matmul(self, x: Tensor) -> Tensor:
        """``W0 x`` without bias, in the layer's own layout."""
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
        weight, a, b, s = self.base_weight(), self.lora_A, self.lora_B, self.scaling
        acc = torch.promote_types(weight.dtype, torch.float32)
        weight, a, b = weight.to(acc), a.to(acc), b.to(acc)
        w0_sq = self._base_row_norm_sq(weight)
        cross = ((weight @ a.T) * b).sum(dim=1)
        quad = ((b @ (a @ a.T)) * b).sum(dim=1)
        n_sq = w0_sq + (2.0 * s) * cross + (s * s) * quad
        floor = torch.finfo(acc).eps * w0_sq + torch.finfo(acc).tiny
        return n_sq.clamp_min(floor).sqrt()

    def _base_row_norm_sq(self, weight: Tensor) -> Tensor:
        """``‖W0‖²`` per row. W0 is frozen in fine-tuning: cache it (a full pass over W0 per step otherwise)."""
        return self._cached("_w0_sq_cache", weight, lambda w: torch.linalg.vector_norm(w, dim=1).square())

    def _cached(self, name: str, weight: Tensor, compute) -> Tensor:
        """``compute(weight)``, cached while the frozen ``weight`` is unchanged (same storage and version)."""
        if weight.requires_grad or torch.compiler.is_compiling():
            return compute(weight)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cache = self.__dict__.get(name)
        if cache is None or cache[0] != key:
            cache = (key, compute(weight))
            self.__dict__[name] = cache
        return cache[1]

    def orthogonality_distance(self) -> Tensor:
        """``‖V̂ V̂ᵀ − I‖_F`` for the unit direction rows ``V̂ = D⁻¹ V``, ``V = W0 + s·BA``, ``D = diag(n)``.

        Never forms ``V̂`` or any ``(out, out)`` matrix that autograd has to keep. With ``C = W0 Aᵀ``,
        ``Q = [C, B]`` (out × 2r) and ``S = [[0, s·I], [s·I, s²·AAᵀ]]``, ``V Vᵀ = P + Q S Qᵀ`` where ``P = W0 W0ᵀ``
        is constant while W0 is frozen. With ``u = 1 / n²``::

            ‖D⁻¹ V Vᵀ D⁻¹‖²_F = uᵀ (P∘P) u + 2·Σ S ∘ (Rᵀ P R) + tr(S T S T),   R = diag(u) Q,  T = Qᵀ diag(u) Q
            ‖G − I‖²_F = ‖G‖²_F − 2·tr G + out,                              tr G = Σ u_i (P_ii + (Q S Qᵀ)_ii)

        Cost: ``out²·2r`` per step plus the cached ``P`` and ``P∘P`` (``2·out²`` floats per layer). The sum cancels
        ``out`` against ``‖G‖²_F ≈ out + Σ_{i≠j} cos²_ij``: accurate while the rows are far from orthonormal (as
        pretrained weights are); it is clamped at zero so it can never turn negative by rounding.
        """
        weight, a, b, s = self.base_weight(), self.lora_A, self.lora_B, self.scaling
        acc = torch.promote_types(weight.dtype, torch.float32)
        a, b = a.to(acc), b.to(acc)
        gram = self._cached("_w0_gram_cache", weight, lambda w: w.to(acc) @ w.to(acc).T)
        gram_sq = self._cached("_w0_gram_sq_cache", weight, lambda w: gram.square())
        r = self.r
        eye = torch.eye(r, dtype=acc, device=a.device)
        mix = torch.cat([torch.cat([torch.zeros_like(eye), s * eye], 1), torch.cat([s * eye, (s * s) * (a @ a.T)], 1)])
        q = torch.cat([weight.to(acc) @ a.T, b], dim=1)  # (out, 2r)
        u = self.weight_norm().to(acc).square().reciprocal()
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
        norm_needs_grad = torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        if self.training or norm_needs_grad or torch.compiler.is_compiling():
            norm = self.weight_norm()
            return norm.detach() if self.detach_norm else norm
        # Inference: the norm only changes when A, B or W0 change; reuse it so DoRA costs what LoRA costs.
        weight = self.base_weight()
        key = tuple(
            v for t in (self.lora_A, self.lora_B, weight) for v in (t.data_ptr(), t._version, t.device.index or -1)
        )
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                self._norm_cache = (key, self.weight_norm())
        return self._norm_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        bias = self._bias()
        if self.merged:
            out = self._base_matmul(x)
            return out if bias is None else out + bias
        base = self._base_matmul(x)
        # s is applied to the rank-r activations (cheap), and the add is fused into the B matmul (addmm).
        low_rank = self._adapter_input(x) * self.scaling
        out = torch.addmm(base.reshape(-1, base.shape[-1]), low_rank.reshape(-1, self.r), self.lora_B.T)
        out = out.view(base.shape)
        if self.decomposed:
            scale = (self.magnitude / self._norm_for_forward().to(self.magnitude.dtype)).to(out.dtype)
            return out * scale if bias is None else torch.addcmul(bias, out, scale)
        return out if bias is None else out + bias

    # ---- merge --------------------------------------------------------------------------------------------------
    def merged_weight(self) -> Tensor:
        """The single ``(out, in)`` weight equivalent to this layer (without bias)."""
        weight = self.base_weight()
        if self.merged:
            return weight.detach().clone()
        adapted = weight + self.delta_weight()
        if self.decomposed:
            adapted = adapted * (self.magnitude / self.weight_norm()).to(adapted.dtype).unsqueeze(1)
        return adapted.detach()

    @torch.no_grad()
    def merge(self) -> bool:
        """Fold the adapter into ``weight``. Returns False (and changes nothing) when already merged."""
        if self.merged:
            return False
        scale = None
        if self.decomposed:
            scale = (self.magnitude / self.weight_norm()).to(self.base_weight().dtype)
            if not torch.all(torch.isfinite(scale)) or torch.any(scale == 0):
                raise ValueError("cannot merge: magnitude / norm is zero or non-finite for some output rows")
        merged = self.merged_weight()
        if not torch.all(torch.isfinite(merged)):
            raise ValueError("merge produced non-finite weights; the adapter or base weight is corrupted")
        self._set_base_weight(merged)
        self._merge_scale = scale
        self.merged = True
        self._norm_cache = None
        return True

    @torch.no_grad()
    def unmerge(self) -> bool:
        """Undo :meth:`merge` (exact up to rounding). Returns False when not merged."""
        if not self.merged:
            return False
        weight = self.base_weight()
        if self.decomposed:
            if self._merge_scale is None:
                raise RuntimeError("merged DoRA layer has no stored merge scale; cannot unmerge")
            weight = weight / self._merge_scale.unsqueeze(1)
        restored = weight - self.delta_weight()
        self._set_base_weight(restored)
        self._merge_scale = None
        self.merged = False
        self._norm_cache = None
        return True

    def make_base_module(self) -> nn.Module:
        """A plain module of the base type carrying the merged weight (for ``merge_and_unload``)."""
        raise NotImplementedError

    # Merge state is serialised with the state dict, so a saved merged model cannot be merged twice after loading.
    def get_extra_state(self) -> dict:
        return {"merged": self.merged, "merge_scale": self._merge_scale}

    def set_extra_state(self, state: dict) -> None:
        self.merged = bool(state.get("merged", False))
        self._merge_scale = state.get("merge_scale")
        self._norm_cache = None


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
        self.weight.data.copy_(weight_out_in)

    def _base_matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def _adapter_input(self, x: Tensor) -> Tensor:
        return F.linear(self.lora_dropout(x), self.lora_A)

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
        self.weight.data.copy_(weight_out_in.T)

    def _base_matmul(self, x: Tensor) -> Tensor:
        return x @ self.weight

    def _adapter_input(self, x: Tensor) -> Tensor:
        return F.linear(self.lora_dropout(x), self.lora_A)

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


# ------------------------------------------------------------------------------------------------------------------
# nn.Embedding: a linear map from one-hot ids, W0 = weightᵀ with shape (embedding_dim, num_embeddings)
# ------------------------------------------------------------------------------------------------------------------
class LoRAEmbedding(AdapterLayer, nn.Embedding):
    """``nn.Embedding`` with a LoRA adapter. Seen as a linear map of one-hot ids, ``W0 = weightᵀ`` is
    ``(embedding_dim, num_embeddings)``; ``lora_A`` is ``(r, num_embeddings)``, ``lora_B`` ``(embedding_dim, r)``.
    Dropout is never applied (the input is token ids)."""

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
        self.weight.data.copy_(weight_out_in.T)

    def _embed(self, ids: Tensor, table: Tensor) -> Tensor:
        return F.embedding(ids, table, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)

    def _base_matmul(self, x: Tensor) -> Tensor:
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
