# Lucid: the two set-up commands are `make run` and `make test` (README).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lucid-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: run test venv bench clean browser tables

# A CUDA torch importable by the system python is kept (the venv sees it); otherwise the local CPU
# build torch==2.13.0 is installed before the project so no resolver pulls the CUDA wheels.
$(STAMP): pyproject.toml Makefile
	@if python3 -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  echo "lucid: using the CUDA torch already installed"; python3 -m venv --system-site-packages $(VENV); \
	else python3 -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# the REST API + web page on the embedded default, in the foreground (Ctrl-C stops it)
run: $(STAMP)
	$(VENV)/bin/lucid serve

# headless Chromium for the web page's test (Debian's package; Playwright drives it, no download)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "lucid: installing chromium (apt)"; \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null) \
	  || echo "lucid: could not install chromium; the web page test will be skipped"; }

test: $(STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/lucid bench --out BENCHMARKS.md

clean:
	rm -rf $(VENV) out .pytest_cache

# every measured table of a testbed checkpoint into one folder (MODEL=testbed|DIR, OUT=DIR; QUICK=quick for a smoke run)
tables: $(STAMP)
	LUCID=$(VENV)/bin/lucid PY=$(PY) bash testbed/remake_tables.sh $(or $(MODEL),testbed) $(or $(OUT),out/tables) $(QUICK)
