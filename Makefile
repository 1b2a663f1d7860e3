# Two commands do everything on a fresh machine:
#   make demo   set up the environment and run the main job end to end (no network)
#   make test   set up the environment and run the test suite (no network)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.timo-hf-installed

.PHONY: setup demo test clean

setup: $(STAMP)

# The CPU build of torch goes in first: a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m timo_hf.demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist src/*.egg-info
