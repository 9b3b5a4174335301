#!/usr/bin/env bash
# The GPU check: the CUDA test subset (pytest -m cuda), then the benchmarks (benchmarks/gpu_check.py), into ONE JSON.
#
#   bash benchmarks/gpu_check.sh [--device cuda] [OUT.json]      # on a GPU machine; default runs/gpu_check.json
#   bash benchmarks/gpu_check.sh --device cpu --tiny [OUT.json]  # tiny shapes, seconds on a CPU (what CI runs)
#
# Options: --device cuda|cpu (default cuda), --tiny, --skip-tests, --out PATH (or a positional path); anything else
# (e.g. --steps 10, --skip llama) is passed on to gpu_check.py. Models are built from configs: nothing is downloaded.
# Needs torch, transformers, betty-ml 0.2.1 (and pytest for the tests, peft for the PEFT comparison: without them
# those parts are skipped, recorded as null with the reason). On a machine without a registry: `make gpu-wheels` here,
# carry runs/gpu_wheels/, `pip install --no-deps runs/gpu_wheels/*.whl` there (benchmarks/README.md).
# Exit status: 0 when every test passed and every section ran, 1 otherwise, 2 for unusable arguments or set-up.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda
tiny=0
skip_tests=0
out=runs/gpu_check.json
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="${2:?--device needs a value}"; shift 2 ;;
    --device=*) device="${1#*=}"; shift ;;
    --tiny) tiny=1; shift ;;
    --skip-tests) skip_tests=1; shift ;;
    --out) out="${2:?--out needs a path}"; shift 2 ;;
    --out=*) out="${1#*=}"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    --*) extra+=("$1"); if [ $# -gt 1 ] && [ "${2#--}" = "$2" ] && [ "${2%.json}" = "$2" ]; then extra+=("$2"); shift; fi; shift ;;
    *) out="$1"; shift ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;; esac

# shellcheck source=examples/python.sh
source examples/python.sh  # sets PY: $PYTHON, else .venv/bin/python when it exists, else python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1

# set-up check: what must import, and the device
if ! "${PY[@]}" - "$device" <<'EOF'
import importlib, sys
device = sys.argv[1]
missing = []
for module in ("torch", "transformers", "betty", "loralib"):
    try:
        importlib.import_module(module)
    except Exception as error:  # an ImportError, or a broken install
        missing.append(f"{module} ({type(error).__name__}: {error})")
if missing:
    sys.exit("gpu_check.sh: cannot import " + "; ".join(missing)
             + " -- install the wheels first (benchmarks/README.md: make gpu-wheels, pip install --no-deps ...)")
import torch
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: --device cuda but torch.cuda.is_available() is False (on a CPU: --device cpu --tiny)")
for module in ("peft", "pytest"):
    if importlib.util.find_spec(module) is None:
        print(f"gpu_check.sh: {module} is not installed: "
              + ("the PEFT comparison is skipped" if module == "peft" else "the test subset is skipped")
              + " (null in the JSON)")
EOF
then exit 2; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)
args=(--device "$device" --out "$out")
[ "$tiny" = 1 ] && args+=(--tiny)

selection="tests/test_gpu_check.py -m cuda --devices $device"
if [ "$skip_tests" = 1 ]; then
  args+=(--tests-skipped "skipped (--skip-tests)")
elif ! "${PY[@]}" -c "import pytest" 2>/dev/null; then
  args+=(--tests-skipped "pytest is not installed")
elif [ "$device" = cpu ]; then
  args+=(--pytest-args "$selection")   # in gpu_check.py's process: one start of torch + transformers, not two
else
  # on CUDA in a process of its own: a device-side error poisons the process's CUDA context, and the benchmarks
  # must still run after one
  echo "== tests: pytest $selection"
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  "${PY[@]}" -m pytest $selection -p no:cacheprovider -q -rfEs --junitxml "$work/junit.xml"
  rc=$?
  t1=$(date +%s.%N)
  args+=(--junit "$work/junit.xml" --tests-rc "$rc" --tests-seconds "$(echo "$t1 - $t0" | awk '{print $1 - $3}')"
         --tests-selection "$selection")
fi

echo "== benchmarks: gpu_check.py ${args[*]} ${extra[*]:-}"
"${PY[@]}" benchmarks/gpu_check.py "${args[@]}" "${extra[@]}"
status=$?
echo "gpu_check.sh: $(( $(date +%s) - started )) s in all; JSON: $out; exit status $status"
exit $status
