"""The small-data study's cells: which datasets, train sizes, arms and seeds, in which order, with which settings.

A *cell* is one training run: (dataset, train size, arm, seed). Every cell runs ``examples/NLU/run_glue.py`` in its
own process (run_study.py); this file only decides what each cell is. Nothing here reads the test split or picks a
setting from results: the settings are the demo's and the protein run's configs, the schedule below, and the
one-factor changes of the sensitivity arms.

Schedule: ``steps = ceil(epochs × N / batch)`` lower-level steps for every arm of a (dataset, N), 10 epochs at the
smallest size and fewer at larger ones; BiDoRA's retraining phase adds the same number of steps on all N (counted
separately in its cost). The arms that select on held-out data (``dora_es``, the BiDoRA arms) evaluate the held-out
split and the test split once per epoch of N (the test numbers at every step are what the search-only row reads at
the held-out-best step; nothing is selected on them); the retraining phase and LoRA and DoRA evaluate test once, at
the end. The report subtracts these test evaluations from the cost (``runtime`` in results.json's history).

Arms:

* ``lora``, ``dora``: train on all N, report the final model.
* ``dora_es``: the early-stopping control: DoRA trained on the same 80% and selected on the same held-out 20% that
  BiDoRA's search uses (``split_indices`` seeded by the training seed), reporting the held-out-best step.
* ``bidora``: the bi-level search on 80/20, then retraining on all N with the magnitudes frozen (the reported
  model); the same run gives the "search only" row (the held-out-best search step, utils/report.py).
* sensitivity (one factor at a time around ``bidora``, at one size): upper split fraction, upper learning rate,
  hypergradient, unroll steps, orthogonality weight. Retraining on/off is ``bidora`` against its search-only row.
* confirmation: one sensitivity arm run again on data it was not chosen on (``CONFIRMATION``, below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from grid import ALL_OF_TRAIN, method_flags  # examples/grid.py: the per-method flags of every example

ROOT = Path(__file__).resolve().parents[2]

# Neumann series step size for the sensitivity arm: the series converges on the Hessian's positive eigenvalues only
# for α < 2 / λ_max. Measured with examples/study/hypergradient_size.py (results/study/hypergradient_size.json) on
# this setting (MiniLM, Rotten Tomatoes N = 200, seed 0): λ_max of the lower loss's Hessian in the direction
# parameters on a batch of 16 is 3.4 at step 40 and 20.8 at step 125 (it grows as training sharpens; 2.5 at step 2
# in a trial run), so α = 0.05 ≈ 1 / λ_max at the end keeps every step inside 2 / λ_max. (The Hessian also has small
# negative eigenvalues, -0.041 and -0.0074 in eval mode; in training mode, with the step's dropout masks,
# hypergradient_probe.json measures -0.76 and -1.84: on those directions no step size converges; 3 terms bound the
# growth.)
NEUMANN_ALPHA = 0.05
NEUMANN_ITERATIONS = 3


@dataclass(frozen=True)
class Dataset:
    """A pretrained model on a task, with the train sizes of the learning curve.

    Attributes:
        name: short id used in cell ids and folders (``rt``, ``acp``, ``smoke``).
        title: for tables and figures.
        config: run_glue.py YAML defaults (model-independent settings), relative to the repository root.
        epochs: {train size N: epochs}; ``"all"`` as a size is not allowed: give the number.
        test_size: rows of the fixed test split.
        batch: lower-level batch size (also the config's).
    """

    name: str
    title: str
    config: str
    epochs: dict[int, int]
    test_size: int
    batch: int = 16

    def settings(self) -> dict:
        return yaml.safe_load((ROOT / self.config).read_text())


@dataclass(frozen=True)
class Arm:
    """One way of training: a method and the run_glue.py flags that make it.

    ``factor`` / ``level`` name a sensitivity arm's one changed setting (``None`` for the core arms); ``flags`` may
    hold ``{lr}`` placeholders (the config's learning rate, for "× the lower learning rate").
    """

    name: str
    label: str
    method: str
    flags: tuple[str, ...] = ()
    factor: str | None = None
    level: str | None = None
    retrain: bool = False
    selection: str = "final"  # final | heldout
    upper_fraction: float = 0.0


RT = Dataset("rt", "all-MiniLM-L6-v2 on Rotten Tomatoes", "examples/demo/configs/minilm_rotten_tomatoes.yaml",
             {200: 10, 500: 6, 1000: 4, 2000: 3}, test_size=1000)
ACP = Dataset("acp", "AntiBERTy on modlAMP ACP vs random", "examples/bio/configs/antiberty_acp.yaml",
              {200: 10, 619: 5}, test_size=207)
# A few seconds per cell: the real MiniLM on a sliver of the real data (the test suite's smoke variant).
SMOKE = Dataset("smoke", "smoke (MiniLM, tiny Rotten Tomatoes slice)", RT.config, {48: 2}, test_size=32, batch=8)
DATASETS = {d.name: d for d in (RT, ACP, SMOKE)}

_BASELINE = (*ALL_OF_TRAIN, "--eval_strategy", "no")  # all of train, final model, no periodic evaluation
LORA = Arm("lora", "LoRA", "lora", _BASELINE)
DORA = Arm("dora", "DoRA", "dora", _BASELINE)
DORA_ES = Arm("dora_es", "DoRA, early-stopped on held-out 20%", "dora",
              ("--upper_fraction", "0.2", "--retrain_max_steps", "0"), selection="heldout", upper_fraction=0.2)
BIDORA = Arm("bidora", "BiDoRA (retrained)", "bidora", ("--upper_fraction", "0.2"), retrain=True,
             upper_fraction=0.2)
CORE_ARMS = (LORA, DORA, DORA_ES, BIDORA)

# The default of each factor is what BIDORA runs (the demo config): upper_fraction 0.2, upper lr = lower lr,
# darts, unroll 1, orth_reg 1e-5.
DEFAULTS = {"upper_fraction": "0.2", "upper_lr": "x1", "hypergradient": "darts", "unroll_steps": "1",
            "orth_reg": "1e-05", "retrain": "on"}


def _sensitivity(factor: str, level: str, *flags: str, upper_fraction: float = 0.2) -> Arm:
    return Arm(f"bidora-{factor}={level}", f"BiDoRA, {factor} = {level}", "bidora",
               ("--upper_fraction", str(upper_fraction), *flags), factor, level, retrain=True,
               upper_fraction=upper_fraction)


# Run order inside each seed: the settings that seed 0-1 showed to move the result first (the upper learning rate
# scales the magnitudes' shift tenfold), the orthogonality weights (identical predictions at 0, 1e-5 and 1e-3 on
# seeds 0-1) last, so that a study cut short by its budget loses the least informative cells. Order only: no
# cell's settings depend on it.
SENSITIVITY_ARMS = (
    _sensitivity("upper_lr", "x10", "--upper_learning_rate", "{lr_x10}"),
    _sensitivity("upper_lr", "x0.1", "--upper_learning_rate", "{lr_tenth}"),
    _sensitivity("hypergradient", "first_order", "--hypergradient", "first_order"),
    _sensitivity("upper_fraction", "0.3", upper_fraction=0.3),
    _sensitivity("upper_fraction", "0.5", upper_fraction=0.5),
    _sensitivity("unroll_steps", "5", "--unroll_steps", "5"),
    _sensitivity("hypergradient", "neumann", "--hypergradient", "neumann", "--neumann_alpha", str(NEUMANN_ALPHA),
                 "--neumann_iterations", str(NEUMANN_ITERATIONS)),
    _sensitivity("orth_reg", "0", "--orth_reg", "0"),
    _sensitivity("orth_reg", "1e-03", "--orth_reg", "0.001"),
)
ARMS = {a.name: a for a in (*CORE_ARMS, *SENSITIVITY_ARMS)}

# Confirmation, stated on 2026-12-01 before any of its cells ran. The sensitivity arms at Rotten Tomatoes N = 200
# left one hypothesis: an upper learning rate 10x the lower one beats the default BiDoRA (+1.58 points, higher on all
# 5 seeds, but Holm p = 0.5 as the best of nine arms scored on one test set). It is tested once, on a dataset and
# model it was not picked on: AntiBERTy on ACP at N = 200, 5 seeds, each paired with the default BiDoRA cell of the
# same seed (recorded in the curve). Test: one-sided Wilcoxon signed-rank (x10 > default), alpha = 0.05; with 5
# pairs that means higher on every seed (p = 1/32). Against DoRA it is reported, not tested. Nothing else about the
# arm changes. It runs before N = 2000, which does not fit the 9-hour budget.
CONFIRMATION = (ACP, 200, (ARMS["bidora-upper_lr=x10"],))

# The estimator comparison (issue 19, item 5), stated on 2026-12-02 before any of its cells ran: does a hypergradient
# closer to the implicit one change the answer? SAMA (the one-step Adam Jacobian on the Trainer's AdamW state) and
# damped_solve (a warm-started solve of (H + delta I) z = v) against darts, first_order and DoRA of the same seeds,
# at Rotten Tomatoes N = 200 and ACP N = 200, every cell run again at one commit (kept apart under
# results/estimators, so the study's recorded cells stay as they were). delta = 4 is taken from the probe
# (assets/study/hypergradient_probe.md): twice the most negative eigenvalue of the training-mode lower Hessian
# measured at step 125 (2 x 1.84 = 3.7, rounded up), so that H + delta I is positive definite on that run; it is
# not tuned on any result. An estimator "wins" only if its 95% paired bootstrap interval against DoRA and against
# darts excludes 0 on both datasets. Order: seed by seed, the cheap DoRA cell first, so a comparison cut short has
# every arm at the same seeds.
DAMPED_SOLVE_DAMPING = 4.0
ESTIMATOR_ARMS = (
    _sensitivity("hypergradient", "sama", "--hypergradient", "sama"),
    _sensitivity("hypergradient", "damped_solve", "--hypergradient", "damped_solve", "--damped_solve_damping",
                 f"{DAMPED_SOLVE_DAMPING:g}"),
)
ARMS.update({a.name: a for a in ESTIMATOR_ARMS})
ESTIMATOR_COMPARISON = (
    (RT, 200, (DORA, BIDORA, *ESTIMATOR_ARMS, ARMS["bidora-hypergradient=first_order"])),
    (ACP, 200, (DORA, BIDORA, *ESTIMATOR_ARMS, ARMS["bidora-hypergradient=first_order"])),
)


@dataclass(frozen=True)
class Cell:
    """One run: ``dataset`` trained on ``size`` examples with ``arm`` and ``seed``."""

    dataset: Dataset
    size: int
    arm: Arm
    seed: int
    group: str = "curve"  # curve | sensitivity | confirmation | estimators

    @property
    def id(self) -> str:
        return f"{self.dataset.name}-n{self.size}/{self.arm.name}/seed{self.seed}"

    @property
    def epochs(self) -> int:
        return self.dataset.epochs[self.size]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.size / self.dataset.batch)

    @property
    def steps(self) -> int:
        return math.ceil(self.epochs * self.size / self.dataset.batch)

    def flags(self) -> list[str]:
        """run_glue.py flags of this cell (model, data, output folder and device are the runner's)."""
        lr = float(self.dataset.settings()["learning_rate"])
        arm_flags = [f.format(lr_tenth=f"{lr * 0.1:g}", lr_x10=f"{lr * 10:g}") for f in self.arm.flags]
        flags = ["--method", self.arm.method, "--seed", str(self.seed), "--max_steps", str(self.steps),
                 "--per_device_train_batch_size", str(self.dataset.batch),
                 "--eval_steps", str(self.steps_per_epoch), "--save_steps", str(self.steps_per_epoch),
                 "--logging_steps", str(self.steps_per_epoch), "--snapshots", "0", "--disable_tqdm", "true",
                 "--report_to", "none", *arm_flags]
        if self.arm.retrain:  # only the final retrained model is read: no test evaluations during retraining
            flags += [*method_flags("bidora", retrain_steps=self.steps), "--retrain_eval_strategy", "no"]
        if "--eval_strategy" not in arm_flags:
            flags += ["--eval_strategy", "steps"]
        return flags


@dataclass(frozen=True)
class Study:
    """An ordered list of cells (the order they run in) and what it was built from."""

    name: str
    cells: list[Cell] = field(default_factory=list)

    def __post_init__(self) -> None:
        ids = [c.id for c in self.cells]
        if len(set(ids)) != len(ids):
            raise ValueError(f"study {self.name!r} lists a cell twice")
        for c in self.cells:
            held_out = round(c.size * c.arm.upper_fraction)
            if c.arm.upper_fraction and held_out < c.dataset.batch:
                raise ValueError(f"{c.id}: {held_out} held-out examples is less than one batch ({c.dataset.batch})")


def _seed_major(dataset: Dataset, size: int, arms, seeds, group: str) -> list[Cell]:
    # seed by seed, so that a study stopped early has every arm at the same seeds
    return [Cell(dataset, size, arm, seed, group) for seed in seeds for arm in arms]


def build_study(name: str = "full", seeds=range(5)) -> Study:
    """The cells of ``full`` (the study), ``estimators`` (``ESTIMATOR_COMPARISON``, seed by seed), ``quick`` (one
    size, 2 seeds, the core arms; ≤ 15 min on 2 cores) or
    ``smoke`` (seconds; the test suite's), in the order they run.

    Order of ``full``: the core arms on Rotten Tomatoes at N = 200, on ACP at 200 and all 619, Rotten Tomatoes at
    500, then the sensitivity arms at Rotten Tomatoes N = 200 (the reviewers' question, and where BiDoRA and DoRA
    should differ most), then Rotten Tomatoes at 1000, then the confirmation of the sensitivity's one hypothesis
    (``CONFIRMATION``), then N = 2000 if the budget allows.

    Raises:
        ValueError: an unknown study name.
    """
    seeds = list(seeds)
    if name == "full":
        cells = (_seed_major(RT, 200, CORE_ARMS, seeds, "curve") + _seed_major(ACP, 200, CORE_ARMS, seeds, "curve")
                 + _seed_major(ACP, 619, CORE_ARMS, seeds, "curve") + _seed_major(RT, 500, CORE_ARMS, seeds, "curve")
                 + _seed_major(RT, 200, SENSITIVITY_ARMS, seeds, "sensitivity")
                 + _seed_major(RT, 1000, CORE_ARMS, seeds, "curve")
                 + _seed_major(*CONFIRMATION, seeds, "confirmation")
                 + _seed_major(RT, 2000, CORE_ARMS, seeds, "curve"))
    elif name == "estimators":
        cells = [Cell(dataset, size, arm, seed, "estimators") for seed in seeds
                 for dataset, size, arms in ESTIMATOR_COMPARISON for arm in arms]
    elif name == "quick":
        cells = _seed_major(ACP, 200, CORE_ARMS, seeds[:2], "curve")
    elif name == "smoke":
        cells = _seed_major(SMOKE, 48, CORE_ARMS, seeds[:1], "curve") + _seed_major(
            SMOKE, 48, [ARMS["bidora-hypergradient=first_order"]], seeds[:1], "sensitivity")
    else:
        raise ValueError(f"unknown study {name!r}: full, estimators, quick or smoke")
    return Study(name, cells)
