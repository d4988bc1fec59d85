# `make demo` and `make test` set everything up on a fresh machine: a .venv with the package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Stage 1 on the embedded digits: train, then grids, interpolation and held-out metrics.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/vqvae train --data digits --size 16 --steps 1500 --every 250 --out $(DEMO)
	$(BIN)/vqvae eval $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
