"""bench/suite_processes.py: every Python process a command starts is counted once, by kind."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

CHILDREN = ("import subprocess, sys; "
            "[subprocess.run([sys.executable, '-m', 'json.tool', '--help'], capture_output=True) for _ in range(2)]")


def test_each_python_process_of_the_command_is_counted_by_kind():
    command = [sys.executable, str(ROOT / "bench/suite_processes.py"), "--", sys.executable, "-c", CHILDREN]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("3 processes, ")
    assert any(line.startswith("| 2 | ") and line.endswith("| json/tool.py |") for line in lines), done.stdout
    assert any(line.startswith("| 1 | ") and line.endswith("| -c |") for line in lines), done.stdout


def test_accounting_records_are_read_and_each_process_is_named_and_put_under_its_ancestor_s_test():
    sys.path.insert(0, str(ROOT / "bench"))
    from suite_processes import ACCT_V3, accounted, joined, kind

    def record(pid, ppid, utime, stime, comm):  # version 3; 40000 ticks = 5000 x 8^1: comp_t's exponent 1
        return ACCT_V3.pack(0, 3, 0, 0, 0, 0, pid, ppid, 0, 0.0, utime, stime, 0, 0, 0, 0, 0, 0, comm)

    data = record(11, 10, 150, 50, b"python") + record(12, 11, (1 << 13) | 5000, 0, b"git")
    acct = accounted(data)
    assert acct == [{"pid": 11, "ppid": 10, "cpu": 2.0, "comm": "python"},
                    {"pid": 12, "ppid": 11, "cpu": 400.0, "comm": "git"}]
    starts = [{"pid": 11, "argv": ["-u", "-m", "dvc", "repro"], "test": "tests/test_x.py::test_y (call)"}]
    records = joined(acct, starts)
    assert [kind(r["argv"]) for r in records] == ["-m dvc", "[git]"]
    assert [r["test"] for r in records] == ["tests/test_x.py::test_y (call)"] * 2


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("accton"),
                    reason="process accounting needs root and accton (Debian's acct); the test above reads its records")
@pytest.mark.skipif(bool(os.environ.get("SUITE_PROCESSES_ACCT")),
                    reason="inside an --acct run: the kernel keeps one accounting file, which that run holds")
def test_with_acct_every_process_is_counted_python_or_not():
    command = [sys.executable, str(ROOT / "bench/suite_processes.py"), "--acct", "--", sys.executable, "-c",
               CHILDREN + "; subprocess.run(['git', '--version'], capture_output=True)"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("| 2 | ") and line.endswith("| -m json.tool |") for line in done.stdout.splitlines())
    assert any(line.startswith("| 1 | ") and line.endswith("| [git] |") for line in done.stdout.splitlines())


def test_acct_without_accton_is_one_line_before_the_command_runs(tmp_path):
    marker = tmp_path / "ran"
    command = [sys.executable, str(ROOT / "bench/suite_processes.py"), "--acct", "--", "touch", str(marker)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.path.dirname(sys.executable)})  # no sbin: no accton
    assert done.returncode == 1 and not marker.exists()
    assert done.stderr == "suite_processes: --acct needs root and accton (Debian: apt-get install acct)\n"


def test_acct_inside_an_acct_run_is_refused_leaving_the_outer_run_s_accounting_on(tmp_path):
    marker = tmp_path / "ran"
    command = [sys.executable, str(ROOT / "bench/suite_processes.py"), "--acct", "--", "touch", str(marker)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SUITE_PROCESSES_ACCT="1"))
    assert done.returncode == 1 and not marker.exists()
    assert done.stderr == "suite_processes: --acct inside another --acct run (the kernel keeps one accounting file)\n"
