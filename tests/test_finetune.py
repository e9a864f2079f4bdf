"""Fine-tuning from a model file (params `finetune`): ECT from EDM's model, uDDDM with the same head start,
the learning curves every method writes, and every bad `finetune.init_from` named before training."""

import csv
import os

import pytest
import torch

from conftest import ROOT, tiny_params
from dddm import checkpoint
from dddm.config import ConfigError, merge_params, parse_config
from dddm.data import PreparedInfo, prepare_dataset
from dddm.finetune import InitialisationError, initialise, load_initialisation, load_teacher
from dddm.methods.edm import precondition
from dddm.training import train
from dddm.unet import build_network

CLASSIFIER = ROOT / "data" / "classifier.pt"  # the scoring classifier kept in git


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prepared.arrow"
    prepare_dataset("digits", None, 8, path, progress=False)
    return path


def edm_params(tmp_path, **overrides):
    """EDM trained from scratch into tmp_path/edm, ECT fine-tuned from it; `overrides` merged over that."""
    return merge_params(tiny_params(train={"epochs": 4, "batch_size": 64, "lr": 2e-3, "ema_decay": 0.9,
                                           "checkpoint_dir": str(tmp_path / "ck")},
                                    methods=["edm"], finetune={"methods": ["ect"], "epochs": 4, "lr": 1e-3,
                                                               "init_from": str(tmp_path / "edm" / "model.pt")}),
                        overrides)


@pytest.fixture(scope="module")
def edm_model(tmp_path_factory, prepared):
    """A short EDM run: the model ECT starts from, with its learning curve."""
    tmp = tmp_path_factory.mktemp("edm")
    cfg = parse_config(edm_params(tmp, train={"eval_every": 3, "eval_samples": 160}))
    curve = make_curve(cfg, "edm", tmp / "run")
    train(cfg, "edm", prepared, tmp / "edm", tmp / "run", progress=False, curve=curve)
    return tmp, cfg, curve


def make_curve(cfg, name, run_dir):
    from dddm.curves import LearningCurve

    return LearningCurve(cfg.make_method(name), (1, 8, 8), run_dir, CLASSIFIER, cfg.score, cfg.train.eval_samples, "cpu")


def test_every_eval_every_epochs_and_at_the_end_one_learning_curve_row(edm_model, tmp_path):
    tmp, cfg, curve = edm_model
    rows = curve.rows()
    assert [r["epoch"] for r in rows] == [3, 4]  # eval_every 3 of 4 epochs
    assert [r["images"] for r in rows] == [3 * 1797, 4 * 1797]
    assert rows[-1]["fid_classifier_4step"] < rows[0]["fid_classifier_4step"], rows  # tiny params: edm samples 4 steps
    curve.write_tsv(tmp_path / "curve.tsv")
    with open(tmp_path / "curve.tsv", newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert len(table) == 2 and set(table[0]) == {"epoch", "images", "fid_classifier_4step", "classes_4step"}
    assert checkpoint.load_model(tmp / "edm" / "model.pt").images == 4 * 1797


def test_ect_starts_as_its_model_file_and_a_short_run_beats_it_in_one_step(edm_model, prepared, tmp_path):
    tmp, cfg, _ = edm_model
    source = checkpoint.load_model(tmp / "edm" / "model.pt")
    ect = cfg.make_method("ect")
    init = load_initialisation(cfg, ect, 8, 1)
    assert (init.method, init.images) == ("edm", 4 * 1797)
    net = build_network(cfg.model, 8, 1, ect.conditioning)
    initialise(net, init)
    for name, tensor in source.net.state_dict().items():
        assert torch.equal(net.state_dict()[name], tensor), name
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.5, 5.0, 80.0]).view(-1, 1, 1, 1)
    net.eval()
    assert torch.equal(ect.f_train(net, x, sigma), precondition(source.net, x, sigma, 0.5))  # EDM's denoiser

    curve = make_curve(cfg, "ect", tmp_path / "run")
    train(cfg, "ect", prepared, tmp_path / "ect", tmp_path / "run", progress=False, init=init, curve=curve)
    rows = curve.rows()
    assert [r["epoch"] for r in rows] == [0, 3, 4] and rows[0]["images"] == 4 * 1797  # starts at EDM's images
    assert rows[-1]["fid_classifier_1step"] < 0.7 * rows[0]["fid_classifier_1step"], rows
    tuned = checkpoint.load_model(tmp_path / "ect" / "model.pt")
    assert tuned.images == 8 * 1797 and tuned.init["method"] == "edm" and tuned.init["path"] == cfg.finetune.init_from


