"""Fine-tune an encoder on a GLUE task (or local files: the demo, proteins, any CSV/JSON) with ft, LoRA, DoRA or BiDoRA.

    python examples/NLU/run_glue.py --config examples/NLU/configs/roberta_base_rte.yaml --seed 0 --output_dir runs/x
    python examples/NLU/run_glue.py --model_name_or_path roberta-base --task_name rte --method dora \
        --learning_rate 4e-4 --max_steps 2000 --per_device_train_batch_size 32 --output_dir runs/y
    python examples/NLU/run_glue.py --help       # every option; a --config YAML file sets any of them (flat keys)

Laid out like transformers' own run_glue.py: ``HfArgumentParser`` over ``ModelArguments``,
``DataTrainingArguments``, ``loralib.AdapterConfig`` (``--method`` adds ``ft``), ``RunArguments`` and
``loralib.BiDoRATrainingArguments``; ``--config file.yaml`` gives defaults that the command line overrides. Data go
through ``datasets`` (glue_data.py: local CSV/TSV/JSON or the hub; ``--task_name`` is optional with local files) and
transformers' ``DataCollatorWithPadding``. One ``loralib.BiDoRATrainer`` runs every method; it holds out
``upper_fraction`` of train, on which every method is selected (``heldout``; ``--select_on_dev``: the first dev split
over time, ``dev_best_over_time``); BiDoRA with ``--retrain_max_steps N`` then retrains fresh directions with the
magnitudes frozen and reports that final model (``final``). examples/NLU/README.md has the details.

Writes ``output_dir/results.json`` (docs/CONTRACTS.md), transformers' ``all_results.json``, ``adapter/``,
``log.csv``, ``snapshots/``, checkpoints while running. The same command resumes an unfinished run. Exit status:
0 done, 1 bad input (one ``error:`` line), 2 bad command line or config.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: run_common
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402
import run_helpers as rh  # noqa: E402
import torch  # noqa: E402
from glue_data import FILE_OPTIONS, load_glue_datasets  # noqa: E402
from glue_metrics import compute_metrics  # noqa: E402
from glue_tasks import TASK_NAMES, GlueTask, get_task  # noqa: E402
from grid import FINAL_CLEANUP, remove_matching  # noqa: E402
from modeling import POOLINGS, load_classifier  # noqa: E402
from run_common import (  # noqa: E402
    CsvLogCallback,
    RunError,
    first_line,
    flat_config,
    held_out_fraction,
    logits_of,
    parse_groups,
    position_limit,
    save_adapter,
    script_parser,
    shared_problem,
    start_runtime,
)
from run_common import RunArguments as SharedRunArguments  # noqa: E402
from transformers import DataCollatorWithPadding, HfArgumentParser, set_seed  # noqa: E402
from transformers.training_args import IntervalStrategy  # noqa: E402

import loralib  # noqa: E402
from loralib import BiDoRATrainer, BiDoRATrainingArguments  # noqa: E402
from loralib.checkpoints import CheckpointError  # noqa: E402
from loralib.config import METHODS as ADAPTER_METHODS  # noqa: E402
from loralib.files import atomic_write_text  # noqa: E402

METHODS = ("ft", *ADAPTER_METHODS)
# This script's defaults for Trainer options (the configs spell out the original runs' values), and for
# modules_to_save: the task head this script creates (a module named classifier) always trains.
SCRIPT_DEFAULTS = dict(do_train=True, do_eval=True, eval_strategy="steps", eval_steps=100, save_steps=500,
                       save_total_limit=2, logging_steps=50, modules_to_save=["classifier"])
# Settings a resumed run must share with the run it continues (the rest, e.g. eval batch size, may change).
TRAJECTORY = ("seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
              "max_grad_norm", "max_steps", "num_train_epochs", "warmup_steps", "lr_scheduler_type", "optim",
              "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "upper_fraction",
              "heldout_fraction", "upper_learning_rate", "upper_weight_decay", "upper_batch_size", "hypergradient",
              "unroll_steps", "darts_alpha", "neumann_iterations", "neumann_alpha", "cg_iterations",
              "damped_solve_damping", "orth_reg")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local folder or Hugging Face id of the pretrained encoder "
                                                      "(its tokenizer is read from the same place)."})
    pooling: str = field(default="cls", metadata={"help": "Task head: cls (the model's own sequence-classification "
                         "head) or mean (a linear head on the masked mean of the last hidden states, for encoders "
                         "trained as mean-pooled sentence embedders).", "choices": list(POOLINGS)})


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": f"Task, one of: {', '.join(TASK_NAMES)}. Optional "
                                  "with local files: the task is then inferred from train (classification over its "
                                  "distinct labels, or regression when they are numbers not all whole)."})
    text_column: list[str] | None = field(default=None, metadata={"help": "One or two text columns of the local "
                                          "files (default: the task's, e.g. sentence1 sentence2, or inferred)."})
    label_column: str = field(default="label", metadata={"help": "The label column of the local files."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.csv/.tsv/.json/.jsonl) "
                                   "instead of the hub; with any local file only local files are read."})
    validation_file: str | None = field(default=None, metadata={"help": "Local dev file (MNLI: matched)."})
    validation_mismatched_file: str | None = field(default=None, metadata={"help": "Local MNLI mismatched dev file."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file; labels optional."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example (longer ones are truncated); at most "
                            "the model's number of positions."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad every batch to max_length (the original "
                                    "scripts) instead of to its longest example."})
    space_residues: bool = field(default=False, metadata={"help": "Put a space between the characters of every "
                                 "text (protein models with one token per residue, e.g. AntiBERTy)."})
    token_cache: bool = field(default=True, metadata={"help": "Keep the parsed files and tokens in datasets' cache "
                              "(HF_DATASETS_CACHE) for the next run; false: in memory only."})

    def __post_init__(self) -> None:
        self.task: GlueTask | None = get_task(self.task_name) if self.task_name else None
        if self.task is None and not any(getattr(self, option) for option in FILE_OPTIONS):
            raise ValueError("--task_name is needed for a hub dataset (with local files, e.g. --train_file, it is "
                             "optional)")
        if self.validation_mismatched_file is not None and getattr(self.task, "name", None) != "mnli":
            raise ValueError("--validation_mismatched_file is only for MNLI")
        if isinstance(self.text_column, str):  # one string in a YAML config
            self.text_column = [self.text_column]
        if self.text_column is not None and len(self.text_column) not in (1, 2):
            raise ValueError(f"--text_column takes one or two column names, got {len(self.text_column)}")
        if self.max_length < 2:
            raise ValueError(f"--max_length must be >= 2, got {self.max_length}")


@dataclass
class RunArguments(SharedRunArguments):
    """This runner's own options: the shared ones and BiDoRA's retraining phase, the snapshots, dev selection."""

    retrain_max_steps: int = field(default=0, metadata={"help": "BiDoRA's retraining phase: steps on all of train "
                                   "with the searched magnitudes frozen (0: none)."})
    retrain_learning_rate: float | None = field(default=None, metadata={"help": "Retraining lr (default: "
                                                "learning_rate)."})
    retrain_weight_decay: float | None = field(default=None, metadata={"help": "Retraining weight decay (default: "
                                               "weight_decay)."})
    retrain_eval_strategy: str | None = field(default=None, metadata={
        "help": "Evaluation during retraining: no, steps or epoch (default: --eval_strategy). The final model is "
        "evaluated either way; 'no' saves the evaluations nothing reads (the reported model is the final one).",
        "choices": ["no", "steps", "epoch"]})
    retrain_reinit: bool = field(default=True, metadata={"help": "Retrain a fresh adapter and head (seeded), as the "
                                 "original, instead of continuing from the searched ones."})
    select_on_dev: bool = field(default=False, metadata={"help": "Report the best score on the first dev split over "
                                "time (the original code; optimistic) instead of selecting on held-out train data."})
    snapshots: int = field(default=4, metadata={"help": "Evenly spaced weight snapshots for "
                           "utils/weight_decomposition.py (0: none)."})

    def __post_init__(self) -> None:
        for name, ok in [("snapshots", self.snapshots >= 0), ("retrain_max_steps", self.retrain_max_steps >= 0)]:
            if not ok:
                raise ValueError(f"--{name}: out of range, got {getattr(self, name)!r}")


def make_parser() -> HfArgumentParser:
    parser = script_parser(
        (ModelArguments, DataTrainingArguments, loralib.AdapterConfig, RunArguments, BiDoRATrainingArguments),
        __doc__.split("\n")[0], SCRIPT_DEFAULTS, METHODS, "ft (full fine-tuning: no adapter, every weight trains)",
        # this runner also holds upper_fraction out for the baselines' selection
        {"upper_fraction": "Held-out share of train: BiDoRA's upper split (its magnitudes train on it), and for ft, "
                           "lora and dora the selection split unless --heldout_fraction is given; every method is "
                           "selected on it. 0: ft / lora / dora train on all of train and report the final model."})
    parser.add_argument("--config", help="YAML file of options (keys = the option names); the command line "
                        "overrides it.")
    return parser


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, adapter_config, run_args, training_args)``; exits with status 2 and a message on
    bad input. For ``--method ft`` no adapter is applied and ``run_args.method`` says so; the adapter options are
    still checked (``adapter_config.method`` is then ``lora``) and ``target_modules`` names the weights that the
    snapshots record."""
    parser = make_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    if config:
        rh.apply_config(parser, config)
    groups, method = parse_groups(parser, argv, ("ft",), rh.RENAMED)  # ft: no adapter; its options are still checked
    model_args, data_args, adapter_config, run_args, args = groups
    run_args.method = method
    problem = shared_problem(method, args) or (
        "--retrain_max_steps is BiDoRA's retraining phase; use 0 for ft, lora and dora"
        if run_args.retrain_max_steps and method != "bidora" else
        "--do_train false: this script trains one run (evaluate a saved adapter with loralib.load_adapters)"
        if not args.do_train else
        "--load_best_model_at_end: run_glue selects the reported model itself (held-out, or --select_on_dev)"
        if args.load_best_model_at_end else
        "--select_on_dev needs --do_eval" if run_args.select_on_dev and not args.do_eval else
        "--gradient_accumulation_steps > 1 is not supported for bidora (one upper step per lower batch)"
        if method == "bidora" and args.gradient_accumulation_steps > 1 else None
    )
    if problem:
        parser.error(problem)
    if method != "bidora" and args.heldout_fraction is None:  # the baselines' selection split: --upper_fraction
        args.heldout_fraction = args.upper_fraction
    return model_args, data_args, adapter_config, run_args, args


