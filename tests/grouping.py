"""How `make test` shares the suite between pytest-xdist workers (`--dist loadgroup --no-loadscope-reorder`).

Each module's tests run on one worker, so its module-scoped fixtures (a tiny `dvc repro`, MLflow
and Prefect servers, a trained run) are built once; the modules in SPREAD_MODULES hold independent
slow tests and are spread over the workers. tests/test_grouping.py checks that this holds.
"""

import pytest

SPREAD_MODULES = {"test_training.py"}
# The longest modules are handed out first, so that no worker starts one near the end while the other
# idles; the spread modules' single tests fill in last. Measured with `--durations=0` under make test:
# on 2026-12-03 (13 min 40 s in all) test_pipeline 6.6 minutes, test_flows 4.7, test_workers 3.1, test_tracking 3.1,
# test_multinode 2.0 (at least: the 60 longest durations summed per module).
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
