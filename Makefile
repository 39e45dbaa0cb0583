# Two commands on a fresh machine: `make demo` (offline, synthetic data, whole pipeline) and `make test`.
PYTHON ?= python3
# The virtual environment: created here unless it exists; an existing or linked one works too (make VENV=...).
VENV ?= .venv
BIN := $(VENV)/bin
# absolute, for recipes that cd elsewhere (demo/) and for scripts that put it first on PATH
ABSBIN := $(abspath $(BIN))
# pip installs the exact versions CI used; `make LOCK= test` resolves the ranges in requirements*.txt instead.
LOCK ?= requirements-lock.txt
CONSTRAINT := $(if $(LOCK),-c $(LOCK),)

.PHONY: demo report compare explain-all test test-all test-isa lint run lock bench gpu-check clean

# The dependencies, then the project itself, editable (pyproject.toml: the package cnnlens only), so
# `import cnnlens` works in a notebook without PYTHONPATH.
$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt $(CONSTRAINT)
	$(BIN)/python -m pip install -q --no-deps -e .
	# first-use caches now, not inside the first pipeline run: matplotlib's font list, the bytecode
	MPLBACKEND=Agg $(BIN)/python -c "import matplotlib.pyplot"
	$(BIN)/python -m compileall -q cnnlens stages
	touch $@

demo: $(BIN)/.installed build/plots.html
	PATH=$(ABSBIN):$$PATH bash scripts/demo.sh

# The plots-page template: vega, vega-lite and vega-embed inlined (charts draw offline), plots in
# reading order. Generated, not committed. Use: dvc plots show|diff --html-template build/plots.html
build/plots.html: cnnlens/report.py | $(BIN)/.installed
	$(BIN)/python -m cnnlens.report template -o $@

# Re-render demo/dvc_plots/index.html with the template (after `make demo`).
report: build/plots.html
	cd demo && PATH=$(ABSBIN):$$PATH dvc plots show -q --html-template $(CURDIR)/build/plots.html -o dvc_plots
	cd demo && $(ABSBIN)/python -m cnnlens.report shrink dvc_plots

# The four losses as DVC experiments on the demo settings, then one comparison in demo/compare/.
compare: build/plots.html
	PATH=$(ABSBIN):$$PATH bash scripts/compare.sh

# Every saliency method of the registry (cnnlens/attribution.py METHODS) on the demo, after `make demo`: one
# DVC experiment, explain-all, that reruns the saliency stage only, then the page again. Its one quality
# table of all methods and both baselines, sorted by deletion AUC with 95% intervals:
# demo/plots/saliency/figures/quality.png (on the page) and quality.csv. Minutes on 2 CPU cores (BENCHMARKS.md).
explain-all: build/plots.html
	@test -f demo/dvc.lock || { echo "error: demo/ has no finished pipeline; run \`make demo\` first" >&2; exit 1; }
	cd demo && PATH=$(ABSBIN):$$PATH dvc exp remove explain-all >/dev/null 2>&1 || true
	cd demo && methods=$$($(ABSBIN)/python -c 'from cnnlens.attribution import METHODS; print(",".join(METHODS))') && \
		PATH=$(ABSBIN):$$PATH dvc exp run -n explain-all -S "saliency.methods=[$$methods]"
	$(MAKE) report
	@echo "explain-all: every method's quality, sorted: demo/plots/saliency/figures/quality.png, quality.csv" >&2

# Two workers, a test file each at a time (a file's session fixtures are built once): most tests wait on
# DVC and stage subprocesses (each imports torch), so two of them share 2 cores well.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

# The fast tests: every module's units and one small end-to-end pipeline (tests/test_params_reads.py), minutes.
test: $(BIN)/.installed
	$(PYTEST) -m "not integration" tests

# Everything: also the integration tests (marked `integration`): real `dvc repro` in scratch projects,
# remotes, several processes, kills and faults, the browser. CI runs this one.
test-all: $(BIN)/.installed
	$(PYTEST) tests

# The tests that train (marked `trajectory`) again on the oldest vector kernels, SSE4.1 with no AVX: a
# training test must assert what holds on any CPU, not the trajectory one instruction set happens to give.
test-isa: $(BIN)/.installed
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 $(PYTEST) -m trajectory tests

# House style (pyproject.toml): formatting and lint; CI (.ci/run) runs it before the tests.
lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The real data (needs internet, or set data.source / model.weights to local paths in params.yaml).
# The whole params file is checked first: `dvc repro` runs only stages whose params changed, so a
# misspelt top-level key (read by no stage) would otherwise pass unseen.
run: $(BIN)/.installed
	$(BIN)/python -m cnnlens.config check params.yaml
	PATH=$(ABSBIN):$$PATH dvc repro

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_train.py

# The GPU check (docs/gpu.md): `make gpu-check` on the GPU box, `make gpu-check GPU_ARGS="--device cpu --tiny"` here.
GPU_ARGS ?= --device cuda
gpu-check:
	bash bench/gpu_check.sh $(GPU_ARGS)

# The exact versions of this venv, without the project itself (installed editable: excluded).
lock: $(BIN)/.installed
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^-e' -e '^cnnlens==' > requirements-lock.txt

clean:
	rm -rf demo dvc_plots build .pytest_cache