# ---- data and model ---------------------------------------------------------------------------------------------
def load_datasets(data_args: DataTrainingArguments, tokenizer) -> tuple[GlueTask, dict]:
    """``(task, {split: tokenised datasets.Dataset})``; the task is inferred from train without --task_name."""
    task, data = load_glue_datasets(data_args.task, tokenizer, data_args.max_length, text_columns=data_args.text_column,
                                    label_column=data_args.label_column, space_residues=data_args.space_residues,
                                    cache=data_args.token_cache,
                                    **{option: getattr(data_args, option) for option in FILE_OPTIONS})
    if "train" not in data:
        raise RunError("no training split: give --train_file (or use a hub task without local files)")
    if data_args.task is None:
        print(f"no --task_name, inferred from train: {', '.join(task.text_columns)} -> {data_args.label_column}, " + (
            f"{task.num_labels} classes ({', '.join(task.label_names)})" if task.label_names else "regression"))
    return task, data


def build_model(model_args: ModelArguments, adapter_config: loralib.AdapterConfig | None, task: GlueTask):
    """The pretrained encoder with a fresh task head, and the adapters of ``adapter_config`` (None: ft)."""
    try:
        model = load_classifier(model_args.model_name_or_path, task.num_labels, pooling=model_args.pooling)
    except Exception as err:  # missing or damaged weight files: transformers / safetensors errors of several kinds
        raise RunError(f"cannot load the weights of {model_args.model_name_or_path!r}: {first_line(err)}") from None
    if adapter_config is not None:
        print(loralib.apply_adapters(model, adapter_config), file=sys.stderr)
    return model


