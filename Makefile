# `make demo` and `make test` set everything up on a fresh machine: a .venv with the package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
DEMO := runs/demo

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Stage 1 on the embedded digits: train, then grids, interpolation and held-out metrics.
# Stage 2: encode the digits into 4x4 code grids, train a small prior on them, draw 64 new digits.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/vqvae train --data digits --size 16 --steps 1500 --every 250 --out $(DEMO)
	$(BIN)/vqvae eval $(DEMO)
	$(BIN)/vqvae encode $(DEMO) --out $(DEMO)/codes.safetensors
	$(BIN)/vqvae train-prior --codes $(DEMO)/codes.safetensors --d-model 128 --layers 2 \
		--heads 4 --steps 600 --every 200 --out $(DEMO)/prior
	$(BIN)/vqvae sample $(DEMO)/prior --n 64 --seed 0

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The speed benchmarks (docs/benchmarks.md), each printing markdown tables: quantizer vs the floor
# and vector-quantize-pytorch (the optional `bench` extra), stage-1 training, encoding, sampling.
# Tens of minutes on 2 CPU cores; the quality benchmarks (quantizers.py, prior_nll.py) are run by
# hand with the arguments in docs/quantizers.md and docs/prior.md, as is sample_quality.py.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/quantizer_speed.py
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/encode_speed.py
	$(BIN)/python benchmarks/sampling.py --preset seed --repeats 3 --points 7

clean:
	rm -rf $(VENV) runs .pytest_cache
