"""`make env` (under `make repro` and `make test`) on a disk without room for the virtual environment: one line
naming what it needs and what is free, before pip starts (a CI run's pip failed after 90 s, "No space left")."""

import shutil
import subprocess

from conftest import ROOT


def test_make_env_refuses_a_disk_without_room_for_the_venv_before_creating_it(tmpfs):
    repo = tmpfs("64m")
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, repo / name)
    done = subprocess.run(["make", "env"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"make: .venv needs about 7 GB (torch with its CUDA libraries), 0.1 GB free in {repo}" in done.stderr
    assert not (repo / ".venv").exists()