# ---- the run ------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything checked before the output folder is touched."""

    status: str
    task: GlueTask
    collator: DataCollatorWithPadding
    data: dict
    evals: dict
    model: torch.nn.Module
    trainable: dict
    selection: str
    select_metric: str
    greater: bool
    run_config: dict
    search_done: bool = False
    checkpoint: Path | None = None
    selection_split: str | None = None  # the split selection uses (None: the final model is reported)


def prepare(model_args: ModelArguments, data_args: DataTrainingArguments, adapter_config: loralib.AdapterConfig,
            run_args: RunArguments, args: BiDoRATrainingArguments) -> Plan:
    """Check the output folder, load tokenizer, data and model, decide the selection and where to resume from.
    Reads only: nothing is written before every input has been checked."""
    out = Path(args.output_dir)
    status = rh.inspect_output_dir(out, run_args.overwrite_output_dir)
    config, tokenizer = rh.load_pretrained(model_args.model_name_or_path)
    limit = position_limit(config)
    if limit is not None and data_args.max_length > limit:
        raise RunError(f"--max_length {data_args.max_length} is beyond the {limit} positions "
                       f"{model_args.model_name_or_path} can read; use --max_length {limit} or less")
    if args.disable_tqdm:
        datasets.disable_progress_bars()
    task, data = load_datasets(data_args, tokenizer)
    evals = {n: d for n, d in data.items() if n != "train" and "label" in d.column_names} if args.do_eval else {}
    dev = [n for n in evals if not n.startswith("test")]
    if run_args.select_on_dev and not dev:
        raise RunError("--select_on_dev selects on a labelled dev split and this run has none (give "
                       "--validation_file); it never selects on the test split, whose score would then be optimistic")
    set_seed(args.seed)  # the head's initialisation depends on the seed only
    model = build_model(model_args, None if run_args.method == "ft" else adapter_config, task)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    pad = data_args.pad_to_max_length  # the original scripts' setting; else to the longest example of each batch
    collator = DataCollatorWithPadding(tokenizer, padding="max_length" if pad else "longest",
                                       max_length=data_args.max_length if pad else None)

    # What is reported: the model best on held-out train data, the best dev score over time, or the final model.
    metric = (args.metric_for_best_model or task.select_metric).removeprefix("eval_")
    greater = args.greater_is_better if args.greater_is_better is not None else not metric.endswith("loss")
    named = sorted(("heldout", *evals, "test"), key=len, reverse=True)
    split = next((s for s in named if metric.startswith(f"{s}_")), None)  # the user named one
    if split is not None and split.startswith("test"):
        raise RunError(f"--metric_for_best_model {args.metric_for_best_model} selects the model on the test split, "
                       "which makes its test score optimistic; name the held-out split (heldout_...) or a dev split")
    metric = metric.removeprefix(f"{split}_") if split else metric
    if split is None:
        split = dev[0] if run_args.select_on_dev else "heldout"
    if (run_args.retrain_max_steps or args.eval_strategy == IntervalStrategy.NO
            or (split == "heldout" and held_out_fraction(run_args.method, args, unset_is_upper=False) == 0)):
        selection, args.metric_for_best_model = "final", None
    else:
        selection = "heldout" if split == "heldout" else "dev_best_over_time"
        args.metric_for_best_model, args.greater_is_better = f"{split}_{metric}", greater
    plan = Plan(status, task, collator, data, evals, model, trainable, selection, metric, greater,
                flat_config(model_args, data_args, adapter_config, run_args, args))
    plan.selection_split = None if selection == "final" else split
    if status == "resume":  # the settings a resumed run must share, where it resumes, and whether that fits
        keys = [k for g in (model_args, data_args, adapter_config, run_args) for k in g.__dataclass_fields__
                if k not in ("overwrite_output_dir", "token_cache", "snapshots", "keep_checkpoints")] + [*TRAJECTORY]
        plan.search_done, plan.checkpoint = rh.resume_point(out, plan.run_config, keys, run_args.retrain_max_steps > 0,
                                                         ("selection.json",) if selection != "final" else ())
        if plan.checkpoint is not None:  # the checkpoint's model state against this run's, before anything is loaded
            rh.check_checkpoint(plan.checkpoint, model, run_args.method, run_args.method == "bidora" and
                                not plan.search_done)
    return plan


