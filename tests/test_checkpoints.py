"""BiDoRATrainer checkpoints: the trainable state only (tied weights included), the base each run records, loading a
checkpoint onto its base (and refusing another or none), the checks before a resume, a run finished at max_steps,
and the baselines training on all of train unless asked to hold some out."""

from __future__ import annotations

import copy
import json
import shutil
import struct

import pytest
import torch
from transformers import RobertaForSequenceClassification, Trainer

import loralib
from loralib import BiDoRATrainer
from loralib.adapter_state import adapter_tensors
from loralib.checkpoints import (
    CheckpointError,
    base_fingerprint,
    check_optimizer_groups,
    compare_fingerprints,
    last_complete_checkpoint,
)
from tests.helpers import Sequences, Tokens, adapted, args, plain_args, snapshot, tiny_llama, tiny_roberta


def equal_states(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints of short runs: lora (4 steps, checkpoints at 2 and 4), dora and bidora (2 steps), and a plain
    Trainer's dora run (2 steps: whole weights, no run record, no upper-level state)."""
    root = tmp_path_factory.mktemp("runs")
    trained = {}
    for method, steps in (("lora", 4), ("dora", 2), ("bidora", 2)):
        model = adapted(method)
        BiDoRATrainer(model=model, args=args(root / method, max_steps=steps), train_dataset=Tokens()).train()
        trained[method] = model
    Trainer(model=adapted("dora"), args=plain_args(root / "plain_dora", max_steps=2),
            train_dataset=Tokens()).train()
    return root, trained


# ---- 2. the trainable state only, the recorded base, load_checkpoint -----------------------------------------------
def test_a_tied_embedding_checkpoint_holds_the_trainable_state_only(tmp_path):
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loralib.apply_adapters(model, loralib.AdapterConfig(method="lora", r=4, lora_alpha=8,
                                                        target_modules=["q_proj", "v_proj"]))
    BiDoRATrainer(model=model, args=args(tmp_path, max_steps=2, learning_rate=1e-2),
                  train_dataset=Sequences()).train()
    checkpoint = tmp_path / "checkpoint-2"
    weights = checkpoint / "model.safetensors"
    raw = weights.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__", None)
    trainable = adapter_tensors(model)
    assert {k for k in header if not k.endswith("_extra_state")} == set(trainable)  # no lm_head.weight
    # the file size from the parameter counts: the header, the fp32 adapters and the tiny merge-state tensors
    extra = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k.endswith("_extra_state"))
    n = sum(t.numel() for t in trainable.values())
    assert len(raw) == 8 + struct.unpack("<Q", raw[:8])[0] + 4 * n + extra
    embedding_bytes = 4 * model.model.embed_tokens.weight.numel()
    assert len(raw) < embedding_bytes  # less than the tied embedding alone
    assert (checkpoint / "optimizer.pt").stat().st_size < 2 * 4 * n + 64 * 1024  # AdamW: two moments per weight
    loaded = loralib.load_checkpoint(checkpoint, base=tiny_llama())  # the base's own weights + the checkpoint
    assert equal_states(loaded, model)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_the_run_records_its_base_and_only_that_base_loads_the_checkpoint(tmp_path):
    tiny_roberta(seed=0).save_pretrained(tmp_path / "base")
    model = RobertaForSequenceClassification.from_pretrained(tmp_path / "base")
    loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", r=4, lora_alpha=8,
                                                        target_modules=["query", "value"],
                                                        modules_to_save=["classifier"]))
    out = tmp_path / "run"
    BiDoRATrainer(model=model, args=args(out, max_steps=2), train_dataset=Tokens()).train()
    checkpoint = out / "checkpoint-2"
    for folder in (out, checkpoint):
        record = json.loads((folder / "loralib_run.json").read_text())
        assert record["base"]["name_or_path"] == str(tmp_path / "base") and record["method"] == "dora"
        assert record["base"]["fingerprint"]["sha256"] == base_fingerprint(model)["sha256"]
    # the recorded base, by itself; through from_pretrained; from the run's folder (its newest checkpoint)
    assert equal_states(loralib.load_checkpoint(checkpoint), model)
    assert equal_states(loralib.from_pretrained(RobertaForSequenceClassification, checkpoint), model)
    assert equal_states(loralib.load_checkpoint(out), model)
    with pytest.raises(CheckpointError, match="is not the one .* was trained on .* frozen tensors have other norms"):
        loralib.load_checkpoint(checkpoint, base=tiny_roberta(seed=1))
    with pytest.raises(CheckpointError, match="is not the one"):
        loralib.from_pretrained(RobertaForSequenceClassification, checkpoint, base=tiny_roberta(seed=1))
    # the same base in bf16 matches (norms in float64, compared with a tolerance); another base does not
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert compare_fingerprints(base_fingerprint(model), base_fingerprint(bf16)) is None
    # a checkpoint without its record (an older loralib) is refused by from_pretrained, never returned half random
    (checkpoint / "loralib_run.json").unlink()
    with pytest.raises(ValueError, match="holds no weights for .* loralib.load_checkpoint"):
        loralib.from_pretrained(RobertaForSequenceClassification, checkpoint)


