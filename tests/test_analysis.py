"""Weight-decomposition analysis on synthetic runs whose magnitude and direction changes are known in closed form."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from utils.weight_decomposition import (
    analyse_run,
    fit_slope,
    format_table,
    layer_label,
    magnitude_direction_change,
    plot_decomposition,
)

REPO = Path(__file__).resolve().parent.parent
OUT, IN, R, SCALING = 4, 10, 4, 2.0
LAYERS = [0, 1, 2]
STEPS = [10, 20, 30]
# Points on the line dM = -5 dD + 0.06 (dM > 0 for every dD built here): the fitted slope must be exactly -5.
TRUE_K, TRUE_B = -5.0, 0.06


def module(layer: int, kind: str = "query") -> str:
    return f"roberta.encoder.layer.{layer}.attention.self.{kind}"


def orthogonal(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((IN, IN)))
    return q


def base_rows(layer: int) -> tuple[np.ndarray, np.ndarray]:
    """W0 with row i = a_i e_{2i}, then rotated by an orthogonal Q (cosines and row norms are unchanged by Q)."""
    a = np.array([1.0, 2.0, 0.5, 3.0]) * (1 + 0.1 * layer)
    w = np.zeros((OUT, IN))
    for i in range(OUT):
        w[i, 2 * i] = a[i]
    return a, w @ orthogonal(100 + layer)


def target_rows(layer: int, theta: float, delta: np.ndarray) -> np.ndarray:
    """Rows of norm a_i (1 + delta_i), each at angle theta from W0's row i."""
    a, _ = base_rows(layer)
    w = np.zeros((OUT, IN))
    for i in range(OUT):
        w[i, 2 * i] = math.cos(theta)
        w[i, 2 * i + 1] = math.sin(theta)
    return (a * (1 + delta))[:, None] * w @ orthogonal(100 + layer)


def point(layer: int, step: int) -> tuple[float, float]:
    """The (dD, dM) we build into (layer, step)."""
    d_d = 1e-3 * (1 + layer) * step / 10 + 2e-4 * step / 10
    return d_d, TRUE_K * d_d + TRUE_B


def changes(layer: int, step: int) -> tuple[float, np.ndarray]:
    """theta with 1 - cos(theta) = dD, and delta_i = ±dM / mean(a) so that mean_i a_i |delta_i| = dM."""
    d_d, d_m = point(layer, step)
    a, _ = base_rows(layer)
    signs = np.array([1.0, -1.0, 1.0, -1.0])
    return math.acos(1 - d_d), signs * d_m / a.mean()


def t(x: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(x), dtype=dtype)


def write_run(root: Path, method: str, kinds=("query", "value"), dtype=torch.float64, steps=STEPS,
              include_step0=True, points=changes) -> Path:
    """A run dir laid out as in docs/CONTRACTS.md, with the changes of `points` built in."""
    snap = root / "snapshots"
    snap.mkdir(parents=True)
    base = {}
    for layer in LAYERS:
        for kind in kinds:
            base[f"{module(layer, kind)}.weight"] = t(base_rows(layer)[1], dtype)
    save_file(base, str(snap / "base_weights.safetensors"))
    all_steps = ([0] if include_step0 else []) + list(steps)
    for step in all_steps:
        d = snap / f"step_{step}"
        d.mkdir()
        tensors = {}
        for layer in LAYERS:
            a, w0 = base_rows(layer)
            theta, delta = points(layer, step) if step else (0.0, np.zeros(OUT))
            w_t = target_rows(layer, theta, delta)
            for kind in kinds:
                name = module(layer, kind)
                if method == "ft":
                    tensors[f"{name}.weight"] = t(w_t, dtype)
                    continue
                # DoRA's V may have any norm: scale it so that the saved magnitude, not ||V||, must be used.
                v = w_t * (1.3 if method != "lora" else 1.0)
                g = np.eye(R) + 0.1 * np.arange(R * R).reshape(R, R) / (R * R)  # invertible mixing
                b = g / SCALING
                a_mat = np.linalg.solve(g, v - w0)  # s * B @ A == V - W0
                tensors[f"{name}.lora_A"] = t(a_mat, dtype)
                tensors[f"{name}.lora_B"] = t(b, dtype)
                if method != "lora":
                    tensors[f"{name}.magnitude"] = t(a * (1 + delta), dtype)
        if method == "ft":
            save_file(tensors, str(d / "target_weights.safetensors"))
        else:
            save_file(tensors, str(d / "adapter_model.safetensors"))
            (d / "adapter_config.json").write_text(json.dumps(adapter_config(method, kinds)))
    return root


