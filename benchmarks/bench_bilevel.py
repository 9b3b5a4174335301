"""Cost of a BiDoRA iteration against a DoRA step, on a RoBERTa-base-sized classifier built from a config.

Both go through the same engine (loralib.bilevel / Betty); DoRA is the single-level run over A, B, magnitudes and
head. Reported (medians of interleaved repeats):

* BiDoRA (darts, unroll 1) iteration / DoRA step  -- floor is ~4 forward+backward passes; target <= 4.2x
* BiDoRA (darts, unroll 5) per lower step / DoRA step  -- target <= 1.7x
* first-order BiDoRA iteration / DoRA step (ablation, for reference)
* BiDoRA (darts, unroll 1) without the orthogonality penalty / DoRA step (the penalty is dense: O(out² · in) per
  adapted layer, independent of the batch, so it dominates at the small default batch)
* peak memory of one BiDoRA iteration / one DoRA step  -- target <= 1.3x

Default run: batch 4, sequence 32, 3 repeats on CPU (a few minutes on 2 cores). Scale up with flags, e.g.
``--batch-size 32 --seq-len 128 --repeats 10 --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loralib  # noqa: E402
from benchmarks.common import device_from_arg, interleaved_medians, peak_memory_bytes  # noqa: E402
from loralib.bilevel import (  # noqa: E402
    BatchStream,
    build_engine,
    make_optimizer,
    make_scheduler,
    orthogonality_term,
    split_indices,
)


def build_model(args, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=50265,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=514,
        num_labels=2,
        pad_token_id=1,
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
    n = 16 * args.batch_size
    ids = torch.randint(3, 50000, (n, args.seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    mask = torch.ones(args.seq_len, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def task_loss(model, batch):
    return model(**batch).loss


def dora_engine(args, data, device):
    model = build_model(args, "dora")
    params = [p for p in model.parameters() if p.requires_grad]
    engine = build_engine(
        model=model,
        lower_params=params,
        lower_loss=task_loss,
        lower_stream=BatchStream(data, range(len(data)), args.batch_size, collate, seed=0, device=device),
        lower_optimizer=make_optimizer(params, 1e-4, 0.1),
        device=device,
    )
    engine.direction.scheduler = make_scheduler(engine.direction.optimizer, 10**6, 0.1)
    return engine


def bidora_engine(args, data, device, hypergradient: str, unroll: int, orth_reg: float = 1e-5):
    model = build_model(args, "bidora")
    lower_idx, upper_idx = split_indices(len(data), 0.2, 0)
    direction, magnitude = loralib.direction_parameters(model), loralib.magnitude_parameters(model)
    engine = build_engine(
        model=model,
        lower_params=direction,
        lower_loss=task_loss,
        lower_extra_loss=orthogonality_term(model, orth_reg),
        lower_stream=BatchStream(data, lower_idx, args.batch_size, collate, seed=1, device=device),
        lower_optimizer=make_optimizer(direction, 1e-4, 0.1),
        upper_params=magnitude,
        upper_loss=task_loss,
        upper_stream=BatchStream(data, upper_idx, args.batch_size, collate, seed=2, device=device),
        upper_optimizer=make_optimizer(magnitude, 1e-4, 0.1),
        hypergradient=hypergradient,
        unroll_steps=unroll,
        device=device,
    )
    engine.direction.scheduler = make_scheduler(engine.direction.optimizer, 10**6, 0.1)
    engine.magnitude.scheduler = make_scheduler(engine.magnitude.optimizer, 10**6, 0.1)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="CPU: keep subnormal floats (the darts + penalty path then runs ~10x slower)")
    args = parser.parse_args()
    device = device_from_arg(args.device)
    # On CPU, subnormal floats appear in the darts + orthogonality-penalty path (not yet traced to one tensor) and make
    # every kernel 10x slower; flushing them is what a CPU training run should do too.
    flush = device.type == "cpu" and not args.keep_denormals
    torch.set_flush_denormal(flush)
    data = make_dataset(args)

    dora = dora_engine(args, data, device)
    darts1 = bidora_engine(args, data, device, "darts", 1)
    darts5 = bidora_engine(args, data, device, "darts", 5)
    first = bidora_engine(args, data, device, "first_order", 1)
    # The dense orthogonality penalty costs O(out^2 in) per layer whatever the batch: at small batches it dominates.
    no_penalty = bidora_engine(args, data, device, "darts", 1, orth_reg=0.0)

    def cycle(engine, steps):
        def fn():
            for _ in range(steps):
                engine.step()

        return fn

    fns = {
        "dora_step": cycle(dora, 1),
        "bidora_darts_unroll1": cycle(darts1, 1),
        "bidora_darts_unroll5_cycle": cycle(darts5, 5),
        "bidora_first_order": cycle(first, 1),
        "bidora_darts_unroll1_no_penalty": cycle(no_penalty, 1),
    }
    times = interleaved_medians(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    results = {
        "device": str(device),
        "flush_denormal": flush,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "hidden": args.hidden,
        "layers": args.layers,
        "seconds": times,
        "ratio_bidora_unroll1_vs_dora": times["bidora_darts_unroll1"] / times["dora_step"],
        "ratio_bidora_unroll5_per_lower_step_vs_dora": times["bidora_darts_unroll5_cycle"] / 5 / times["dora_step"],
        "ratio_first_order_vs_dora": times["bidora_first_order"] / times["dora_step"],
        "ratio_bidora_unroll1_no_penalty_vs_dora": times["bidora_darts_unroll1_no_penalty"] / times["dora_step"],
    }
    if not args.no_memory:
        mem_dora = peak_memory_bytes(fns["dora_step"], device)
        mem_bidora = peak_memory_bytes(fns["bidora_darts_unroll1"], device)
        mem_no_penalty = peak_memory_bytes(fns["bidora_darts_unroll1_no_penalty"], device)
        results["peak_bytes"] = {"dora_step": mem_dora, "bidora_darts_unroll1": mem_bidora,
                                 "bidora_darts_unroll1_no_penalty": mem_no_penalty}
        results["ratio_peak_memory_bidora_vs_dora"] = mem_bidora / max(mem_dora, 1)
        results["ratio_peak_memory_no_penalty_vs_dora"] = mem_no_penalty / max(mem_dora, 1)
    print(json.dumps(results, indent=2))
    print(
        f"BiDoRA/DoRA time: unroll 1 {results['ratio_bidora_unroll1_vs_dora']:.2f}x (target <= 4.2), "
        f"unroll 5 per lower step {results['ratio_bidora_unroll5_per_lower_step_vs_dora']:.2f}x (target <= 1.7), "
        f"first-order {results['ratio_first_order_vs_dora']:.2f}x, "
        f"unroll 1 without the orthogonality penalty {results['ratio_bidora_unroll1_no_penalty_vs_dora']:.2f}x"
        + (
            f"; peak memory {results['ratio_peak_memory_bidora_vs_dora']:.2f}x (target <= 1.3)"
            if "ratio_peak_memory_bidora_vs_dora" in results
            else ""
        )
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
