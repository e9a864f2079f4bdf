"""`make test` runs the suite as `pytest -n 2 --dist loadgroup` with the hook of tests/grouping.py:
a module's module-scoped fixture must be built once, on one worker, or every slow fixture (a tiny
`dvc repro`, the servers) is built again on the other worker. Checked on a small suite of its own."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SHARED = '''
import os, time
import pytest

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    with open(os.environ["GROUPING_LOG"], "a") as f:
        f.write(f"fixture {os.getpid()}\\n")
    return 1

@pytest.mark.parametrize("i", range(6))
def test_shared(built, i):
    time.sleep(0.2)
'''

SPREAD = '''
import os, time
import pytest

@pytest.mark.parametrize("i", range(6))
def test_spread(i):
    with open(os.environ["GROUPING_LOG"], "a") as f:
        f.write(f"spread {os.getpid()}\\n")
    time.sleep(0.2)
'''


def test_a_module_s_fixture_is_built_once_and_spread_modules_use_both_workers(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                                       "from grouping import pytest_collection_modifyitems  # noqa: F401\n")
    (suite / "test_shared.py").write_text(SHARED)
    (suite / "test_training.py").write_text(SPREAD)  # a name in SPREAD_MODULES
    log = tmp_path / "log"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                             "-p", "no:cacheprovider", "--rootdir", str(suite), str(suite)],
                            cwd=suite, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "GROUPING_LOG": str(log)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [kind for kind, _ in lines].count("fixture") == 1, lines
    assert len({pid for _, pid in lines}) == 2, lines  # both workers ran tests
