"""What ``run_glue.py`` needs around ``loralib.BiDoRATrainer``: the ``--config`` YAML defaults, the output folder and
checkpoint checks, ``TrainerCallback``s (model selection, weight snapshots, the DoRA norm cache) and
results helpers. What run_ner.py and run_clm.py use too is in examples/run_common.py (``RunError``, imported here, is
that module's).

Output folder of one run (docs/CONTRACTS.md): ``results.json``, ``log.csv``, ``run_config.json``, ``adapter/``,
``snapshots/``, ``runs/`` (TensorBoard), the Trainer's ``checkpoint-N/`` (BiDoRA's retraining phase:
``retrain/checkpoint-N/``), and, between BiDoRA's two phases, ``search_adapter/`` + ``search_state.json``.
Temporary files of loralib's atomic writer (``.<name>.<random>.tmp``) are left by a kill during a write; they belong
to the run too.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import math
import platform
import re
import resource
import zipfile
from pathlib import Path

import torch
import yaml
from glue_metrics import predictions_from_outputs
from glue_tasks import GlueTask
from run_common import RunError, check_model_folder, finished_run_message, first_line, logits_of
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, TrainerCallback
from transformers.hf_argparser import string_to_bool
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import loralib
from loralib.checkpoints import CheckpointError, last_complete_checkpoint, validate_checkpoint
from loralib.files import atomic_write, atomic_write_text

# ---- --config YAML: defaults that the command line overrides --------------------------------------------------------
# Options of the former hand-written runner, with their Trainer names (named in the error for an unknown key / flag).
RENAMED = {
    "lr": "learning_rate", "iterations": "max_steps", "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size", "upper_lr": "upper_learning_rate",
    "warmup_ratio": "warmup_steps (a number below 1 is a ratio)", "betas": "adam_beta1 and adam_beta2",
    "eps": "adam_epsilon", "eval_every": "eval_steps", "checkpoint_every": "save_steps",
    "retrain_iterations": "retrain_max_steps", "retrain_lr": "retrain_learning_rate", "device": "use_cpu",
    "overwrite": "overwrite_output_dir", "no_progress": "disable_tqdm", "num_workers": "dataloader_num_workers",
    "no_token_cache": "token_cache: false (on the command line --no_token_cache)",
}


def unknown_option(name: str, known: list[str]) -> str:
    if name in RENAMED:
        return f"{name!r} is now {RENAMED[name]!r}"
    close = difflib.get_close_matches(name, known, n=1)
    return f"unknown key {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")


def _convert(action, value):
    """A YAML value as the parser would read it from the command line (``ValueError`` if it cannot be)."""
    kind = action.type
    if value is None:
        if action.default is not None:
            raise ValueError("cannot be null")
        return None
    if action.nargs == "+":
        if isinstance(value, str):
            return value  # target_modules: one string is a regular expression (a list: name suffixes)
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [_convert_scalar(kind, v, action.choices) for v in value]
    if kind is string_to_bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(value, dict):
        return json.dumps(value)
    return _convert_scalar(kind, value, action.choices)


def _convert_scalar(kind, value, choices):
    if isinstance(value, bool | list | dict):
        raise ValueError(f"expected {getattr(kind, '__name__', 'a value')}, got {value!r}")
    text = str(value)
    if kind is int:  # YAML 1.1 reads 1e3 as a string: accept a float that is a whole number
        number = float(text)
        if not number.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        converted = int(number)
    else:
        converted = kind(text) if kind is not None else value
    if choices is not None and converted not in choices:
        raise ValueError(f"expected one of {list(choices)}, got {value!r}")
    return converted


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names the same key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (``yaml.safe_load`` keeps the last value
    without a word, so the first line would look set and not be)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first is not None:
                raise DuplicateKeyError(f"the key {key!r} is given twice (lines {first} and {line}); YAML would keep "
                                        "only the last value, so remove one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path):
    """The content of the YAML file ``path``, read with :class:`UniqueKeyLoader` (duplicate keys are an error)."""
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)


def apply_config(parser, path: str) -> None:
    """Make the keys of the YAML file ``path`` the parser's defaults (the command line still overrides them).

    Calls ``parser.error`` (exit status 2) for a missing or unreadable file, a key given twice, an unknown key or a
    value of the wrong type, naming the file and the key.
    """
    try:
        data = load_yaml(path)
    except OSError as err:
        parser.error(f"--config {path}: {err.strerror or err}")
    except DuplicateKeyError as err:
        parser.error(f"--config {path}: {err}")
    except yaml.YAMLError as err:
        parser.error(f"--config {path}: invalid YAML: {err}")
    data = {} if data is None else data
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.option_strings[0] == f"--{a.dest}"}
    actions.pop("config", None)
    defaults = {}
    for key, value in data.items():
        if key not in actions:
            parser.error(f"--config {path}: {unknown_option(str(key), sorted(actions))}")
        try:
            defaults[key] = _convert(actions[key], value)
        except (TypeError, ValueError) as err:
            parser.error(f"--config {path}: {key}: {err}")
        actions[key].required = False
    parser.set_defaults(**defaults)


# ---- the output folder and its checkpoints ------------------------------------------------------------------------
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_ATOMIC_TMP = re.compile(r"^\..+\.tmp$")  # loralib.files.atomic_write's temporary files, left by a kill
RUN_FILES = {"results.json", "all_results.json", "log.csv", "run_config.json", "adapter", "snapshots", "retrain",
             "search_adapter", "search_state.json", "runs", "loralib_run.json"}  # runs/: TensorBoard's logs
# (--report_to tensorboard); loralib_run.json: the base model the run used (loralib.BiDoRATrainer writes it)


def is_run_file(name: str) -> bool:
    return (name in RUN_FILES or bool(_CHECKPOINT.match(name)) or bool(_ATOMIC_TMP.match(name))
            or name.startswith("predict_results_"))


def inspect_output_dir(out: Path, overwrite: bool) -> str:
    """``"new"``, ``"resume"`` (an unfinished run of this script) or ``"overwrite"``; reads only, writes nothing,
    except that a finished run whose final clean-up a kill interrupted has that clean-up completed before the refusal
    (:func:`run_common.finished_run_message`).

    Raises:
        RunError: ``out`` is a file, holds files this script does not write, or holds a finished run (results.json)
            and ``overwrite`` is off.
    """
    if out.exists() and not out.is_dir():
        raise RunError(f"--output_dir {out} is a file")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not names:
        return "new"
    foreign = [n for n in names if not is_run_file(n)]
    if foreign:
        raise RunError(f"--output_dir {out} holds files this script did not write ({', '.join(foreign[:3])}); "
                       "choose another --output_dir")
    if overwrite:
        return "overwrite"
    if "results.json" in names:
        raise RunError(finished_run_message(out))
    return "resume"


def _damage(path: Path) -> str | None:
    """Why the file ``path`` of a checkpoint is unreadable (cut short, corrupt), or None."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif path.suffix in (".pt", ".pth", ".bin"):  # torch.save's zip format: check every member's CRC
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"member {bad} is corrupt"
    except Exception as err:  # OSError, JSON / zip errors, safetensors' own SafetensorError, ...
        return " ".join(str(err).split())[:200] or type(err).__name__
    return None


