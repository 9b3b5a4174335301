"""loralib.hypergradients against independent references, in float64.

References: closed forms (a ridge regression through a per-feature magnitude, solved exactly), dense float64
linear algebra (torch.autograd.functional.hessian / jacobian, torch.linalg.solve), autograd through a closed-form
lower solve or through one hand-written AdamW step, and Betty 0.2.1's ``darts`` for bit-for-bit equality.
"""

from __future__ import annotations

import threading
import types

import pytest
import torch
from torch import nn

from loralib.hypergradients import (
    ESTIMATORS,
    SAMA,
    DampedSolve,
    Darts,
    LowerProblem,
    adam_step_jacobian,
    build_hypergradient,
)
from tests.ridge_toy import MU, N_LO, D, closed_form_w, exact_hypergradient, make_data, task

F64 = torch.float64


@pytest.fixture(scope="module")
def data():
    return make_data()


class Ridge:
    """θ = [w], λ = [m]; the penalty μ‖w‖² is λ-independent and goes through LowerProblem.penalty."""

    def __init__(self, data, w=None, rows=slice(None)):
        x_lo, y_lo, x_up, y_up, m = data
        self.x_lo, self.y_lo, self.x_up, self.y_up = x_lo[rows], y_lo[rows], x_up, y_up
        w = closed_form_w(m, x_lo, y_lo) if w is None else w
        self.w, self.m = nn.Parameter(w.clone()), nn.Parameter(m.clone())

    def problem(self, **kw) -> LowerProblem:
        return LowerProblem(params=[self.w], upper_params=[self.m],
                            loss=lambda: task(self.w, self.m, self.x_lo, self.y_lo),
                            penalty=lambda: MU * (self.w**2).sum(), **kw)

    def v_and_direct(self):
        direct, v = torch.autograd.grad(task(self.w, self.m, self.x_up, self.y_up), [self.m, self.w])
        return [v], direct


def dense(loss_fn, w, m):
    """(H, C) of loss_fn(w, m) densely: H = ∂²/∂w², C = ∂²/∂m∂w (rows m)."""
    h = torch.autograd.functional.hessian(lambda w_: loss_fn(w_, m.detach()), w.detach())
    jac = torch.autograd.functional.jacobian(lambda m_: _grad_w(loss_fn, w.detach(), m_), m.detach())  # (w, m)
    return h, jac.T


def _grad_w(loss_fn, w, m):
    w = w.clone().requires_grad_(True)
    return torch.autograd.grad(loss_fn(w, m), w, create_graph=True)[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- the table --------------------------------------------------------------------------------------------------
def test_table_and_build():
    assert set(ESTIMATORS) >= {"first_order", "darts", "neumann", "cg", "sama", "damped_solve"}
    with pytest.raises(ValueError, match="first_order.*neumann.*sama"):
        build_hypergradient("soba")
    everything = dict(darts_alpha=0.5, neumann_iterations=7, neumann_alpha=0.1, cg_iterations=4,
                      damped_solve_damping=0.25)
    assert build_hypergradient("cg", **everything).cg_iterations == 4
    est = build_hypergradient("damped_solve", **everything)
    assert (est.darts_alpha, est.damped_solve_damping) == (0.5, 0.25)
    assert not est.second_order and ESTIMATORS["neumann"].second_order and ESTIMATORS["cg"].second_order
    for name, bad in [("darts", dict(darts_alpha=0.0)), ("neumann", dict(neumann_iterations=0)),
                      ("neumann", dict(neumann_alpha=float("nan"))), ("cg", dict(cg_iterations=2.0)),
                      ("damped_solve", dict(damped_solve_damping=-1.0))]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_hypergradient(name, **bad)
    assert build_hypergradient("first_order").implicit([torch.ones(2)], None) is None


# ---- darts ------------------------------------------------------------------------------------------------------
class _Net:
    """A small non-quadratic lower problem: θ = (W1, b1, w2), λ = (mag, unused)."""

    def __init__(self, dtype, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(16, 4, generator=g, dtype=dtype)
        self.y = torch.randn(16, generator=g, dtype=dtype)
        self.theta = [nn.Parameter(torch.randn(*s, generator=g, dtype=dtype)) for s in [(6, 4), (6,), (6,)]]
        self.lam = [nn.Parameter(1 + 0.1 * torch.randn(6, generator=g, dtype=dtype)),
                    nn.Parameter(torch.randn(3, generator=g, dtype=dtype))]

    def loss(self):
        w1, b1, w2 = self.theta
        h = torch.tanh(self.x @ w1.T + b1) * self.lam[0]
        return ((h @ w2 - self.y) ** 2).mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_darts_is_bettys_darts_bit_for_bit(dtype):
    from betty.hypergradient.darts import darts as betty_darts

    net = _Net(dtype)
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g, dtype=dtype) for p in net.theta]
    config = types.SimpleNamespace(darts_alpha=0.37, darts_multitask=False)
    curr = types.SimpleNamespace(config=config, _strategy="default", cur_batch=None,
                                 meta_trainable_parameters=lambda: net.theta,
                                 training_step_exec=lambda batch: net.loss())
    prev = types.SimpleNamespace(trainable_parameters=lambda: net.lam)
    before = [p.detach().clone() for p in net.theta]
    ours = Darts(darts_alpha=0.37).implicit(v, LowerProblem(net.theta, net.lam, net.loss))
    assert all(torch.equal(p, b) for p, b in zip(net.theta, before))
    theirs = betty_darts(v, curr, prev, False)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert ours[1].abs().max() == 0 and ours[0].abs().max() > 0


