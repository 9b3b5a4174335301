"""Adapter-only checkpoints under a plain ``Trainer`` (:class:`loralib.AdapterTrainer`) and TRL's ``SFTTrainer``
(through :class:`loralib.AdapterCheckpointMixin`), for LoRA and DoRA on a tied-embedding Llama: (a) the weight file
holds exactly the trainable state, (b) a resume from the mid-run checkpoint ends bitwise equal to an uninterrupted
run, (c) a resume from a checkpoint at ``max_steps`` trains no further step. Also: full fine-tuning keeps whole
checkpoints, a checkpoint of another method or base is refused before loading, the mixin must come first."""

from __future__ import annotations

import json
import math
import random
import struct

import pytest
import torch
from datasets import Dataset as HFDataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

import loralib
from loralib import AdapterCheckpointMixin, AdapterTrainer
from loralib.checkpoints import CheckpointError
from tests import helpers
from tests.helpers import Sequences

WORDS = ("the a cat dog bird sat ran flew on under over mat rug tree big small red blue old new quickly slowly and "
         "then it was").split()
MAX_STEPS, SAVE_STEPS, BATCH, EXAMPLES = 4, 2, 2, 12  # 6 batches per epoch: max_steps is not a multiple of it
METHODS, KINDS = ("lora", "dora"), ("trainer", "sft")


