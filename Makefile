# `make test` sets itself up on a fresh machine and runs the whole test suite (what CI runs); `make test-fast`
# leaves out the tests marked slow (process launches, the tools end to end: docs/testing.md);
# `make demo` runs the main job offline on its embedded default.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .setup.stamp

.PHONY: setup test test-fast demo bench clean

$(STAMP): setup.py
	@# The CPU wheel first where no GPU is present: a plain `torch` pulls gigabytes of CUDA packages.
	@if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch==2.13.0"; fi
	$(PIP) install -q -e ".[test,demo]"
	@$(PIP) install -q "trl>=0.20" || echo "trl not installed: its test will be skipped"
	@# DeepSpeed builds a pure-Python wheel against the installed torch (its C++ ops compile only when used)
	@$(PIP) install -q --no-build-isolation "deepspeed==0.19.8" || echo "deepspeed not installed: its tests will be skipped"
	@touch $(STAMP)

setup: $(STAMP)

TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

test: $(STAMP)
	$(TEST_ENV) $(PYTHON) -m pytest tests -q

test-fast: $(STAMP)
	$(TEST_ENV) $(PYTHON) -m pytest tests -q -m "not slow"

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m sam_hf.cli demo

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m sam_hf.cli bench

clean:
	rm -rf $(STAMP) demo_out bench_out .pytest_cache
