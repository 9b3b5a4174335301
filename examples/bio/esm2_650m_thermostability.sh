#!/usr/bin/env bash
# Table 4 of the BiDoRA paper, thermostability (binary classification of proteins), ESM-2 650M, LoRA/DoRA/BiDoRA
# (and ft with METHODS="ft lora dora bidora"), 5 seeds, then utils/report.py. Inputs and options: see
# examples/bio/esm2_table4_common.sh and examples/bio/README.md. Smaller backbone: ESM_SIZE=8M|35M|150M|650M|3B.
set -euo pipefail
TASK_KEY=thermostability
TASK_TITLE="thermostability (protein classification)"
DEFAULT_EPOCHS=3
MAX_LENGTH=1024
EXTRA_METRICS=precision_weighted,recall_weighted,f1_weighted
DATA_HELP="Data: the paper reports thermostability with ESM-2 but does not ship the files, and none are bundled here
(nothing of it installs offline). Bring a labelled protein thermostability set (e.g. a binarised Meltome/FLIP
split: label 1 = thermostable) as train.csv/test.csv with columns sequence,label (labels 0/1, one-letter residues).
examples/bio/data.py csv --file all.csv --out DIR makes a seeded, de-duplicated split from a single file."
# shellcheck source=examples/bio/esm2_table4_common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/esm2_table4_common.sh"
esm2_table4_main "$@"