def test_darts_is_the_mixed_derivative_and_skips_the_penalty(data):
    toy = Ridge(data, w=closed_form_w(data[4], data[0], data[1]) + 0.2)
    v, _ = toy.v_and_direct()
    _, c = dense(lambda w, m: task(w, m, toy.x_lo, toy.y_lo), toy.w, toy.m)
    calls = []
    problem = toy.problem()
    problem.penalty = lambda: calls.append(1) or MU * (toy.w**2).sum()
    out = Darts(darts_alpha=1e-3).implicit(v, problem)
    assert rel(out[0], -(c @ v[0])) < 1e-9 and not calls


# ---- neumann, cg ------------------------------------------------------------------------------------------------
def test_neumann_and_cg_converge_to_the_closed_form(data):
    exact = exact_hypergradient(data)
    toy = Ridge(data)
    v, direct = toy.v_and_direct()
    h, _ = dense(lambda w, m: task(w, m, toy.x_lo, toy.y_lo) + MU * (w**2).sum(), toy.w, toy.m)
    lam = torch.linalg.eigvalsh(h)
    cg = [rel(direct + build_hypergradient("cg", cg_iterations=k).implicit(v, toy.problem())[0], exact)
          for k in (1, 2, D)]
    assert cg[0] > 1e-3 and cg[1] < cg[0] and cg[2] < 1e-9, cg
    alpha = 1.0 / float(lam.max())
    neu = [rel(direct + build_hypergradient("neumann", neumann_iterations=k, neumann_alpha=alpha)
               .implicit(v, toy.problem())[0], exact) for k in (1, 5, 200)]
    assert neu[0] > neu[1] > neu[2] and neu[2] < 1e-8, neu
    no_penalty = toy.problem()
    no_penalty.penalty = None  # the penalty belongs to H: without it the solve is of another system
    assert rel(direct + build_hypergradient("cg", cg_iterations=D).implicit(v, no_penalty)[0], exact) > 1e-3


def test_cg_stops_at_negative_curvature():
    """On H = diag(1, −1) and v = (0, 1) the first direction has negative curvature: CG stops at x = 0."""
    theta, lam = nn.Parameter(torch.tensor([0.3, 0.2], dtype=F64)), nn.Parameter(torch.ones(2, dtype=F64))
    problem = LowerProblem([theta], [lam], lambda: 0.5 * (theta[0] ** 2 - theta[1] ** 2) + (lam * theta).sum())
    out = build_hypergradient("cg", cg_iterations=5).implicit([torch.tensor([0.0, 1.0], dtype=F64)], problem)
    assert torch.equal(out[0], torch.zeros(2, dtype=F64))


