"""Stages train and finetune: one method, under torchrun (`python -m pipeline.launch pipeline.train ...`) or
plain python, from scratch or, for a method of `finetune.methods`, from the model `finetune.init_from` (and,
for a method that distils, learning from the model `finetune.teacher`).

Writes <out>/<method>/model.pt (the EMA network), train_metrics.json (the final loss), train_info.json (the last
step's loss terms and schedule values, the step count), loss.tsv, curve.tsv (the learning curve, every
train.eval_every epochs) and mlflow_run.json (the MLflow run that sample and score log into).
Checkpoints and the x0 store live in <train.checkpoint_dir>/<method>-<hash>, outside DVC's outputs, so an
interrupted `dvc repro` resumes.
"""

from dddm.lifeline import die_with_launcher

die_with_launcher()  # before the imports below (torch: seconds): a worker of a killed launcher never trains

import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from .common import start  # noqa: E402


def make_tracker(cfg, method, run_dir: Path, prepared: Path, info, device, init, teacher):
    """Rank 0's MLflow run (a dddm.tracking.MlflowTracker); a resumed training run keeps logging into the
    run it started."""
    import torch

    from dddm import checkpoint
    from dddm.finetune import describe_teacher
    from dddm.tracking import MlflowTracker, ema_grid_sampler, write_run_reference

    run_file = run_dir / "mlflow_run.json"
    resuming = run_file.exists() and cfg.train.resume == "auto" and checkpoint.latest(run_dir) is not None
    shape = (info.channels, info.image_size, info.image_size)
    params = cfg.model_dump(mode="json", exclude={"method", "methods", "finetune"}) | \
        {"method": {method.name: cfg.method_config(method.name).model_dump(mode="json")}}
    params["train"]["threads"] = torch.get_num_threads()  # the number the run summed with (`auto` resolved)
    if init is not None:
        params["finetune"] = cfg.finetune.model_dump(mode="json", exclude={"methods", "teacher"}) | \
            {"init": init.describe()}
    if teacher is not None:
        params["finetune"]["teacher"] = describe_teacher(cfg, teacher)
    process = getattr(cfg.method_config(method.name), "process", None)
    run_name = "-".join(filter(None, [method.name, process, info.source, run_dir.name.rsplit("-", 1)[-1][:8]]))
    tags = {"method": method.name, "dataset": info.source, "dataset_fingerprint": info.fingerprint}
    if init is not None:
        tags["init_from"] = f"{init.path} ({init.method})"
    if teacher is not None:
        tags["teacher"] = f"{cfg.finetune.teacher} ({teacher.method.name})"
    if os.environ.get("DVC_EXP_NAME"):  # `dvc exp run` (python -m pipeline.exp) names its experiment to the stages
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    tracker = MlflowTracker(cfg.tracking.experiment, params, tags=tags,
                            run_id=json.loads(run_file.read_text())["run_id"] if resuming else None,
                            grid_every_epochs=cfg.tracking.grid_every_epochs,
                            grid_sampler=ema_grid_sampler(method, shape, device), run_name=run_name)
    if not resuming:
        tracker.log_dataset(prepared, info.source, info.fingerprint)
    write_run_reference(run_file, tracker.run_id)
    return tracker


def main() -> None:
    cfg, args = start("train", __doc__, per_method=True, prepared="the prepared Arrow file",
                      classifier="the scoring classifier (learning curves)",
                      out="the directory of the methods' training outputs: <out>/<method>/ for model.pt, loss.tsv, "
                          "curve.tsv, train_metrics.json, train_info.json and mlflow_run.json")
    from dddm import checkpoint, distributed, runlock
    from dddm.curves import LearningCurve
    from dddm.curves import write_tsv as write_curve_tsv
    from dddm.data import PreparedDataset
    from dddm.finetune import InitialisationError, starting_points
    from dddm.tracking import TrackingUnavailable, write_run_reference
    from dddm.training import TrainingDiverged, run_directory, train, write_history

    info = PreparedDataset(args.prepared).info
    method = cfg.make_method(args.method)
    out = args.out / method.name
    try:  # before anything starts: a model file that does not fit stops the stage, naming the key
        init, teacher = starting_points(cfg, method, info.image_size, info.channels)
    except InitialisationError as e:
        raise SystemExit(f"train: {e}")
    world = distributed.init(cfg.train.device, cfg.rendezvous.timeout)
    run_dir = run_directory(cfg, method.name, info.fingerprint, init, teacher)
    identities = distributed.all_gather_objects(run_dir.name)  # the run's identity as every rank's params give it
    if len(set(identities)) > 1:
        differ = ", ".join(f"rank {r}: {name}" for r, name in enumerate(identities) if name != identities[0])
        raise SystemExit(f"train: the nodes' params.yaml or prepared data differ (rank 0: {identities[0]}; {differ}); "
                         "every node needs the same params.yaml and data/prepared.arrow")
    shape = (info.channels, info.image_size, info.image_size)
    try:
        curve = LearningCurve(method, shape, run_dir, args.classifier, cfg.score, cfg.train.eval_samples,
                              world.device) if cfg.train.eval_every else None
    except ValueError as e:
        raise SystemExit(f"train: {e}")
    tracker = None
    try:
        runlock.acquire(run_dir, world)  # before the MLflow run; held until this process exits
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            tracker = make_tracker(cfg, method, run_dir, args.prepared, info, world.device, init, teacher)
        result = train(cfg, method.name, args.prepared, out, run_dir, tracker=tracker, init=init, curve=curve,
                       teacher=teacher)
        if tracker:
            write_history(result.history_path, out / "loss.tsv", method.terms)
            if curve is not None:
                curve.write_tsv(out / "curve.tsv")
            else:  # train.eval_every 0: no points, the file DVC expects
                write_curve_tsv(out / "curve.tsv", [], [])
            if cfg.tracking.log_model:
                tracker.log_model(checkpoint.load_model(result.model_path).net)
            tracker.finish()
            write_run_reference(out / "mlflow_run.json", tracker.run_id, tracker.incomplete())
    except (TrainingDiverged, TrackingUnavailable, checkpoint.CheckpointError, runlock.RunLocked) as e:
        if tracker:
            tracker.finish("FAILED")
        raise SystemExit(f"train: {e}")
    except BaseException as e:
        if tracker:
            tracker.finish("FAILED")
        silent = distributed.peer_timeout(e, cfg.rendezvous.timeout)
        if silent is not None:
            raise SystemExit(f"train: {silent}") from None
        raise
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
