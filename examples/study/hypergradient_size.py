"""How large is the implicit part of BiDoRA's hypergradient on the real encoder, and how well do the estimates get it?

    python examples/study/hypergradient_size.py [--size 200] [--seed 0] [--at 40,125] [--out FILE]

Trains the default BiDoRA search (darts, the study's settings: all-MiniLM-L6-v2 on Rotten Tomatoes, N = 200, seed
0) through loralib.BiDoRATrainer and, after the upper step of each step in ``--at``, measures on the whole held-out
split with the model in eval mode (no dropout, so every evaluation sees the same function):

* the direct term ``∂L_up/∂m`` and the implicit term ``−∂²L_low/∂m∂θ · H⁻¹ v`` (``v = ∂L_up/∂θ``, ``H`` the Hessian
  of the lower loss in the direction parameters on the lower batch the algorithm just used), as our code computes
  them: darts (identity for ``H⁻¹``), neumann (α = 1/λ_max, 3 / 10 / 30 terms), cg (3 / 10 iterations);
* the reference: ``H⁻¹ v`` by MINRES (scipy; ``H`` is symmetric and may be indefinite), its residual reported;
* λ_max and λ_min of ``H`` (power iteration, 20 Hessian-vector products each) and the Rayleigh quotient of v: the
  Neumann series converges only for 0 < α λ < 2 on every eigenvalue λ (so never when ``H`` has a negative one),
  and cg needs ``H`` positive definite (ours stops at the first direction of non-positive curvature).

Writes a JSON file (default results/study/hypergradient_size.json) and prints a table. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, minres

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples" / "NLU"))

import run_glue  # noqa: E402
from plan import BIDORA, RT, Cell  # noqa: E402
from run_study import ENV, model_dir, prepare_data  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import loralib  # noqa: E402
from loralib.bilevel import _TRAINER_BETTY_TYPE  # noqa: E402
from loralib.io import atomic_write_text  # noqa: E402
from loralib.model import joint_magnitude_training  # noqa: E402


def _norm(xs) -> float:
    return float(torch.sqrt(sum((x.double() ** 2).sum() for x in xs)))


def _cos(xs, ys) -> float:
    dot = sum((x.double() * y.double()).sum() for x, y in zip(xs, ys))
    return float(dot / max(_norm(xs) * _norm(ys), 1e-300))


def _rel(xs, ys) -> float:
    return _norm([x.double() - y.double() for x, y in zip(xs, ys)]) / max(_norm(ys), 1e-300)


class LowerHessian:
    """Hessian-vector products of the lower loss (task loss + penalty) on ``lower.cur_batch`` in the direction
    parameters θ, and the cross term ``∂²L_low/∂m∂θ · x``; one graph, built once."""

    def __init__(self, lower, magnitudes) -> None:
        self.params, self.mags = lower.trainable_parameters(), list(magnitudes)
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
            loss = lower.training_step_exec(lower.cur_batch)
            self.grad = torch.autograd.grad(loss, self.params, create_graph=True)

    def hvp(self, vec):
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.grad(self.grad, self.params, grad_outputs=vec, retain_graph=True)

    def cross(self, vec):
        with sdpa_kernel(SDPBackend.MATH):
            out = torch.autograd.grad(self.grad, self.mags, grad_outputs=vec, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(m) if g is None else g for g, m in zip(out, self.mags)]

    def flat(self, xs) -> np.ndarray:
        return torch.cat([x.detach().double().reshape(-1) for x in xs]).numpy()

    def unflat(self, array: np.ndarray):
        out, i = [], 0
        for p in self.params:
            out.append(torch.from_numpy(array[i:i + p.numel()].copy()).to(p).reshape(p.shape))
            i += p.numel()
        return out

    def extremes(self, iterations: int = 20) -> tuple[float, float]:
        """(λ_max, λ_min) by power iteration (λ_min from H − λ_max I)."""
        def power(shift: float) -> float:
            gen = torch.Generator().manual_seed(0)
            x = [torch.randn(p.shape, generator=gen).to(p) for p in self.params]
            value = 0.0
            for _ in range(iterations):
                n = _norm(x)
                x = [xi / n for xi in x]
                hx = [h - shift * xi for h, xi in zip(self.hvp(x), x)]
                value = float(sum((a * b).sum() for a, b in zip(x, hx)))
                x = hx
            return value + shift

        top = power(0.0)
        return top, power(top)

    def solve(self, vector, iterations: int) -> tuple[list, float]:
        """H⁻¹ v by MINRES (scipy; H symmetric, possibly indefinite) and the relative residual ‖Hx − v‖ / ‖v‖."""
        n = sum(p.numel() for p in self.params)
        op = LinearOperator((n, n), matvec=lambda a: self.flat(self.hvp(self.unflat(np.asarray(a).ravel()))),
                            dtype=np.float64)
        b = self.flat(vector)
        x, _ = minres(op, b, maxiter=iterations, rtol=1e-8)
        residual = np.linalg.norm(op.matvec(x) - b) / np.linalg.norm(b)
        return self.unflat(x), float(residual)


def measure(trainer, heldout_batch: dict, reference_iterations: int = 60) -> dict:
    upper = trainer.upper_level
    lower = upper.lower
    model = trainer.model
    was_training = model.training
    model.eval()
    lower.cur_batch = trainer._prepare_inputs(trainer._lower_batch)
    saved = (upper.hypergradient, lower.config.type, lower.config.neumann_iterations, lower.config.neumann_alpha,
             lower.config.cg_iterations)
    mags, params = upper.trainable_parameters(), lower.trainable_parameters()
    try:
        with joint_magnitude_training(model):
            for p in mags:
                p.requires_grad_(True)
            hessian = LowerHessian(lower, mags)
            lam_max, lam_min = hessian.extremes()
            print(f"  λ_max {lam_max:.4g}, λ_min {lam_min:.4g}", file=sys.stderr, flush=True)
            loss = trainer._task_loss(heldout_batch)
            v = torch.autograd.grad(loss, params, allow_unused=True)
            v = [torch.zeros_like(p) if g is None else g for g, p in zip(v, params)]
            t0 = time.perf_counter()
            x, residual = hessian.solve(v, reference_iterations)
            ref = [-g for g in hessian.cross(x)]
            print(f"  reference solved (relative residual {residual:.2g})", file=sys.stderr, flush=True)
            t_ref = time.perf_counter() - t0
            hv = hessian.hvp(v)
            rayleigh_v = float(sum((a * b).sum() for a, b in zip(v, hv)) / sum((a * a).sum() for a in v))
            for p in mags:
                p.requires_grad_(False)
            del hessian
        alpha = 1.0 / lam_max if lam_max > 0 else 0.0

        def run(kind: str, **cfg):
            upper.hypergradient = kind
            lower.config.type = _TRAINER_BETTY_TYPE.get(kind, lower.config.type)
            for k, val in cfg.items():
                setattr(lower.config, k, val)
            t0 = time.perf_counter()
            _, total = upper.hypergradient_of(heldout_batch)
            return [g.detach().clone() for g in total], time.perf_counter() - t0

        direct, t_direct = run("first_order")
        estimates, seconds = {}, {"first_order": t_direct, f"minres{reference_iterations}": t_ref}
        cases = [("darts", {}), *[(f"neumann{k}", {"neumann_iterations": k, "neumann_alpha": alpha})
                                  for k in (3, 10, 30)], *[(f"cg{k}", {"cg_iterations": k}) for k in (3, 10)]]
        for name, cfg in cases:
            total, seconds[name] = run(name.rstrip("0123456789"), **cfg)
            print(f"  {name}: {seconds[name]:.1f} s", file=sys.stderr, flush=True)
            estimates[name] = [t - d for t, d in zip(total, direct)]
        estimates["first_order"] = [torch.zeros_like(d) for d in direct]
        ref_total = [d + r for d, r in zip(direct, ref)]
        out = {
            "lambda_max": lam_max, "lambda_min": lam_min, "rayleigh_v": rayleigh_v, "neumann_alpha": alpha,
            "direct_norm": _norm(direct), "v_norm": _norm(v), "reference": f"minres, {reference_iterations} "
            "iterations", "reference_relative_residual": residual, "reference_implicit_norm": _norm(ref),
            "reference_implicit_over_direct": _norm(ref) / _norm(direct), "seconds": seconds,
            "methods": {name: {"implicit_norm": _norm(est), "implicit_over_direct": _norm(est) / _norm(direct),
                               "implicit_cos_to_reference": _cos(est, ref) if _norm(est) else None,
                               "implicit_rel_error": _rel(est, ref),
                               "total_cos_to_reference": _cos([d + e for d, e in zip(direct, est)], ref_total),
                               "total_rel_error": _rel([d + e for d, e in zip(direct, est)], ref_total)}
                        for name, est in estimates.items()},
        }
    finally:
        (upper.hypergradient, lower.config.type, lower.config.neumann_iterations, lower.config.neumann_alpha,
         lower.config.cg_iterations) = saved
        for p in mags:
            p.requires_grad_(False)
        model.train(was_training)
    return out


class _Measure(TrainerCallback):
    def __init__(self, at: set[int], heldout_batch, sink: dict) -> None:
        self.at, self.batch, self.sink, self.trainer = at, heldout_batch, sink, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.at:
            t0 = time.perf_counter()
            self.sink[state.global_step] = measure(self.trainer, self.batch)
            print(f"step {state.global_step}: measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--at", default="40,125", help="search steps after which to measure (comma-separated)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "study")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "study" / "hypergradient_size.json")
    args = p.parse_args(argv)
    import os

    os.environ.update(ENV)
    torch.set_flush_denormal(True)
    try:
        at = {int(x) for x in args.at.split(",")}
    except ValueError:
        p.error(f"--at: expected comma-separated step numbers, got {args.at!r}")
    if args.size not in RT.epochs:
        p.error(f"--size must be one of {sorted(RT.epochs)}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    cell = Cell(RT, args.size, BIDORA, args.seed)
    if max(at) > cell.steps or min(at) < 1:
        p.error(f"--at: steps must be within 1..{cell.steps} (the search's length at N = {args.size})")
    data = prepare_data(cell, args.work)
    out_dir = args.work / "hypergradient_size"
    flags = ["--config", str(ROOT / RT.config), "--model_name_or_path", str(model_dir(cell, args.work)),
             "--train_file", str(data / "train.csv"), "--test_file", str(data / "test.csv"),
             "--output_dir", str(out_dir), "--overwrite_output_dir", "--use_cpu", "true", *cell.flags(),
             "--retrain_max_steps", "0", "--eval_strategy", "no", "--save_strategy", "no"]
    model_args, data_args, adapter_args, targs = run_glue.parse_args(flags)
    targs.max_steps = max(at)
    plan = run_glue.prepare(model_args, data_args, adapter_args, targs)
    collate = run_glue.GlueCollator.from_tokenizer(plan.tokenizer, max_length=data_args.max_length)
    trainer = loralib.BiDoRATrainer(model=plan.model, args=targs, train_dataset=plan.data["train"],
                                    data_collator=collate)
    upper = trainer._model_columns(trainer.upper_dataset)
    heldout = trainer._prepare_inputs(collate([upper[i] for i in range(len(upper))]))
    results: dict[int, dict] = {}
    callback = _Measure(at, heldout, results)
    callback.trainer = trainer
    trainer.add_callback(callback)
    trainer.train()
    record = {"setting": f"rt-n{args.size} seed {args.seed}, default BiDoRA search (darts), eval mode, whole "
                         f"held-out split ({len(upper)} examples) for the upper loss, lower batch of "
                         f"{targs.per_device_train_batch_size}",
              "direction_parameters": sum(p.numel() for p in trainer.upper_level.lower.trainable_parameters()),
              "magnitude_parameters": sum(p.numel() for p in trainer.upper_level.trainable_parameters()),
              "at_step": {str(k): v for k, v in sorted(results.items())}}
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    for step, r in sorted(results.items()):
        print(f"\nstep {step}: λ_max {r['lambda_max']:.4g}, λ_min {r['lambda_min']:.4g}, vᵀHv/vᵀv "
              f"{r['rayleigh_v']:.4g}, ‖direct‖ {r['direct_norm']:.3g}; reference ({r['reference']}, residual "
              f"{r['reference_relative_residual']:.2g}): ‖implicit‖/‖direct‖ {r['reference_implicit_over_direct']:.4g}")
        print(f"{'method':12s} {'‖implicit‖/‖direct‖':>20s} {'implicit cos':>13s} {'implicit err':>13s} "
              f"{'total cos':>10s} {'total err':>10s} {'seconds':>8s}")
        for name, m in r["methods"].items():
            cos = "–" if m["implicit_cos_to_reference"] is None else f"{m['implicit_cos_to_reference']:.4f}"
            print(f"{name:12s} {m['implicit_over_direct']:20.4f} {cos:>13s} {m['implicit_rel_error']:13.4f} "
                  f"{m['total_cos_to_reference']:10.4f} {m['total_rel_error']:10.4f} {r['seconds'][name]:8.2f}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
