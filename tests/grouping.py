"""How `make test` shares the suite between pytest-xdist workers (`--dist loadgroup`).

Each module's tests run on one worker, so its module-scoped fixtures (a tiny `dvc repro`, MLflow
and Prefect servers, a trained run) are built once; the modules in SPREAD_MODULES hold independent
slow tests and are spread over the workers. tests/test_grouping.py checks that this holds.
"""

import pytest

SPREAD_MODULES = {"test_training.py"}


# tryfirst: pytest-xdist's own hook turns the xdist_group marks into the node-id suffix its scheduler
# groups by, so the marks must be there before it runs
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name not in SPREAD_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
