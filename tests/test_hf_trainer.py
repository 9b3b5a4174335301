"""A plain transformers.Trainer trains LoRA and DoRA adapters: checkpoints, save_total_limit, load_best_model_at_end
and resume_from_checkpoint (the resumed run ends equal to an uninterrupted one)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

import loralib
from tests.helpers import StopAt, Tokens, adapted
from tests.helpers import plain_args as args


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_plain_trainer_checkpoints_and_resume_equal_uninterrupted(method, tmp_path):
    frozen_before = {n: p.detach().clone() for n, p in adapted(method).named_parameters() if not p.requires_grad}
    full = adapted(method)
    Trainer(model=full, args=args(tmp_path / "full", save_total_limit=2), train_dataset=Tokens()).train()
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    changed = trainable_state(full)
    start = trainable_state(adapted(method))
    assert all(not torch.equal(changed[n], start[n]) for n in changed if ".lora_A" not in n)  # trained
    for name, param in full.named_parameters():  # the frozen base is bitwise unchanged
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), name

    interrupted = adapted(method)
    Trainer(
        model=interrupted, args=args(tmp_path / "cut"), train_dataset=Tokens(), callbacks=[StopAt(4)]
    ).train()
    assert (tmp_path / "cut" / "checkpoint-4").is_dir() and not (tmp_path / "cut" / "checkpoint-6").exists()
    resumed = adapted(method)
    Trainer(model=resumed, args=args(tmp_path / "cut"), train_dataset=Tokens()).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4")
    )
    end = trainable_state(resumed)
    for name, value in changed.items():
        torch.testing.assert_close(end[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_plain_trainer_load_best_model_at_end(method, tmp_path):
    model = adapted(method)
    trainer = Trainer(
        model=model,
        args=args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            save_total_limit=1,
        ),
        train_dataset=Tokens(),
        eval_dataset=Tokens(n=8, seed=1),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    reloaded = loralib.from_pretrained(type(model), best)
    for name, value in trainable_state(model).items():
        assert torch.equal(reloaded.get_parameter(name), value), name
