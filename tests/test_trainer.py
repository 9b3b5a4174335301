"""The shared trainer: configuration, selection, retraining, determinism, SIGKILL resume, 2-process DDP (CPU/gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loralib
from loralib.trainer import TrainerConfig, train
from tests.test_bilevel import collate, make_data, task_loss
from tests.tiny_models import tiny_roberta

REPO = Path(__file__).resolve().parents[1]


def adapted(method: str, dropout: float = 0.1, seed: int = 0):
    model = tiny_roberta(hidden_dropout_prob=dropout, seed=seed)
    if method != "ft":
        loralib.apply_adapters(
            model,
            loralib.AdapterConfig(
                method=method, r=4, lora_alpha=8, lora_dropout=dropout, modules_to_save=["classifier"]
            ),
        )
    return model


def accuracy(model, dataset):
    batch = collate([dataset[i] for i in range(len(dataset))])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean().item(), "neg_loss": -float(
        torch.nn.functional.cross_entropy(logits, batch["labels"]))}


def quick(method="bidora", **overrides) -> TrainerConfig:
    kwargs = dict(method=method, iterations=8, batch_size=8, lr=1e-2, eval_every=4, checkpoint_every=4,
                  snapshots=2, progress=False)
    kwargs.update(overrides)
    return TrainerConfig(**kwargs)


# ---- configuration ----------------------------------------------------------------------------------------------
def test_config_yaml_round_trip_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: bidora\niterations: 100\nbetas: [0.9, 0.999]\nupper_lr: 1.0e-4\n")
    cfg = TrainerConfig.from_yaml(path)
    assert cfg.betas == (0.9, 0.999) and cfg.upper_lr == 1e-4 and cfg.upper_lr_ == 1e-4 and cfg.lr == 5e-5
    assert TrainerConfig.from_dict(cfg.to_dict()) == cfg
    path.write_text("method: bidora\niterations: 100\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        TrainerConfig.from_yaml(path)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(method="qlora"), "method"),
        (dict(iterations=0), "iterations"),
        (dict(lr=-1.0), "lr"),
        (dict(hypergradient="sama"), "hypergradient"),
        (dict(upper_fraction=0.0), "upper_fraction > 0"),
        (dict(upper_fraction=1.0), "upper_fraction"),
        (dict(method="lora", retrain_iterations=5), "retrain_iterations"),
        (dict(betas=(0.9, 1.5)), "betas"),
        (dict(unroll_steps=True), "unroll_steps"),
        (dict(device="tpu"), "device"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    kwargs = dict(method="bidora", iterations=10)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**kwargs)


def test_method_must_match_the_model(tmp_path):
    with pytest.raises(ValueError, match="adapters are 'lora'"):
        train(adapted("lora"), make_data(32), collate, task_loss, quick("dora"), tmp_path)
    with pytest.raises(ValueError, match="without adapters"):
        train(adapted("lora"), make_data(32), collate, task_loss, quick("ft"), tmp_path)


# ---- selection, outputs, retraining -----------------------------------------------------------------------------
def test_bidora_run_outputs_and_heldout_selection(tmp_path):
    model = adapted("bidora")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    results = train(model, make_data(64), collate, task_loss, quick(iterations=12), tmp_path, evaluate=accuracy,
                    eval_datasets={"dev": make_data(16, seed=1)}, select_metric="neg_loss", extra_results={"task": "t"})
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["task"] == "t" and on_disk["method"] == "bidora" and on_disk["rank"] == 4
    assert results["selection"] == "heldout"
    heldout = {r["step"]: r["neg_loss"] for r in results["history"] if r["split"] == "heldout"}
    assert sorted(heldout) == [4, 8, 12]
    best = max(heldout, key=heldout.get)
    assert results["selected_step"] == best
    dev_at_best = [r for r in results["history"] if r["split"] == "dev" and r["step"] == best][0]
    assert results["eval"]["dev"]["accuracy"] == dev_at_best["accuracy"]
    assert results["final_eval"]["dev"]["neg_loss"] == [r for r in results["history"] if r["split"] == "dev"][-1][
        "neg_loss"]
    # The selected weights are what the model holds and what adapter/ stores, and they reproduce the held-out score.
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(v, loralib.adapter_state_dict(model)[k]) for k, v in saved.items())
    model.eval()
    with torch.no_grad():
        from loralib.bilevel import split_indices

        _, upper = split_indices(64, 0.2, seed=0)
        data = make_data(64)
        assert accuracy(model, [data[i] for i in upper])["neg_loss"] == pytest.approx(heldout[best], abs=1e-6)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,phase,lower_loss,upper_loss") and len(rows) == 13
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["base_weights.safetensors", "step_12",
                                                                         "step_6"]


def test_dev_selection_is_labelled(tmp_path):
    results = train(adapted("lora"), make_data(48), collate, task_loss, quick("lora", select_on_dev=True), tmp_path,
                    evaluate=accuracy, eval_datasets={"dev": make_data(16, seed=1)}, select_metric="accuracy")
    assert results["selection"] == "dev_best_over_time"


def test_retraining_freezes_learned_magnitudes_and_reinitialises_directions(tmp_path):
    model = adapted("bidora")
    base_norms = [layer.magnitude.detach().clone() for _, layer in loralib.adapter_layers(model)]
    results = train(model, make_data(48), collate, task_loss, quick(iterations=6, retrain_iterations=6), tmp_path,
                    evaluate=accuracy, eval_datasets={"dev": make_data(16, seed=1)}, select_metric="accuracy")
    assert results["selection"] == "final"
    search_end = load_file(str(tmp_path / "snapshots" / "step_6" / "adapter_model.safetensors"))
    final = loralib.adapter_state_dict(model)
    names = [n for n, _ in loralib.adapter_layers(model)]
    for name, norm in zip(names, base_norms):
        assert torch.equal(final[f"{name}.magnitude"], search_end[f"{name}.magnitude"])  # frozen in retraining
        assert not torch.equal(final[f"{name}.magnitude"], norm)  # learned in the search phase
        assert not torch.equal(final[f"{name}.lora_A"], search_end[f"{name}.lora_A"])
    # The held-out split is part of the retraining data, so it is evaluated in the search phase only.
    assert {(r["phase"], r["split"]) for r in results["history"]} == {("search", "heldout"), ("search", "dev"),
                                                                      ("retrain", "dev")}


def test_single_level_baselines_train_all_trainable_parameters(tmp_path):
    for method in ("ft", "dora"):
        model = adapted(method)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, make_data(40), collate, task_loss, quick(method, iterations=3, upper_fraction=0.0),
              tmp_path / method)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]) != p.requires_grad, name


# ---- determinism ------------------------------------------------------------------------------------------------
def test_same_seed_same_result(tmp_path):
    def run(seed, out):
        model = adapted("bidora")
        train(model, make_data(48), collate, task_loss, quick(iterations=5, seed=seed), out)
        return loralib.adapter_state_dict(model)

    a, b, c = run(0, tmp_path / "a"), run(0, tmp_path / "b"), run(1, tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---- SIGKILL and resume -----------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    import loralib, loralib.trainer as trainer
    from tests.test_trainer import adapted, accuracy
    from tests.test_bilevel import collate, make_data, task_loss

    out, kill_after = sys.argv[1], int(sys.argv[2])
    saves = 0
    original = trainer.save_checkpoint

    def save_then_maybe_die(state, path):
        global saves
        original(state, path)
        saves += 1
        if saves == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.save_checkpoint = save_then_maybe_die
    cfg = trainer.TrainerConfig(method="bidora", iterations=10, retrain_iterations=4, unroll_steps=2, batch_size=8,
                                lr=1e-2, eval_every=2, checkpoint_every=3, snapshots=2, progress=False)
    model = adapted("bidora")
    trainer.train(model, make_data(48), collate, task_loss, cfg, out, evaluate=accuracy,
                  eval_datasets={{"dev": make_data(16, seed=1)}})
    """
)


