"""The bi-level building blocks on a tiny RoBERTa: seeded dropout masks per batch, resumable sharded streams,
seeded splits. (Who trains what, end to end, is tests/test_bidora_trainer.py.)"""

from __future__ import annotations

import pytest
import torch

import loralib
from loralib.data import BatchStream, split_indices
from tests.helpers import tiny_roberta

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


def test_repeated_evaluations_of_a_batch_see_the_same_dropout_masks():
    """darts evaluates the lower loss of one batch twice (θ ± εv); only the parameters may differ between them,
    and the evaluations leave the global RNG where it was."""
    from loralib.bilevel import LowerLevel

    model = bidora_model(dropout=0.3).train()
    loralib.allow_joint_magnitude_training(model)
    batch = collate(make_data(8))
    lower = LowerLevel(loralib.direction_parameters(model), lambda b: task_loss(model, b), None, "cpu")
    problem = lower.at(batch, 17, loralib.magnitude_parameters(model))
    state = torch.random.get_rng_state()
    first, second = problem.loss(), problem.loss()
    assert torch.equal(first, second)
    assert torch.equal(torch.random.get_rng_state(), state)
    # ... and dropout is really active: plain evaluations with the global RNG differ, as does another seed.
    with torch.no_grad():
        plain = [task_loss(model, batch) for _ in range(2)]
    assert not torch.equal(plain[0], plain[1])
    assert not torch.equal(lower.at(batch, 18, loralib.magnitude_parameters(model)).loss(), first)


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
