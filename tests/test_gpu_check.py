"""The GPU check's test subset (``pytest -m cuda``), device-parametrised: each test runs on the CPU here and on CUDA
wherever ``torch.cuda.is_available()`` (``benchmarks/gpu_check.sh`` runs it there).

* bf16 autocast forward + backward of DoRA / BiDoRA layers against the float64 formula (fp32 and bf16 bases);
* fused AdamW (``torch.optim.AdamW(fused=True)``) stepping fp32 adapters on a bf16 base, against the for-loop AdamW;
* a second-order hypergradient (``neumann``) through SDPA attention under double backward, on the math kernel, against
  the same estimator in float64 on the CPU; and BiDoRATrainer steps on the device (darts and neumann);
* ``merge_and_unload`` of a bf16 model against its unmerged output.

Plus ``test_gpu_check_cpu_tiny``: ``gpu_check.sh --device cpu --tiny`` end to end, and its JSON.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import loralib
from loralib import BiDoRATrainer, BiDoRATrainingArguments
from loralib.hypergradients import LowerProblem, build_hypergradient
from tests import helpers
from tests.helpers import REPO, load_example, reference_weight, rel_err

IN, OUT, R = 64, 48, 4


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A 2-layer Llama with SmolLM2's head layout (3 query heads per kv head), sdpa attention."""
    settings = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
                    max_position_embeddings=64, attn_implementation="sdpa")
    return helpers.tiny_llama(seed, dtype, **{**settings, **overrides})


def lm_batch(device, batch: int = 3, length: int = 10, vocab: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding, so the attention mask reaches the kernels
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def adapt(model, method: str, targets=("q_proj", "v_proj"), perturb: bool = True):
    loralib.apply_adapters(model, loralib.AdapterConfig(method=method, r=R, lora_alpha=2 * R,
                                                        target_modules=list(targets)))
    if perturb:  # B = 0 and m = ‖W0‖ at init would make every adapter path trivial
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in loralib.adapter_layers(model):
                layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=gen))
                if layer.decomposed:
                    layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=gen))
    return model


# ------------------------------------------------------------------------------------------------------------------
# bf16 autocast forward / backward of a DoRA / BiDoRA layer against float64
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
@pytest.mark.parametrize("method", ["dora", "bidora"])
def test_bf16_autocast_forward_backward_matches_float64(device, method, base_dtype):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).to(device=device, dtype=base_dtype).requires_grad_(False)
    cls = loralib.DoRALinear if method == "dora" else loralib.BiDoRALinear
    layer = cls.from_base(base, r=R, lora_alpha=2 * R)
    layer.joint_magnitude_training = True  # differentiate every adapter parameter here
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.lora_B.copy_(0.1 * torch.randn(OUT, R, generator=gen))
        layer.magnitude.mul_(torch.linspace(0.5, 1.5, OUT, device=device))
    x = torch.randn(16, IN, generator=gen).to(device)
    probe = torch.randn(16, OUT, generator=gen, dtype=torch.float64)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.magnitude.dtype == torch.float32

    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    (out.double() * probe.to(device)).sum().backward()

    params = {n: getattr(layer, n).detach().double().cpu().requires_grad_(True)
              for n in ("lora_A", "lora_B", "magnitude")}
    w0 = layer.weight.detach().double().cpu()
    w = reference_weight(w0, params["lora_A"], params["lora_B"], layer.scaling, params["magnitude"])
    expected = x.double().cpu() @ w.T + layer.bias.detach().double().cpu()
    (expected * probe).sum().backward()

    # bf16 rounds to 8 significant bits (2^-9 relative); a handful of roundings along the path
    assert rel_err(out, expected) < 2e-2
    for name, p in params.items():
        got = getattr(layer, name).grad
        assert got is not None and got.dtype == torch.float32 and torch.isfinite(got).all(), name
        assert rel_err(got, p.grad) < 3e-2, name
    assert layer.weight.grad is None


