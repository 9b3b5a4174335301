"""BiDoRATrainer (a transformers.Trainer subclass) on tiny models: who trains what, resume, selection, refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Trainer, TrainerCallback

import loralib
from loralib import BiDoRATrainer
from tests.helpers import (
    LM_CASES,
    REPO,
    StopAt,
    Tokens,
    adapted,
    args,
    changed,
    ddp_run,
    lm_run,
    sft_run,
    snapshot,
    tiny_llama,
    tiny_roberta,
)


def accuracy(pred) -> dict:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def test_bidora_trains_directions_below_magnitudes_above_and_nothing_else(tmp_path):
    model = adapted("bidora")
    before = snapshot(model)
    BiDoRATrainer(model=model, args=args(tmp_path), train_dataset=Tokens()).train()
    moved = changed(before, model)
    trainable = {n for n in before if ".lora_" in n or "magnitude" in n or n.startswith("classifier.")}
    assert moved == trainable  # every adapter, magnitude and head parameter moved; the frozen base is bitwise intact


@pytest.mark.parametrize("frozen_level", ["upper", "lower"])
def test_each_level_moves_only_its_own_parameters(tmp_path, frozen_level):
    """Lower lr 0: only the magnitudes move (through the upper step); upper lr 0: the magnitudes never move."""
    model = adapted("bidora")
    before = snapshot(model)
    kw = {"upper_learning_rate": 0.0} if frozen_level == "upper" else {"learning_rate": 0.0,
                                                                        "upper_learning_rate": 5e-3}
    BiDoRATrainer(model=model, args=args(tmp_path, weight_decay=0.0, **kw), train_dataset=Tokens()).train()
    moved = changed(before, model)
    magnitudes = {n for n in before if n.endswith("magnitude")}
    if frozen_level == "upper":
        assert moved and not (moved & magnitudes)
    else:
        assert moved == magnitudes


@pytest.mark.parametrize("hypergradient", ["darts", "first_order", "neumann", "cg", "sama", "damped_solve"])
def test_resume_from_checkpoint_ends_bitwise_equal(tmp_path, hypergradient):
    settings = dict(hypergradient=hypergradient, neumann_alpha=0.1, unroll_steps=2 if hypergradient == "cg" else 1)
    full = adapted("bidora", dropout=0.1)
    BiDoRATrainer(model=full, args=args(tmp_path / "full", **settings), train_dataset=Tokens()).train()
    cut = adapted("bidora", dropout=0.1)
    BiDoRATrainer(model=cut, args=args(tmp_path / "cut", **settings), train_dataset=Tokens(),
                  callbacks=[StopAt(4)]).train()
    resumed = adapted("bidora", dropout=0.1)
    BiDoRATrainer(model=resumed, args=args(tmp_path / "cut", **settings), train_dataset=Tokens()).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4")
    )
    end, expected = snapshot(resumed), snapshot(full)
    for name, value in expected.items():
        assert torch.equal(end[name], value), name
    same_seed = adapted("bidora", dropout=0.1)
    BiDoRATrainer(model=same_seed, args=args(tmp_path / "again", **settings), train_dataset=Tokens()).train()
    assert all(torch.equal(p, expected[n]) for n, p in same_seed.named_parameters())  # same seed, same result


def test_darts_evaluations_see_the_same_dropout_masks(tmp_path):
    """With dropout, the two finite-difference evaluations must differ only by the perturbation: darts on a
    zero-size step (darts_alpha tiny) must give a finite implicit term of the right scale, and twice the same."""
    model = adapted("bidora", dropout=0.3)
    trainer = BiDoRATrainer(model=model, args=args(tmp_path), train_dataset=Tokens())
    trainer.create_optimizer()
    trainer.create_scheduler(num_training_steps=6)
    level = trainer.upper_level
    batch = trainer._prepare_inputs(trainer.upper_stream.next())
    lower_batch = trainer._prepare_inputs(trainer.data_collator([Tokens()[i] for i in range(4)]))
    model.train()
    _, first = level.hypergradient_of(batch, 99, lower_batch, 1234)
    _, second = level.hypergradient_of(batch, 99, lower_batch, 1234)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # a different mask per evaluation would add O(1/ε) noise: ε = 0.01/‖v‖ makes it explode past any sane size
    assert max(float(g.abs().max()) for g in first) < 1e2


class PoisonAt(TrainerCallback):
    """Turns one adapter weight into NaN after a step: the next loss is NaN (what a diverging run produces)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                loralib.adapter_layers(model)[0][1].lora_B.fill_(float("nan"))


