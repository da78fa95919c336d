# Developer commands. Both create .venv when it is missing and install nograd into it
# (editable, with the dev extras). constraints.txt pins torch to the local CPU build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tiny Shakespeare: $NOGRAD_DATA, else the shared copy beside the repo, else nograd's cache/download.
DATA ?= $(or $(NOGRAD_DATA),$(wildcard ../shared/data/tinyshakespeare.txt))
DEMO_OUT ?= runs/demo

.PHONY: demo demo-adamw test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job: a char GPT trained on Tiny Shakespeare by EGGROLL, forward passes only
# (population 256, rank-1 perturbations, one batched forward per generation), for 3 minutes on
# one CPU thread; it ends with a text sample and $(DEMO_OUT)/loss.png. `make demo-adamw` runs the
# gradient baseline on nanoGPT's "baby" settings for comparison.
demo: install
	OMP_NUM_THREADS=1 $(VENV)/bin/nograd train --task shakespeare-char --optimizer eggroll \
		--n-layer 2 --n-head 4 --n-embd 64 --block-size 32 --batch-size 8 \
		--population 256 --rank 1 --sigma 0.01 --lr 0.01 --warmup 10 --lr-decay-steps 600 \
		--steps 100000 --budget-minutes 3 --eval-every 25 --out $(DEMO_OUT) \
		$(if $(DATA),--data $(DATA))

demo-adamw: install
	$(VENV)/bin/nograd train --task shakespeare-char --optimizer adamw \
		--n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12 --lr 1e-3 \
		--steps 2000 --eval-every 250 --out runs/demo-adamw \
		$(if $(DATA),--data $(DATA))

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
