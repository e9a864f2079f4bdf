"""Learning curves: the EMA model scored every `train.eval_every` epochs while it trains.

Each point samples `train.eval_samples` images with the method's fewest-step row (and its 2-step row
where it has one) and scores them as the score stage does with the scoring classifier's features
(`fid_classifier`, class coverage): an Inception FID needs thousands of samples per point. The reference
statistics are the prepared dataset's, computed once per run in the run directory. Points are appended
to <run_dir>/curve.jsonl, so that a resumed run keeps the points before its checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import torch

from .classifier import load_classifier
from .evaluation import evaluate_samples
from .sampling import sample
from .scoring import ensure_reference_stats
from .scoring.frechet import check_count

log = logging.getLogger(__name__)

POINT_FIELDS = ("fid_classifier", "classes")


def curve_steps(steps: tuple[int, ...]) -> list[int]:
    """The rows a learning curve follows: the fewest steps, and 2 steps where the sampler has that row."""
    fewest = min(steps)
    return [fewest] + ([2] if 2 in steps and fewest != 2 else [])


def column(key: str, steps: int | str) -> str:
    """A point's number for one followed row: `fid_classifier_1step` (`read_tsv` matches it with a
    pattern in place of `steps`)."""
    return f"{key}_{steps}step"


def write_tsv(path: Path, followed: list[int], rows: list[dict]) -> None:
    """curve.tsv: epoch, training images, then each followed row's numbers; no rows and no followed rows when
    the run kept no curve (train.eval_every 0), the header DVC's plot still reads."""
    fields = ("epoch", "images", *(column(k, s) for s in followed for k in POINT_FIELDS))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["\t".join(fields)] + ["\t".join(str(r[k]) for k in fields) for r in rows]) + "\n")


def read_tsv(path) -> tuple[list[int], list[dict]]:
    """A curve.tsv: the step counts it follows (from its `fid_classifier_<k>step` columns), its points."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        points = [{k: float(v) for k, v in row.items()} for row in reader]
    pattern = column("fid_classifier", r"(\d+)")
    followed = [int(m[1]) for name in reader.fieldnames or () if (m := re.fullmatch(pattern, name))]
    return followed, points


class LearningCurve:
    def __init__(self, method, shape: tuple[int, int, int], run_dir: Path, classifier_path: Path,
                 score_cfg, num_samples: int, device):
        self.method, self.shape, self.device = method, shape, device
        self.path = run_dir / "curve.jsonl"
        self.reference = run_dir / "curve_reference"
        self.classifier_path = classifier_path
        self.score_cfg = score_cfg.model_copy(update={"use_inception": "never"})
        self.num_samples = num_samples
        # before training: too few samples for the classifier's feature covariance, named by its key
        check_count(num_samples, load_classifier(classifier_path).feature_dim, name="train.eval_samples",
                    network="scoring classifier")

    def prepare(self, images: torch.Tensor, fingerprint: str, resumed_epochs: int) -> None:
        """The reference statistics (computed once per run directory); points after the epochs the run
        resumes from dropped."""
        ensure_reference_stats(images, self.reference, classifier_path=self.classifier_path, use_inception=False,
                               batch_size=self.score_cfg.batch_size, device=self.device, fingerprint=fingerprint,
                               progress=False)
        rows = self.rows()
        kept = [r for r in rows if r["epoch"] <= resumed_epochs]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    @torch.no_grad()
    def record(self, net: torch.nn.Module, epoch: int, images: int) -> dict:
        """Score `net` (the EMA model) now; append and return the point."""
        row: dict = {"epoch": epoch, "images": images}
        for steps in curve_steps(self.method.sampler.steps):
            x = sample(self.method, net, self.num_samples, self.shape, steps, self.score_cfg.batch_size, self.device)
            scores = evaluate_samples(x.numpy(), self.reference, self.classifier_path, self.score_cfg, self.device,
                                      f"learning-curve samples ({steps}-step, epoch {epoch})")
            row |= {column(k, steps): scores[k] for k in POINT_FIELDS}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("learning curve: epoch %d, %d images: %s", epoch, images,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("fid")))
        return row

    def write_tsv(self, tsv_path: Path) -> None:
        write_tsv(tsv_path, curve_steps(self.method.sampler.steps), self.rows())
