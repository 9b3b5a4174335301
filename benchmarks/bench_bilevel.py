"""Cost of a BiDoRA iteration against a DoRA step, both through transformers' Trainer (loralib.BiDoRATrainer), on a
RoBERTa-base-sized classifier built from a config.

Every configuration is a short real training run; each step (lower step, plus the upper step when one is due) is
timed by a callback, from ``on_step_begin`` to the end of ``on_step_end``. Runs are repeated round-robin so machine
noise hits every configuration alike; reported are medians over rounds of each run's median step time:

* BiDoRA (darts, unroll 1) iteration / DoRA step                              -- target <= 4.25x
* BiDoRA (darts, unroll 5) per lower step / DoRA step                         -- target <= 1.7x
* first-order BiDoRA, and darts without the orthogonality penalty / DoRA step  -- for reference
* a sama and a damped_solve BiDoRA iteration / a darts one                      -- target <= 2x
* a DoRA step through BiDoRATrainer / the same step through a plain Trainer   -- target <= 1.05x
* peak memory of one BiDoRA iteration / one DoRA step                         -- target <= 1.3x
* the orthogonality penalty of a lower step: from the row norms and ``W0 Aᵀ`` its forward recorded
  (``capture_norm_terms``, what BiDoRATrainer does) against recomputing them; a forward + penalty + backward and the
  penalty call alone, interleaved (``--penalty-only`` runs just this part)

Default: batch 4, sequence 32, 3 rounds of 6 timed steps on CPU (several minutes on 2 cores). Scale up with flags,
e.g. ``--batch-size 32 --seq-len 128 --device cuda``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import RobertaConfig, RobertaForSequenceClassification, Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loralib  # noqa: E402
from benchmarks.common import device_from_arg, sync  # noqa: E402
from loralib import BiDoRATrainer, BiDoRATrainingArguments  # noqa: E402
from loralib.model import capture_norm_terms  # noqa: E402


def build_model(args, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=50265, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden, max_position_embeddings=514,
        num_labels=2, pad_token_id=1,
    )
    model = RobertaForSequenceClassification(config)
    loralib.apply_adapters(
        model,
        loralib.AdapterConfig(method=method, r=args.r, lora_alpha=2 * args.r, target_modules=["query", "value"],
                              modules_to_save=["classifier"]),
    )
    return model


def make_dataset(args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    n = 64 * args.batch_size
    ids = torch.randint(3, 50000, (n, args.seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    mask = torch.ones(args.seq_len, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


class StepTimer(TrainerCallback):
    """Seconds per step (after ``warmup`` steps), and the peak memory of one step."""

    def __init__(self, device: torch.device, warmup: int, memory_step: int | None) -> None:
        self.device, self.warmup, self.memory_step = device, warmup, memory_step
        self.times: list[float] = []
        self.peak: int | None = None
        self._profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.memory_step:
            self._start_memory()
        sync(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)
        if state.global_step - 1 == self.memory_step:
            self._stop_memory()

    def _start_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()

    def _stop_memory(self) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._before
            return
        self._profiler.__exit__(None, None, None)
        current = peak = 0
        for event in sorted(self._profiler.events(), key=lambda e: e.time_range.start):
            current += event.self_cpu_memory_usage
            peak = max(peak, current)
        self.peak = peak


def run(args, data, device, name: str, method: str, trainer_cls=BiDoRATrainer, **bilevel) -> StepTimer:
    # (the last step of the timed run has the upper step due at every unroll length used here)
    steps = args.warmup + args.steps
    timer = StepTimer(device, args.warmup, memory_step=args.warmup if not args.no_memory else None)
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
                      max_steps=steps, save_strategy="no", logging_strategy="no", report_to="none",
                      use_cpu=device.type == "cpu", disable_tqdm=True, seed=0)
        if trainer_cls is Trainer:
            from transformers import TrainingArguments

            trainer = Trainer(model=build_model(args, method), args=TrainingArguments(**common), train_dataset=data)
        else:
            settings = BiDoRATrainingArguments(**common, upper_fraction=0.2 if method == "bidora" else 0.0, **bilevel)
            trainer = trainer_cls(model=build_model(args, method), args=settings, train_dataset=data)
        trainer.add_callback(timer)
        trainer.train()
    return timer


def penalty_variants(args, device) -> dict:
    """``name -> step(timings)``: one lower-level forward + ``orth_reg`` penalty + backward of a BiDoRA model, the
    penalty from captured forward terms, recomputed, or absent; ``step`` appends the penalty call's seconds."""
    model = build_model(args, "bidora").to(device).train()
    for p in loralib.magnitude_parameters(model):  # the lower step: magnitudes are constants
        p.requires_grad_(False)
    examples = make_dataset(args)[: args.batch_size]
    batch = {k: v.to(device) for k, v in torch.utils.data.default_collate(examples).items()}

    def variant(penalty):
        def step(timings: list[float]) -> None:
            with capture_norm_terms(model) if penalty == "captured" else contextlib.nullcontext({}) as terms:
                loss = model(**batch).loss
            sync(device)
            start = time.perf_counter()
            if penalty is not None:
                loss = loss + 1e-5 * loralib.orthogonality_penalty(model, terms=terms)
            sync(device)
            timings.append(time.perf_counter() - start)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    return {"penalty_captured": variant("captured"), "penalty_recomputed": variant("recomputed"),
            "no_penalty": variant(None)}