def test_nan_loss_stops_with_a_message_and_keeps_the_good_checkpoints(tmp_path):
    trainer = BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path), train_dataset=Tokens(),
                            callbacks=[PoisonAt(3)])
    with pytest.raises(FloatingPointError, match=r"non-finite (lower|upper)-level .* at step [34]"):
        trainer.train()
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-4").exists()


def test_selection_is_on_the_heldout_split(tmp_path):
    model = adapted("bidora")
    trainer = BiDoRATrainer(
        model=model,
        args=args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                  metric_for_best_model="accuracy"),
        train_dataset=Tokens(),
        eval_dataset=Tokens(n=8, seed=3),
        compute_metrics=accuracy,
    )
    assert trainer.args.metric_for_best_model == "heldout_accuracy"
    trainer.train()
    keys = {k for row in trainer.state.log_history for k in row}
    assert {"eval_heldout_accuracy", "eval_validation_accuracy", "upper_loss"} <= keys
    assert trainer.state.best_model_checkpoint is not None
    assert len(trainer.upper_dataset) == 6 and len(trainer.train_dataset) == 18


@pytest.mark.parametrize("method", ["ft", "lora", "dora"])
def test_baselines_train_as_under_a_plain_trainer(tmp_path, method):
    ours, plain = adapted(method), adapted(method)
    BiDoRATrainer(model=ours, args=args(tmp_path / "ours", upper_fraction=0.0), train_dataset=Tokens()).train()
    plain_args = args(tmp_path / "plain", upper_fraction=0.0)
    Trainer(model=plain, args=plain_args, train_dataset=Tokens()).train()
    reference = snapshot(plain)
    assert all(torch.equal(p, reference[n]) for n, p in ours.named_parameters())




@pytest.mark.parametrize("hypergradient", ["darts", "first_order"])
def test_half_precision_base_warns_for_finite_difference_hypergradients(tmp_path, hypergradient):
    """A bf16 base turns darts-like finite differences into rounding noise (measured on SmolLM2): said once at the
    start; first_order takes no difference and is not warned about."""
    import warnings

    model = tiny_roberta(seed=0, dtype=torch.bfloat16)
    loralib.apply_adapters(model, loralib.AdapterConfig(method="bidora", r=4, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"]))
    trainer = BiDoRATrainer(model=model, args=args(tmp_path, max_steps=1, hypergradient=hypergradient),
                            train_dataset=Tokens())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if "half-precision base" in str(w.message)]
    assert len(said) == (1 if hypergradient == "darts" else 0), said
    if said:
        assert "torch.bfloat16" in said[0] and "hypergradient='darts'" in said[0]


def test_bf16_darts_differences_are_taken_in_fp32(tmp_path):
    model = adapted("bidora")
    trainer = BiDoRATrainer(model=model, args=args(tmp_path, bf16=True, max_steps=2), train_dataset=Tokens())
    seen: list[torch.dtype] = []
    original = trainer._lower_task_loss

    def recording(batch):
        handle = model.classifier.out_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        try:
            return original(batch)
        finally:
            handle.remove()

    trainer.train()  # builds the levels; now record what the darts evaluations run in
    trainer.upper_level.lower._task_loss = recording
    trainer.upper_step()
    assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps > 1"),
        ({"upper_fraction": 0.0}, "needs an upper split"),
    ],
)
def test_unsupported_bidora_settings_are_refused(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path, **setting), train_dataset=Tokens())


@pytest.mark.parametrize(
    "field,value",
    [("upper_fraction", 1.0), ("hypergradient", "exact"), ("unroll_steps", 0), ("neumann_alpha", 0.0),
     ("darts_alpha", -1.0), ("orth_reg", float("nan")), ("upper_learning_rate", -1.0)],
)
def test_bad_bilevel_arguments_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"BiDoRATrainingArguments.{field}"):
        args(tmp_path, **{field: value})


def test_plain_training_arguments_are_refused_by_name(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="BiDoRATrainingArguments"):
        BiDoRATrainer(model=adapted("bidora"), args=TrainingArguments(str(tmp_path)), train_dataset=Tokens())


