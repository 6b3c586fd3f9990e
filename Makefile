# Two entry points for people: `make demo` (the main job) and `make test` (the whole suite).
# Both create ./.venv on first use. torch is installed on its own first, pinned to a CPU build
# where one is available locally, so the rest of the install never pulls a CUDA torch.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean-cache

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; run: make PYTHON=python3 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/fedmerge demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean-cache:
	rm -rf $${FEDMERGE_CACHE:-$$HOME/.cache/fedmerge}
