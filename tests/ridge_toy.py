"""The ridge toy shared by the hypergradient tests: a bi-level problem with a closed-form lower solution (float64).

    lower:  w*(m) = argmin_w  ‖X_lo (m ⊙ w) − y_lo‖² / n_lo + μ ‖w‖²      (closed form: a linear solve)
    upper:  F(m)  = ‖X_up (m ⊙ w*(m)) − y_up‖² / n_up

Autograd through :func:`closed_form_w` gives the exact hypergradient dF/dm without any implicit-function formula:
an independent reference for every estimator.
"""

from __future__ import annotations

import torch

D, N_LO, N_UP, MU = 5, 40, 30, 0.3


def task(w, m, x, y):
    """The squared error of the model ``x @ (m ⊙ w)`` (the upper objective; the lower one adds ``μ‖w‖²``)."""
    return ((x @ (m * w) - y) ** 2).mean()


def closed_form_w(m, x, y):
    """argmin_w of task + μ‖w‖²: (D XᵀX D / n + μI) w = D Xᵀ y / n with D = diag(m)."""
    n = x.shape[0]
    a = (m[:, None] * (x.T @ x) * m[None, :]) / n + MU * torch.eye(D, dtype=x.dtype)
    return torch.linalg.solve(a, m * (x.T @ y) / n)


def make_data(seed: int = 0):
    """``(x_lo, y_lo, x_up, y_up, m)`` in float64: a noisy linear target and magnitudes near 1."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    x_lo = torch.randn(N_LO, D, generator=g, dtype=f64)
    x_up = torch.randn(N_UP, D, generator=g, dtype=f64)
    w_true = torch.randn(D, generator=g, dtype=f64)
    y_lo = x_lo @ w_true + 0.1 * torch.randn(N_LO, generator=g, dtype=f64)
    y_up = x_up @ w_true + 0.1 * torch.randn(N_UP, generator=g, dtype=f64)
    m = 1.0 + 0.3 * torch.randn(D, generator=g, dtype=f64)
    return x_lo, y_lo, x_up, y_up, m


def exact_hypergradient(data) -> torch.Tensor:
    """dF/dm by autograd through :func:`closed_form_w`: the reference for every estimator."""
    x_lo, y_lo, x_up, y_up, m = data
    m = m.clone().requires_grad_(True)
    return torch.autograd.grad(task(closed_form_w(m, x_lo, y_lo), m, x_up, y_up), m)[0]
