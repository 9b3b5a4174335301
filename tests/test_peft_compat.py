"""PEFT interoperability on tiny models in float64: PEFT folders -> loralib, loralib -> PEFT, option refusals,
``target_modules="all-linear"`` and rank/alpha patterns (PEFT's matching rule)."""

from __future__ import annotations

import dataclasses
import json
import re
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

import loralib
from loralib import peft_compat
from loralib.model import target_module_names
from tests.helpers import perturb, perturb_by_name, tiny_bert, tiny_gpt2, tiny_roberta, token_batch

peft = pytest.importorskip("peft")

MODELS = {
    "roberta": lambda: tiny_roberta(dtype=torch.float64).eval(),
    "bert": lambda: tiny_bert().double().eval(),
    "gpt2": lambda: tiny_gpt2().double().eval(),
}
BATCHES = {"roberta": token_batch(), "bert": token_batch(), "gpt2": token_batch(vocab=50)}
RTOL = ATOL = 1e-10


def logits(model, kind):
    return model(**BATCHES[kind]).logits


perturb_peft = partial(perturb_by_name, trainable=False)  # PEFT's adapters and modules_to_save copies


def peft_adapted_names(peft_model):
    prefix = "base_model.model."
    return {n[len(prefix) :] for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


QKI = ["query", "value", "intermediate.dense"]  # intermediate.dense is 16 -> 40: non-square

# ---- PEFT -> loralib --------------------------------------------------------------------------------------------
# (id, model, LoraConfig kwargs)
IMPORT_CASES = [
    ("roberta-lora", "roberta", dict(target_modules=QKI, modules_to_save=["classifier"], lora_dropout=0.1)),
    ("roberta-dora", "roberta", dict(target_modules=QKI, modules_to_save=["classifier"], use_dora=True)),
    ("roberta-rslora", "roberta", dict(target_modules=QKI, use_rslora=True, lora_alpha=16)),
    ("roberta-rslora-dora", "roberta", dict(target_modules=["key"], use_rslora=True, use_dora=True)),
    (
        "roberta-patterns",
        "roberta",
        dict(
            target_modules=QKI,
            modules_to_save=["classifier"],
            rank_pattern={"layer.0.attention.self.query": 2, "intermediate.dense": 6},
            alpha_pattern={"value": 32, r"layer\.1\..*query": 3},
            use_dora=True,
        ),
    ),
    ("roberta-embedding-lora", "roberta", dict(target_modules=["word_embeddings", "query"])),
    ("roberta-embedding-dora", "roberta", dict(target_modules=["word_embeddings", "value"], use_dora=True)),
    ("roberta-regex", "roberta", dict(target_modules=r".*layer\.1\..*(query|key)", init_lora_weights="gaussian")),
    ("roberta-all-linear", "roberta", dict(target_modules="all-linear", modules_to_save=["classifier"])),
    # PEFT adapts the head's out_proj here, loralib's all-linear would not: the file's module list wins
    ("roberta-all-linear-head", "roberta", dict(target_modules="all-linear")),
    # PEFT skips targets inside modules_to_save silently ("dense" also names classifier.dense)
    ("roberta-dense-vs-saved", "roberta", dict(target_modules=["dense"], modules_to_save=["classifier"])),
    ("bert-seq-cls", "bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("gpt2-conv1d-lora", "gpt2", dict(target_modules=["c_attn", "c_proj"])),
    ("gpt2-conv1d-dora", "gpt2", dict(target_modules=["c_attn", "c_proj"], use_dora=True)),
    ("gpt2-wte-dora", "gpt2", dict(target_modules=["wte", "c_attn"], use_dora=True, task_type="CAUSAL_LM")),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind,kwargs", [c[1:] for c in IMPORT_CASES], ids=[c[0] for c in IMPORT_CASES])
def test_peft_folder_loads_with_identical_outputs(kind, kwargs, tmp_path):
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **kwargs})
    peft_model = peft.get_peft_model(MODELS[kind](), config, autocast_adapter_dtype=False)
    perturb_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    expected = logits(peft_model, kind)

    model = MODELS[kind]()  # the same pretrained weights
    loralib.load_adapters(model, tmp_path)
    model.eval()
    assert {n for n, _ in loralib.adapter_layers(model)} == peft_adapted_names(peft_model)
    cfg = loralib.get_adapter_config(model)
    assert cfg.method == ("dora" if kwargs.get("use_dora") else "lora")
    assert cfg.detach_norm is False  # imported DoRA trains with loralib's exact gradients by default
    assert next(iter(model.parameters())).dtype == torch.float64
    torch.testing.assert_close(logits(model, kind), expected, rtol=RTOL, atol=ATOL)

    # a model that already has the same adapters (different weights) takes the file's weights too
    again = MODELS[kind]()
    loralib.apply_adapters(again, dataclasses.replace(cfg))
    loralib.load_adapters(again, tmp_path)
    again.eval()
    torch.testing.assert_close(logits(again, kind), expected, rtol=RTOL, atol=ATOL)


def test_import_keeps_the_peft_target_spec_when_it_resolves_alike(tmp_path):
    peft_model = peft.get_peft_model(MODELS["roberta"](), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    peft_model.save_pretrained(tmp_path)
    model = loralib.load_peft_adapter(MODELS["roberta"](), tmp_path)
    assert sorted(loralib.get_adapter_config(model).target_modules) == ["query", "value"]
    # PEFT skips targets inside modules_to_save ("dense" also names classifier.dense); loralib would refuse the
    # overlap, so the file's module names become the targets
    peft_model = peft.get_peft_model(
        MODELS["roberta"](), peft.LoraConfig(r=2, target_modules=["dense"], modules_to_save=["classifier"])
    )
    peft_model.save_pretrained(tmp_path / "dense")
    model = loralib.load_peft_adapter(MODELS["roberta"](), tmp_path / "dense")
    targets = loralib.get_adapter_config(model).target_modules
    assert "roberta.encoder.layer.0.output.dense" in targets and "classifier.dense" not in targets


@pytest.mark.parametrize("detach_norm", [False, True])
def test_imported_dora_gradients(detach_norm, tmp_path):
    """PEFT detaches DoRA's norm in backward. An imported DoRA adapter trains with loralib's exact gradient by
    default; ``detach_norm=True`` reproduces PEFT's gradients. The magnitude's gradient is the same either way."""
    peft_model = peft.get_peft_model(
        MODELS["roberta"](), peft.LoraConfig(r=4, target_modules=["query"], use_dora=True), autocast_adapter_dtype=False
    )
    perturb_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = loralib.load_peft_adapter(MODELS["roberta"](), tmp_path, detach_norm=detach_norm)
    weights = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for m in (peft_model, model):
        m.train()
        (logits(m, "roberta") * weights).sum().backward()
    name = "roberta.encoder.layer.0.attention.self.query"
    ours = model.get_submodule(name)
    theirs = peft_model.base_model.model.get_submodule(name)
    assert ours.detach_norm is detach_norm
    torch.testing.assert_close(
        ours.magnitude.grad, theirs.lora_magnitude_vector["default"].weight.grad, rtol=1e-9, atol=1e-12
    )
    same = torch.allclose(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-9, atol=1e-12)
    assert same is detach_norm


# ---- loralib -> PEFT --------------------------------------------------------------------------------------------
# (id, model, AdapterConfig kwargs)
EXPORT_CASES = [
    *[
        (f"roberta-{m}", "roberta", dict(method=m, target_modules=QKI, modules_to_save=["classifier"]))
        for m in ("lora", "dora", "bidora")
    ],
    *[
        (f"gpt2-conv1d-{m}", "gpt2", dict(method=m, target_modules=["c_attn", "c_proj"]))
        for m in ("lora", "dora", "bidora")
    ],
    *[
        (f"roberta-embedding-{m}", "roberta", dict(method=m, target_modules=["word_embeddings", "query"]))
        for m in ("lora", "dora")
    ],
    *[(f"gpt2-wte-{m}", "gpt2", dict(method=m, target_modules=["wte"])) for m in ("lora", "dora")],
    (
        "roberta-patterns-rslora",
        "roberta",
        dict(
            method="bidora",
            target_modules=QKI,
            use_rslora=True,
            rank_pattern={"layer.0.attention.self.query": 2},
            alpha_pattern={"value": 4.5},
        ),
    ),
    ("roberta-all-linear", "roberta", dict(method="dora", target_modules="all-linear")),
    ("bert-all-linear", "bert", dict(method="lora", target_modules="all-linear", modules_to_save=["classifier"])),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind,kwargs", [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_export_matches_peft_and_round_trips(kind, kwargs, tmp_path):
    model = MODELS[kind]()
    cfg = loralib.AdapterConfig(**{"r": 4, "lora_alpha": 8, **kwargs})
    loralib.apply_adapters(model, cfg)
    perturb(model)
    model.eval()
    expected = logits(model, kind)
    loralib.export_peft(model, tmp_path)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["rank_pattern"] == cfg.rank_pattern and written["alpha_pattern"] == cfg.alpha_pattern
    assert written["use_dora"] is (cfg.method != "lora")
    assert "loralib_method" not in written  # recorded in the safetensors metadata: PEFT warns on unknown keys
    peft.LoraConfig.from_pretrained(str(tmp_path))  # PEFT accepts the config as is

    peft_model = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path).eval()
    assert peft_adapted_names(peft_model) == {n for n, _ in loralib.adapter_layers(model)}
    torch.testing.assert_close(logits(peft_model, kind), expected, rtol=RTOL, atol=ATOL)

    back = loralib.load_adapters(MODELS[kind](), tmp_path).eval()
    back_cfg = loralib.get_adapter_config(back)
    assert back_cfg.method == cfg.method  # BiDoRA comes back as BiDoRA
    assert (back_cfg.r, back_cfg.lora_alpha, back_cfg.use_rslora) == (cfg.r, cfg.lora_alpha, cfg.use_rslora)
    assert (back_cfg.rank_pattern, back_cfg.alpha_pattern) == (cfg.rank_pattern, cfg.alpha_pattern)
    assert [type(layer) for _, layer in loralib.adapter_layers(back)] == [
        type(layer) for _, layer in loralib.adapter_layers(model)
    ]
    torch.testing.assert_close(logits(back, kind), expected, rtol=0, atol=0)


# (model, AutoModel class, AutoPeftModel class, task_type, targets)
AUTO_CASES = [
    ("roberta", "AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification", "SEQ_CLS", "query"),
    ("gpt2", "AutoModelForCausalLM", "AutoPeftModelForCausalLM", "CAUSAL_LM", "c_attn"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind,auto,auto_peft,task,target", AUTO_CASES, ids=[c[0] for c in AUTO_CASES])
def test_export_task_type_for_auto_peft_model(kind, auto, auto_peft, task, target, tmp_path):
    import transformers

    MODELS[kind]().save_pretrained(tmp_path / "base")
    model = getattr(transformers, auto).from_pretrained(tmp_path / "base").eval()
    loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", r=2, target_modules=[target]))
    perturb(model)
    model.eval()
    loralib.export_peft(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["task_type"] == task and written["base_model_name_or_path"] == str(tmp_path / "base")
    peft_model = getattr(peft, auto_peft).from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, kind), logits(model, kind), rtol=RTOL, atol=ATOL)


def test_task_types():
    from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification, BertModel

    small = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    assert peft_compat.peft_task_type(BertForTokenClassification(small)) == "TOKEN_CLS"
    assert peft_compat.peft_task_type(BertForQuestionAnswering(small)) == "QUESTION_ANS"
    assert peft_compat.peft_task_type(BertModel(small)) == "FEATURE_EXTRACTION"
    assert peft_compat.peft_task_type(MODELS["gpt2"]()) == "CAUSAL_LM"
    assert peft_compat.peft_task_type(torch.nn.Linear(2, 2)) is None


# ---- config conversion and refusals -----------------------------------------------------------------------------
def test_from_peft_maps_every_supported_option():
    config = peft.LoraConfig(
        r=6,
        lora_alpha=12,
        lora_dropout=0.05,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        use_rslora=True,
        use_dora=True,
        rank_pattern={"query": 2},
        alpha_pattern={"value": 3},
        init_lora_weights="gaussian",
        task_type="SEQ_CLS",
        fan_in_fan_out=True,
        inference_mode=True,
    )
    for source in (config, json.loads(json.dumps(config.to_dict(), default=sorted))):
        cfg = loralib.AdapterConfig.from_peft(source)
        assert (cfg.method, cfg.r, cfg.lora_alpha, cfg.lora_dropout) == ("dora", 6, 12, 0.05)
        assert sorted(cfg.target_modules) == ["query", "value"] and cfg.modules_to_save == ["classifier"]
        assert cfg.use_rslora and cfg.init_lora_weights == "gaussian" and not cfg.detach_norm
        assert (cfg.rank_pattern, cfg.alpha_pattern) == ({"query": 2}, {"value": 3})
    assert loralib.AdapterConfig.from_peft(peft.LoraConfig(target_modules=["q"]), detach_norm=True).detach_norm
    default = loralib.adapter_config_from_peft({"peft_type": "LORA", "target_modules": "all-linear"})
    assert (default.method, default.r, default.lora_alpha, default.init_lora_weights) == ("lora", 8, 8, "kaiming")
    assert default.target_modules == "all-linear"


def test_every_lora_config_field_is_decided():
    decided = loralib.config._MAPPED | set(peft_compat.IGNORED_OPTIONS) | set(peft_compat.REFUSED_OPTIONS)
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields <= decided, sorted(fields - decided)


# (option, value) -> ValueError naming "option=value"
REFUSED = [
    ("bias", "all"),
    ("bias", "lora_only"),
    ("lora_bias", True),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", "loftq"),
    ("init_lora_weights", "eva"),
    ("init_lora_weights", "corda"),
    ("init_lora_weights", "orthogonal"),
    ("init_lora_weights", "mica"),
    ("init_lora_weights", False),
    ("layers_to_transform", [0]),
    ("layers_pattern", "layer"),
    ("use_qalora", True),
    ("megatron_config", {"num_layers": 2}),
    ("trainable_token_indices", [1, 2]),
    ("target_parameters", ["mlp.experts.down_proj"]),
    ("exclude_modules", ["key"]),
    ("alora_invocation_tokens", [5, 6]),
    ("layer_replication", [[0, 1]]),
    ("ensure_weight_tying", True),
    ("loftq_config", {"loftq_bits": 4}),
    ("eva_config", {"rho": 2.0}),
    ("corda_config", {"corda_method": "ipm"}),
    ("lora_ga_config", {"direction": "ArBr"}),
    ("velora_config", {"rank": 4}),
    ("monteclora_config", {"num_samples": 2}),
    ("kasa_config", {"beta": 1.0}),
    ("arrow_config", {"top_k": 2}),
    ("use_bdlora", {"nblocks": 2}),
    ("target_modules", None),
    ("target_modules", []),
    ("peft_type", "IA3"),
    ("a_future_option", 3),
]


@pytest.mark.parametrize("option,value", REFUSED, ids=[f"{o}={v}" for o, v in REFUSED])
def test_unsupported_peft_options_are_refused_by_name(option, value):
    data = {"peft_type": "LORA", "target_modules": ["query"], option: value}
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
        loralib.AdapterConfig.from_peft(data)


def test_refusal_applies_to_folders_and_changes_nothing(tmp_path):
    peft.get_peft_model(MODELS["roberta"](), peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "bias": "all"}))
    model = MODELS["roberta"]()
    with pytest.raises(ValueError, match="bias='all'"):
        loralib.load_adapters(model, tmp_path)
    assert loralib.get_adapter_config(model) is None and not loralib.adapter_layers(model)


def test_several_adapters_are_refused_by_name(tmp_path):
    peft_model = peft.get_peft_model(
        MODELS["roberta"](), peft.LoraConfig(r=2, target_modules=["query"]), adapter_name="first"
    )
    peft_model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["value"]))
    peft_model.save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match=r"several adapters in subfolders \['first', 'second'\]"):
        loralib.load_adapters(MODELS["roberta"](), tmp_path / "two")
    loralib.load_adapters(MODELS["roberta"](), tmp_path / "two" / "second")  # one of them loads

    # adapter names left in the keys (a raw PeftModel.state_dict) are refused naming the key
    one = tmp_path / "two" / "first"
    tensors = load_file(one / "adapter_model.safetensors")
    save_file(
        {k.replace("lora_A.weight", "lora_A.first.weight"): v for k, v in tensors.items()},
        one / "adapter_model.safetensors",
    )
    with pytest.raises(ValueError, match=r"lora_A\.first\.weight.*several adapters in one file"):
        loralib.load_adapters(MODELS["roberta"](), one)


