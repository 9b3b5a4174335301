"""State that follows the weights (issue 20, items 4, 6, 7).

Every route by which the base weights W0 change under the adapters is checked against an independent reference:
the same model built the right way round (pretrained weights first, then ``apply_adapters``), bitwise, in float32
and bfloat16, outputs and DoRA magnitudes; for routes that change W0 of a trained layer, a layer rebuilt from the
current weights. Also: quantised tensor subclasses refused and DTensor bases allowed, ``disable_adapters`` against the
unadapted model and ``print_trainable_parameters`` against counts made by hand.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import loralib
from loralib.model import _LAYER_CLASSES
from tests.helpers import tiny_gpt2, tiny_roberta, token_batch

TARGETS = ["query", "value", "intermediate.dense"]
DTYPES = [torch.float32, torch.bfloat16]


def adapt(model, method, seed=5, **kw):
    torch.manual_seed(seed)  # the same A in every model adapted with the same seed
    loralib.apply_adapters(model, loralib.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=TARGETS, **kw))
    return model


def pretrained(dtype):
    return tiny_roberta(seed=0, dtype=dtype).eval()


def late(dtype, method):
    """Adapters applied to a freshly initialised model, whose weights are loaded afterwards: the order under test."""
    model = adapt(tiny_roberta(seed=1, dtype=dtype).eval(), method)
    with torch.no_grad():
        model(**token_batch())  # fill every cache first
    return model


def base_keys(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_model(model, reference, base=None):
    """Bitwise the same logits (and those of the unadapted base, when given) and the same magnitudes."""
    batch = token_batch()
    with torch.no_grad():
        got = model(**batch).logits
        assert torch.equal(got, reference(**batch).logits)
        if base is not None:
            assert torch.equal(got, base(**batch).logits)
    layers, ref_layers = loralib.adapter_layers(model), loralib.adapter_layers(reference)
    assert [n for n, _ in layers] == [n for n, _ in ref_layers]
    for (name, layer), (_, ref) in zip(layers, ref_layers):
        if layer.decomposed:
            assert torch.equal(layer.magnitude, ref.magnitude), name


def _load(model, state):
    model.load_state_dict(state, strict=False)


def _load_submodule(model, state):
    sub = {k.removeprefix("roberta."): v for k, v in state.items() if k.startswith("roberta.")}
    model.roberta.load_state_dict(sub, strict=False)
    model.classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in state.items() if "classifier" in k})


def _load_assign(model, state):
    model.load_state_dict(state, strict=False, assign=True)


def _copy_loop(model, state):
    with torch.no_grad():
        for name, value in state.items():
            if name.endswith(("weight", "bias")):
                model.get_parameter(name).copy_(value)


def _vector_to_parameters(model, state):
    names = [n for n in state if n.endswith(("weight", "bias"))]
    vector_to_parameters(parameters_to_vector([state[n] for n in names]), [model.get_parameter(n) for n in names])


def _new_parameters(model, state):  # what transformers' and accelerate's loaders do: assign new Parameters
    for name, value in state.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value.clone(), requires_grad=False)


def _data_writes_then_refresh(model, state):  # invisible to autograd: loralib.refresh is the documented fix
    for name, value in state.items():
        if name.endswith(("weight", "bias")):
            model.get_parameter(name).data.copy_(value)
    loralib.refresh(model)


ROUTES = {
    "load_state_dict": _load,
    "submodule_load_state_dict": _load_submodule,
    "load_state_dict_assign": _load_assign,
    "copy_": _copy_loop,
    "vector_to_parameters": _vector_to_parameters,
    "new_parameters": _new_parameters,
    "data_writes_and_refresh": _data_writes_then_refresh,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route", list(ROUTES))
def test_weights_loaded_after_apply_adapters_give_the_pretrained_model(route, dtype):
    """Issue 20 (a): magnitudes stayed ‖W0_random‖; (b)/(c): the caches stayed those of the random weights."""
    base = pretrained(dtype)
    reference = adapt(copy.deepcopy(base), "dora")
    model = late(dtype, "dora")
    ROUTES[route](model, base_keys(base))
    assert_same_model(model, reference, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_and_unload_right_after_a_copy_is_the_pretrained_model(dtype):
    base = pretrained(dtype)
    reference = loralib.merge_and_unload(adapt(copy.deepcopy(base), "dora"))
    model = late(dtype, "dora")
    _copy_loop(model, base_keys(base))  # no forward in between
    merged = loralib.merge_and_unload(model)
    for (name, got), expected in zip(merged.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bidora_and_tied_weights_follow_a_whole_model_load(dtype):
    """BiDoRA (LoRA's direction trained, magnitudes untouched) and GPT-2, whose adapted embedding is tied to lm_head
    and saved only under lm_head's key: the model-level hook sees W0 loaded through another module."""
    base = pretrained(dtype)
    reference = adapt(copy.deepcopy(base), "bidora")
    model = late(dtype, "bidora")
    _load(model, base_keys(base))
    assert_same_model(model, reference, base)

    gpt = tiny_gpt2(seed=0).to(dtype).eval()
    cfg = loralib.AdapterConfig(method="dora", r=2, target_modules=["wte", "c_attn"])
    torch.manual_seed(5)
    ref_gpt = copy.deepcopy(gpt)
    loralib.apply_adapters(ref_gpt, cfg)
    torch.manual_seed(5)
    late_gpt = tiny_gpt2(seed=1).to(dtype).eval()
    loralib.apply_adapters(late_gpt, cfg)
    state = {k: v for k, v in base_keys(gpt).items() if k != "transformer.wte.weight"}  # tied: lm_head.weight only
    late_gpt.load_state_dict(state, strict=False)
    for (name, layer), (_, ref) in zip(loralib.adapter_layers(late_gpt), loralib.adapter_layers(ref_gpt)):
        assert torch.equal(layer.magnitude, ref.magnitude), name
    ids = token_batch(vocab=50)["input_ids"]
    with torch.no_grad():
        assert torch.equal(late_gpt(ids).logits, gpt(ids).logits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_pretrained_of_a_model_saved_at_init(dtype, tmp_path):
    base = pretrained(dtype)
    reference = adapt(copy.deepcopy(base), "dora")
    reference.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification

    loaded = loralib.from_pretrained(AutoModelForSequenceClassification, tmp_path, dtype=dtype).eval()
    assert_same_model(loaded, reference, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_moves_are_the_model_converted_first(dtype):
    """.half().float() (fp32) and .float() (bf16): as if the converted model had been adapted."""
    base = pretrained(dtype)
    model = adapt(copy.deepcopy(base), "dora")
    with torch.no_grad():
        model(**token_batch())
    if dtype == torch.float32:
        model.half().float()
        converted = copy.deepcopy(base).half().float()
    else:
        model.float()
        converted = copy.deepcopy(base).float()
    reference = adapt(converted, "dora")
    assert_same_model(model, reference, converted)


# ---- adapters built on the meta device (issue 20, item 4): values arrive later, by every loading route ----------
def _adapted_in_init(method, targets):
    """A model class that applies the adapters in its own ``__init__``: transformers' ``from_pretrained`` builds it on
    the meta device, loads the checkpoint and fills what the checkpoint lacks with ``torch.empty``."""
    from transformers import RobertaForSequenceClassification

    class AdaptedInInit(RobertaForSequenceClassification):
        def __init__(self, config):
            super().__init__(config)
            cfg = loralib.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=targets)
            loralib.apply_adapters(self, cfg)

    return AdaptedInInit


def _targets(method):
    return TARGETS + ([] if method == "bidora" else ["word_embeddings"])  # BiDoRA adapts no embedding


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_adapters_applied_in_init_of_a_model_loaded_by_from_pretrained(method, dtype, tmp_path):
    """Was: lora_B uninitialised memory (|B| from 3e-5 to 1.9e38), the magnitude not ‖W0‖, no warning."""
    from transformers import RobertaForSequenceClassification

    pretrained(dtype).save_pretrained(tmp_path)
    base = RobertaForSequenceClassification.from_pretrained(tmp_path, dtype=dtype).eval()
    torch.manual_seed(5)
    reference = copy.deepcopy(base)
    loralib.apply_adapters(reference, loralib.AdapterConfig(method=method, r=4, lora_alpha=8,
                                                             target_modules=_targets(method)))
    model = _adapted_in_init(method, _targets(method)).from_pretrained(tmp_path, dtype=dtype)
    assert_same_model(model, reference, base)  # the pretrained model at step 0, magnitudes ‖W0‖ bitwise
    for (name, layer), (_, ref) in zip(loralib.adapter_layers(model), loralib.adapter_layers(reference)):
        for pname in ("lora_A", "lora_B") + (("magnitude",) if layer.decomposed else ()):
            got, want = getattr(layer, pname), getattr(ref, pname)
            assert (got.dtype, got.shape, got.requires_grad) == (want.dtype, want.shape, want.requires_grad), pname
        assert torch.count_nonzero(layer.lora_B) == 0, name
        fan_in = layer.lora_A.shape[1]  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert layer.lora_A.abs().max() <= fan_in ** -0.5 and layer.lora_A.std() > 0.2 * fan_in ** -0.5, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_trained_model_saved_whole_reloads_through_init_bitwise(merged, dtype, tmp_path):
    """Values transformers loaded are kept (lora_A, lora_B, a trained magnitude), and so is a merged layer's
    m / n: it was a non-persistent buffer, which from_pretrained replaces with torch.empty after loading."""
    trained = adapt(pretrained(dtype), "dora")
    with torch.no_grad():
        for _, layer in loralib.adapter_layers(trained):
            layer.lora_B.normal_(std=0.1)
            layer.magnitude.mul_(1.1)
    if merged:
        loralib.merge_adapters(trained)
    trained.save_pretrained(tmp_path)
    loaded = _adapted_in_init("dora", TARGETS).from_pretrained(tmp_path, dtype=dtype)
    want, got = trained.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    for (name, layer), (_, ref) in zip(loralib.adapter_layers(loaded), loralib.adapter_layers(trained)):
        assert layer.merged == merged and layer._magnitude_init is None, name  # the loaded magnitude is the user's
        if merged:
            assert torch.equal(layer._merge_scale, ref._merge_scale), name
    if merged:
        loralib.unmerge_adapters(loaded)
        loralib.unmerge_adapters(trained)
    assert_same_model(loaded, trained.eval())


def _meta_model(dtype, method="dora"):
    with torch.device("meta"):
        model = tiny_roberta(seed=1, dtype=dtype)
    return adapt(model, method)


def _buffers_from(model, source):
    """The non-persistent buffers (position ids) are in no state dict: give the meta-built model the source's."""
    for name, buffer in source.named_buffers():
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._buffers[attr] = buffer.clone()
    return model.eval()


def _to_empty_then_load(model, state):
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=False)


def _to_empty_mode_switch_then_load(model, state):  # the adapters get values from garbage W0 first, then follow it
    model.to_empty(device="cpu")
    model.train()
    model.load_state_dict(state, strict=False)


def _assign(model, state):  # torchtune's order: base weights assigned onto the meta model
    model.load_state_dict(state, strict=False, assign=True)


META_ROUTES = {
    "to_empty_load": _to_empty_then_load,
    "to_empty_train_load": _to_empty_mode_switch_then_load,
    "load_assign": _assign,
    "new_parameters": lambda model, state: (model.to_empty(device="cpu"), _new_parameters(model, state)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route", list(META_ROUTES))
def test_adapters_built_on_meta_get_the_values_of_the_right_order(route, dtype):
    """Base weights only in the state dict: the adapters are initialised from the loaded W0 (as if applied to the
    pretrained model); a full adapted state dict: its values, bitwise."""
    base = pretrained(dtype)
    reference = adapt(copy.deepcopy(base), "dora")
    model = _meta_model(dtype)
    META_ROUTES[route](model, base_keys(base))
    assert_same_model(_buffers_from(model, base), reference, base)
    assert all(torch.count_nonzero(layer.lora_B) == 0 for _, layer in loralib.adapter_layers(model))


FULL_ROUTES = {
    "to_empty_load": _to_empty_then_load,
    "load_assign": _assign,
    "new_parameters": lambda model, state: _new_parameters(model, state),  # accelerate's way: Parameters assigned
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route", [*FULL_ROUTES, "load_adapters"])
def test_adapter_values_loaded_onto_a_meta_built_model_are_kept(route, dtype, tmp_path):
    trained = adapt(pretrained(dtype), "dora").eval()
    with torch.no_grad():
        for _, layer in loralib.adapter_layers(trained):
            layer.lora_B.normal_(std=0.1)
            layer.magnitude.mul_(1.1)
    model = _meta_model(dtype)
    if route == "load_adapters":
        loralib.save_adapters(trained, tmp_path, model_card=False)
        base_only = {k: v for k, v in base_keys(trained).items() if "lora_" not in k and "magnitude" not in k}
        _to_empty_then_load(model, base_only)
        loralib.load_adapters(model, tmp_path)
    else:
        FULL_ROUTES[route](model, base_keys(trained))
    assert_same_model(_buffers_from(model, trained), trained)
    for (name, layer), (_, ref) in zip(loralib.adapter_layers(model), loralib.adapter_layers(trained)):
        assert torch.equal(layer.lora_A, ref.lora_A) and torch.equal(layer.lora_B, ref.lora_B), name


def test_a_model_still_on_meta_refuses_forward_merge_and_save_with_a_sentence(tmp_path):
    model = _meta_model(torch.float32)
    layer = model.roberta.encoder.layer[0].attention.self.query  # (the whole model stops earlier, in its embeddings)
    for action in (lambda: layer(torch.zeros(2, 16)), lambda: loralib.merge_and_unload(model),
                   lambda: loralib.save_adapters(model, tmp_path)):
        with pytest.raises(RuntimeError, match="built on the meta device .* base weight is still on the meta device"):
            action()


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
def test_a_model_converted_to_half_after_adapting_is_the_converted_pretrained_model(half):
    """``model.half()`` after apply_adapters converts the adapters too (the user's conversion wins): the untrained
    magnitude follows as ‖W0‖ rounded to half, and the outputs are the converted base's, bitwise (were off by up to
    7.8e-3 on a tiny Llama: m / n = 1 ± 2⁻⁹ on some rows)."""
    base = tiny_gpt2(seed=0).eval()  # Conv1D layers whose outputs show a scale of 1 ± 2⁻¹¹ in fp16
    cfg = loralib.AdapterConfig(method="dora", r=4, target_modules=["c_attn", "c_fc"])
    model = copy.deepcopy(base)
    loralib.apply_adapters(model, cfg)
    model.to(half)
    converted = copy.deepcopy(base).to(half)
    reference = copy.deepcopy(converted)
    loralib.apply_adapters(reference, cfg)  # fp32 adapters (autocast_adapter_dtype) on the half base
    ids = token_batch(vocab=50)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, converted(ids).logits)
    for (name, layer), (_, ref) in zip(loralib.adapter_layers(model), loralib.adapter_layers(reference)):
        assert layer.magnitude.dtype == half and torch.equal(layer.magnitude, ref.magnitude.to(half)), name


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_to_empty_of_an_adapted_model_then_a_base_load_is_the_right_order(method, merged):
    """``to_empty`` leaves every parameter without values; the adapters of a model built on a real device were kept
    as that garbage (lora_B NaN, outputs NaN) while a meta-built model's were initialised. Now both are; a merged
    layer's state goes with its memory."""
    base = pretrained(torch.float32)
    reference = adapt(copy.deepcopy(base), method)
    model = adapt(tiny_roberta(seed=1), method)
    if merged:
        loralib.merge_adapters(model)
    model.to_empty(device="cpu")
    _load(model, base_keys(base))
    assert_same_model(_buffers_from(model, base), reference, base)
    assert not any(layer.merged for _, layer in loralib.adapter_layers(model))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_base_weight_resized_after_adapting_is_refused_with_a_sentence(method):
    """resize_token_embeddings after adapting the embedding: lora_A kept its old vocabulary; LoRA failed in torch
    for new ids only (old ids silently used the old adapter), DoRA on every forward with a shape error."""
    model = tiny_roberta(seed=0)
    loralib.apply_adapters(model, loralib.AdapterConfig(method=method, r=2, target_modules=["word_embeddings"]))
    model.resize_token_embeddings(120)
    for action in (lambda: model(**token_batch()), lambda: loralib.merge_and_unload(model)):
        with pytest.raises(RuntimeError, match=r"changed shape from \(100, 16\) to \(120, 16\).*Resize the base"):
            action()


def test_loaded_and_trained_magnitudes_are_never_reinitialised():
    base = pretrained(torch.float32)
    state = base_keys(base)
    # magnitudes in the loaded state dict, even bitwise equal to the initial ones, are the user's
    model = late(torch.float32, "dora")
    initial = {n: layer.magnitude.detach().clone() for n, layer in loralib.adapter_layers(model)}
    model.load_state_dict({**state, **{f"{n}.magnitude": m for n, m in initial.items()}}, strict=False)
    with torch.no_grad():
        model(**token_batch())
        for _, layer in loralib.adapter_layers(model):
            layer.weight.mul_(1.5)  # even a later change of W0 leaves them
        model(**token_batch())
    loralib.refresh(model)
    assert all(torch.equal(layer.magnitude, initial[n]) for n, layer in loralib.adapter_layers(model))
    # after an optimiser step the magnitudes are trained: a later load of the base leaves them
    model = late(torch.float32, "dora").train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model(**token_batch()).logits.square().sum().backward()
    optimiser.step()
    trained = {n: layer.magnitude.detach().clone() for n, layer in loralib.adapter_layers(model)}
    _load(model, state)
    loralib.refresh(model)
    assert all(torch.equal(layer.magnitude, trained[n]) for n, layer in loralib.adapter_layers(model))


def test_merge_and_unmerge_do_not_move_untouched_magnitudes():
    model = adapt(pretrained(torch.float32), "dora")
    initial = {n: layer.magnitude.detach().clone() for n, layer in loralib.adapter_layers(model)}
    with torch.no_grad():
        for _, layer in loralib.adapter_layers(model):
            layer.lora_B.normal_(std=0.1)  # the direction trained, the magnitude not (yet)
    loralib.merge_adapters(model)
    with torch.no_grad():
        model(**token_batch())
    loralib.unmerge_adapters(model)
    with torch.no_grad():
        model(**token_batch())
    assert all(torch.equal(layer.magnitude, initial[n]) for n, layer in loralib.adapter_layers(model))


# ---- one trained layer: every route that changes W0, A or B against a layer rebuilt from the current weights -------
def trained_layer(dtype, size=256):
    torch.manual_seed(0)
    base = nn.Linear(size, size).to(dtype).requires_grad_(False)
    layer = loralib.DoRALinear.from_base(base, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
        layer.magnitude.mul_(1.1)  # trained: it never follows W0
    return layer.eval()


def rebuilt(layer):
    """A fresh layer around a copy of the current W0, with the current A, B and m."""
    base = nn.Linear(layer.in_features, layer.out_features).to(layer.weight.dtype)
    base.load_state_dict({"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()})
    fresh = loralib.DoRALinear.from_base(base.requires_grad_(False), r=layer.r, lora_alpha=layer.lora_alpha)
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "magnitude"):
            getattr(fresh, name).copy_(getattr(layer, name))
    return fresh.eval()


def _float64(layer, x):
    w0, a, b = layer.weight.double(), layer.lora_A.double(), layer.lora_B.double()
    dense = w0 + layer.scaling * b @ a
    w = layer.magnitude.double()[:, None] * dense / torch.linalg.vector_norm(dense, dim=1, keepdim=True)
    return x.double() @ w.T + layer.bias.double()


LAYER_ROUTES = {
    "copy_": lambda layer, new: layer.weight.copy_(new),
    "mul_": lambda layer, new: layer.weight.mul_(2),
    "half_float_round_trip": lambda layer, new: layer.half().float() if new.dtype == torch.float32 else None,
    "weight_data_write_refresh": lambda layer, new: (layer.weight.data.copy_(new), loralib.refresh(layer)),
    "weight_data_assign": lambda layer, new: setattr(layer.weight, "data", new.clone()),
    "lora_data_write_refresh": lambda layer, new: (layer.lora_B.data.mul_(3), loralib.refresh(layer)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route", list(LAYER_ROUTES))
def test_eval_caches_follow_every_route(route, dtype):
    """bf16 bases kept ‖W0‖² keyed on the address of a temporary fp32 copy: copy_ stayed stale 20 times in 20."""
    layer = trained_layer(dtype)
    x = torch.randn(5, layer.in_features).to(dtype)
    with torch.no_grad():
        for _ in range(3):
            new = torch.randn_like(layer.weight) * 0.05
            layer(x)  # the eval norm and ‖W0‖² cached
            LAYER_ROUTES[route](layer, new)
            got = layer(x)
            assert torch.equal(got, rebuilt(layer)(x))
            tol = 8 * torch.finfo(dtype).eps * _float64(layer, x).abs().max().item() * layer.in_features**0.5
            torch.testing.assert_close(got.double(), _float64(layer, x), rtol=0, atol=tol)


def test_refresh_after_a_fused_step_without_a_mode_switch():
    layer = trained_layer(torch.float32, size=32)
    x = torch.randn(5, 32)
    with torch.no_grad():
        layer(x)  # cached, in eval mode
    optimiser = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1, fused=True)
    layer(x).square().sum().backward()  # eval mode, gradients on
    optimiser.step()  # no version bump
    loralib.refresh(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), rebuilt(layer)(x))


def test_functional_call_leaves_the_layer_as_it_was():
    layer = trained_layer(torch.float32, size=32)
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = layer(x)
        other = torch.randn_like(layer.weight)
        swapped = torch.func.functional_call(layer, {"weight": other}, (x,))
        probe = rebuilt(layer)
        probe.weight.copy_(other)
        assert torch.equal(swapped, probe(x))
        assert torch.equal(layer(x), before)


# ---- quantised bases refused, DTensor bases allowed ---------------------------------------------------------------
class FakeQuantised(torch.Tensor):
    """A weight-only-int8 tensor subclass like torchao's: it reports float32 but holds int8 values and a scale."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=torch.float32, device=data.device)

    def __init__(self, data, scale):
        self.int_data, self.scale = data, scale

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return cls(args[0].int_data, args[0].scale)
        raise NotImplementedError(f"{func} is not implemented for FakeQuantised")


def quantised_linear():
    layer = nn.Linear(8, 4)
    quantised = FakeQuantised(torch.randint(-127, 127, (4, 8), dtype=torch.int8), torch.ones(4))
    layer.weight = nn.Parameter(quantised, requires_grad=False)
    assert layer.weight.dtype == torch.float32 and layer.weight.is_floating_point()
    return layer


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_quantised_tensor_subclass_is_refused_like_bitsandbytes(method):
    model = nn.Sequential(quantised_linear())
    with pytest.raises(TypeError, match=r"module '0' is a Linear with a FakeQuantised weight .*: loralib adapts only "):
        loralib.apply_adapters(model, loralib.AdapterConfig(method=method, target_modules=["0"]))
    assert type(model[0]) is nn.Linear  # nothing replaced
    cls = dict(_LAYER_CLASSES[method])[nn.Linear]
    with pytest.raises(TypeError, match="needs a floating-point base weight, got a FakeQuantised weight"):
        cls.from_base(quantised_linear(), r=2)


@pytest.fixture
def one_process_mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    handle, path = tempfile.mkstemp()
    os.close(handle)
    os.remove(path)
    dist.init_process_group("gloo", store=dist.FileStore(path, 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
        if os.path.exists(path):
            os.remove(path)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dtensor_base_is_adapted(method, one_process_mesh):
    """FSDP2 / tensor-parallel loading give DTensor weights: adapted, A and B replicated on the weight's mesh."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    plain = nn.Linear(8, 6)
    layer = nn.Linear(8, 6)
    layer.weight = nn.Parameter(distribute_tensor(plain.weight.detach(), one_process_mesh, [Shard(0)]), False)
    layer.bias = nn.Parameter(distribute_tensor(plain.bias.detach(), one_process_mesh, [Replicate()]), False)
    model = nn.Sequential(layer)
    loralib.apply_adapters(model, loralib.AdapterConfig(method=method, r=2, target_modules=["0"]))
    adapted = model[0]
    assert isinstance(adapted.lora_A, DTensor) and isinstance(adapted.lora_B, DTensor)
    x = torch.randn(3, 8)
    distributed_x = distribute_tensor(x, one_process_mesh, [Replicate()])
    with torch.no_grad():
        assert torch.equal(model(distributed_x).full_tensor(), plain(x))  # the base layer at init
    if method == "dora":
        expected = torch.linalg.vector_norm(plain.weight.detach(), dim=1)
        assert torch.equal(adapted.magnitude.full_tensor(), expected)
    model(distributed_x).full_tensor().sum().backward()
    assert adapted.lora_B.grad is not None


@pytest.mark.parametrize("built", ["on_meta", "random"])
def test_fsdp2_model_loaded_by_set_model_state_dict_is_the_pretrained_model(built, one_process_mesh):
    """FSDP2's way to load pretrained weights: shard the (meta or random) adapted model, then
    torch.distributed.checkpoint's set_model_state_dict with the base weights (full_state_dict, strict=False). It
    fills the keys its state dict lacks with the model's own tensors and the extra-state keys with a placeholder
    object: the magnitudes counted as loaded (never following W0) and set_extra_state failed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    base = pretrained(torch.float32)
    reference = adapt(copy.deepcopy(base), "dora")
    model = _meta_model(torch.float32) if built == "on_meta" else late(torch.float32, "dora")
    for block in model.roberta.encoder.layer:
        fully_shard(block, mesh=one_process_mesh)
    fully_shard(model, mesh=one_process_mesh)
    assert isinstance(model.roberta.encoder.layer[0].attention.self.query.weight, DTensor)
    if built == "on_meta":
        model.to_empty(device="cpu")
    set_model_state_dict(model, base_keys(base), options=StateDictOptions(full_state_dict=True, strict=False))
    _buffers_from(model, base)
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)
    for (name, layer), (_, ref) in zip(loralib.adapter_layers(model), loralib.adapter_layers(reference)):
        assert torch.equal(layer.magnitude.full_tensor(), ref.magnitude), name


# ---- disable_adapters, print_trainable_parameters ----------------------------------------------------------------
def perturbed(method, dtype=torch.float32, **kw):
    model = adapt(tiny_roberta(seed=0, dtype=dtype), method, **kw)
    loralib.allow_joint_magnitude_training(model)
    with torch.no_grad():
        for _, layer in loralib.adapter_layers(model):
            layer.lora_B.normal_(std=0.1)
            if layer.decomposed:
                layer.magnitude.mul_(1.2)
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_disable_adapters_gives_the_base_model_bitwise(method, dtype):
    base = tiny_roberta(seed=0, dtype=dtype)
    model = perturbed(method, dtype, lora_dropout=0.1)
    batch = token_batch()
    for mode in ("train", "eval"):
        getattr(base, mode)()
        getattr(model, mode)()
        adapted = model(**batch).logits.detach() if mode == "eval" else None
        with loralib.disable_adapters(model):
            with loralib.disable_adapters(model):  # nests
                pass
            assert torch.equal(model(**batch).logits, base(**batch).logits)
            with pytest.raises(RuntimeError, match="inside loralib.disable_adapters"):
                loralib.merge_adapters(model)
        if adapted is not None:
            assert torch.equal(model(**batch).logits, adapted)
            assert not torch.equal(adapted, base(**batch).logits)
    assert all("adapter_disabled" not in vars(layer) for _, layer in loralib.adapter_layers(model))


def test_disable_adapters_refuses_merged_layers_and_compiles_without_breaks():
    model = perturbed("dora")
    loralib.merge_adapters(model)
    with pytest.raises(ValueError, match="merged layers .*unmerge_adapters"):
        with loralib.disable_adapters(model):
            pass
    torch._dynamo.reset()
    small = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
    loralib.apply_adapters(small, loralib.AdapterConfig(method="dora", r=2, target_modules=["0", "2"]))
    with loralib.disable_adapters(small):
        explanation = torch._dynamo.explain(small)(torch.randn(2, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def expected_counts(base, method, adapted_names, saved_prefix):
    """(trainable, total) from the base model's own modules: r·(in + out) per adapted layer, + out for DoRA/BiDoRA."""
    adapter = 0
    for name in adapted_names:
        module = base.get_submodule(name)
        out_features, in_features = module.weight.shape
        adapter += 4 * (in_features + out_features) + (out_features if method != "lora" else 0)
    saved = sum(p.numel() for n, p in base.named_parameters() if n.startswith(saved_prefix)) if saved_prefix else 0
    return adapter + saved, sum(p.numel() for p in base.parameters()) + adapter


@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_print_trainable_parameters(method, capsys, tmp_path):
    base = tiny_roberta(seed=0)
    model = adapt(copy.deepcopy(base), method, modules_to_save=["classifier"])
    names = [n for n, _ in loralib.adapter_layers(model)]
    trainable, total = expected_counts(base, method, names, "classifier.")
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert loralib.print_trainable_parameters(model) == (trainable, total)
    assert capsys.readouterr().out.strip() == line
    frozen_magnitudes = sum(m.numel() for m in loralib.magnitude_parameters(model))
    with loralib.model.magnitudes_trainable(model, False):  # as BiDoRATrainer holds a model: BiDoRA still counts m
        expected = trainable if method == "bidora" else trainable - frozen_magnitudes
        assert loralib.print_trainable_parameters(model)[0] == expected
    capsys.readouterr()
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification

    loaded = loralib.from_pretrained(AutoModelForSequenceClassification, tmp_path)
    assert loralib.print_trainable_parameters(loaded) == (trainable, total)
    assert capsys.readouterr().out.strip() == line


def test_print_trainable_parameters_counts_tied_weights_once(capsys):
    base = tiny_gpt2(seed=0)
    assert base.lm_head.weight is base.transformer.wte.weight
    model = copy.deepcopy(base)
    loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", r=4, target_modules=["wte", "c_attn"]))
    adapter = 0
    for name, _ in loralib.adapter_layers(model):
        # W0 is (out, in): the embedding (vocab, dim) and Conv1D (in, out) store it transposed
        in_features, out_features = base.get_submodule(name).weight.shape
        adapter += 4 * (in_features + out_features) + out_features
    total = sum(p.numel() for p in base.parameters()) + adapter
    assert loralib.print_trainable_parameters(model) == (adapter, total)
