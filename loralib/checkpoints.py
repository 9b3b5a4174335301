"""Checkpoints of :class:`loralib.BiDoRATrainer`, :class:`loralib.AdapterTrainer` and any Trainer with
:class:`loralib.AdapterCheckpointMixin` (TRL's ``SFTTrainer`` too): what a run records, the checks before a resume,
loading one.

A checkpoint of an adapted model holds only what training changes (adapters, magnitudes, ``modules_to_save``,
merge state, buffers): the frozen pretrained weights are the base model's. So every run records its base, at train
start, in ``loralib_run.json`` (:data:`RUN_RECORD`) next to the weights of every checkpoint and in its output folder:

* ``base.name_or_path``: the model id or folder the base was loaded from (``None`` for a model built from a config),
  and ``base.model_class``;
* ``base.fingerprint``: for every frozen tensor that checkpoints leave out (tied aliases once), its shape and its
  Frobenius norm computed in float64, plus a sha256 over those rows (norms rounded to 6 significant digits).
  Why norms of the tensors in memory and not a hash of the safetensors files: the base may come from the hub cache,
  from ``.bin`` or sharded files, from a config (tests) or be edited after loading; hashing gigabytes of files is
  slow; and what a checkpoint must match is the frozen weights training actually used. Norms in float64 also match
  across precisions: a bf16 load of the same base differs by ~1e-5 relative, a different base by far more, so two
  fingerprints are compared tensor by tensor with a relative tolerance of :data:`FINGERPRINT_RTOL` (the sha256 is
  for reading; equal sha256 means equal without that comparison). A model fine-tuned so lightly that no tensor's norm
  moves by 0.1% passes for its base: the check is against a wrong or random base, not a forensic one.
* the method, whether the run is bi-level, the adapter config and the adapted modules with their ranks.

:func:`validate_checkpoint` checks a checkpoint folder against the model about to resume from it, before anything
is loaded, and raises :class:`CheckpointError` (a ``ValueError``) with one sentence naming the file or setting.
:func:`load_checkpoint` turns a checkpoint folder (or a finished run's folder) into the trained model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .adapter_state import adapter_tensors
from .config import AdapterConfig
from .files import atomic_write_text, read_json, read_safetensors
from .model import CONFIG_KEY, adapter_layers, apply_adapters, get_adapter_config

__all__ = [
    "RUN_RECORD",
    "CheckpointError",
    "base_fingerprint",
    "compare_fingerprints",
    "frozen_keys",
    "last_complete_checkpoint",
    "load_checkpoint",
    "read_run_record",
    "run_record",
    "validate_checkpoint",
    "write_run_record",
]

RUN_RECORD = "loralib_run.json"
RUN_RECORD_FORMAT = "loralib-run"
RUN_RECORD_VERSION = 1
FINGERPRINT_KIND = "frozen-norms-float64-v1"
#: relative tolerance between two fingerprints' norms (a bf16 load of the same weights differs by ~1e-5)
FINGERPRINT_RTOL = 1e-3
TRAINER_STATE = "trainer_state.json"
OPTIMIZER, SCHEDULER, RNG_STATE, BILEVEL_STATE = "optimizer.pt", "scheduler.pt", "rng_state.pth", "bilevel_state.pt"
WEIGHTS, WEIGHTS_INDEX, WEIGHTS_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed or loaded; the message is one sentence naming the file or setting."""