def find_checkpoint(folder: Path, required: tuple[str, ...] = ("trainer_state.json",)) -> Path | None:
    """The newest complete checkpoint under ``folder`` (None: start from scratch).

    A checkpoint whose ``trainer_state.json`` is missing, empty or unparsable (the Trainer writes it last), or that
    lacks one of ``required`` files, was cut short by a kill while saving: it is skipped, with a note, as
    ``loralib.BiDoRATrainer`` skips it (:func:`loralib.checkpoints.last_complete_checkpoint`). A complete one with a
    damaged file is an error.

    Raises:
        RunError: naming the checkpoint and the file, and the two ways out.
    """
    extra = tuple(name for name in required if name != "trainer_state.json")
    notes = lambda message: print(f"note: {message}", flush=True)  # noqa: E731
    newest = last_complete_checkpoint(folder, required=extra, report=notes)
    if newest is None:
        return None
    newest = Path(newest)
    for file in sorted(p for p in newest.rglob("*") if p.is_file()):
        reason = _damage(file)
        if reason is not None:
            raise RunError(f"checkpoint {newest} is damaged ({file.name}: {reason}); {_ways_out(newest)}")
    return newest


def resume_point(out: Path, run_config: dict, keys: list[str], retrain: bool,
                 required: tuple[str, ...] = ()) -> tuple[bool, Path | None]:
    """For the unfinished run in ``out``: whether BiDoRA's search phase is done (``retrain``: the run has a retraining
    phase), and the checkpoint to resume from (:func:`find_checkpoint`, with the ``required`` files).

    Raises:
        RunError: ``run_config.json`` records other values of ``keys`` than ``run_config`` (keys a run of an older
            run_glue did not record, e.g. use_rslora, had no other value then).
    """
    saved = json.loads((out / "run_config.json").read_text()) if (out / "run_config.json").is_file() else {}
    changed = [k for k in keys if k in saved and saved[k] != run_config.get(k)]
    if changed:
        raise RunError(f"{out} holds an unfinished run with other settings ({', '.join(changed)}); run the same "
                       "command, or pass --overwrite_output_dir to start afresh")
    search_done = retrain and (out / "search_state.json").is_file()
    return search_done, find_checkpoint(out / "retrain" if search_done else out, ("trainer_state.json", *required))


