"""Run the small-data study (examples/study/plan.py), one process per cell, resumably.

    python examples/study/run_study.py                  # the whole study (~8-9 h on 2 CPU cores; resumable)
    python examples/study/run_study.py --quick          # ACP N=200, core arms, 2 seeds (~15 min)
    python examples/study/run_study.py --list           # the cells, in order, with done / to do
    python examples/study/run_study.py --only 'rt-n200/*' --max-hours 2
    python examples/study/run_study.py --device cuda    # on a GPU machine (results kept apart: results/study/cuda)
    python examples/study/run_study.py --smoke          # seconds; writes under runs/study_smoke (the tests')
    python examples/study/run_study.py --estimators     # the hypergradient comparison (~6 h; results/estimators)

A cell is done when ``RESULTS/<device>/<cell id>/cell.json`` exists (written last, next to the run's ``results.json``
and ``log.csv``): finished cells are skipped, so the same command picks up a killed study where it stopped. A cell
cut short resumes from its own checkpoints under ``WORK/runs/<cell id>`` (its wall time is then marked
``resumed``: the cost table leaves it out). Bulky outputs (checkpoints, adapters, data, the per-cell console log)
stay under WORK (default runs/study), which is not committed; RESULTS (default results/study) holds only the small
files and is meant to be committed as cells finish -- this program never runs git.

A cell that fails (run_glue.py's ``error:`` exit: a diverging run, bad input; killed by a signal that did not
come from this program, e.g. the OOM killer; its data or model could not be prepared) is recorded as failed
(``cell.json`` with ``"status": "failed"`` and the message) and the study goes on; ``--retry-failed`` runs those
again from scratch. A recorded cell whose plan flags differ from what plan.py gives now is ``stale`` and runs again
from scratch. Stop the study with Ctrl-C or ``kill PID``: the running cell stops too and resumes from its
checkpoints next time.

Cost: ``wall_s`` is the cell's process from start to exit (model loading, training, every evaluation), ``cpu_s``
its CPU time (user + system; about 2 × wall_s on 2 idle cores, less when something else shared them: the
report uses the ratio to flag cells whose wall time is inflated), ``peak_rss_bytes`` its peak resident memory
(``os.wait4``); on CUDA ``results.json`` also has the peak allocated GPU memory.

Exit status: 0 every selected cell is recorded done; 1 some are recorded failed; 2 bad command line; 3 stopped by
``--max-hours`` with cells left; 130 interrupted.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

import offline_packages  # noqa: E402
from grid import run_process  # noqa: E402
from plan import DEFAULTS, Cell, Study, build_study  # noqa: E402

from loralib.files import atomic_write_text, write_split  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ACP_FILE = "ACP_CancPPD_vs_Random.csv"


# ---------------------------------------------------------------------------------------------- data and models


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_quiet(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")


def prepare_data(cell: Cell, work: Path) -> Path:
    """Folder with ``train.csv`` / ``test.csv`` of ``cell`` (built once, reused by every arm).

    Rotten Tomatoes (and the smoke slice): the test split of seed 0 (``test_size`` snippets, fixed for the whole
    study), training movies drawn with the cell's seed (examples/demo/data.py ``--train-seed``), so the N = 200
    set of seed s is inside its N = 500 set. ACP: the seeded split of examples/bio/data.py (seed 0, 25% test,
    stratified: 619 / 207); N below 619 is a stratified sample of that train split drawn with the cell's seed.
    """
    ds, n, seed = cell.dataset, cell.size, cell.seed
    if ds.name in ("rt", "smoke"):
        out = work / "data" / ds.name / f"seed{seed}-n{n}"
        if not (out / "split.json").is_file():
            _run_quiet([sys.executable, str(ROOT / "examples/demo/data.py"), "rotten-tomatoes", "--out", str(out),
                        "--train", str(n), "--test", str(ds.test_size), "--seed", "0", "--train-seed", str(seed),
                        "--quiet"], f"building the Rotten Tomatoes data of {cell.id}")
        return out
    if ds.name == "acp":
        full = work / "data" / "acp" / "full"
        if not (full / "split.json").is_file():
            _run_quiet([sys.executable, str(ROOT / "examples/bio/data.py"), "modlamp", "--file", ACP_FILE,
                        "--out", str(full), "--seed", "0"], "building the ACP split")
        import pandas as pd
        from sklearn.model_selection import train_test_split

        train = pd.read_csv(full / "train.csv")
        if n == len(train):
            return full
        if n > len(train):
            raise ValueError(f"{cell.id}: ACP has {len(train)} training sequences, fewer than N = {n}")
        out = work / "data" / "acp" / f"seed{seed}-n{n}"
        if not (out / "split.json").is_file():
            part, _ = train_test_split(train, train_size=n, stratify=train["label"], random_state=seed)
            write_split(out, {"train.csv": part.to_csv(index=False, lineterminator="\n"),
                              "test.csv": (full / "test.csv").read_bytes().decode("utf-8")}, {
                "source": str(full), "train": n, "seed": seed, "scheme": "stratified sample of the full train split "
                "(scikit-learn train_test_split, random_state = seed)"})
        return out
    raise ValueError(f"no data for dataset {ds.name!r}")


def model_dir(cell: Cell, work: Path) -> Path:
    """The pretrained model's folder: MiniLM read in place from its package; AntiBERTy assembled once under WORK."""
    if cell.dataset.name in ("rt", "smoke"):
        return offline_packages.minilm_model_dir()
    folder = work / "models" / "antiberty"
    if not (folder / "tokenizer_config.json").is_file():
        _run_quiet([sys.executable, str(ROOT / "examples/bio/antiberty_folder.py"), str(folder)],
                   "assembling the AntiBERTy folder")
    return folder


