"""Adapter folders on tiny RoBERTa in float64: settings mismatches, loading into merged models, damaged files,
per-module scaling in the metadata. Each case runs for the three folder layouts loralib reads from its own saves:
today's (PEFT's format with the loralib metadata), ``export_peft`` of earlier commits (PEFT's format with only
``loralib_method`` in the metadata) and loralib's version-1 schema (earlier ``save_adapters``)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loralib
from tests import helpers
from tests.helpers import save_version_1, tiny_roberta, token_batch

QKI = ["query", "value", "intermediate.dense"]
FORMATS = ["loralib", "peft", "legacy"]


adapted = partial(helpers.adapted, dtype=torch.float64, targets=QKI, eval_mode=True)
perturb = partial(helpers.perturb, move_a=True)  # A moved as well


def save(model, directory, fmt):
    if fmt == "legacy":
        save_version_1(model, directory)
        return directory
    loralib.save_adapters(model, directory)
    if fmt == "peft":  # export_peft of earlier commits: PEFT's folder, only the method in the metadata
        path = directory / "adapter_model.safetensors"
        with safe_open(str(path), "pt") as handle:
            method = handle.metadata()["loralib_method"]
        save_file(load_file(path), str(path), metadata={"format": "pt", "loralib_method": method})
    return directory


def logits(model):
    return model(**token_batch()).logits


def saved_state(model):
    return {k: v.detach().clone() for k, v in loralib.adapter_state_dict(model).items()}


# ---- settings mismatches --------------------------------------------------------------------------------------
# (id, saved adapter's settings, model adapter's settings, message)
MISMATCH_CASES = [
    (
        "lora_alpha",
        dict(lora_alpha=16),
        dict(lora_alpha=8),
        r"lora_alpha=16\.0, the model's adapters have lora_alpha=8\.0",
    ),
    ("use_rslora", dict(use_rslora=True), dict(), "use_rslora=True, the model's adapters have use_rslora=False"),
    ("r", dict(r=4), dict(r=2), "r=4, the model's adapters have r=2"),
    ("rank_pattern", dict(rank_pattern={"value": 2}), dict(), r"r=2 for module .*value.*rank_pattern=\{'value': 2\}"),
    ("alpha_pattern", dict(), dict(alpha_pattern={"query": 3}), r"lora_alpha=8\.0 for module .*query"),
    ("method", dict(method="dora"), dict(method="bidora"), "method='dora', the model's adapters have method='bidora'"),
    ("method-lora", dict(method="lora"), dict(method="dora"), "method='lora'"),
    ("targets", dict(target_modules=["query", "value"]), dict(target_modules=["query"]), "do not fit this model"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "saved,model_kwargs,message", [c[1:] for c in MISMATCH_CASES], ids=[c[0] for c in MISMATCH_CASES]
)
def test_mismatched_settings_are_refused(saved, model_kwargs, message, fmt, tmp_path):
    directory = save(perturb(adapted(**saved)), tmp_path / "a", fmt)
    model = perturb(adapted(**model_kwargs), seed=5)
    before = saved_state(model)
    with pytest.raises(ValueError, match=message):
        loralib.load_adapters(model, directory)
    after = saved_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before anything was copied


def test_same_settings_written_differently_load(tmp_path):
    """Patterns count through their effect: rank_pattern={"query": 4} with r=4 is the plain r=4 adapter."""
    directory = save(perturb(adapted()), tmp_path / "a", "loralib")
    model = adapted(rank_pattern={"query": 4}, alpha_pattern={"value": 8})
    loralib.load_adapters(model, directory)


@pytest.mark.parametrize("fmt", ["loralib", "legacy"])
def test_metadata_scaling_is_per_module(fmt, tmp_path):
    model = adapted(rank_pattern={"query": 2}, alpha_pattern={"value": 2}, use_rslora=True)
    save(model, tmp_path, fmt)
    meta = loralib.read_adapter_config(tmp_path)
    assert meta["version"] == (1 if fmt == "legacy" else 2)
    for name, layer in loralib.adapter_layers(model):
        assert meta["module_scaling"][name] == layer.scaling  # the same float the layer computes
    assert meta["scaling"] is None  # not one number any more
    assert meta["module_scaling"]["roberta.encoder.layer.0.attention.self.query"] == pytest.approx(8 / 2**0.5)
    assert meta["module_scaling"]["roberta.encoder.layer.0.attention.self.value"] == pytest.approx(2 / 4**0.5)
    assert meta["module_scaling"]["roberta.encoder.layer.0.intermediate.dense"] == pytest.approx(8 / 4**0.5)
    loralib.save_adapters(adapted(), tmp_path / "uniform")
    assert loralib.read_adapter_config(tmp_path / "uniform")["scaling"] == 2.0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", ["lora", "bidora"])
def test_every_layout_reloads_bitwise(method, fmt, tmp_path):
    model = perturb(adapted(method=method))
    directory = save(model, tmp_path / "a", fmt)
    back = loralib.load_adapters(tiny_roberta(dtype=torch.float64).eval(), directory)
    assert loralib.get_adapter_config(back).method == method
    assert torch.equal(logits(back), logits(model))


# ---- merged models ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_load_into_merged_model(method, fmt, tmp_path):
    directory = save(perturb(adapted(method=method), seed=1), tmp_path / "a", fmt)
    originals = {n: layer.base_weight().detach().clone() for n, layer in loralib.adapter_layers(adapted(method=method))}

    model = perturb(adapted(method=method), seed=2)
    assert loralib.merge_adapters(model) == 6
    loralib.load_adapters(model, directory)
    assert all(layer.merged for _, layer in loralib.adapter_layers(model))  # still merged, now with the new adapter

    reference = perturb(adapted(method=method), seed=7)  # other adapters, replaced by the loaded ones
    loralib.load_adapters(reference, directory)
    unmerged_logits = logits(reference)
    loralib.merge_adapters(reference)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits(model), unmerged_logits, rtol=1e-10, atol=1e-10)

    assert loralib.unmerge_adapters(model) == 6
    for name, layer in loralib.adapter_layers(model):
        torch.testing.assert_close(layer.base_weight(), originals[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits(model), unmerged_logits, rtol=1e-10, atol=1e-10)


# ---- damaged files ----------------------------------------------------------------------------------------------
def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def put_nan(path, value=float("nan")):
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key][0, 0] = value
    save_file(tensors, path)


# (id, file, damage, error type, message)
DAMAGE_CASES = [
    ("weights-truncated", "adapter_model.safetensors", truncate, ValueError, "is not a valid safetensors file"),
    (
        "weights-garbage",
        "adapter_model.safetensors",
        lambda p: p.write_bytes(b"\x00garbage bytes, not a tensor file" * 8),
        ValueError,
        r"is not a valid safetensors file \(truncated or corrupted",
    ),
    ("weights-empty", "adapter_model.safetensors", lambda p: p.write_bytes(b""), ValueError, "not a valid safetensors"),
    ("weights-missing", "adapter_model.safetensors", lambda p: p.unlink(), FileNotFoundError, "adapter_model"),
    ("weights-nan", "adapter_model.safetensors", put_nan, ValueError, r"tensor '.*lora_B.*' .* contains NaN or inf"),
    (
        "weights-inf",
        "adapter_model.safetensors",
        lambda p: put_nan(p, float("-inf")),
        ValueError,
        "contains NaN or inf",
    ),
    ("config-truncated", "adapter_config.json", truncate, ValueError, r"is not valid JSON \(line \d+ col \d+"),
    ("config-binary", "adapter_config.json", lambda p: p.write_bytes(b"\xff\xfe\x00"), ValueError, "not valid JSON"),
    ("config-array", "adapter_config.json", lambda p: p.write_text("[1, 2]"), ValueError, "not an object"),
    ("config-missing", "adapter_config.json", lambda p: p.unlink(), FileNotFoundError, "adapter_config.json"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "filename,damage,error,message", [c[1:] for c in DAMAGE_CASES], ids=[c[0] for c in DAMAGE_CASES]
)
def test_damaged_files_give_one_clear_error(filename, damage, error, message, fmt, tmp_path):
    directory = save(perturb(adapted()), tmp_path / "a", fmt)
    damage(directory / filename)
    fresh = tiny_roberta(dtype=torch.float64)
    with pytest.raises(error, match=message) as info:
        loralib.load_adapters(fresh, directory)
    assert filename in str(info.value) and "\n" not in str(info.value)
    no_chain = info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    assert no_chain  # no library traceback attached
    assert loralib.get_adapter_config(fresh) is None  # nothing applied to the model


def test_read_adapter_config_errors(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"format": "loralib-adapter", "version": 1')
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON \(line 1 col"):
        loralib.read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "loralib-adapter", "version": 1}))
    with pytest.raises(ValueError, match=r"lacks the keys \['config', 'base_model_class', 'adapted_modules'\]"):
        loralib.read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(ValueError, match="neither a loralib adapter config"):
        loralib.load_adapters(tiny_roberta(), tmp_path)
