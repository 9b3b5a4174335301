"""``kill -9`` at every kill point of examples/NLU/run_glue.py, then the same command: the run ends as an
uninterrupted one, bitwise in the model (``adapter/``, ``snapshots/``), equal in ``results.json`` but for the
run-time fields (:data:`RUN_TIME_FIELDS`), byte for byte in every other file but :data:`NOT_COMPARED`.

A real SIGKILL (no ``finally``, no ``atexit``, files as the kernel has them), cheaply: torch, transformers and
run_glue are imported once (in the pytest process, which the rest of the suite needs them in anyway), a driver is
forked from it that runs the uninterrupted reference runs itself (which also warms every lazy import) and freezes its
heap (``gc.freeze``: the forks share it page for page and accelerate's ``gc.collect`` at each ``train()`` end skips
it). Then, in two worker processes (the two CPUs), for each kill point: fork a child that patches the code at that
moment to SIGKILL itself and runs ``run_glue.main(argv)``, fork a second child that runs the same argv unpatched (the
resume), compare the folder with the reference's. Every run writes ``--output_dir run`` relative to its own folder,
so results.json and run_config.json (which record output_dir) compare whole. One test per kill point reads the
verdicts of that one driver run. ``python tests/test_kill_points.py DIR [kill point ...]`` runs the driver alone
(logs of every run in DIR/logs), e.g. to look into one kill point.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NLU = ROOT / "examples" / "NLU"
TIMEOUT_S = 600
#: results.json fields that measure the process, not the run: the run's wall-clock seconds, the process's peak
#: memory (max RSS of whichever process wrote it), and in every history row the seconds that evaluation took.
RUN_TIME_FIELDS = ("wall_time_s", "peak_memory_bytes")
HISTORY_RUN_TIME_FIELDS = ("runtime",)
#: files compared by neither bytes nor tensors: log.csv (elapsed seconds; a resumed run may repeat rows) and
#: all_results.json (transformers' train_runtime / samples per second, and train_loss: the mean over the steps the
#: last train() call ran, i.e. over the resumed steps only, nan when it resumed at max_steps).
NOT_COMPARED = ("log.csv", "all_results.json")
TMP = re.compile(r"^\..+\.tmp$")  # loralib.files.atomic_write's temporary files, which a kill leaves

# The run: BiDoRA (darts) on the tiny RoBERTa and tiny SST-2 of tests/helpers.py. Search: 3 steps, a checkpoint
# after each (two kept: checkpoint-3 rotates checkpoint-1 out), evaluations at 2 and 3 on heldout / validation /
# test, snapshots at steps 2 and 5; retraining ("retrain"): 2 steps, checkpoints retrain/checkpoint-1 and -2, and
# (--retrain_eval_strategy no) one evaluation: run_glue's own of the final model, after train() returned.
# "select": no retraining, the model selected on heldout (selection.json / selection.safetensors in every
# checkpoint, written by a callback's on_save after the rotation).
COMMON = ["--task_name", "sst2", "--method", "bidora", "--max_steps", "3", "--per_device_train_batch_size", "8",
          "--per_device_eval_batch_size", "16", "--eval_steps", "2", "--save_steps", "1", "--logging_steps", "1",
          "--learning_rate", "1e-3", "--max_length", "32", "--seed", "0", "--no_token_cache", "--disable_tqdm",
          "true", "--snapshots", "2", "--lora_r", "4", "--lora_alpha", "8"]
CONFIGS = {"retrain": ["--retrain_max_steps", "2", "--retrain_eval_strategy", "no"], "select": []}


@dataclasses.dataclass(frozen=True)
class Moment:
    """A kill point: ``install(run)`` patches the code (in the forked child) so that it SIGKILLs itself there;
    ``check(run)`` says what is wrong with the folder the kill left (None: as intended), so that a kill point that
    moved in the code shows up; ``resumes``: the checkpoint the same command must resume from (None: the run's
    start, or the retraining phase's once search_state.json is written); ``finished``: the kill comes after
    results.json, so the same command refuses the finished run (exit status 1) after completing its clean-up."""

    name: str
    config: str
    install: Callable[[Path], None]
    check: Callable[[Path], str | None] = lambda run: None
    resumes: str | None = None
    finished: bool = False


# ---- in the forked child: kill at a moment ------------------------------------------------------------------------
def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name: str, when: Callable[..., bool], before: bool = False) -> None:
    """Replace ``owner.name`` (a function or method) by one that SIGKILLs the process before or after the original
    runs, on a call for which ``when(*args, **kwargs)`` holds."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if before and when(*args, **kwargs):
            die()
        result = original(*args, **kwargs)
        if not before and when(*args, **kwargs):
            die()
        return result

    setattr(owner, name, wrapper)


def relative(path, run: Path) -> str | None:
    try:
        return Path(path).resolve().relative_to(run.resolve()).as_posix()
    except ValueError:
        return None


def on_atomic_write(target: str, before: bool) -> Callable[[Path], None]:
    """Kill in loralib.files.atomic_write of ``run/target``: before the rename (the temporary file is complete, the
    target untouched) or right after it. Every atomic write of loralib and run_glue ends in ``os.replace``."""
    return lambda run: wrap(os, "replace", lambda src, dst, *a, **k: relative(dst, run) == target, before=before)


def on_trainer(cls: str, method: str, step: int, phase: str = "search", before: bool = False,
               also: Callable[..., bool] = lambda *a, **k: True) -> Callable[[Path], None]:
    """Kill in ``cls.method`` (a method of a Trainer) of the ``phase`` at ``state.global_step == step``."""

    def install(run: Path) -> None:
        owner = resolve(cls)

        def when(trainer, *args, **kwargs):
            return (trainer.state.global_step == step and trainer.retrain == (phase == "retrain")
                    and also(trainer, *args, **kwargs))

        wrap(owner, method, when, before=before)

    return install


def resolve(dotted: str):
    import importlib

    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def in_darts(call: int) -> Callable[[Path], None]:
    """Kill inside darts' central difference, before the second of its two gradient evaluations (θ is at θ − εv),
    on its ``call``-th gradient evaluation (two per upper step: 4 is upper step 2's second)."""

    def install(run: Path) -> None:
        from loralib.hypergradients import LowerProblem

        calls = iter(range(1, 1 << 30))
        wrap(LowerProblem, "first_order_grads", lambda *a, **k: next(calls) == call, before=True)

    return install


def in_evaluation(step: int, split: str, phase: str) -> Callable[[Path], None]:
    """Kill inside the Trainer's evaluation at ``step`` of ``phase``, before the split ``split`` is evaluated (the
    Trainer's evaluate() calls itself once per split)."""
    return on_trainer("transformers.Trainer", "evaluate", step, phase, before=True,
                      also=lambda t, *a, **k: k.get("metric_key_prefix") == f"eval_{split}")


def trainer_state_half_written(checkpoint: str) -> Callable[[Path], None]:
    """transformers writes trainer_state.json in place (not atomically): kill after half of it reached the disk."""

    def install(run: Path) -> None:
        from transformers.trainer_callback import TrainerState

        original = TrainerState.save_to_json

        def save_to_json(self, json_path):
            if relative(json_path, run) != f"{checkpoint}/trainer_state.json":
                return original(self, json_path)
            text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(text[: len(text) // 2])
                f.flush()  # into the kernel's hands, as a kill in the middle of the write leaves it
                die()

        TrainerState.save_to_json = save_to_json

    return install


def after_trainer_state(checkpoint: str) -> Callable[[Path], None]:
    def install(run: Path) -> None:
        from transformers.trainer_callback import TrainerState

        wrap(TrainerState, "save_to_json",
             lambda self, path: relative(path, run) == f"{checkpoint}/trainer_state.json")

    return install


def after_rotation(checkpoint: str) -> Callable[[Path], None]:
    """Kill right after transformers rotated old checkpoints out, once ``checkpoint`` is written (and, in a run that
    selects, before the SelectionCallback's on_save writes selection.safetensors / selection.json into it)."""

    def install(run: Path) -> None:
        import transformers.trainer

        wrap(transformers.trainer, "rotate_checkpoints",
             lambda output_dir=None, *a, **k: (run / checkpoint / "trainer_state.json").is_file())

    return install


def in_cleanup(run: Path) -> None:
    """Kill after the first folder that run_glue's final cleanup removes (results.json is written by then)."""
    wrap(shutil, "rmtree", lambda path, *a, **k: (run / "results.json").is_file())


# ---- what the kill left -------------------------------------------------------------------------------------------
def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not TMP.match(p.name)) if folder.is_dir() else []


def expect(**conditions: Callable[[Path], bool]) -> Callable[[Path], str | None]:
    """A check: every named condition holds of the run folder (the name says what is expected)."""

    def check(run: Path) -> str | None:
        failed = [name for name, condition in conditions.items() if not condition(run)]
        return f"the kill left {names(run)}: not {', '.join(failed)}" if failed else None

    return check


def has(*files: str) -> Callable[[Path], bool]:
    return lambda run: all((run / f).exists() for f in files)


def lacks(*files: str) -> Callable[[Path], bool]:
    return lambda run: not any((run / f).exists() for f in files)


def unparsable(file: str) -> Callable[[Path], bool]:
    def cut_short(run: Path) -> bool:
        try:
            json.loads((run / file).read_text())
        except (OSError, ValueError):
            return (run / file).is_file()
        return False

    return cut_short


def only(*files: str) -> Callable[[Path], bool]:
    return lambda run: names(run) == sorted(files)


def tmp_of(file: str) -> Callable[[Path], bool]:
    path = Path(file)
    return lambda run: any(p.name.startswith(f".{path.name}.") for p in (run / path.parent).glob(".*.tmp"))


C1, C2, C3, R1, R2 = "checkpoint-1", "checkpoint-2", "checkpoint-3", "retrain/checkpoint-1", "retrain/checkpoint-2"
MOMENTS = [
    # the output folder's first file
    Moment("run_config_half_written", "retrain", on_atomic_write("run_config.json", before=True),
           expect(only_its_temporary_file=only(), temporary=tmp_of("run_config.json"))),
    Moment("only_run_config", "retrain", on_atomic_write("run_config.json", before=False),
           expect(only_run_config=only("run_config.json"))),
    # the search phase, before its first checkpoint, in darts, after an upper step
    Moment("before_first_checkpoint", "retrain", on_trainer("loralib.BiDoRATrainer", "training_step", 0),
           expect(no_checkpoint=lambda run: not list(run.glob("checkpoint-*")), log=has("log.csv"))),
    Moment("inside_darts", "retrain", in_darts(4), expect(checkpoint_1=has(C1), no_2=lacks(C2)), resumes=C1),
    Moment("after_upper_step", "retrain", on_trainer("loralib.BiDoRATrainer", "upper_step", 2),
           expect(checkpoint_1=has(f"{C1}/trainer_state.json"), no_2=lacks(C2)), resumes=C1),
    # every stage of writing checkpoint-2 (its files in the order the Trainer writes them), then checkpoint-3's
    # rotation of checkpoint-1
    Moment("checkpoint_after_weights", "retrain",
           on_trainer("loralib.trainer_checkpoints.AdapterCheckpointMixin", "_save", 2),
           expect(weights=has(f"{C2}/model.safetensors"), no_optimizer=lacks(f"{C2}/optimizer.pt")), resumes=C1),
    Moment("checkpoint_after_optimizer", "retrain",
           on_trainer("transformers.Trainer", "_save_optimizer_and_scheduler", 2),
           expect(optimizer=has(f"{C2}/optimizer.pt", f"{C2}/scheduler.pt"),
                  no_bilevel_state=lacks(f"{C2}/bilevel_state.pt")), resumes=C1),
    Moment("checkpoint_after_bilevel_state", "retrain",
           on_trainer("loralib.BiDoRATrainer", "_save_optimizer_and_scheduler", 2),
           expect(bilevel_state=has(f"{C2}/bilevel_state.pt"), no_rng_state=lacks(f"{C2}/rng_state.pth")),
           resumes=C1),
    Moment("checkpoint_before_trainer_state", "retrain", on_trainer("transformers.Trainer", "_save_rng_state", 2),
           expect(rng_state=has(f"{C2}/rng_state.pth"), no_trainer_state=lacks(f"{C2}/trainer_state.json")),
           resumes=C1),
    Moment("checkpoint_trainer_state_half_written", "retrain", trainer_state_half_written(C2),
           expect(half_trainer_state=unparsable(f"{C2}/trainer_state.json")), resumes=C1),
    Moment("checkpoint_before_rotation", "retrain", after_trainer_state(C3),
           expect(trainer_state=has(f"{C3}/trainer_state.json"), not_rotated=has(C1)), resumes=C3),
    Moment("checkpoint_after_rotation", "retrain", after_rotation(C3),
           expect(trainer_state=has(f"{C3}/trainer_state.json"), rotated=lacks(C1)), resumes=C3),
    # snapshots (the base weights at the start, the adapter at step 2), an evaluation
    Moment("snapshot_base_weights_half_written", "retrain",
           on_atomic_write("snapshots/base_weights.safetensors", before=True),
           expect(temporary=tmp_of("snapshots/base_weights.safetensors"), no_checkpoint=lacks(C1))),
    Moment("snapshot_half_written", "retrain", on_atomic_write("snapshots/step_2/adapter_model.safetensors", False),
           expect(weights=has("snapshots/step_2/adapter_model.safetensors"),
                  no_config=lacks("snapshots/step_2/adapter_config.json")), resumes=C1),
    Moment("inside_evaluation", "retrain", in_evaluation(2, "validation", "search"),
           expect(checkpoint_1=has(C1), no_2=lacks(C2)), resumes=C1),
    # between the phases, the retraining phase
    Moment("search_adapter_half_written", "retrain",
           on_atomic_write("search_adapter/adapter_model.safetensors", before=False),
           expect(no_config=lacks("search_adapter/adapter_config.json", "search_state.json")), resumes=C3),
    Moment("search_state_half_written", "retrain", on_atomic_write("search_state.json", before=True),
           expect(search_adapter=has("search_adapter/adapter_config.json"), temporary=tmp_of("search_state.json"),
                  no_search_state=lacks("search_state.json")), resumes=C3),
    Moment("search_state_written", "retrain", on_atomic_write("search_state.json", before=False),
           expect(search_state=has("search_state.json"), no_retrain=lacks("retrain"))),
    Moment("retraining_first_step", "retrain",
           on_trainer("loralib.BiDoRATrainer", "training_step", 0, "retrain", before=True),
           expect(search_state=has("search_state.json"), no_checkpoint=lacks(R1))),
    Moment("retraining_middle", "retrain", on_trainer("loralib.BiDoRATrainer", "training_step", 1, "retrain"),
           expect(checkpoint_1=has(f"{R1}/trainer_state.json"), no_2=lacks(R2)), resumes=R1),
    Moment("retraining_checkpoint_after_weights", "retrain",
           on_trainer("loralib.trainer_checkpoints.AdapterCheckpointMixin", "_save", 2, "retrain"),
           expect(weights=has(f"{R2}/model.safetensors"), no_trainer_state=lacks(f"{R2}/trainer_state.json")),
           resumes=R1),
    Moment("inside_final_evaluation", "retrain", in_evaluation(2, "test", "retrain"),
           expect(checkpoint_2=has(f"{R2}/trainer_state.json"), no_adapter=lacks("adapter")), resumes=R2),
    # the end: adapter/, results.json, the cleanup
    Moment("adapter_half_written", "retrain", on_atomic_write("adapter/adapter_model.safetensors", before=False),
           expect(no_config=lacks("adapter/adapter_config.json", "results.json")), resumes=R2),
    Moment("all_results_half_written", "retrain", on_atomic_write("all_results.json", before=True),
           expect(adapter=has("adapter/README.md"), no_results=lacks("all_results.json", "results.json")), resumes=R2),
    Moment("results_half_written", "retrain", on_atomic_write("results.json", before=True),
           expect(temporary=tmp_of("results.json"), no_results=lacks("results.json")), resumes=R2),
    Moment("results_written", "retrain", on_atomic_write("results.json", before=False),
           expect(results=has("results.json", "search_state.json")), finished=True),
    Moment("inside_cleanup", "retrain", in_cleanup,
           expect(results=has("results.json", "search_state.json")), finished=True),
    # a run that selects on heldout: the SelectionCallback writes into each checkpoint after the rotation
    Moment("select_checkpoint_after_rotation", "select", after_rotation(C3),
           expect(rotated=lacks(C1), no_selection=lacks(f"{C3}/selection.json")), resumes=C2),
    Moment("select_between_selection_files", "select",
           on_atomic_write(f"{C2}/selection.safetensors", before=False),
           expect(weights=has(f"{C2}/selection.safetensors"), no_info=lacks(f"{C2}/selection.json")), resumes=C1),
    Moment("select_results_half_written", "select", on_atomic_write("results.json", before=True),
           expect(no_results=lacks("results.json"), checkpoint_3=has(f"{C3}/selection.json")), resumes=C3),
]


# ---- comparison with the uninterrupted run ------------------------------------------------------------------------
def timeless(results: dict) -> dict:
    kept = {k: v for k, v in results.items() if k not in RUN_TIME_FIELDS}
    kept["history"] = [{k: v for k, v in row.items() if k not in HISTORY_RUN_TIME_FIELDS} for row in
                       results["history"]]
    return kept


def differences(run: Path, reference: Path) -> list[str]:
    """What differs between the resumed run's folder and the uninterrupted one's: the files of each (but for the
    atomic writer's temporary files), safetensors tensor by tensor
    (bitwise) and metadata, results.json but for the run-time fields, every other file byte for byte but for
    :data:`NOT_COMPARED`."""
    from safetensors import safe_open

    def files(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not TMP.match(p.name)}

    found, expected = files(run), files(reference)
    problems = [f"{f}: not in the uninterrupted run" for f in sorted(found - expected)]
    problems += [f"{f}: missing" for f in sorted(expected - found)]
    for name in sorted(found & expected):
        a, b = run / name, reference / name
        if Path(name).name in NOT_COMPARED:
            continue
        if name.endswith(".safetensors"):
            with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
                if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
                    problems.append(f"{name}: other metadata or tensor names")
                    continue
                changed = [k for k in fb.keys() if not fa.get_tensor(k).equal(fb.get_tensor(k))]
            if changed:
                problems.append(f"{name}: tensors differ: {', '.join(sorted(changed)[:4])}")
        elif name == "results.json":
            got, want = timeless(json.loads(a.read_text())), timeless(json.loads(b.read_text()))
            changed = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            if changed:
                problems.append(f"results.json: {', '.join(changed)} differ: "
                                + "; ".join(f"{k}: {str(got.get(k))[:200]} vs {str(want.get(k))[:200]}"
                                            for k in changed[:2]))
        elif a.read_bytes() != b.read_bytes():
            problems.append(f"{name}: other bytes")
    return problems


# ---- the driver (a fork of the pytest process, or this file run as a script) -----------------------------------------
def run_forked(argv: list[str], log: Path, install: Callable[[], None] | None = None) -> int:
    """``run_glue.main(argv)`` in a forked child (after ``install()``), its output in ``log``: the exit status,
    -9 for a SIGKILL; 3: the patched run finished without being killed; 70: it raised."""
    import run_glue

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the driver
        def run() -> int:
            output_to(log)
            if install is not None:
                install()
            code = run_glue.main(argv)
            return 3 if install is not None and code == 0 else code

        exit_child(run)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def output_to(log: Path) -> None:
    """In a forked child: fd 1 and 2 and sys.stdout / sys.stderr (pytest's capture objects, in a fork of pytest)
    into ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)  # noqa: SIM115


def tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def judge(moment: Moment, argv: list[str], run: Path, reference: Path, logs: Path) -> dict:
    """Kill a run at ``moment``, run the same command again, compare the end with the uninterrupted ``reference``."""
    start = time.perf_counter()
    shutil.rmtree(run, ignore_errors=True)
    killed_log, resumed_log = logs / f"{moment.name}-killed.log", logs / f"{moment.name}-resumed.log"
    killed = run_forked(argv, killed_log, lambda: moment.install(run))
    problems = []
    if killed != -signal.SIGKILL:
        problems.append(f"the patched run ended with {killed}, not a SIGKILL:\n{tail(killed_log)}")
    elif (wrong := moment.check(run)) is not None:
        problems.append(wrong)
    left = names(run)
    resumed = run_forked(argv, resumed_log)
    if moment.finished:  # a finished run: the same command completes the clean-up the kill stopped, then refuses it
        said = resumed_log.read_text(errors="replace")
        if (resumed != 1 or "already holds a finished run" not in said
                or "its clean-up had been interrupted" not in said):
            problems.append(f"the same command ended with {resumed}, not a refusal of the finished run that "
                            f"completes its clean-up:\n{tail(resumed_log)}")
        problems += differences(run, reference)
    elif resumed != 0:
        problems.append(f"the same command ended with {resumed}:\n{tail(resumed_log)}")
    else:
        problems += differences(run, reference)
        said = [line for line in resumed_log.read_text(errors="replace").splitlines() if line.startswith("resuming")]
        want = "resuming the unfinished run in run" + (f" from run/{moment.resumes}" if moment.resumes else "")
        if said != [want]:  # a resume that restarts from scratch ends the same, at the cost of the whole run
            problems.append(f"the same command said {said}, not {[want]}")
    return {"killed": killed, "left": left, "resumed": resumed, "problems": problems,
            "seconds": round(time.perf_counter() - start, 2)}


def drive(work: Path, selected: set[str] | None = None, workers: int | None = None) -> dict:
    """The reference runs, then every kill point (or the ``selected`` ones) in ``workers`` forked processes (default:
    one per CPU, at most 2): the verdicts, by kill point.

    Every run writes ``--output_dir run`` relative to its worker's own folder, so that every results.json and
    run_config.json records the same output_dir. The tokenised data are loaded once (the reference run) and shared
    by every run (``run_glue.load_datasets`` memoised): they depend on the files only, which never change here."""
    began = time.perf_counter()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    torch.set_num_threads(1)  # never an OpenMP parallel region in a fork (a pool the parent started is not there)
    import run_glue

    from tests.helpers import write_task_files, write_tiny_roberta

    model = write_tiny_roberta(work / "model")
    data = write_task_files(work / "data", "sst2")
    argv = {name: [str(a) for a in ["--model_name_or_path", model, "--output_dir", "run", "--train_file", data["train"],
                                     "--validation_file", data["dev"], "--test_file", data["test"], *COMMON, *extra]]
            for name, extra in CONFIGS.items()}
    load_datasets, loaded = run_glue.load_datasets, {}

    def memoised(data_args, tokenizer):
        if "data" not in loaded:
            loaded["data"] = load_datasets(data_args, tokenizer)
        task, splits = loaded["data"]
        return task, dict(splits)

    run_glue.load_datasets = memoised
    print(f"imports and assets: {time.perf_counter() - began:.2f} s", flush=True)
    logs = work / "logs"
    logs.mkdir()
    moments = [m for m in MOMENTS if selected is None or m.name in selected]
    references = {}
    for name in sorted({m.config for m in moments}):  # in this process: also imports what the Trainer imports lazily
        start, folder = time.perf_counter(), work / f"reference-{name}"
        folder.mkdir()
        os.chdir(folder)
        with open(logs / f"reference-{name}.log", "w") as log, _redirected(log):
            code = run_glue.main(argv[name])
        if code != 0:
            raise RuntimeError(f"the uninterrupted {name} run failed:\n{tail(logs / f'reference-{name}.log')}")
        references[name] = folder / "run"
        print(f"reference {name}: {time.perf_counter() - start:.2f} s", flush=True)
    gc.collect()
    gc.freeze()  # the forks share this heap without copying it, and their gc.collect() skips it
    workers = workers or max(1, min(2, len(os.sched_getaffinity(0)), len(moments)))
    pids = []
    for worker in range(workers):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # a worker: every workers-th kill point, in its own folder; never returns into the driver
            exit_child(lambda worker=worker: _work(worker, moments[worker::workers], work, argv, references, logs))
        pids.append(pid)
    statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    if any(statuses):
        raise RuntimeError(f"a worker failed: exit statuses {statuses}")
    verdicts = {}
    for worker in range(workers):
        verdicts.update(json.loads((work / f"worker-{worker}" / "verdicts.json").read_text()))
    return verdicts


def exit_child(body) -> None:
    """In a forked child: run ``body()``, then leave with ``os._exit`` (its return value, 0 for None; a SystemExit's
    code; 70 after printing any other exception), so that the child never returns into its parent's code."""
    code = 70
    try:
        code = body() or 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 2
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _work(worker: int, moments, work: Path, argv: dict, references: dict, logs: Path) -> None:
    """A worker's kill points, one after another, in its own folder; writes its verdicts.json."""
    folder = work / f"worker-{worker}"
    folder.mkdir()
    os.chdir(folder)
    verdicts = {}
    for moment in moments:
        verdicts[moment.name] = judge(moment, argv[moment.config], folder / "run",
                                      references[moment.config], logs)
        print(f"{moment.name}: {verdicts[moment.name]['seconds']} s, "
              f"{len(verdicts[moment.name]['problems'])} problem(s)", flush=True)
    (folder / "verdicts.json").write_text(json.dumps(verdicts))
    times = os.times()
    print(f"worker {worker}: {len(verdicts)} kill points, {times.children_user + times.children_system:.1f}"
          " s of CPU in its runs", flush=True)


class _redirected:
    """fd 1 and 2 into ``log`` for the body (the Trainer and transformers print a lot)."""

    def __init__(self, log) -> None:
        self.log = log

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        os.dup2(self.log.fileno(), 1)
        os.dup2(self.log.fileno(), 2)

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)


# ---- the tests (the pytest process: starts the driver once, reads its verdicts) -------------------------------
@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict:
    """The driver, forked from this process once: it shares the imports of torch, transformers and run_glue that
    the rest of the suite makes anyway (tests/test_run_glue.py imports run_glue when collected)."""
    work = tmp_path_factory.mktemp("kill_points")
    import run_glue  # noqa: F401  (examples/NLU, pytest's pythonpath; before the fork: the driver and every run share it)

    log = work / "driver.log"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the driver: never returns into pytest
        def driver() -> None:
            os.setpgid(0, 0)  # its own process group: the runs it forks end with it on a timeout
            output_to(log)
            (work / "verdicts.json").write_text(json.dumps(drive(work)))

        exit_child(driver)
    deadline = time.monotonic() + TIMEOUT_S
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the kill-point driver ran past {TIMEOUT_S} s:\n{tail(log, 40)}")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(ended[1]) == 0, tail(log, 60)
    return json.loads((work / "verdicts.json").read_text())


@pytest.mark.parametrize("moment", MOMENTS, ids=[m.name for m in MOMENTS])
def test_sigkill_then_the_same_command_ends_as_the_uninterrupted_run(verdicts, moment):
    verdict = verdicts[moment.name]
    assert verdict["killed"] == -signal.SIGKILL and not verdict["problems"], (
        f"killed: {verdict['killed']}, the kill left {verdict['left']}, the same command: {verdict['resumed']}\n"
        + "\n".join(verdict["problems"]))


def test_every_moment_has_its_own_name():
    assert len({m.name for m in MOMENTS}) == len(MOMENTS) and {m.config for m in MOMENTS} <= set(CONFIGS)


if __name__ == "__main__":  # an entry point: the repository and examples/NLU, as pytest's pythonpath gives them
    sys.path[:0] = [str(ROOT), str(NLU)]
    folder, chosen = Path(sys.argv[1]), set(sys.argv[2:])
    if chosen - {m.name for m in MOMENTS}:
        sys.exit(f"unknown kill points: {sorted(chosen - {m.name for m in MOMENTS})}")
    results = drive(folder, chosen or None)
    (folder / "verdicts.json").write_text(json.dumps(results, indent=1))
