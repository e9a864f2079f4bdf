"""A run's processes end with the process that started them (Linux), from their first lines: this module
imports nothing heavy, so the guards run before torch is imported (seconds, during which a worker of a
killed launcher would otherwise live on and then train).

- A torchrun worker dies with its agent (`die_with_launcher`): torchrun starts workers in sessions of
  their own, so a kill of the launching process group does not reach them.
- The train stage's launcher (`pipeline.launch`, the torchrun agent), run by DVC, stops with DVC
  (`stop_with_stage`): DVC exits on SIGTERM without stopping its command, and `/bin/sh -c` (DVC's shell
  when $SHELL is unset) does not exec that command, so the launcher watches the nearest ancestor that is
  not a shell and SIGTERMs itself when it ends; torchrun's agent then stops its workers. Started by hand
  (another node's agent, under nohup or srun) it is left alone, as torchrun is.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish"}


def kill_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send `sig` to this process when its parent dies."""
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent_of(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def die_with_launcher() -> None:
    """Under torchrun (Linux): SIGKILL this worker when the torchrun agent dies."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    kill_with_parent()
    # The launcher may have died before the prctl: then this process was re-parented already.
    launcher = b"torch" in _cmdline(parent) or b"pipeline.launch" in _cmdline(parent)
    if os.getppid() != parent or not launcher:
        raise SystemExit(f"worker {os.getpid()}: its torchrun launcher is gone (parent is now pid {os.getppid()})")


def stage_process() -> int | None:
    """The nearest ancestor that is not a shell (DVC, a flow's task, srun); None when that is init."""
    pid = os.getppid()
    try:
        while pid > 1 and Path(f"/proc/{pid}/comm").read_text().strip() in SHELLS:
            pid = _parent_of(pid)
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid > 1 else None


def stop_with_stage() -> None:
    """Under DVC (which sets DVC_STAGE for a stage's command): SIGTERM this process when its parent dies,
    or when the stage's process (`stage_process`) ends."""
    if not sys.platform.startswith("linux") or "DVC_STAGE" not in os.environ:
        return
    parent = os.getppid()
    kill_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the prctl
        raise SystemExit(f"launcher {os.getpid()}: the process that started it is gone")
    watched = stage_process()
    if watched is None or watched == parent:
        return
    try:
        handle = os.pidfd_open(watched)
    except ProcessLookupError:
        raise SystemExit(f"launcher {os.getpid()}: the stage's process {watched} is gone") from None

    def watch() -> None:
        select.select([handle], [], [])  # readable once the process has ended
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-stage", daemon=True).start()


def continue_stopped_workers() -> None:
    """In torchrun's agent: once a worker has ended, continue (SIGCONT) any that is stopped. When one fails the
    agent SIGTERMs the others and waits a fixed 30 s before SIGKILL, and a stopped worker (SIGSTOP, a debugger)
    takes no SIGTERM until it runs again."""
    import time

    import psutil

    def watch() -> None:
        me, seen = psutil.Process(), set()
        while True:
            workers = me.children()
            if seen - {w.pid for w in workers}:  # one has ended (the agent reaps its workers)
                for worker in workers:
                    try:
                        if worker.status() == psutil.STATUS_STOPPED:
                            worker.resume()
                    except psutil.Error:  # ended meanwhile
                        pass
            seen |= {w.pid for w in workers}
            time.sleep(0.5)

    threading.Thread(target=watch, name="continue-stopped-workers", daemon=True).start()
