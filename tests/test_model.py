"""Model-level API on tiny transformers models: injection, parameter roles, merge, save/load, PEFT export, errors."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

import loralib
from tests import helpers
from tests.helpers import METHODS, perturb, tiny_gpt2, tiny_roberta, token_batch

TARGETS = ["query", "value", "intermediate.dense"]  # intermediate.dense is 16 -> 40: non-square


def logits(model, batch):
    return model(**batch).logits


adapted = partial(helpers.adapted, dtype=torch.float64, targets=TARGETS)

@pytest.mark.parametrize("method", METHODS)
def test_init_equals_pretrained(method):
    base = tiny_roberta(dtype=torch.float64).eval()
    model = adapted(method).eval()
    batch = token_batch()
    torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=1e-12, atol=1e-12)
    names = {n for n, _ in loralib.adapter_layers(model)}
    assert "roberta.encoder.layer.0.intermediate.dense" in names
    layer = model.get_submodule("roberta.encoder.layer.0.intermediate.dense")
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (40, 4)
    if layer.decomposed:
        torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(layer.weight, dim=1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_keys_of_pretrained_are_unchanged(method):
    base_keys = set(tiny_roberta().state_dict())
    model = adapted(method, dtype=torch.float32)
    assert base_keys <= set(model.state_dict())
    # pretrained weights load straight into the adapted model
    missing, unexpected = model.load_state_dict(tiny_roberta(seed=5).state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k or k.endswith((".magnitude", "_extra_state")) for k in missing)


@pytest.mark.parametrize("method", METHODS)
def test_parameter_roles(method):
    model = adapted(method)
    direction = loralib.direction_parameters(model)
    magnitude = loralib.magnitude_parameters(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not ({id(p) for p in direction} & {id(p) for p in magnitude})
    assert {id(p) for p in direction} | {id(p) for p in magnitude} == trainable
    assert len(magnitude) == (0 if method == "lora" else 6)
    head = {id(p) for p in model.classifier.parameters()}
    assert head <= {id(p) for p in direction}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "roberta.encoder.layer.0.attention.self.query.weight" in frozen
    assert "roberta.embeddings.word_embeddings.weight" in frozen


@pytest.mark.parametrize("method", METHODS)
def test_eval_switches_adapter_layers(method):
    model = adapted(method, lora_dropout=0.5)
    perturb(model)
    batch = token_batch()
    model.train()
    assert all(layer.training and layer.lora_dropout.training for _, layer in loralib.adapter_layers(model))
    model.eval()
    assert not any(layer.training or layer.lora_dropout.training for _, layer in loralib.adapter_layers(model))
    torch.testing.assert_close(logits(model, batch), logits(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_round_trip(method):
    model = adapted(method).eval()
    perturb(model)
    batch = token_batch()
    before = logits(model, batch)
    weight = model.roberta.encoder.layer[0].attention.self.query.weight.detach().clone()
    assert loralib.merge_adapters(model) == 6
    torch.testing.assert_close(logits(model, batch), before, rtol=1e-10, atol=1e-10)
    assert loralib.merge_adapters(model) == 0  # no double merge
    torch.testing.assert_close(logits(model, batch), before, rtol=1e-10, atol=1e-10)

    # merge state survives a state-dict round trip: the reloaded model is not merged a second time
    fresh = adapted(method, seed=3).eval()
    fresh.load_state_dict(model.state_dict())
    assert all(layer.merged for _, layer in loralib.adapter_layers(fresh))
    assert loralib.merge_adapters(fresh) == 0
    torch.testing.assert_close(logits(fresh, batch), before, rtol=1e-10, atol=1e-10)

    assert loralib.unmerge_adapters(model) == 6
    torch.testing.assert_close(
        model.roberta.encoder.layer[0].attention.self.query.weight, weight, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(logits(model, batch), before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_saves_as_vanilla_transformers(method, tmp_path):
    model = adapted(method, dtype=torch.float32).eval()
    perturb(model)
    batch = token_batch()
    before = logits(model, batch)
    plain = loralib.merge_and_unload(model)
    assert not loralib.adapter_layers(plain)
    assert type(plain.roberta.encoder.layer[0].attention.self.query) is nn.Linear
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, batch), before, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite():
    model = adapted("dora")
    layer = model.roberta.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        loralib.merge_adapters(model)
    assert torch.equal(layer.weight, weight) and not layer.merged


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tmp_path):
    model = adapted(method).eval()
    perturb(model)
    batch = token_batch()
    before = logits(model, batch)
    loralib.save_adapters(model, tmp_path / "adapter")
    meta = loralib.read_adapter_config(tmp_path / "adapter")  # the loralib view of the PEFT-format folder
    assert meta["config"]["method"] == method and meta["base_model_class"] == "RobertaForSequenceClassification"

    # into a fresh pretrained model, adapters applied by load_adapters from the saved config
    fresh = tiny_roberta(dtype=torch.float64).eval()
    loralib.load_adapters(fresh, tmp_path / "adapter")
    fresh.eval()
    torch.testing.assert_close(logits(fresh, batch), before, rtol=0, atol=0)

    # into a model that already has (different) adapters of the same shape
    other = adapted(method, seed=0).eval()
    loralib.load_adapters(other, tmp_path / "adapter")
    torch.testing.assert_close(logits(other, batch), before, rtol=0, atol=0)


def test_load_rejects_mismatches(tmp_path):
    model = adapted("dora")
    loralib.save_adapters(model, tmp_path / "a")
    with pytest.raises(ValueError, match="method"):
        loralib.load_adapters(adapted("lora"), tmp_path / "a")
    other_rank = tiny_roberta(dtype=torch.float64)
    loralib.apply_adapters(
        other_rank, loralib.AdapterConfig(method="dora", r=2, target_modules=TARGETS, modules_to_save=["classifier"])
    )
    with pytest.raises(ValueError, match="r="):
        loralib.load_adapters(other_rank, tmp_path / "a")
    gpt = tiny_gpt2()
    with pytest.raises(ValueError, match="saved for a RobertaForSequenceClassification"):
        loralib.load_adapters(gpt, tmp_path / "a")
    fewer = tiny_roberta(dtype=torch.float64)
    loralib.apply_adapters(
        fewer, loralib.AdapterConfig(method="dora", r=4, target_modules=["query"], modules_to_save=["classifier"])
    )
    with pytest.raises(ValueError, match="do not fit"):
        loralib.load_adapters(fewer, tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        loralib.load_adapters(adapted("dora"), tmp_path / "missing")


@pytest.mark.parametrize("method", METHODS)
def test_peft_export_round_trip(method, tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted(method, dtype=torch.float32).eval()
    perturb(model)
    batch = token_batch()
    before = logits(model, batch)
    loralib.export_peft(model, tmp_path / "peft")
    base = tiny_roberta(dtype=torch.float32)  # same seed: the same "pretrained" weights
    with torch.no_grad():
        base.classifier.dense.weight.zero_()  # prove the head comes from the export, not the base
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model, batch), before, rtol=1e-5, atol=1e-5)


def test_conv1d_gpt2_and_embedding():
    model = tiny_gpt2().double().eval()
    ids = torch.randint(0, 50, (2, 5))
    before = model(ids).logits
    loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", r=2, target_modules=["c_attn", "wte"]))
    assert isinstance(model.transformer.h[0].attn.c_attn, loralib.DoRAConv1D)
    assert isinstance(model.transformer.wte, loralib.DoRAEmbedding)
    model.eval()
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-12, atol=1e-12)
    perturb(model)
    after = model(ids).logits
    with pytest.raises(ValueError, match="tied weights"):  # wte is tied to lm_head
        loralib.merge_adapters(model)
    assert not any(layer.merged for _, layer in loralib.adapter_layers(model))
    loralib.merge_and_unload(model)  # unties: the adapted embedding gets its own merged weight
    assert model.transformer.wte.weight is not model.lm_head.weight
    torch.testing.assert_close(model(ids).logits, after, rtol=1e-10, atol=1e-10)


def test_conv1d_merge_in_place():
    model = tiny_gpt2().double().eval()
    ids = torch.randint(0, 50, (2, 5))
    loralib.apply_adapters(model, loralib.AdapterConfig(method="bidora", r=2, target_modules=["c_attn", "c_proj"]))
    model.eval()
    perturb(model)
    after = model(ids).logits
    assert loralib.merge_adapters(model) == 6  # c_attn, attn.c_proj, mlp.c_proj x 2 blocks
    torch.testing.assert_close(model(ids).logits, after, rtol=1e-10, atol=1e-10)


def test_orthogonality_penalty_matches_formula():
    model = adapted("bidora")
    perturb(model)
    expected = []
    for _, layer in loralib.adapter_layers(model):
        w = (layer.weight + layer.scaling * layer.lora_B @ layer.lora_A).detach()
        v = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
        expected.append(torch.sqrt(((v @ v.T - torch.eye(v.shape[0], dtype=v.dtype)) ** 2).sum()))
    penalty = loralib.orthogonality_penalty(model)
    torch.testing.assert_close(penalty, torch.stack(expected).mean(), rtol=1e-12, atol=0)
    penalty.backward()
    assert model.roberta.encoder.layer[0].attention.self.query.lora_A.grad is not None
    with pytest.raises(ValueError, match="DoRA/BiDoRA"):
        loralib.orthogonality_penalty(adapted("lora"))


def test_regex_targets_and_summary():
    model = tiny_roberta()
    summary = loralib.apply_adapters(
        model, loralib.AdapterConfig(method="lora", r=2, target_modules=r".*layer\.0\..*(query|key)")
    )
    assert summary.adapted_modules == [
        "roberta.encoder.layer.0.attention.self.query",
        "roberta.encoder.layer.0.attention.self.key",
    ]
    assert summary.trainable_parameters == 2 * (2 * 16 + 16 * 2)
    assert "trainable params" in str(summary)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -2}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"r": True}, "r must be a positive integer"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"method": "adalora"}, "method"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "("}, "regex"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loralib.AdapterConfig(**kwargs)


def test_bad_layers_and_targets():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        loralib.LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="no module matched"):
        loralib.apply_adapters(tiny_roberta(), loralib.AdapterConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="LayerNorm"):
        loralib.apply_adapters(tiny_roberta(), loralib.AdapterConfig(target_modules=["attention.output.LayerNorm"]))
    with pytest.raises(TypeError, match="Embedding"):  # BiDoRA supports Linear and Conv1D only
        loralib.apply_adapters(
            tiny_roberta(), loralib.AdapterConfig(method="bidora", target_modules=["word_embeddings"])
        )
    with pytest.raises(ValueError, match="modules_to_save"):
        loralib.apply_adapters(tiny_roberta(), loralib.AdapterConfig(modules_to_save=["nonexistent_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        loralib.apply_adapters(tiny_roberta(), loralib.AdapterConfig(modules_to_save=["attention"]))
    model = tiny_roberta()
    loralib.apply_adapters(model, loralib.AdapterConfig())
    with pytest.raises(ValueError, match="already has adapters"):
        loralib.apply_adapters(model, loralib.AdapterConfig())


def test_shared_weights_are_not_copied():
    base = nn.Linear(4, 3)
    layer = loralib.DoRALinear.from_base(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    conv = Conv1D(3, 4)
    assert loralib.LoRAConv1D.from_base(conv, r=2).weight is conv.weight
