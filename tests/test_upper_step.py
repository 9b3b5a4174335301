"""The upper step honours everything that changes the Trainer's loss, graph or run, or refuses it with a sentence.

Each case is checked against a plain reference: the loss written out by hand, the same run without the feature, or
a fresh trainer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

import loralib
from loralib import BiDoRATrainer
from tests.helpers import Tokens, adapted, args, changed, snapshot


def ready(trainer: BiDoRATrainer) -> BiDoRATrainer:
    """Levels built as at a train start, without training."""
    trainer.create_optimizer()
    trainer.create_scheduler(num_training_steps=6)
    return trainer


def upper_batch(trainer):
    return trainer._prepare_inputs(trainer.upper_stream.next())


def by_hand(model, batch, loss_fn):
    """The loss written out: the model's logits (no labels passed), then ``loss_fn(logits, labels)``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return loss_fn(model(**inputs).logits, batch["labels"])


# ---- the loss: label smoothing, compute_loss_func, a compute_loss override, no lower penalty ------------------
class TripledLoss(BiDoRATrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return (3 * out[0], out[1]) if return_outputs else 3 * out


CASES = {
    "label_smoothing": (BiDoRATrainer, {"label_smoothing_factor": 0.1}, {},
                        lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1)),
    "compute_loss_func": (BiDoRATrainer, {}, {"compute_loss_func": lambda out, y, num_items_in_batch=None:
                                              F.cross_entropy(out.logits, y) ** 2},
                          lambda z, y: F.cross_entropy(z, y) ** 2),
    "compute_loss_override": (TripledLoss, {}, {}, lambda z, y: 3 * F.cross_entropy(z, y)),
    "plain_with_big_penalty": (BiDoRATrainer, {"orth_reg": 1.0}, {}, F.cross_entropy),
}


