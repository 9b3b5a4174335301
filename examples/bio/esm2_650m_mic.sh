#!/usr/bin/env bash
# Table 4 of the BiDoRA paper, antimicrobial peptide MIC (regression, reported as MSE), ESM-2 650M,
# LoRA/DoRA/BiDoRA (and ft with METHODS="ft lora dora bidora"), 5 seeds, then utils/report.py (MSE on
# test; model selection maximises -MSE on the held-out 20% of train). Inputs and options: see
# examples/bio/esm2_table4_common.sh and examples/bio/README.md. Smaller backbone: ESM_SIZE=8M|35M|150M|650M|3B.
set -euo pipefail
TASK_KEY=mic
TASK_TITLE="antimicrobial peptide MIC (peptide regression)"
DEFAULT_EPOCHS=10
MAX_LENGTH=64
EXTRA_METRICS=pearson,spearman
DATA_HELP="Data: the paper's MIC set is not shipped with the paper or here (nothing of it installs offline). Minimum
inhibitory concentrations of antimicrobial peptides come from databases such as DBAASP or GRAMPA; the paper's MSE
values (~0.3) suggest a log-scale target. Provide train.csv/test.csv with columns sequence,label (label = the
number to regress, e.g. log10 MIC; one target organism per file)."
# shellcheck source=examples/bio/esm2_table4_common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/esm2_table4_common.sh"
esm2_table4_main "$@"