# ---- SAMA -------------------------------------------------------------------------------------------------------
LR, BETAS, EPS, WD = 0.05, (0.9, 0.99), 1e-8, 0.1


def adamw_step(theta, g, m0, s0, t):
    """torch's AdamW step written out: θ(1 − lr·wd) − lr · m̂ / (√ŝ + eps)."""
    b1, b2 = BETAS
    m = b1 * m0 + (1 - b1) * g
    s = b2 * s0 + (1 - b2) * g * g
    return theta * (1 - LR * WD) - LR * (m / (1 - b1**t)) / ((s / (1 - b2**t)).sqrt() + EPS)


@pytest.fixture()
def stepped(data):
    """The ridge toy after 4 AdamW steps from w* + 0.3; returns (toy, optimizer, θ_t, g_t, (m0, s0, t))."""
    toy = Ridge(data, w=closed_form_w(data[4], data[0], data[1]) + 0.3)
    opt = torch.optim.AdamW([toy.w], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for _ in range(4):
        theta_t = toy.w.detach().clone()
        old = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[toy.w].items()}
        (g,) = torch.autograd.grad(toy.problem().total_loss(), toy.w)
        toy.w.grad = g.clone()
        opt.step()
        toy.w.grad = None
    before = (old["exp_avg"], old["exp_avg_sq"], float(old["step"]) + 1)
    assert torch.allclose(adamw_step(theta_t, g, *before), toy.w.detach(), rtol=0, atol=1e-14)
    return toy, opt, theta_t, g, before


def test_sama_jacobian_is_the_adamw_steps(stepped):
    toy, opt, theta_t, g, (m0, s0, t) = stepped
    (jac,), _ = adam_step_jacobian(opt, [toy.w], [g])
    full = torch.autograd.functional.jacobian(lambda g_: adamw_step(theta_t, g_, m0, s0, t), g)
    torch.testing.assert_close(-LR * jac, torch.diagonal(full), rtol=1e-12, atol=0)
    assert torch.count_nonzero(full - torch.diag(torch.diagonal(full))) == 0


def test_sama_is_the_one_step_unrolled_derivative_at_theta_t(stepped):
    """d/dλ L_up(θ_{t+1}(λ)) − ∂L_up/∂λ, θ_{t+1}(λ) = AdamW step from θ_t with g = ∇θ L_low(θ_t, λ), equals sama's
    term with C evaluated at θ_t; called at θ_{t+1} (where the Trainer calls it) C is off by O(‖θ_{t+1} − θ_t‖)."""
    toy, opt, theta_t, g, (m0, s0, t) = stepped
    m = toy.m.detach().clone().requires_grad_(True)
    w_t = theta_t.clone().requires_grad_(True)
    g_of_m = torch.autograd.grad(task(w_t, m, toy.x_lo, toy.y_lo) + MU * (w_t**2).sum(), w_t, create_graph=True)[0]
    w_next = adamw_step(theta_t, g_of_m, m0, s0, t)
    assert torch.allclose(w_next, toy.w.detach(), rtol=0, atol=1e-14)
    total = torch.autograd.grad(task(w_next, m, toy.x_up, toy.y_up), m)[0]
    v, direct = toy.v_and_direct()  # at θ_{t+1}
    unrolled = total - direct
    problem = toy.problem(optimizer=opt, last_gradient=[g], learning_rate=LR)
    theta_next = toy.w.detach().clone()
    with torch.no_grad():
        toy.w.copy_(theta_t)
    at_t = SAMA(darts_alpha=1e-3).implicit(v, problem)[0]
    with torch.no_grad():
        toy.w.copy_(theta_next)
    at_next = SAMA(darts_alpha=1e-3).implicit(v, problem)[0]
    assert rel(at_t, unrolled) < 1e-9
    assert 1e-3 < rel(at_next, unrolled) < 0.5, rel(at_next, unrolled)
    # learning_rate None: the param group's lr (the same here); a list: one per group
    problem.learning_rate = None
    torch.testing.assert_close(SAMA(darts_alpha=1e-3).implicit(v, problem)[0], at_next, rtol=1e-13, atol=0)
    problem.learning_rate = [LR]
    torch.testing.assert_close(SAMA(darts_alpha=1e-3).implicit(v, problem)[0], at_next, rtol=1e-13, atol=0)


