# The two entry points of the README: `make repro` (the main job) and `make test`.
# Both create the virtual environment first, from the pinned constraints.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# what a new virtual environment takes on disk (6.5 GB: torch with its CUDA libraries), checked before pip starts
VENV_GB := 7

.PHONY: repro test test-fast env screenshots

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@ls -d $(VENV)/lib/python3*/site-packages/torch >/dev/null 2>&1 || python3 -c 'import shutil, sys; \
	free = shutil.disk_usage(".").free / 2**30; sys.exit(None if free >= $(VENV_GB) else \
	f"make: $(VENV) needs about $(VENV_GB) GB (torch with its CUDA libraries), {free:.1f} GB free in $(CURDIR)")'
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
