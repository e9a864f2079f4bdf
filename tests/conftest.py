"""Shared fixtures: the repository's params.yaml as a dict, tiny configurations, a repo copy, run comparison."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# One intra-op thread in this process and in the stages and workers the tests start (they inherit
# the environment): the suite's tensors are tiny, and on a shared 2-core machine OpenMP's spinning
# threads made it several times slower (tests/test_unet.py at load 7: 72 s with 2 threads, 7 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from dddm.config import merge_params as merge  # noqa: E402
from grouping import pytest_collection_modifyitems  # noqa: E402,F401  (a hook: pytest finds it by name)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:  # `flows` and `pipeline` are not installed packages
    sys.path.insert(0, str(ROOT))


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


TINY = {
    "data": {"image_size": 8},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
              "dropout": 0.0, "num_heads": 2},
    # VP here, so that -S method.udddm.process=ve is a real switch
    "method": {"udddm": {"process": "vp", "processes": {"vp": {"T": 100}, "ve": {"T": 100}}}},
    "train": {"epochs": 1, "batch_size": 256, "checkpoint_every": 0, "eval_every": 1, "eval_samples": 160},
    "finetune": {"epochs": 1},
    "sampler": {"edm": {"steps": [4]}},
    "sample": {"num_samples": 160, "batch_size": 160},
    "score": {"classifier_epochs": 1, "batch_size": 512},
    "tracking": {"grid_every_epochs": 0},
}


@pytest.fixture(autouse=True)
def tracking_uri_kept():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI so that subprocesses inherit it: a test that
    calls it would send every later test's `dvc repro` on that worker into its store (a CI failure)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import mlflow

        mlflow.set_tracking_uri(before)


# tracking overrides for a test that reads neither the MLflow model nor the registry: the train stage skips the
# model's export (about 5 s of a tiny train stage) and the register stage has nothing to register
NO_MLFLOW_MODEL = {"log_model": False, "register_models": False}


def tiny_params(**overrides) -> dict:
    return merge(merge(repo_params(), TINY), overrides)


def result_of(run) -> dict:
    """What a dddm.training.train result must reproduce: weights, EMA, x0 estimates and step."""
    return {"model": run.net.state_dict(), "ema": run.ema.state_dict(), "estimates": run.store.estimates(),
            "step": run.global_step}


def assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
    assert torch.equal(a["estimates"], b["estimates"])


def run_env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    # Stages write bytecode as on users' machines (this workplace sets PYTHONDONTWRITEBYTECODE=1, which
    # once hid `__pycache__` under `dddm` changing its DVC hash and retraining every stage).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra)
    return env


def stage_command(repo: Path, name: str) -> list[str]:
    """A stage's command as dvc.yaml declares it (`train@udddm`: a method's, with `--method udddm`, which DVC gives
    in DVC_STAGE), without DVC; the train stage's launcher starts params.yaml's train.nproc workers."""
    from flows.dvcrun import expanded_stages

    declared = expanded_stages(repo)[name]["cmd"].split()
    module = declared.index("-m")
    method = ["--method", name.partition("@")[2]] if "@" in name else []
    return [sys.executable, "-m", *declared[module + 1:], *method]


def copy_repo(dest: Path, outputs: bool = False) -> Path:
    """The repository's source (tracked and untracked-but-not-ignored files, without stage
    outputs a developer may have produced, unless `outputs`) in a fresh git repo at `dest`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        src = ROOT / name
        # the scoring classifier is kept in git (a fresh clone has it); other data/ and out/ files are outputs
        if src.is_file() and (outputs or not name.startswith(("data/", "out/")) or name == "data/classifier.pt"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def dvc_run(repo: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`dvc *args` in `repo` as a user runs it (run_env), its output captured."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=run_env(), capture_output=True,
                          text=True, timeout=timeout)


def stages_run(output: str) -> list[str]:
    """The "Running stage ..." lines of a `dvc repro`'s output."""
    return [line for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, str]:
    """(a committed repository copy with the tiny params whose data stages (check, prepare, classifier, reference)
    have run, the output of that `dvc repro`), made once per session: under xdist the first worker to ask builds
    it and the other waits on a lock. Tests take a copy (`tiny_repo`), in which `dvc repro` finds those stages
    done unless their params change (each test would otherwise pay about 25 s for them)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's directory, above each worker's own
    repo, log = shared / "tiny-data" / "repo", shared / "tiny-data" / "repro.log"
    with open(shared / "tiny-data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not log.is_file():
            shutil.rmtree(repo, ignore_errors=True)  # what a failed build on another worker left
            repo.mkdir(parents=True)
            copy_repo(repo)
            git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
            for cmd in ([*git, "add", "-A"], [*git, "commit", "-qm", "source"]):
                subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
            write_params(repo, tiny_params())
            done = dvc_run(repo, "repro", "reference")
            assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
            log.write_text(done.stdout)
    return repo, log.read_text()


def tiny_repo(tiny_data: tuple[Path, str], dest: Path) -> Path:
    """A copy of tiny_data's repository at `dest` (git history, DVC cache and data stage outputs included)."""
    shutil.copytree(tiny_data[0], dest, symlinks=True)
    return dest


@pytest.fixture
def tiny_copy(tiny_data, tmp_path) -> Path:
    """A copy of the session's tiny repository, its data stages done (tiny_data), for one test."""
    return tiny_repo(tiny_data, tmp_path / "repo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int, **env) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1:port with its store under root (a restart finds its runs again), in its
    own process group (stopped with its workers); returns (process, URI) once /health answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        # without the job runner (two huey consumers, 0.5 GB: GenAI judges this project never asks for)
        env=run_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **env), stdout=open(root / "server.log", "a"),
        stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            return proc, uri
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, 9)
    proc.wait()
    raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])


