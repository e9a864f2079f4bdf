"""Running DVC from Prefect tasks: one command as a subprocess, its output streamed line by line into
the task's log, a timeout that kills the whole process group, and the failures worth retrying."""

from __future__ import annotations

import collections
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

import yaml

BIN = Path(sys.executable).parent

# What a second attempt can cure: killed by a signal (OOM killer, preemption; shells report 128+n),
# the stage timeout, another DVC process holding the repo lock, an unreachable tracking server or
# network, a collective that broke. A bad parameter or a bug fails the same way again: no retry.
TRANSIENT = re.compile(r"exited with (-\d+|137|143)\b|Unable to acquire lock|is unreachable|Connection refused"
                       r"|Connection reset|Temporary failure in name resolution|NCCL (error|timeout)", re.I)


# A stage's own error: `<stage>: <what is wrong>` (pipeline/*.py exit with it; a torchrun worker's is
# followed by torchrun's ChildFailedError report, and every stage's by DVC's "ERROR: failed to reproduce").
STAGE_ERROR = re.compile(r"^(check|prepare|classifier|reference|train|sample|score|compare|register): ")
NOT_THE_STAGE = re.compile(r"^(ERROR:|Traceback|\s+File |\[\d|\[rank|=+$|[a-z_.]*Error\b|torch\.distributed)")

# DVC's lines that each task would repeat: a `dvc repro` names every unchanged stage it checked (a matrix's
# methods; condensed into one line), and after every stage it runs says it updates dvc.lock and advises
# git/autostage/push (dropped from the log: the flow saves the experiment itself).
SKIPPED = re.compile(r"^Stage '(.+)' didn't change, skipping$")
ADVICE = re.compile(r"^(Updating lock file |Data and pipelines are up to date\.|To track the changes with git, run:|"
                    r"To enable auto staging, run:|\s*git add |\s*dvc config core\.autostage|"
                    r"Use `dvc push` to send your updates to remote storage\.)")
STARTED = re.compile(r"^Running stage '.+':$")  # DVC, as each stage of a `dvc repro` starts


class CondensedLog:
    """DVC's output for a task's log: the ADVICE lines dropped, a run of SKIPPED lines as one line."""

    def __init__(self, logger):
        self.logger, self.skipped = logger, []

    def line(self, text: str) -> bool:
        """Log `text` unless it is one of DVC's repeated lines; True when it was logged as it is."""
        skipped = SKIPPED.match(text)
        if skipped:
            self.skipped.append(skipped.group(1))
            return False
        if ADVICE.match(text):
            return False
        self.flush()
        self.logger.info(text)
        return True

    def flush(self) -> None:
        if self.skipped:
            self.logger.info("unchanged, not run: %s", ", ".join(self.skipped))
            self.skipped = []


def stage_error(lines) -> str | None:
    """The last error block a stage printed (its first line and the lines that explain it), if any."""
    lines = list(lines)
    starts = [i for i, line in enumerate(lines) if STAGE_ERROR.match(line)]
    if not starts:
        return None
    block = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1:starts[-1] + 20]:
        if NOT_THE_STAGE.match(line):
            break
        block.append(line)
    return "\n".join(block)


class StageFailed(RuntimeError):
    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a stage only when its failure looks transient."""
    try:
        state.result()
    except StageFailed as e:
        return e.transient
    except Exception:
        return False
    return False


def env() -> dict[str, str]:
    """The stage commands (`python -m ...`, `torchrun`) resolve to this interpreter's environment."""
    out = dict(os.environ)
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    out.setdefault("PYTHONUNBUFFERED", "1")   # stage output reaches the log as it is printed
    out.setdefault("TQDM_MININTERVAL", "30")  # progress bars: a log line every 30 s, not every step
    out["DVC_NO_ANALYTICS"] = "1"
    return out


