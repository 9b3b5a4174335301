#!/usr/bin/env bash
# Table 4 of the BiDoRA paper, blood-brain barrier peptides (BBP, binary classification), ESM-2 650M,
# LoRA/DoRA/BiDoRA (and ft with METHODS="ft lora dora bidora"), 5 seeds, then utils/report.py. Inputs and
# options: see examples/bio/esm2_table4_common.sh and examples/bio/README.md. Smaller backbone: ESM_SIZE=8M|35M|...
set -euo pipefail
TASK_KEY=bbp
TASK_TITLE="blood-brain barrier peptides, BBP (peptide classification)"
DEFAULT_EPOCHS=10
MAX_LENGTH=64
EXTRA_METRICS=precision_weighted,recall_weighted,f1_weighted
DATA_HELP="Data: the paper's BBP set is not shipped with the paper or here (nothing of it installs offline). Public
BBB-penetrating-peptide benchmarks (e.g. the B3Pred / BBPpred collections: penetrating vs non-penetrating
peptides) are the kind of data meant. Provide train.csv/test.csv with columns sequence,label (1 = penetrates).
examples/bio/data.py csv --file all.csv --out DIR makes a seeded, de-duplicated split from a single file."
# shellcheck source=examples/bio/esm2_table4_common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/esm2_table4_common.sh"
esm2_table4_main "$@"
