# Two commands for a new user: `make run` (the main job) and `make test` (the test suite).
# Both create the virtualenv in .venv and install the package into it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCE ?= ../shared/data/cifar10-jpg.tar.gz
DATA ?= data/cifar10
RUN ?= scratch
TRAIN_FLAGS ?= --eval_every_steps=525
export TF_CPP_MIN_LOG_LEVEL ?= 2

LAB_FLAGS ?=
# Test processes (pytest-xdist): 2 keeps both cores of a 2-core machine busy; 0 runs in one.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

.PHONY: run lab-quick test test-fast data train evaluate explain benchmarks clean-venv

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

# The main job: the whole lab and one report, logs/lab/report.html. Every stage reuses its
# finished output (a second `make run` only rewrites the report); SOURCE given on the command
# line is passed on, otherwise the lab picks (the first line of output says which).
run: $(VENV)/.installed
	$(PY) -m research.apps.lab $(if $(filter-out file default,$(origin SOURCE)),--source=$(SOURCE)) $(LAB_FLAGS)

# Every stage shrunk: a smoke test of the whole lab in a few minutes.
lab-quick: $(VENV)/.installed
	$(PY) -m research.apps.lab --quick $(LAB_FLAGS)

# The single steps of the scratch detector (TFRecords, train, evaluate, explain).

data: $(VENV)/.installed
	@if [ -f $(DATA)/manifest.json ]; then echo "$(DATA) exists; reusing it (rm -r $(DATA) to rebuild)"; \
	else $(PY) -m research.apps.make_tfrecords --source=$(SOURCE) --out_dir=$(DATA); fi

train: $(VENV)/.installed
	$(PY) -m research.apps.train --data_dir=$(DATA) --model=scratch --run_name=$(RUN) $(TRAIN_FLAGS)

evaluate: $(VENV)/.installed
	$(PY) -m research.apps.evaluate --data_dir=$(DATA) --run_name=$(RUN) --split=test \
	    --output=checkpoints/$(RUN)/eval_test.json

explain: $(VENV)/.installed
	$(PY) -m research.apps.explain --run_name=$(RUN) --data_dir=$(DATA) --num_examples=8 \
	    --example_filter=positive --class_name=cat --method=gradcam,saliency \
	    --out_dir=checkpoints/$(RUN)/explain

# The whole suite: what CI runs (.ci/run).
test: $(VENV)/.installed
	$(PYTEST) tests

# The inner loop: everything but the end-to-end and multi-process tests (marked slow).
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow" tests

# The ratio benchmarks (input pipeline, train step, Grad-CAM) with one table, then the others.
benchmarks: $(VENV)/.installed
	$(PY) -m research.benchmarks.all --data_dir=$(DATA)
	$(PY) -m research.benchmarks.metrics
	$(PY) -m research.benchmarks.transfer
	$(PY) -m research.benchmarks.predict

clean-venv:
	rm -rf $(VENV)
