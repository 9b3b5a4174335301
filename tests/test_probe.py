"""examples/study/hypergradient_size.py's references on a tiny model: the functional replay of the Trainer's lower
steps matches the Trainer's own steps, and the Lanczos/MINRES damped reference matches a dense float64 solve."""

from __future__ import annotations

import hypergradient_size as hs  # noqa: E402
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import loralib
from loralib import BiDoRATrainingArguments
from loralib.data import seeded_rng
from tests.helpers import Tokens, tiny_roberta


def _model():
    model = tiny_roberta(seed=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    loralib.apply_adapters(model, loralib.AdapterConfig(method="bidora", r=2, lora_alpha=4, lora_dropout=0.1,
                                                        target_modules=["query"],
                                                        modules_to_save=["classifier"]))
    return model


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A tiny BiDoRA run (dropout everywhere, clipping that bites, weight decay, warmup + linear decay, a strong
    penalty) probed at step 5 with K = 1 and 3."""
    out = tmp_path_factory.mktemp("probe")
    args = BiDoRATrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, max_steps=6, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, upper_fraction=0.25, max_grad_norm=0.05,
        weight_decay=0.01, warmup_steps=2, orth_reg=0.01, hypergradient="damped_solve", logging_steps=100,
    )
    seen = {}

    def probe(trainer, step, total, seconds, call):
        seen["result"] = hs.measure(trainer, step, total, seconds, call, unroll=(1, 3),
                                    lanczos={"max_iter": 400, "check": 20, "solve_rtol": 1e-10})
        upper = trainer.upper_level
        seen["point"] = ([p.detach().clone() for p in upper.lower.trainable_parameters()],
                         [m.detach().clone() for m in upper.trainable_parameters()], call)
        seen["functional"] = hs.Functional(trainer.model, upper.lower.trainable_parameters(),
                                           upper.trainable_parameters(), trainer.args.orth_reg, torch.float64)

    trainer = hs.ProbeTrainer(model=_model(), args=args, train_dataset=Tokens(), at=(5,), keep=3, probe=probe,
                              callbacks=[hs.StopAfter(5)])
    trainer.train()
    seen["trainer"] = trainer
    return seen


def test_replay_matches_the_trainers_steps(probed):
    result = probed["result"]
    check = result["replay_check"]
    assert check["steps"] == [3, 4, 5]
    assert check["max_grad_rel_error"] < 1e-6  # the clipped gradient the optimiser consumed
    assert check["max_theta_rel_error"] < 1e-6  # θ after the written-out AdamW step
    for k in ("K1", "K3"):  # the float64 replay through K steps lands on the Trainer's θ_t
        assert result["unrolled"][k]["theta_rel_error_vs_trainer"] < 1e-6
    # K=1 and K=3 are different references of the same quantity: close but not equal
    assert -1.0 <= result["reference_cosines"]["unrolled_K1~unrolled_K3"] <= 1.0
    assert "damped_d=1" in result["estimate_vs"]  # damped_solve's own δ (default 1.0) is a reference too


def test_damped_reference_matches_a_dense_solve(probed):
    theta, mags, call = probed["point"]
    f64 = probed["functional"]
    th = [t.double().requires_grad_() for t in theta]
    lm = [m.double().requires_grad_() for m in mags]
    with sdpa_kernel(SDPBackend.MATH):
        with seeded_rng(call["upper_seed"]):
            upper = f64.loss(th, lm, call["upper_batch"], penalty=False)
        grads = hs.zeros_for_none(torch.autograd.grad(upper, lm + th, allow_unused=True), lm + th)
        direct, v = hs.flat(grads[: len(lm)]), hs.flat(grads[len(lm):])
        with seeded_rng(call["lower_seed"]):
            lower = f64.loss(th, lm, call["lower_batch"], penalty=True)
        g_low = torch.autograd.grad(lower, th, create_graph=True)
        n = v.numel()
        eye = torch.eye(n, dtype=torch.float64)
        hess = torch.stack([hs.flat(torch.autograd.grad(g_low, th, hs.unflat(eye[i], th), retain_graph=True))
                            for i in range(n)])
        hess = (hess + hess.T) / 2
        lam_min = float(torch.linalg.eigvalsh(hess)[0])
        ref = hs.damped_reference(f64, theta, mags, call, max_iter=400, check=20, solve_rtol=1e-12,
                                  required=hs.DAMPING_FACTORS)
        assert ref["stats"]["lambda_min"] == pytest.approx(lam_min, rel=1e-3)
        assert probed["result"]["lanczos"]["lambda_min"] == pytest.approx(lam_min, rel=1e-3)
        for f in hs.DAMPING_FACTORS:
            delta = f * 2 * abs(ref["stats"]["lambda_min"])
            x = torch.linalg.solve(hess + delta * eye, v)
            cross = torch.autograd.grad(g_low, lm, hs.unflat(x, th), retain_graph=True, allow_unused=True)
            dense = direct - hs.flat(hs.zeros_for_none(cross, lm))
            assert hs.rel(ref["totals"][f"{f:g}x"], dense) < 1e-8
            assert ref["stats"]["damped"][f"{f:g}x"]["true_relative_residual"] < 1e-8


def test_interleaved_timing_calls_every_estimator(probed):
    trainer = probed["trainer"]
    before = [p.detach().clone() for p in trainer.upper_level.trainable_parameters()]
    names = ["darts", "damped_solve", "sama", "first_order"]
    out = hs.time_estimators(trainer, names, rounds=2)
    assert set(out["median_seconds"]) == set(names) and all(len(t) == 2 for t in out["seconds"].values())
    assert out["median_ratio_to_darts"]["darts"] == 1.0
    assert trainer.upper_level.hypergradient.name == "damped_solve"  # the run's estimator is put back
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.upper_level.trainable_parameters()))