class AdapterSFTTrainer(AdapterCheckpointMixin, SFTTrainer):
    """TRL's SFTTrainer with adapter-only checkpoints (MRO: this -> mixin -> SFTTrainer -> _BaseTrainer -> Trainer)."""


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`, built offline."""
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return helpers.tiny_llama(seed, vocab_size=32, pad_token_id=0, eos_token_id=2)


def adapted(method: str, seed: int = 0) -> LlamaForCausalLM:
    model = tiny_llama(seed)
    if method != "ft":
        loralib.apply_adapters(model, loralib.AdapterConfig(method=method, r=4, lora_alpha=8,
                                                            target_modules=["q_proj", "v_proj"]))
    return model


def texts() -> HFDataset:
    rng = random.Random(0)
    return HFDataset.from_dict({"text": [" ".join(rng.choices(WORDS, k=rng.randint(4, 9))) for _ in range(EXAMPLES)]})


COMMON = dict(per_device_train_batch_size=BATCH, learning_rate=1e-2, max_steps=MAX_STEPS, save_strategy="steps",
              save_steps=SAVE_STEPS, logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
              dataloader_num_workers=0)


def make_trainer(kind: str, model, out, cls=None, **overrides):
    """A trainer of ``kind`` ("trainer": AdapterTrainer, "sft": AdapterSFTTrainer) writing to ``out``."""
    settings = {**COMMON, "output_dir": str(out), **overrides}
    if kind == "trainer":
        return (cls or AdapterTrainer)(model=model, args=TrainingArguments(**settings),
                                       train_dataset=Sequences(n=EXAMPLES, vocab=32, low=3))
    args = SFTConfig(**settings, bf16=False, activation_checkpointing=False, max_length=16)
    return (cls or AdapterSFTTrainer)(model=model, args=args, train_dataset=texts(),
                                      processing_class=word_tokenizer())


def saved_keys(folder) -> set[str]:
    """The tensor names in ``folder/model.safetensors``, read from its header."""
    raw = (folder / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__", None)
    return set(header)


def equal_parameters(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs (checkpoints at steps 2 and 4) of every trainer kind and method: {(kind, method): (folder,
    trained model)}."""
    root, done = tmp_path_factory.mktemp("adapter_runs"), {}
    for kind in KINDS:
        for method in METHODS:
            model = adapted(method)
            make_trainer(kind, model, root / kind / method).train()
            done[kind, method] = root / kind / method, model
    return done


CASES = [(kind, method) for kind in KINDS for method in METHODS]


@pytest.mark.parametrize("kind, method", CASES)
def test_checkpoints_hold_exactly_the_trainable_state(runs, kind, method):
    out, model = runs[kind, method]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not equal_parameters(model, adapted(method))  # it trained
    named = list(model.named_parameters(remove_duplicate=False))
    trainable = {n for n, p in named if p.requires_grad}
    buffers = set(model.state_dict()) - {n for n, _ in named}  # the adapters' merge state stays
    assert buffers and all(k.endswith("_extra_state") for k in buffers)
    assert {n for n in trainable if "magnitude" in n} or method == "lora"
    keys = saved_keys(out / "checkpoint-2")
    assert keys == trainable | buffers
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" not in keys
    assert not any(k.endswith(("q_proj.weight", "v_proj.weight", "k_proj.weight", "mlp.up_proj.weight")) for k in keys)
    record = json.loads((out / "checkpoint-2" / "loralib_run.json").read_text())
    assert record["method"] == method and record["checkpoint_weights"] == "trainable state only"
    assert equal_parameters(loralib.load_checkpoint(out / "checkpoint-4", base=tiny_llama()), model)


@pytest.mark.parametrize("kind, method", CASES)
def test_resume_from_the_middle_ends_bitwise_equal(runs, tmp_path, kind, method):
    out, trained = runs[kind, method]
    model = adapted(method)
    result = make_trainer(kind, model, tmp_path).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert result.global_step == MAX_STEPS
    assert equal_parameters(model, trained)
    assert saved_keys(tmp_path / "checkpoint-4") == saved_keys(out / "checkpoint-4")


@pytest.mark.parametrize("kind, method", CASES)
def test_a_run_resumed_at_max_steps_trains_no_further(runs, tmp_path, kind, method):
    out, trained = runs[kind, method]
    assert MAX_STEPS % (EXAMPLES // BATCH) != 0  # transformers would resume inside the epoch and train step 5
    model = adapted(method)
    trainer = make_trainer(kind, model, tmp_path)
    result = trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert result.global_step == trainer.state.global_step == MAX_STEPS
    assert math.isnan(result.training_loss) and math.isnan(result.metrics["train_loss"])  # this call trained nothing
    assert equal_parameters(model, trained)  # the checkpoint's model, which is the uninterrupted run's
    assert not list(tmp_path.glob("checkpoint-*"))
    trainer.save_model(str(tmp_path / "final"))  # the whole model, loadable by itself
    reloaded = loralib.from_pretrained(LlamaForCausalLM, tmp_path / "final")
    assert equal_parameters(reloaded, trained)


def test_without_the_mixin_transformers_trains_past_max_steps(runs, tmp_path):
    """The bug the guard is for: a plain Trainer resumed at max_steps trains step max_steps + 1."""
    out, _ = runs["trainer", "lora"]
    trainer = make_trainer("trainer", adapted("lora"), tmp_path, cls=Trainer)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert trainer.state.global_step == MAX_STEPS + 1, "transformers stops at max_steps now: the guard is redundant"


@pytest.mark.parametrize("kind", KINDS)
def test_full_fine_tuning_keeps_whole_checkpoints(tmp_path, kind):
    """No adapters: the mixin's checkpoint is the plain Trainer's, even with parameters frozen by hand."""
    ours, plain = tiny_llama(), tiny_llama()
    for model in (ours, plain):
        model.model.layers[0].requires_grad_(False)
    base = SFTTrainer if kind == "sft" else Trainer
    make_trainer(kind, ours, tmp_path / "ours", max_steps=1, save_steps=1).train()
    make_trainer(kind, plain, tmp_path / "plain", cls=base, max_steps=1, save_steps=1).train()
    keys = saved_keys(tmp_path / "ours" / "checkpoint-1")
    assert keys == saved_keys(tmp_path / "plain" / "checkpoint-1")
    assert "model.embed_tokens.weight" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    assert equal_parameters(ours, plain)


@pytest.mark.parametrize("model, message", [
    (lambda: adapted("dora"), r"written by a lora run, and this is a dora run"),
    (lambda: adapted("lora", seed=1), r"trained on another base model"),
], ids=["another method", "another base"])
def test_a_checkpoint_of_another_method_or_base_is_refused_before_loading(runs, tmp_path, model, message):
    out, _ = runs["sft", "lora"]
    model = model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=message):
        make_trainer("sft", model, tmp_path).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_mixin_must_come_before_the_trainer():
    with pytest.raises(TypeError, match="lists transformers' Trainer before AdapterCheckpointMixin"):
        type("Wrong", (SFTTrainer, AdapterCheckpointMixin), {})
    assert AdapterSFTTrainer.__mro__[1:3] == (AdapterCheckpointMixin, SFTTrainer)
    assert AdapterTrainer.__mro__[1:] == (AdapterCheckpointMixin, Trainer, object)