@pytest.mark.parametrize("conditioning", ["cross_attention", "concat"])
def test_udddm_from_edm_computes_edm_s_network_at_step_0_whatever_the_estimate(edm_model, conditioning):
    tmp, cfg, _ = edm_model
    source = checkpoint.load_model(tmp / "edm" / "model.pt").net
    cfg = parse_config(edm_params(tmp, finetune={"methods": ["udddm"]}, method={"udddm": {"conditioning": conditioning}}))
    udddm = cfg.make_method("udddm")
    net = build_network(cfg.model, 8, 1, udddm.conditioning)
    initialise(net, load_initialisation(cfg, udddm, 8, 1))
    net.eval()
    x, label = torch.randn(3, 1, 8, 8), torch.tensor([-1.0, 0.0, 1.0])
    for estimate in (torch.zeros_like(x), torch.randn_like(x)):
        assert torch.allclose(net(estimate, x, label), source(None, x, label), atol=1e-6)


def test_a_model_file_that_does_not_fit_is_named_before_training(edm_model, tmp_path):
    tmp, cfg, _ = edm_model
    ect = cfg.make_method("ect")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((tmp / "edm" / "model.pt").read_bytes()[:5000])
    udddm_file = tmp_path / "udddm.pt"
    udddm_cfg = parse_config(tiny_params())
    info = PreparedInfo(**checkpoint.load_model(tmp / "edm" / "model.pt").dataset)
    checkpoint.save_model(udddm_file, udddm_cfg, "udddm", info, build_network(udddm_cfg.model, 8, 1, "cross_attention"),
                          images=0)
    cases = [
        (edm_params(tmp, finetune={"init_from": str(tmp_path / "nope.pt")}), "model file not found"),
        (edm_params(tmp, finetune={"init_from": str(corrupt)}), str(corrupt)),
        (edm_params(tmp, finetune={"init_from": str(udddm_file)}),
         "holds a udddm model; ect starts from a model of edm, ict, ect"),
        (edm_params(tmp, model={"base_channels": 16}), "has base_channels 8, model.base_channels is 16"),
    ]
    for raw, expected in cases:
        with pytest.raises(InitialisationError) as e:
            load_initialisation(parse_config(raw), ect, 8, 1)
        assert "finetune.init_from" in str(e.value) and expected in str(e.value), str(e.value)
    with pytest.raises(InitialisationError, match="trained on 1x8x8 images; the prepared dataset's are 3x8x8"):
        load_initialisation(cfg, ect, 8, 3)


def test_finetune_params_are_checked_with_the_key_named(tmp_path, monkeypatch):
    from pipeline.check import finetune_problems

    bad = [({"finetune": {"methods": ["ect"], "init_from": None}}, "finetune.init_from: required"),
           ({"finetune": {"methods": ["edm"]}}, "finetune.methods: edm cannot start from another model"),
           ({"finetune": {"methods": ["udddm"]}}, "finetune.methods: udddm listed twice"),
           ({"finetune": {"methods": ["ect", "ect"]}}, "finetune.methods: ect listed twice"),
           ({"finetune": {"methods": ["ddpm"]}}, "finetune.methods"),
           ({"train": {"eval_every": -1}}, "train.eval_every")]
    for overrides, expected in bad:
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            parse_config(tiny_params(**overrides))
    parse_config(tiny_params(train={"eval_every": 5}))  # more than tiny's 1 epoch: one point, at the end
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(tiny_params(methods=["udddm", "ict"]))
    assert finetune_problems(cfg) == [f"finetune.{key}: out/train/edm/model.pt: model file not found; it is the edm "
                                      "train stage's model, but edm is not in methods (add it to methods, or name an "
                                      "existing model file)" for key in ("init_from", "teacher")]
    assert finetune_problems(parse_config(tiny_params())) == []  # train@edm writes it first
    assert not os.path.exists(tmp_path / "out")


