"""Hypergradients of our Betty wiring against closed forms, on a toy bi-level problem solvable exactly.

Toy problem (float64), a ridge regression through a DoRA-style per-feature magnitude ``m``:

    lower:  w*(m) = argmin_w  ‖X_lo (m ⊙ w) − y_lo‖² / n_lo + μ ‖w‖²      (closed form: a linear solve)
    upper:  F(m)  = ‖X_up (m ⊙ w*(m)) − y_up‖² / n_up

The exact hypergradient dF/dm is obtained by autograd *through the closed-form solve* (no implicit-function
formula involved), so it is an independent reference for cg / neumann. ``w`` starts at ``w*(m)`` (or a given point),
and the hypergradient is read from the upper level that loralib.BiDoRATrainer steps (``UpperLevel``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import rel_err
from tests.ridge_toy import MU, N_LO, N_UP, D, closed_form_w, exact_hypergradient, make_data, task

upper_objective = task


class Toy(nn.Module):
    def __init__(self, w: torch.Tensor, m: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.m = nn.Parameter(m.clone())


def lower_objective(w, m, x, y):
    return task(w, m, x, y) + MU * (w**2).sum()


@pytest.fixture(scope="module")
def data():
    return make_data()


def lower_hessian(data) -> torch.Tensor:
    x_lo, y_lo, _, _, m = data
    w = closed_form_w(m, x_lo, y_lo)
    return torch.autograd.functional.hessian(lambda w_: lower_objective(w_, m, x_lo, y_lo), w)


def test_closed_form_reference_is_the_lower_optimum(data):
    x_lo, y_lo, _, _, m = data
    w = closed_form_w(m, x_lo, y_lo).requires_grad_(True)
    (grad,) = torch.autograd.grad(lower_objective(w, m, x_lo, y_lo), w)
    assert grad.abs().max() < 1e-12


def test_cg_converges_to_exact_hypergradient(data):
    exact = exact_hypergradient(data)
    errors = [rel_err(trainer_hypergradient(data, "cg", cg_iterations=k), exact) for k in (1, 2, D)]
    assert errors[0] > 1e-3, "one CG step should not already be exact on this problem (else the test is vacuous)"
    assert errors[1] < errors[0]
    assert errors[2] < 1e-9, errors  # CG is exact after dim(w) steps on a quadratic


def test_neumann_converges_to_exact_hypergradient(data):
    exact = exact_hypergradient(data)
    alpha = 1.0 / float(torch.linalg.eigvalsh(lower_hessian(data)).max())
    errors = [
        rel_err(trainer_hypergradient(data, "neumann", neumann_iterations=k, neumann_alpha=alpha), exact)
        for k in (1, 5, 200)
    ]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-8, errors


def test_darts_restores_lower_parameters_exactly(data):
    """θ + εv − 2εv + εv ≠ θ in floats: the lower parameters are put back bit for bit after darts."""
    x_lo, y_lo, x_up, y_up, m = data
    w = closed_form_w(m, x_lo, y_lo) + 0.1234567
    toy, lower, upper = trainer_levels(data, "darts", w0=w, darts_alpha=0.37)
    for _ in range(3):
        hypergradient_at(upper, {"x": x_lo, "y": y_lo}, {"x": x_up, "y": y_up})
    assert torch.equal(toy.w.detach(), w)


# ---- the same closed forms through the Trainer-driven levels (loralib.BiDoRATrainer's UpperLevel) ---------------
def trainer_levels(data, hypergradient, w0=None, **settings):
    from loralib.bilevel import LowerLevel, UpperLevel
    from loralib.hypergradients import build_hypergradient

    x_lo, y_lo, x_up, y_up, m = data
    w0 = closed_form_w(m, x_lo, y_lo) if w0 is None else w0
    toy = Toy(w0, m)
    defaults = dict(darts_alpha=0.01, neumann_iterations=3, neumann_alpha=1.0, cg_iterations=3)
    lower = LowerLevel([toy.w], lambda b: lower_objective(toy.w, toy.m, b["x"], b["y"]), None, "cpu")
    upper = UpperLevel(
        toy,
        [toy.m],
        lambda b: upper_objective(toy.w, toy.m, b["x"], b["y"]),
        lower,
        build_hypergradient(hypergradient, **{**defaults, **settings}),
        torch.optim.SGD([toy.m], lr=0.0),
        torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([toy.m], lr=0.0), lambda _: 1.0),
    )
    return toy, lower, upper


def hypergradient_at(upper, lower_batch, upper_batch):
    return upper.hypergradient_of(upper_batch, 0, lower_batch, 0)


def trainer_hypergradient(data, hypergradient, w0=None, **settings) -> torch.Tensor:
    x_lo, y_lo, x_up, y_up, _ = data
    toy, lower, upper = trainer_levels(data, hypergradient, w0=w0, **settings)
    _, grads = hypergradient_at(upper, {"x": x_lo, "y": y_lo}, {"x": x_up, "y": y_up})
    return grads[0]


def test_trainer_path_neumann_alpha_is_used(data):
    """neumann_alpha reaches Betty's Config (run_glue used to drop it and run at 1.0, which diverges here)."""
    lam = float(torch.linalg.eigvalsh(lower_hessian(data)).max())
    assert lam > 2.0  # at alpha = 1 the series diverges on this problem
    exact = exact_hypergradient(data)
    good = rel_err(trainer_hypergradient(data, "neumann", neumann_iterations=50, neumann_alpha=1.0 / lam), exact)
    bad = rel_err(trainer_hypergradient(data, "neumann", neumann_iterations=50, neumann_alpha=1.0), exact)
    assert good < 1e-3 and bad > 1.0, (good, bad)