@pytest.mark.parametrize("case", list(CASES))
def test_upper_and_lower_evaluations_are_the_users_loss(tmp_path, case):
    cls, arg_kw, trainer_kw, reference = CASES[case]
    model = adapted("bidora")
    trainer = ready(cls(model=model, args=args(tmp_path, **arg_kw), train_dataset=Tokens(), **trainer_kw))
    batch = upper_batch(trainer)
    keys = set(batch)
    model.train()
    with loralib.model.magnitudes_trainable(model):  # as inside the upper step
        expected = by_hand(model, batch, reference)
        torch.testing.assert_close(trainer._upper_task_loss(batch), expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(trainer._lower_task_loss(batch), expected, rtol=1e-6, atol=1e-7)
    assert set(batch) == keys  # nothing popped from the caller's batch


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_with_the_users_loss_moves_the_magnitudes(tmp_path, case):
    cls, arg_kw, trainer_kw, _ = CASES[case]
    model = adapted("bidora")
    before = snapshot(model)
    cls(model=model, args=args(tmp_path, max_steps=2, **arg_kw), train_dataset=Tokens(), **trainer_kw).train()
    assert any(n.endswith("magnitude") for n in changed(before, model))


def test_the_lower_step_keeps_its_penalty(tmp_path):
    """The penalty belongs to the lower training loss: compute_loss in training has it, the upper loss not."""
    model = adapted("bidora")
    trainer = ready(BiDoRATrainer(model=model, args=args(tmp_path, orth_reg=1.0), train_dataset=Tokens()))
    batch = upper_batch(trainer)
    model.train()
    with loralib.model.magnitudes_trainable(model, False):  # as in the lower step
        lower = trainer.compute_loss(model, dict(batch))
        expected = by_hand(model, batch, F.cross_entropy) + loralib.orthogonality_penalty(model)
    torch.testing.assert_close(lower, expected, rtol=1e-6, atol=1e-7)


class Recording(BiDoRATrainer):
    """A compute_loss that records on the trainer, as TRL's SFTTrainer does (metrics, token counts)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._metrics.setdefault("calls", []).append(1)
        self._total_train_tokens += int(inputs["attention_mask"].sum())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_upper_step_leaves_trainer_state_and_rng_alone(tmp_path):
    model = adapted("bidora", dropout=0.2)
    trainer = Recording(model=model, args=args(tmp_path), train_dataset=Tokens())
    trainer._metrics, trainer._total_train_tokens = {}, 0
    ready(trainer)
    trainer._lower_batch = trainer.data_collator([Tokens()[i] for i in range(4)])
    model.train()
    rng = torch.random.get_rng_state()
    with loralib.model.magnitudes_trainable(model, False):
        trainer.upper_step()
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert trainer._metrics == {} and trainer._total_train_tokens == 0


# ---- activation checkpointing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("hypergradient", ["darts", "first_order"])
def test_reentrant_checkpointing_trains_the_magnitudes_as_without_it(tmp_path, hypergradient):
    plain, checkpointed = adapted("bidora"), adapted("bidora")
    before = snapshot(plain)
    common = dict(max_steps=3, hypergradient=hypergradient)
    BiDoRATrainer(model=plain, args=args(tmp_path / "a", **common), train_dataset=Tokens()).train()
    BiDoRATrainer(model=checkpointed, args=args(tmp_path / "b", gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": True}, **common),
                  train_dataset=Tokens()).train()
    assert any(n.endswith("magnitude") for n in changed(before, checkpointed))
    reference = snapshot(plain)
    for name, value in snapshot(checkpointed).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_second_order_hypergradient_under_reentrant_checkpointing_is_refused(tmp_path):
    trainer = BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path, hypergradient="neumann",
                                                                gradient_checkpointing=True,
                                                                gradient_checkpointing_kwargs={"use_reentrant": True}),
                            train_dataset=Tokens())
    with pytest.raises(ValueError, match="use_reentrant"):
        trainer.train()


# ---- the run: a second train(), auto_find_batch_size, model_init ------------------------------------------------
class UpperRates(TrainerCallback):
    """The upper learning rate each step's upper step will use."""

    def __init__(self, trainer_ref):
        self.trainer, self.rates = trainer_ref, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.rates.append(self.trainer.upper_level.optimizer.param_groups[0]["lr"])


def test_a_second_train_moves_the_magnitudes_on_a_fresh_upper_schedule(tmp_path):
    model = adapted("bidora")
    trainer = BiDoRATrainer(model=model, args=args(tmp_path, max_steps=3, save_strategy="no"), train_dataset=Tokens())
    rates = UpperRates(trainer)
    trainer.add_callback(rates)
    trainer.train()
    first = list(rates.rates)
    before = snapshot(model)
    trainer.train()
    assert any(n.endswith("magnitude") for n in changed(before, model))
    assert rates.rates[3:] == first  # the upper schedule restarts as the Trainer's does


class OutOfMemoryOnce(TrainerCallback):
    def __init__(self):
        self.raised = False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.raised:
            self.raised = True
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB (simulated)")


def test_auto_find_batch_size_retry_rebuilds_upper_batch_and_schedule(tmp_path):
    pytest.importorskip("accelerate")
    model = adapted("bidora")
    trainer = BiDoRATrainer(
        model=model, args=args(tmp_path, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=6,
                               upper_batch_size=4, auto_find_batch_size=True, save_strategy="no"),
        train_dataset=Tokens(), callbacks=[OutOfMemoryOnce()],
    )
    rates = UpperRates(trainer)
    trainer.add_callback(rates)
    trainer.train()
    batch = trainer._train_batch_size
    assert batch < 6 and trainer.upper_stream.batch_size == (4 * batch) // 6  # scaled like the train batch
    assert len(rates.rates) == trainer.state.max_steps == -(-18 // batch)  # 18 lower examples, this attempt's batch
    assert min(rates.rates) > 0  # the schedule spans the retried run (the first attempt's ends early at 0)


def test_model_init_gives_the_run_of_the_model_itself(tmp_path):
    direct = adapted("bidora")
    BiDoRATrainer(model=direct, args=args(tmp_path / "a", max_steps=3), train_dataset=Tokens()).train()
    trainer = BiDoRATrainer(model_init=lambda: adapted("bidora"), args=args(tmp_path / "b", max_steps=3),
                            train_dataset=Tokens())
    trainer.train()
    reference = snapshot(direct)
    for name, value in snapshot(trainer.model).items():
        assert torch.equal(value, reference[name]), name


def test_model_init_changing_method_is_refused(tmp_path):
    methods = iter(["bidora", "dora"])
    trainer = BiDoRATrainer(model_init=lambda: adapted(next(methods)), args=args(tmp_path, max_steps=1),
                            train_dataset=Tokens())
    with pytest.raises(ValueError, match="same method"):
        trainer.train()


# ---- precision and kernels --------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", [{"fp16": True}, {"use_liger_kernel": True}])
def test_settings_the_upper_step_cannot_honour_are_refused(tmp_path, setting):
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"does not support {name} \\("):
        BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path, **setting), train_dataset=Tokens())