# ---- what checkpoints leave out ---------------------------------------------------------------------------------
def frozen_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the frozen pretrained parameters of an adapted model, under every name a tied parameter
    has (``lm_head.weight`` and ``embed_tokens.weight`` both): what a checkpoint leaves out. Empty without adapters
    (full fine-tuning saves everything). A parameter that trains (``requires_grad``, an adapter tensor, a magnitude,
    a ``modules_to_save`` parameter) is kept under all its names."""
    if get_adapter_config(model) is None:
        return set()
    kept = {id(t) for t in adapter_tensors(model).values()}
    named = list(model.named_parameters(remove_duplicate=False))
    kept |= {id(p) for _, p in named if p.requires_grad}
    return {name for name, p in named if id(p) not in kept}


def _frozen_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """One entry per frozen tensor (the first name of a tied one)."""
    frozen, seen, out = frozen_keys(model), set(), {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in frozen and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def _norm64(tensor: torch.Tensor) -> float:
    flat, total = tensor.detach().reshape(-1), 0.0
    for chunk in flat.split(1 << 22):
        total += float(chunk.to(torch.float64).square().sum())
    return math.sqrt(total)


def base_fingerprint(model: nn.Module) -> dict | None:
    """``{"kind", "sha256", "tensors": {name: [shape, norm]}}`` of the frozen tensors (None when none is frozen)."""
    tensors = {name: [list(t.shape), _norm64(t)] for name, t in _frozen_tensors(model).items()}
    if not tensors:
        return None
    rows = "\n".join(f"{n}|{s}|{v:.6e}" for n, (s, v) in sorted(tensors.items()))
    return {"kind": FINGERPRINT_KIND, "sha256": hashlib.sha256(rows.encode()).hexdigest(), "tensors": tensors}


def compare_fingerprints(recorded: dict, current: dict | None) -> str | None:
    """Why ``current`` is not the base of ``recorded`` (a clause), or None when it is."""
    if current is None:
        return "this model has no frozen pretrained weights"
    if recorded.get("kind") != FINGERPRINT_KIND:
        return f"the recorded fingerprint is of kind {recorded.get('kind')!r}, which this loralib does not read"
    if recorded.get("sha256") == current["sha256"]:
        return None
    ours, theirs = current["tensors"], recorded.get("tensors", {})
    if set(ours) != set(theirs):
        only = sorted(set(theirs) - set(ours)) or sorted(set(ours) - set(theirs))
        return f"its frozen tensors have other names ({only[0]} is in only one of them)"
    differ = []
    for name, (shape, norm) in theirs.items():
        mine_shape, mine = ours[name]
        if list(shape) != mine_shape:
            return f"{name} has shape {mine_shape}, the recorded base {list(shape)}"
        if abs(mine - norm) > FINGERPRINT_RTOL * max(abs(mine), abs(norm)) + 1e-12:
            differ.append((name, norm, mine))
    if not differ:
        return None
    name, norm, mine = differ[0]
    return (f"{len(differ)} of its {len(theirs)} frozen tensors have other norms (e.g. {name}: {mine:.6g}, "
            f"recorded {norm:.6g})")


# ---- the run record ---------------------------------------------------------------------------------------------
def _name_or_path(model: nn.Module) -> str | None:
    for owner in (model, getattr(model, "config", None)):
        value = getattr(owner, "name_or_path", None) or getattr(owner, "_name_or_path", None)
        if isinstance(value, (str, os.PathLike)) and str(value):
            return str(value)
    return None


def run_record(model: nn.Module, *, method: str, bilevel: bool, fingerprint: dict | None = None,
               extra: dict | None = None) -> dict:
    """The ``loralib_run.json`` of a run of ``model`` (``fingerprint``: a precomputed :func:`base_fingerprint`)."""
    config = get_adapter_config(model)
    fingerprint = base_fingerprint(model) if fingerprint is None else fingerprint
    return {
        "format": RUN_RECORD_FORMAT, "version": RUN_RECORD_VERSION,
        "loralib_version": getattr(sys.modules.get(__package__), "__version__", None),
        "method": method, "bilevel": bilevel,
        "checkpoint_weights": "trainable state only" if config is not None else "whole model",
        "adapter": None if config is None else config.to_dict(),
        "adapted_modules": {name: layer.r for name, layer in adapter_layers(model)},
        "base": {"name_or_path": _name_or_path(model), "model_class": type(model).__name__,
                 "model_type": getattr(getattr(model, "config", None), "model_type", None),
                 "fingerprint": fingerprint},
        **(extra or {}),
    }


def write_run_record(folder: str | os.PathLike, record: dict) -> Path:
    return atomic_write_text(Path(folder) / RUN_RECORD, json.dumps(record, indent=1))


def read_run_record(folder: str | os.PathLike) -> dict | None:
    """The run record of ``folder`` (None when it has none); CheckpointError when it is unreadable."""
    path = Path(folder) / RUN_RECORD
    if not path.exists():
        return None
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the checkpoint was not written to the end")
    try:
        record = read_json(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(str(err)) from None
    if record.get("format") != RUN_RECORD_FORMAT:
        raise CheckpointError(f"{path} is not a loralib run record (no \"format\": \"{RUN_RECORD_FORMAT}\")")
    if record.get("version", 0) > RUN_RECORD_VERSION:
        raise CheckpointError(f"{path} has version {record['version']}, newer than this loralib reads "
                              f"({RUN_RECORD_VERSION}): upgrade loralib")
    return record


# ---- complete checkpoints -----------------------------------------------------------------------------------------
def _checkpoint_step(path: Path) -> int | None:
    prefix, _, number = path.name.partition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def last_complete_checkpoint(output_dir: str | os.PathLike, required: tuple[str, ...] = (),
                             report=None) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that was written to the end, or None.

    The Trainer writes ``trainer_state.json`` last, so a folder whose ``trainer_state.json`` is missing, empty or
    does not parse (a run killed while saving), or that lacks one of ``required`` (files that callbacks write after
    it), is incomplete: it is skipped, with a message to ``report`` (default: stderr).
    """
    report = report or (lambda message: print(message, file=sys.stderr, flush=True))
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = sorted((step, p) for p in folder.iterdir() if p.is_dir() and (step := _checkpoint_step(p)) is not None)
    for _, path in reversed(found):
        try:
            state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError
        except (OSError, ValueError):
            report(f"skipping {path}: incompletely written (no readable {TRAINER_STATE})")
            continue
        missing = [name for name in required if not (path / name).is_file()]
        if missing:
            report(f"skipping {path}: incompletely written (no {missing[0]})")
            continue
        return str(path)
    return None