def test_trainer_path_darts_and_first_order_match_their_definitions(data):
    x_lo, y_lo, x_up, y_up, m = data
    w = closed_form_w(m, x_lo, y_lo) + 0.2
    w_ = w.clone().requires_grad_(True)
    m_ = m.clone().requires_grad_(True)
    direct_m, v = torch.autograd.grad(upper_objective(w_, m_, x_up, y_up), (m_, w_))
    (grad_w,) = torch.autograd.grad(lower_objective(w_, m_, x_lo, y_lo), w_, create_graph=True)
    (mixed,) = torch.autograd.grad(grad_w, m_, grad_outputs=v)
    assert rel_err(trainer_hypergradient(data, "darts", w0=w, darts_alpha=1e-4), direct_m - mixed) < 1e-7
    torch.testing.assert_close(trainer_hypergradient(data, "first_order", w0=w), direct_m, rtol=1e-12, atol=1e-14)


def _ddp_worker(rank, world, port, data, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x_lo, y_lo, x_up, y_up, m = data
        w = closed_form_w(m, x_lo, y_lo) + 0.2
        out = {}
        for kind, settings in CASES_DDP:
            toy, lower, upper = trainer_levels(data, kind, w0=w, **settings)
            lo, up = slice(rank * N_LO // world, (rank + 1) * N_LO // world), slice(
                rank * N_UP // world, (rank + 1) * N_UP // world
            )
            loss, grads = hypergradient_at(upper, {"x": x_lo[lo], "y": y_lo[lo]}, {"x": x_up[up], "y": y_up[up]})
            out[kind] = (loss, grads[0].tolist())  # plain floats: tensors in a queue die with the process
        if rank == 0:
            results.put(out)
        dist.barrier()  # nobody tears gloo down while the other process still talks to it
    finally:
        dist.destroy_process_group()


CASES_DDP = [("darts", {"darts_alpha": 1e-4}), ("neumann", {"neumann_iterations": 5, "neumann_alpha": 0.2}),
             ("cg", {"cg_iterations": 3}), ("first_order", {}), ("damped_solve", {"darts_alpha": 1e-4})]


def test_two_processes_compute_the_global_batch_hypergradient(data):
    """Under data parallelism every hypergradient type equals one process on the global batch (float64, gloo):
    v, the direct term, each Hessian-vector product and the implicit term are averaged over the processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ctx_procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, data, results)) for r in range(2)]
    for p in ctx_procs:
        p.start()
    got = results.get(timeout=120)
    for p in ctx_procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"worker exit code {p.exitcode}"
    x_lo, y_lo, x_up, y_up, m = data
    w = closed_form_w(m, x_lo, y_lo) + 0.2
    for kind, settings in CASES_DDP:
        toy, lower, upper = trainer_levels(data, kind, w0=w, **settings)
        loss, grads = hypergradient_at(upper, {"x": x_lo, "y": y_lo}, {"x": x_up, "y": y_up})
        assert abs(got[kind][0] - loss) < 1e-12
        torch.testing.assert_close(torch.tensor(got[kind][1], dtype=torch.float64), grads[0], rtol=1e-10,
                                   atol=1e-12, msg=kind)