def run(args: list[str], repo: Path, logger, timeout_s: float | None = None, extra_env: dict | None = None,
        what: str | None = None) -> None:
    """`dvc <args>` in `repo`; every output line goes to `logger`. Raises StageFailed naming the last
    lines of output when it fails or runs past `timeout_s` (then its process group is killed)."""
    what = what or "dvc " + " ".join(args)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    said: collections.deque[str] = collections.deque(maxlen=200)  # from a stage's first `<stage>: ` line on
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, env=env() | (extra_env or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)  # its own process group: a timeout kills torchrun's workers too
    timed_out = threading.Event()
    log = CondensedLog(logger)

    def kill(sig=signal.SIGTERM) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def on_timeout() -> None:
        timed_out.set()
        kill()
        threading.Timer(30, kill, (signal.SIGKILL,)).start()

    watchdog = threading.Timer(timeout_s, on_timeout) if timeout_s else None
    try:
        if watchdog:
            watchdog.daemon = True
            watchdog.start()
        for line in proc.stdout:  # universal newlines: a progress bar's "\r" ends a line too
            if line.strip():
                if STARTED.match(line):  # a failure's message quotes the stage that failed, not those before it
                    tail.clear()
                    said.clear()
                if log.line(line.rstrip()):  # and what the log shows of it, not DVC's repeated lines
                    tail.append(line.rstrip())
                if said or STAGE_ERROR.match(line):
                    said.append(line.rstrip())
        rc = proc.wait()
        log.flush()
    finally:
        if watchdog:
            watchdog.cancel()
        if proc.poll() is None:  # interrupted (cancelled flow run, Prefect timeout): stop the stage too
            kill()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                kill(signal.SIGKILL)
    if timed_out.is_set():
        raise StageFailed(f"{what}: timed out after {timeout_s:.0f} s", transient=True)
    if rc:
        text = "\n".join(tail)
        cause = stage_error(said)
        if cause:  # the stage's own words, not the launcher's traceback, are the failure message
            logger.error("%s failed: %s", what, cause)
        raise StageFailed(f"{what} failed (exit status {rc}): {cause or text}",
                          transient=rc < 0 or bool(TRANSIENT.search(text)))