def adapter_config(method: str, kinds=("query", "value")) -> dict:
    """loralib's first adapter format (version 1), which loralib.read_adapter_config still reads."""
    return {"format": "loralib-adapter", "version": 1, "config": {"method": method}, "scaling": SCALING,
            "base_model_class": "RobertaModel",
            "adapted_modules": {module(layer, kind): [OUT, IN] for layer in LAYERS for kind in kinds}}


@pytest.mark.parametrize("method", ["dora", "bidora", "lora", "ft"])
def test_closed_form_dm_dd_and_slope(tmp_path, method):
    run = write_run(tmp_path / method, method)
    res = analyse_run(run)
    assert res.method == method
    assert res.modules == [module(layer) for layer in LAYERS]  # default: query only, value left out
    assert res.steps == STEPS  # step 0 (the initialisation) is not an intermediate checkpoint
    assert len(res.rows) == len(LAYERS) * len(STEPS)
    for row in res.rows:
        d_d, d_m = point(row["layer"], row["step"])
        assert row["dD"] == pytest.approx(d_d, rel=1e-9, abs=1e-13)
        assert row["dM"] == pytest.approx(d_m, rel=1e-9, abs=1e-13)
    assert res.slope == pytest.approx(TRUE_K, rel=1e-7)
    assert res.intercept == pytest.approx(TRUE_B, rel=1e-7)
    text = format_table(res)
    assert "slope k" in text and f"{res.slope:.4g}" in text


def test_step_zero_and_step_selection(tmp_path):
    run = write_run(tmp_path / "r", "dora")
    res = analyse_run(run, steps=[0, 20])
    zero = [r for r in res.rows if r["step"] == 0]
    assert len(zero) == len(LAYERS)
    for r in zero:  # B = 0 and m = ||W0||_row at initialisation
        assert r["dM"] == pytest.approx(0.0, abs=1e-12) and r["dD"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="not saved"):
        analyse_run(run, steps=[15])