def time_penalty(args, device, variants: dict) -> dict[str, dict[str, float]]:
    """Median seconds per step and per penalty call of each variant: ``args.rounds`` rounds of ``args.steps``
    steps, the variants taking turns step by step so that machine noise hits them alike."""
    steps = {name: [] for name in variants}
    calls = {name: [] for name in variants}
    for _ in range(args.warmup):  # warm-up (the cached W0 W0ᵀ, the allocator)
        for step in variants.values():
            step([])
    for round_ in range(args.rounds):
        for _ in range(args.steps):
            for name, step in variants.items():
                sync(device)
                start = time.perf_counter()
                step(calls[name])
                sync(device)
                steps[name].append(time.perf_counter() - start)
        print(f"medians after round {round_}: " + ", ".join(
            f"{name} {statistics.median(steps[name]) * 1e3:.1f} ms/step, penalty "
            f"{statistics.median(calls[name]) * 1e3:.2f} ms" for name in variants), flush=True)
    return {name: {"step": statistics.median(steps[name]), "penalty_call": statistics.median(calls[name])}
            for name in variants}


def report_penalty(penalty: dict[str, dict[str, float]]) -> dict[str, float]:
    captured, recomputed = penalty["penalty_captured"], penalty["penalty_recomputed"]
    return {
        "ratio_penalty_call_captured_vs_recomputed": captured["penalty_call"] / recomputed["penalty_call"],
        "ratio_step_captured_vs_recomputed": captured["step"] / recomputed["step"],
        "ratio_step_captured_vs_no_penalty": captured["step"] / penalty["no_penalty"]["step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (a multiple of 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--penalty-only", action="store_true", help="time only the orthogonality penalty")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    device = device_from_arg(args.device)
    torch.set_flush_denormal(device.type == "cpu")  # subnormals in the darts + penalty path slow CPU kernels 10x
    if args.penalty_only:
        penalty = time_penalty(args, device, penalty_variants(args, device))
        results = {"device": str(device), "penalty_seconds": penalty, **report_penalty(penalty)}
        print(json.dumps(results, indent=2))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    data = make_dataset(args)

    configs = {
        "dora_plain_trainer": dict(method="dora", trainer_cls=Trainer),
        "dora_step": dict(method="dora"),
        "bidora_darts_unroll1": dict(method="bidora", hypergradient="darts", unroll_steps=1),
        "bidora_darts_unroll5": dict(method="bidora", hypergradient="darts", unroll_steps=5),
        "bidora_first_order": dict(method="bidora", hypergradient="first_order", unroll_steps=1),
        "bidora_sama": dict(method="bidora", hypergradient="sama", unroll_steps=1),
        "bidora_damped_solve": dict(method="bidora", hypergradient="damped_solve", unroll_steps=1),
        "bidora_darts_unroll1_no_penalty": dict(method="bidora", hypergradient="darts", unroll_steps=1, orth_reg=0.0),
    }
    per_round: dict[str, list[float]] = {name: [] for name in configs}
    peaks: dict[str, int] = {}
    for round_ in range(args.rounds):
        for name, config in configs.items():
            timer = run(args, data, device, name, **config)
            # unroll 5: the mean over whole cycles is the cost per lower step
            value = statistics.fmean(timer.times) if "unroll5" in name else statistics.median(timer.times)
            per_round[name].append(value)
            if timer.peak is not None and round_ == 0:
                peaks[name] = timer.peak
            print(f"round {round_}: {name:34s} {value * 1e3:9.1f} ms/step", flush=True)
    times = {name: statistics.median(values) for name, values in per_round.items()}
    dora = times["dora_step"]
    results = {
        "device": str(device), "batch_size": args.batch_size, "seq_len": args.seq_len, "hidden": args.hidden,
        "layers": args.layers, "rounds": args.rounds, "steps": args.steps, "seconds_per_step": times,
        "ratio_bidora_unroll1_vs_dora": times["bidora_darts_unroll1"] / dora,
        "ratio_bidora_unroll5_per_lower_step_vs_dora": times["bidora_darts_unroll5"] / dora,
        "ratio_first_order_vs_dora": times["bidora_first_order"] / dora,
        "ratio_sama_vs_darts": times["bidora_sama"] / times["bidora_darts_unroll1"],
        "ratio_damped_solve_vs_darts": times["bidora_damped_solve"] / times["bidora_darts_unroll1"],
        "ratio_bidora_unroll1_no_penalty_vs_dora": times["bidora_darts_unroll1_no_penalty"] / dora,
        "ratio_dora_bidora_trainer_vs_plain_trainer": dora / times["dora_plain_trainer"],
    }
    if peaks:
        results["peak_bytes"] = peaks
        results["ratio_peak_memory_bidora_vs_dora"] = peaks["bidora_darts_unroll1"] / max(peaks["dora_step"], 1)
    results["penalty_seconds"] = time_penalty(args, device, penalty_variants(args, device))
    results.update(report_penalty(results["penalty_seconds"]))
    print(json.dumps(results, indent=2))
    print(
        f"BiDoRA/DoRA time: unroll 1 {results['ratio_bidora_unroll1_vs_dora']:.2f}x (target <= 4.25), "
        f"unroll 5 per lower step {results['ratio_bidora_unroll5_per_lower_step_vs_dora']:.2f}x (target <= 1.7), "
        f"first-order {results['ratio_first_order_vs_dora']:.2f}x, without the penalty "
        f"{results['ratio_bidora_unroll1_no_penalty_vs_dora']:.2f}x; per BiDoRA iteration against darts: sama "
        f"{results['ratio_sama_vs_darts']:.2f}x, damped_solve {results['ratio_damped_solve_vs_darts']:.2f}x "
        f"(target <= 2); DoRA through BiDoRATrainer / plain Trainer "
        f"{results['ratio_dora_bidora_trainer_vs_plain_trainer']:.3f}x (target <= 1.05)"
        + (f"; peak memory {results['ratio_peak_memory_bidora_vs_dora']:.2f}x (target <= 1.3)" if peaks else "")
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