# ------------------------------------------------------------------------------------------------------------------
# fused AdamW on the adapters
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fused_adamw_steps_adapters_like_the_for_loop_adamw(device, method):
    """bf16 base, fp32 adapters: ``AdamW(fused=True)`` takes the steps the for-loop AdamW takes."""
    models = [adapt(tiny_llama(dtype=torch.bfloat16), method).to(device) for _ in range(2)]
    batch = lm_batch(device)
    frozen = {n: p.detach().clone() for n, p in models[0].named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in models[0].named_parameters() if p.requires_grad}
    optimizers = []
    for model, fused in zip(models, (True, False)):
        params = [p for p in model.parameters() if p.requires_grad]
        assert params and {p.dtype for p in params} == {torch.float32}
        try:
            optimizers.append(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=fused,
                                                foreach=None if fused else False))
        except RuntimeError as error:  # older torch: fused AdamW only on CUDA
            pytest.skip(f"fused AdamW unavailable on {device.type}: {error}")
    for _ in range(3):
        for model, opt in zip(models, optimizers):
            opt.zero_grad(set_to_none=True)
            # the math attention kernel: deterministic backward, so both optimisers see the same gradients
            with torch.autocast(device.type, dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
                loss = model(**batch).loss
            assert torch.isfinite(loss)
            loss.backward()
            opt.step()
    fused_params, loop_params = (dict(m.named_parameters()) for m in models)
    for name, p in start.items():
        moved = (fused_params[name] - p).abs().max().item()
        assert moved > 1e-3, name  # 3 steps of lr 1e-2
        torch.testing.assert_close(fused_params[name], loop_params[name], rtol=1e-3, atol=1e-4)
    assert all(torch.equal(fused_params[n], p) for n, p in frozen.items())


# ------------------------------------------------------------------------------------------------------------------
# a second-order hypergradient through SDPA attention (double backward on the math kernel)
# ------------------------------------------------------------------------------------------------------------------
def neumann_implicit(model, device, dtype):
    model = model.to(device=device, dtype=dtype).train()
    lower, upper = lm_batch(device, seed=0), lm_batch(device, seed=1)
    theta, mags = loralib.direction_parameters(model), loralib.magnitude_parameters(model)
    with loralib.magnitudes_trainable(model):
        v = torch.autograd.grad(model(**upper).loss, theta, allow_unused=True)
        v = [torch.zeros_like(p) if g is None else g for g, p in zip(v, theta)]
        problem = LowerProblem(params=theta, upper_params=mags, loss=lambda: model(**lower).loss)
        estimator = build_hypergradient("neumann", neumann_iterations=3, neumann_alpha=0.5)
        assert estimator.second_order
        with sdpa_kernel(SDPBackend.MATH):
            return estimator.implicit(v, problem)


@pytest.mark.cuda
def test_neumann_hypergradient_through_sdpa_double_backward(device):
    model = adapt(tiny_llama(), "bidora")
    assert model.config._attn_implementation == "sdpa"
    reference = neumann_implicit(copy.deepcopy(model), torch.device("cpu"), torch.float64)
    got = neumann_implicit(model, device, torch.float32)
    assert len(got) == len(reference) == 2 * model.config.num_hidden_layers  # q and v of each layer
    assert all(torch.isfinite(g).all() for g in got)
    total = rel_err(torch.cat([g.reshape(-1) for g in got]), torch.cat([r.reshape(-1) for r in reference]))
    assert 0 < torch.cat([r.reshape(-1) for r in reference]).norm() and total < 1e-3


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, length: int = 10, vocab: int = 128) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


@pytest.mark.cuda
@pytest.mark.parametrize("hypergradient", ["darts", "neumann"])
def test_bidora_trainer_steps_on_the_device(device, hypergradient, tmp_path):
    """Both levels through BiDoRATrainer on ``device`` (bf16 autocast on CUDA): directions and magnitudes move."""
    model = adapt(tiny_llama(), "bidora", perturb=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = BiDoRATrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2,
        save_strategy="no", logging_strategy="no", report_to="none", use_cpu=device.type == "cpu",
        bf16=device.type == "cuda", disable_tqdm=True, seed=0, upper_fraction=0.25, upper_learning_rate=1e-2,
        hypergradient=hypergradient, unroll_steps=1,
    )
    trainer = BiDoRATrainer(model=model, args=args, train_dataset=_Tokens())
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert next(model.parameters()).device.type == device.type
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}
    assert any("magnitude" in n for n in moved) and any("lora_B" in n for n in moved)
    assert all(".lora_" in n or "magnitude" in n for n in moved)


