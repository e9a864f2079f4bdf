import math

import pytest
import yaml

from conftest import ROOT, merge, repo_params
from dddm.config import ConfigError, load_config, parse_config


def test_repo_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.data.source == "digits"
    assert cfg.huber_c == 0.00014  # the paper's VP c when huber_c is null
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