# ---------------------------------------------------------------------------------------------------- one cell


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def cell_status(cell: Cell, results: Path) -> str:
    """``done``, ``failed``, ``stale`` (recorded with other plan flags than the plan gives now) or ``todo``."""
    record = results / cell.id / "cell.json"
    if not record.is_file():
        return "todo"
    saved = json.loads(record.read_text())
    flags = cell.flags()
    if "plan_flags" in saved:
        if saved["plan_flags"] != flags:
            return "stale"
    elif "command" in saved:  # records from before plan_flags: the plan's flags must be in the command, in order
        command = " ".join(saved["command"])
        if " ".join(flags) not in command:
            return "stale"
    return saved.get("status", "done")


def _relative(arg: str) -> str:
    path = Path(arg)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else arg


def _record(cell: Cell, device: str, **fields) -> dict:
    return {"cell": cell.id, "dataset": cell.dataset.name, "size": cell.size, "arm": cell.arm.name,
            "label": cell.arm.label, "method": cell.arm.method, "factor": cell.arm.factor, "level": cell.arm.level,
            "default_level": DEFAULTS.get(cell.arm.factor) if cell.arm.factor else None, "group": cell.group,
            "seed": cell.seed, "epochs": cell.epochs, "steps": cell.steps,
            "retrain_steps": cell.steps if cell.arm.retrain else 0, "plan_flags": cell.flags(), "device": device,
            "device_name": _device_name(device), "host": socket.gethostname(), "cpu_count": os.cpu_count(),
            "loralib_commit": _git_commit(), **fields}


