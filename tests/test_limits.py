"""The check stage bounds what a run asks of the machine (issue 22's harmful params): each refused
naming its key, in one check process whose memory grows by less than 128 MB over what the check of
valid params takes (no value is expanded, allocated or run before it is refused). That first check's
peak (torch's imports above all) is a fixed cost that depends on the machine: 0.73 GB here, more on
others. Figures by hand in docs/reliability.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_env, tiny_params

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))

# (case, params overrides, the key the refusal must name)
HARMFUL = [
    ("epochs 10^12", {"train": {"epochs": 10**12}}, "train.epochs"),
    ("10^9 samples", {"sample": {"num_samples": 10**9}}, "sample.num_samples"),
    ("batch above the shard", {"train": {"batch_size": 10**7}}, "train.batch_size"),
    ("1000 processes on CPU", {"train": {"nproc": 1000}}, "train.nproc"),
    ("seed 10^23", {"seed": 10**23}, "seed"),
    ("10^5 channels", {"model": {"base_channels": 100000}}, "model.base_channels"),
    ("read-only store directory", {"method": {"udddm": {"store": {"directory": "/proc/self"}}}},
     "method.udddm.store.directory"),
]
# issue 32's: each passed the check and failed (or grew) in a later stage, after DVC had deleted its outputs
LATER = [
    ("T 2 * 10^9 (a 16 GB schedule)", {"method": {"udddm": {"processes": {"ve": {"T": 2 * 10**9}}}}},
     "method.udddm.processes.ve.T"),
    ("iCT s1 2^40", {"method": {"ict": {"s1": 2**40}}}, "method.ict.s1"),
    ("EDM p_mean NaN", {"method": {"edm": {"p_mean": float("nan")}}}, "method.edm.p_mean"),
    ("sigma_max inf", {"method": {"ect": {"sigma_max": float("inf")}}}, "method.ect.sigma_max"),
    ("10^8 learning-curve samples", {"train": {"eval_samples": 10**8}}, "train.eval_samples"),
    ("64 learning-curve samples", {"train": {"eval_samples": 64}}, "train.eval_samples"),
    ("64 samples", {"sample": {"num_samples": 64}}, "sample.num_samples"),
    ("a 100 kB experiment name", {"tracking": {"experiment": "x" * 10**5}}, "tracking.experiment"),
    ("data.path a device", {"data": {"source": "cifar10", "path": "/dev/zero"}}, "data.path"),
]

# Runs the check's two steps (load_config, environment_problems) on each params file given, in one
# process, and reports what each said and the process's peak RSS after each file; the first file is valid.
PROBE = """
import json, resource, sys
from dddm.config import ConfigError, load_config
from pipeline.check import environment_problems
peak_kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"after_kb": {}}
for path in sys.argv[1:]:
    try:
        out[path] = "\\n".join(environment_problems(load_config(path)))
    except ConfigError as e:
        out[path] = str(e)
    out["after_kb"][path] = peak_kb()
print(json.dumps(out))
"""


def checked(tmp_path, cases: list[tuple[str, dict, str]], texts: dict[str, str]) -> dict[str, str]:
    """What the check said of the valid tiny params, then of each case (as overrides) and each text, by case;
    asserting that the valid params pass, each case's key is named, and memory grew by less than 128 MB."""
    files = {"valid": tmp_path / "valid.yaml"}
    files["valid"].write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    for case, overrides, _ in cases:
        files[case] = tmp_path / f"{case.replace(' ', '_')}.yaml"
        files[case].write_text(yaml.safe_dump(tiny_params(**overrides), sort_keys=False))
    for case, text in texts.items():
        files[case] = tmp_path / f"{case.replace(' ', '_')}.yaml"
        files[case].write_text(text)
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, files.values())], cwd=tmp_path,
                          env=run_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    assert said[str(files["valid"])] == ""
    for case, _, key in cases:
        assert re.search(rf"(^|\n|\.yaml: ){re.escape(key)}: ", said[str(files[case])]), (case, said[str(files[case])])
    peaks = list(said["after_kb"].values())
    assert max(peaks) - peaks[0] < 128 * 1024, f"peak RSS (kB) after each file: {said['after_kb']}"
    return {case: said[str(path)] for case, path in files.items()}


def test_each_harmful_param_is_refused_naming_its_key_without_allocating(tmp_path):
    if os.cpu_count() >= 1000:
        pytest.skip("a machine with 1000 CPUs may run 1000 processes")
    said = checked(tmp_path, HARMFUL, {"alias bomb": yaml.safe_dump(tiny_params(), sort_keys=False) + ALIAS_BOMB})
    assert re.search(r"alias_bomb\.yaml: line \d+: YAML anchors and aliases", said["alias bomb"])


def test_params_that_failed_after_the_check_are_refused_by_it(tmp_path):
    """Issue 32: values, a key given twice and a 50 MB file that the check passed (or itself grew 16 GB on)."""
    valid = yaml.safe_dump(tiny_params(), sort_keys=False)
    assert "\n  lr: 0.0002\n" in valid
    said = checked(tmp_path, LATER, {
        "duplicate key": valid.replace("\n  lr: 0.0002\n", "\n  lr: 0.0002\n  lr: 0.0004\n"),
        "50 MB file": yaml.safe_dump(tiny_params(tracking={"experiment": "x" * 50 * 2**20}))})
    assert re.search(r"duplicate_key\.yaml: line \d+: train\.lr is given twice", said["duplicate key"])
    assert re.search(r"50_MB_file\.yaml: larger than 1 MB", said["50 MB file"])


def test_limits_ignore_turns_the_estimates_off_but_not_the_exact_checks(tmp_path):
    from dddm.config import parse_config
    from pipeline.check import environment_problems

    big = parse_config(tiny_params(train={"epochs": 10**12}, limits={"machine": "ignore"}))
    assert environment_problems(big) == []
    more = parse_config(tiny_params(train={"epochs": 10**12}, limits={"max_hours": 1e15}))
    assert environment_problems(more) == []
    shard = parse_config(tiny_params(train={"batch_size": 10**7}, limits={"machine": "ignore"}))
    assert environment_problems(shard)[0].startswith("train.batch_size: 10000000 per process, but each of the 1")


def test_the_check_stage_exits_naming_the_alias_before_expanding_it(tmp_path):
    """Through the stage's own command, as dvc.yaml runs it: one line, exit 1, no traceback."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text() + ALIAS_BOMB)
    done = subprocess.run([sys.executable, "-m", "pipeline.check", "--out", "out/check.txt"], cwd=tmp_path,
                          env=run_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "YAML anchors and aliases (&name, *name) are not accepted" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "check.txt").exists()


def test_a_store_directory_on_a_read_only_mount_is_refused(tmpfs):
    """The issue's trial: the directory itself a read-only mount, its parent writable."""
    from dddm.config import parse_config
    from pipeline.check import environment_problems

    read_only_mount = tmpfs("1m", read_only=True)
    cfg = parse_config(tiny_params(method={"udddm": {"store": {"directory": str(read_only_mount)}}}))
    assert environment_problems(cfg) == [f"method.udddm.store.directory: {read_only_mount} is not a writable "
                                         f"directory (Read-only file system)"]
