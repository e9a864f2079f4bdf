import math

import pytest
import yaml

from conftest import ROOT, merge, repo_params
from dddm.config import ConfigError, load_config, parse_config


def test_repo_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.data.source == "digits"
    assert cfg.loss.huber_c is None  # the paper's c per process
    assert parse_config(merge(repo_params(), {"diffusion": {"kind": "vp"}})).huber_c == 0.00014
    assert parse_config(merge(repo_params(), {"diffusion": {"kind": "ve"}})).huber_c == 0.00015


@pytest.mark.parametrize("overrides, key", [
    ({"diffusion": {"vp": {"T": -5}}}, "diffusion.vp.T"),
    ({"diffusion": {"ve": {"sigma_min": 60.0}}}, "diffusion.ve.sigma_min"),
    ({"diffusion": {"kind": "subvp"}}, "diffusion.kind"),
    ({"loss": {"metric": "lpips"}}, "loss.metric"),
    ({"data": {"image_size": 18}, "model": {"channel_mult": [1, 2, 2]}}, "data.image_size"),
    ({"model": {"attn_resolutions": [5]}}, "model.attn_resolutions"),
    ({"model": {"num_heads": 3}}, "model.num_heads"),
    ({"model": {"unknown_knob": 1}}, "model.unknown_knob"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"store": {"dtype": "int8"}}, "store.dtype"),
    ({"data": {"source": "cifar10", "path": None}}, "data.path"),
    ({"sample": {"steps": [1, 0]}}, "sample.steps"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(merge(repo_params(), overrides))


def test_missing_section_and_file(tmp_path):
    raw = repo_params()
    del raw["train"]
    with pytest.raises(ConfigError, match="train: Field required"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_geometric_ve_schedule_from_yaml_inf(tmp_path):
    raw = merge(repo_params(), {"diffusion": {"kind": "ve"}})
    text = yaml.safe_dump(raw).replace("rho: 7.0", "rho: .inf")
    (tmp_path / "p.yaml").write_text(text)
    d = load_config(tmp_path / "p.yaml").make_diffusion()
    assert math.isinf(d.rho)


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_presets_are_valid_and_match_the_paper(preset):
    overrides = yaml.safe_load(preset.read_text())
    cfg = parse_config(merge(repo_params(), merge(overrides, {"data": {"path": "/data/cifar-10-python.tar.gz"}})))
    assert cfg.model.base_channels == 128 and cfg.model.channel_mult == (1, 2, 2, 2)
    assert cfg.model.num_blocks == (6 if "deep" in preset.stem else 3)
    assert cfg.train.batch_size * cfg.train.nproc == 1024 and cfg.train.lr == 2e-4
    assert cfg.train.ema_decay == 0.9999
    d = cfg.make_diffusion()
    assert (d.kind, d.T) == (("vp", 8000) if "vp" in preset.stem else ("ve", 1000))


def test_preset_cli_validates_then_rewrites_keeping_comments(tmp_path):
    import shutil
    import subprocess
    import sys

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    env = {"DDDM_PARAMS": str(params), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "pipeline.preset", str(ROOT / "presets/cifar10-ve.yaml")]
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "data.path" in refused.stderr
    assert params.read_text() == (ROOT / "params.yaml").read_text()
    done = subprocess.run(cmd + ["data.path=memory://cifar.tar.gz", "train.nproc=2"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cfg = load_config(params)
    assert (cfg.data.source, cfg.data.path, cfg.train.nproc, cfg.diffusion.kind) == \
        ("cifar10", "memory://cifar.tar.gz", 2, "ve")
    assert "# digits | cifar10 | folder" in params.read_text()
