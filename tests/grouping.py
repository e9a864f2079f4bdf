"""How `make test` shares the suite between pytest-xdist workers (`--dist loadgroup --no-loadscope-reorder`).

Each module's tests run on one worker, so its module-scoped fixtures (a tiny `dvc repro`, MLflow
and Prefect servers, a trained run) are built once; the modules in SPREAD_MODULES hold independent
slow tests and are spread over the workers. tests/test_grouping.py checks that this holds.
"""

import pytest

SPREAD_MODULES = {"test_training.py"}
# The longest modules are handed out first, so that no worker starts one near the end while the other
# idles; the spread modules' single tests fill in last (test_training.py lists its longest first).
# Measured in a fresh clone's CI run on 2026-12-07 (a 2-core AMD EPYC, 16 min 24 s in all; seconds of a worker,
# summed over the module's tests among the 60 longest): test_pipeline 355, test_flows 340, test_training 156
# (spread), test_tracking 153, test_workers 152, test_multinode 143, test_experiment_lock 74, test_performance 65
# (torch.compile with an empty inductor cache, as on a fresh machine; about 12 s once cached). README, "The
# suite's time".
# test_performance goes second: it does not use the session's tiny repository (conftest.tiny_data), which the
# first module builds while the second would wait for it.
LONGEST_FIRST = ["test_pipeline.py", "test_performance.py", "test_workers.py", "test_flows.py", "test_multinode.py",
                 "test_tracking.py", "test_experiment_lock.py", "test_gpu_check.py",
                 "test_refused_before_deletion.py", "test_method_names.py"]


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
