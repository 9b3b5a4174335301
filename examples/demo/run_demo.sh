#!/usr/bin/env bash
# The offline demo: LoRA vs DoRA vs BiDoRA on a real pretrained encoder (all-MiniLM-L6-v2) and real movie reviews,
# on a CPU, with no network beyond the package registries. Everything goes through examples/NLU/run_glue.py.
#
#   bash examples/demo/run_demo.sh                      # one seed, Rotten Tomatoes sentiment (about 10 minutes)
#   SEEDS="0 1 2" bash examples/demo/run_demo.sh        # mean ± std over seeds
#   TASK=vader_movies bash examples/demo/run_demo.sh    # regression on human ratings (-4..+4)
#   ITERATIONS=20 TRAIN_SIZE=80 TEST_SIZE=40 bash examples/demo/run_demo.sh   # a smoke run (seconds)
#   Extra arguments go to run_glue.py (e.g. --eval_steps 5).
#
# Environment: SEEDS (default "0"), TASK (rotten_tomatoes | vader_movies), METHODS (default "lora dora bidora"),
# ITERATIONS (lower-level steps of every method, and BiDoRA's retraining steps; default: the config's 150),
# TRAIN_SIZE / TEST_SIZE (default 2000 / 1000), OUTPUT_ROOT (default runs/demo), PYTHON (default .venv/bin/python
# when it exists, else python3), FIGURE (default OUTPUT_ROOT/<task>/summary.png).
#
# Every call runs every (method, seed) again from scratch (--finished redo: the demo's runs are minutes, and a
# changed ITERATIONS / TRAIN_SIZE must never be mixed with older runs); keep runs apart with OUTPUT_ROOT.
# Output: everything goes under OUTPUT_ROOT/<task>/ -- the runs, summary.md, summary.json and the figure
# (utils/report.py). The README's figure and table under assets/ are never touched by a run; refreshing them is
# explicit: `make assets` copies runs/demo/rotten_tomatoes/summary.{png,json} to assets/demo_rotten_tomatoes.*.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=examples/python.sh
source "$ROOT/examples/python.sh"  # sets PY
TASK="${TASK:-rotten_tomatoes}"
SEEDS="${SEEDS:-0}"
METHODS="${METHODS:-lora dora bidora}"
TRAIN_SIZE="${TRAIN_SIZE:-2000}"
TEST_SIZE="${TEST_SIZE:-1000}"
OUT="${OUTPUT_ROOT:-$ROOT/runs/demo}/$TASK"
FIGURE="${FIGURE:-$OUT/summary.png}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

case "$TASK" in
  rotten_tomatoes) BUILD=rotten-tomatoes ;;
  vader_movies) BUILD=vader ;;
  *) echo "error: TASK must be rotten_tomatoes or vader_movies, got '$TASK'" >&2; exit 2 ;;
esac
"${PY[@]}" -c "import loralib" 2>/dev/null || {
  echo "error: ${PY[*]} cannot import loralib (torch, transformers) (run 'make setup' first, or set PYTHON)" >&2
  exit 2
}

echo "== loralib offline demo: $TASK, methods: $METHODS, seeds: $SEEDS =="
"${PY[@]}" "$ROOT/examples/offline_packages.py" install
MODEL="$("${PY[@]}" -c "import sys; sys.path.insert(0, '$ROOT/examples'); import offline_packages as o; print(o.minilm_model_dir())")"
echo "encoder: all-MiniLM-L6-v2 from $MODEL (22.7M parameters, read in place, no download)"

DATA="$OUT/data"
"${PY[@]}" "$ROOT/examples/demo/data.py" "$BUILD" --out "$DATA" --train "$TRAIN_SIZE" --test "$TEST_SIZE" --seed 0

# The baselines train on all of train (the same data BiDoRA sees over both phases) and report the final model, as
# BiDoRA with retraining does; nothing is tuned or selected on the test split (examples/grid.py, protocol all-of-train).
grid=(--out "$OUT" --methods "$METHODS" --seeds "$SEEDS" --protocol all-of-train --finished redo)
[ -n "${ITERATIONS:-}" ] && grid+=(--steps "$ITERATIONS" --retrain-steps "$ITERATIONS")
"${PY[@]}" "$ROOT/examples/grid.py" "$ROOT/examples/NLU/run_glue.py" "${grid[@]}" --python "${PY[*]}" -- \
  --config "$HERE/configs/minilm_$TASK.yaml" --model_name_or_path "$MODEL" \
  --train_file "$DATA/train.csv" --test_file "$DATA/test.csv" "$@"

# shellcheck disable=SC2086  # word splitting normalises the lists
"${PY[@]}" "$ROOT/utils/report.py" "$OUT" --split test --methods "$(echo $METHODS | tr ' ' ',')" \
  --seeds "$(echo $SEEDS | tr ' ' ',')" --markdown "$OUT/summary.md" --json "$OUT/summary.json" \
  --figure "$FIGURE" --title "all-MiniLM-L6-v2 on $TASK (seeds: $SEEDS)"
echo "wrote $OUT/summary.md, $OUT/summary.json and $FIGURE (assets/ untouched; \`make assets\` copies them there)"
