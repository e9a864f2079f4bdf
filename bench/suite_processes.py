"""Where a command's CPU time goes, by Python process: every Python process the command starts (pytest's
workers, DVC, each stage, Prefect's engines, torchrun's workers) records its own CPU time and command line when
it exits, and the totals are printed by kind of process and by the test that started it.

    python bench/suite_processes.py                     # `make test`
    python bench/suite_processes.py -- pytest tests/test_flows.py -n 0

Each process loads a `sitecustomize` module from a temporary directory put first on PYTHONPATH (it shadows any
other sitecustomize); its atexit hook does the recording, so a process killed by a signal (a server stopped at
the end of a test, a run killed on purpose) is not counted. Issue 30: the suite's CPU time is mostly these
processes' start-up and imports.

    python bench/suite_processes.py --acct              # every process, as root with `accton` (Debian's acct)

With --acct the kernel's process accounting records the CPU time of every process that ends, by a signal or
not, Python or not (git, the compiler torch.compile runs, a forked worker), and each Python process records
its command line and test as it starts; a process without a record of its own is named by its command and
counted under its nearest recorded ancestor's test.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import struct
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
# --acct: each Python process's command line and test, as it starts (the kernel records its CPU time at the end)
START_RECORDER = '''
import json, os
with open(os.environ["SUITE_PROCESSES_LOG"], "a") as f:
    argv = open("/proc/self/cmdline", "rb").read().decode(errors="replace").split("\\0")[:-1]
    f.write(json.dumps({"pid": os.getpid(), "argv": argv[1:9],
                        "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\\n")
'''
# struct acct_v3 (linux/acct.h): flag, version, tty, exit code, uid, gid, pid, ppid, begin time, elapsed (float),
# then utime, stime, mem, io, rw, minflt, majflt, swaps as comp_t, then the command name (16 bytes)
ACCT_V3 = struct.Struct("<BBHIIIIIIf8H16s")
AHZ = 100  # comp_t's clock ticks per second
ACCT_RUN = "SUITE_PROCESSES_ACCT"  # set for the command of an --acct run


def comp_t(value: int) -> int:
    """A comp_t: a 13-bit mantissa and a 3-bit base-8 exponent."""
    return (value & 0x1FFF) << (3 * (value >> 13))


def accounted(data: bytes) -> list[dict]:
    """The process accounting file's records (version 3): pid, ppid, CPU seconds, command name."""
    records = []
    for offset in range(0, len(data) - ACCT_V3.size + 1, ACCT_V3.size):
        fields = ACCT_V3.unpack_from(data, offset)
        if fields[1] != 3:
            raise ValueError(f"process accounting record version {fields[1]} (this reads version 3)")
        records.append({"pid": fields[6], "ppid": fields[7], "cpu": (comp_t(fields[10]) + comp_t(fields[11])) / AHZ,
                        "comm": fields[18].split(b"\0")[0].decode(errors="replace")})
    return records


def outlived(starts: list[dict], limit_s: float = 60) -> None:
    """Wait (`limit_s` at most) for the recorded processes that outlive the command to end: the kernel writes a
    process's record when it ends, and pytest returns before its xdist workers have exited."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and any(Path(f"/proc/{s['pid']}").exists() for s in starts):
        time.sleep(0.2)


def joined(acct: list[dict], starts: list[dict]) -> list[dict]:
    """The accounting records as the report's records: a process with a start record keeps its argv and test;
    another is named by its command (`[git]`) and takes its nearest recorded ancestor's test."""
    started = {s["pid"]: s for s in starts}
    parent = {r["pid"]: r["ppid"] for r in acct}
    records = []
    for r in acct:
        pid, test = r["pid"], ""
        for _ in range(64):  # up the tree to a recorded ancestor
            if pid in started:
                test = started[pid]["test"]
                break
            pid = parent.get(pid)
        own = started.get(r["pid"])
        records.append({"argv": own["argv"] if own else [f"[{r['comm']}]"], "cpu": r["cpu"], "test": test})
    return records


def kind(argv: list[str]) -> str:
    """A process's kind from its argv as Python's sys.argv has it (the script's or the `-m` module's file first,
    `-c` for a pytest-xdist worker) or as its command line has it after the interpreter (--acct: `-m dvc`, a
    script's path after any options); the script's last two path parts (`pipeline/train.py`)."""
    if argv[:1] and argv[0].startswith("["):  # a process without a start record: its command name
        return argv[0]
    args = iter(argv)
    for arg in args:
        if arg == "-m":
            return "-m " + next(args, "?")
        if arg == "-c":
            return "-c"
        if arg in ("-X", "-W"):
            next(args, None)
        elif not arg.startswith("-"):
            return "/".join(Path(arg).parts[-2:])
    return "?"


def totals(records: list[dict], key) -> list[tuple[str, int, float]]:
    """(key, processes, CPU seconds) per value of key(record), the most CPU first."""
    count, cpu = collections.Counter(), collections.Counter()
    for r in records:
        count[key(r)] += 1
        cpu[key(r)] += r["cpu"]
    return [(name, count[name], seconds) for name, seconds in cpu.most_common()]


def report(records: list[dict], wall: float, top: int) -> str:
    total = sum(r["cpu"] for r in records)
    lines = [f"{len(records)} processes, {total:.0f} s of CPU, {wall:.0f} s of wall time", "",
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
    ap.add_argument("--acct", action="store_true",
                    help="every process, by the kernel's process accounting (root, accton)")
    ap.add_argument("command", nargs="*", default=["make", "test"], help="the command to measure (after --)")
    args = ap.parse_args()
    if args.acct and os.environ.get(ACCT_RUN):
        # the kernel keeps one accounting file: a nested run's `accton off` would end the outer run's records
        sys.exit("suite_processes: --acct inside another --acct run (the kernel keeps one accounting file)")
    if args.acct and (os.geteuid() != 0 or not shutil.which("accton")):
        sys.exit("suite_processes: --acct needs root and accton (Debian: apt-get install acct)")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "sitecustomize.py").write_text(START_RECORDER if args.acct else RECORDER)
        log, pacct = Path(tmp, "processes.jsonl"), Path(tmp, "pacct")
        env = dict(os.environ, SUITE_PROCESSES_LOG=str(log),
                   PYTHONPATH=os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")])))
        if args.acct:
            env[ACCT_RUN] = "1"
            pacct.touch()
            subprocess.run(["accton", str(pacct)], check=True, capture_output=True)
        start = time.monotonic()
        try:
            done = subprocess.run(args.command, env=env)
        finally:
            wall = time.monotonic() - start
            records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            if args.acct:
                outlived(records)
                subprocess.run(["accton", "off"], check=True, capture_output=True)
        if args.acct:
            records = joined(accounted(pacct.read_bytes()), records)
    print(report(records, wall, args.top))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