# ------------------------------------------------------------------------------------------------------------------
# merge in bf16
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_bf16_merge_and_unload_matches_the_unmerged_output(device, method):
    model = adapt(tiny_llama(dtype=torch.bfloat16), method, targets=("q_proj", "v_proj", "up_proj"))
    model = model.to(device).eval()
    batch = lm_batch(device)
    reference = tiny_llama(dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        untouched = reference(**batch).logits
        plain = loralib.merge_and_unload(model)
        merged = plain(**batch).logits
    assert not any(isinstance(m, loralib.AdapterLayer) for m in plain.modules())
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert merged.dtype == unmerged.dtype == torch.bfloat16
    assert torch.isfinite(merged.float()).all()
    # the merge rounds each adapted weight to bf16 once; the adapter itself changed the output far more than that
    assert rel_err(merged, unmerged) < 2e-2 < rel_err(unmerged, untouched)


# ------------------------------------------------------------------------------------------------------------------
# the script itself, CPU and tiny (what CI runs)
# ------------------------------------------------------------------------------------------------------------------
def leaves(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, tree


def test_gpu_check_cpu_tiny(tmp_path):
    required_number_keys = load_example("gpu_check", "benchmarks/gpu_check.py").required_number_keys
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["ok"] is True and result["errors"] == {}
    assert result["args"] == {"device": "cpu", "tiny": True}
    for key in ("python", "torch", "transformers", "peft", "betty", "device_name"):
        assert isinstance(result["environment"][key], str), key
    found = dict(leaves(result))
    missing = [k for k in required_number_keys(result) if k not in found]
    assert not missing, missing
    for key in required_number_keys(result):
        value = found[key]
        assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value), (key, value)
    # every null has its reason; with peft installed there is none
    nulls = [k for k, v in found.items() if v is None]
    assert sorted(nulls) == sorted(result["nulls"]) and all(result["nulls"].values())
    if importlib.util.find_spec("peft") is not None:
        assert nulls == []
    assert result["tests"]["failed"] == result["tests"]["errors"] == 0 and result["tests"]["passed"] > 0


def test_gpu_check_without_peft_records_null_with_the_reason(tmp_path, monkeypatch, capsys):
    """No peft: the PEFT half of the layer comparison is skipped with a sentence, null in the JSON, reason in nulls."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    out = tmp_path / "no_peft.json"
    status = gpu_check.main(["--device", "cpu", "--tiny", "--skip", "llama", "--tests-skipped", "not run here",
                             "--out", str(out)])
    assert "peft is not installed" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert status == 0 and result["ok"] is True
    assert result["environment"]["peft"] is None and "peft" in result["nulls"]["environment.peft"]
    row = result["layers"]["shapes"]["mlp_up"]["input_grad"]
    assert row["ms"]["peft_dora"] is None and row["ratio_peft_dora_vs_dora"] is None
    assert math.isfinite(row["ms"]["dora"]) and math.isfinite(row["ratio_dora_vs_lora"])
    assert result["nulls"]["layers.shapes.mlp_up.input_grad.ratio_peft_dora_vs_dora"] == "peft is not installed"
    assert result["tests"] is None and result["nulls"]["tests"] == "not run here"
    assert result["llama"] is None and "skipped" in result["nulls"]["llama"]
    nulls = [k for k, v in leaves(result) if v is None]
    assert all(any(k == n or k.startswith(n + ".") for n in result["nulls"]) for k in nulls)
    found = dict(leaves(result))
    for k in gpu_check.required_number_keys(result):
        assert math.isfinite(found[k]), k