def test_neftune_is_honoured_reproducibly(tmp_path):
    runs = []
    for name in ("a", "b"):
        model = adapted("bidora")
        BiDoRATrainer(model=model, args=args(tmp_path / name, max_steps=3, neftune_noise_alpha=5.0),
                      train_dataset=Tokens()).train()
        runs.append(snapshot(model))
    plain = adapted("bidora")
    BiDoRATrainer(model=plain, args=args(tmp_path / "c", max_steps=3), train_dataset=Tokens()).train()
    assert all(torch.equal(v, runs[1][n]) for n, v in runs[0].items())
    assert not all(torch.equal(v, runs[0][n]) for n, v in snapshot(plain).items())  # the noise is really there


def test_torch_compile_is_honoured(tmp_path):
    """torch_compile=True: the Trainer compiles the model for the lower step; the upper step's loss evaluations run
    the same parameters through the uncompiled module (AOTAutograd has no double backward, which damped_solve
    needs). With dynamo's ``eager`` backend (graphs captured, run without a C++ toolchain) each run equals the
    uncompiled one bitwise, and graphs really were captured (one compilation serves both runs)."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for hypergradient in ("darts", "damped_solve"):  # first- and second-order
        runs = []
        for kw in ({}, {"torch_compile": True, "torch_compile_backend": "eager"}):
            model = adapted("bidora")
            trainer = BiDoRATrainer(model=model, args=args(tmp_path / f"{hypergradient}{len(kw)}", max_steps=2,
                                                           save_strategy="no", hypergradient=hypergradient, **kw),
                                    train_dataset=Tokens())
            trainer.train()
            assert isinstance(trainer.model_wrapped, OptimizedModule) == bool(kw)
            runs.append(snapshot(model))
        assert any(n.endswith("magnitude") for n in changed(runs[0], adapted("bidora")))
        assert all(torch.equal(v, runs[1][n]) for n, v in runs[0].items())
    assert counters["stats"]["unique_graphs"] > 0


# ---- the hypergradient's own state: saved with a version, reset by a new run -----------------------------------
def test_estimator_state_is_fresh_for_every_train(tmp_path):
    trainer = BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path, max_steps=3, save_strategy="no",
                                                                hypergradient="damped_solve"),
                            train_dataset=Tokens())
    trainer.train()
    first = trainer.upper_level.hypergradient
    assert first.calls == 3
    trainer.train()
    assert trainer.upper_level.hypergradient is not first and trainer.upper_level.hypergradient.calls == 3


def _checkpoint(tmp_path, hypergradient):
    BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path, max_steps=2, hypergradient=hypergradient),
                  train_dataset=Tokens()).train()
    return tmp_path / "checkpoint-2"


def _resume(tmp_path, checkpoint, hypergradient):
    trainer = BiDoRATrainer(model=adapted("bidora"), args=args(tmp_path / "resumed", max_steps=4,
                                                                hypergradient=hypergradient),
                            train_dataset=Tokens())
    return trainer.train(resume_from_checkpoint=str(checkpoint))


def test_bilevel_state_of_another_hypergradient_is_refused(tmp_path):
    checkpoint = _checkpoint(tmp_path, "darts")
    with pytest.raises(ValueError, match="hypergradient='darts', not 'damped_solve'"):
        _resume(tmp_path, checkpoint, "damped_solve")


@pytest.mark.parametrize("hypergradient,works", [("darts", True), ("damped_solve", False)])
def test_version_1_bilevel_state_resumes_stateless_estimators_only(tmp_path, hypergradient, works):
    checkpoint = _checkpoint(tmp_path, hypergradient)
    path = checkpoint / "bilevel_state.pt"
    state = torch.load(path, weights_only=True)
    torch.save({k: state[k] for k in ("optimizer", "scheduler", "stream")}, path)  # as loralib wrote it before
    if works:
        _resume(tmp_path, checkpoint, hypergradient)
    else:
        with pytest.raises(ValueError, match="older loralib"):
            _resume(tmp_path, checkpoint, hypergradient)