def test_retraining_phase_trains_directions_with_frozen_magnitudes_on_all_data(tmp_path):
    model = adapted("bidora")
    BiDoRATrainer(model=model, args=args(tmp_path / "search"), train_dataset=Tokens()).train()
    searched = snapshot(model)
    loralib.reset_directions(model)
    trainer = BiDoRATrainer(model=model, args=args(tmp_path / "retrain"), train_dataset=Tokens(), retrain=True)
    assert len(trainer.train_dataset) == 24 and trainer.upper_dataset is None and trainer.upper_level is None
    trainer.train()
    moved = changed(searched, model)
    assert not any(n.endswith("magnitude") for n in moved)
    assert any(".lora_B" in n for n in moved)
    with pytest.raises(ValueError, match="retraining phase"):
        BiDoRATrainer(model=adapted("dora"), args=args(tmp_path / "x"), train_dataset=Tokens(), retrain=True)


# ---- kill -9 at any moment, then the same command ------------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from transformers import TrainerCallback
    import loralib
    from loralib.bidora_trainer import BiDoRATrainer, last_complete_checkpoint
    from tests.helpers import Tokens, adapted, args

    out, where, at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class KillInStep(TrainerCallback):  # after the optimiser step, before the upper step and the checkpoint
        def on_optimizer_step(self, args, state, control, **kw):
            if where == "step" and state.global_step + 1 == at:
                die()

    save = BiDoRATrainer._save_optimizer_and_scheduler

    def save_then_die(self, output_dir):  # the checkpoint has weights and optimiser state, no trainer_state.json
        save(self, output_dir)
        if where == "checkpoint" and self.state.global_step == at:
            die()

    BiDoRATrainer._save_optimizer_and_scheduler = save_then_die
    model = adapted("bidora", dropout=0.1)
    trainer = BiDoRATrainer(model=model, args=args(out, max_steps=8, unroll_steps=2), train_dataset=Tokens(),
                            callbacks=[KillInStep()])
    trainer.train(resume_from_checkpoint=True if last_complete_checkpoint(out) else None)
    final = {{n: p.detach().contiguous() for n, p in model.named_parameters()}}
    save_file(final, os.path.join(out, "final.safetensors"))
    """
)


def run_until(script, out, where, at) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(out), where, str(at)], env=env, capture_output=True,
                          text=True, timeout=180)
    if proc.returncode not in (0, -9):
        raise AssertionError(proc.stderr[-3000:])
    return proc


def test_sigkill_inside_a_step_or_a_checkpoint_resumes_to_a_bitwise_identical_end(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO)))
    assert run_until(script, tmp_path / "full", "none", 0).returncode == 0
    killed = tmp_path / "killed"
    assert run_until(script, killed, "step", 3).returncode == -9  # inside step 3 (mid unroll cycle)
    assert (killed / "checkpoint-2").is_dir() and not (killed / "checkpoint-4").exists()
    assert run_until(script, killed, "checkpoint", 6).returncode == -9  # while checkpoint-6 is being written
    assert (killed / "checkpoint-6").is_dir() and not (killed / "checkpoint-6" / "trainer_state.json").exists()
    resumed = run_until(script, killed, "none", 0)
    assert resumed.returncode == 0
    assert "skipping" in resumed.stderr and "checkpoint-6" in resumed.stderr
    full, end = load_file(str(tmp_path / "full" / "final.safetensors")), load_file(str(killed / "final.safetensors"))
    assert full.keys() == end.keys() and all(torch.equal(full[k], end[k]) for k in full)


# ---- torchrun: N processes compute the global-batch algorithm -----------------------------------------------------
DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from tests.helpers import LM_CASES, ddp_run, lm_run, refused_token_averaging, sft_run

    out, world = sys.argv[1], int(os.environ.get("WORLD_SIZE", "1"))
    SFT_CASES = {sft_cases!r}
    for hypergradient in ("darts", "neumann", "cg", "first_order", "sama", "damped_solve"):
        params = ddp_run(os.path.join(out, hypergradient), hypergradient, per_device=4 // world)
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(params, os.path.join(out, hypergradient + ".safetensors"))
    for method, hypergradient in LM_CASES:  # a padded causal LM: rows of 2-12 real tokens
        params = lm_run(os.path.join(out, "lm", method + hypergradient), method, hypergradient, 4 // world)
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(params, os.path.join(out, "lm-" + method + hypergradient + ".safetensors"))
    for hypergradient in SFT_CASES:  # TRL's SFTTrainer (BiDoRASFTTrainer), TRL's collator, pre-tokenised rows
        params = sft_run(os.path.join(out, "sft", hypergradient), hypergradient, 4 // world)
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(params, os.path.join(out, "sft-" + hypergradient + ".safetensors"))
    if refused_token_averaging(os.path.join(out, "averaging")) and int(os.environ.get("RANK", "0")) == 0:
        open(os.path.join(out, "averaging-refused"), "w").close()
    # as PyTorch asks of every torchrun script: without it gloo may abort at exit ("terminate called ...")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


SFT_CASES = ("darts", "first_order")


def test_torchrun_two_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), sft_cases=SFT_CASES))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for hypergradient in ("darts", "neumann", "cg", "first_order", "sama", "damped_solve"):
        single = ddp_run(tmp_path / "single" / hypergradient, hypergradient, per_device=4)
        two = load_file(str(tmp_path / "ddp" / f"{hypergradient}.safetensors"))
        assert single.keys() == two.keys()
        for name, value in single.items():
            torch.testing.assert_close(two[name], value, rtol=1e-9, atol=1e-12, msg=f"{hypergradient} {name}")
        start = tiny_roberta(seed=0, dtype=torch.float64)  # and the run did move the magnitudes
        assert not torch.equal(single["roberta.encoder.layer.0.attention.self.query.magnitude"],
                               start.roberta.encoder.layer[0].attention.self.query.weight.norm(dim=1))
    assert (tmp_path / "ddp" / "averaging-refused").exists()
    # a padded causal LM: each process's token mean weighted by its share of the global batch's label tokens
    for method, hypergradient in LM_CASES:
        single = lm_run(tmp_path / "single-lm" / (method + hypergradient), method, hypergradient, per_device=4)
        two = load_file(str(tmp_path / "ddp" / f"lm-{method}{hypergradient}.safetensors"))
        assert single.keys() == two.keys()
        for name, value in single.items():
            torch.testing.assert_close(two[name], value, rtol=1e-9, atol=1e-12, msg=f"{method} {hypergradient} {name}")
    # BiDoRA through TRL's SFTTrainer: its collator, its loss, our share of the global batch's label tokens
    for hypergradient in SFT_CASES:
        single = sft_run(tmp_path / "single-sft" / hypergradient, hypergradient, per_device=4)
        two = load_file(str(tmp_path / "ddp" / f"sft-{hypergradient}.safetensors"))
        assert single.keys() == two.keys()
        start = tiny_llama(dtype=torch.float64, vocab_size=100, intermediate_size=32, num_key_value_heads=2,
                           tie_word_embeddings=False, pad_token_id=0)  # lm_run's model: the upper level did move
        assert not torch.allclose(single["model.layers.0.self_attn.q_proj.magnitude"],
                                  start.model.layers[0].self_attn.q_proj.weight.norm(dim=1), atol=1e-4)
        for name, value in single.items():
            torch.testing.assert_close(two[name], value, rtol=1e-9, atol=1e-12, msg=f"sft {hypergradient} {name}")


@pytest.mark.parametrize("method", ["bidora", "dora"])
def test_checkpoints_hold_the_trainable_state_not_the_frozen_base(tmp_path, method):
    from safetensors import safe_open

    model = adapted(method)
    trainer = BiDoRATrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=Tokens())
    trainer.train()
    with safe_open(str(tmp_path / "checkpoint-2" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = set(loralib.adapter_state_dict(model)) | {k for k in model.state_dict() if k.endswith("_extra_state")}
    assert keys == expected
    assert not any(k.endswith(("query.weight", "word_embeddings.weight")) for k in keys)
    trainer.save_model(str(tmp_path / "final"))  # outside checkpoints: the whole model, loadable by itself
    reloaded = loralib.from_pretrained(type(model), tmp_path / "final")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("hypergradient", ["darts", "neumann"])
def test_gradient_checkpointing_gives_the_same_run(tmp_path, hypergradient):
    plain, checkpointed = adapted("bidora"), adapted("bidora")
    BiDoRATrainer(model=plain, args=args(tmp_path / "a", max_steps=3, hypergradient=hypergradient,
                                         neumann_alpha=0.1), train_dataset=Tokens()).train()
    BiDoRATrainer(model=checkpointed, args=args(tmp_path / "b", max_steps=3, hypergradient=hypergradient,
                                                neumann_alpha=0.1, gradient_checkpointing=True),
                  train_dataset=Tokens()).train()
    reference = snapshot(plain)
    for name, value in snapshot(checkpointed).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_report_to_tensorboard_logs_both_levels(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path, report_to="tensorboard", max_steps=2),
                  train_dataset=Tokens()).train()
    runs = [p.parent for p in tmp_path.rglob("events.out.tfevents.*")]
    assert runs
    tags = set()
    for run in runs:
        acc = EventAccumulator(str(run))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/upper_loss"} <= tags
