"""`-S` overrides are checked by the project before DVC changes any file: `python -m pipeline.exp` (the
terminal's `dvc exp run`) and the flows name the key and the nearest one, never DVC's `+key` advice."""

import subprocess
import sys

import pytest

from conftest import ROOT


def exp(*sets: str) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("-S", s)]
    return subprocess.run([sys.executable, "-m", "pipeline.exp", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("override, message", [
    ("train.epoch=2", "exp: train.epoch is not a key of params.yaml; did you mean train.epochs?"),
    ("train.epochs=0", "exp: params.yaml with -S sample.num_samples=16 -S train.epochs=0: train.epochs: Input should "
                       "be greater than or equal to 1 (got 0)"),
    ("+train.epoch=2", "exp: params.yaml with -S sample.num_samples=16 -S +train.epoch=2: train.epoch: Extra inputs "
                       "are not permitted"),
])
def test_exp_run_from_the_terminal_names_a_bad_override_before_dvc_runs(override, message):
    before = (ROOT / "params.yaml").read_bytes()
    failed = exp("sample.num_samples=16", override)
    assert failed.returncode == 1 and message in failed.stderr, failed.stderr
    assert "+train" not in failed.stderr.replace("-S +train.epoch=2", "")  # not DVC's hint to add the key
    assert "Running stage" not in failed.stdout + failed.stderr
    assert (ROOT / "params.yaml").read_bytes() == before


def test_checked_overrides_leave_params_yaml_as_it_was(tmp_path):
    from flows.dvcrun import check_sets

    params = tmp_path / "params.yaml"
    params.write_bytes((ROOT / "params.yaml").read_bytes())
    check_sets(params, ["method.udddm.process=vp", "sampler.udddm.steps=[1,2,4]"])
    assert params.read_bytes() == (ROOT / "params.yaml").read_bytes()
    with pytest.raises(ValueError, match=r"method.udddm.process: .*'subvp' is not one of vp, ve"):
        check_sets(params, ["method.udddm.process=subvp"])
