"""Generate ``configs/*.yaml`` and ``scripts/*.sh`` of the GLUE example from the tables below.

The generated files are committed; run ``python examples/NLU/make_configs.py`` after editing a table, and
``python examples/NLU/make_configs.py --check`` to verify that the committed files are up to date.

Sources: RoBERTa rows = the settings of the original BiDoRA GLUE scripts (docs: shared reference
``original-code.md``). DeBERTa-v2-xxlarge rows = OUR choice (the authors published no DeBERTa scripts).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TASK_ORDER = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")

# Settings shared by every original script (original-code.md, "All scripts"), as BiDoRATrainingArguments keys.
# Where transformers' Trainer defaults differ from the original runs, the original value is written out:
# no gradient clipping (max_grad_norm 0: Betty 0.2.1 never clips), AdamW betas (0.9, 0.98) and eps 1e-6, linear
# warmup over 10% of the steps (warmup_steps 0.1 is a ratio) then linear decay, for both levels. Weight decay:
# the Trainer exempts biases and LayerNorm weights, the original decayed every trainable tensor (see README.md).
COMMON = dict(
    method="bidora", lora_dropout=0.0, hypergradient="darts", unroll_steps=1,
    darts_alpha=0.01,  # not set by the original scripts as far as documented: Betty's default
    neumann_iterations=3, neumann_alpha=1.0, cg_iterations=3,  # our defaults; unused by darts
    orth_reg=1e-5, upper_fraction=0.2, lr_scheduler_type="linear", warmup_steps=0.1, adam_beta1=0.9,
    adam_beta2=0.98, adam_epsilon=1e-6, max_grad_norm=0.0, eval_strategy="steps", eval_steps=100, save_steps=1000,
    logging_steps=100, seed=0,
)

# (max_length, batch, lr, wd lower, wd upper, iterations, retrain (lr, iterations, wd) or None)
ORIGINAL = {
    "roberta-base": {
        "cola": (512, 32, 5e-5, 0.1, 0.1, 20000, (3e-5, 30000, 0.1)),
        "mnli": (512, 32, 5e-5, 0.1, 0.1, 30000, (7e-5, 40000, 0.1)),
        "mrpc": (512, 32, 2e-5, 0.1, 0.1, 28000, None),
        "qnli": (512, 32, 2e-5, 0.1, 0.0, 20000, None),
        "qqp": (512, 32, 5e-5, 0.1, 0.1, 30000, (5e-5, 30000, 0.1)),
        "rte": (512, 32, 1e-5, 0.1, 0.1, 15000, (3e-5, 15000, 0.1)),
        "sst2": (512, 32, 1e-5, 0.12, 0.0, 12000, None),
        "stsb": (512, 32, 1e-5, 0.1, 0.01, 12000, None),
    },
    "roberta-large": {
        "cola": (128, 32, 1e-5, 1.0, 1.0, 20000, (1e-5, 40000, 1.0)),
        "mnli": (128, 32, 1e-5, 0.5, 0.5, 55000, None),
        "mrpc": (128, 32, 1e-5, 0.0, 0.0, 40000, None),
        "qnli": (128, 64, 1e-5, 0.5, 0.5, 60000, None),
        "qqp": (128, 32, 1e-5, 0.5, 0.5, 50000, None),
        "rte": (128, 32, 1e-5, 0.5, 0.5, 15000, (1e-5, 30000, 0.3)),
        "sst2": (128, 32, 1e-5, 0.5, 0.5, 20000, None),
        "stsb": (128, 32, 1e-5, 0.5, 0.5, 14000, None),
    },
}

# OURS, not the authors'. Rank 16 / alpha 32 on query_proj, value_proj: the paper's 4.9M trainable parameters for
# DeBERTa-v2-xxlarge (48 layers, hidden 1536) are 2*16*(1536+1536)*48 = 4.72M adapter weights + 0.15M magnitudes,
# i.e. r = 16 (the LoRA paper's DeBERTa setting). max_length and lr per task follow the LoRA paper's DeBERTa-v2-xxlarge
# recipe (sst2's 6e-5 from memory of that paper, unverified); iterations = its epochs over our 80% lower split at
# batch 32, rounded, QQP capped at 50k. LoRA started MRPC/RTE/STS-B from its MNLI adapter; we start from scratch.
# (max_length, lr, iterations)
DEBERTA_OURS = {
    "cola": (64, 1.3e-4, 2000),
    "sst2": (128, 6e-5, 27000),
    "mrpc": (128, 2e-4, 3000),
    "qqp": (320, 1e-4, 50000),
    "stsb": (128, 2e-4, 1500),
    "mnli": (256, 1e-4, 50000),
    "qnli": (512, 1e-4, 21000),
    "rte": (320, 2.6e-4, 700),
}
TABLE2_TASKS = ("sst2", "mrpc", "cola", "qnli", "rte", "stsb")

MODELS = {  # short name, download size, pretty name
    "roberta-base": ("roberta_base", "~500 MB"),
    "roberta-large": ("roberta_large", "~1.4 GB"),
    "microsoft/deberta-v2-xxlarge": ("deberta_v2_xxlarge", "~3 GB"),
}

# --- rough GPU-time model (ours; stated as such in every script) ----------------------------------------------
# Throughput of one forward+backward of the adapted model with a frozen backbone, fp32/TF32, one A100-class GPU,
# in tokens per second (our guess, not a measurement). One BiDoRA iteration with DARTS costs about 4.3 such passes
# (measured on CPU relative to a DoRA step, shared reference betty-notes.md); a retraining step about 1.
# Token counts: batch * max_length when padding to max_length, else batch * a typical padded length per task.
_TOKENS_PER_S = {"roberta-base": 60_000, "roberta-large": 20_000, "microsoft/deberta-v2-xxlarge": 4_000}
_TYPICAL_PADDED_LEN = {"cola": 24, "sst2": 50, "mrpc": 100, "qqp": 70, "stsb": 70, "mnli": 90, "qnli": 110,
                       "rte": 150}
DARTS_PASSES = 4.3


def estimate_hours(cfg: dict) -> float:
    """Rough GPU hours of one seed, training steps only (see the comment above)."""
    length = cfg["max_length"] if cfg["pad_to_max_length"] else min(cfg["max_length"],
                                                                   _TYPICAL_PADDED_LEN[cfg["task_name"]])
    step_s = cfg["per_device_train_batch_size"] * length / _TOKENS_PER_S[cfg["model_name_or_path"]]
    seconds = cfg["max_steps"] * DARTS_PASSES * step_s + cfg["retrain_max_steps"] * step_s
    return seconds / 3600.0


# --- building the configs -------------------------------------------------------------------------------------


def roberta_config(model: str, task: str, r: int = 4) -> dict:
    max_length, batch, lr, wd, upper_wd, iters, retrain = ORIGINAL[model][task]
    bilevel = ("hypergradient", "unroll_steps", "darts_alpha", "neumann_iterations", "neumann_alpha", "cg_iterations",
               "orth_reg", "upper_fraction")
    schedule = ("lr_scheduler_type", "warmup_steps", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                "eval_strategy", "eval_steps", "save_steps", "logging_steps", "seed")
    return dict(
        model_name_or_path=model, task_name=task, method=COMMON["method"], r=r, lora_alpha=2 * r,
        lora_dropout=COMMON["lora_dropout"], target_modules=["query", "value"], modules_to_save=["classifier"],
        max_length=max_length, pad_to_max_length=True, per_device_train_batch_size=batch,
        per_device_eval_batch_size=64, learning_rate=lr, weight_decay=wd, upper_learning_rate=lr,
        upper_weight_decay=upper_wd, max_steps=iters,
        retrain_max_steps=retrain[1] if retrain else 0,
        retrain_learning_rate=retrain[0] if retrain else None,
        retrain_weight_decay=retrain[2] if retrain else None,
        **{k: COMMON[k] for k in (*bilevel, *schedule)},
    )


def deberta_config(task: str) -> dict:
    max_length, lr, iters = DEBERTA_OURS[task]
    cfg = roberta_config("roberta-base", task)  # shared fields, then ours on top
    cfg.update(
        model_name_or_path="microsoft/deberta-v2-xxlarge", r=16, lora_alpha=32,
        target_modules=["query_proj", "value_proj"],
        # DeBERTa's pooler is not in the pretrained checkpoint: it is new, like the classifier, so it is trained.
        modules_to_save=["pooler", "classifier"],
        max_length=max_length, pad_to_max_length=False, per_device_train_batch_size=32, per_device_eval_batch_size=32,
        learning_rate=lr, weight_decay=0.01, upper_learning_rate=lr, upper_weight_decay=0.01, max_steps=iters,
        retrain_max_steps=0, retrain_learning_rate=None, retrain_weight_decay=None,
    )
    return cfg


def all_configs() -> dict[str, tuple[dict, str]]:
    """``{name: (config dict, header comment)}`` for every generated config."""
    out = {}
    src = "Settings of the original BiDoRA GLUE script for this model and task (r = 4, lora_alpha = 8)."
    for model in ("roberta-base", "roberta-large"):
        for task in TASK_ORDER:
            out[f"{MODELS[model][0]}_{task}"] = (roberta_config(model, task), src)
    for task in TASK_ORDER:
        out[f"deberta_v2_xxlarge_{task}"] = (
            deberta_config(task),
            "OUR settings, not the authors' (they published no DeBERTa scripts): see examples/NLU/make_configs.py.",
        )
    for r in (8, 16):
        for task in TABLE2_TASKS:
            out[f"roberta_base_r{r}_{task}"] = (
                roberta_config("roberta-base", task, r=r),
                f"Table 2 (higher rank): the original roberta-base {task} settings with r = {r}, lora_alpha = {2 * r} "
                "(our choice of alpha = 2r; the authors published no r = 8/16 scripts).",
            )
    return out


def _yaml_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        s = repr(v)
        mantissa, _, exp = s.partition("e")
        if exp and "." not in mantissa:  # YAML 1.1 (PyYAML) reads 1e-05 as a string, 1.0e-05 as a float
            s = f"{mantissa}.0e{exp}"
        return s
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    return yaml.safe_dump(v, default_style=None).strip().removesuffix("\n...").strip()


def render_yaml(name: str, cfg: dict, comment: str) -> str:
    lines = [f"# {name}: BiDoRA on GLUE {cfg['task_name']} with {cfg['model_name_or_path']}.",
             f"# {comment}",
             "# Generated by examples/NLU/make_configs.py; keys = options of examples/NLU/run_glue.py (--help).", ""]
    lines += [f"{k}: {_yaml_value(v)}" for k, v in cfg.items()]
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != cfg:  # the emitter above must round-trip exactly (types included)
        raise AssertionError(f"{name}: YAML does not round-trip")
    return text


def render_script(name: str, cfg: dict) -> str:
    model = cfg["model_name_or_path"]
    hours = estimate_hours(cfg)
    retrain = (f" + {cfg['retrain_max_steps']} retraining steps" if cfg["retrain_max_steps"] else "")
    steps = (f"{cfg['max_steps']} bi-level{retrain}, batch {cfg['per_device_train_batch_size']}, "
             f"max_length {cfg['max_length']}")
    return f"""#!/usr/bin/env bash
