"""Where a command's CPU time goes, by Python process: every Python process the command starts (pytest's
workers, DVC, each stage, Prefect's engines, torchrun's workers) records its own CPU time and command line when
it exits, and the totals are printed by kind of process and by the test that started it.

    python bench/suite_processes.py                     # `make test`
    python bench/suite_processes.py -- pytest tests/test_flows.py -n 0

Each process loads a `sitecustomize` module from a temporary directory put first on PYTHONPATH (it shadows any
other sitecustomize); its atexit hook does the recording, so a process killed by a signal (a server stopped at
the end of a test, a run killed on purpose) is not counted. Issue 30: the suite's CPU time is mostly these
processes' start-up and imports.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDER = '''
import atexit, json, os, resource, sys


def _record():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    line = json.dumps({"argv": sys.argv[:8], "cpu": usage.ru_utime + usage.ru_stime,
                       "test": os.environ.get("PYTEST_CURRENT_TEST", "")})
    with open(os.environ["SUITE_PROCESSES_LOG"], "a") as f:
        f.write(line + "\\n")


atexit.register(_record)
'''


def kind(argv: list[str]) -> str:
    """A process's kind: its script's last two path parts (`pipeline/train.py`, `dvc/__main__.py`; Python puts a
    `-m` module's file there), `-c` for a pytest-xdist worker (execnet's `python -c`)."""
    if "-m" in argv[:-1]:
        return "-m " + argv[argv.index("-m") + 1]
    return "/".join(Path(argv[0] if argv else "?").parts[-2:])


def totals(records: list[dict], key) -> list[tuple[str, int, float]]:
    """(key, processes, CPU seconds) per value of key(record), the most CPU first."""
    count, cpu = collections.Counter(), collections.Counter()
    for r in records:
        count[key(r)] += 1
        cpu[key(r)] += r["cpu"]
    return [(name, count[name], seconds) for name, seconds in cpu.most_common()]


def report(records: list[dict], wall: float, top: int) -> str:
    total = sum(r["cpu"] for r in records)
    lines = [f"{len(records)} Python processes, {total:.0f} s of CPU, {wall:.0f} s of wall time", "",
             "| processes | CPU s | CPU s each | kind |", "|---:|---:|---:|---|"]
    lines += [f"| {n} | {cpu:.1f} | {cpu / n:.2f} | {name} |"
              for name, n, cpu in totals(records, lambda r: kind(r["argv"]))[:top]]
    lines += ["", "| processes | CPU s | test |", "|---:|---:|---|"]
    lines += [f"| {n} | {cpu:.1f} | {name} |" for name, n, cpu in
              totals(records, lambda r: r["test"].split(" (")[0] or "(no test: the runner itself)")[:top]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=25, help="rows per table")
    ap.add_argument("command", nargs="*", default=["make", "test"], help="the command to measure (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "sitecustomize.py").write_text(RECORDER)
        log = Path(tmp, "processes.jsonl")
        env = dict(os.environ, SUITE_PROCESSES_LOG=str(log),
                   PYTHONPATH=os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")])))
        start = time.monotonic()
        done = subprocess.run(args.command, env=env)
        wall = time.monotonic() - start
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    print(report(records, wall, args.top))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
