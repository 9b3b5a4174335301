"""loralib's one adapter format, PEFT's, on tiny float32 models: what ``save_adapters`` writes loads in PEFT without
warnings (outputs within 1e-6) and back in loralib bitwise; the PEFT layouts loralib reads, each against PEFT's own
load of the same folder; the refusals; the model card."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import loralib
from loralib.peft_compat import METADATA_KEYS
from tests.helpers import perturb_by_name as perturb
from tests.helpers import save_version_1, tiny_gpt2, tiny_roberta, token_batch

peft = pytest.importorskip("peft")

QKI = ["query", "value", "intermediate.dense"]
RTOL, ATOL = 1e-6, 1e-6  # PEFT computes DoRA's norm densely, loralib factored: fp32 rounding differs


def roberta():
    return tiny_roberta().eval()


def roberta_base():  # a model without a head: PEFT task type FEATURE_EXTRACTION
    return tiny_roberta().roberta.eval()


def gpt2():
    return tiny_gpt2().eval()


def llama(vocab=64, seed=0):
    """A 2-layer Llama (``embed_tokens``, untied ``lm_head``), its vocabulary resized from 60 to ``vocab`` (the
    new rows drawn with ``seed``, so a folder's saved rows must win)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    if vocab != 60:
        torch.manual_seed(seed)
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.eval()


BATCHES = {
    roberta: token_batch(),
    roberta_base: token_batch(),
    gpt2: token_batch(vocab=50),
    llama: token_batch(vocab=60),
}


def out(model, base_fn):
    result = model(**BATCHES[base_fn])
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def quietly(load):
    """``load()``, failing on any Python warning or transformers / PEFT log record at WARNING or above. The one
    FutureWarning transformers raises when PEFT asks ``is_gradient_checkpointing`` is PEFT's, not the folder's."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = load()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    caught = [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]
    assert not caught and not records, (caught, [r.getMessage() for r in records])
    return result


# ---- what save_adapters writes ----------------------------------------------------------------------------------
# (id, model, AdapterConfig kwargs)
SAVE_CASES = [
    (
        "roberta-bidora-detached",
        roberta,
        dict(method="bidora", target_modules=QKI, modules_to_save=["classifier"], detach_norm=True),
    ),
    (
        "roberta-dora-all-linear",
        roberta,
        dict(method="dora", target_modules="all-linear", autocast_adapter_dtype=False),
    ),
    (
        "roberta-lora-regex-patterns",
        roberta,
        dict(
            method="lora",
            target_modules=r".*layer\.1\..*(query|key)",
            use_rslora=True,
            rank_pattern={"query": 2},
            alpha_pattern={"key": 3.5},
        ),
    ),
    ("roberta-base-dora", roberta_base, dict(method="dora", target_modules=["query", "value"])),
    ("gpt2-bidora", gpt2, dict(method="bidora", target_modules=["c_attn", "c_proj"])),
    ("gpt2-dora-embedding", gpt2, dict(method="dora", target_modules=["wte", "c_fc"])),
]


@pytest.mark.parametrize("base_fn,kwargs", [c[1:] for c in SAVE_CASES], ids=[c[0] for c in SAVE_CASES])
def test_saved_folder_loads_in_peft_and_back_bitwise(base_fn, kwargs, tmp_path):
    model = base_fn()
    cfg = loralib.AdapterConfig(r=4, lora_alpha=8, **kwargs)
    loralib.apply_adapters(model, cfg)
    perturb(model)
    model.eval()
    expected = out(model, base_fn)
    loralib.save_adapters(model, tmp_path)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}  # PEFT's keys only
    quietly(lambda: peft.LoraConfig.from_pretrained(str(tmp_path)))
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert set(metadata) == {"format", *METADATA_KEYS} and metadata["format"] == "pt"
    assert json.loads(metadata["loralib_config"]) == cfg.to_dict() and metadata["loralib_method"] == cfg.method

    theirs = quietly(lambda: peft.PeftModel.from_pretrained(base_fn(), tmp_path)).eval()
    torch.testing.assert_close(out(theirs, base_fn), expected, rtol=RTOL, atol=ATOL)

    back = loralib.load_adapters(base_fn(), tmp_path).eval()
    assert loralib.get_adapter_config(back) == cfg  # BiDoRA, detach_norm, autocast, all-linear, the regex: all back
    assert [(n, type(m)) for n, m in loralib.adapter_layers(back)] == [
        (n, type(m)) for n, m in loralib.adapter_layers(model)
    ]
    torch.testing.assert_close(out(back, base_fn), expected, rtol=0, atol=0)
    trainable = {n for n, p in back.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}  # a head PEFT needed stays frozen


@pytest.mark.parametrize("method", ["lora", "bidora"])
def test_auto_peft_model_loads_without_warnings(method, tmp_path):
    from transformers import AutoModelForSequenceClassification

    roberta().save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    loralib.apply_adapters(model, loralib.AdapterConfig(method=method, r=2, target_modules=["query", "value"]))
    perturb(model)
    model.eval()
    loralib.save_adapters(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base"
    )
    theirs = quietly(lambda: peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")).eval()
    torch.testing.assert_close(out(theirs, roberta), out(model, roberta), rtol=RTOL, atol=ATOL)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"`{tmp_path / 'base'}`" in card  # a local path: named in the card, not in the YAML header


def test_read_adapter_tensors_same_for_both_formats(tmp_path):
    model = roberta()
    loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", r=2, target_modules=QKI))
    perturb(model)
    loralib.save_adapters(model, tmp_path / "now")
    save_version_1(model, tmp_path / "before")
    now, before = (loralib.io.read_adapter_tensors(tmp_path / d) for d in ("now", "before"))
    assert set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in now)
    assert loralib.read_adapter_config(tmp_path / "now")["adapted_modules"] == loralib.read_adapter_config(
        tmp_path / "before"
    )["adapted_modules"]


# ---- PEFT's layouts, each against PEFT's own load of the same folder --------------------------------------------
def peft_save(base_fn, directory, seed=1, save_kwargs=None, adapter_name="default", **config):
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **config})
    model = peft.get_peft_model(base_fn(), config, adapter_name=adapter_name, autocast_adapter_dtype=False)
    perturb(model, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, **(save_kwargs or {}))
    return model.eval()


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def rename_keys(directory, old, new):
    path = directory / "adapter_model.safetensors"
    save_file({k.replace(old, new): v for k, v in load_file(path).items()}, str(path), metadata={"format": "pt"})


def same_as_peft(base_fn, directory, reference=None, base_kwargs=None):
    """loralib's load of ``directory`` equals PEFT's own load of it (and ``reference``, the model PEFT saved)."""
    make = (lambda: base_fn(**base_kwargs)) if base_kwargs else base_fn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), directory).eval()
    ours = loralib.load_adapters(make(), directory).eval()
    expected = out(theirs, base_fn)
    torch.testing.assert_close(out(ours, base_fn), expected, rtol=RTOL, atol=ATOL)
    if reference is not None:
        torch.testing.assert_close(out(reference, base_fn), expected, rtol=RTOL, atol=ATOL)
    return ours


def test_peft_021_save(tmp_path):
    reference = peft_save(roberta, tmp_path, target_modules=QKI, use_dora=True, task_type="SEQ_CLS")
    ours = same_as_peft(roberta, tmp_path, reference)
    assert loralib.get_adapter_config(ours).modules_to_save == ["classifier", "score"]


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None])
def test_modules_to_save_null_with_head_keys(task_type, tmp_path):
    """Older PEFT releases saved a classifier's head with ``modules_to_save: null``."""
    reference = peft_save(roberta, tmp_path, target_modules=QKI, modules_to_save=["classifier"], task_type=task_type)
    edit_config(tmp_path, modules_to_save=None)
    assert any(k.startswith("base_model.model.classifier.") for k in load_file(tmp_path / "adapter_model.safetensors"))
    ours = same_as_peft(roberta, tmp_path, reference)
    # a task class makes the head a saved module (trainable), as PEFT's does; without one PEFT loads it frozen
    expected = ["classifier"] if task_type else []
    assert loralib.get_adapter_config(ours).modules_to_save == expected
    assert ours.classifier.dense.weight.requires_grad is bool(task_type)


@pytest.mark.parametrize("use_dora", [False, True])
def test_base_layer_keys_of_a_resized_embedding(use_dora, tmp_path):
    """``embed_tokens`` and ``lm_head`` adapted after a vocabulary resize: PEFT saves their base weights as
    ``.base_layer.weight`` (an Embedding's and a Linear's)."""
    reference = peft_save(
        llama,
        tmp_path,
        save_kwargs={"save_embedding_layers": True},
        target_modules=["embed_tokens", "lm_head", "q_proj"],
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    keys = load_file(tmp_path / "adapter_model.safetensors")
    for module in ("model.embed_tokens", "lm_head"):
        assert f"base_model.model.{module}.base_layer.weight" in keys
    ours = same_as_peft(llama, tmp_path, reference, base_kwargs={"seed": 5})  # other new rows: the file's win
    assert loralib.get_adapter_config(ours).method == ("dora" if use_dora else "lora")


def test_resized_embedding_not_adapted(tmp_path):
    reference = peft_save(
        llama, tmp_path, save_kwargs={"save_embedding_layers": True}, target_modules=["q_proj"], task_type="CAUSAL_LM"
    )
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(keys)
    same_as_peft(llama, tmp_path, reference, base_kwargs={"seed": 5})


def test_adapter_model_bin(tmp_path):
    reference = peft_save(
        roberta, tmp_path, save_kwargs={"safe_serialization": False}, target_modules=QKI, use_dora=True,
        task_type="SEQ_CLS",
    )
    assert not (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_model.bin").is_file()
    same_as_peft(roberta, tmp_path, reference)


def test_one_adapter_of_a_several_adapter_save(tmp_path):
    model = peft.get_peft_model(roberta(), peft.LoraConfig(r=2, target_modules=["query"]), autocast_adapter_dtype=False)
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["value"], use_dora=True))
    perturb(model)
    model.save_pretrained(tmp_path)  # "default" at the top, "second" in a subfolder
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    same_as_peft(roberta, tmp_path / "second")
    same_as_peft(roberta, tmp_path)


@pytest.mark.parametrize("suffix", ["lora_magnitude_vector", "lora_magnitude_vector.weight"])
def test_magnitude_key_names(suffix, tmp_path):
    reference = peft_save(gpt2, tmp_path, target_modules=["c_attn"], use_dora=True, task_type="CAUSAL_LM")
    rename_keys(tmp_path, "lora_magnitude_vector", suffix)
    assert any(k.endswith(suffix) for k in load_file(tmp_path / "adapter_model.safetensors"))
    same_as_peft(gpt2, tmp_path, reference)


@pytest.mark.parametrize("base_fn,task_type", [(roberta_base, "FEATURE_EXTRACTION"), (gpt2, "CAUSAL_LM"), (gpt2, None)])
def test_task_types_without_a_head(base_fn, task_type, tmp_path):
    targets = ["c_attn", "c_fc"] if base_fn is gpt2 else ["query", "value"]
    reference = peft_save(base_fn, tmp_path, target_modules=targets, use_dora=True, task_type=task_type)
    same_as_peft(base_fn, tmp_path, reference)


# ---- refusals: each says what to do, and changes nothing ------------------------------------------------------
def refused(directory, message, base_fn=roberta):
    model = base_fn()
    with pytest.raises(ValueError, match=message):
        loralib.load_adapters(model, directory)
    assert loralib.get_adapter_config(model) is None and not loralib.adapter_layers(model)


def test_refusals(tmp_path):
    peft_save(roberta, tmp_path / "a", target_modules=["query"], task_type="SEQ_CLS")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "base_model.model.pooler.dense.weight": torch.zeros(2, 2)}, str(path))
    refused(tmp_path / "a", r"names no parameter of this RobertaForSequenceClassification; load the adapter into")
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, str(path))
    refused(tmp_path / "a", r"does not start with 'base_model.model.'.*save the adapter with PEFT's save_pretrained")
    path.unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"not a pickle")
    refused(tmp_path / "a", r"adapter_model.bin is not a readable PyTorch weights file .*save the adapter again")

    peft_save(llama, tmp_path / "b", save_kwargs={"save_embedding_layers": True}, target_modules=["embed_tokens"])
    refused(tmp_path / "b", r"resize the model's vocabulary first \(model.resize_token_embeddings\(64\)\)",
            base_fn=lambda: llama(vocab=60))

    model = roberta()
    loralib.apply_adapters(model, loralib.AdapterConfig(method="bidora", r=2, target_modules=["query"]))
    loralib.save_adapters(model, tmp_path / "c")
    edit_config(tmp_path / "c", r=3)
    refused(tmp_path / "c", r"adapter_config.json says r=3 but the loralib config .* says r=2: the folder was edited")
    with pytest.raises(ValueError, match="not written by loralib.*load it with loralib.load_adapters"):
        loralib.read_adapter_config(tmp_path / "a")


