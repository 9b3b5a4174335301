"""One runner for method × seed grids: the per-method flags, defined once, and one training process per run.

Every example that compares methods over seeds (the demo, the protein runs, the GLUE scripts, the NER run, the
small-data study) goes through this file, so "what makes a baseline" is written in one place::

    python examples/grid.py examples/NLU/run_glue.py --out runs/demo/rotten_tomatoes \\
        --methods "lora dora bidora" --seeds "0 1 2" --protocol all-of-train --finished redo \\
        -- --config examples/demo/configs/minilm_rotten_tomatoes.yaml --model_name_or_path ... --train_file ...

runs ``RUNNER --method M --seed S --output_dir OUT/M/seedS <the method's flags> <everything after -->`` for each seed
(outer loop) and method (inner loop), so a grid stopped early has every method at the same seeds. What comes after
``--`` is given to every run and goes last, so it overrides the method's flags (argparse keeps the last value).
Without ``--methods`` the runner's config decides the method and runs go to ``OUT/seedS`` (the GLUE scripts).

Protocols (the per-method flags; ``method_flags``):

* ``all-of-train`` (the small-data protocol of the demo, the ACP run and the study; E2E): ft / LoRA / DoRA train on
  all of train (``--upper_fraction 0``, no retraining) and report the final model; BiDoRA searches on 80/20 and, with
  ``--retrain-steps``, retrains a fresh direction on all of train with the magnitudes frozen (the reported model).
  run_ner.py and run_clm.py have no retraining phase (``WITHOUT_RETRAINING``): their BiDoRA reports its searched model.
* ``held-out`` (the ESM-2 scripts, NER, SmolLM2): every method trains on the lower split and is selected on the held-out
  split (the runner's ``--upper_fraction``); BiDoRA retrains when ``--retrain-steps`` is given.

Finished runs (a ``results.json`` in the run's folder): ``--finished skip`` (default) leaves them (completing a
final clean-up that a kill interrupted: :func:`finish_interrupted_cleanup`), ``redo`` passes
``--overwrite_output_dir``, ``refuse`` passes nothing (the runner refuses them). The grid records each run's
settings (runner and flags) in ``<run folder>.grid.json`` when it starts it; a finished run whose recorded settings
differ from the ones asked for now is not skipped silently: the grid stops, naming the run and the flags that
differ, before running anything. An unfinished run resumes from its
checkpoints (the runners do that). ``--jobs N`` runs N processes at a time with ``OMP_NUM_THREADS=--threads`` each,
every run's output in ``<run folder>.log``. Exit status: 0 all runs finished; 1 a run failed (the grid stops at the
first failure with ``--jobs 1``; with more jobs, the running ones finish first); 2 bad command line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loralib.files import atomic_write_text

__all__ = ["ALL_OF_TRAIN", "METHODS", "PROTOCOLS", "WITHOUT_RETRAINING", "ProcessResult", "Run", "method_flags",
           "plan_grid", "run_grid", "run_process", "main"]

METHODS = ("ft", "lora", "dora", "bidora")
PROTOCOLS = ("all-of-train", "held-out")
# A baseline of the small-data protocol: no held-out split, no retraining phase (train on all of train, report the
# final model). The study's cells record these flags verbatim (cell.json "plan_flags"): keep their order.
ALL_OF_TRAIN = ("--upper_fraction", "0", "--retrain_max_steps", "0")
# The runners without BiDoRA's retraining phase (no --retrain_max_steps option): their baselines under all-of-train
# get only "--upper_fraction 0", and --retrain-steps is refused for them.
WITHOUT_RETRAINING = ("run_ner.py", "run_clm.py")


def method_flags(method: str, protocol: str = "all-of-train", *, steps: int | None = None,
                 search_steps: int | None = None, retrain_steps: int | None = None,
                 ft_lr: str | None = None, adapter_lr: str | None = None, retraining: bool = True) -> list[str]:
    """The runner flags that make ``method`` under ``protocol`` (the only place they are written).

    Args:
        method: ``ft``, ``lora``, ``dora`` or ``bidora``.
        protocol: ``all-of-train`` or ``held-out`` (module docstring).
        steps: ``--max_steps`` of every method (and of BiDoRA's search unless ``search_steps``); None: the config's.
        search_steps: BiDoRA's bi-level steps, when they differ from the baselines' ``steps``.
        retrain_steps: BiDoRA's retraining steps (``--retrain_max_steps``); None: the config's.
        ft_lr / adapter_lr: ``--learning_rate`` of full fine-tuning / of the adapter methods; None: the config's.
        retraining: the runner has BiDoRA's retraining phase (run_glue.py); False for run_ner.py and run_clm.py.

    Raises:
        ValueError: an unknown method or protocol; ``retrain_steps`` for a runner without retraining.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
    if retrain_steps is not None and not retraining:
        raise ValueError("--retrain-steps: this runner has no retraining phase (only run_glue.py has one)")
    flags: list[str] = []
    if method != "bidora" and protocol == "all-of-train":
        flags += ALL_OF_TRAIN if retraining else ALL_OF_TRAIN[:2]
    max_steps = search_steps if method == "bidora" and search_steps is not None else steps
    if max_steps is not None:
        flags += ["--max_steps", str(max_steps)]
    if method == "bidora" and retrain_steps is not None:
        flags += ["--retrain_max_steps", str(retrain_steps)]
    lr = ft_lr if method == "ft" else adapter_lr
    if lr is not None:
        flags += ["--learning_rate", str(lr)]
    return flags


@dataclass(frozen=True)
class Run:
    """One training process of a grid: ``method`` (None: the config's) at ``seed``, writing to ``out``."""

    method: str | None
    seed: int
    out: Path
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}" if self.method else f"seed {self.seed}"

    def command(self, python: Sequence[str], runner: str | Path, common: Sequence[str]) -> list[str]:
        head = ["--method", self.method] if self.method else []
        return [*python, str(runner), *head, "--seed", str(self.seed), "--output_dir", str(self.out),
                *self.flags, *common]


