"""One trainer per run directory: an exclusive flock on `<run_dir>/trainer.lock`, taken by rank 0.

The kernel drops the lock when its holder dies (kill -9 included), so a stale lock never blocks a
rerun. The file records the holder (pid, host, start time), so a second trainer on the same run
directory fails at once naming it, before it reads or touches a checkpoint or the x0 store.
The lock is re-entrant within a process (the train stage takes it before its MLflow run, and
`dddm.training.train` again around the loop).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from . import distributed

LOCK_FILE = "trainer.lock"

_held: dict[Path, list] = {}  # lock path -> [open file, re-entry count]


class RunLocked(RuntimeError):
    """Another trainer holds the run directory."""


def _acquire_here(run_dir: Path) -> Path:
    path = (run_dir / LOCK_FILE).resolve()
    if path in _held:
        _held[path][1] += 1
        return path
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown (it has not written its details yet)"
        f.close()
        raise RunLocked(f"{run_dir}: another trainer is running on this run directory ({path}: {holder}); "
                        f"wait for it to finish or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    f.flush()
    _held[path] = [f, 1]
    return path


def _release_here(path: Path) -> None:
    entry = _held[path]
    entry[1] -= 1
    if entry[1] == 0:
        del _held[path]
        entry[0].close()  # closing the file drops the flock


def acquire(run_dir: Path, world) -> Path | None:
    """Rank 0 takes the lock (re-entrant); every rank raises RunLocked naming the holder if it is taken.
    Returns the lock path on rank 0 (for `release`), None elsewhere."""
    path, error = None, None
    if world.is_main:
        try:
            path = _acquire_here(Path(run_dir))
        except RunLocked as e:
            error = str(e)
    error = distributed.all_gather_objects(error)[0]
    if error:
        raise RunLocked(error)
    return path


@contextmanager
def hold(run_dir: Path, world):
    """The lock for the duration of a with-block."""
    path = acquire(run_dir, world)
    try:
        yield
    finally:
        if path is not None:
            _release_here(path)


@contextmanager
def hold_here(run_dir: Path):
    """The lock in this process alone, outside any process group (pipeline.prune, before it removes a run
    directory): RunLocked while a trainer runs there."""
    path = _acquire_here(Path(run_dir))
    try:
        yield
    finally:
        _release_here(path)
