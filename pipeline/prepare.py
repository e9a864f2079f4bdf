"""Stage prepare: the dataset source (params `data`) -> the prepared Arrow file (+ its info JSON), and
the offline scoring fallback's feature network, a classifier trained on the labels."""

import json
import logging
from dataclasses import asdict

from dddm.classifier import save_classifier, train_classifier
from dddm.data import DataError, PreparedDataset, prepare_dataset

from .common import start

log = logging.getLogger("prepare")


def main() -> None:
    cfg, args = start("prepare", __doc__, prepared="the prepared Arrow file to write",
                      info="its info JSON", classifier="the scoring classifier to write")
    try:
        info = prepare_dataset(cfg.data.source, cfg.data.path, cfg.data.image_size, args.prepared)
    except DataError as e:
        raise SystemExit(f"prepare: {e}")
    args.info.write_text(json.dumps(asdict(info), indent=2))

    dataset = PreparedDataset(args.prepared)
    everything = range(len(dataset))
    model, accuracy = train_classifier(dataset.images(everything), dataset.labels(everything), info.num_classes,
                                       epochs=cfg.score.classifier_epochs, seed=cfg.seed)
    log.info("feature classifier: held-out accuracy %.4f", accuracy)
    save_classifier(model, args.classifier, {"test_accuracy": accuracy, "fingerprint": info.fingerprint})


if __name__ == "__main__":
    main()