def run_phase(plan: Plan, run_args: RunArguments, args: BiDoRATrainingArguments, phase_args, name: str, offset: int,
              resume_from: Path | None) -> tuple[BiDoRATrainer, list[dict], rh.SelectionCallback | None, dict, float]:
    """BiDoRA's search or retraining phase (the only phase of the other methods) from step ``offset`` of the run:
    ``(trainer, its evaluations, the selection callback, the Trainer's train metrics, the run's seconds so far)``."""
    out, task, search = Path(args.output_dir), plan.task, name == "search"
    fraction = held_out_fraction(run_args.method, args, unset_is_upper=False)
    if not (plan.evals or (search and fraction > 0)):
        phase_args.eval_strategy = IntervalStrategy.NO
    trainer = BiDoRATrainer(model=plan.model, args=phase_args, train_dataset=plan.data["train"],
                            eval_dataset=plan.evals or None, data_collator=plan.collator, retrain=not search,
                            compute_metrics=lambda p: compute_metrics(task, logits_of(p), p.label_ids))
    if search and trainer.upper_dataset is not None and args.process_index == 0:
        role = ("BiDoRA's magnitudes train on it and the model is selected on it" if run_args.method == "bidora"
                else "the model is selected on it; --upper_fraction 0 (or --heldout_fraction 0) trains on all of train")
        print(f"holding out {fraction:.0%} of train ({len(trainer.upper_dataset)} of "
              f"{len(plan.data['train'])} examples) as the heldout split: {role}", flush=True)
    log = CsvLogCallback(out / "log.csv", name, offset)
    selector = None
    if search and plan.selection != "final":
        selector = rh.SelectionCallback("eval_" + trainer.args.metric_for_best_model, plan.trainable, plan.greater)
        if resume_from is not None:
            selector.load(resume_from)
    snapshots = rh.SnapshotCallback(plan.model, out / "snapshots", run_args.snapshots, offset,
                                    run_args.retrain_max_steps if search else 0, plan.run_config["target_modules"])
    for callback in (log, snapshots, selector):  # after BiDoRATrainer's upper step: they see the stepped magnitudes
        if callback is not None:
            trainer.add_callback(callback)
    metrics = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics
    splits = ["heldout", *plan.evals]
    rows = rh.history_rows(trainer.state.log_history, splits, task.metric_names, name, offset)
    if not any(r["step"] == offset + trainer.state.global_step for r in rows) and trainer.eval_dataset:
        trainer.evaluate()  # the final model may be reported: make sure it was evaluated
        rows = rh.history_rows(trainer.state.log_history, splits, task.metric_names, name, offset)
    return trainer, rows, selector, metrics, log.elapsed


