import math

import pytest
import yaml

from conftest import ROOT, merge, repo_params
from dddm.config import ConfigError, load_config, parse_config


def test_repo_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.data.source == "digits"
    assert cfg.methods == ("udddm", "ict", "edm")
    udddm = cfg.method.udddm
    # the paper by default: its sigma_max, the prediction into the store, n counting epochs
    assert (udddm.process, udddm.processes.ve.sigma_max, udddm.estimates_from, udddm.n_counts) == \
        ("ve", 50.0, "prediction", "epoch")
    assert cfg.make_method("udddm").huber_c == 0.00015  # the paper's c per process
    vp = parse_config(merge(repo_params(), {"method": {"udddm": {"process": "vp"}}}))
    assert vp.make_method("udddm").huber_c == 0.00014


@pytest.mark.parametrize("overrides, key", [
    ({"method": {"udddm": {"processes": {"vp": {"T": -5}}}}}, "method.udddm.processes.vp.T"),
    ({"method": {"udddm": {"processes": {"ve": {"sigma_min": 60.0}}}}}, "method.udddm.processes.ve"),
    ({"method": {"udddm": {"process": "subvp"}}}, "method.udddm.process"),
    ({"method": {"udddm": {"metric": "lpips"}}}, "method.udddm.metric"),
    ({"method": {"udddm": {"estimates_from": "ema"}}}, "method.udddm.estimates_from"),
    ({"method": {"udddm": {"store": {"dtype": "int8"}}}}, "method.udddm.store.dtype"),
    ({"method": {"ict": {"process": "ve"}}}, "method.ict.process"),  # one method's key given to another
    ({"method": {"edm": {"s0": 10}}}, "method.edm.s0"),
    ({"method": {"ict": {"store": {"policy": "auto"}}}}, "method.ict.store: the x0 store is unused by ict"),
    ({"method": {"dddm": {}}}, "method.dddm"),
    ({"methods": ["udddm", "ddpm"]}, "methods"),
    ({"methods": ["edm", "edm"]}, "methods"),
    ({"methods": []}, "methods"),
    ({"sampler": {"ict": {"steps": [1, 2, 3]}}}, "sampler.ict"),
    ({"sampler": {"ict": {"sigmas": [100.0]}}}, "sampler.ict.sigmas"),
    ({"sampler": {"edm": {"steps": [0]}}}, "sampler.edm.steps"),
    ({"data": {"image_size": 18}, "model": {"channel_mult": [1, 2, 2]}}, "data.image_size"),
    ({"model": {"attn_resolutions": [5]}}, "model.attn_resolutions"),
    ({"model": {"num_heads": 3}}, "model.num_heads"),
    ({"model": {"unknown_knob": 1}}, "model.unknown_knob"),
    ({"unknown_section": {"a": 1}}, "unknown_section"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"epochs": True}}, "train.epochs"),
    ({"train": {"epochs": "3"}}, "train.epochs"),
    ({"train": {"nproc": "two"}}, "train.nproc"),
    ({"train": {"nproc": 0}}, "train.nproc"),
    ({"train": {"lr": float("nan")}}, "train.lr"),
    ({"train": {"nnodes": 0}}, "train.nnodes"),
    ({"train": {"log_every": 0}}, "train.log_every"),
    ({"train": {"nnodes": 2}}, "rendezvous.endpoint: required with train.nnodes=2"),
    ({"train": {"nnodes": 2}, "rendezvous": {"endpoint": "node0"}}, "rendezvous.endpoint: 'node0' is not host:port"),
    ({"rendezvous": {"endpoint": "node0:http"}}, "rendezvous.endpoint: 'node0:http' is not host:port"),
    ({"rendezvous": {"endpoint": "node0:70000"}}, "rendezvous.endpoint: 'node0:70000' is not host:port"),
    ({"rendezvous": {"id": "a b; rm"}}, "rendezvous.id"),
    ({"rendezvous": {"timeout": 0}}, "rendezvous.timeout"),
    ({"data": {"source": "cifar10", "path": None}}, "data.path"),
    ({"data": {"source": "mnist"}}, "data.source"),
    ({"tracking": {"register_models": True, "log_model": False}}, "tracking.register_models"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(merge(repo_params(), overrides))


def test_floats_accept_integers():
    cfg = parse_config(merge(repo_params(), {"train": {"lr": 1}}))
    assert cfg.train.lr == 1.0


def test_missing_section_and_file(tmp_path):
    raw = repo_params()
    del raw["train"]
    with pytest.raises(ConfigError, match="train: Field required"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_keys_an_older_model_file_lacks_are_required_in_params_yaml(tmp_path):
    """limits and tracking.log_model came after the first model files: the params such a file stores validate
    without them (its run logged its model), params.yaml does not."""
    for section, key in (("limits", None), ("tracking", "log_model")):
        raw = repo_params()
        if key:
            del raw[section][key]
        else:
            del raw[section]
        assert parse_config(raw).tracking.log_model  # a model file's params
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=rf"{section}{'.' + key if key else ''}: Field required"):
            load_config(tmp_path / "params.yaml")


def test_geometric_ve_schedule_from_yaml_inf(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("sigma_max: 50.0, rho: 7.0", "sigma_max: 50.0, rho: .inf")
    (tmp_path / "p.yaml").write_text(text)
    assert math.isinf(load_config(tmp_path / "p.yaml").method.udddm.processes.ve.rho)


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").glob("cifar10-*.yaml")), ids=lambda p: p.stem)
def test_paper_presets_are_valid_and_match_the_paper(preset):
    overrides = yaml.safe_load(preset.read_text())
    if preset.stem == "cifar10-cd":  # applied after the EDM preset, whose model it distils
        overrides = merge(yaml.safe_load((ROOT / "presets/cifar10-edm.yaml").read_text()), overrides)
    cfg = parse_config(merge(repo_params(), merge(overrides, {"data": {"path": "/data/cifar-10-python.tar.gz"}})))
    assert cfg.model.base_channels == 128 and cfg.model.channel_mult == (1, 2, 2, 2)
    global_batch = cfg.train.batch_size * cfg.train.nproc
    if preset.stem == "cifar10-ict":
        assert cfg.methods == ("ict",) and global_batch == 1024 and cfg.train.lr == 1e-4
        assert (cfg.method.ict.s0, cfg.method.ict.s1, cfg.sampler.ict.sigmas) == (10, 1280, (0.821,))
        return
    if preset.stem == "cifar10-cd":
        assert cfg.finetune.methods == ("cd",) and cfg.finetune.lr == 4e-4 and cfg.finetune.dropout == {"cd": 0.0}
        assert (cfg.method.cd.N, cfg.method.cd.mu) == (18, 0.0) and cfg.finetune.epochs * 50_000 == 800_000 * 512
        return
    if preset.stem == "cifar10-edm":
        assert cfg.methods == ("edm",) and global_batch == 512 and cfg.train.lr == 1e-3
        assert cfg.make_method("edm").evaluations(cfg.sampler.edm.steps[0]) == 35
        return
    assert cfg.model.num_blocks == (6 if "deep" in preset.stem else 3)
    assert global_batch == 1024 and cfg.train.lr == 2e-4
    assert cfg.train.ema_decay == 0.9999
    process = cfg.make_method("udddm").process
    assert (process.name, process.T) == (("vp", 8000) if "vp" in preset.stem else ("ve", 1000))


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
    assert (cfg.data.source, cfg.data.path, cfg.train.nproc, cfg.method.udddm.process) == \
        ("cifar10", "memory://cifar.tar.gz", 2, "ve")
    assert "# digits | cifar10 | folder" in params.read_text()
