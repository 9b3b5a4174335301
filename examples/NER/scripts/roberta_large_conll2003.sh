#!/usr/bin/env bash
# roberta_large_conll2003: CoNLL-2003 (English newswire: PER, ORG, LOC, MISC) with roberta-large,
# methods lora / dora / bidora / ft, one run per seed and method (examples/NER/run_ner.py).
# THE SETTINGS ARE OURS, not the paper's: the BiDoRA paper reports this task but publishes no NER settings, and these
# values are untuned defaults (adapter lr 3e-4, ft lr 1e-5, 10 epochs, batch 16, max_seq_length 256, r=8 alpha=16 q/v).
# Environment: SEEDS (default "0 1 2 3 4"), METHODS (default "lora dora bidora ft"), OUTPUT_ROOT (default
# <repo>/runs/ner), PYTHON, MODEL_NAME_OR_PATH (a local copy of the model); TRAIN_FILE / VALIDATION_FILE / TEST_FILE
# for local CoNLL files instead of the hub.
# Extra arguments go to run_ner.py and override these settings (e.g. --max_steps 100). An unfinished run is resumed
# by the same command; a finished one is skipped (OVERWRITE=1 redoes it). DRY_RUN=1 prints the commands. At the end:
# OUTPUT_ROOT/<name>/summary.{md,json,png} (utils/report.py).
NAME=roberta_large_conll2003 MODEL=roberta-large DATASET=eriktks/conll2003 REVISION=refs/convert/parquet
HUB_REPORT_SPLIT=test
ADAPTER_LR=3e-4 FT_LR=1e-5 EPOCHS=10 BATCH=16 MAX_SEQ_LENGTH=256
# shellcheck source=examples/NER/scripts/_paper_task.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_paper_task.sh"