def retrain_arguments(args: BiDoRATrainingArguments, run_args: RunArguments) -> BiDoRATrainingArguments:
    """The Trainer options of BiDoRA's retraining phase: ``--retrain_*`` over the search phase's."""
    retrain = copy.copy(args)
    retrain.output_dir, retrain.max_steps = str(Path(args.output_dir) / "retrain"), run_args.retrain_max_steps
    for name in ("learning_rate", "weight_decay"):
        if getattr(run_args, f"retrain_{name}") is not None:
            setattr(retrain, name, getattr(run_args, f"retrain_{name}"))
    if run_args.retrain_eval_strategy is not None:
        retrain.eval_strategy = IntervalStrategy(run_args.retrain_eval_strategy)
    return retrain


def train(plan: Plan, model_args: ModelArguments, data_args: DataTrainingArguments,
          adapter_config: loralib.AdapterConfig, run_args: RunArguments, args: BiDoRATrainingArguments) -> dict:
    """Train (resuming where the plan says), select, write ``results.json``; returns the results."""
    out, main, model = Path(args.output_dir), args.process_index == 0, plan.model
    if plan.status == "resume":
        print(f"resuming the unfinished run in {out}" + (f" from {plan.checkpoint}" if plan.checkpoint else ""),
              flush=True)
    with args.main_process_first(local=False, desc="output folder"):
        if main and plan.status == "overwrite":
            shutil.rmtree(out)
        # a new run, or one killed before its run_config.json was in place (its first file): record the settings
        # that a resume checks, and results.json repeats
        if main and (plan.status != "resume" or not (out / "run_config.json").is_file()):
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "run_config.json", json.dumps(plan.run_config, indent=2))
    selector, retrain = None, run_args.retrain_max_steps > 0
    if not plan.search_done:
        trainer, history, selector, metrics, elapsed = run_phase(plan, run_args, args, args, "search", 0,
                                                                 plan.checkpoint)
        steps, sizes = trainer.state.global_step, {"lower": len(trainer.train_dataset)}
        if trainer.upper_dataset is not None:
            sizes["heldout"] = len(trainer.upper_dataset)
        if retrain and main:
            loralib.save_adapters(model, out / "search_adapter")
            atomic_write_text(out / "search_state.json", json.dumps({"history": history, "steps": steps,
                                                                     "data_sizes": sizes}))
    else:
        state = json.loads((out / "search_state.json").read_text())
        history, steps, sizes = state["history"], state["steps"], state["data_sizes"]
        loralib.load_adapters(model, out / "search_adapter")
    if retrain:
        if run_args.retrain_reinit:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed + 7777)
                loralib.reset_directions(model)
        trainer, rows, _, metrics, elapsed = run_phase(plan, run_args, args, retrain_arguments(args, run_args),
                                                       "retrain", steps, plan.checkpoint if plan.search_done else None)
        history, steps = history + rows, steps + trainer.state.global_step

    selection, selected_step = plan.selection, steps
    if selector is not None and selector.weights is not None:
        selector.restore()
        selected_step = selector.step
    elif selection != "final":
        print(f"note: no evaluation of {args.metric_for_best_model} happened; the final model is reported",
              file=sys.stderr)
        selection = "final"
    if args.do_predict:
        rh.write_predictions(trainer, plan.data, plan.task, out, main)
    results = {
        "task": plan.task.name, "model": model_args.model_name_or_path, "method": run_args.method,
        "rank": None if run_args.method == "ft" else adapter_config.r, "seed": args.seed,
        "selection": selection, "selected_step": selected_step, "select_metric": plan.select_metric,
        "selection_split": None if selection == "final" else plan.selection_split,
        "paper_metric": plan.task.paper_metric, "pooling": model_args.pooling,
        "eval": rh.metrics_at(history, selected_step, plan.task.metric_names),
        "final_eval": rh.metrics_at(history, steps, plan.task.metric_names), "history": history,
        "config": plan.run_config, "trainable_parameters": sum(p.numel() for p in plan.trainable.values()),
        "total_parameters": sum(p.numel() for p in model.parameters()), "wall_time_s": elapsed,
        "peak_memory_bytes": rh.peak_memory_bytes(args.device), "world_size": args.world_size,
        "device": str(args.device), "versions": rh.versions(),
        "data_sizes": {"train": len(plan.data["train"]), **sizes,
                       **{n: len(d) for n, d in plan.data.items() if n != "train"}},
    }
    if main:
        write_outputs(results, metrics, plan, data_args, run_args, out)
    return results


