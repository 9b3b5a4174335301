"""BiDoRA on a tiny RoBERTa: who changes what, and when (each Betty sharp edge has a test here)."""

from __future__ import annotations

import pytest
import torch

import loralib
from loralib.bilevel import BatchStream, build_engine, make_optimizer, make_scheduler, orthogonality_term, split_indices
from tests.tiny_models import tiny_roberta

L = 8


def make_data(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, L), generator=g)
    labels = (ids[:, 0] > 50).long()
    mask = torch.ones(L, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def task_loss(model, batch):
    return model(**batch).loss


def bidora_model(dropout: float = 0.1):
    model = tiny_roberta(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    loralib.apply_adapters(
        model,
        loralib.AdapterConfig(method="bidora", r=4, lora_alpha=8, lora_dropout=dropout, modules_to_save=["classifier"]),
    )
    return model


def bidora_engine(model, hypergradient="darts", unroll_steps=1, lr=1e-2):
    data = make_data(64)
    lower_idx, upper_idx = split_indices(len(data), 0.25, seed=0)
    direction, magnitude = loralib.direction_parameters(model), loralib.magnitude_parameters(model)
    lower_opt = make_optimizer(direction, lr, 0.1)
    upper_opt = make_optimizer(magnitude, lr, 0.1)
    engine = build_engine(
        model=model,
        lower_params=direction,
        lower_loss=task_loss,
        lower_extra_loss=orthogonality_term(model, 1e-3),
        lower_stream=BatchStream(data, lower_idx, 8, collate, seed=1),
        lower_optimizer=lower_opt,
        upper_params=magnitude,
        upper_loss=task_loss,
        upper_stream=BatchStream(data, upper_idx, 8, collate, seed=2),
        upper_optimizer=upper_opt,
        hypergradient=hypergradient,
        unroll_steps=unroll_steps,
    )
    for problem, total in ((engine.direction, 10), (engine.magnitude, 10)):
        problem.scheduler = make_scheduler(problem.optimizer, total, 0.1)
    return engine


def snapshot(params):
    return [p.detach().clone() for p in params]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def frozen_parameters(model):
    trainable = {id(p) for p in loralib.direction_parameters(model) + loralib.magnitude_parameters(model)}
    return [p for p in model.parameters() if id(p) not in trainable]


@pytest.mark.parametrize("hypergradient,unroll", [("darts", 1), ("darts", 2), ("neumann", 1), ("cg", 1),
                                                  ("first_order", 1)])
def test_each_level_changes_only_its_own_parameters(hypergradient, unroll):
    model = bidora_model()
    engine = bidora_engine(model, hypergradient, unroll)
    direction, magnitude = loralib.direction_parameters(model), loralib.magnitude_parameters(model)
    frozen = frozen_parameters(model)
    frozen0, magnitude0 = snapshot(frozen), snapshot(magnitude)
    assert frozen and len(magnitude) == 4 and len(direction) == 4 * 2 + 4
    calls = {"direction": 0, "magnitude": 0}

    def watch(problem, own, others):
        inner = problem.one_step_descent

        def wrapped(*args, **kwargs):
            own_before, others_before = snapshot(own), snapshot(others)
            out = inner(*args, **kwargs)
            calls[problem.name] += 1
            assert same(snapshot(others), others_before), f"a {problem.name} step changed the other level"
            assert not same(snapshot(own), own_before), f"a {problem.name} step did not change its own parameters"
            return out

        problem.one_step_descent = wrapped

    watch(engine.direction, direction, magnitude + frozen)
    watch(engine.magnitude, magnitude, direction + frozen)
    for _ in range(4):
        engine.step()
    assert calls == {"direction": 4, "magnitude": 4 // unroll}
    assert same(snapshot(frozen), frozen0), "a frozen pretrained weight changed"
    assert not same(snapshot(magnitude), magnitude0), "the magnitudes never moved"


def test_betty_optimizers_hold_exactly_the_intended_parameters():
    """Betty rebuilds each optimiser from trainable_parameters(); by default that would be every module parameter."""
    model = bidora_model()
    engine = bidora_engine(model)
    ids = lambda params: sorted(id(p) for p in params)  # noqa: E731
    lower = [p for g in engine.direction.optimizer.param_groups for p in g["params"]]
    upper = [p for g in engine.magnitude.optimizer.param_groups for p in g["params"]]
    assert ids(lower) == ids(loralib.direction_parameters(model))
    assert ids(upper) == ids(loralib.magnitude_parameters(model))
    assert type(engine.direction.optimizer) is torch.optim.Adam
    assert engine.direction.optimizer.defaults["decoupled_weight_decay"] is True


def test_repeated_evaluations_of_a_batch_see_the_same_dropout_masks():
    """darts evaluates the lower loss of one batch twice (θ ± εv); only the parameters may differ between them."""
    model = bidora_model(dropout=0.3)
    engine = bidora_engine(model)
    engine.step()
    lower = engine.direction
    first = lower.training_step(lower.cur_batch)
    second = lower.training_step(lower.cur_batch)
    assert torch.equal(first, second)
    # ... and dropout is really active: plain evaluations with the global RNG differ.
    with torch.no_grad():
        plain = [lower._loss_fn(lower.cur_batch) for _ in range(2)]
    assert not torch.equal(plain[0], plain[1])


def test_batches_are_plain_dicts_and_streams_resume_exactly():
    data = make_data(40)
    stream = BatchStream(data, range(40), 8, collate, seed=3)
    seen = [stream.next() for _ in range(7)]  # crosses an epoch boundary (5 batches per epoch)
    assert all(type(b) is dict for b in seen)
    state = stream.state_dict()
    rest = [(stream.next()["input_ids"], stream.batch_seed) for _ in range(6)]
    again = BatchStream(data, range(40), 8, collate, seed=3)
    again.load_state_dict(state)
    rest2 = [(again.next()["input_ids"], again.batch_seed) for _ in range(6)]
    assert all(torch.equal(a, b) and s == t for (a, s), (b, t) in zip(rest, rest2))
    # One epoch covers every example once.
    fresh = BatchStream(data, range(40), 8, collate, seed=3)
    ids = torch.cat([fresh.next()["input_ids"] for _ in range(5)])
    assert sorted(map(tuple, ids.tolist())) == sorted(tuple(d["input_ids"].tolist()) for d in data)


def test_data_parallel_shards_are_disjoint():
    data = make_data(48)
    shards = [BatchStream(data, range(48), 4, collate, seed=0, rank=r, world_size=3) for r in range(3)]
    rows = [tuple(x.tolist()) for s in shards for _ in range(len(s)) for x in s.next()["input_ids"]]
    assert len(rows) == 48 and len(set(rows)) == len({tuple(d["input_ids"].tolist()) for d in data})


def test_split_is_seeded_and_disjoint():
    lower, upper = split_indices(100, 0.2, seed=5)
    assert len(upper) == 20 and not set(lower) & set(upper) and sorted(lower + upper) == list(range(100))
    assert split_indices(100, 0.2, seed=5) == (lower, upper)
    assert split_indices(100, 0.2, seed=6) != (lower, upper)
    with pytest.raises(ValueError, match="upper_fraction"):
        split_indices(10, 1.0, seed=0)