def run_script(script: Path, out: Path, kill_after: int) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(out), str(kill_after)], env=env, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode not in (0, -9):
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode


def test_sigkilled_run_resumes_to_a_bitwise_identical_result(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    assert run_script(script, tmp_path / "full", 0) == 0
    # Killed right after checkpoint 1 (step 3: mid unroll cycle, search phase), then after the resumed run's third
    # checkpoint (step 12: inside the retraining phase), then resumed to the end.
    assert run_script(script, tmp_path / "killed", 1) == -9
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 3
    assert run_script(script, tmp_path / "killed", 3) == -9
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 12
    assert run_script(script, tmp_path / "killed", 0) == 0

    full = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    res_full = json.loads((tmp_path / "full" / "results.json").read_text())
    res_resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert res_full["history"] == res_resumed["history"]
    full_log = (tmp_path / "full" / "log.csv").read_text().splitlines()
    resumed_log = (tmp_path / "killed" / "log.csv").read_text().splitlines()
    strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # noqa: E731 (drop the elapsed-time column)
    assert strip(full_log) == strip(resumed_log) and len(full_log) == 15


def test_resume_refuses_a_different_config(tmp_path):
    train(adapted("lora"), make_data(40), collate, task_loss, quick("lora", iterations=4), tmp_path)
    with pytest.raises(ValueError, match="different config"):
        train(adapted("lora"), make_data(40), collate, task_loss, quick("lora", iterations=4, lr=0.5), tmp_path)


# ---- data parallel ----------------------------------------------------------------------------------------------
DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from loralib.trainer import TrainerConfig, train
    from tests.test_trainer import adapted
    from tests.test_bilevel import collate, make_data, task_loss

    out = sys.argv[1]
    model = adapted("bidora")
    cfg = TrainerConfig(method="bidora", iterations=6, batch_size=4, lr=1e-2, checkpoint_every=3, progress=False)
    train(model, make_data(64), collate, task_loss, cfg, out)
    torch.save({{n: p.detach().clone() for n, p in model.named_parameters()}}, f"{{out}}/rank{{os.environ['RANK']}}.pt")
    """
)


def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "out" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "out" / "rank1.pt", weights_only=True)
    start = dict(adapted("bidora").named_parameters())
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    moved = [k for k in rank0 if not torch.equal(rank0[k], start[k])]
    assert any(k.endswith("magnitude") for k in moved) and any(k.endswith("lora_B") for k in moved)
    assert all(k.endswith(("magnitude", "lora_A", "lora_B")) or ".classifier." in f".{k}" for k in moved)
    assert (tmp_path / "out" / "results.json").exists()
