"""bench/gpu_check.py, the one prepared command of a GPU session, in its --cpu-smoke mode: every case gets a row,
those a CPU can run pass, the CUDA-only ones say so."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_env

sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import COMPILE_ON_CPU, wheels_to_install  # noqa: E402


def test_only_the_carried_wheels_missing_or_at_another_version_are_installed():
    carried = {"pydantic": "2.14.3", "pyyaml": "6.0.3", "psutil": "7.2.2"}
    here = {"pyyaml": "6.0.3", "psutil": "5.9.0"}
    assert wheels_to_install(carried, here.get) == ["psutil==7.2.2", "pydantic==2.14.3"]


@pytest.mark.slow
def test_cpu_smoke_gives_every_case_a_row_and_runs_those_a_cpu_can(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out",
                             str(tmp_path), "--peer-dir", str(tmp_path / "no-peer")],
                            cwd=ROOT, env=run_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["case"]: r for r in report["cases"]}
    assert len(rows) == len(report["cases"]) == 28
    assert all(r["case"] in result.stdout for r in report["cases"])  # the table
    status = {name: r["status"] for name, r in rows.items()}
    assert not [s for s in status.values() if s.startswith("failed")], status

    cuda_only = [n for n in rows if "bf16 on" in n or n.endswith("bf16") and "bench_peer" in n or "peak" in n]
    assert len(cuda_only) == 12 and all(status[n] == "skipped: no CUDA" for n in cuda_only)
    compiled = [n for n in rows if n.endswith("bf16 off compiled")]
    assert len(compiled) == 4 and all(status[n] == f"skipped: {COMPILE_ON_CPU}" for n in compiled)
    assert status["throughput: authors' step, bench_peer network, fp32"].startswith("skipped: no checkout")

    ran = [n for n in rows if n not in cuda_only + compiled and "authors'" not in n]
    assert len(ran) == 11 and all(status[n] == "ran" for n in ran), status
    for method in ("udddm store device", "udddm store arrow", "ict", "edm", "ect"):
        row = rows[f"train {method} bf16 off"]
        assert row["final_loss"] > 0 and row["fid_classifier"] > 0 and row["steps"] == 6, row
    assert rows["resume after kill -9"]["weights"] == "equal"  # on the CPU, bit for bit
    assert rows["resume after kill -9"]["resumed_from_step"] < rows["resume after kill -9"]["steps"]
    assert all(0 < rows[f"store: ImageNet-64 per-rank store {where}"]["share_of_step"] < 1
               for where in ("on the device", "spilled to Arrow"))
