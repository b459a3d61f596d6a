# The few commands a user or contributor needs.  Everything installs into ./.venv.
# TORCH picks the torch build: the default pin is a CPU wheel on machines that carry it
# locally and the regular PyPI (CUDA) build elsewhere; set TORCH= to keep a torch you already
# installed in the venv.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install browser demo test slow lint format

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[dev,ui,train]"
	# open_clip_torch: the real CLIP vocabulary (to build models); lpips: its linear-layer weights.
	$(PY) -m pip install -q --no-deps open_clip_torch lpips
	touch $@

install: $(VENV)/.installed

$(VENV)/.browser: $(VENV)/.installed scripts/install-browser.sh
	VENV=$(VENV) scripts/install-browser.sh
	touch $@

browser: $(VENV)/.browser

demo: install
	$(VENV)/bin/dds demo

test: install browser
	$(PY) -m pytest

slow: install
	$(PY) -m pytest -m slow

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

format: install
	$(VENV)/bin/ruff format src tests benchmarks
