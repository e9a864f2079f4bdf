# The two entry points of the README: `make repro` (the main job) and `make test`.
# Both create the virtual environment first, from the pinned constraints.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test test-fast env screenshots

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip check
	$(BIN)/python -m pipeline.plots --template  # .dvc/config's plots.html_template: charts drawn offline
	touch $@

repro: $(STAMP)
	PATH=$(BIN):$$PATH dvc repro

test: $(STAMP)
	PATH=$(BIN):$$PATH pytest -n 2 --dist loadgroup --no-loadscope-reorder

test-fast: $(STAMP)
	PATH=$(BIN):$$PATH pytest -n 2 --dist loadgroup --no-loadscope-reorder -m "not slow"

# docs/img/*.png: the MLflow and Prefect pages of a small experiment, photographed by headless Chromium
screenshots: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	PATH=$(BIN):$$PATH python docs/screenshots.py --out docs/img