def test_slope_matches_least_squares_formula(tmp_path):
    """Points off any line: the slope must equal cov(dD, dM) / var(dD), written out."""

    def scattered(layer, step):
        d_d = 1e-3 * (1 + layer) + 4e-4 * step / 10
        d_m = 0.01 + 0.003 * ((layer * 7 + step) % 5)  # not a function of d_d
        a, _ = base_rows(layer)
        return math.acos(1 - d_d), np.array([1.0, -1.0, 1.0, -1.0]) * d_m / a.mean()

    run = write_run(tmp_path / "s", "bidora", points=scattered)
    res = analyse_run(run)
    xs = [r["dD"] for r in res.rows]
    ys = [r["dM"] for r in res.rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    assert res.slope == pytest.approx(k, rel=1e-9)
    assert res.intercept == pytest.approx(my - k * mx, rel=1e-9)


def test_metric_against_explicit_loop():
    rng = np.random.default_rng(0)
    w0, v = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    m = rng.uniform(0.5, 2.0, 5)
    d_m = d_d = 0.0
    for i in range(5):
        n0 = math.sqrt(sum(x * x for x in w0[i]))
        nv = math.sqrt(sum(x * x for x in v[i]))
        d_m += abs(m[i] - n0) / 5
        d_d += (1 - sum(x * y for x, y in zip(w0[i], v[i])) / (n0 * nv)) / 5
    got = magnitude_direction_change(w0, v, m)
    assert got == pytest.approx((d_m, d_d), rel=1e-12)


def test_float32_files_are_read(tmp_path):
    res = analyse_run(write_run(tmp_path / "f32", "dora", dtype=torch.float32))
    for row in res.rows:
        d_d, d_m = point(row["layer"], row["step"])
        assert row["dM"] == pytest.approx(d_m, rel=1e-5)
        assert row["dD"] == pytest.approx(d_d, rel=2e-3)  # 1 - cos of float32 vectors


def test_module_filter(tmp_path):
    run = write_run(tmp_path / "r", "dora")
    assert analyse_run(run, modules="value").modules == [module(layer, "value") for layer in LAYERS]
    with pytest.raises(ValueError, match="matches none"):
        analyse_run(run, modules="k_proj")
    # No query module at all (e.g. GPT-2's fused c_attn): the default falls back to every module, and says so.
    other = analyse_run(write_run(tmp_path / "v", "dora", kinds=("value",)))
    assert other.modules == [module(layer, "value") for layer in LAYERS]
    assert any("using all" in n for n in other.notes)


def test_bad_runs_fail_clearly(tmp_path):
    run = write_run(tmp_path / "r", "dora")
    step = run / "snapshots" / "step_20"
    (step / "target_weights.safetensors").write_bytes((step / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="exactly one"):
        analyse_run(run)

    run2 = write_run(tmp_path / "r2", "dora")
    cfg = run2 / "snapshots" / "step_10" / "adapter_config.json"
    cfg.write_text(json.dumps(adapter_config("lora")))
    with pytest.raises(ValueError, match="magnitude vector in a LoRA"):
        analyse_run(run2)

    run3 = write_run(tmp_path / "r3", "dora")
    save_file({"x.weight": torch.zeros(2, 2)}, str(run3 / "snapshots" / "base_weights.safetensors"))
    with pytest.raises(ValueError, match="base_weights"):
        analyse_run(run3)

    with pytest.raises(ValueError, match="no snapshots"):
        analyse_run(tmp_path / "nothing")


def test_fit_slope_degenerate():
    with pytest.raises(ValueError, match="undefined"):
        fit_slope([0.1], [0.2])
    with pytest.raises(ValueError, match="undefined"):
        fit_slope([0.1, 0.1], [0.2, 0.3])


def test_layer_label():
    assert layer_label("roberta.encoder.layer.11.attention.self.query") == 11
    assert layer_label("transformer.h.3.attn.c_attn") == 3
    assert layer_label("classifier.dense") == "classifier.dense"


def test_plot_is_written(tmp_path):
    results = [analyse_run(write_run(tmp_path / m, m)) for m in ("dora", "bidora")]
    out = plot_decomposition(results, tmp_path / "assets" / "wd.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_from_another_directory(tmp_path):
    run = write_run(tmp_path / "run", "bidora")
    script = REPO / "utils" / "weight_decomposition.py"
    help_ = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert help_.returncode == 0 and "--figure" in help_.stdout
    proc = subprocess.run(
        [sys.executable, str(script), str(run), "--steps", "10,30", "--figure", "fig.png", "--json", "t.json"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "paper: -8.042" in proc.stdout
    rows = json.loads((tmp_path / "t.json").read_text())[0]["rows"]
    assert sorted({r["step"] for r in rows}) == [10, 30]
    assert (tmp_path / "fig.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "missing")], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no snapshots" in bad.stderr


def test_adapters_saved_by_loralib_are_read_through_its_loader(tmp_path):
    """A run whose snapshots loralib wrote (its current format): ΔM and ΔD equal the definitions on the live layers."""
    from transformers import BertConfig, BertModel

    import loralib

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16))
    loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", r=2, lora_alpha=4, target_modules=["query"]))
    snap = tmp_path / "run" / "snapshots"
    loralib.save_target_weights(model, snap / "base_weights.safetensors")
    with torch.no_grad():
        for _, layer in loralib.adapter_layers(model):
            layer.lora_B.normal_()
            layer.magnitude.mul_(1.1)
    loralib.save_adapters(model, snap / "step_5")
    (row,) = analyse_run(tmp_path / "run").rows
    (_, layer), = loralib.adapter_layers(model)
    w0 = layer.base_weight().detach().double()
    v = w0 + layer.scaling * (layer.lora_B.detach().double() @ layer.lora_A.detach().double())
    expected = magnitude_direction_change(w0.numpy(), v.numpy(), layer.magnitude.detach().double().numpy())
    assert (row["dM"], row["dD"]) == pytest.approx(expected, rel=1e-6)
