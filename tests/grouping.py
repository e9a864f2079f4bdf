"""How `make test` shares the suite between pytest-xdist workers (`--dist loadgroup --no-loadscope-reorder`).

Each module's tests run on one worker, so its module-scoped fixtures (a tiny `dvc repro`, MLflow
and Prefect servers, a trained run) are built once; the modules in SPREAD_MODULES hold independent
slow tests and are spread over the workers. tests/test_grouping.py checks that this holds.
"""

import pytest

SPREAD_MODULES = {"test_training.py"}
# The longest modules are handed out first, so that no worker starts one near the end while the other
# idles; the spread modules' single tests fill in last (test_training.py lists its longest first).
# Measured under make test on 2026-12-03 (a 2-core AMD EPYC, 18 min 17 s in all; each test's time from
# the worker's previous test to its own end): test_pipeline 7.8 minutes, test_flows 5.8, test_workers 4.0,
# test_tracking 3.5, test_performance 2.8 (torch.compile with an empty inductor cache, as on a fresh
# machine: 2 min alone, 13 s once cached), test_multinode 2.5, test_experiment_lock 0.8. Added 2026-12-07:
# test_multinode's follower test (about 1.7 min alone: a tiny `dvc repro` across two agents) and
# test_gpu_check's CPU smoke run (about 1 min); later that day test_experiment_lock's plain `dvc exp run`
# trial (1.7 min in all), test_refused_before_deletion (0.8, six real `dvc repro`) and test_method_names (0.3).
# test_workers goes second: it does not use the session's tiny repository (conftest.tiny_data), which the first
# module builds while the second would wait for it.
LONGEST_FIRST = ["test_pipeline.py", "test_workers.py", "test_flows.py", "test_multinode.py", "test_tracking.py",
                 "test_performance.py", "test_experiment_lock.py", "test_gpu_check.py",
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
