"""Stage train: run under `python -m dddm.launch --nproc <train.nproc> -m pipeline.train` (or torchrun, or python).

Writes out/train/model.pt (the EMA network), train_metrics.json, loss.tsv and mlflow_run.json
(the MLflow run that sample and score log into). Checkpoints and the x0 store live in
<train.checkpoint_dir>/<run>, outside DVC's outputs, so an interrupted `dvc repro` resumes.
"""

import json
from pathlib import Path

from dddm import checkpoint, distributed, runlock
from dddm.data import PreparedDataset
from dddm.tracking import MlflowTracker, TrackingUnavailable, ema_grid_sampler, write_run_reference
from dddm.training import TrainingDiverged, run_directory, train, write_history

from .common import start

PREPARED = Path("data/prepared.arrow")
OUT = Path("out/train")


def make_tracker(cfg, run_dir: Path, info, device) -> MlflowTracker:
    """Rank 0's MLflow run; a resumed training run keeps logging into the run it started."""
    run_file = run_dir / "mlflow_run.json"
    resuming = run_file.exists() and cfg.train.resume == "auto" and checkpoint.latest(run_dir) is not None
    shape = (info.channels, info.image_size, info.image_size)
    tracker = MlflowTracker(cfg.tracking.experiment, cfg.model_dump(mode="json"),
                            tags={"dataset": info.source, "dataset_fingerprint": info.fingerprint,
                                  "diffusion": cfg.diffusion.kind},
                            run_id=json.loads(run_file.read_text())["run_id"] if resuming else None,
                            grid_every_epochs=cfg.tracking.grid_every_epochs,
                            grid_sampler=ema_grid_sampler(cfg.make_diffusion(), shape, cfg.seed, device))
    write_run_reference(run_file, tracker.run_id)
    return tracker


def main() -> None:
    cfg = start("train")
    world = distributed.init(cfg.train.device)
    info = PreparedDataset(PREPARED).info
    run_dir = run_directory(cfg, info.fingerprint)
    tracker = None
    try:
        runlock.acquire(run_dir, world)  # before the MLflow run; held until this process exits
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            tracker = make_tracker(cfg, run_dir, info, world.device)
        result = train(cfg, PREPARED, OUT, run_dir, tracker=tracker)
        if tracker:
            write_history(result.history_path, OUT / "loss.tsv")
            model, _, _ = checkpoint.load_model(result.model_path)
            tracker.log_model(model)
            tracker.finish()
            write_run_reference(OUT / "mlflow_run.json", tracker.run_id)
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
