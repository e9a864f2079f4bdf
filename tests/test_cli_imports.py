"""The stage commands start light: importing them pulls in none of torch, MLflow, Prefect or DVC (those
are imported inside `main()`, after the arguments are parsed), so `python -m pipeline.<stage> --help`
answers without loading them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem not in ("__init__", "common"))
HEAVY = ("torch", "mlflow", "prefect", "dvc", "numpy", "pydantic", "pyarrow")


def test_every_stage_module_is_listed():
    # dvc.yaml's commands and the README's extra entry points
    assert {"check", "prepare", "classifier", "reference", "train", "sample", "score", "compare", "register",
            "exp", "preset"} <= set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_importing_a_stage_loads_no_heavy_library(stage):
    code = (f"import json, sys; import pipeline.{stage}; "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("stage", ["train", "score", "register", "exp"])
def test_help_is_answered_without_the_heavy_libraries(stage):
    # -X importtime lists every module the interpreter imported, on stderr
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", f"pipeline.{stage}", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: python -m pipeline.") or out.stdout.startswith("usage:")
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY), imported & set(HEAVY)
    if stage in ("train", "score"):  # --method: every method of the registry, ECT included
        from dddm.methods import METHODS

        assert f"({', '.join(METHODS)})" in " ".join(out.stdout.split()), out.stdout