# Issue 32's trials (test_refused_before_deletion.py, test_method_names.py): `dvc repro` in a session of its own,
# reporting its time and the largest resident memory of any process under it (ru_maxrss of the waited-for
# descendants: DVC, its shell, the stage's Python)
RUN = """
import json, resource, subprocess, sys, time
start = time.monotonic()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": done.returncode, "s": time.monotonic() - start, "stderr": done.stdout + done.stderr,
                  "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def state(repo: Path) -> dict[str, str]:
    """sha256 of params.yaml, dvc.lock and every file under data/ and out/."""
    files = [repo / "params.yaml", repo / "dvc.lock",
             *(p for d in ("data", "out") for p in sorted((repo / d).rglob("*")) if p.is_file())]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def left_running(repo: Path) -> list[str]:
    """The command lines of the processes whose working directory is `repo`."""
    return [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cwd", "cmdline"])
            if p.info["cwd"] == str(repo)]


def repro(repo: Path, *args: str, limit_s: float = 60) -> dict:
    """`dvc repro *args` in `repo`: what RUN reports. Past `limit_s` (a stage that hangs, as a FIFO made the
    prepare stage) its whole session is killed and the test fails."""
    proc = subprocess.Popen([sys.executable, "-c", RUN, sys.executable, "-m", "dvc", "repro", *args], cwd=repo,
                            env=run_env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"dvc repro {' '.join(args)} still ran after {limit_s} s")
    return json.loads(out)


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    return copy_repo(tmp_path / "repo")


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def tmpfs(tmp_path):
    """mount_tmpfs(size, read_only=False): a fresh directory that is a tmpfs of `size` (a full disk, a
    read-only mount); skips where this user may not mount (another test covers the case without one)."""
    mounted = []

    def mount_tmpfs(size: str, read_only: bool = False) -> Path:
        directory = tmp_path / f"tmpfs{len(mounted)}"
        directory.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(directory)
        return directory

    yield mount_tmpfs
    for directory in mounted:
        subprocess.run(["umount", str(directory)], check=True)
