"""State that follows the model: save_pretrained / loralib.from_pretrained, merge state across .to() and state-dict
round trips, and layers that are refused or flagged because their forward would never run."""

from __future__ import annotations

import logging
import sys
import types
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import loralib
from tests.helpers import tiny_gpt2, tiny_roberta, token_batch

# (method, model, targets): Linear (incl. non-square), Conv1D (GPT-2, fan_in_fan_out) and Embedding layers
CASES = [
    (method, family, targets)
    for method in ("lora", "dora", "bidora")
    for family, targets in (
        ("roberta", ["query", "value", "intermediate.dense"]),
        ("roberta", ["word_embeddings", "query"]),
        ("gpt2", ["c_attn", "c_proj"]),
    )
    if not (method == "bidora" and "word_embeddings" in targets)
]


def build(family, method, targets, dtype=torch.float64):
    model = (tiny_roberta(dtype=dtype) if family == "roberta" else tiny_gpt2().to(dtype)).eval()
    saved = ["classifier"] if family == "roberta" else []
    loralib.apply_adapters(
        model, loralib.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=targets, modules_to_save=saved)
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in loralib.adapter_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen, dtype=layer.lora_B.dtype) * 0.1)
            if layer.decomposed:
                layer.magnitude.mul_(1.1)
    return model


def outputs(model, family):
    batch = token_batch(vocab=50 if family == "gpt2" else 100)
    if family == "gpt2":
        batch.pop("attention_mask")
    return model(**batch).logits


AUTO = {"roberta": AutoModelForSequenceClassification, "gpt2": AutoModelForCausalLM}


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("method,family,targets", CASES)
def test_save_pretrained_round_trip(method, family, targets, merged, tmp_path):
    model = build(family, method, targets)
    reference = outputs(model, family).detach()
    if merged:
        loralib.merge_adapters(model)
    model.save_pretrained(tmp_path)
    loaded = loralib.from_pretrained(AUTO[family], tmp_path, dtype=torch.float64).eval()
    assert [layer.merged for _, layer in loralib.adapter_layers(loaded)] == [merged] * len(
        loralib.adapter_layers(model)
    )
    torch.testing.assert_close(outputs(loaded, family), reference, rtol=1e-12, atol=1e-12)
    # trainable flags as apply_adapters sets them; the adapter config came back
    assert loralib.get_adapter_config(loaded) == loralib.get_adapter_config(model)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    if merged:  # the merge state came back too: unmerging gives the unmerged model, and the pristine base weights
        loralib.unmerge_adapters(loaded)
        torch.testing.assert_close(outputs(loaded, family), reference, rtol=1e-12, atol=1e-12)
        pristine = build(family, method, targets)
        for (name, layer), (_, original) in zip(loralib.adapter_layers(loaded), loralib.adapter_layers(pristine)):
            torch.testing.assert_close(layer.weight, original.weight, rtol=1e-13, atol=1e-13, msg=name)


def test_plain_from_pretrained_warns_that_adapters_are_dropped(tmp_path, caplog):
    model = build("roberta", "dora", ["query"])
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("UNEXPECTED" in m and "lora_A" in m and "magnitude" in m for m in warned)


def test_from_pretrained_refuses_a_folder_without_adapters(tmp_path):
    tiny_roberta().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="records no loralib adapters"):
        loralib.from_pretrained(AutoModelForSequenceClassification, tmp_path)


