# Developer commands. Both create .venv when it is missing and install nograd into it
# (editable, with the dev extras). constraints.txt pins torch to the local CPU build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tiny Shakespeare: $NOGRAD_DATA, else the shared copy beside the repo, else nograd's cache/download.
DATA ?= $(or $(NOGRAD_DATA),$(wildcard ../shared/data/tinyshakespeare.txt))
DEMO_OUT ?= runs/demo

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job: AdamW on shakespeare-char with a short budget (a few minutes on 2 CPU cores),
# ending with a text sample and $(DEMO_OUT)/loss.png.
demo: install
	$(VENV)/bin/nograd train --task shakespeare-char --optimizer adamw \
		--n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12 --lr 1e-3 \
		--steps 1500 --budget-minutes 3 --eval-every 250 --out $(DEMO_OUT) \
		$(if $(DATA),--data $(DATA))

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
