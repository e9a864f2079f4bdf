"""How `make test` shares the suite between pytest-xdist workers (`--dist loadgroup --no-loadscope-reorder`).

Each module's tests run on one worker, so its module-scoped fixtures (a tiny `dvc repro`, MLflow
and Prefect servers, a trained run) are built once; the modules in SPREAD_MODULES hold independent
slow tests and are spread over the workers. tests/test_grouping.py checks that this holds.
"""

import pytest

SPREAD_MODULES = {"test_training.py"}
# The longest modules are handed out first, so that no worker starts one near the end while the other
# idles; the spread modules' single tests fill in last. Measured with `--durations=0` under make test:
# test_pipeline about 6 minutes, test_flows 3.5, test_tracking 1.5; test_workers 9.4 and test_multinode 6 on
# their own (9.4 and 8.2 in a later run) while other jobs loaded the machine to 10-20 (not measured under make test).
LONGEST_FIRST = ["test_pipeline.py", "test_workers.py", "test_flows.py", "test_multinode.py", "test_tracking.py"]


def handed_out(item) -> int:
    name = item.path.name
    if name in LONGEST_FIRST:
        return LONGEST_FIRST.index(name)
    return len(LONGEST_FIRST) + (name in SPREAD_MODULES)


# tryfirst: pytest-xdist's own hook turns the xdist_group marks into the node-id suffix its scheduler
# groups by, so the marks must be there before it runs
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    items.sort(key=handed_out)  # stable: each module's tests keep their order
    for item in items:
        if item.path.name not in SPREAD_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