def test_merge_and_unload_saves_a_plain_model(tmp_path):
    model = build("roberta", "dora", ["query", "value"])
    reference = outputs(model, "roberta").detach()
    loralib.merge_and_unload(model).save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not hasattr(plain.config, loralib.model.CONFIG_KEY)
    torch.testing.assert_close(outputs(plain, "roberta"), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_state_follows_to_and_dtype_conversions(method):
    """DoRA merge, then .to(another device), then unmerge: the merge scale used to stay on the old device."""
    model = build("roberta", method, ["query", "value"])
    loralib.merge_adapters(model)
    model.to("meta")
    assert loralib.unmerge_adapters(model) == 4  # would raise on a device mismatch
    model = build("roberta", method, ["query", "value"])
    w0 = {n: layer.weight.detach().clone() for n, layer in loralib.adapter_layers(model)}
    loralib.merge_adapters(model)
    model.float()
    for _, layer in loralib.adapter_layers(model):
        if layer.decomposed:
            assert layer._merge_scale.dtype == torch.float32
    loralib.unmerge_adapters(model)
    for name, layer in loralib.adapter_layers(model):
        torch.testing.assert_close(layer.weight.double(), w0[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_state_dict_round_trip_keeps_merge_state(method):
    model = build("roberta", method, ["query", "value"])
    loralib.merge_adapters(model)
    reference = outputs(model, "roberta").detach()
    fresh = build("roberta", method, ["query", "value"])
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert all(layer.merged for _, layer in loralib.adapter_layers(fresh))
    torch.testing.assert_close(outputs(fresh, "roberta"), reference, rtol=1e-12, atol=1e-12)
    assert loralib.merge_adapters(fresh) == 0  # no double merge
    extra = [v for k, v in model.state_dict().items() if k.endswith("_extra_state")]
    assert extra and all(isinstance(v, torch.Tensor) for v in extra)  # safetensors-serialisable


def test_merge_state_written_as_a_dict_by_older_versions_still_loads():
    model = build("roberta", "dora", ["query"])
    layer = loralib.adapter_layers(model)[0][1]
    scale = (layer.magnitude / layer.weight_norm()).detach()
    layer.set_extra_state({"merged": True, "merge_scale": scale})
    assert layer.merged and torch.equal(layer._merge_scale, scale)


def test_merge_state_of_another_layer_is_refused():
    model = build("roberta", "dora", ["query"])
    layer = loralib.adapter_layers(model)[0][1]
    with pytest.raises(ValueError, match="saved from another layer"):
        layer.set_extra_state(torch.zeros(3, dtype=torch.float64))


# ---- layers that cannot be adapted, or whose adapter would never run ---------------------------------------------
def test_torch_dynamic_quantised_linear_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantised = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(TypeError, match=r"'0' is a torch quantised Linear: loralib adapts only floating-point"):
        loralib.apply_adapters(quantised, loralib.AdapterConfig(method="lora", target_modules=["0"]))


def test_bitsandbytes_style_linear_is_refused_by_name(monkeypatch):
    """bitsandbytes' Linear4bit subclasses nn.Linear with a uint8 weight (bitsandbytes itself needs a GPU build)."""
    fake = types.ModuleType("bitsandbytes.nn.modules")
    Linear4bit = type("Linear4bit", (nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    fake.Linear4bit = Linear4bit
    monkeypatch.setitem(sys.modules, "bitsandbytes.nn.modules", fake)
    layer = Linear4bit(4, 4)
    layer.weight = nn.Parameter(torch.zeros(8, 1, dtype=torch.uint8), requires_grad=False)
    model = nn.Sequential(layer)
    for method in ("lora", "dora"):
        with pytest.raises(TypeError, match=r"is a bitsandbytes Linear4bit: loralib adapts only floating-point"):
            loralib.apply_adapters(model, loralib.AdapterConfig(method=method, target_modules=["0"]))


def test_integer_weight_is_refused_even_in_an_unknown_class():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="torch.int8 weight"):
        loralib.apply_adapters(nn.Sequential(layer), loralib.AdapterConfig(method="lora", target_modules=["0"]))


@pytest.mark.parametrize("target", ["self_attn.out_proj", "linear1", "linear2"])
def test_children_that_torch_transformer_layers_read_directly_are_refused(target):
    model = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(TypeError, match="reads its weight directly"):
        loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", target_modules=[target]))


class ReadsChildWeight(nn.Module):
    """A parent that uses its child's weight itself: the kind the first-forward check catches."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.bypassed = nn.Linear(4, 4)

    def forward(self, x):
        return torch.nn.functional.linear(self.used(x), self.bypassed.weight)


def test_adapters_whose_forward_never_runs_are_flagged_at_the_first_forward():
    model = ReadsChildWeight()
    loralib.apply_adapters(model, loralib.AdapterConfig(method="lora", target_modules=["used", "bypassed"]))
    with pytest.warns(UserWarning, match=r"1 adapted layer\(s\) did not run .*'bypassed'"):
        model(torch.randn(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 4))  # checked once, then the hooks are gone
    assert not model.used._forward_hooks and not model._forward_hooks


def test_a_model_that_runs_every_adapter_is_not_flagged():
    model = build("roberta", "dora", ["query", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        outputs(model, "roberta")


def test_bidora_refuses_a_training_step_that_would_train_magnitudes_jointly():
    """A BiDoRA model handed to a plain loop (transformers.Trainer) would silently train as DoRA."""
    model = build("roberta", "bidora", ["query", "value"]).train()
    with pytest.raises(RuntimeError, match="loralib.BiDoRATrainer"):
        outputs(model, "roberta")
    with torch.no_grad():  # inference, and evaluation in train mode without gradients, are fine
        outputs(model, "roberta")
    model.eval()
    outputs(model, "roberta")
    for p in loralib.magnitude_parameters(model):
        p.requires_grad_(False)  # magnitudes frozen (BiDoRA's retraining phase): fine
    outputs(model.train(), "roberta").sum().backward()
    for p in loralib.magnitude_parameters(model):
        p.requires_grad_(True)
    loralib.allow_joint_magnitude_training(model)  # a custom loop that says so
    outputs(model, "roberta").sum().backward()
    assert all(p.grad is not None for p in loralib.magnitude_parameters(model))


def test_bidora_under_a_plain_trainer_fails_naming_bidora_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tests.helpers import Tokens

    model = build("roberta", "bidora", ["query", "value"], dtype=torch.float32)
    args = TrainingArguments(str(tmp_path), max_steps=2, report_to="none", use_cpu=True, disable_tqdm=True)
    with pytest.raises(RuntimeError, match="BiDoRATrainer"):
        Trainer(model=model, args=args, train_dataset=Tokens()).train()


def test_eval_norm_cache_sees_fused_optimizer_updates():
    """torch.optim.AdamW(fused=True) (transformers' default optim) updates A and B without bumping their version
    counters; an evaluation after a training step must not reuse the norm cached by an earlier evaluation."""
    model = build("roberta", "dora", ["query", "value"], dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        outputs(model, "roberta")  # fills the eval-mode norm cache
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    outputs(model, "roberta").square().sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        got = outputs(model, "roberta")
    fresh = build("roberta", "dora", ["query", "value"], dtype=torch.float32).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(got, outputs(fresh, "roberta"), rtol=0, atol=0)
