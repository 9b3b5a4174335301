"""What the example training scripts share: examples/NLU/run_glue.py (with run_helpers.py), examples/NER/run_ner.py
and examples/NLG/run_clm.py.

The error every script reports as one ``error:`` line (:class:`RunError`), the ``HfArgumentParser`` scaffolding
(``--output_dir`` required, ``--method`` with ``ft`` / ``base`` parsed as ``lora``, exit status 2 on a bad command
line), the held-out share of train, the model's position limit, the output folder of run_ner / run_clm, training with
resumption and selection, and the results. The entry points put ``examples/`` on ``sys.path``; this module edits no
path.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import io
import json
import os
import re
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from grid import finish_interrupted_cleanup, remove_matching
from transformers import HfArgumentParser, TrainerCallback
from transformers.training_args import IntervalStrategy

import loralib
from loralib.files import atomic_write_text


class RunError(Exception):
    """A problem with the user's input or output folder, found before or while loading (a missing file, an unknown
    column, a finished run in ``--output_dir``, ...): the scripts report it as one ``error:`` line, exit status 1."""


def first_line(err: BaseException) -> str:
    """The first line of the message of ``err``, or the exception's class name when the message is empty."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ---- the command line ---------------------------------------------------------------------------------------------
class ScriptParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are one sentence: argparse prints the whole usage first, which for these
    scripts (every TrainingArguments option) is about 180 lines above the one line that says what is wrong."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every option)\n")


def script_parser(dataclass_types: Sequence[type], description: str, defaults: Mapping[str, object],
                  methods: Sequence[str], method_help: str, helps: Mapping[str, str] | None = None) -> HfArgumentParser:
    """``HfArgumentParser`` over ``dataclass_types`` as the scripts set it up: no abbreviated options, the script's
    ``defaults`` (over the dataclasses'), ``--output_dir`` required, ``--method`` choosing one of ``methods`` (its
    help: ``method_help``, then AdapterConfig's), and the help texts of ``helps`` (``{dest: help}``).

    Returns:
        The parser (its ``dataclass_types`` in the order given).
    """
    parser = ScriptParser(tuple(dataclass_types), allow_abbrev=False, description=description)
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest == "output_dir":
            action.required = True
        if helps and action.dest in helps:
            action.help = helps[action.dest]
        if action.dest == "method":
            action.choices = list(methods)
            action.help = f"{method_help}, {action.help}"
    return parser


@dataclass
class RunArguments:
    """The runners' own options (the adapter's are ``loralib.AdapterConfig``'s, the training ones the Trainer's);
    run_glue adds its retraining phase's."""

    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep the checkpoint folders of a finished run "
                                   "(they are for resuming; the reported adapter is in adapter/)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a finished or unfinished run in "
                                       "output_dir instead of refusing it / resuming it."})
    # --method is AdapterConfig's option, with ft (and base) added by script_parser; parse_args copies its value here.
    method: str = field(default="bidora", init=False)


def shared_problem(method: str, args) -> str | None:
    """The first command-line problem every runner refuses (``parser.error`` takes it), or None.

    ``method`` is the ``--method`` given; ``args`` the parsed ``BiDoRATrainingArguments``."""
    if method == "bidora" and args.upper_fraction == 0:
        return "--method bidora needs --upper_fraction > 0 (its magnitudes train on that held-out split)"
    if method == "bidora" and args.heldout_fraction is not None:
        return "--heldout_fraction is for ft, lora and dora; BiDoRA holds out --upper_fraction (its upper split)"
    if args.resume_from_checkpoint:
        return "--resume_from_checkpoint: run the same command again; it resumes from output_dir by itself"
    return None


def parse_groups(parser: HfArgumentParser, argv: list[str] | None, no_adapter: Collection[str],
                 renamed: Mapping[str, str] | None = None) -> tuple[list, str]:
    """Parse ``argv`` into one dataclass per group of ``parser``, as ``HfArgumentParser.parse_args_into_dataclasses``
    builds them. A ``--method`` of ``no_adapter`` (ft, base: no adapter is applied) is parsed as ``lora``, so that the
    adapter options are still checked.

    Returns:
        ``(groups, method)``: the dataclasses in the parser's order and the ``--method`` given.

    Raises:
        SystemExit: status 2 with a message (``parser.error``) for unrecognized arguments (naming the new name of an
            option of ``renamed``: ``{old: new}``) or a ``ValueError`` of a dataclass's own checks.
    """
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        renamed = renamed or {}
        hints = [f"{a} is now --{renamed[a[2:]]}" for a in remaining if a.startswith("--") and a[2:] in renamed]
        parser.error(f"unrecognized arguments: {' '.join(remaining)}" + (f" ({'; '.join(hints)})" if hints else ""))
    method = namespace.method
    if method in no_adapter:
        namespace.method = "lora"
    try:
        groups = [dtype(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype) if f.init})
                  for dtype in parser.dataclass_types]
    except ValueError as err:
        parser.error(str(err))
    return groups, method