def test_cd_distils_its_teacher_and_resumes_its_target_network_bit_identically(edm_model, prepared, tmp_path):
    tmp, _, _ = edm_model

    def cd_config(epochs):
        return parse_config(edm_params(tmp, finetune={"methods": ["cd"], "epochs": epochs,
                                                      "teacher": str(tmp / "edm" / "model.pt")},
                                       method={"cd": {"mu": 0.9}}, train={"checkpoint_every": 0}))

    def run(epochs, out, run_dir):
        cfg = cd_config(epochs)
        cd = cfg.make_method("cd")
        return train(cfg, "cd", prepared, tmp_path / out, tmp_path / run_dir, progress=False,
                     init=load_initialisation(cfg, cd, 8, 1), teacher=load_teacher(cfg, cd, 8, 1))

    whole = run(2, "whole", "w")
    run(1, "half", "h")  # its final checkpoint holds the target network, which a resume must take up
    resumed = run(2, "resumed", "h")
    for part in ("net", "ema"):
        a, b = getattr(whole, part).state_dict(), getattr(resumed, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    shared = torch.load(checkpoint.latest(tmp_path / "h") / "train_state.pt", weights_only=False)
    assert set(shared["method"]) == {"target"}
    model = checkpoint.load_model(tmp_path / "whole" / "model.pt")
    assert model.init["teacher"]["method"] == "edm" and model.init["teacher"]["path"] == str(tmp / "edm" / "model.pt")
    assert model.images == 4 * 1797 + 2 * 1797  # the teacher is the model it starts from: its images count once


def test_a_teacher_that_does_not_fit_is_named_before_training(edm_model, tmp_path, monkeypatch):
    from pipeline.check import finetune_problems

    tmp, _, _ = edm_model
    ect_file = tmp_path / "ect.pt"
    cfg = parse_config(edm_params(tmp))
    info = PreparedInfo(**checkpoint.load_model(tmp / "edm" / "model.pt").dataset)
    checkpoint.save_model(ect_file, cfg, "ect", info, build_network(cfg.model, 8, 1, "none"), images=0)
    raw = edm_params(tmp, finetune={"methods": ["cd"], "teacher": str(ect_file)})
    with pytest.raises(InitialisationError, match="finetune.teacher: .*ect.pt holds a ect model; cd distils a model "
                                                  "of edm"):
        load_teacher(parse_config(raw), parse_config(raw).make_method("cd"), 8, 1)
    assert finetune_problems(parse_config(raw)) == [f"finetune.teacher: {ect_file} holds a ect model; cd distils a "
                                                    f"model of edm"]
    with pytest.raises(ConfigError, match="methods: cd distil a teacher model"):
        parse_config(tiny_params(methods=["edm", "cd"], finetune={"methods": ["ect"]}))
    monkeypatch.chdir(tmp_path)
    missing = parse_config(edm_params(tmp, finetune={"methods": ["cd"], "teacher": "nope.pt"}))
    assert finetune_problems(missing) == ["finetune.teacher: nope.pt: model file not found"]


def test_finetune_dropout_is_the_fine_tuned_networks_and_part_of_its_run_identity(tmp_path):
    plain = parse_config(edm_params(tmp_path))
    tuned = parse_config(edm_params(tmp_path, finetune={"methods": ["ect", "cd"], "dropout": {"ect": 0.3}}))
    assert plain.network_of("ect").dropout == plain.model.dropout == tuned.network_of("edm").dropout
    assert tuned.network_of("ect").dropout == 0.3 and tuned.network_of("cd").dropout == plain.model.dropout
    with pytest.raises(ConfigError, match="finetune.dropout: 'ddpm' is not one of"):
        parse_config(edm_params(tmp_path, finetune={"dropout": {"ddpm": 0.0}}))
    # null keeps the run directories of before the key; a value is a new configuration
    assert "dropout" not in checkpoint.training_identity(plain, "ect")["finetune"]
    assert checkpoint.training_identity(tuned, "ect")["finetune"]["dropout"] == 0.3