def test_a_base_built_from_a_config_must_be_given(runs):
    root, trained = runs
    with pytest.raises(CheckpointError, match="records no base model .* pass base="):
        loralib.load_checkpoint(root / "lora" / "checkpoint-4")
    assert equal_states(loralib.load_checkpoint(root / "lora" / "checkpoint-4", base=tiny_roberta(seed=0),
                                                model_class=RobertaForSequenceClassification), trained["lora"])


# ---- 3. checks before a resume ------------------------------------------------------------------------------------
def cut(path, size=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


CASES = {
    # name: (run, damage, model, message)
    "weights cut short": ("lora", lambda c: cut(c / "model.safetensors"), lambda: adapted("lora"),
                          r"model\.safetensors is truncated or corrupt"),
    "weights empty": ("lora", lambda c: cut(c / "model.safetensors", 0), lambda: adapted("lora"),
                      r"model\.safetensors is empty"),
    "upper state cut short": ("bidora", lambda c: cut(c / "bilevel_state.pt"), lambda: adapted("bidora"),
                              r"bilevel_state\.pt is truncated or corrupt"),
    "trainer state empty": ("lora", lambda c: cut(c / "trainer_state.json", 0), lambda: adapted("lora"),
                            r"trainer_state\.json is empty"),
    "trainer state unparsable": ("lora", lambda c: (c / "trainer_state.json").write_text("{"),
                                 lambda: adapted("lora"), r"trainer_state\.json is not valid JSON"),
    "run record empty": ("lora", lambda c: cut(c / "loralib_run.json", 0), lambda: adapted("lora"),
                         r"loralib_run\.json is empty"),
    "no optimizer.pt": ("lora", lambda c: (c / "optimizer.pt").unlink(), lambda: adapted("lora"),
                        r"optimizer\.pt is missing: resuming would start a fresh optimiser"),
    "optimizer.pt cut short": ("lora", lambda c: cut(c / "optimizer.pt"), lambda: adapted("lora"),
                               r"optimizer\.pt is truncated or corrupt"),
    "dora as bidora": ("dora", None, lambda: adapted("bidora"), r"written by a dora run, and this is a bidora run"),
    "bidora as dora": ("bidora", None, lambda: adapted("dora"), r"written by a bidora run \(bi-level\)"),
    "lora as full fine-tuning": ("lora", None, lambda: adapted("ft"), r"written by a lora run, and this is a ft"),
    "plain Trainer's dora as bidora": ("plain_dora", None, lambda: adapted("bidora"),
                                       r"bilevel_state\.pt is missing: .* not written by a bi-level BiDoRA run"),
    "plain Trainer's dora as lora": ("plain_dora", None, lambda: adapted("lora"),
                                     r"holds 4 tensors this model lacks \(e\.g\. .*magnitude\)"),
    "rank": ("lora", None, lambda: adapted("lora", r=8), r"trained with r=4, this run has 8"),
    "rank, no run record": ("lora", lambda c: (c / "loralib_run.json").unlink(), lambda: adapted("lora", r=8),
                            r"lora_A of shape \[4, 16\], this model \[8, 16\] \(another rank\)"),
    "target set": ("lora", None, lambda: adapted("lora", targets=("query",)), r"adapted other target modules"),
    "base": ("lora", None, lambda: adapted("lora", seed=1), r"trained on another base model .* other norms"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_resume_checks_the_checkpoint_before_loading_anything(runs, tmp_path, case):
    root, _ = runs
    run, damage, build, message = CASES[case]
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(root / run / "checkpoint-2", checkpoint)
    if damage is not None:
        damage(checkpoint)
    model = build()
    before = snapshot(model)
    trainer = BiDoRATrainer(model=model, args=args(tmp_path / "out"), train_dataset=Tokens())
    with pytest.raises(CheckpointError, match=message) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert "\n" not in str(error.value)  # one sentence
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was loaded


def test_optimizer_state_for_other_parameter_groups_is_named(runs):
    root, _ = runs
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(CheckpointError, match=r"optimizer\.pt holds optimiser state for parameter groups of sizes"):
        check_optimizer_groups(root / "lora" / "checkpoint-2" / "optimizer.pt", other)


def test_resume_skips_a_half_written_checkpoint(runs, tmp_path):
    root, _ = runs
    for step in (2, 4, 6):
        shutil.copytree(root / "lora" / "checkpoint-2", tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_bytes(b"")  # a kill while it was written
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    notes = []
    assert last_complete_checkpoint(tmp_path, report=notes.append) == str(tmp_path / "checkpoint-2")
    assert len(notes) == 2 and "checkpoint-6" in notes[0] and "checkpoint-4" in notes[1]


def test_a_run_finished_at_max_steps_trains_no_further(runs, tmp_path):
    """6 batches per epoch, max_steps 4: transformers would resume inside the epoch and train step 5."""
    root, trained = runs
    assert 4 % (len(Tokens()) // 4) != 0  # max_steps is not a multiple of the batches per epoch
    for step in (4, 2):  # at max_steps: nothing more; in the middle: to the uninterrupted run's end, bitwise
        model = adapted("lora")
        trainer = BiDoRATrainer(model=model, args=args(tmp_path / f"from{step}", max_steps=4), train_dataset=Tokens())
        trainer.train(resume_from_checkpoint=str(root / "lora" / f"checkpoint-{step}"))
        assert trainer.state.global_step == 4
        assert equal_states(model, trained["lora"])


# ---- 5. the baselines train on all of train_dataset unless asked ---------------------------------------------------
def test_baselines_train_on_all_data_unless_a_heldout_split_is_asked_for(tmp_path):
    ours, plain = adapted("dora"), adapted("dora")
    trainer = BiDoRATrainer(model=ours, args=args(tmp_path / "ours"), train_dataset=Tokens())  # upper_fraction 0.25
    assert len(trainer.train_dataset) == 24 and trainer.upper_dataset is None
    trainer.train()
    Trainer(model=plain, args=plain_args(tmp_path / "plain"), train_dataset=Tokens()).train()
    assert equal_states(ours, plain)
    # asked for: the same seeded split BiDoRA's upper level uses at that fraction
    held = BiDoRATrainer(model=adapted("lora"), args=args(tmp_path / "h", heldout_fraction=0.25),
                         train_dataset=Tokens())
    upper = BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path / "u"), train_dataset=Tokens())
    assert held.upper_dataset.indices == upper.upper_dataset.indices and len(held.train_dataset) == 18
    with pytest.raises(ValueError, match="heldout_fraction=0.5 is the baselines' selection split"):
        BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path / "b", heldout_fraction=0.5),
                      train_dataset=Tokens())


def test_selection_on_a_test_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="metric_for_best_model='test_accuracy' selects the model on the test split"):
        BiDoRATrainer(model=adapted("lora"), args=args(tmp_path, metric_for_best_model="test_accuracy",
                                                       eval_strategy="steps", load_best_model_at_end=True),
                      train_dataset=Tokens(), eval_dataset={"test": Tokens(n=8, seed=3)})


def test_a_baseline_model_init_must_say_what_it_holds_out(tmp_path):
    with pytest.raises(ValueError, match=r"model_init returned a 'lora' model, .* set heldout_fraction=0"):
        BiDoRATrainer(model_init=lambda: adapted("lora"), args=args(tmp_path), train_dataset=Tokens())
    trainer = BiDoRATrainer(model_init=lambda: adapted("lora"), args=args(tmp_path, heldout_fraction=0.0),
                            train_dataset=Tokens())
    assert len(trainer.train_dataset) == 24 and trainer.upper_dataset is None