def check_model_folder(name: str, option: str = "--model_name_or_path", needs_config: bool = True) -> Path:
    """``name`` as a path, or a RunError when it names a local folder that is not a model folder: a file, an empty
    folder, a folder without config.json (``needs_config``), or a path that does not exist. A local path is one that
    exists, starts with ``.``, ``/`` or ``~``, or has more than one ``/`` (a hub id is ``name`` or ``org/name``);
    anything else is left to the hub (and to the loader's own error when it is unreachable)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RunError(f"{option} {name} is a file, not a model folder")
        if not any(path.iterdir()):
            raise RunError(f"{option} {name} is an empty folder (expected config.json, weights and tokenizer files)")
        if needs_config and not (path / "config.json").is_file():
            raise RunError(f"{option} {name} has no config.json: not a transformers model folder")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RunError(f"{option} {name}: no such folder")
    return path


def held_out_fraction(method: str, args, unset_is_upper: bool = True) -> float:
    """The share of train held out as the ``heldout`` split, from ``loralib.BiDoRATrainingArguments`` ``args``.

    Returns:
        BiDoRA: ``upper_fraction`` (its upper split). ft / lora / dora (their selection split): ``heldout_fraction``;
        when that is not given, ``upper_fraction`` with ``unset_is_upper`` (run_ner, run_clm: they split the data
        themselves, the same for every method), else 0.0 (loralib.BiDoRATrainer's own rule, which run_glue follows:
        its parse_args sets ``heldout_fraction``).
    """
    if method == "bidora":
        return args.upper_fraction
    if unset_is_upper:
        return args.upper_fraction if args.heldout_fraction is None else args.heldout_fraction
    return args.heldout_fraction or 0.0


# ---- the model ----------------------------------------------------------------------------------------------------
#: Model types whose absolute position embeddings number positions from ``padding_idx + 1`` (RoBERTa's scheme)
PADDED_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer", "mpnet",
                    "esm", "ibert")


def position_limit(config) -> int | None:
    """Tokens an encoder's absolute position embeddings can read.

    Returns:
        ``max_position_embeddings``, less ``pad_token_id + 1`` for the model types of ``PADDED_POSITIONS`` (they
        number positions from ``pad_token_id + 1``: roberta-base reads 512 of its 514); None (no limit) for a config
        without ``max_position_embeddings`` or with relative positions (``position_embedding_type`` other than
        absolute, DeBERTa's ``position_biased_input: false``).
    """
    if getattr(config, "position_embedding_type", "absolute") != "absolute" or \
            getattr(config, "position_biased_input", True) is False or \
            not hasattr(config, "max_position_embeddings"):
        return None
    offset = 0
    if config.model_type in PADDED_POSITIONS and config.pad_token_id is not None:
        offset = config.pad_token_id + 1
    return config.max_position_embeddings - offset


# ---- data ---------------------------------------------------------------------------------------------------------
#: The hub's split names, and the scripts' names for them
HUB_SPLITS = {"train": "train", "validation": "validation", "dev": "validation", "test": "test"}


def load_hub_dataset(name: str, config_name: str | None, revision: str | None):
    """The hub dataset ``name`` as ``datasets.load_dataset`` gives it (a ``DatasetDict``).

    Raises:
        RunError: it cannot be loaded (offline, an unknown name, a script dataset: datasets >= 4 refuses scripts, ...).
    """
    import datasets

    try:
        return datasets.load_dataset(name, config_name, revision=revision)
    except Exception as err:  # errors of many kinds: the first line of the message says which
        raise RunError(f"cannot load dataset {name!r}: {first_line(err)}") from None


# ---- the output folder, training and results -----------------------------------------------------------------------
#: What a finished run of run_ner / run_clm leaves in its output folder (besides ``*_results.json``)
RESULT_FILES = ("results.json", "all_results.json", "run_config.json", "loralib_run.json", "adapter", "model",
                "log.csv")


class CsvLogCallback(TrainerCallback):
    """``log.csv``: one row per training log (losses, learning rates) with the phase and the run's elapsed seconds,
    counted over resumptions; on resumption the rows past the checkpoint are dropped."""

    FIELDS = ["step", "phase", "loss", "upper_loss", "learning_rate", "upper_learning_rate", "grad_norm", "elapsed_s"]
    PHASES = ("search", "retrain")

    def __init__(self, path: Path, phase: str, offset: int) -> None:
        self.path, self.phase, self.offset = path, phase, offset
        self.base, self.start = 0.0, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.base + time.perf_counter() - self.start

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        if not state.is_world_process_zero:
            return
        rows = []
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                order = self.PHASES.index(self.phase)
                rows = [r for r in csv.DictReader(f) if self.PHASES.index(r["phase"]) < order
                        or (r["phase"] == self.phase and int(r["step"]) <= self.offset + state.global_step)]
        self.base = float(rows[-1]["elapsed_s"]) if rows else 0.0
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, text.getvalue())

    def _row(self, state, logs: dict) -> None:
        row = {k: logs.get(k, "") for k in self.FIELDS}
        row.update(step=self.offset + state.global_step, phase=self.phase, elapsed_s=round(self.elapsed, 3))
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerow(row)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self._row(state, logs)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._row(state, {})  # the phase's end: its wall time (utils/report.py reads the search phase's)


def check_output_dir(out: Path, overwrite: bool, outputs: Iterable[str] = ()) -> bool:
    """Whether to resume the unfinished run in ``out`` (it holds a ``checkpoint-*``). With ``overwrite`` a previous
    run's files (checkpoints, :data:`RESULT_FILES`, ``*_results.json`` and the files matching the glob patterns of
    ``outputs``) are removed first, and nothing is resumed.

    Returns:
        True: resume from the newest checkpoint; False: start afresh.

    Raises:
        RunError: ``out`` is a file, or holds a finished run (``results.json``) and ``overwrite`` is off.
    """
    if out.exists() and not out.is_dir():
        raise RunError(f"--output_dir {out} is a file")
    checkpoints = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
    if overwrite:
        remove_matching(out, ("checkpoint-*", *RESULT_FILES, "*_results.json", *outputs))
        return False
    if (out / "results.json").exists():
        raise RunError(finished_run_message(out))
    return bool(checkpoints)


def finished_run_message(out: Path) -> str:
    """The refusal of a finished run in ``out`` (``results.json``), after completing its final clean-up if a kill
    stopped it half-way (:func:`grid.finish_interrupted_cleanup`: not when the run recorded ``keep_checkpoints``)."""
    removed = finish_interrupted_cleanup(out)
    done = (f" (its clean-up had been interrupted; removed what it leaves behind: {', '.join(removed)})"
            if removed else "")
    return f"{out} already holds a finished run (results.json){done}; pass --overwrite_output_dir to replace it"


def selection_split(args, held, dev: dict, default_metric: str, greater: bool | None = None,
                    heldout_example: str = "heldout_...", dev_hint: str = "") -> tuple[str | None, str]:
    """The split the reported model is selected on (the held-out split, or the one ``--metric_for_best_model`` names)
    and the metric; sets the Trainer's selection options (``args``) accordingly: no evaluation without ``held`` and
    ``dev``, no ``load_best_model_at_end`` without a split, ``metric_for_best_model`` ``<split>_<metric>`` and, unless
    ``greater`` is None, ``greater_is_better``.

    Returns:
        ``(split or None: the final model is reported, metric)``.

    Raises:
        RunError: the metric names the test split (``heldout_example`` and the dev split are named as the way out), or
            a split this run does not have (``dev_hint``: what gives a dev split).
    """
    metric = (args.metric_for_best_model or default_metric).removeprefix("eval_")
    named = next((s for s in ("heldout", "validation", "test") if metric.startswith(f"{s}_")), None)
    metric = metric.removeprefix(f"{named}_") if named else metric
    if held is None and not dev:
        args.eval_strategy = IntervalStrategy.NO
    split = named or ("heldout" if held is not None else None)
    if split == "test":
        raise RunError(f"--metric_for_best_model {args.metric_for_best_model} selects the model on the test split, "
                       f"which makes its test score optimistic; name the held-out split ({heldout_example}) or the dev "
                       "split")
    if split == "validation" and not dev:
        raise RunError(f"--metric_for_best_model {args.metric_for_best_model} selects on the dev split and this run "
                       f"has none{dev_hint}")
    if split == "heldout" and held is None:
        raise RunError(f"--metric_for_best_model {args.metric_for_best_model} selects on the held-out split and this "
                       "run holds none out (--upper_fraction / --heldout_fraction 0)")
    if args.eval_strategy == IntervalStrategy.NO or split is None or not args.load_best_model_at_end:
        args.load_best_model_at_end, args.metric_for_best_model = False, None
        return None, metric
    args.metric_for_best_model = f"{split}_{metric}"
    if greater is not None:
        args.greater_is_better = greater
    return split, metric


def train_and_select(trainer, args, out: Path, resume: bool):
    """Train (from the newest checkpoint in ``out`` when ``resume``, saying so), logging to ``out/log.csv``
    (:class:`CsvLogCallback`), and save the train metrics (``train_results.json``).

    Returns:
        ``(the Trainer's TrainOutput, the selected step, the training's wall seconds)``: the step of the best
        checkpoint with ``load_best_model_at_end``, else the last step; the seconds are counted over resumptions
        (the Trainer's ``train_runtime`` counts the last process only).
    """
    if resume:
        print(f"resuming the unfinished run in {out} from its newest complete checkpoint", flush=True)
    log = CsvLogCallback(out / "log.csv", "search", 0)
    trainer.add_callback(log)
    train_result = trainer.train(resume_from_checkpoint=True if resume else None)
    wall = log.elapsed
    trainer.save_metrics("train", train_result.metrics)
    best = trainer.state.best_model_checkpoint if args.load_best_model_at_end else None
    step = int(re.search(r"checkpoint-(\d+)", best).group(1)) if best else trainer.state.global_step
    return train_result, step, wall


def logits_of(prediction):
    """The logits of a Trainer's ``PredictionOutput`` (the first of its predictions when the model returns more)."""
    return prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions


def flat_config(*groups) -> dict:
    """The options of every argument dataclass in one flat JSON-safe dict (run_config.json, results' config).

    Returns:
        ``{option: value}`` over ``groups`` (a later group's option replaces an earlier one's), values that JSON
        cannot hold as their ``str``.
    """
    out = {}
    for group in groups:
        out.update(group.to_dict() if hasattr(group, "to_dict") else dataclasses.asdict(group))
    return json.loads(json.dumps(out, default=str))


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """``{distribution: installed version}`` of ``packages``; ``"not installed"`` for a missing one (never raises)."""
    out = {}
    for package in packages:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def save_adapter(model, folder: Path, results: dict, data: str, unit: str = "examples") -> None:
    """``loralib.save_adapters`` into ``folder``, with a model card giving the reported evaluations (``results``'
    ``eval`` at its ``selected_step`` and ``selection``) and the training data: ``data`` and ``results``'
    ``data_sizes`` (``unit`` per split)."""
    step, selection = results["selected_step"], results["selection"]
    sizes = ", ".join(f"{split} {n}" for split, n in results["data_sizes"].items())
    loralib.save_adapters(model, folder, metrics={f"{split} at step {step} (selection: {selection})": values
                                                  for split, values in results["eval"].items()},
                          training_data=f"{data}, {unit} per split: {sizes}")


def finish_run(out: Path, results: dict, model, tokenizer, full_model: bool, adapted: bool, data: str, unit: str,
               keep_checkpoints: bool) -> None:
    """The end of a run of run_ner / run_clm: ``model/`` (``full_model``: the whole model and its tokenizer) or
    ``adapter/`` (``adapted``: :func:`save_adapter`), ``results.json``, then the checkpoints go (unless
    ``keep_checkpoints``)."""
    if full_model:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    elif adapted:
        save_adapter(model, out / "adapter", results, data, unit)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float))
    if not keep_checkpoints:
        remove_matching(out, ("checkpoint-*",))  # grid.finish_interrupted_cleanup completes this after a kill


def start_runtime(args, cpu_note: str = "note: no GPU found: running on the CPU", unpin_on_cpu: bool = True) -> None:
    """Process settings before a run: no tokenizer threads after fork, subnormals flushed to zero (darts' tiny finite
    differences make CPU kernels ~10x slower otherwise); on the CPU no pinned memory (``unpin_on_cpu``: torch warns at
    every data loader otherwise) and ``cpu_note`` on stderr unless ``--use_cpu`` asked for the CPU."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_flush_denormal(True)
    if args.device.type == "cpu":
        if unpin_on_cpu:
            args.dataloader_pin_memory = False
        if not args.use_cpu:
            print(cpu_note, file=sys.stderr, flush=True)
