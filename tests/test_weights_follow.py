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