# ---- checks before a resume -------------------------------------------------------------------------------------
def _check_zip(path: Path, what: str) -> None:
    """A ``torch.save`` file: present, not empty, a zip whose members all pass their CRC."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {what}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the file was cut short")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt (its member {bad} fails its checksum)")


def _weight_shapes(folder: Path) -> tuple[Path, dict[str, list[int]]]:
    """``(file, {key: shape})`` of a checkpoint's weights, read from the safetensors headers only."""
    from safetensors import SafetensorError, safe_open

    single, index, binary = folder / WEIGHTS, folder / WEIGHTS_INDEX, folder / WEIGHTS_BIN
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            files = [folder / n for n in sorted(set(read_json(index)["weight_map"].values()))]
        except (KeyError, TypeError, AttributeError, ValueError, OSError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err})") from None
    elif binary.is_file():
        _check_zip(binary, "")
        return binary, {}
    else:
        raise CheckpointError(f"{folder} holds no model weights ({WEIGHTS} is missing)")
    shapes: dict[str, list[int]] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes): the file was cut short")
        try:
            with safe_open(str(path), framework="pt") as handle:  # checks that the data fills the file exactly
                shapes.update({k: list(handle.get_slice(k).get_shape()) for k in handle.keys()})
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path} is truncated or corrupt ({' '.join(str(err).split())[:160]})") from None
    return files[0] if len(files) == 1 else index, shapes


def _check_state(path: Path) -> int:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was not written to the end")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the checkpoint was not written to the end")
    try:
        state = read_json(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{err}: the checkpoint was not written to the end") from None
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path} records no global_step: it is not a Trainer checkpoint")
    return step


def _describe(method: str, bilevel: bool) -> str:
    return f"{method} run" + (" (bi-level)" if bilevel else " (BiDoRA's retraining phase)" if method == "bidora"
                              else "")


