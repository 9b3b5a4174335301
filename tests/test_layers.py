"""Layer math against an independent float64 reference, over method x layer type x dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loralib
from loralib.model import _LAYER_CLASSES
from tests.helpers import ALPHA, IN, OUT, R, as_features, build_layer, layer_cases, make_input, reference_weight, w0_of

# the float64 rows of the layer matrix, each without and with dropout (none on embeddings)
CASES = [
    (method, kind, dropout)
    for method, kind, _ in layer_cases(dtypes=(torch.float64,))
    for dropout in (0.0, 0.3)
    if not (kind == "embedding" and dropout > 0)
]


@pytest.mark.parametrize("method,kind,dropout", CASES)
def test_forward_matches_reference(method, kind, dropout):
    base, layer = build_layer(method, kind, lora_dropout=dropout)
    w0 = w0_of(kind, base)
    x = make_input(kind)
    bias = getattr(base, "bias", None)
    bias = torch.zeros(OUT, dtype=torch.float64) if bias is None else bias.detach()
    magnitude = layer.magnitude.detach() if layer.decomposed else None
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), ALPHA / R
    assert layer.scaling == s

    layer.eval()
    expected = as_features(kind, x) @ reference_weight(w0, a, b, s, magnitude).T + bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)

    if dropout > 0:
        layer.train()
        torch.manual_seed(123)
        out = layer(x)
        torch.manual_seed(123)
        dropped = F.dropout(x, dropout, training=True)  # the same mask the layer drew
        pre = x @ w0.T + s * (dropped @ a.T @ b.T)  # base path never sees dropout
        if magnitude is not None:
            pre = pre * (magnitude / torch.linalg.vector_norm(w0 + s * b @ a, dim=1))
        torch.testing.assert_close(out, pre + bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method,kind,dropout", [c for c in CASES if c[2] == 0.0])
def test_gradcheck(method, kind, dropout):
    _, layer = build_layer(method, kind, lora_dropout=dropout)
    x = make_input(kind)[:2, :3]
    params = [layer.lora_A, layer.lora_B] + ([layer.magnitude] if layer.decomposed else [])
    if kind != "embedding":
        x.requires_grad_(True)

    # gradcheck needs a pure function of its inputs: feed the parameters through autograd via a functional call.
    names = ["lora_A", "lora_B"] + (["magnitude"] if layer.decomposed else [])

    def functional(*tensors):
        state = dict(zip(names, tensors[: len(names)]))
        inp = tensors[len(names)] if kind != "embedding" else x
        return torch.func.functional_call(layer, state, (inp,))

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params)
    if kind != "embedding":
        inputs = inputs + (x,)
    assert torch.autograd.gradcheck(functional, inputs)


@pytest.mark.parametrize("method", ["dora", "bidora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_factored_norm_equals_dense_norm(method, kind):
    base, layer = build_layer(method, kind)
    w0 = w0_of(kind, base)
    with torch.no_grad():
        layer.lora_B.mul_(10.0)  # a large update: the cross and quadratic terms dominate
    dense = torch.linalg.vector_norm(w0 + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach(), dim=1)
    torch.testing.assert_close(layer.weight_norm(), dense, rtol=1e-12, atol=0)
    # float32 keeps single-precision accuracy
    layer32 = layer.float()
    torch.testing.assert_close(layer32.weight_norm().double(), dense, rtol=1e-5, atol=0)


def test_norm_never_nan_under_cancellation():
    base = nn.Linear(4, 2).double()
    layer = loralib.DoRALinear.from_base(base, r=1, lora_alpha=1.0)
    with torch.no_grad():  # make row 0 of W0 + s·BA exactly zero
        layer.lora_A.copy_(base.weight[:1])
        layer.lora_B.copy_(torch.tensor([[-1.0], [0.0]], dtype=torch.float64))
    norm = layer.weight_norm()
    assert torch.all(torch.isfinite(norm)) and norm[0] >= 0
    out = layer(torch.randn(3, 4, dtype=torch.float64))
    out.sum().backward()
    assert all(torch.all(torch.isfinite(p.grad)) for p in (layer.lora_A, layer.lora_B, layer.magnitude))


def test_forward_uses_w0_not_its_transpose():
    """Regression for the original code, which computed x·W0 instead of x·W0ᵀ."""
    torch.manual_seed(0)
    square = nn.Linear(6, 6).double()
    layer = loralib.BiDoRALinear.from_base(square, r=2, lora_alpha=4.0).eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    correct = x @ square.weight.detach().T + square.bias.detach()
    transposed = x @ square.weight.detach() + square.bias.detach()
    assert not torch.allclose(correct, transposed)
    torch.testing.assert_close(layer(x), correct, rtol=1e-12, atol=1e-12)
    wide = loralib.BiDoRALinear.from_base(nn.Linear(6, 9).double(), r=2).eval()  # W0ᵀ would not even fit
    assert wide(x).shape == (3, 9)


@pytest.mark.parametrize("method", ["dora", "bidora"])
def test_detach_norm_changes_only_gradients(method):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).double()
    exact = dict(_LAYER_CLASSES[method])[nn.Linear].from_base(base, r=R)
    cheap = dict(_LAYER_CLASSES[method])[nn.Linear].from_base(base, r=R, detach_norm=True)
    exact.joint_magnitude_training = cheap.joint_magnitude_training = True
    with torch.no_grad():
        cheap.lora_A.copy_(exact.lora_A)
        exact.lora_B.normal_()
        cheap.lora_B.copy_(exact.lora_B)
    x = make_input("linear")
    out_exact, out_cheap = exact(x), cheap(x)
    torch.testing.assert_close(out_exact, out_cheap, rtol=1e-12, atol=1e-12)
    out_exact.sum().backward()
    out_cheap.sum().backward()
    assert not torch.allclose(exact.lora_A.grad, cheap.lora_A.grad)


def test_rslora_and_gaussian_init():
    layer = loralib.LoRALinear(8, 4, r=4, lora_alpha=8.0, use_rslora=True, init_lora_weights="gaussian")
    assert layer.scaling == pytest.approx(8.0 / 2.0)
    assert torch.all(layer.lora_B == 0)
    assert layer.lora_A.std().item() == pytest.approx(0.25, rel=0.5)


def test_eval_norm_cache_is_invalidated():
    torch.manual_seed(0)
    layer = loralib.DoRALinear.from_base(nn.Linear(IN, OUT).double(), r=R).eval()
    x = make_input("linear")
    with torch.no_grad():
        first = layer(x)
        assert layer._norm_cache is not None
        layer.lora_B.normal_()  # an in-place change bumps the tensor version
        second = layer(x)
    magnitude = layer.magnitude.detach()
    expected = (
        x
        @ reference_weight(
            layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling, magnitude
        ).T
        + layer.bias.detach()
    )
    torch.testing.assert_close(second, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(first, second)
    # with gradients enabled in eval mode the norm is exact (not the cached constant)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and torch.any(layer.lora_A.grad != 0)


@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_no_graph_breaks_in_adapter_layers(method):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
    loralib.apply_adapters(
        model, loralib.AdapterConfig(method=method, r=2, target_modules=["0", "2"], lora_dropout=0.1)
    )
    loralib.allow_joint_magnitude_training(model)  # the BiDoRA guard must not break the graph either
    x = torch.randn(2, 8)
    for mode in (model.train, model.eval):
        mode()
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("update", [0.0, 1.0, 10.0])
def test_orthogonality_distance_equals_dense_formula(kind, update):
    base, layer = build_layer("dora", kind)
    w0 = w0_of(kind, base)
    with torch.no_grad():
        layer.lora_B.mul_(update)  # 0: the pretrained direction; 10: the rank-r terms dominate
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    dense = w0 + layer.scaling * b @ a
    unit = dense / torch.linalg.vector_norm(dense, dim=1, keepdim=True)
    expected = torch.sqrt(((unit @ unit.T - torch.eye(OUT, dtype=torch.float64)) ** 2).sum())
    torch.testing.assert_close(layer.direction(), unit.detach(), rtol=1e-12, atol=1e-12)
    distance = layer.orthogonality_distance()
    torch.testing.assert_close(distance, expected.detach(), rtol=1e-9, atol=1e-12)
    expected.backward()
    distance.backward()
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-7, atol=1e-10)


def dense_orthogonality_distance(w0, a, b, scaling):
    """``‖V̂V̂ᵀ − I‖_F`` from the definition: the dense float64 direction, row-normalised."""
    dense = w0 + scaling * b @ a
    unit = dense / torch.linalg.vector_norm(dense, dim=1, keepdim=True)
    return torch.sqrt(((unit @ unit.T - torch.eye(unit.shape[0], dtype=torch.float64)) ** 2).sum())


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
@pytest.mark.parametrize("training", [True, False])
def test_orthogonality_from_captured_norm_terms_equals_dense_formula(kind, training):
    """The penalty from the n and W0·Aᵀ a forward recorded: the dense value and gradients, without recomputing."""
    base, layer = build_layer("dora", kind)
    w0 = w0_of(kind, base)
    layer.train(training)  # eval: recorded because gradients are enabled
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    expected = dense_orthogonality_distance(w0, a, b, layer.scaling)
    with loralib.model.capture_norm_terms(layer) as terms:
        layer(make_input(kind))
    assert set(terms) == {layer} and terms[layer][0].requires_grad
    assert "_norm_terms_sink" not in layer.__dict__
    recomputed = []
    layer._norm_terms = lambda: recomputed.append(1)  # the captured terms must be used as they are
    distance = layer.orthogonality_distance(terms[layer])
    del layer._norm_terms
    assert not recomputed
    torch.testing.assert_close(distance, expected.detach(), rtol=1e-9, atol=1e-12)
    expected.backward()
    distance.backward()
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-7, atol=1e-10)
