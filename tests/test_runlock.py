"""The run-directory lock: a second holder is refused naming the first; a killed holder frees it."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, run_env
from dddm import runlock
from dddm.distributed import init

HOLDER = """
import sys, time
from pathlib import Path
from dddm import runlock
from dddm.distributed import init
runlock.acquire(Path(sys.argv[1]), init("cpu"))
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_holder_is_refused_naming_the_first_until_it_is_killed(tmp_path):
    world = init("cpu")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=run_env(PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLocked, match=rf"{tmp_path}: another trainer is running .*\"pid\": "
                                                    rf"{holder.pid}, \"host\": \"{socket.gethostname()}\""):
            runlock.acquire(tmp_path, world)
        assert json.loads((tmp_path / runlock.LOCK_FILE).read_text())["started"]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with runlock.hold(tmp_path, world):  # the kernel dropped the dead holder's lock
        assert json.loads((tmp_path / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_within_a_process_and_released_after_the_last_exit(tmp_path):
    world = init("cpu")
    with runlock.hold(tmp_path, world):
        with runlock.hold(tmp_path, world):
            pass
        probe = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(120)", ""), str(tmp_path)],
                               capture_output=True, text=True, env=run_env(PYTHONPATH=str(ROOT)))
        assert probe.returncode != 0 and "another trainer is running" in probe.stderr
    probe = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(120)", ""), str(tmp_path)],
                           capture_output=True, text=True, env=run_env(PYTHONPATH=str(ROOT)))
    assert probe.returncode == 0, probe.stderr