def validate_checkpoint(checkpoint: str | os.PathLike, model: nn.Module, *, method: str, bilevel: bool,
                        optimizer: bool = True, fingerprint: dict | None = None) -> int:
    """Check ``checkpoint`` against ``model`` (the model about to resume from it) before anything is loaded; returns
    the checkpoint's global step.

    Checked: ``trainer_state.json`` (present, not empty, parses, has ``global_step``); the weights (present, not cut
    short, their tensors exactly those this model saves, with the same shapes: another method, rank or target set
    shows there); ``optimizer.pt`` and ``scheduler.pt`` (present and intact when ``optimizer``: without them the
    Trainer would resume silently with a fresh optimiser); ``rng_state.pth`` when present; ``bilevel_state.pt``
    (present and intact for a bi-level run, absent otherwise); ``loralib_run.json`` when present (method, bi-level or
    not, rank, targets, and the base's fingerprint against ``model``'s frozen weights; ``fingerprint``: that of
    ``model``, when already computed).

    Raises:
        CheckpointError: one sentence naming the file or the setting.
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist (or is not a folder)")
    step = _check_state(folder / TRAINER_STATE)
    record = read_run_record(folder)
    if record is not None:
        theirs = (record.get("method"), bool(record.get("bilevel")))
        if theirs != (method, bilevel):
            raise CheckpointError(f"{folder} was written by a {_describe(*theirs)}, and this is a "
                                  f"{_describe(method, bilevel)} ({RUN_RECORD}: method); resume with the same method "
                                  "or start afresh")
        _compare_adapters(folder, record, model)
    weights, shapes = _weight_shapes(folder)
    if shapes:
        _compare_tensors(folder, weights, shapes, model)
    if optimizer:
        _check_zip(folder / OPTIMIZER, "resuming would start a fresh optimiser; resume from a checkpoint that has it, "
                                       "or start afresh")
        _check_zip(folder / SCHEDULER, "resuming would start a fresh learning-rate schedule; resume from a checkpoint "
                                       "that has it, or start afresh")
    if (folder / RNG_STATE).exists():
        _check_zip(folder / RNG_STATE, "")
    if bilevel:
        _check_zip(folder / BILEVEL_STATE, f"{folder} was not written by a bi-level BiDoRA run of BiDoRATrainer "
                                           "(it has no upper-level state)")
    elif (folder / BILEVEL_STATE).exists():
        raise CheckpointError(f"{folder} was written by a bi-level BiDoRA run ({BILEVEL_STATE}), and this is a "
                              f"{_describe(method, bilevel)}; resume with the same method or start afresh")
    if record is not None and (recorded := (record.get("base") or {}).get("fingerprint")):
        why = compare_fingerprints(recorded, base_fingerprint(model) if fingerprint is None else fingerprint)
        if why is not None:
            raise CheckpointError(f"{folder} was trained on another base model than this one "
                                  f"({RUN_RECORD}: base {record['base'].get('name_or_path')!r}; {why})")
    return step


def _compare_adapters(folder: Path, record: dict, model: nn.Module) -> None:
    config = get_adapter_config(model)
    theirs = record.get("adapter")
    if (theirs is None) != (config is None):
        raise CheckpointError(f"{folder} was written by a {record.get('method')} run, this model is "
                              f"{'not adapted' if config is None else 'adapted'} ({RUN_RECORD}: adapter)")
    if config is None:
        return
    ours = config.to_dict()
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if key in theirs and theirs[key] != ours.get(key):
            raise CheckpointError(f"{folder} was trained with {key}={theirs[key]!r}, this run has {ours.get(key)!r} "
                                  f"({RUN_RECORD}: adapter.{key})")
    recorded = record.get("adapted_modules")
    if isinstance(recorded, dict):
        current = {name: layer.r for name, layer in adapter_layers(model)}
        if set(recorded) != set(current):
            extra = sorted(set(recorded) - set(current)) or sorted(set(current) - set(recorded))
            raise CheckpointError(f"{folder} adapted other target modules ({extra[0]} is adapted in only one of "
                                  f"them; {RUN_RECORD}: adapted_modules / target_modules)")
        ranks = [(n, recorded[n], r) for n, r in current.items() if recorded[n] != r]
        if ranks:
            name, theirs_r, ours_r = ranks[0]
            raise CheckpointError(f"{folder} has rank {theirs_r} at {name}, this run {ours_r} ({RUN_RECORD}: r)")


def _missing_trained(model: nn.Module, saved: set[str]) -> list[str]:
    """Parameters of ``model`` that a checkpoint must hold (not frozen) and ``saved`` provides under none of their
    tied names (a whole-model save keeps one name of a tied pair; buffers are not required)."""
    frozen, names = frozen_keys(model), {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return sorted(group[0] for group in names.values()
                  if not any(n in saved for n in group) and not all(n in frozen for n in group))


def _coverage(model: nn.Module, saved: set[str]) -> tuple[list[str], list[str]]:
    """``(unexpected, missing)``: saved names that ``model`` lacks, and trained parameters ``saved`` does not hold."""
    return sorted(saved - set(model.state_dict())), _missing_trained(model, saved)


def _compare_tensors(folder: Path, weights: Path, shapes: dict[str, list[int]], model: nn.Module) -> None:
    state = model.state_dict()
    unexpected, missing = _coverage(model, set(shapes))
    if unexpected:
        raise CheckpointError(f"{weights} holds {len(unexpected)} tensors this model lacks (e.g. {unexpected[0]}): "
                              "it was written for another method, target set or model")
    if missing:
        raise CheckpointError(f"{weights} lacks {len(missing)} tensors this model trains (e.g. {missing[0]}): it was "
                              "written for another method, target set or model")
    for key, shape in shapes.items():
        if list(state[key].shape) != shape:
            what = "rank" if key.endswith(("lora_A", "lora_B")) else "shape"
            raise CheckpointError(f"{weights} has {key} of shape {shape}, this model {list(state[key].shape)} "
                                  f"(another {what})")


def check_optimizer_groups(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.pt`` has as many parameter groups, of the same sizes, as ``optimizer``: a run that trains other
    parameters (another method, targets or ``modules_to_save``) would otherwise fail inside torch."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch's zip reader raises RuntimeError of several kinds
        raise CheckpointError(f"{path} is truncated or corrupt ({' '.join(str(err).split())[:160]})") from None
    theirs = [len(g.get("params", ())) for g in saved.get("param_groups", [])] if isinstance(saved, dict) else None
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs != ours:
        raise CheckpointError(f"{path} holds optimiser state for parameter groups of sizes {theirs}, this run trains "
                              f"groups of sizes {ours}: it was written by a run that trains other parameters "
                              "(another method, rank pattern, target set or modules_to_save)")


# ---- loading ------------------------------------------------------------------------------------------------------
def _resolve(folder: Path) -> tuple[Path, str]:
    """``(where the weights are, "weights" | "adapter")`` for a checkpoint or a finished run's folder."""
    if (folder / WEIGHTS).is_file() or (folder / WEIGHTS_INDEX).is_file():
        return folder, "weights"
    newest = last_complete_checkpoint(folder)
    if newest is not None:
        return Path(newest), "weights"
    if (folder / "adapter" / "adapter_config.json").is_file():  # examples/NLU/run_glue.py's output folder
        return folder / "adapter", "adapter"
    raise CheckpointError(f"{folder} holds no model weights ({WEIGHTS}), no complete checkpoint-N folder and no "
                          "adapter/ folder")