def write_outputs(results: dict, train_metrics: dict, plan: Plan, data_args: DataTrainingArguments,
                  run_args: RunArguments, out: Path) -> None:
    """``adapter/`` (with a model card), transformers' ``all_results.json`` (the last phase's train metrics and the
    reported evaluations, ``eval_<split>_<metric>``), then ``results.json``: the run's end."""
    if loralib.get_adapter_config(plan.model) is not None:
        save_adapter(plan.model, out / "adapter", results,
                     f"{plan.task.name} ({data_args.train_file or 'hub dataset'})", "examples")
    evaluations = {f"eval_{split}_{m}": v for split, values in results["eval"].items() for m, v in values.items()}
    all_results = {**train_metrics, "train_samples": results["data_sizes"]["lower"], **evaluations}
    atomic_write_text(out / "all_results.json", json.dumps(all_results, indent=4, sort_keys=True) + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    if not run_args.keep_checkpoints:
        remove_matching(out, FINAL_CLEANUP)


def main(argv: list[str] | None = None) -> int:
    groups = parse_args(argv)
    args = groups[-1]
    start_runtime(args, "note: no GPU found: running on the CPU (fine for tests and the demo, slow for the GLUE "
                  "settings)", unpin_on_cpu=False)
    try:
        plan = prepare(*groups)
    except (RunError, ValueError, OSError) as err:  # bad data files, no module matched, unreadable model, ...
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        results = train(plan, *groups)
    except (FloatingPointError, CheckpointError) as err:  # a diverging run (its checkpoints are kept); a checkpoint
        # that the trainer's own checks refuse (optimiser state of other parameter groups)
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, metrics in results["eval"].items():
        print(f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
