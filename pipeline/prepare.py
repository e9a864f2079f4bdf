"""Stage prepare: dataset source (params `data`) -> data/prepared.arrow (+ prepared.json), and the
offline scoring fallback's feature network, a classifier trained on the labels -> data/classifier.pt."""

import json
import logging
from dataclasses import asdict
from pathlib import Path

from dddm.classifier import save_classifier, train_classifier
from dddm.data import DataError, PreparedDataset, prepare_dataset

from .common import start

OUT = Path("data")
log = logging.getLogger("prepare")


def main() -> None:
    cfg = start("prepare")
    try:
        info = prepare_dataset(cfg.data.source, cfg.data.path, cfg.data.image_size, OUT / "prepared.arrow")
    except DataError as e:
        raise SystemExit(f"prepare: {e}")
    (OUT / "prepared.json").write_text(json.dumps(asdict(info), indent=2))

    dataset = PreparedDataset(OUT / "prepared.arrow")
    everything = range(len(dataset))
    model, accuracy = train_classifier(dataset.images(everything), dataset.labels(everything), info.num_classes,
                                       epochs=cfg.score.classifier_epochs, seed=cfg.seed)
    log.info("feature classifier: held-out accuracy %.4f", accuracy)
    save_classifier(model, OUT / "classifier.pt", {"test_accuracy": accuracy, "fingerprint": info.fingerprint})


if __name__ == "__main__":
    main()
