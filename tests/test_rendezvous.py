"""torchrun's loopback rendezvous (dddm/rendezvous.py): two gloo workers, no listener off 127.0.0.1."""

import re
import subprocess

import psutil
import pytest

from conftest import ROOT, run_env
from dddm.distributed import torchrun_args, torchrun_command

# Rank 0 reports every listening TCP socket of the torchrun agent (its parent) and of all its workers,
# once the process group is up and one collective has gone through.
LISTENERS = """
import os, psutil, torch, torch.distributed as dist
dist.init_process_group("gloo")
dist.all_reduce(torch.ones(1))
if dist.get_rank() == 0:
    agent = psutil.Process(os.getppid())
    pids = {agent.pid, *(p.pid for p in agent.children())}
    found = sorted({(c.laddr.ip, c.pid) for c in psutil.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN and c.pid in pids})
    print("LISTEN", len(pids), found, flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_workers_listen_on_loopback_only(tmp_path):
    script = tmp_path / "listeners.py"
    script.write_text(LISTENERS)
    result = subprocess.run([*torchrun_command(2), str(script)], env=run_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    [report] = [line for line in result.stdout.splitlines() if line.startswith("LISTEN")]
    _, processes, found = report.split(" ", 2)
    listeners = eval(found)  # noqa: S307 - the list the worker above printed
    assert processes == "3" and len({pid for _, pid in listeners}) == 3, report  # the agent and both workers
    assert {ip for ip, _ in listeners} == {"127.0.0.1"}, report


def test_the_loopback_backend_refuses_several_machines(tmp_path):
    script = tmp_path / "noop.py"
    script.write_text("")
    result = subprocess.run([*torchrun_command(1)[:3], "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=loopback",
                             str(script)], env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--rdzv-backend=loopback runs on one machine: got --nnodes=2" in result.stderr


def test_no_param_reaches_a_stage_command_and_one_node_trains_through_the_loopback_backend():
    """dvc.yaml interpolates no params.yaml value into a command (DVC runs commands through a shell, and
    `dvc repro -s` skips the check stage): the train stage's launcher reads train.nproc itself."""
    import yaml

    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        assert not set(re.findall(r"\$\{([^}]*)\}", stage["cmd"])) - {"item.method"}, name
    train = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    assert train.split()[:4] == ["python", "-m", "pipeline.launch", "pipeline.train"]
    assert torchrun_args(2) == ["--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=loopback",
                                "--rdzv-endpoint=127.0.0.1:0"]
