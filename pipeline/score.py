"""Stage score: a method's samples (<samples>/<method>/<s>-step.npz) against the reference statistics ->
<out>/<method>/metrics.json (the headline numbers per network-evaluation count, `dvc metrics show`),
<out>/<method>/report.json (everything: class histograms, the
untrained network's score, uDDDM's t = T diagnostics), and the same numbers with the sample grids in an MLflow
run of this evaluation, a child of the method's training run."""

import json
import logging
import sys

from .common import start

log = logging.getLogger("score")

SUMMARY = ("fid", "fid_classifier", "precision", "recall", "classes")


def feature_network_reason(row: dict, score_cfg) -> str:
    """Which network the distances were computed in, and why (the classifier is the offline fallback)."""
    from dddm.scoring import INCEPTION_FID_LAYER
    from dddm.scoring.inception import search_inception_weights

    if row["feature_network"] != "classifier":
        return f"Inception features ({row['inception_weights']})"
    if score_cfg.use_inception == "never":
        because = "score.use_inception is never"
    elif search_inception_weights(score_cfg.inception_weights, None)[0] is None:
        because = f"no Inception weights found (score.inception_weights: {score_cfg.inception_weights})"
    else:
        because = (f"{row['num_samples']} samples, or the reference, are fewer than the "
                   f"{int(INCEPTION_FID_LAYER) + 1} images an Inception FID needs")
    return f"the scoring classifier's features (fid_classifier, not FID): {because}"


def summary(name: str, metrics: dict[str, dict], feature_network: str) -> str:
    """The rows as a small table (what `dvc metrics show` holds), under the feature network used."""
    keys = [k for k in SUMMARY if any(k in m for m in metrics.values())]
    lines = [f"score: {name}, {feature_network}", f"  {'row':<10}" + "".join(f"{k:>16}" for k in keys)]
    for row, m in metrics.items():
        lines.append(f"  {row:<10}" + "".join(f"{m[k]:>16.4g}" if k in m else f"{'-':>16}" for k in keys))
    return "\n".join(lines)


def main() -> None:
    cfg, args = start("score", __doc__, per_method=True, samples="the directory of the methods' samples",
                      runs="the directory of the methods' training outputs (model.pt, mlflow_run.json)",
                      prepared="the prepared Arrow file", reference="the reference statistics directory",
                      classifier="the scoring classifier", out="the directory of the methods' scores")
    from dddm.checkpoint import CheckpointError, load_model
    from dddm.data import PreparedDataset
    from dddm.diagnostics import udddm_diagnostics
    from dddm.compute import resolve_device
    from dddm.evaluation import evaluate_samples, headline
    from dddm.integrity import load_samples
    from dddm.methods import UDDDM
    from dddm.sampling import sample
    from dddm.scoring import InceptionWeightsMissing
    from dddm.tracking import EvaluationRun, TrackingUnavailable

    samples, out = args.samples / args.method, args.out / args.method
    model, run = (args.runs / args.method / name for name in ("model.pt", "mlflow_run.json"))
    device = resolve_device(cfg.train.device)
    try:
        trained = load_model(model, device, expect_method=args.method)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"score: {e}")
    method = trained.with_sampler(cfg)
    paths = {s: samples / f"{s}-step.npz" for s in method.sampler.steps}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"score: {', '.join(missing)}: samples not found (run the sample stage)")

    def evaluate(images, name: str) -> dict:
        log.info("scoring %s (%d images)", name, len(images))
        return evaluate_samples(images, args.reference, args.classifier, cfg.score, device, name)

    # what the rows cost: the training images behind the model (its initialisation's included) and where it started
    report: dict = {"method": method.name, "images": trained.images,
                    "init": {k: trained.init[k] for k in ("path", "method", "images")} |
                    ({"teacher": trained.init["teacher"]["method"]} if "teacher" in trained.init else {})
                    if trained.init else None,
                    "rows": []}
    try:
        for steps, path in paths.items():
            images = load_samples(path, f"rerun the sample stage (`dvc repro -f sample@{method.name}`)")
            row = {"steps": steps, "nfe": method.evaluations(steps)} | evaluate(images, str(path))
            report["rows"].append(row)
        if cfg.score.untrained_baseline:
            log.info("sampling the untrained network (the floor any training must beat)")
            images = sample(method, trained.untrained(), cfg.sample.num_samples, trained.shape, 1,
                            cfg.sample.batch_size, device).numpy()
            report["untrained"] = evaluate(images, "untrained network samples")
    except (InceptionWeightsMissing, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"score: {e}")
    if isinstance(method, UDDDM):
        log.info("uDDDM's t = T diagnostics")
        data = PreparedDataset(args.prepared).images(range(16))
        report["diagnostics"] = udddm_diagnostics(method, trained.net, data, device)

    metrics = {f"nfe{row['nfe']}": headline(row) for row in report["rows"]}
    if "untrained" in report:
        metrics["untrained"] = {k: v for k, v in headline(report["untrained"]).items() if k.startswith("fid")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    sampler = getattr(cfg.sampler, method.name)
    try:
        evaluation = EvaluationRun(run, {"sampler": {method.name: sampler.model_dump(mode="json")},
                                         "sample": cfg.sample.model_dump(mode="json"),
                                         "score": cfg.score.model_dump(mode="json")})
    except TrackingUnavailable as e:  # the scores are written: a tracking outage does not stop the pipeline
        print(f"score: WARNING: {method.name}: scores not logged to MLflow: {e} (`dvc repro -f score@{method.name}` "
              "logs them once it answers)", file=sys.stderr)
    else:
        for steps in paths:
            evaluation.log_image_file(samples / f"{steps}-step.png", "samples")
        evaluation.log_metrics({f"{name}/{k}": v for name, m in metrics.items() for k, v in m.items()})
        evaluation.log_headline(metrics)
        evaluation.finish()
    print(summary(method.name, metrics, feature_network_reason(report["rows"][0], cfg.score)))


if __name__ == "__main__":
    main()