def test_bidora_marker_must_agree_with_use_dora(tmp_path):
    model = MODELS["roberta"]()
    loralib.apply_adapters(model, loralib.AdapterConfig(method="bidora", r=2, target_modules=["query"]))
    loralib.export_peft(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": False}))
    with pytest.raises(ValueError, match="loralib_method='bidora'"):
        loralib.load_adapters(MODELS["roberta"](), tmp_path)


# ---- target_modules="all-linear" -------------------------------------------------------------------------------
ROBERTA_BLOCK = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
BERT_BLOCK = ROBERTA_BLOCK


def block_names(prefix, suffixes, layers=2):
    return [f"{prefix}.{i}.{s}" for i in range(layers) for s in suffixes]


# (id, model, modules_to_save, expected loralib names, PEFT task_type giving the same set or None if PEFT differs)
ALL_LINEAR_CASES = [
    ("roberta-head-saved", "roberta", ["classifier"], block_names("roberta.encoder.layer", ROBERTA_BLOCK), "SEQ_CLS"),
    (
        "roberta-head-not-saved",  # loralib leaves out the head's final projection; PEFT adapts it
        "roberta",
        [],
        [*block_names("roberta.encoder.layer", ROBERTA_BLOCK), "classifier.dense"],
        None,
    ),
    ("bert", "bert", [], [*block_names("bert.encoder.layer", BERT_BLOCK), "bert.pooler.dense"], "SEQ_CLS"),
    (
        "gpt2",
        "gpt2",
        [],
        block_names("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        "CAUSAL_LM",
    ),
]


@pytest.mark.parametrize(
    "kind,saved,expected,peft_task", [c[1:] for c in ALL_LINEAR_CASES], ids=[c[0] for c in ALL_LINEAR_CASES]
)
def test_all_linear(kind, saved, expected, peft_task):
    model = MODELS[kind]()
    cfg = loralib.AdapterConfig(method="lora", r=2, target_modules="ALL-LINEAR", modules_to_save=saved)
    assert cfg.target_modules == "all-linear"
    assert target_module_names(model, cfg) == expected
    summary = loralib.apply_adapters(model, cfg)
    assert summary.adapted_modules == expected
    peft_model = peft.get_peft_model(
        MODELS[kind](),
        peft.LoraConfig(r=2, target_modules="all-linear", modules_to_save=saved or None, task_type=peft_task),
    )
    assert (peft_adapted_names(peft_model) == set(expected)) is (peft_task is not None)


def test_output_head_names():
    from loralib.model import output_head_name

    assert output_head_name(MODELS["roberta"]()) == "classifier.out_proj"
    assert output_head_name(MODELS["bert"]()) == "classifier"
    assert output_head_name(MODELS["gpt2"]()) == "lm_head"
    assert output_head_name(MODELS["roberta"]().roberta) is None
    assert output_head_name(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


# ---- rank_pattern / alpha_pattern -------------------------------------------------------------------------------
def test_patterns_follow_peft_rule():
    cfg = loralib.AdapterConfig(
        method="dora",
        r=4,
        lora_alpha=8,
        use_rslora=False,
        target_modules=QKI,
        rank_pattern={"layer.0.attention.self.query": 2, "query": 6, "dense": 3},
        alpha_pattern={r"layer\.1\..*value": 5.0},
    )
    model = MODELS["roberta"]()
    loralib.apply_adapters(model, cfg)
    layers = dict(loralib.adapter_layers(model))
    expected = {  # first matching key wins; keys match at a dot boundary at the end of the name
        "roberta.encoder.layer.0.attention.self.query": (2, 8.0),
        "roberta.encoder.layer.1.attention.self.query": (6, 8.0),
        "roberta.encoder.layer.0.attention.self.value": (4, 8.0),
        "roberta.encoder.layer.1.attention.self.value": (4, 5.0),
        "roberta.encoder.layer.0.intermediate.dense": (3, 8.0),
    }
    for name, (r, alpha) in expected.items():
        assert (layers[name].r, layers[name].lora_alpha, layers[name].scaling) == (r, alpha, alpha / r)
        peft_rank = peft.utils.other.get_pattern_key(cfg.rank_pattern.keys(), name)
        assert cfg.rank_pattern.get(peft_rank, cfg.r) == r  # PEFT's own lookup agrees
    assert loralib.config.pattern_key("encoder.subquery", {"query": 1}) is None
    assert loralib.config.pattern_key("self.query", {"query": 1}) == "query"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rank_pattern": {"query": 0}}, r"rank_pattern\['query'\] must be a positive integer"),
        ({"rank_pattern": {"query": 2.5}}, "positive integer"),
        ({"rank_pattern": {"query": True}}, "positive integer"),
        ({"rank_pattern": {"(": 2}}, "not a valid regex"),
        ({"rank_pattern": ["query"]}, "must be a dict"),
        ({"alpha_pattern": {"value": -1}}, r"alpha_pattern\['value'\] must be a positive number"),
        ({"alpha_pattern": {"value": float("inf")}}, "positive number"),
        ({"alpha_pattern": {"": 2}}, "non-empty strings"),
    ],
)
def test_bad_patterns(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loralib.AdapterConfig(**kwargs)