def stages(repo: Path) -> list[str]:
    """The stage names of dvc.yaml, in their declared (dependency) order, but a method matrix with no methods
    (`finetune` when `finetune.methods` is empty): `dvc repro` of it runs the whole pipeline."""
    expanded = {name.split("@")[0] for name in expanded_stages(repo)}
    return [name for name in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"] if name in expanded]


def compared_methods(params: dict) -> list[str]:
    """The methods a run trains, samples and scores: from scratch (`methods`), then fine-tuned."""
    return list(params["methods"]) + list(params["finetune"]["methods"])


def expanded_stages(repo: Path, params: dict | None = None) -> dict[str, dict]:
    """dvc.yaml's stages with each method matrix expanded (`train@edm`, `finetune@ect`, ...) and
    `${item.method}` filled in from the params list it names (`${methods}`, `${finetune.methods}`) of `params`
    (default: params.yaml's): the one place the flows learn the pipeline's paths from."""
    stages_ = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    from dddm.sections import read_yaml

    if params is None:
        params = read_yaml((repo / "params.yaml").read_text(), str(repo / "params.yaml"))
    out = {}
    for name, stage in stages_.items():
        if "matrix" not in stage:
            out[name] = stage
            continue
        methods = params
        for key in stage["matrix"]["method"].removeprefix("${").removesuffix("}").split("."):
            methods = methods[key]
        body = yaml.safe_dump({k: v for k, v in stage.items() if k != "matrix"})
        for method in methods:
            out[f"{name}@{method}"] = yaml.safe_load(body.replace("${item.method}", method))
    return out


def _paths(stage: dict, kinds=("outs", "metrics", "plots")) -> list[tuple[str, dict]]:
    return [(next(iter(e)), next(iter(e.values())) or {}) if isinstance(e, dict) else (e, {})
            for kind in kinds for e in stage.get(kind) or []]


def outputs(repo: Path, params: dict | None = None) -> dict[str, bool]:
    """Every output dvc.yaml declares under `params` (default: params.yaml's), files and directories, each
    mapped to whether DVC caches it."""
    return {path: opts.get("cache", True) is not False for stage in expanded_stages(repo, params).values()
            for path, opts in _paths(stage)}


def uncached_outputs(repo: Path) -> list[str]:
    """Outputs declared `cache: false` (metrics, run references): `dvc checkout` cannot restore them."""
    return [path for path, cached in outputs(repo).items() if not cached]


def method_outputs(repo: Path, method: str) -> dict[str, Path]:
    """Where a method's scores (`metrics`) and MLflow run reference (`run`) are, as dvc.yaml declares them."""
    stages_ = expanded_stages(repo)
    score = next((stages_[f"{n}@{method}"] for n in ("score", "score_finetuned") if f"{n}@{method}" in stages_), None)
    if score is None:
        raise ValueError(f"method {method!r} is not in params.yaml's methods or finetune.methods")
    train = next(stages_[f"{n}@{method}"] for n in ("train", "finetune") if f"{n}@{method}" in stages_)
    metrics = _paths(score, ("metrics",))[0][0]
    run = next(p for p, _ in _paths(train, ("outs",)) if p.endswith("mlflow_run.json"))
    return {"metrics": repo / metrics, "run": repo / run}


def set_params(overrides: dict[str, Any] | None) -> list[str]:
    """{"diffusion.kind": "ve", "sample.steps": [1, 2]} -> `dvc exp run -S` strings (Hydra override
    grammar, values as JSON: quoted strings, lists, null)."""
    return [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()]


def check_override_keys(params: dict, keys: Iterable[str] | None) -> None:
    """Every override names a key params.yaml has; else an error naming it and the nearest keys (DVC's own
    message would suggest `+key`, which adds a key the project then rejects)."""
    for key in keys or ():
        node, parts = params, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                parent = ".".join(parts[:depth]) or "params.yaml"
                known = sorted(node) if isinstance(node, dict) else []
                close = difflib.get_close_matches(part, known, n=1)
                hint = f"did you mean {'.'.join(parts[:depth] + close)}?" if close else \
                    f"{parent} has {', '.join(known) or 'no keys below it'}"
                raise ValueError(f"{key} is not a key of params.yaml; {hint}")
            node = node[part]


def check_sets(params_file: Path, sets: list[str]) -> dict:
    """`-S key=value` strings checked as every stage checks params.yaml, without changing `params_file`: each
    key is one it has (`+key` adds one, which the validation then names) and the result validates. Returns
    the params the overrides give (applied by DVC's own `-S` code to a copy)."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    from dddm.config import parse_config
    from dddm.sections import read_yaml

    check_override_keys(read_yaml(params_file.read_text(), str(params_file)),
                        [s.split("=", 1)[0] for s in sets if not s.startswith(("+", "~"))])
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copyfile(params_file, copy)
        dvc_apply_overrides(copy, sets)
        source = f"{params_file.name} with the -S overrides"  # the error names the key and its value
        params = read_yaml(copy.read_text(), source) or {}
    parse_config(params, source)
    return params


def write_sets(params_file: Path, sets: list[str]) -> None:
    """Apply `-S` strings to `params_file` once they are checked (a bad key or value fails here, naming it,
    before the file changes), writing only the values that change: comments, `[1, 2]` lists and `null`
    stay as they are, where DVC's own writer would rewrite the whole file (dddm/params_file.py)."""
    from dddm.params_file import rewrite

    if sets:
        new = check_sets(params_file, sets)
        rewrite(params_file, yaml.safe_load(params_file.read_text()) or {}, new)


def apply_overrides(repo: Path, overrides: dict[str, Any] | None) -> list[str]:
    """Write the overrides into params.yaml (write_sets: checked first, the layout kept)."""
    sets = set_params(overrides)
    write_sets(repo / "params.yaml", sets)
    return sets


class RepositoryBusy(RuntimeError):
    """Another DVC operation holds the repository."""


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def dvc_holders(repo: Path) -> list[str]:
    """The DVC operations in `repo` now, as 'pid N: command'. DVC holds its repository lock
    (`.dvc/tmp/lock`) between stages but releases it while a stage's command runs; the running stage's
    paths are then in `.dvc/tmp/rwlock` with its pid. Both are read, neither is taken or written."""
    import zc.lockfile

    tmp, holders = repo / ".dvc" / "tmp", []
    if (tmp / "lock").is_file():
        try:
            zc.lockfile.SimpleLockFile(str(tmp / "lock")).close()  # does not write: the holder's pid stays
        except zc.lockfile.LockError:
            holders.append(f"pid {(tmp / 'lock').read_text().strip() or 'unknown'}: holds .dvc/tmp/lock")
    try:
        rwlock = json.loads((tmp / "rwlock").read_text())
    except (OSError, ValueError):
        rwlock = {}
    entries = [*(rwlock.get("write") or {}).values(), *(e for v in (rwlock.get("read") or {}).values() for e in v)]
    for entry in entries:
        if isinstance(entry, dict) and _alive(entry.get("pid")):
            holders.append(f"pid {entry['pid']}: {entry.get('cmd', '')}"[:200])
    return list(dict.fromkeys(holders))


def refuse_if_busy(repo: Path) -> None:
    """RepositoryBusy naming the holder when another DVC operation (a `dvc repro`, `dvc exp run`, ...) is at
    work in the repository. Called before anything writes params.yaml: `dvc exp run` rewrites it before it
    finds the repository busy, and the running operation then records those params for outputs made
    with others (README, Known issues)."""
    holders = dvc_holders(repo)
    if holders:
        raise RepositoryBusy(f"another DVC operation is at work in {repo.resolve()} ({'; '.join(holders)}); "
                             f"nothing was changed: start the experiment when it has finished")


def untracked_gitignores(repo: Path) -> list[str]:
    """The .gitignore files git does not track yet (DVC writes one beside each cached output)."""
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    return [path for path in listed if Path(path).name == ".gitignore"]


def has_git_remote(repo: Path, name: str) -> bool:
    return subprocess.run(["git", "remote", "get-url", name], cwd=repo, capture_output=True).returncode == 0


def has_commit(repo: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=repo,
                          capture_output=True).returncode == 0


def remotes(repo: Path) -> tuple[dict[str, str], str | None]:
    """DVC's remotes ({name: url}, from every config level) and the default one's name (`dvc remote default`)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        config = dvc_repo.config
        return {name: conf.get("url", "") for name, conf in config.get("remote", {}).items()}, \
            config.get("core", {}).get("remote")

