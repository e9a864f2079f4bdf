"""Stage score: each out/samples/<s>-step.npz against data/reference -> out/score/metrics.json
(`dvc metrics show`), out/score/by_steps.tsv (`dvc plots show`), and the same numbers in MLflow."""

import json
from pathlib import Path

import numpy as np
import torch

from dddm.checkpoint import CheckpointError, load_model
from dddm.distributed import resolve_device
from dddm.sampling import sample
from dddm.scoring import InceptionWeightsMissing, score_samples
from dddm.tracking import RunLogger
from dddm.training import build_network

from .common import start

DATA = Path("data")
SAMPLES = Path("out/samples")
OUT = Path("out/score")
NUMBERS = ("fid", "is", "kid", "fid_classifier", "is_classifier", "precision", "recall")


def untrained_samples(cfg, device) -> np.ndarray:
    """1-step samples of the network as initialised, the floor any training must beat."""
    _, train_cfg, info = load_model("out/train/model.pt")
    torch.manual_seed(train_cfg.seed)
    net = build_network(train_cfg, info["channels"]).to(device)
    shape = (info["channels"], info["image_size"], info["image_size"])
    images = sample(net, train_cfg.make_diffusion(), cfg.sample.num_samples, shape, 1, cfg.seed,
                    cfg.sample.batch_size, device)
    return images.numpy()


def main() -> None:
    cfg = start("score")
    device = resolve_device(cfg.train.device)
    sets = {f"{s}-step": SAMPLES / f"{s}-step.npz" for s in cfg.sample.steps}
    for name, path in sets.items():
        if not path.is_file():
            raise SystemExit(f"score: {path}: samples not found (run the sample stage)")
    loaded = {name: np.load(path)["images"] for name, path in sets.items()}
    if cfg.score.untrained_baseline:
        try:
            loaded["untrained/1-step"] = untrained_samples(cfg, device)
        except CheckpointError as e:
            raise SystemExit(f"score: {e}")

    metrics = {}
    try:
        for name, images in loaded.items():
            metrics[name] = score_samples(images, reference_dir=DATA / "reference",
                                          classifier_path=DATA / "classifier.pt",
                                          inception_weights=cfg.score.inception_weights,
                                          use_inception=cfg.score.inception_required,
                                          batch_size=cfg.score.batch_size, device=device,
                                          samples_name=str(sets.get(name, name)))
    except (InceptionWeightsMissing, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"score: {e}")

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "metrics.json").write_text(json.dumps(metrics, indent=2))
    present = [k for k in NUMBERS if k in metrics[next(iter(sets))]]
    with open(OUT / "by_steps.tsv", "w") as f:
        f.write("\t".join(["steps", *present]) + "\n")
        for s in cfg.sample.steps:
            f.write("\t".join([str(s), *(str(metrics[f"{s}-step"][k]) for k in present)]) + "\n")
    RunLogger(Path("out/train/mlflow_run.json")).log_metrics(
        {f"{name}/{k}": v for name, m in metrics.items() for k, v in m.items() if k in NUMBERS})


if __name__ == "__main__":
    main()
