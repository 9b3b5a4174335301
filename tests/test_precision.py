"""Mixed precision: fp32 adapters on half-precision bases, forward with and without autocast, merges that keep the
base dtype, and DoRA's norm floor in fp16. References are float64 formulas or the unadapted layer itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loralib
from tests.helpers import (
    IN,
    as_features,
    build_layer,
    layer_cases,
    make_input,
    reference_weight,
    tiny_roberta,
    token_batch,
    w0_of,
)

HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CASES = layer_cases(dtypes=DTYPES)  # the half and single precision rows of the layer matrix
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def layer_input(kind, dtype):
    x = make_input(kind)
    return x if kind == "embedding" else x.to(dtype)


@pytest.mark.parametrize("method,kind,dtype", CASES)
def test_adapters_are_fp32_on_half_bases_unless_asked(method, kind, dtype):
    _, layer = build_layer(method, kind, dtype, perturb=False)
    expected = torch.float32 if dtype in HALF else dtype
    params = [layer.lora_A, layer.lora_B] + ([layer.magnitude] if layer.decomposed else [])
    assert all(p.dtype == expected for p in params)
    assert layer.weight.dtype == dtype  # the base is never converted
    _, kept = build_layer(method, kind, dtype, perturb=False, autocast_adapter_dtype=False)
    assert kept.lora_A.dtype == kept.lora_B.dtype == dtype


@pytest.mark.parametrize("adapters", ["fp32", "base_dtype"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("method,kind,dtype", CASES)
def test_initial_output_is_the_pretrained_layers(method, kind, dtype, autocast, adapters):
    """Bitwise the unadapted layer's output, same dtype, with and without autocast; also with adapters in the half
    base's own dtype (``autocast_adapter_dtype=False``), whose magnitude is ‖W0‖ rounded: m / n was 1 ± 2⁻⁹ on
    some rows (outputs off by up to 7e-3 on a tiny Llama)."""
    base, layer = build_layer(method, kind, dtype, perturb=False, autocast_adapter_dtype=adapters == "fp32")
    x = layer_input(kind, dtype if not autocast else torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected, got = base(x), layer(x)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method,kind,dtype", CASES)
def test_trained_output_matches_float64_formula(method, kind, dtype):
    base, layer = build_layer(method, kind, dtype)
    x = layer_input(kind, dtype)
    w = reference_weight(
        w0_of(kind, base).double(),
        layer.lora_A.detach().double(),
        layer.lora_B.detach().double(),
        layer.scaling,
        layer.magnitude.detach().double() if layer.decomposed else None,
    )
    expected = as_features(kind, make_input(kind)) @ w.T if kind == "embedding" else x.double() @ w.T
    if getattr(base, "bias", None) is not None:
        expected = expected + base.bias.double()
    got = layer(x)
    assert got.dtype == dtype
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=8 * ULP[dtype] * scale * IN)


@pytest.mark.parametrize("method,kind,dtype", CASES)
def test_gradients_reach_fp32_adapters_outside_autocast(method, kind, dtype):
    _, layer = build_layer(method, kind, dtype)
    layer(layer_input(kind, dtype)).float().square().sum().backward()
    for p in [layer.lora_A, layer.lora_B] + ([layer.magnitude] if layer.decomposed else []):
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    assert layer.weight.grad is None


@pytest.mark.parametrize("method,kind,dtype", CASES)
def test_merge_keeps_dtype_and_unmerge_restores_w0(method, kind, dtype):
    base, layer = build_layer(method, kind, dtype)
    w0 = layer.base_weight().detach().clone()
    x = layer_input(kind, dtype)
    before = layer(x).detach()
    assert layer.merge()
    assert layer.weight.dtype == dtype
    merged = layer(x)
    assert merged.dtype == dtype
    tol = 8 * ULP[dtype] * before.abs().max().item() * IN
    torch.testing.assert_close(merged, before, rtol=0, atol=tol)
    # the merged weight is the float64 formula rounded once to the base dtype
    w = reference_weight(
        w0.double(),
        layer.lora_A.detach().double(),
        layer.lora_B.detach().double(),
        layer.scaling,
        layer.magnitude.detach().double() if layer.decomposed else None,
    )
    # (the fp32 computation adds a few fp32 roundings, invisible after rounding to a half dtype)
    torch.testing.assert_close(layer.base_weight().double(), w, rtol=2 * ULP[dtype] + 2.0**-18, atol=1e-30)
    assert layer.unmerge()
    assert layer.weight.dtype == dtype
    # within a couple of roundings of the base dtype, relative to the merged weight's magnitude
    torch.testing.assert_close(
        layer.base_weight().double(), w0.double(), rtol=0, atol=4 * ULP[dtype] * w.abs().max().item()
    )


@pytest.mark.parametrize("keep_dtype", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_with_all_zero_weight_row_is_the_pretrained_layer(dtype, keep_dtype):
    """fp16 used to give NaN: the norm floor underflowed to zero and m / n was 0 / 0."""
    base = nn.Linear(4, 3).to(dtype)
    with torch.no_grad():
        base.weight[1].zero_()
    layer = loralib.DoRALinear.from_base(base, r=2, autocast_adapter_dtype=not keep_dtype)
    x = torch.randn(5, 4).to(dtype)
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, base(x))
    out.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (layer.lora_A, layer.lora_B, layer.magnitude))


@pytest.mark.parametrize("half", HALF, ids=str)
@pytest.mark.parametrize("method", ["dora", "bidora"])
def test_half_magnitudes_train_like_the_float64_formula(method, half):
    """The half magnitude meets n rounded to its precision in the value only: the output stays within the
    half-precision tolerance of the float64 formula, and A, B get the gradient of the formula with n unrounded."""
    base, layer = build_layer(method, "linear", half, autocast_adapter_dtype=False)
    x = layer_input("linear", half)
    a, b, m = (p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    w = reference_weight(w0_of("linear", base).double(), a, b, layer.scaling, m)
    expected = x.double() @ w.T + base.bias.double()
    got = layer(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=8 * ULP[half] * scale * IN)
    probe = torch.randn(expected.shape, dtype=torch.float64)
    (expected * probe).sum().backward()
    (got.double() * probe).sum().backward()
    for ours, ref in ((layer.lora_A, a), (layer.lora_B, b)):
        rel = (ours.grad.double() - ref.grad).norm() / ref.grad.norm()
        assert rel < 64 * ULP[half], rel.item()


def test_explicit_dtype_conversion_by_the_user_wins():
    model = tiny_roberta(dtype=torch.bfloat16)
    loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", target_modules=["query"]))
    layer = model.roberta.encoder.layer[0].attention.self.query
    assert layer.lora_A.dtype == torch.float32
    model.half()
    assert layer.lora_A.dtype == layer.magnitude.dtype == layer.weight.dtype == torch.float16
    model.to(torch.float32)
    assert layer.lora_A.dtype == layer.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_bf16_model_with_fp32_adapters_end_to_end(method):
    """A bf16 RoBERTa: the bf16 base's logits at init, finite fp32 grads, merges that keep every layer bf16."""
    base = tiny_roberta(dtype=torch.bfloat16).eval()
    model = tiny_roberta(dtype=torch.bfloat16).eval()
    cfg = loralib.AdapterConfig(method=method, target_modules=["query", "value", "intermediate.dense"])
    loralib.apply_adapters(model, cfg)
    loralib.allow_joint_magnitude_training(model)
    batch = token_batch()
    assert torch.equal(model(**batch).logits, base(**batch).logits)
    model.train()
    model(**batch).logits.float().square().sum().backward()
    for _, layer in loralib.adapter_layers(model):
        assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()
    with torch.no_grad():
        for _, layer in loralib.adapter_layers(model):
            layer.lora_B.normal_(std=0.1)
    loralib.merge_adapters(model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n and "magnitude" not in n} == {
        torch.bfloat16
    }
    plain = loralib.merge_and_unload(model)
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
