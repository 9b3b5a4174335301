"""DoRA vs LoRA train-step cost, and our DoRA layer vs PEFT's, measured side by side in one run.

    python benchmarks/bench_layers.py                 # RoBERTa-base-sized model (batch 8 x 128) + 4096^2 layer
    python benchmarks/bench_layers.py --quick         # smaller shapes, a smoke run
    python benchmarks/bench_layers.py --skip-model --device cuda --dtype bfloat16 --shapes 4096x4096,4096x11008

Prints medians over interleaved repeats and the ratios the issue sets targets for:
DoRA/LoRA <= 1.05 (dropout 0) and <= 1.10 (dropout 0.1); ours >= 3x faster than PEFT DoRA at 4096^2.
Also DoRA/LoRA on a bf16 base with fp32 adapters (the default on half-precision models).
"""

from __future__ import annotations

import argparse
import json
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


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,4096x11008"`` -> ``[(4096, 4096), (4096, 11008)]`` (in_features x out_features)."""
    shapes = []
    for item in text.split(","):
        try:
            fan_in, fan_out = (int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r}: expected INxOUT, e.g. 4096x11008") from None
        if fan_in <= 0 or fan_out <= 0:
            raise argparse.ArgumentTypeError(f"shape {item!r}: sizes must be positive")
        shapes.append((fan_in, fan_out))
    return shapes


def layer_fn(kind: str, args, device, shape: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32):
    """One forward + backward of a single adapted ``in x out`` linear layer (r = 16) on ``args.tokens`` tokens; the
    base and the input in ``dtype`` (adapters fp32 on a half base, ours and PEFT's alike)."""
    fan_in, fan_out = shape or (args.width, args.width)
    torch.manual_seed(0)
    base = nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype)
    # the first adapted layer of a network needs no input gradient, every later one does: both are measured
    x = torch.randn(args.tokens, fan_in, device=device, dtype=dtype, requires_grad=args.input_grad)
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
        model(x).float().sum().backward()
        for p in model.parameters():
            p.grad = None
        x.grad = None

    return step


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def compare_layers(args, device, shape: tuple[int, int], dtype: torch.dtype, kinds, repeats: int) -> dict:
    """Median seconds and peak bytes of each kind's layer step (interleaved), for ``args.input_grad``."""
    fns = {k: layer_fn(k, args, device, shape, dtype) for k in kinds}
    med = interleaved_medians(fns, repeats=repeats, warmup=2, device=device)
    mem = {k: peak_memory_bytes(fn, device) for k, fn in fns.items()}
    del fns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": med, "peak_bytes": mem}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="layer shapes INxOUT, comma-separated (default 4096x4096; --quick 1024x1024), "
                        "e.g. 4096x4096,4096x11008 (a 7B MLP up-projection)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the layer benchmark's base weight and input (adapters stay fp32)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per layer step (default 256; --quick 128)")
    parser.add_argument("--json", type=Path, default=None, help="also write the layer numbers to this file")
    args = parser.parse_args(argv)
    args.hidden, args.layers, args.batch, args.seq = (768, 12, 8, 128) if not args.quick else (256, 4, 4, 64)
    args.width = 4096 if not args.quick else 1024
    args.tokens = args.tokens or (256 if not args.quick else 128)
    shapes = args.shapes or [(args.width, args.width)]
    dtype = getattr(torch, args.dtype)
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
        if peft_available():
            kinds += ["peft-lora", "peft-dora"]
        else:
            print("peft not installed: skipping the PEFT comparison")
        results = {"device": str(device), "dtype": args.dtype, "tokens": args.tokens, "r": 16, "repeats": repeats,
                   "shapes": {}}
        for shape in shapes:
            for input_grad in (False, True):
                args.input_grad = input_grad
                print(
                    f"\n== one linear layer {shape[0]}x{shape[1]} ({args.dtype}), {args.tokens} tokens, r=16, "
                    f"forward+backward, input {'needs' if input_grad else 'needs no'} gradient =="
                )
                numbers = compare_layers(args, device, shape, dtype, kinds, repeats)
                med, mem = numbers["seconds"], numbers["peak_bytes"]
                results["shapes"].setdefault(f"{shape[0]}x{shape[1]}", {})[
                    "input_grad" if input_grad else "no_input_grad"] = numbers
                for k in kinds:
                    print(
                        f"{k:10s} {med[k] * 1e3:8.2f} ms  ({med[k] / med['lora']:.2f}x our LoRA)  "
                        f"peak {mem[k] / 2**20:7.1f} MiB"
                    )
                if "peft-dora" in med:
                    print(f"PEFT DoRA / our DoRA: {med['peft-dora'] / med['dora']:.2f}x (target >= 3)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))

if __name__ == "__main__":
    main()