def _model_class(name: str | None):
    import transformers

    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise CheckpointError(f"the run's model class {name!r} is not a transformers class: pass model_class=")
    return cls


def load_checkpoint(folder: str | os.PathLike, base: str | os.PathLike | nn.Module | None = None,
                    model_class: type | None = None, **kwargs) -> nn.Module:
    """The trained model of a checkpoint folder of a trainer with :class:`~loralib.AdapterCheckpointMixin`
    (:class:`~loralib.BiDoRATrainer`, :class:`~loralib.AdapterTrainer`), or of a finished run's folder
    (its ``save_model`` weights, else its newest complete checkpoint, else run_glue's ``adapter/``).

    Args:
        folder: ``output_dir/checkpoint-N`` or ``output_dir``.
        base: the pretrained model the run started from: a model id or folder, a model instance (not adapted, the
            task head may be fresh), or None for the id the run recorded in ``loralib_run.json``.
        model_class: the transformers class to load ``base`` with (default: the class the run recorded).
        **kwargs: passed to ``model_class.from_pretrained`` (``dtype=``, ``device_map=``...); the checkpoint's
            ``config.json`` (labels, head size) is passed as ``config`` unless given.

    Returns the model in eval mode, adapters applied and every trained tensor loaded. Refuses (CheckpointError,
    a ValueError) when no base is given and none was recorded, when the base's frozen weights do not match the
    recorded fingerprint (another or a randomly initialised base), or when the checkpoint lacks tensors the model
    trains.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist (or is not a folder)")
    source, kind = _resolve(folder)
    record = read_run_record(source) or read_run_record(folder)
    if record is None and source.parent != folder:
        record = read_run_record(source.parent)
    recorded_base = (record or {}).get("base") or {}
    if base is None:
        base = recorded_base.get("name_or_path")
        if not base:
            raise CheckpointError(
                f"{folder} records no base model ({RUN_RECORD} {'has no base id' if record else 'is missing'}): "
                "the checkpoint holds the trained tensors only; pass base=<the pretrained model id, folder or "
                "instance the run started from>")
    if isinstance(base, nn.Module):
        if get_adapter_config(base) is not None:
            raise CheckpointError("base= is already adapted; pass the pretrained model itself")
        model = base
    else:
        cls = model_class or _model_class(recorded_base.get("model_class"))
        config_file = source / "config.json"
        if "config" not in kwargs and config_file.is_file():
            from transformers import AutoConfig

            kwargs["config"] = AutoConfig.from_pretrained(source)
        model = cls.from_pretrained(base, **kwargs)
    adapter = _adapter_config(source, kind, record)
    if adapter is not None:
        apply_adapters(model, adapter)
    recorded = recorded_base.get("fingerprint")
    if recorded:
        why = compare_fingerprints(recorded, base_fingerprint(model))
        if why is not None:
            raise CheckpointError(f"the base model {_label(base)} is not the one {folder} was trained on "
                                  f"({RUN_RECORD}: base {recorded_base.get('name_or_path')!r}; {why})")
    elif adapter is not None:
        warnings.warn(f"{folder} has no {RUN_RECORD} with a base fingerprint: the base {_label(base)} cannot be "
                      "checked against the one the run used", stacklevel=2)
    if kind == "adapter":
        from .io import load_adapters

        load_adapters(model, source)
    else:
        _load_weights(model, source)
    for _, layer in adapter_layers(model):
        layer._norm_cache = None
    return model.eval()


def _label(base) -> str:
    return type(base).__name__ + " instance" if isinstance(base, nn.Module) else repr(str(base))


def _adapter_config(source: Path, kind: str, record: dict | None) -> AdapterConfig | None:
    if kind == "adapter":
        from .io import read_adapter_config

        return AdapterConfig.from_dict(read_adapter_config(source)["config"])
    if record is not None:
        return None if record.get("adapter") is None else AdapterConfig.from_dict(record["adapter"])
    config_file = source / "config.json"
    data = read_json(config_file) if config_file.is_file() else {}
    return AdapterConfig.from_dict(data[CONFIG_KEY]) if CONFIG_KEY in data else None


def _load_weights(model: nn.Module, source: Path) -> None:
    weights, _ = _weight_shapes(source)
    if weights.name == WEIGHTS_BIN:
        raise CheckpointError(f"{weights}: only safetensors checkpoints load here (save_safetensors=True)")
    files = [weights] if weights.suffix == ".safetensors" else [
        source / n for n in sorted(set(read_json(weights)["weight_map"].values()))]
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(read_safetensors(path)[0])
    unexpected, missing = _coverage(model, set(tensors))
    if unexpected:
        raise CheckpointError(f"{weights} holds tensors this model lacks (e.g. {unexpected[0]}): pass the "
                              "model_class and base the run used")
    if missing:
        raise CheckpointError(f"{weights} lacks {len(missing)} tensors the model trains (e.g. {missing[0]})")
    model.load_state_dict(tensors, strict=False)
