"""Stage reference: feature statistics of the training set, computed once per prepared dataset
(classifier features always; Inception pool3 features when its weights are found), and the real-data
row of every comparison: held-out digits (the classifier's holdout split, as many as a method's
samples) scored against those statistics, the floor a generator can reach at that sample count."""

import json
import logging

from .stage import start

log = logging.getLogger("pipeline.reference")

def main() -> None:
    cfg, args = start("reference", __doc__, prepared="the prepared Arrow file", classifier="the scoring classifier",
                      out="the reference statistics directory to write", real="the real-data row's metrics JSON")
    from dddm.classifier import HOLDOUT_FRACTION, split_indices
    from dddm.data import PreparedDataset
    from dddm.compute import resolve_device
    from dddm.evaluation import evaluate_samples, headline
    from dddm.scoring import InceptionWeightsMissing, compute_reference_stats

    dataset = PreparedDataset(args.prepared)
    device = resolve_device(cfg.train.device)
    try:
        compute_reference_stats(dataset.stored_images, args.out, classifier_path=args.classifier,
                                inception_weights=cfg.score.inception_weights,
                                use_inception=cfg.score.inception_required, batch_size=cfg.score.batch_size,
                                device=device, fingerprint=dataset.info.fingerprint)
        _, holdout = split_indices(len(dataset), HOLDOUT_FRACTION, cfg.seed)
        real = dataset.images(holdout[:cfg.sample.num_samples]).numpy()
        if len(real) < cfg.sample.num_samples:
            log.warning("the real-data row scores all %d held-out images, fewer than sample.num_samples %d",
                        len(real), cfg.sample.num_samples)
        row = evaluate_samples(real, args.out, args.classifier, cfg.score, device, "held-out real images")
    except (InceptionWeightsMissing, ValueError) as e:
        raise SystemExit(f"reference: {e}")
    args.real.parent.mkdir(parents=True, exist_ok=True)
    args.real.write_text(json.dumps({"real": headline(row)}, indent=2))
    print(f"reference: held-out real images ({len(real)}): " +
          ", ".join(f"{k} {v:.4g}" for k, v in headline(row).items()))


if __name__ == "__main__":
    main()
