# Two commands, each creating and filling a local virtual environment (.venv) as needed.
#   make demo  -- refine real backbones on real images: Dice before/after and PNG overlays
#   make test  -- ruff, then the whole test suite (what CI runs); make test-quick: the fast tier
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

# a fast tier for daily use (a couple of minutes): no test marked slow (long refinements, training,
# subprocesses), torch (converter equivalence) or gui (napari); markers are set in tests/conftest.py
QUICK := -m "not slow and not torch and not gui"

.PHONY: demo test test-quick lint venv clean

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel on disk (any other spec downloads a CUDA build)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,torch,cpu,napari]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/scribblejax demo --task tissue2d --out demo_output/tissue2d
	$(BIN)/scribblejax demo --task nuclei2d --out demo_output/nuclei2d

test: lint
	$(BIN)/python -m pytest -q tests

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q $(QUICK) tests

lint: $(STAMP)
	$(BIN)/ruff check scribblejax tests benchmarks
	$(BIN)/ruff format --check scribblejax tests benchmarks

clean:
	rm -rf $(VENV) demo_output
