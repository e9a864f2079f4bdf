"""Stage reference: feature statistics of the training set, computed once per prepared dataset ->
data/reference/ (classifier features always; Inception pool3 features when its weights are found)."""

from pathlib import Path

from dddm.data import PreparedDataset
from dddm.distributed import resolve_device
from dddm.scoring import InceptionWeightsMissing, compute_reference_stats

from .common import start

DATA = Path("data")


def main() -> None:
    cfg = start("reference")
    dataset = PreparedDataset(DATA / "prepared.arrow")
    try:
        compute_reference_stats(dataset.images(range(len(dataset))), DATA / "reference",
                                classifier_path=DATA / "classifier.pt",
                                inception_weights=cfg.score.inception_weights,
                                use_inception=cfg.score.inception_required, batch_size=cfg.score.batch_size,
                                device=resolve_device(cfg.train.device), fingerprint=dataset.info.fingerprint)
    except InceptionWeightsMissing as e:
        raise SystemExit(f"reference: {e}")


if __name__ == "__main__":
    main()
