"""BiDoRA's bi-level step under FSDP2 (``fully_shard`` applied by hand), 2 processes on CPU gloo, float64.

Reference: the same model, unsharded, in one process on the global batch. FSDP2 reaches sharded parameters only
through ``backward()`` (``torch.autograd.grad`` returns None for them), so the upper level takes its first-order
gradients by backward into ``.grad``; FSDP's reduce-scatter already averages them over the processes; scalar
reductions of shards (the estimators' dot products) are made whole. The estimators that need second derivatives and
the orthogonality penalty (which reads A, B, W0 outside the forward) are refused with a sentence.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

import loralib
from loralib.bilevel import LowerLevel, UpperLevel
from loralib.hypergradients import build_hypergradient
from loralib.model import magnitudes_trainable, orthogonality_penalty
from tests.helpers import tiny_bert

ROWS, STEPS = 8, 3
FIRST_ORDER = ("first_order", "darts", "sama", "damped_solve")


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 100, (ROWS, 6), generator=g),
            "attention_mask": torch.ones(ROWS, 6, dtype=torch.long),
            "labels": torch.randint(0, 2, (ROWS,), generator=g)}


def _model():
    model = tiny_bert(seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).double()
    loralib.apply_adapters(model, loralib.AdapterConfig(method="bidora", r=2, target_modules=["query", "value"]))
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at init: move off it so the implicit terms are not zero
        for p in loralib.direction_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    return model.train()


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run(kind: str, rank: int, world: int, shard: bool) -> dict:
    """STEPS lower AdamW steps, each followed by an upper step; the first hypergradient, the final parameters and
    eval-mode logits on the whole first batch (every process computes the same rows)."""
    model = _model()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    theta, mags = loralib.direction_parameters(model), loralib.magnitude_parameters(model)
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in theta + mags)]
    sharded = all(type(p).__name__ == "DTensor" for p in theta + mags)

    def loss_fn(batch):
        return model(**batch).loss

    lower = LowerLevel(theta, loss_fn, None, "cpu")
    upper_opt = torch.optim.AdamW(mags, lr=1e-2)
    upper = UpperLevel(model, mags, loss_fn, lower, build_hypergradient(kind), upper_opt,
                       torch.optim.lr_scheduler.LambdaLR(upper_opt, lambda _: 1.0), by_backward=True, leaves=others)
    lower_opt = torch.optim.AdamW(theta + others, lr=0.05)

    def mine(batch):
        part = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        return {k: v[part] for k, v in batch.items()} if shard else batch

    first = None
    with magnitudes_trainable(model, False):
        for step in range(STEPS):
            lo, up = mine(_batch(2 * step)), mine(_batch(2 * step + 1))
            lower_opt.zero_grad()
            loss_fn(lo).backward()
            state = {}
            if kind == "sama":
                state = dict(optimizer=lower_opt, last_gradient=[p.grad.detach().clone() for p in theta],
                             learning_rate=[g["lr"] for g in lower_opt.param_groups])
            lower_opt.step()
            if first is None:
                _, grads = upper.hypergradient_of(up, 0, lo, 0, **state)
                first = torch.cat([_whole(g).flatten() for g in grads])
            upper.step(up, 0, lo, 0, step, **state)
    model.eval()
    with torch.no_grad():
        logits = [_whole(model(**{k: v for k, v in _batch(0).items() if k != "labels"}).logits) for _ in range(2)]
    params = torch.cat([_whole(p.detach()).flatten() for p in mags + theta])
    return {"first": first, "params": params, "logits": logits, "sharded": sharded}


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for kind in FIRST_ORDER:
            r = _run(kind, rank, world, shard=True)
            out[kind] = {k: (v.tolist() if isinstance(v, torch.Tensor) else
                             [t.tolist() for t in v] if isinstance(v, list) else v) for k, v in r.items()}
        refused = {}
        for kind in ("neumann", "cg"):
            try:
                _run(kind, rank, world, shard=True)
            except ValueError as err:
                refused[kind] = str(err)
        model = _model()
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        try:
            orthogonality_penalty(model)
        except NotImplementedError as err:
            refused["penalty"] = str(err)
        out["refused"] = refused
        if rank == 0:
            queue.put(out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    out = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"worker exit code {p.exitcode}"
    return out


@pytest.mark.parametrize("kind", FIRST_ORDER)
def test_fsdp2_bilevel_step_equals_one_process(sharded_runs, kind):
    """Hypergradient, parameters after 3 lower + 3 upper steps and eval logits (twice: the eval norm cache while
    FSDP re-materialises W0) equal the unsharded single-process run on the global batch."""
    got = sharded_runs[kind]
    assert got["sharded"]  # the parameters really were DTensors
    ref = _run(kind, 0, 1, shard=False)
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(got["first"], **f64), ref["first"], rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(torch.tensor(got["params"], **f64), ref["params"], rtol=1e-9, atol=1e-12)
    for mine, theirs in zip(got["logits"], ref["logits"]):
        torch.testing.assert_close(torch.tensor(mine, **f64), theirs, rtol=1e-9, atol=1e-12)
    if kind in ("darts", "sama"):  # an implicit term was there to get right (damped_solve's first call is a cold start)
        without = torch.tensor(sharded_runs["first_order"]["first"], **f64)
        assert not torch.equal(torch.tensor(got["first"], **f64), without)


def test_fsdp2_second_order_estimators_and_penalty_refused(sharded_runs):
    refused = sharded_runs["refused"]
    for kind in ("neumann", "cg"):
        assert f"hypergradient={kind!r}" in refused[kind] and "torch.autograd.grad" in refused[kind]
    assert "orth_reg=0" in refused["penalty"]
