# shellcheck shell=bash
# Sourced by the paper-task scripts of examples/NER/scripts: runs run_ner.py for every seed in SEEDS and every method
# in METHODS. The caller sets NAME, MODEL, DATASET, REVISION, ADAPTER_LR, FT_LR, EPOCHS, BATCH, MAX_SEQ_LENGTH and
# HUB_REPORT_SPLIT (the split the summary reports for the hub dataset: test, or validation when it has no test).
#
# THE SETTINGS ARE OURS. The BiDoRA paper reports NER results (CoNLL-2003, BioNLP/JNLPBA) but publishes no NER
# script or hyperparameters; none of the values in these scripts come from the paper, and none has been tuned or
# measured yet (see examples/NER/README.md).
#
# Environment: SEEDS (default "0 1 2 3 4"), METHODS (default "lora dora bidora ft"), OUTPUT_ROOT (default
# <repo>/runs/ner), PYTHON (see examples/python.sh), MODEL_NAME_OR_PATH (a local copy of the model), OVERWRITE=1
# (redo finished runs; default: skipped), DRY_RUN=1 (print the commands). Local CoNLL files instead of the hub:
# TRAIN_FILE, VALIDATION_FILE, TEST_FILE. Extra arguments go to run_ner.py and override the settings (e.g.
# --max_steps 100). At the end: OUT/summary.{md,json,png} on the test split (validation or held-out without one).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
# shellcheck source=examples/python.sh
source "$ROOT/examples/python.sh"  # sets PY
# shellcheck source=examples/grid_env.sh
source "$ROOT/examples/grid_env.sh"  # sets GRID_FLAGS and DRY from OVERWRITE / DRY_RUN
SEEDS="${SEEDS:-0 1 2 3 4}"
METHODS="${METHODS:-lora dora bidora ft}"
OUT="${OUTPUT_ROOT:-$ROOT/runs/ner}/$NAME"
MODEL="${MODEL_NAME_OR_PATH:-$MODEL}"  # e.g. a local copy of the model

if [[ -n "${TRAIN_FILE:-}" ]]; then
  data=(--train_file "$TRAIN_FILE")
  [[ -n "${VALIDATION_FILE:-}" ]] && data+=(--validation_file "$VALIDATION_FILE")
  [[ -n "${TEST_FILE:-}" ]] && data+=(--test_file "$TEST_FILE")
  source_text="local files ${TRAIN_FILE} ${VALIDATION_FILE:-} ${TEST_FILE:-}"
  report_split=heldout  # the summary reports the last split the files give: test, else validation, else held-out
  [[ -n "${VALIDATION_FILE:-}" ]] && report_split=validation
  [[ -n "${TEST_FILE:-}" ]] && report_split=test
else
  report_split="$HUB_REPORT_SPLIT"
  data=(--dataset_name "$DATASET")
  [[ -n "$REVISION" ]] && data+=(--dataset_revision "$REVISION")
  source_text="hub dataset $DATASET${REVISION:+ (revision $REVISION)}, not checked offline (TRAIN_FILE etc.: files)"
fi

echo "== $NAME: $MODEL, methods: $METHODS, seeds: $SEEDS"
echo "   data: $source_text"
echo "   OUR settings (not the paper's, not tuned): r=8 alpha=16 on query/value, adapter lr $ADAPTER_LR, ft lr $FT_LR,"
echo "   $EPOCHS epochs, batch $BATCH, max_seq_length $MAX_SEQ_LENGTH, warmup 6%, weight decay 0.01,"
echo "   20% of train held out (BiDoRA's upper split; every method is selected on its entity F1)"
echo "   outputs: $OUT/<method>/seed<N>"
# Every method trains on the lower 80% of train and is selected on its held-out entity F1 (examples/grid.py, protocol
# held-out: full fine-tuning gets FT_LR, the adapters ADAPTER_LR). A finished run is skipped (OVERWRITE=1 redoes
# it), an unfinished one resumes, a finished one whose recorded settings differ stops the grid with the reason.
grid=(--out "$OUT" --methods "$METHODS" --seeds "$SEEDS" --protocol held-out --ft-lr "$FT_LR" --adapter-lr "$ADAPTER_LR"
      --python "${PY[*]}" "${GRID_FLAGS[@]}")
"${PY[@]}" "$ROOT/examples/grid.py" "$ROOT/examples/NER/run_ner.py" "${grid[@]}" -- \
  --model_name_or_path "$MODEL" "${data[@]}" --lora_r 8 --lora_alpha 16 --target_modules query value \
  --weight_decay 0.01 --warmup_steps 0.06 --lr_scheduler_type linear --num_train_epochs "$EPOCHS" \
  --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size 64 --max_seq_length "$MAX_SEQ_LENGTH" \
  --upper_fraction 0.2 --hypergradient darts --eval_strategy epoch --save_strategy epoch --logging_steps 50 \
  --do_predict "$@"

# The table, the paired differences and the figure over every finished run under OUT (entity F1 on report_split).
# shellcheck disable=SC2086  # word splitting normalises the lists
"${DRY[@]}" "${PY[@]}" "$ROOT/utils/report.py" "$OUT" --split "$report_split" --metric f1 \
  --extra-metrics precision,recall --methods "$(echo $METHODS | tr ' ' ',')" --seeds "$(echo $SEEDS | tr ' ' ',')" \
  --markdown "$OUT/summary.md" --json "$OUT/summary.json" --figure "$OUT/summary.png" \
  --title "$NAME: entity F1 ($report_split)"
