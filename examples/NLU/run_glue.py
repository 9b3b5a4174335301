"""Fine-tune an encoder on a GLUE task (or a local-file task) with ft, LoRA, DoRA or BiDoRA.

    python examples/NLU/run_glue.py --config examples/NLU/configs/roberta_base_rte.yaml --seed 0 --output_dir runs/x
    python examples/NLU/run_glue.py --help          # every option, also settable in the YAML config

Every method goes through the same code path (data, model, loralib.trainer.train), so results are comparable.
Writes ``output_dir/results.json`` (metrics of the selected model on every labelled dev/test split, history,
config, versions, time, memory), ``log.csv``, ``checkpoints/`` (resumed automatically after a crash) and
``adapter/`` (the selected adapter and head). Exit status: 0 on success, 1 on bad input (with a message), 2 on a
bad command line or config.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

import torch  # noqa: E402
from config import GlueRunConfig, parse_args, save_config  # noqa: E402
from glue_data import GlueCollator, default_cache_dir, load_raw_splits, tokenize_split  # noqa: E402
from glue_metrics import compute_metrics  # noqa: E402
from glue_tasks import GlueTask, get_task  # noqa: E402
from modeling import load_classifier  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import loralib  # noqa: E402
from loralib.trainer import TrainerConfig, train  # noqa: E402

_RUN_FILES = ("results.json", "log.csv", "checkpoints", "adapter", "snapshots", "config.yaml", "tensorboard")


def check_output_dir(cfg: GlueRunConfig) -> Path:
    """Refuse a finished run or a foreign folder unless ``--overwrite``; an unfinished run of ours is resumed.

    Only checks: nothing is created or deleted before the inputs have been validated.
    """
    if not cfg.output_dir:
        raise ValueError("--output_dir is required")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        ours = {p.name for p in out.iterdir()} <= set(_RUN_FILES)
        if not ours:
            raise ValueError(f"{out} exists and holds files this runner did not write; choose another --output_dir")
        if (out / "results.json").exists() and not cfg.overwrite:
            raise ValueError(f"{out} already holds a finished run (results.json); pass --overwrite to replace it")
    return out


def create_output_dir(cfg: GlueRunConfig, out: Path) -> None:
    if out.is_dir() and cfg.overwrite:
        shutil.rmtree(out)
    elif (out / "checkpoints").exists():
        print(f"resuming the unfinished run in {out}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")


def space_residues(text: str) -> str:
    """``"MKV"`` -> ``"M K V"``: per-residue vocabularies (AntiBERTy) need one token per character."""
    return " ".join("".join(text.split()))


def load_datasets(cfg: GlueRunConfig, task: GlueTask, tokenizer) -> dict:
    raw = load_raw_splits(
        task,
        train_file=cfg.train_file,
        validation_file=cfg.validation_file,
        validation_mismatched_file=cfg.validation_mismatched_file,
        test_file=cfg.test_file,
    )
    if "train" not in raw:
        raise ValueError("no training split: give --train_file (or use a hub task without local files)")
    if cfg.space_residues:
        for split in raw.values():
            split.texts = [[space_residues(t) for t in column] for column in split.texts]
    cache = None if cfg.no_token_cache else default_cache_dir()
    return {name: tokenize_split(split, tokenizer, cfg.max_length, cache_dir=cache) for name, split in raw.items()}


def make_evaluate(task: GlueTask, collate, batch_size: int, bf16: bool):
    """``evaluate(model, dataset) -> metrics``: batched inference in eval mode, then the task's metrics."""

    @torch.no_grad()
    def evaluate(model: torch.nn.Module, dataset) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        outputs, labels = [], []
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            batch = {k: v.to(device) for k, v in batch.items()}
            gold = batch.pop("labels")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(**batch).logits
            outputs.append(logits.float().cpu())
            labels.append(gold.cpu())
        model.train(was_training)
        return compute_metrics(task, torch.cat(outputs), torch.cat(labels))

    return evaluate


def compute_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def trainer_config(cfg: GlueRunConfig) -> TrainerConfig:
    return TrainerConfig(
        method=cfg.method,
        iterations=cfg.iterations,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        upper_lr=cfg.upper_lr,
        upper_weight_decay=cfg.upper_weight_decay,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        warmup_ratio=cfg.warmup_ratio,
        hypergradient=cfg.hypergradient,
        unroll_steps=cfg.unroll_steps,
        darts_alpha=cfg.darts_alpha,
        neumann_iterations=cfg.neumann_iterations,
        cg_iterations=cfg.cg_iterations,
        orth_reg=cfg.orth_reg,
        upper_fraction=cfg.upper_fraction,
        retrain_iterations=cfg.retrain_iterations,
        retrain_lr=cfg.retrain_lr,
        retrain_weight_decay=cfg.retrain_weight_decay,
        retrain_reinit=cfg.retrain_reinit,
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every or cfg.iterations + cfg.retrain_iterations,
        snapshots=cfg.snapshots,
        snapshot_modules=[cfg.target_modules] if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
        select_on_dev=cfg.select_on_dev,
        seed=cfg.seed,
        device=cfg.device,
        bf16=cfg.bf16,
        num_workers=cfg.num_workers,
        progress=not cfg.no_progress,
    )


def run(cfg: GlueRunConfig) -> dict:
    """One run: data, model, adapters, training, results.json. Returns the results dict."""
    from transformers import AutoTokenizer

    task = get_task(cfg.task_name)
    trainer_cfg = trainer_config(cfg)  # validates the training settings before anything is written
    out = check_output_dir(cfg)
    torch.manual_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    data = load_datasets(cfg, task, tokenizer)
    torch.manual_seed(cfg.seed)  # the head's initialisation depends on the seed only
    model = load_classifier(cfg.model_name_or_path, task.num_labels, pooling=cfg.pooling)
    if cfg.method != "ft":
        summary = loralib.apply_adapters(
            model,
            loralib.AdapterConfig(
                method=cfg.method,
                r=cfg.r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=cfg.target_modules,
                modules_to_save=cfg.modules_to_save,
            ),
        )
        print(summary, file=sys.stderr)
    collate = GlueCollator.from_tokenizer(tokenizer, pad_to_max_length=cfg.pad_to_max_length, max_length=cfg.max_length)
    eval_sets = {name: ds for name, ds in data.items() if name != "train" and ds.has_labels}
    create_output_dir(cfg, out)
    extra = {
        "task": task.name,
        "model": cfg.model_name_or_path,
        "method": cfg.method,
        "rank": None if cfg.method == "ft" else cfg.r,
        "seed": cfg.seed,
        "paper_metric": task.paper_metric,
        "select_metric": task.select_metric,
        "pooling": cfg.pooling,
        "run_config": cfg.to_dict(),
        "data_sizes": {name: len(ds) for name, ds in data.items()},
    }
    return train(
        model,
        data["train"],
        collate,
        compute_loss,
        trainer_cfg,
        out,
        evaluate=make_evaluate(task, collate, cfg.eval_batch_size, cfg.bf16),
        eval_datasets=eval_sets,
        select_metric=task.select_metric,
        extra_results=extra,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Subnormal floats (from DARTS' tiny finite differences) make CPU kernels ~10x slower; flush them to zero.
    torch.set_flush_denormal(True)
    try:
        results = run(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, metrics in results.get("eval", {}).items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"{split}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