# ---- the model card --------------------------------------------------------------------------------------------
def adapted_roberta():
    model = roberta()
    loralib.apply_adapters(model, loralib.AdapterConfig(method="bidora", r=4, lora_alpha=8, target_modules=QKI))
    model.config._name_or_path = "FacebookAI/roberta-base"
    return model


def test_model_card_content(tmp_path):
    loralib.save_adapters(
        adapted_roberta(),
        tmp_path,
        training_data="GLUE RTE train split (2,490 examples)",
        metrics={"validation": {"accuracy": 0.75}, "steps": 120},
    )
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nbase_model: \"FacebookAI/roberta-base\"\nlibrary_name: peft\n")
    assert loralib.model_card.MARKER in card
    for text in ("bidora", "FacebookAI/roberta-base", "| rank r | 4 |", "| lora_alpha | 8 |", "`intermediate.dense`",
                 "(6 modules)", "GLUE RTE train split", "| validation / accuracy | 0.75 |", "| steps | 120 |",
                 "PeftModel.from_pretrained", "loralib.load_adapters"):
        assert text in card, text


def test_model_card_keeps_a_readme_loralib_did_not_write(tmp_path):
    model = adapted_roberta()
    (tmp_path / "README.md").write_text("# my notes\n")
    with pytest.warns(UserWarning, match=r"README.md exists and was not written by loralib: kept as it is"):
        loralib.save_adapters(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    assert (tmp_path / "adapter_model.safetensors").is_file()  # the adapter is saved all the same
    loralib.save_adapters(model, tmp_path, model_card="overwrite")
    assert loralib.model_card.MARKER in (tmp_path / "README.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loralib.save_adapters(model, tmp_path, metrics={"accuracy": 0.5})  # loralib's own card: replaced quietly
    assert "| accuracy | 0.5 |" in (tmp_path / "README.md").read_text()
    loralib.save_adapters(model, tmp_path / "none", model_card=False)
    assert not (tmp_path / "none" / "README.md").exists()
    with pytest.raises(ValueError, match="model_card must be True, False or 'overwrite'"):
        loralib.save_adapters(model, tmp_path / "bad", model_card="yes")
    assert not (tmp_path / "bad").exists()  # refused before writing anything
