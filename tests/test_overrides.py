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
    ("train.epochs=0", "exp: params.yaml with the -S overrides: train.epochs: Input should be greater than or equal "
                       "to 1 (got 0)"),
    ("+train.epoch=2", "exp: params.yaml with the -S overrides: train.epoch: Extra inputs are not permitted"),
])
def test_exp_run_from_the_terminal_names_a_bad_override_before_dvc_runs(override, message):
    before = (ROOT / "params.yaml").read_bytes()
    failed = exp("sample.num_samples=16", override)
    assert failed.returncode == 1 and message in failed.stderr, failed.stderr
    assert "+train" not in failed.stderr  # not DVC's hint to add the key
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


def test_overrides_change_only_their_own_lines_of_params_yaml(tmp_path):
    """DVC's `-S` writer turns `[1, 2]` into block lists and `null` into an empty value across the file."""
    from flows.dvcrun import write_sets

    params = tmp_path / "params.yaml"
    before = (ROOT / "params.yaml").read_text().splitlines()
    params.write_text("\n".join(before) + "\n")
    write_sets(params, ["train.epochs=20", "sampler.edm.steps=[5,10]", "data.path=/data/x", "train.grad_clip=null"])
    after = params.read_text().splitlines()
    assert len(after) == len(before)
    changed = [(b, a) for b, a in zip(before, after) if a != b]
    assert [a.split("#")[0].strip() for _, a in changed] == ["path: /data/x", "epochs: 20", "edm: {steps: [5, 10]}"]
    assert all(b.split("#")[1:] == a.split("#")[1:] for b, a in changed)  # each line keeps its comment
    write_sets(params, [])
    assert params.read_text().splitlines() == after
