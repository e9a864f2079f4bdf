"""Stage train: one method, under `torchrun --nproc_per_node=<train.nproc> -m pipeline.train` (or plain python).

Writes <out>/model.pt (the EMA network), train_metrics.json (the final loss), train_info.json (the last
step's loss terms and schedule values, the step count), loss.tsv and mlflow_run.json (the MLflow
run that sample and score log into). Checkpoints and the x0 store live in
<train.checkpoint_dir>/<method>-<hash>, outside DVC's outputs, so an interrupted `dvc repro` resumes.
"""

import json
import os
from pathlib import Path

from .common import start


def make_tracker(cfg, method, run_dir: Path, prepared: Path, info, device):
    """Rank 0's MLflow run (a dddm.tracking.MlflowTracker); a resumed training run keeps logging into the
    run it started."""
    from dddm import checkpoint
    from dddm.tracking import MlflowTracker, ema_grid_sampler, write_run_reference

    run_file = run_dir / "mlflow_run.json"
    resuming = run_file.exists() and cfg.train.resume == "auto" and checkpoint.latest(run_dir) is not None
    shape = (info.channels, info.image_size, info.image_size)
    params = cfg.model_dump(mode="json", exclude={"method", "methods"}) | \
        {"method": {method.name: cfg.method_config(method.name).model_dump(mode="json")}}
    process = getattr(cfg.method_config(method.name), "process", None)
    run_name = "-".join(filter(None, [method.name, process, info.source, run_dir.name.rsplit("-", 1)[-1][:8]]))
    tags = {"method": method.name, "dataset": info.source, "dataset_fingerprint": info.fingerprint}
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
                      out="the directory for model.pt, loss.tsv, train_metrics.json, train_info.json and "
                          "mlflow_run.json")
    from dddm import checkpoint, distributed, runlock
    from dddm.data import PreparedDataset
    from dddm.tracking import TrackingUnavailable, write_run_reference
    from dddm.training import TrainingDiverged, run_directory, train, write_history

    world = distributed.init(cfg.train.device)
    info = PreparedDataset(args.prepared).info
    method = cfg.make_method(args.method)
    run_dir = run_directory(cfg, method.name, info.fingerprint)
    tracker = None
    try:
        runlock.acquire(run_dir, world)  # before the MLflow run; held until this process exits
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            tracker = make_tracker(cfg, method, run_dir, args.prepared, info, world.device)
        result = train(cfg, method.name, args.prepared, args.out, run_dir, tracker=tracker)
        if tracker:
            write_history(result.history_path, args.out / "loss.tsv", method.terms)
            tracker.log_model(checkpoint.load_model(result.model_path).net)
            tracker.finish()
            write_run_reference(args.out / "mlflow_run.json", tracker.run_id)
    except (TrainingDiverged, TrackingUnavailable, checkpoint.CheckpointError, runlock.RunLocked) as e:
        if tracker:
            tracker.finish("FAILED")
        raise SystemExit(f"train: {e}")
    except BaseException:
        if tracker:
            tracker.finish("FAILED")
        raise
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
