#!/usr/bin/env bash
# Offline, real-data comparison of LoRA, DoRA and BiDoRA (with retraining) on CPU: AntiBERTy (antiberty==0.1.3,
# a 25.8M-parameter antibody BERT) on modlAMP's ACP_CancPPD_vs_Random peptides (anticancer vs random, 826
# sequences), SEEDS (default 0 1 2 3 4), then utils/report.py -> OUT_ROOT/comparison.{md,json,png}.
#
#   bash examples/bio/run_antiberty_acp.sh               # all seeds (~15 min on 2 idle CPU cores; see the README)
#   SEEDS=0 OUT_ROOT=/tmp/acp bash examples/bio/run_antiberty_acp.sh
#
# Extra arguments go to every run_glue.py run (last: they override the settings). A finished run is skipped, unless
# its recorded settings differ (then the script stops and says so) or OVERWRITE=1.
# Environment: SEEDS, METHODS (default "lora dora bidora"; ft allowed), OUT_ROOT (default runs/antiberty_acp),
# DATA_SEED (the train/test split, default 0, fixed across training seeds), FIGURE (default OUT_ROOT/comparison.png),
# OVERWRITE=1 (redo finished runs; otherwise they are kept and skipped), DRY_RUN=1 (prepare the data and the model
# folder, then print the commands), PYTHON, and the schedule below.
# assets/antiberty_acp.{png,json} (shown in the READMEs) are never written by a run: `make assets` copies
# runs/antiberty_acp/comparison.{png,json} there.
# Settings are ours (examples/bio/configs/antiberty_acp.yaml + the schedule here), sized for 2 CPU cores.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=examples/python.sh
source "$ROOT/examples/python.sh"  # sets PY: $PYTHON, else .venv/bin/python when it exists, else python3
# shellcheck source=examples/grid_env.sh
source "$ROOT/examples/grid_env.sh"  # sets GRID_FLAGS and DRY from OVERWRITE / DRY_RUN
OUT="${OUT_ROOT:-$ROOT/runs/antiberty_acp}"
SEEDS="${SEEDS:-0 1 2 3 4}"
METHODS="${METHODS:-lora dora bidora}"
DATA_SEED="${DATA_SEED:-0}"
FIGURE="${FIGURE:-$OUT/comparison.png}"
CONFIG="$HERE/configs/antiberty_acp.yaml"
# Schedule (ours). 619 train sequences; BiDoRA holds out 20% (124) for its upper level, so one epoch of the lower
# 495 at batch 16 is 31 steps. ft/LoRA/DoRA: 93 steps on all 619. BiDoRA: one epoch of bi-level search (each DARTS step
# costs ~3-4 LoRA steps on CPU) whose only output kept is the magnitudes, then retraining of a fresh adapter and head
# on all 619 with the magnitudes frozen, for as many steps as LoRA/DoRA get.
ITERATIONS="${ITERATIONS:-93}"
BIDORA_SEARCH_ITERATIONS="${BIDORA_SEARCH_ITERATIONS:-31}"
BIDORA_RETRAIN_ITERATIONS="${BIDORA_RETRAIN_ITERATIONS:-93}"
EVAL_EVERY="${EVAL_EVERY:-31}"
FT_LR="${FT_LR:-5e-5}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

cd "$ROOT"
n_seeds=$(wc -w <<<"$SEEDS")
echo "== AntiBERTy on ACP_CancPPD_vs_Random: methods [$METHODS] x seeds [$SEEDS] -> $OUT" >&2
echo "   model: AntiBERTy (25.8M parameters, ~104 MB, shipped by antiberty==0.1.3; nothing is downloaded)" >&2
# Measured on 2 idle cores: 5 seeds x (lora + dora + bidora) took 16.5 min (~200 s per seed with start-up).
echo "   time: ~200 s per seed for lora+dora+bidora on 2 idle CPU cores (measured; see examples/bio/README.md):" \
     "~$(( (200 * n_seeds + 59) / 60 )) min in all" >&2

"${PY[@]}" examples/offline_packages.py install
mkdir -p "$OUT"
# The split (seeded, de-duplicated, stratified) is written next to the results: data/{train,test}.csv, split.json.
"${PY[@]}" examples/bio/data.py modlamp --file ACP_CancPPD_vs_Random.csv --out "$OUT/data" --seed "$DATA_SEED" >&2
# One folder with AntiBERTy's config, weights (symlink), vocab.txt and a do_lower_case=false tokenizer config,
# checked so that no residue becomes [UNK] (examples/bio/antiberty_folder.py explains the two traps).
"${PY[@]}" examples/bio/antiberty_folder.py "$OUT/model" >&2

# The baselines (ft, LoRA, DoRA) train on all of train (the data BiDoRA sees over its two phases) and report the final
# model, like BiDoRA with retraining: same data, same number of direction steps, nothing selected on test
# (examples/grid.py, protocol all-of-train). A finished run is skipped unless OVERWRITE=1; an unfinished one resumes.
grid=(--out "$OUT" --methods "$METHODS" --seeds "$SEEDS" --protocol all-of-train --steps "$ITERATIONS"
      --search-steps "$BIDORA_SEARCH_ITERATIONS" --retrain-steps "$BIDORA_RETRAIN_ITERATIONS" --ft-lr "$FT_LR"
      "${GRID_FLAGS[@]}")
"${PY[@]}" examples/grid.py examples/NLU/run_glue.py "${grid[@]}" --python "${PY[*]}" -- --config "$CONFIG" \
  --model_name_or_path "$OUT/model" --train_file "$OUT/data/train.csv" --test_file "$OUT/data/test.csv" \
  --eval_steps "$EVAL_EVERY" "$@"

# shellcheck disable=SC2086  # word splitting normalises the lists
"${DRY[@]}" "${PY[@]}" utils/report.py "$OUT" --methods "$(echo $METHODS | tr ' ' ',')" --seeds "$(echo $SEEDS | tr ' ' ',')" \
  --extra-metrics precision_weighted,recall_weighted,f1_weighted \
  --markdown "$OUT/comparison.md" --json "$OUT/comparison.json" --figure "$FIGURE" \
  --title "AntiBERTy on ACP vs random peptides (modlAMP), test accuracy"
echo "table: $OUT/comparison.md  figure: $FIGURE (assets/ untouched; \`make assets\` copies them there)" >&2
