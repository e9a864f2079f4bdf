"""Stage classifier: the offline scoring fallback's feature network, a small classifier trained on the
prepared file's labels -> <out> (data/classifier.pt). Its own stage, and its output kept in git: training it
on another CPU gives other weights (float summation order), so a fresh clone keeps this one while the
prepared file's fingerprint and the params are unchanged, and its scores are in the same feature space."""

import logging

from .stage import start

log = logging.getLogger("classifier")


def main() -> None:
    cfg, args = start("classifier", __doc__, prepared="the prepared Arrow file", out="the classifier to write")
    from dddm.classifier import save_classifier, train_classifier
    from dddm.data import PreparedDataset

    dataset = PreparedDataset(args.prepared)
    everything = range(len(dataset))
    model, accuracy = train_classifier(dataset.images(everything), dataset.labels(everything),
                                       dataset.info.num_classes, epochs=cfg.score.classifier_epochs, seed=cfg.seed)
    log.info("feature classifier: held-out accuracy %.4f", accuracy)
    save_classifier(model, args.out, {"test_accuracy": accuracy, "fingerprint": dataset.info.fingerprint})


if __name__ == "__main__":
    main()
