# shellcheck shell=bash
# Sourced by the example scripts that run a grid through examples/grid.py. Reads two switches from the environment:
#   OVERWRITE=1   redo finished runs (default 0: a run with results.json is skipped, an unfinished one resumes)
#   DRY_RUN=1     print the grid's commands and the script's report commands instead of running them (default 0)
# and sets two arrays:
#   GRID_FLAGS    examples/grid.py's flags for them: --finished skip|redo, plus --dry-run
#   DRY           a prefix for the script's own commands after the grid (the summary): empty, or (echo "[dry run]")
# Any value other than 0 or 1 stops the script with a sentence (OVERWRITE=yes used to be read silently as 0).
for _switch in OVERWRITE DRY_RUN; do
  case "${!_switch:-0}" in
    0 | 1 | "") ;;
    *)
      echo "error: $_switch must be 0 or 1, not '${!_switch}'" >&2
      exit 2
      ;;
  esac
done
unset _switch
GRID_FLAGS=(--finished skip)
DRY=()
if [[ "${OVERWRITE:-0}" == 1 ]]; then GRID_FLAGS=(--finished redo); fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  GRID_FLAGS+=(--dry-run)
  DRY=(echo "[dry run]")
fi