def _ways_out(checkpoint: Path) -> str:
    step = int(_CHECKPOINT.match(checkpoint.name)[1])
    steps = sorted(int(m.group(1)) for p in checkpoint.parent.iterdir()
                   if (m := _CHECKPOINT.match(p.name)) and int(m.group(1)) < step)
    earlier = f"the previous checkpoint, {PREFIX_CHECKPOINT_DIR}-{steps[-1]}" if steps else "none left"
    return f"delete {checkpoint} to resume from {earlier}, or pass --overwrite_output_dir to start afresh"


def check_checkpoint(checkpoint: Path, model, method: str, bilevel: bool) -> None:
    """The checkpoint's files and model state fit this run (:func:`loralib.checkpoints.validate_checkpoint`: the
    optimiser state, the method, rank, targets and base model), or a RunError naming the file or setting."""
    try:
        validate_checkpoint(checkpoint, model, method=method, bilevel=bilevel)
    except CheckpointError as err:
        raise RunError(f"cannot resume from {checkpoint}: {err}; {_ways_out(checkpoint)}") from None


# ---- the pretrained model ------------------------------------------------------------------------------------------
def load_pretrained(name: str):
    """``(config, tokenizer)`` of the model, or a RunError saying what is wrong with ``name``."""
    path = check_model_folder(name)
    try:
        config, tokenizer = AutoConfig.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise RunError(f"cannot load model {name!r}: {first_line(err)}") from None
    # Without its files transformers builds a tokenizer of special tokens only: every text would become [CLS] [SEP].
    files = sorted({"tokenizer.json", *tokenizer.vocab_files_names.values()})
    if path.is_dir() and not any((path / f).is_file() for f in files):
        raise RunError(f"--model_name_or_path {name} has no tokenizer files (none of {', '.join(files)}): put the "
                       "model's tokenizer in the folder (tokenizer.save_pretrained)")
    if tokenizer.pad_token is None:
        raise RunError(f"the tokenizer of {name} has no padding token; set one (tokenizer.pad_token) and save it")
    return config, tokenizer


# ---- callbacks ------------------------------------------------------------------------------------------------------
SELECTION_FILE, SELECTION_WEIGHTS = "selection.json", "selection.safetensors"


def _better(value: float, best: float | None, greater: bool) -> bool:
    """NaN is the worst value; ties keep the earlier step."""
    if best is None:
        return True
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value > best if greater else value < best


