# The two entry points of the README: `make repro` (the main job) and `make test`.
# Both create the virtual environment first, from the pinned constraints.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test test-fast env

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip check
	touch $@

repro: $(STAMP)
	PATH=$(BIN):$$PATH dvc repro

test: $(STAMP)
	PATH=$(BIN):$$PATH pytest -n 2 --dist loadgroup

test-fast: $(STAMP)
	PATH=$(BIN):$$PATH pytest -n 2 --dist loadgroup -m "not slow"
