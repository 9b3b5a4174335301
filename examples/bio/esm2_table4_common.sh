# shellcheck shell=bash
# Shared body of examples/bio/esm2_650m_{thermostability,bbp,mic}.sh (sourced, not run). The caller sets:
#   TASK_KEY (thermostability|bbp|mic), TASK_TITLE, DATA_HELP (where the data comes from), DEFAULT_EPOCHS,
#   MAX_LENGTH and EXTRA_METRICS, then calls esm2_table4_main "$@".
#
# Inputs (environment variables, or positional arguments TRAIN_CSV TEST_CSV [OUT_ROOT]):
#   TRAIN_FILE, TEST_FILE   CSV files with a header and columns sequence,label (raw residues, no spaces)
#   VALIDATION_FILE         optional dev CSV (reported as split "validation"; never used for selection)
#   OUT_ROOT                output root (default runs/esm2_<size>_<task>); runs go to OUT_ROOT/<method>/seed<k>
#   ESM_SIZE                8M | 35M | 150M | 650M (default, the paper's) | 3B
#   SEEDS                   default "0 1 2 3 4";  METHODS  default "lora dora bidora" (ft allowed)
#   EPOCHS                  passes over the training data per phase (default per task, ours)
#   FT_LR                   learning rate of full fine-tuning (default 2e-5; adapters use the config's lr)
#   EXTRA_ARGS              more run_glue.py options, appended to every run (e.g. "--bf16")
#   DRY_RUN=1               print the commands instead of running them
#   OVERWRITE=1             redo finished runs (default: a run with results.json is skipped)
#   PYTHON                  interpreter (default: the repository's .venv when it exists, else python3)

esm2_table4_main() {
  local here root
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  root="$(cd "$here/../.." && pwd)"
  # shellcheck source=examples/python.sh
  source "$root/examples/python.sh"  # sets PY
  # shellcheck source=examples/grid_env.sh
  source "$root/examples/grid_env.sh"  # sets GRID_FLAGS and DRY from OVERWRITE / DRY_RUN

  local train="${1:-${TRAIN_FILE:-}}" test="${2:-${TEST_FILE:-}}"
  local size="${ESM_SIZE:-650M}"
  local out="${3:-${OUT_ROOT:-$root/runs/esm2_${size}_${TASK_KEY}}}"
  local seeds="${SEEDS:-0 1 2 3 4}" methods="${METHODS:-lora dora bidora}"
  local epochs="${EPOCHS:-$DEFAULT_EPOCHS}" ft_lr="${FT_LR:-2e-5}"
  local config="$here/configs/esm2_${TASK_KEY}.yaml"

  if [[ -z "$train" || -z "$test" || ! -f "$train" || ! -f "$test" ]]; then
    {
      echo "error: $TASK_TITLE needs its data as CSV files (header: sequence,label); got"
      echo "  TRAIN_FILE='${train}'  TEST_FILE='${test}'  (missing or not a file)"
      echo
      echo "$DATA_HELP"
      echo
      echo "usage: TRAIN_FILE=train.csv TEST_FILE=test.csv [ESM_SIZE=650M] [SEEDS='0 1 2 3 4'] $0"
      echo "   or: $0 train.csv test.csv [OUT_ROOT]"
    } >&2
    exit 1
  fi
  train="$(cd "$(dirname "$train")" && pwd)/$(basename "$train")"
  test="$(cd "$(dirname "$test")" && pwd)/$(basename "$test")"
  local val_args=() val="${VALIDATION_FILE:-}"
  if [[ -n "$val" ]]; then
    [[ -f "$val" ]] || { echo "error: VALIDATION_FILE=$val is not a file" >&2; exit 1; }
    val_args=(--validation "$val")
  fi

  echo "== $TASK_TITLE with ESM-2 $size: LoRA/DoRA/BiDoRA comparison (hyper-parameters are ours: $config)" >&2
  [[ -n "${EXTRA_ARGS:-}" ]] && echo "   overridden by EXTRA_ARGS: $EXTRA_ARGS" >&2
  local plan
  plan="$("${PY[@]}" "$here/plan.py" --train "$train" --test "$test" "${val_args[@]}" --size "$size" \
          --epochs "$epochs" --max-length "$MAX_LENGTH" --methods "$methods" --seeds "$seeds")"
  local ITERATIONS RETRAIN_ITERATIONS MODEL
  eval "$plan"
  echo "output: $out" >&2

  local grid=(--out "$out" --methods "$methods" --seeds "$seeds" --protocol held-out --steps "$ITERATIONS"
              --retrain-steps "$RETRAIN_ITERATIONS" --ft-lr "$ft_lr" "${GRID_FLAGS[@]}")
  local vfile=()
  [[ -n "$val" ]] && vfile=(--validation_file "$val")
  # Every method trains on the lower 80% of train and is selected on the held-out 20%; BiDoRA then retrains a fresh
  # adapter and head on all of train with the magnitudes frozen at their searched values (the reported model).
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of options on purpose
  "${PY[@]}" "$root/examples/grid.py" "$root/examples/NLU/run_glue.py" "${grid[@]}" --python "${PY[*]}" -- \
    --config "$config" --model_name_or_path "$MODEL" --train_file "$train" --test_file "$test" "${vfile[@]}" \
    ${EXTRA_ARGS:-}
  "${DRY[@]}" "${PY[@]}" "$root/utils/report.py" "$out" --methods "${methods// /,}" --seeds "${seeds// /,}" \
    ${EXTRA_METRICS:+--extra-metrics "$EXTRA_METRICS"} --markdown "$out/comparison.md" --json "$out/comparison.json" \
    --figure "$out/comparison.png"
}