def plan_grid(out: str | Path, methods: Sequence[str] | None, seeds: Sequence[int], flags_of=None,
              once: Sequence[str] = (), order: str = "seed") -> list[Run]:
    """The runs of a grid: ``OUT/<method>/seed<k>`` (or ``OUT/seed<k>`` without methods).

    ``flags_of(method) -> list[str]``: the method's flags (default none). Methods in ``once`` run at the first seed
    only (e.g. evaluating the pretrained model). ``order``: ``seed`` (seed by seed, every method at each: a grid cut
    short has every method at the same seeds) or ``method`` (method by method in the given order, e.g. the slowest
    first so that parallel slots end together). Raises ValueError on an empty or repeated seed or method list.
    """
    out, seeds = Path(out), list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list without repeats, got {seeds}")
    if methods is not None and (not methods or len(set(methods)) != len(methods)):
        raise ValueError(f"methods must be a non-empty list without repeats, got {list(methods)}")
    if order not in ("seed", "method"):
        raise ValueError(f"order must be 'seed' or 'method', got {order!r}")
    pairs = ([(m, s) for s in seeds for m in methods or [None]] if order == "seed" else
             [(m, s) for m in methods or [None] for s in seeds])
    runs = []
    for method, seed in pairs:
        if method in once and seed != seeds[0]:
            continue
        folder = out / method / f"seed{seed}" if method else out / f"seed{seed}"
        runs.append(Run(method, seed, folder, tuple(flags_of(method) if flags_of and method else ())))
    return runs


@dataclass
class ProcessResult:
    """How a process ended: exit code (negative: killed by that signal), wall and CPU seconds, peak memory."""

    code: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int


