"""Stage train: run under `torchrun --nproc_per_node=<train.nproc> -m pipeline.train` (or plain python).

Writes out/train/model.pt (the EMA network), out/train/train_metrics.json and out/train/loss.tsv;
checkpoints and the x0 store live in <train.checkpoint_dir>/<run>, outside DVC's outputs, so
an interrupted `dvc repro` resumes instead of starting over.
"""

from pathlib import Path

from dddm import distributed
from dddm.data import PreparedDataset
from dddm.training import TrainingDiverged, run_directory, train, write_history

from .common import start

PREPARED = Path("data/prepared.arrow")
OUT = Path("out/train")


def main() -> None:
    cfg = start("train")
    run_dir = run_directory(cfg, PreparedDataset(PREPARED).info.fingerprint)
    try:
        result = train(cfg, PREPARED, OUT, run_dir)
    except TrainingDiverged as e:
        raise SystemExit(f"train: {e}")
    finally:
        distributed.shutdown()
    write_history(result.history_path, OUT / "loss.tsv")


if __name__ == "__main__":
    main()
