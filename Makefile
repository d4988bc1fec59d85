# `make demo` and `make test` set everything up on a fresh machine: a .venv with the package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
DEMO := runs/demo

.PHONY: demo test lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Stage 1 on the embedded digits: train, then grids, interpolation and held-out metrics. 64
# channels and FSQ's 128 codes (8 x 4 x 4 levels): as sharp as 128 channels and 512 codes, twice as
# fast, and 4x4 grids a prior can learn from 1,617 digits (over 512 codes it overfits).
# Stage 2: encode the digits into code grids, train a small class-conditional prior on them
# (batch 64 at lr 4e-3, not the default's 16 at 2e-3 for a small code set, which are sized for
# short time budgets: a run of a fixed 400 steps learns more from larger batches and takes the
# larger rate; docs/prior.md), draw 100 new digits with guidance (every
# row 0-9) and judge them with the quality benchmark's classifier (trained once, ~25 s, then
# cached under runs/quality).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/vqvae train --data digits --size 16 --hidden-channels 64 --quantizer fsq \
		--codebook-size 128 --fsq-levels 8,4,4 --steps 1500 --every 250 --out $(DEMO)
	$(BIN)/vqvae eval $(DEMO)
	$(BIN)/vqvae encode $(DEMO) --out $(DEMO)/codes.safetensors
	$(BIN)/vqvae train-prior --codes $(DEMO)/codes.safetensors --conditional --d-model 128 \
		--layers 2 --heads 4 --batch-size 64 --lr 4e-3 --steps 400 --every 200 --out $(DEMO)/prior
	$(BIN)/vqvae sample $(DEMO)/prior --n 100 --all-classes --guidance 2 --seed 0
	$(BIN)/python benchmarks/sample_quality.py --judge $(DEMO)/prior/sample

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff (the configuration is in pyproject.toml): pyflakes, pycodestyle, import order; seconds.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

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