# {name}: BiDoRA r={cfg['r']} on GLUE {cfg['task_name']} with {model}, one run per seed.
# Settings: ../configs/{name}.yaml. Generated by examples/NLU/make_configs.py (edit the table there, regenerate).
# Environment: SEEDS (default "0 1 2 3 4"), OUTPUT_ROOT (default <repo>/runs), OVERWRITE=1 (redo finished runs; default:
# skipped), DRY_RUN=1 (print the commands), PYTHON (default <repo>/.venv/bin/python when it exists, else python3).
# Extra arguments go to run_glue.py and override the config, e.g. --max_steps 100 --retrain_max_steps 100 (a short
# try: --max_steps is BiDoRA's search only). Another method needs its own OUTPUT_ROOT (runs go to <root>/<name>/seed<N>:
# OUTPUT_ROOT=runs/dora ... --method dora --retrain_max_steps 0); a finished run made with other flags is not skipped:
# the script stops and says so. An unfinished run is resumed by the same command (examples/grid.py runs the seeds).
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
# shellcheck source=examples/python.sh
source "$ROOT/examples/python.sh"  # sets PY
# shellcheck source=examples/grid_env.sh
source "$ROOT/examples/grid_env.sh"  # sets GRID_FLAGS from OVERWRITE / DRY_RUN
SEEDS="${{SEEDS:-0 1 2 3 4}}"
OUT="${{OUTPUT_ROOT:-$ROOT/runs}}/{name}"
echo "== {name}: BiDoRA r={cfg['r']}, {cfg['task_name']}, {model}; steps: {steps}"
echo "   model download (first run only): {model} {MODELS[model][1]}; data: nyu-mll/glue {cfg['task_name']}"
echo "   expected GPU time (OUR ROUGH ESTIMATE, not measured): ~{hours:.1f} h per seed on one A100-class GPU"
echo "   (training steps only; periodic evaluation comes on top); seeds: $SEEDS; outputs: $OUT/seed<N>"
[[ $# -gt 0 ]] && echo "   these settings are the config's; overridden on the command line: $*"
"${{PY[@]}}" "$ROOT/examples/grid.py" "$ROOT/examples/NLU/run_glue.py" --out "$OUT" --seeds "$SEEDS" \\
  "${{GRID_FLAGS[@]}}" --python "${{PY[*]}}" -- \\
  --config "$HERE/../configs/{name}.yaml" "$@"
"""


def expected_files() -> dict[Path, str]:
    files = {}
    for name, (cfg, comment) in all_configs().items():
        files[HERE / "configs" / f"{name}.yaml"] = render_yaml(name, cfg, comment)
        files[HERE / "scripts" / f"{name}.sh"] = render_script(name, cfg)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ from the tables")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text() if path.is_file() else None
        if args.check:
            executable = path.suffix != ".sh" or (path.is_file() and os.access(path, os.X_OK))
            if current != text or not executable:
                stale.append(path)
            continue
        if current != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        if path.suffix == ".sh":
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    if stale:
        print("out of date (run examples/NLU/make_configs.py):\n  " + "\n  ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