def test_sama_refuses_what_it_cannot_differentiate(data, stepped):
    toy, opt, _, g, _ = stepped
    v, _ = toy.v_and_direct()
    sama = SAMA()
    cases = [(None, "None"), (torch.optim.SGD([toy.w], lr=0.1, momentum=0.9), "none yet"),
             (torch.optim.AdamW([toy.w]), "none yet"), (torch.optim.AdamW([toy.w], amsgrad=True), "amsgrad"),
             (torch.optim.Adam([toy.w], weight_decay=0.1), "coupled")]
    for optimizer, message in cases:
        if optimizer is not None and message != "none yet":
            toy.w.grad = torch.ones_like(toy.w)
            optimizer.step()
            toy.w.grad = None
        with pytest.raises(ValueError, match=message):
            sama.implicit(v, toy.problem(optimizer=optimizer, last_gradient=[g]))
    sgd = torch.optim.SGD([toy.w], lr=0.0, momentum=0.9)
    toy.w.grad = torch.ones_like(toy.w)
    sgd.step()
    with pytest.raises(ValueError, match="Adam/AdamW-like"):
        sama.implicit(v, toy.problem(optimizer=sgd, last_gradient=[g]))
    with pytest.raises(ValueError, match="last_gradient"):
        sama.implicit(v, toy.problem(optimizer=opt))


# ---- damped_solve -----------------------------------------------------------------------------------------------
def run_calls(est, toy, n):
    v, direct = toy.v_and_direct()
    return [direct + est.implicit(v, toy.problem())[0] for _ in range(n)]


def test_damped_solve_converges_to_the_closed_form_at_fixed_theta(data):
    """Damping 0, positive-definite H: call 1 (cold) returns 0 and takes the first step; calls 2, 3, ... take Craig's
    steps, exact after dim(θ) = 5 of them, so call D + 1 = 6 returns the exact hypergradient (1e-6: call 7)."""
    exact = exact_hypergradient(data)
    toy = Ridge(data)
    v, direct = toy.v_and_direct()
    est = DampedSolve(damped_solve_damping=0.0)
    errors = [rel(direct + est.implicit(v, toy.problem())[0], exact) for _ in range(D + 2)]
    assert errors[2] > 1e-3 and errors[D] < 1e-8 and errors[D + 1] < 1e-6, errors
    assert torch.equal(direct + DampedSolve().implicit(v, toy.problem())[0], direct)  # the cold start: first order


