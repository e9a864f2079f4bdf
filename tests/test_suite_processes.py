"""bench/suite_processes.py: every Python process a command starts is counted once, by kind."""

import subprocess
import sys

from conftest import ROOT

CHILDREN = ("import subprocess, sys; "
            "[subprocess.run([sys.executable, '-m', 'json.tool', '--help'], capture_output=True) for _ in range(2)]")


def test_each_python_process_of_the_command_is_counted_by_kind():
    command = [sys.executable, str(ROOT / "bench/suite_processes.py"), "--", sys.executable, "-c", CHILDREN]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("3 Python processes, ")
    assert any(line.startswith("| 2 | ") and line.endswith("| json/tool.py |") for line in lines), done.stdout
    assert any(line.startswith("| 1 | ") and line.endswith("| -c |") for line in lines), done.stdout