class SelectionCallback(TrainerCallback):
    """Keeps a copy of the trainable weights at the best value of ``metric`` (``eval_<split>_<metric>``).

    The copy lives in memory between evaluations and is written into every checkpoint (``selection.json`` and
    ``selection.safetensors``), so a resumed run selects over its whole history.
    """

    def __init__(self, metric: str, params: dict[str, torch.nn.Parameter], greater: bool = True) -> None:
        self.metric, self.params, self.greater = metric, params, greater
        self.step: int | None = None
        self.value: float | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and self.metric in metrics:
            value = float(metrics[self.metric])
            if _better(value, self.value, self.greater):
                self.step, self.value = state.global_step, value
                self.weights = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if self.weights is not None:
            weights = {n: t.contiguous() for n, t in self.weights.items()}
            atomic_write(folder / SELECTION_WEIGHTS, lambda tmp: save_file(weights, tmp))
        info = {"metric": self.metric, "step": self.step, "value": self.value}
        atomic_write_text(folder / SELECTION_FILE, json.dumps(info))

    def load(self, checkpoint: Path) -> None:
        info = json.loads((checkpoint / SELECTION_FILE).read_text())
        if info["step"] is not None:
            self.step, self.value = info["step"], info["value"]
            self.weights = load_file(str(checkpoint / SELECTION_WEIGHTS))

    def restore(self) -> None:
        """Put the selected weights back into the model."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.weights[name])


class SnapshotCallback(TrainerCallback):
    """Weight snapshots for utils/weight_decomposition.py: the base weights at step 0, then the adapter (or, for full
    fine-tuning, the target weights) at ``count`` evenly spaced steps of the whole run (both phases of BiDoRA)."""

    def __init__(self, model, directory: Path, count: int, offset: int, later_steps: int, modules) -> None:
        self.model, self.directory, self.count = model, directory, count
        self.offset, self.later_steps, self.modules = offset, later_steps, modules
        self.adapted = loralib.get_adapter_config(model) is not None
        self.steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        total = self.offset + state.max_steps + self.later_steps
        self.steps = {max(1, round(total * i / self.count)) for i in range(1, self.count + 1)} if self.count else set()
        if self.count and self.offset == 0 and state.global_step == 0 and state.is_world_process_zero:
            loralib.save_target_weights(self.model, self.directory / "base_weights.safetensors",
                                        None if self.adapted else self.modules)

    def on_step_end(self, args, state, control, **kwargs):
        step = self.offset + state.global_step
        if step in self.steps and state.is_world_process_zero:
            if self.adapted:
                loralib.save_adapters(self.model, self.directory / f"step_{step}")
            else:
                loralib.save_target_weights(self.model, self.directory / f"step_{step}" / "target_weights.safetensors",
                                            self.modules)


# ---- results ------------------------------------------------------------------------------------------------------
def history_rows(log_history: list[dict], splits: list[str], metrics: tuple[str, ...], phase: str,
                 offset: int = 0) -> list[dict]:
    """``[{"step", "phase", "split", <metric>: value, "loss", "runtime"}]`` from the Trainer's evaluation logs
    (``runtime``: seconds that evaluation took, so that reports can tell training time from evaluation time)."""
    rows = []
    keep = (*metrics, "loss", "runtime")
    for entry in log_history:
        for split in sorted(splits, key=len, reverse=True):
            prefix = f"eval_{split}_"
            values = {k[len(prefix):]: float(v) for k, v in entry.items()
                      if k.startswith(prefix) and k[len(prefix):] in keep}
            if values:
                rows.append({"step": entry["step"] + offset, "phase": phase, "split": split, **values})
                break
    return rows


def metrics_at(history: list[dict], step: int, metrics: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` of the evaluations at ``step`` (the task's metrics only)."""
    return {row["split"]: {m: row[m] for m in metrics if m in row} for row in history if row["step"] == step}


def versions() -> dict[str, str]:
    """``{"python", "torch", "transformers", "betty", "loralib"}``: the versions results.json records (the modules'
    own ``__version__``; raises ``importlib.metadata.PackageNotFoundError`` without betty-ml, which loralib needs)."""
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "betty": importlib.metadata.version("betty-ml"), "loralib": loralib.__version__}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


def write_predictions(trainer, data: dict, task: GlueTask, out: Path, main: bool) -> None:
    """``predict_results_<split>.txt`` (index, prediction) for every test split, as transformers' run_glue.py."""
    for split, dataset in data.items():
        if split.startswith("test"):
            predictions = predictions_from_outputs(task, logits_of(trainer.predict(dataset)))
            if main:
                values = [f"{p:.4f}" if task.is_regression else task.label_names[int(p)] for p in predictions]
                atomic_write_text(out / f"predict_results_{split}.txt",
                                  "index\tprediction\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))