def test_damped_solve_every_call_gets_closer_to_the_current_target(data):
    """The lower batch alternates between two halves (H and v change every call): each call decreases
    ‖z − A_k⁻¹ v_k‖ for the problem of that call (the minimal-error guarantee, with fresh products)."""
    w = closed_form_w(data[4], data[0], data[1]) + 0.1
    toys = [Ridge(data, w=w, rows=slice(0, N_LO // 2)), Ridge(data, w=w, rows=slice(N_LO // 2, None))]
    targets = []
    for toy in toys:
        h, _ = dense(lambda w_, m_, t=toy: task(w_, m_, t.x_lo, t.y_lo) + MU * (w_**2).sum(), toy.w, toy.m)
        targets.append(torch.linalg.solve(h + 0.1 * torch.eye(D, dtype=F64), toy.v_and_direct()[0][0]))
    assert rel(targets[0], targets[1]) > 0.05
    est = DampedSolve(damped_solve_damping=0.1)
    for k in range(12):
        toy, target = toys[k % 2], targets[k % 2]
        before = float(target.norm()) if est._z is None else float((est._z[0] - target).norm())
        est.implicit(toy.v_and_direct()[0], toy.problem())
        assert float((est._z[0] - target).norm()) < before


class Indefinite:
    """L(θ, λ) = ½θᵀH₀θ + θᵀBλ + ¼ Σⱼ λⱼ θᵀKⱼθ (task) + ½θᵀPθ (penalty), built so that the Hessian in θ at the λ used
    is Q diag(spectrum) Qᵀ: indefinite and nearly singular. ∇θ L is linear in θ, ∇λ L quadratic: central
    differences are exact, and the reference is dense."""

    def __init__(self, spectrum, seed=3):
        g = torch.Generator().manual_seed(seed)
        n, k = len(spectrum), 3
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
        sym = [(a + a.T) / 2 for a in torch.randn(k, n, n, generator=g, dtype=F64)]
        self.b, self.k = torch.randn(n, k, generator=g, dtype=F64), torch.stack(sym)
        self.p = 0.5 * torch.eye(n, dtype=F64)
        self.theta = nn.Parameter(torch.randn(n, generator=g, dtype=F64))
        self.lam = nn.Parameter(torch.randn(k, generator=g, dtype=F64))
        self.h = q @ torch.diag(torch.tensor(spectrum, dtype=F64)) @ q.T
        self.h0 = self.h - self.p - 0.5 * torch.einsum("j,jab->ab", self.lam.detach(), self.k)
        self.v = [torch.randn(n, generator=g, dtype=F64)]

    def task(self, theta, lam):
        return (0.5 * theta @ self.h0 @ theta + theta @ self.b @ lam
                + 0.25 * torch.einsum("j,a,jab,b->", lam, theta, self.k, theta))

    def problem(self):
        return LowerProblem([self.theta], [self.lam], lambda: self.task(self.theta, self.lam),
                            penalty=lambda: 0.5 * self.theta @ self.p @ self.theta)

    def target(self, delta):
        h, c = dense(lambda t, l: self.task(t, l) + 0.5 * t @ self.p @ t, self.theta, self.lam)
        torch.testing.assert_close(h, self.h, rtol=0, atol=1e-12)
        return -c @ torch.linalg.solve(h + delta * torch.eye(len(h), dtype=F64), self.v[0])


SPECTRUM = [-3.0, -2.2, 1e-7, 0.5, 1.0, 2.0]  # with δ = 1: A = H + I has eigenvalues −2, −1.2, 1, 1.5, 2, 3


def test_damped_solve_converges_on_an_indefinite_nearly_singular_hessian():
    """H indefinite with an eigenvalue 1e-7, δ = 1 (A = H + I indefinite too): exact after dim(θ) = 6 steps, i.e. at
    call 7; the distance to the target decreases at every call. (cg stops at once there, neumann diverges.)"""
    toy = Indefinite(SPECTRUM)
    target = toy.target(1.0)
    z_star = torch.linalg.solve(toy.h + torch.eye(len(toy.h), dtype=F64), toy.v[0])
    est = DampedSolve(darts_alpha=0.1, damped_solve_damping=1.0)
    outs, dist = [], [float(z_star.norm())]
    for _ in range(8):
        outs.append(est.implicit(toy.v, toy.problem())[0])
        dist.append(float((est._z[0] - z_star).norm()))
    errors = [rel(o, target) for o in outs]
    assert errors[2] > 1e-3 and errors[6] < 1e-8 and errors[7] < 1e-8, errors
    assert all(b < a for a, b in zip(dist[:7], dist[1:7])), dist


def test_damped_solve_on_a_non_quadratic_indefinite_lower_loss():
    """A tanh network (36 directions, H with eigenvalues from −6.0 to 6.8, δ = 2: A indefinite, κ(A) ≈ 45): the
    forward differences are O(alpha) off, so Craig's finite termination is lost, but the limit is the dense target
    up to the central difference's O(alpha²): below 1e-4 after 100 calls (about 1e-6 seen)."""
    net = _Net(F64)
    shapes = [p.shape for p in net.theta]

    def unflat(x):
        return [t.reshape(s) for t, s in zip(torch.split(x, [s.numel() for s in shapes]), shapes)]

    def flat_loss(x, lam0):
        w1, b1, w2 = unflat(x)
        return ((torch.tanh(net.x @ w1.T + b1) * lam0 @ w2 - net.y) ** 2).mean()

    x0 = torch.cat([p.detach().reshape(-1) for p in net.theta])
    h, c = dense(flat_loss, x0, net.lam[0])
    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    target = -c @ torch.linalg.solve(h + 2.0 * torch.eye(len(h), dtype=F64), v)
    est = DampedSolve(darts_alpha=1e-3, damped_solve_damping=2.0)
    for _ in range(100):
        out = est.implicit(unflat(v), LowerProblem(net.theta, net.lam, net.loss))
    assert rel(out[0], target) < 1e-4, rel(out[0], target)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # λ the loss does not use


def test_damped_solve_needs_no_double_backward():
    """A lower loss built from an op without double backward: neumann fails, damped_solve works (first order)."""

    class Ident(torch.autograd.Function):  # like a fused kernel: a backward, but no double backward
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            return grad.clone()

    toy = Indefinite([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    problem = toy.problem()
    problem.loss = lambda: toy.task(Ident.apply(toy.theta), toy.lam)
    problem.penalty = lambda: 0.5 * Ident.apply(toy.theta) @ toy.p @ Ident.apply(toy.theta)
    with pytest.raises(RuntimeError):
        build_hypergradient("neumann").implicit(toy.v, problem)
    est = DampedSolve(damped_solve_damping=0.0)
    outs = [est.implicit(toy.v, problem)[0] for _ in range(8)]
    assert rel(outs[-1], toy.target(0.0)) < 1e-8


# ---- every estimator: θ and .grad untouched, state, reset, grad_fn, processes -------------------------------------
def all_estimators():
    return [build_hypergradient(name, darts_alpha=0.05, neumann_alpha=0.1, damped_solve_damping=0.5)
            for name in ESTIMATORS]


def test_theta_bit_for_bit_and_grads_untouched(stepped):
    toy, opt, _, g, _ = stepped
    with torch.no_grad():
        toy.w.add_(torch.tensor([1e-3, 1 / 3, -2 / 7, 0.1, 1e-9], dtype=F64))  # bits that a round trip would lose
    v, _ = toy.v_and_direct()
    toy.w.grad, toy.m.grad = torch.full_like(toy.w, 7.0), torch.full_like(toy.m, -3.0)
    w_before = toy.w.detach().clone()
    for est in all_estimators():
        for _ in range(3):
            est.implicit(v, toy.problem(optimizer=opt, last_gradient=[g], learning_rate=LR))
            assert torch.equal(toy.w.detach(), w_before), est.name
            assert torch.equal(toy.w.grad, torch.full_like(toy.w, 7.0)) and torch.equal(toy.m.grad,
                                                                                        torch.full_like(toy.m, -3.0))


def test_state_round_trip_and_reset():
    toy = Indefinite(SPECTRUM)
    est = DampedSolve(darts_alpha=0.1)
    cold = [est.implicit(toy.v, toy.problem())[0] for _ in range(4)]
    state = est.state_dict()
    assert all(t.device.type == "cpu" for key in ("z", "q") for t in state[key])
    clone = DampedSolve(darts_alpha=0.1)
    clone.load_state_dict(state)
    for _ in range(2):
        assert torch.equal(est.implicit(toy.v, toy.problem())[0], clone.implicit(toy.v, toy.problem())[0])
    assert clone.calls == est.calls == 6
    assert all(torch.equal(a, b) for a, b in zip(est._z + est._q, clone._z + clone._q))
    est.reset()
    again = [est.implicit(toy.v, toy.problem())[0] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(cold, again))
    assert torch.equal(cold[0], torch.zeros_like(cold[0])) and not torch.equal(cold[1], cold[0])
    bad = DampedSolve()
    bad.load_state_dict({"z": [torch.zeros(2, dtype=F64)], "q": None, "calls": 1})
    with pytest.raises(ValueError, match="does not match"):
        bad.implicit(toy.v, toy.problem())
    with pytest.raises(ValueError, match="lacks"):
        bad.load_state_dict({"z": None})
    for est in all_estimators():
        if est.name != "damped_solve":
            assert est.state_dict() == {}
            est.load_state_dict({})
            with pytest.raises(ValueError, match="no state"):
                est.load_state_dict({"z": 1})


def test_first_order_gradients_go_through_grad_fn(stepped):
    """A backward()-into-.grad grad_fn (as under reentrant checkpointing) is used for every first-order gradient."""
    toy, opt, _, g, _ = stepped
    v, _ = toy.v_and_direct()
    calls = []

    def via_backward(loss, inputs):
        saved = [x.grad for x in inputs]
        for x in inputs:
            x.grad = None
        loss.backward(inputs=list(inputs))
        out = [x.grad for x in inputs]
        for x, s in zip(inputs, saved):
            x.grad = s
        calls.append(len(inputs))
        return out

    # passes: darts and sama 2; damped_solve 2 on the cold start, then 4 (a central pair, forward along r and q)
    for est, n_calls, n_grads in [(Darts(), 1, 2), (SAMA(), 1, 2), (DampedSolve(), 3, 2 + 4 + 4)]:
        plain = [est.implicit(v, toy.problem(optimizer=opt, last_gradient=[g])) for _ in range(n_calls)]
        est.reset()
        calls.clear()
        hooked = [est.implicit(v, toy.problem(optimizer=opt, last_gradient=[g], grad_fn=via_backward))
                  for _ in range(n_calls)]
        assert len(calls) == n_grads, (est.name, calls)
        for a, b in zip(plain, hooked):
            torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-15)


def test_two_processes_hold_the_same_iterates(data):
    """Two ranks (threads) on halves of the lower batch, reduce = the mean over them: every Hessian-vector product is
    the global batch's, so each rank's z is the same (bit for bit) and the mean of their terms is one process's."""
    world, barrier, slots = 2, threading.Barrier(2), [None, None]

    def reduce_for(rank):
        def reduce(tensors):
            slots[rank] = [t.detach().clone() for t in tensors]
            barrier.wait()
            out = [(slots[0][i] + slots[1][i]) / world for i in range(len(tensors))]
            barrier.wait()
            return out
        return reduce

    w = closed_form_w(data[4], data[0], data[1]) + 0.2
    for make in (lambda: DampedSolve(damped_solve_damping=0.1), lambda: build_hypergradient("cg", cg_iterations=3),
                 lambda: build_hypergradient("neumann", neumann_alpha=0.2)):
        results = [None, None]

        def worker(rank, make=make, results=results):
            toy = Ridge(data, w=w, rows=slice(rank * N_LO // world, (rank + 1) * N_LO // world))
            v, _ = toy.v_and_direct()
            est = make()
            results[rank] = ([est.implicit(v, toy.problem(reduce=reduce_for(rank)))[0] for _ in range(4)],
                             getattr(est, "_z", None))

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        toy = Ridge(data, w=w)
        v, _ = toy.v_and_direct()
        est = make()
        single = [est.implicit(v, toy.problem())[0] for _ in range(4)]
        if results[0][1] is not None:
            assert torch.equal(results[0][1][0], results[1][1][0])
            torch.testing.assert_close(results[0][1][0], est._z[0], rtol=1e-10, atol=1e-14)
        for k in range(4):
            torch.testing.assert_close((results[0][0][k] + results[1][0][k]) / 2, single[k], rtol=1e-9, atol=1e-13)


def test_every_estimator_has_a_repr_naming_its_settings():
    for name in ESTIMATORS:
        text = repr(build_hypergradient(name, darts_alpha=0.02, damped_solve_damping=2.0))
        assert text.startswith(type(build_hypergradient(name)).__name__ + "(")
    assert repr(build_hypergradient("first_order")) == "FirstOrder()"
    assert "damped_solve_damping=2.0" in repr(build_hypergradient("damped_solve", damped_solve_damping=2.0))