def run_cell(cell: Cell, work: Path, results: Path, device: str, extra: list[str], fresh: bool = False) -> dict:
    """Run one cell to its end and record it; returns the record (``status`` done or failed).

    ``fresh``: start from scratch (a failed or stale cell run again) instead of resuming from the cell's own
    checkpoints. A run killed by a signal that did not come through this program (the OOM killer) is recorded as
    failed, like run_glue.py's error exit; data or model preparation errors too.

    Raises:
        KeyboardInterrupt: the study was interrupted (Ctrl-C, kill); nothing is recorded.
    """
    dest, out = results / cell.id, work / "runs" / cell.id
    try:
        data, model = prepare_data(cell, work), model_dir(cell, work)
    except (RuntimeError, ValueError, OSError) as err:
        record = _record(cell, device, status="failed", exit_code=None, error=f"error: preparing the cell: {err}")
        dest.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest / "cell.json", json.dumps(record, indent=2) + "\n")
        return record
    if fresh or (out / "results.json").is_file():  # (finished but never recorded: killed in between)
        shutil.rmtree(out, ignore_errors=True)
    resumed = any(out.glob("checkpoint-*")) or any(out.glob("retrain/checkpoint-*"))
    cmd = [sys.executable, str(ROOT / "examples/NLU/run_glue.py"), "--config", str(ROOT / cell.dataset.config),
           "--model_name_or_path", str(model), "--train_file", str(data / "train.csv"),
           "--test_file", str(data / "test.csv"), "--output_dir", str(out),
           "--use_cpu", "true" if device == "cpu" else "false", *cell.flags(), *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    console = out.parent / f"{out.name}.console.txt"
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(console, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        offset = log.tell()
        # Ctrl-C / kill: run_process stops run_glue.py, which keeps its checkpoints (the cell resumes next time)
        proc = run_process(cmd, stdout=log, env={**os.environ, **ENV}, cwd=ROOT)
    code = proc.code
    record = _record(
        cell, device, status="done" if code == 0 else "failed", exit_code=code, wall_s=round(proc.wall_s, 3),
        cpu_s=round(proc.cpu_s, 3), peak_rss_bytes=proc.peak_rss_bytes,
        load_average_end=[round(x, 2) for x in os.getloadavg()], resumed=resumed, started=started,
        command=[_relative(c) for c in cmd[1:]],
        data_sha256={s: _sha256(data / f"{s}.csv") for s in ("train", "test")})
    dest.mkdir(parents=True, exist_ok=True)
    if code == 0:
        for name in ("results.json", "log.csv"):
            shutil.copyfile(out / name, dest / name)
    else:
        with open(console) as log:
            log.seek(offset)
            tail = log.read().strip().splitlines()  # this attempt's output only
        record["error"] = (f"error: run_glue.py was killed by signal {-code}" if code < 0 else
                           next((ln for ln in reversed(tail) if ln.startswith("error:")), "\n".join(tail[-5:])))
    atomic_write_text(dest / "cell.json", json.dumps(record, indent=2) + "\n")  # last: marks the cell recorded
    return record


# ---------------------------------------------------------------------------------------------------------- CLI


def select(study: Study, patterns: list[str] | None) -> list[Cell]:
    if not patterns:
        return study.cells
    cells = [c for c in study.cells if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
    if not cells:
        raise ValueError(f"--only {patterns}: no cell of the {study.name} study matches (see --list)")
    return cells


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


def _estimate(cell: Cell, seen: dict[tuple, list[float]]) -> float | None:
    times = seen.get((cell.dataset.name, cell.size, cell.arm.name))
    return sorted(times)[len(times) // 2] if times else None


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0], epilog=doc.split("\n", 2)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--quick", action="store_const", const="quick", dest="study", help="one size, 2 seeds")
    kind.add_argument("--estimators", action="store_const", const="estimators", dest="study",
                      help="the hypergradient comparison (plan.ESTIMATOR_COMPARISON; results/estimators)")
    kind.add_argument("--smoke", action="store_const", const="smoke", dest="study", help="seconds (the tests')")
    p.set_defaults(study="full")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..K-1 (default 5; --quick uses the first 2)")
    p.add_argument("--only", action="append", default=None, metavar="GLOB",
                   help="only cells whose id matches (e.g. 'rt-n200/*', '*/bidora/seed0'); repeatable")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--results", type=Path, default=None, help="committed small files: RESULTS/<device>/<cell>/ "
                   "(default results/study; --smoke: runs/study_smoke/results, never mixed with the study's)")
    p.add_argument("--work", type=Path, default=None,
                   help="bulky outputs (default runs/study; --smoke: runs/study_smoke/work)")
    p.add_argument("--max-hours", type=float, default=None, help="start no new cell after this many hours")
    p.add_argument("--retry-failed", action="store_true", help="run cells recorded as failed again")
    p.add_argument("--list", action="store_true", help="list the cells and their state; run nothing")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: more run_glue.py flags for every cell (e.g. -- --no_token_cache)")
    return p


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ctrl-C, and `kill PID` of a study started in the background (where the shell made it ignore SIGINT), stop
    # the running cell and the study the same way.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    smoke = ROOT / "runs" / "study_smoke"
    own = {"smoke": (smoke / "results", smoke / "work"),
           "estimators": (ROOT / "results" / "estimators", ROOT / "runs" / "estimators")}
    default_results, default_work = own.get(args.study, (ROOT / "results" / "study", ROOT / "runs" / "study"))
    args.results = args.results or default_results
    args.work = args.work or default_work
    try:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
        cells = select(build_study(args.study, range(args.seeds)), args.only)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
    results = args.results / args.device
    states = {c.id: cell_status(c, results) for c in cells}
    if args.list:
        for c in cells:
            print(f"{states[c.id]:7s} {c.id}  ({c.steps} steps{' + retrain' if c.arm.retrain else ''})")
        counts = {k: sum(s == k for s in states.values()) for k in ("done", "failed", "stale", "todo")}
        print(", ".join(f"{n} {k}" for k, n in counts.items()), file=sys.stderr)
        return 0
    try:
        return _run(cells, states, results, args, extra)
    except KeyboardInterrupt as stop:
        print(f"\ninterrupted{f': {stop}' if str(stop) else ''}; run the same command to go on", flush=True)
        return 130


def _run(cells: list[Cell], states: dict[str, str], results: Path, args, extra: list[str]) -> int:
    rerun = {"stale"} | ({"failed"} if args.retry_failed else set())
    todo = [c for c in cells if states[c.id] == "todo" or states[c.id] in rerun]
    stale = [c.id for c in cells if states[c.id] == "stale"]
    print(f"== study '{args.study}' on {args.device}: {len(cells)} cells, {len(cells) - len(todo)} already "
          f"recorded under {results}, {len(todo)} to run (bulky outputs: {args.work})", flush=True)
    if stale:
        print(f"note: {len(stale)} recorded cell(s) were run with other plan settings and run again: "
              f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}", flush=True)
    offline_packages.install_missing()
    seen: dict[tuple, list[float]] = {}
    for c in cells:
        record = results / c.id / "cell.json"
        if states[c.id] == "done" and record.is_file():
            r = json.loads(record.read_text())
            if not r.get("resumed") and r.get("wall_s"):
                seen.setdefault((c.dataset.name, c.size, c.arm.name), []).append(r["wall_s"])
    t_start = time.monotonic()
    for i, cell in enumerate(todo, 1):
        spent = time.monotonic() - t_start
        if args.max_hours is not None and spent > args.max_hours * 3600:
            print(f"stopping: --max-hours {args.max_hours} reached after {i - 1} cells; {len(todo) - i + 1} left "
                  "(run the same command to go on)", flush=True)
            return 3
        print(f"[{i}/{len(todo)}] {cell.id} ({cell.steps} steps{' + retrain' if cell.arm.retrain else ''}) ...",
              end=" ", flush=True)
        r = run_cell(cell, args.work, results, args.device, extra, fresh=states[cell.id] in rerun)
        if r.get("wall_s"):
            seen.setdefault((cell.dataset.name, cell.size, cell.arm.name), []).append(r["wall_s"])
        left = [_estimate(c, seen) for c in todo[i:]]
        known = [t for t in left if t is not None]
        eta = f", about {_fmt_s(sum(known))} for {len(known)} of the {len(left)} left" if known else ""
        if r["status"] == "failed":
            print(f"FAILED: {r['error']}", flush=True)
        else:
            test = json.loads((results / cell.id / "results.json").read_text())["eval"].get("test", {})
            score = ", ".join(f"{k} {v:.4f}" for k, v in list(test.items())[:1])
            print(f"done in {_fmt_s(r['wall_s'])} (test {score}){eta}", flush=True)
    failed = [c.id for c in cells if cell_status(c, results) == "failed"]
    if failed:
        print(f"{len(failed)} cell(s) recorded as failed (--retry-failed runs them again): {', '.join(failed)}")
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
