"""The GPU check's benchmarks and its one JSON (``benchmarks/gpu_check.sh`` runs the test subset, then this).

    python benchmarks/gpu_check.py --device cuda [--out runs/gpu_check.json]
    python benchmarks/gpu_check.py --device cpu --tiny                      # tiny shapes: the CI smoke run

Measures, every model built from a config (no downloads):

* layers: one adapted linear layer, forward + backward, bf16 base and input (fp32 adapters), r = 16: our LoRA, our
  DoRA, PEFT's LoRA and PEFT's DoRA, at 4096 x 4096 and at a 7B MLP up-projection 4096 -> 11008, with and without an
  input gradient: median ms (interleaved repeats), peak MiB, and the ratios;
* llama: a SmolLM2-135M-shaped Llama (``LlamaConfig``: 30 layers, hidden 576, intermediate 1536, 9 heads, 3 kv heads,
  vocab 49152, tied embeddings), LoRA r = 8 on q, v: a DoRA step, a BiDoRA (darts) iteration and a BiDoRA (neumann,
  second order: SDPA's math kernel) iteration through ``loralib.BiDoRATrainer`` (bf16 autocast and fused AdamW on
  CUDA): median ms per step, the peak memory of one step and of the run (``torch.cuda.max_memory_allocated``).

``--tiny``: 2 Llama layers at hidden 96, vocab 1024, 64 x 64 and 64 x 176 layers, few steps (seconds on a CPU).

The JSON: ``environment`` (versions, device name), ``tests`` (the pytest subset's counts, from its JUnit XML),
``layers``, ``llama``, ``nulls`` (every null value's dotted path -> why: e.g. peft not installed), ``errors`` (a
section that raised -> the exception; the other sections still run), ``ok``. Exit status 1 when ``ok`` is false.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import bench_layers  # noqa: E402
from common import sync  # noqa: E402

MIB = 2**20
LAYER_KINDS = ("lora", "dora", "peft-lora", "peft-dora")
LAYER_SHAPES = {"square": (4096, 4096), "mlp_up": (4096, 11008)}  # in_features, out_features
TINY_LAYER_SHAPES = {"square": (64, 64), "mlp_up": (64, 176)}
LLAMA_RUNS = {
    "dora": dict(method="dora"),
    "bidora_darts": dict(method="bidora", hypergradient="darts"),
    "bidora_neumann": dict(method="bidora", hypergradient="neumann"),
}
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
    hidden_act="silu",
)
TINY_LLAMA = dict(SMOLLM2_135M, vocab_size=1024, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2)


def key(name: str) -> str:
    return name.replace("-", "_")


def required_number_keys(result: dict) -> list[str]:
    """Dotted paths of every number the JSON must hold (finite), less those listed in ``nulls`` (with a reason)."""
    keys = ["total_seconds"]
    keys += [f"tests.{k}" for k in ("passed", "failed", "skipped", "errors", "exit_code", "seconds")]
    keys += ["layers.tokens", "layers.repeats", "layers.r"]
    for shape in LAYER_SHAPES:
        keys += [f"layers.shapes.{shape}.in_features", f"layers.shapes.{shape}.out_features"]
        for grad in ("no_input_grad", "input_grad"):
            base = f"layers.shapes.{shape}.{grad}"
            for kind in map(key, LAYER_KINDS):
                keys += [f"{base}.ms.{kind}", f"{base}.peak_mib.{kind}"]
            keys += [f"{base}.ratio_dora_vs_lora", f"{base}.ratio_peft_dora_vs_dora", f"{base}.ratio_peft_lora_vs_lora"]
    keys += ["llama.parameters", "llama.batch_size", "llama.seq_len", "llama.warmup_steps", "llama.timed_steps"]
    for run in LLAMA_RUNS:
        keys += [f"llama.runs.{run}.{k}" for k in ("ms_per_step", "peak_step_mib", "max_memory_allocated_mib",
                                                   "train_loss", "trainable_parameters", "seconds")]
    keys += ["llama.ratio_bidora_darts_vs_dora", "llama.ratio_bidora_neumann_vs_dora",
             "llama.ratio_peak_step_bidora_darts_vs_dora", "llama.ratio_peak_step_bidora_neumann_vs_dora"]
    nulls = result.get("nulls", {})
    return [k for k in keys if not any(k == n or k.startswith(n + ".") for n in nulls)]


# --------------------------------------------------------------------------------------------------------------------
# environment and tests
# --------------------------------------------------------------------------------------------------------------------
def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peft_version() -> str | None:
    """peft's version when it imports, else None."""
    try:
        import peft
    except ImportError:
        return None
    return peft.__version__


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, nulls: dict) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "transformers": transformers.__version__,
        "peft": peft_version(),
        "accelerate": version("accelerate") or "not installed",
        "betty": version("betty-ml") or "not installed",
        "loralib": version("loralib-bidora") or "source tree",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }
    if device.type == "cuda":
        env["device_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    if env["peft"] is None:
        nulls["environment.peft"] = "peft is not installed (the PEFT layer comparison is skipped)"
    return env


def run_tests_in_process(args, workdir: Path) -> None:
    """``--pytest-args``: the test subset in this process (saves a second start of torch + transformers: the CPU tiny
    run). gpu_check.sh runs it in its own process on CUDA, where a device-side error would poison this process's
    context for the benchmarks."""
    import shlex

    import pytest

    junit = workdir / "junit.xml"
    selection = shlex.split(args.pytest_args)
    print(f"== tests (in process): pytest {args.pytest_args}", flush=True)
    started = time.perf_counter()
    rc = pytest.main([*selection, "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={junit}"])
    args.junit, args.tests_rc, args.tests_seconds = junit, int(rc), time.perf_counter() - started
    args.tests_selection = args.pytest_args


def tests_section(args, nulls: dict) -> dict | None:
    if args.tests_skipped:
        nulls["tests"] = args.tests_skipped
        return None
    if args.junit is None or not args.junit.exists():
        nulls["tests"] = "no JUnit XML from the pytest subset (gpu_check.sh passes one)"
        return None
    root = ET.parse(args.junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {
        "selection": args.tests_selection,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failed_tests": failed,
        "exit_code": args.tests_rc,
        "seconds": args.tests_seconds,
    }


# --------------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------------
def layers_section(args, device: torch.device, nulls: dict) -> dict:
    shapes = TINY_LAYER_SHAPES if args.tiny else LAYER_SHAPES
    tokens = 16 if args.tiny else args.tokens
    repeats = 3 if args.tiny else args.repeats
    have_peft = bench_layers.peft_available()
    kinds = [k for k in LAYER_KINDS if have_peft or not k.startswith("peft")]
    if not have_peft:
        print("peft is not installed: the PEFT LoRA / DoRA layer comparison is skipped (null in the JSON).")
    out = {"dtype": "bfloat16", "tokens": tokens, "r": 16, "repeats": repeats, "shapes": {}}
    for shape_name, (fan_in, fan_out) in shapes.items():
        entry = out["shapes"][shape_name] = {"in_features": fan_in, "out_features": fan_out}
        for input_grad in (False, True):
            grad_name = "input_grad" if input_grad else "no_input_grad"
            settings = argparse.Namespace(tokens=tokens, input_grad=input_grad, width=fan_in)
            numbers = bench_layers.compare_layers(settings, device, (fan_in, fan_out), torch.bfloat16, kinds, repeats)
            ms = {key(k): numbers["seconds"][k] * 1e3 if k in kinds else None for k in LAYER_KINDS}
            peak = {key(k): numbers["peak_bytes"][k] / MIB if k in kinds else None for k in LAYER_KINDS}
            row = {
                "ms": ms,
                "peak_mib": peak,
                "ratio_dora_vs_lora": ms["dora"] / ms["lora"],
                "ratio_peft_dora_vs_dora": ms["peft_dora"] / ms["dora"] if have_peft else None,
                "ratio_peft_lora_vs_lora": ms["peft_lora"] / ms["lora"] if have_peft else None,
            }
            entry[grad_name] = row
            print(f"layer {shape_name} {fan_in}x{fan_out} bf16, {grad_name}: "
                  + "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items() if v is not None)
                  + (f"  PEFT DoRA / ours {row['ratio_peft_dora_vs_dora']:.2f}x" if have_peft else ""), flush=True)
            if not have_peft:
                base = f"layers.shapes.{shape_name}.{grad_name}"
                for k in ("peft_lora", "peft_dora"):
                    nulls[f"{base}.ms.{k}"] = nulls[f"{base}.peak_mib.{k}"] = "peft is not installed"
                nulls[f"{base}.ratio_peft_dora_vs_dora"] = nulls[f"{base}.ratio_peft_lora_vs_lora"] = (
                    "peft is not installed")
    return out


# --------------------------------------------------------------------------------------------------------------------
# the SmolLM2-shaped Llama through BiDoRATrainer
# --------------------------------------------------------------------------------------------------------------------
def state_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes held by the model's parameters, buffers and gradients and by the optimiser's state (the CPU stand-in for
    what ``torch.cuda.memory_allocated`` counts before a step)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def make_step_timer(device: torch.device, warmup: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds of each step after ``warmup`` (the upper step included: BiDoRATrainer's callback runs first); the
        peak memory of step ``warmup + 1`` above what was allocated before it, and of the whole run."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.peak_step = self.run_peak = None
            self._profiler = None
            self.optimizer = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.optimizer = kwargs.get("optimizer")
                if device.type == "cuda":
                    sync(device)
                    self._run_peak_so_far = torch.cuda.max_memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    self._before = torch.cuda.memory_allocated(device)
                else:
                    self._before = state_bytes(kwargs["model"], self.optimizer)
                    self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                            profile_memory=True)
                    self._profiler.__enter__()
            sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            elapsed = time.perf_counter() - self._start
            if state.global_step == warmup + 1:  # the memory step: timed apart (the CPU profiler slows it)
                if device.type == "cuda":
                    step_peak = torch.cuda.max_memory_allocated(device)
                    self.peak_step = step_peak - self._before
                    self._run_peak_so_far = max(self._run_peak_so_far, step_peak)
                else:
                    self._profiler.__exit__(None, None, None)
                    current = peak = 0
                    for event in sorted(self._profiler.events(), key=lambda e: e.time_range.start):
                        current += event.self_cpu_memory_usage
                        peak = max(peak, current)
                    self.peak_step = peak
                    self.run_peak = self._before + peak
            elif state.global_step > warmup + 1:
                self.times.append(elapsed)

        def on_train_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                self.run_peak = max(self._run_peak_so_far, torch.cuda.max_memory_allocated(device))

    return StepTimer()


def llama_run(settings: dict, name: str, config: dict, device: torch.device, data) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralib import AdapterConfig, BiDoRATrainer, BiDoRATrainingArguments, apply_adapters

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings["config"], attn_implementation="sdpa"))
    apply_adapters(model, AdapterConfig(method=config["method"], r=8, lora_alpha=16,
                                        target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = settings["warmup_steps"] + 1 + settings["timed_steps"]  # + the memory step
    timer = make_step_timer(device, settings["warmup_steps"])
    bilevel = dict(upper_fraction=0.2, hypergradient=config["hypergradient"], unroll_steps=1,
                   upper_learning_rate=1e-4) if config["method"] == "bidora" else dict(upper_fraction=0.0)
    with tempfile.TemporaryDirectory() as out:
        args = BiDoRATrainingArguments(
            output_dir=out, per_device_train_batch_size=settings["batch_size"], learning_rate=1e-4, max_steps=steps,
            save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, seed=0,
            use_cpu=device.type == "cpu", bf16=settings["bf16"], optim=settings["optim"], dataloader_num_workers=0,
            **bilevel,
        )
        trainer = BiDoRATrainer(model=model, args=args, train_dataset=data)
        trainer.add_callback(timer)
        result = trainer.train()
    assert next(model.parameters()).device.type == device.type
    row = {
        "ms_per_step": statistics.median(timer.times) * 1e3,
        "peak_step_mib": timer.peak_step / MIB,
        "max_memory_allocated_mib": timer.run_peak / MIB,
        "train_loss": float(result.training_loss),
        "trainable_parameters": trainable,
        "seconds": time.perf_counter() - started,
    }
    print(f"llama {name}: {row['ms_per_step']:.1f} ms/step, step peak {row['peak_step_mib']:.0f} MiB, run peak "
          f"{row['max_memory_allocated_mib']:.0f} MiB, loss {row['train_loss']:.3f}", flush=True)
    del trainer, model
    return row


def llama_section(args, device: torch.device, nulls: dict, errors: dict) -> dict:
    cuda = device.type == "cuda"
    settings = {
        "shape": "tiny (2 layers, hidden 96)" if args.tiny else "SmolLM2-135M",
        "config": TINY_LLAMA if args.tiny else SMOLLM2_135M,
        "adapters": "r=8, alpha=16 on q_proj, v_proj",
        "batch_size": 2 if args.tiny else args.batch_size,
        "seq_len": 16 if args.tiny else args.seq_len,
        "warmup_steps": 1 if args.tiny else args.warmup,
        "timed_steps": 2 if args.tiny else args.steps,
        "bf16": cuda,
        "precision": "fp32 weights, bf16 autocast" if cuda else "fp32",
        "optim": "adamw_torch_fused" if cuda else "adamw_torch",
        "memory": ("torch.cuda.max_memory_allocated: peak_step_mib above the allocation before the step, "
                   "max_memory_allocated_mib over the whole run (weights included)") if cuda else
                  ("CPU: profiler replay of one step's allocations; max_memory_allocated_mib = parameters, buffers, "
                   "gradients and optimiser state before that step + its peak"),
    }
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        shapes_only = LlamaForCausalLM(LlamaConfig(**settings["config"]))
    settings["parameters"] = sum(p.numel() for p in shapes_only.parameters())
    gen = torch.Generator().manual_seed(0)
    n = settings["batch_size"] * (settings["warmup_steps"] + settings["timed_steps"] + 2) * 2
    ids = torch.randint(0, settings["config"]["vocab_size"], (n, settings["seq_len"]), generator=gen)
    mask = torch.ones(settings["seq_len"], dtype=torch.long)
    data = [{"input_ids": ids[i], "attention_mask": mask, "labels": ids[i]} for i in range(n)]
    settings["runs"] = {}
    torch.set_flush_denormal(device.type == "cpu")  # subnormals in darts' differences slow CPU kernels 10x
    try:
        for name, config in LLAMA_RUNS.items():
            try:
                settings["runs"][name] = llama_run(settings, name, config, device, data)
            except Exception as error:  # noqa: BLE001 - the other runs still go; the error is recorded
                record_error(errors, f"llama.runs.{name}", error)
                settings["runs"][name] = None
                nulls[f"llama.runs.{name}"] = f"failed: {type(error).__name__}: {error}"
    finally:
        torch.set_flush_denormal(False)
    runs = settings["runs"]
    for name in ("bidora_darts", "bidora_neumann"):
        for ratio, field in ((f"ratio_{name}_vs_dora", "ms_per_step"), (f"ratio_peak_step_{name}_vs_dora",
                                                                         "peak_step_mib")):
            if runs.get(name) and runs.get("dora"):
                settings[ratio] = runs[name][field] / runs["dora"][field]
            else:
                settings[ratio] = None
                nulls[f"llama.{ratio}"] = "a run it needs failed (see errors)"
    return settings


# --------------------------------------------------------------------------------------------------------------------
def record_error(errors: dict, section: str, error: BaseException) -> None:
    traceback.print_exc()
    errors[section] = f"{type(error).__name__}: {error}"
    print(f"gpu_check: section {section} failed: {errors[section]}", file=sys.stderr, flush=True)


def all_finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, list):
        return all(all_finite(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_path", nargs="?", type=Path, default=None, help="the JSON (default runs/gpu_check.json)")
    parser.add_argument("--out", type=Path, default=None, help="same as the positional path")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 2 Llama layers, few steps (CPU smoke run)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per layer step (default 4096 = 8 x 512)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved repeats per layer configuration")
    parser.add_argument("--batch-size", type=int, default=8, help="Llama per-device batch")
    parser.add_argument("--seq-len", type=int, default=512, help="Llama sequence length")
    parser.add_argument("--warmup", type=int, default=2, help="Llama warm-up steps (untimed)")
    parser.add_argument("--steps", type=int, default=6, help="Llama timed steps per run")
    parser.add_argument("--skip", action="append", default=[], choices=["layers", "llama"], help="skip a section")
    parser.add_argument("--junit", type=Path, default=None, help="the pytest subset's JUnit XML (from gpu_check.sh)")
    parser.add_argument("--tests-rc", type=int, default=None, help="the pytest subset's exit status")
    parser.add_argument("--tests-seconds", type=float, default=None, help="the pytest subset's wall time")
    parser.add_argument("--tests-selection", default="tests/test_gpu_check.py -m cuda")
    parser.add_argument("--tests-skipped", default=None, help="why the test subset did not run (recorded as null)")
    parser.add_argument("--pytest-args", default=None,
                        help="run the test subset in this process first, e.g. 'tests/test_gpu_check.py -m cuda'")
    args = parser.parse_args(argv)
    out_path = args.out or args.out_path or REPO / "runs" / "gpu_check.json"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False (use --device cpu --tiny on a CPU)",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    nulls: dict[str, str] = {}
    errors: dict[str, str] = {}
    result: dict = {
        "schema": "loralib-gpu-check/1",
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": {"device": args.device, "tiny": args.tiny},
    }
    result["environment"] = environment(device, nulls)
    print(json.dumps(result["environment"]), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        if args.pytest_args and not args.tests_skipped:
            run_tests_in_process(args, workdir)
        result["tests"] = tests_section(args, nulls)
    except Exception as error:  # noqa: BLE001
        record_error(errors, "tests", error)
        result["tests"], nulls["tests"] = None, f"unreadable JUnit XML: {error}"
    for section, run in (("layers", lambda: layers_section(args, device, nulls)),
                         ("llama", lambda: llama_section(args, device, nulls, errors))):
        if section in args.skip:
            result[section], nulls[section] = None, f"skipped (--skip {section})"
            continue
        try:
            result[section] = run()
        except Exception as error:  # noqa: BLE001 - record it, run the other sections
            record_error(errors, section, error)
            result[section], nulls[section] = None, f"failed: {type(error).__name__}: {error}"
    shutil.rmtree(workdir, ignore_errors=True)
    result["total_seconds"] = time.perf_counter() - started
    if device.type == "cuda":
        result["max_memory_allocated_mib_process"] = torch.cuda.max_memory_allocated(device) / MIB
    tests = result.get("tests")
    tests_ok = tests is None or (tests["failed"] == 0 and tests["errors"] == 0 and tests["exit_code"] in (0, None))
    if not all_finite({k: v for k, v in result.items() if k in ("layers", "llama")}):
        errors["finite"] = "a measured number is not finite"
    result["nulls"] = nulls
    result["errors"] = errors
    result["ok"] = not errors and tests_ok
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu_check: wrote {out_path} in {result['total_seconds']:.1f} s; ok={result['ok']}"
          + (f"; errors: {errors}" if errors else "") + ("" if tests_ok else "; the pytest subset failed"))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
