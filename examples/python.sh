# shellcheck shell=bash
# Sourced by the example scripts (examples/*) and benchmarks/gpu_check.sh: sets the array PY to the
# interpreter to run.
#   PYTHON, when set (split into words on purpose: PYTHON="python -X dev" works);
#   else the repository's .venv/bin/python when it exists (`make setup` creates it, with torch and loralib);
#   else python3 from PATH.
_loralib_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  read -r -a PY <<<"$PYTHON"
elif [[ -x "$_loralib_root/.venv/bin/python" ]]; then
  PY=("$_loralib_root/.venv/bin/python")
else
  PY=(python3)
fi
unset _loralib_root
