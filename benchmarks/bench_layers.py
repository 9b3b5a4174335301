"""DoRA vs LoRA train-step cost, and our DoRA layer vs PEFT's, measured side by side in one run.

    python benchmarks/bench_layers.py                 # RoBERTa-base-sized model (batch 8 x 128) + 4096^2 layer
    python benchmarks/bench_layers.py --quick         # smaller shapes, a smoke run

Prints medians over interleaved repeats and the ratios the issue sets targets for:
DoRA/LoRA <= 1.05 (dropout 0) and <= 1.10 (dropout 0.1); ours >= 3x faster than PEFT DoRA at 4096^2.
Also DoRA/LoRA on a bf16 base with fp32 adapters (the default on half-precision models).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_from_arg, interleaved_medians, peak_memory_bytes  # noqa: E402

import loralib  # noqa: E402


def roberta_base_sized(hidden: int, layers: int, seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        intermediate_size=4 * hidden,
        num_labels=2,
    )
    return RobertaForSequenceClassification(config)


def train_step_fn(method: str, dropout: float, args, device, dtype: torch.dtype = torch.float32):
    # a bf16 base gets fp32 adapters (AdapterConfig.autocast_adapter_dtype, the default)
    model = roberta_base_sized(args.hidden, args.layers).to(device=device, dtype=dtype)
    loralib.apply_adapters(
        model,
        loralib.AdapterConfig(
            method=method,
            r=8,
            lora_alpha=16,
            lora_dropout=dropout,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=gen).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()

    return step


def layer_fn(kind: str, args, device):
    torch.manual_seed(0)
    base = nn.Linear(args.width, args.width, bias=False).to(device)
    # the first adapted layer of a network needs no input gradient, every later one does: both are measured
    x = torch.randn(args.tokens, args.width, device=device, requires_grad=args.input_grad)
    if kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        wrapper = nn.Sequential(base)
        model = get_peft_model(
            wrapper, LoraConfig(r=16, lora_alpha=32, target_modules=["0"], use_dora=kind == "peft-dora")
        )
    else:
        model = nn.Sequential(base)
        loralib.apply_adapters(model, loralib.AdapterConfig(method=kind, r=16, lora_alpha=32, target_modules=["0"]))
    model.train()
    with torch.no_grad():  # B = 0 at init would make some paths trivially cheap; give both a real update
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)

    def step():
        model(x).sum().backward()
        for p in model.parameters():
            p.grad = None
        x.grad = None

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-layer", action="store_true")
    args = parser.parse_args(argv)
    args.hidden, args.layers, args.batch, args.seq = (768, 12, 8, 128) if not args.quick else (256, 4, 4, 64)
    args.width, args.tokens = (4096, 256) if not args.quick else (1024, 128)
    repeats = args.repeats or (7 if not args.quick else 5)
    device = device_from_arg(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} repeats={repeats}")

    if not args.skip_model:
        print(
            f"\n== train step, RoBERTa-sized (hidden {args.hidden}, {args.layers} layers), batch {args.batch} x "
            f"{args.seq}, q/v r=8 =="
        )
        for dropout in (0.0, 0.1):
            fns = {m: train_step_fn(m, dropout, args, device) for m in ("lora", "dora")}
            med = interleaved_medians(fns, repeats=repeats, warmup=2, device=device)
            mem = {m: peak_memory_bytes(fn, device) for m, fn in fns.items()}
            target = 1.05 if dropout == 0 else 1.10
            print(
                f"dropout {dropout}: LoRA {med['lora'] * 1e3:8.1f} ms  DoRA {med['dora'] * 1e3:8.1f} ms  "
                f"DoRA/LoRA {med['dora'] / med['lora']:.3f} (target <= {target})  "
                f"peak mem LoRA {mem['lora'] / 2**20:.0f} MiB DoRA {mem['dora'] / 2**20:.0f} MiB "
                f"({mem['dora'] / mem['lora']:.2f}x)"
            )
        fns = {m: train_step_fn(m, 0.0, args, device, torch.bfloat16) for m in ("lora", "dora")}
        med = interleaved_medians(fns, repeats=repeats, warmup=2, device=device)
        mem = {m: peak_memory_bytes(fn, device) for m, fn in fns.items()}
        print(
            f"bf16 base, fp32 adapters, dropout 0: LoRA {med['lora'] * 1e3:8.1f} ms  DoRA {med['dora'] * 1e3:8.1f} ms  "
            f"DoRA/LoRA {med['dora'] / med['lora']:.3f}  peak mem LoRA {mem['lora'] / 2**20:.0f} MiB "
            f"DoRA {mem['dora'] / 2**20:.0f} MiB ({mem['dora'] / mem['lora']:.2f}x)"
        )

    if not args.skip_layer:
        kinds = ["lora", "dora"]
        try:
            import peft  # noqa: F401

            kinds += ["peft-lora", "peft-dora"]
        except ImportError:
            print("peft not installed: skipping the PEFT comparison")
        for input_grad in (False, True):
            args.input_grad = input_grad
            print(
                f"\n== one linear layer {args.width}x{args.width}, {args.tokens} tokens, r=16, forward+backward, "
                f"input {'needs' if input_grad else 'needs no'} gradient =="
            )
            fns = {k: layer_fn(k, args, device) for k in kinds}
            med = interleaved_medians(fns, repeats=repeats, warmup=2, device=device)
            mem = {k: peak_memory_bytes(fn, device) for k, fn in fns.items()}
            for k in kinds:
                print(
                    f"{k:10s} {med[k] * 1e3:8.2f} ms  ({med[k] / med['lora']:.2f}x our LoRA)  "
                    f"peak {mem[k] / 2**20:7.1f} MiB"
                )
            if "peft-dora" in med:
                print(f"PEFT DoRA / our DoRA: {med['peft-dora'] / med['dora']:.2f}x (target >= 3)")


if __name__ == "__main__":
    main()