def run_process(cmd: Sequence[str], *, stdout=None, env: dict | None = None, cwd: str | Path | None = None
                ) -> ProcessResult:
    """Run ``cmd`` to its end and measure it (``os.wait4``: the child's own CPU time and peak resident memory).

    ``stdout``: an open file for the process's stdout and stderr (default: this process's). On KeyboardInterrupt
    (Ctrl-C, or SIGTERM turned into one by ``main``) the child is terminated and waited for (the runners keep their
    checkpoints, so the same command resumes), then the interrupt goes on.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdout=stdout, stderr=subprocess.STDOUT if stdout else None, env=env, cwd=cwd)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    return ProcessResult(os.waitstatus_to_exitcode(status), time.monotonic() - t0, usage.ru_utime + usage.ru_stime,
                         usage.ru_maxrss * 1024)


def _finished(run: Run) -> bool:
    return (run.out / "results.json").is_file()


#: what the runners' final clean-up removes from a finished run's folder (glob patterns): the resume state
#: (run_glue: checkpoints, retrain/, search_adapter/, search_state.json; run_ner / run_clm: checkpoints)
FINAL_CLEANUP = ("checkpoint-*", "retrain", "search_adapter", "search_state.json")


def finish_interrupted_cleanup(out: Path, patterns: Sequence[str] = FINAL_CLEANUP) -> list[str]:
    """Complete the final clean-up of the finished run in ``out`` (``results.json``) that a kill stopped half-way:
    remove what matches ``patterns``, unless the run's ``run_config.json`` records ``keep_checkpoints`` true (or is
    missing or unreadable: then nothing is removed). Returns the names removed (empty for an unfinished run)."""
    if not (out / "results.json").is_file():
        return []
    try:
        keep = json.loads((out / "run_config.json").read_text(encoding="utf-8")).get("keep_checkpoints", True)
    except (OSError, ValueError, AttributeError):
        keep = True
    # ignore_errors: under torchrun every process meets the finished run and removes the same paths
    return remove_matching(out, patterns, ignore_errors=True) if keep is False else []


def remove_matching(folder: Path, patterns: Sequence[str], ignore_errors: bool = False) -> list[str]:
    """Remove every file and folder in ``folder`` that matches one of the glob ``patterns``; their names, sorted."""
    paths = sorted({path for pattern in patterns for path in folder.glob(pattern)})
    for path in paths:
        shutil.rmtree(path, ignore_errors=ignore_errors) if path.is_dir() else path.unlink(missing_ok=ignore_errors)
    return [path.name for path in paths]


def _record(run: Run) -> Path:
    """Where the grid records the settings a run was started with: beside its folder (the runners refuse folders
    holding files they did not write)."""
    return run.out.parent / f"{run.out.name}.grid.json"


def _settings(run: Run, runner: str | Path, common: Sequence[str]) -> list[str]:
    """What makes a run's result: the runner's name and every flag (not the interpreter, not an overwrite)."""
    return [Path(runner).name, *(a for a in run.command([], runner, common)[1:] if a != "--overwrite_output_dir")]


def stale_finished_runs(runs: Sequence[Run], runner: str | Path, common: Sequence[str]) -> list[str]:
    """Sentences naming each finished run whose recorded settings differ from what it would be run with now."""
    problems = []
    for run in runs:
        record = _record(run)
        if not (_finished(run) and record.is_file()):
            continue
        before, now = json.loads(record.read_text())["settings"], _settings(run, runner, common)
        if before != now:
            gone = [a for a in before if a not in now]
            new = [a for a in now if a not in before]
            problems.append(f"{run.name}: the finished run in {run.out} was made with other settings ({record}): "
                            f"then {shlex.join(gone) or '(nothing else)'}, now {shlex.join(new) or '(nothing else)'}")
    return problems


def run_grid(runs: Sequence[Run], runner: str | Path, common: Sequence[str], *, python: Sequence[str] = (),
             finished: str = "skip", jobs: int = 1, threads: int | None = None, dry_run: bool = False,
             env: dict | None = None, log=print) -> int:
    """Run ``runs`` (``plan_grid``) with ``runner``; returns 0, or 1 when a run failed (see the module docstring)."""
    python = list(python) or [sys.executable]
    env = {**os.environ, **(env or {})}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if "--overwrite_output_dir" in common:  # asked of the runner directly: nothing finished is skipped
        finished = "redo"
    if finished == "skip":  # a finished run is kept only if it was made with the settings asked for now
        stale = stale_finished_runs(runs, runner, common)
        if stale:
            log("error: " + "\n  ".join(["finished runs would be kept although their settings differ:", *stale])
                + "\n(OVERWRITE=1 in the scripts, --finished redo here, redoes them; or choose another output folder)")
            return 1
    todo = []
    for run in runs:
        if _finished(run) and finished == "skip":
            unrecorded = "" if _record(run).is_file() else " (started before grid.py recorded settings: not compared)"
            log(f"skip {run.name}: {run.out / 'results.json'} exists{unrecorded} (OVERWRITE=1 / --finished redo "
                "to redo)")
            if not dry_run and (removed := finish_interrupted_cleanup(run.out)):
                log(f"  its final clean-up had been interrupted: removed {', '.join(removed)}")
            continue
        todo.append(run)
    redo = ["--overwrite_output_dir"] if finished == "redo" and "--overwrite_output_dir" not in common else []
    commands = [(run, run.command(python, runner, [*common, *redo])) for run in todo]
    if dry_run:  # the commands on stdout (what a user pipes or reads), the rest on the log
        for _, cmd in commands:
            print("[dry run] " + shlex.join(cmd), flush=True)
        return 0
    for run, _ in commands:
        run.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_record(run), json.dumps({"settings": _settings(run, runner, common)}, indent=1))
    if jobs <= 1:
        for run, cmd in commands:
            log(f"-- {run.name}")
            result = run_process(cmd, env=env)
            if result.code != 0:
                log(f"-- {run.name}: FAILED (exit {result.code})")
                return 1
        return 0
    return _run_parallel(commands, jobs, env, log)


def _run_parallel(commands, jobs: int, env: dict, log) -> int:
    waiting, running, failed = list(commands), {}, []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                run, cmd = waiting.pop(0)  # (its folder's parent exists: run_grid wrote its record there)
                logfile = open(run.out.parent / f"{run.out.name}.log", "a")  # noqa: SIM115 (closed when it ends)
                logfile.write(f"$ {shlex.join(cmd)}\n")
                logfile.flush()
                running[subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env)] = (run, logfile)
                log(f"-- {run.name}: started (log: {logfile.name})")
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                run, logfile = running.pop(proc)
                logfile.close()
                if proc.returncode == 0:
                    log(f"-- {run.name}: finished")
                else:
                    failed.append(run.name)
                    log(f"-- {run.name}: FAILED (exit {proc.returncode}; see {logfile.name})")
                    waiting.clear()  # let the running ones finish, start nothing new
    except KeyboardInterrupt:
        for proc, (_, logfile) in running.items():
            proc.terminate()
            proc.wait()
            logfile.close()
        raise
    return 1 if failed else 0


def _words(text: str, what: str) -> list[str]:
    words = text.replace(",", " ").split()
    if not words:
        raise ValueError(f"{what} is empty")
    return words


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0], epilog=doc.split("\n", 2)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runner", type=Path, help="the training script (examples/NLU/run_glue.py, examples/NER/run_ner.py, "
                   "examples/NLG/run_clm.py)")
    p.add_argument("--out", type=Path, required=True, help="runs go to OUT/<method>/seed<k> (OUT/seed<k> without "
                   "--methods)")
    p.add_argument("--methods", default=None, help="space- or comma-separated: ft lora dora bidora (default: the "
                   "config's method, one per seed)")
    p.add_argument("--seeds", default="0", help="space- or comma-separated seeds (default 0)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="all-of-train",
                   help="all-of-train: baselines on all of train, final model; held-out: every method selected on "
                   "the held-out split (default all-of-train; see below)")
    p.add_argument("--steps", type=int, default=None, help="--max_steps of every run (default: the config's)")
    p.add_argument("--search-steps", type=int, default=None, help="BiDoRA's bi-level steps (default: --steps)")
    p.add_argument("--retrain-steps", type=int, default=None, help="BiDoRA's retraining steps (default: the "
                   "config's)")
    p.add_argument("--ft-lr", default=None, help="learning rate of full fine-tuning (default: the config's)")
    p.add_argument("--adapter-lr", default=None, help="learning rate of the adapter methods (default: the config's)")
    p.add_argument("--order", choices=("seed", "method"), default="seed",
                   help="seed by seed (default) or method by method (in --methods order)")
    p.add_argument("--once", default="", help="methods run at the first seed only (e.g. 'base')")
    p.add_argument("--finished", choices=("skip", "redo", "refuse"), default="skip",
                   help="what to do with a run that has results.json (default skip)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run (default: inherited)")
    p.add_argument("--python", default=None, help="interpreter command (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.epilog = (p.epilog or "") + "\nEverything after a lone -- goes to every run (last, so it overrides)."
    return p


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, common = build_parser().parse_args(argv[:cut]), argv[cut + 1:]
    try:
        words = _words(args.seeds, "--seeds")
        if not all(w.lstrip("-").isdigit() for w in words):
            raise ValueError(f"--seeds takes whole numbers, got {args.seeds!r}")
        seeds = [int(w) for w in words]
        methods = _words(args.methods, "--methods") if args.methods is not None else None
        once = args.once.replace(",", " ").split()
        if once and not set(once) <= set(methods or []):
            raise ValueError(f"--once {' '.join(once)}: every such method must also be in --methods")
        for name in ("steps", "search_steps", "retrain_steps", "threads"):
            if getattr(args, name) is not None and getattr(args, name) < (0 if name == "retrain_steps" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        reserved = {"--seed", "--output_dir"} | ({"--method"} if methods else set())
        clash = sorted(reserved & {a.split("=")[0] for a in common})
        if clash:
            raise ValueError(f"{', '.join(clash)} after -- would override every run's own value: use --seeds / --out"
                             f"{' / --methods' if methods else ''} instead")
        retraining = args.runner.name not in WITHOUT_RETRAINING
        known = [m for m in (methods or []) if m not in once]
        for m in known:  # validates
            method_flags(m, args.protocol, retrain_steps=args.retrain_steps, retraining=retraining)
        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        if not args.runner.is_file():
            raise ValueError(f"runner {args.runner} is not a file")

        def flags_of(method: str) -> list[str]:
            if method in once:
                return []
            return method_flags(method, args.protocol, steps=args.steps, search_steps=args.search_steps,
                                retrain_steps=args.retrain_steps, ft_lr=args.ft_lr, adapter_lr=args.adapter_lr,
                                retraining=retraining)

        runs = plan_grid(args.out, methods, seeds, flags_of, once, args.order)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    python = shlex.split(args.python) if args.python else [sys.executable]
    if shutil.which(python[0]) is None:
        print(f"error: --python {args.python!r}: no such interpreter", file=sys.stderr)
        return 2
    try:
        return run_grid(runs, args.runner, common, python=python, finished=args.finished, jobs=args.jobs,
                        threads=args.threads, dry_run=args.dry_run, log=lambda m: print(m, file=sys.stderr,
                                                                                        flush=True))
    except KeyboardInterrupt as stop:
        print(f"\ninterrupted{f': {stop}' if str(stop) else ''}; the same command resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
