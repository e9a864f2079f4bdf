"""One method trained with params.yaml changed by overrides, as its train stage trains it (fine-tuned from
the EDM stage's model where finetune.methods lists it): its learning curve, then for ECT with --mid the final
model's rows at each two-step mid t (docs/method-study.md's tables); CD distils the EDM stage's
model. Needs the outputs of `make repro`
(out/train/edm/model.pt, data/prepared.arrow, data/classifier.pt and data/reference).

    OMP_NUM_THREADS=1 python bench/learning_curve.py ect lr4e4 '{"finetune": {"lr": 4e-4}}' --mid 0.821,1.2,2.0
    OMP_NUM_THREADS=1 python bench/learning_curve.py cd n18 '{"method": {"cd": {"N": 18}}}' --mid 0.821,2.0
    OMP_NUM_THREADS=1 python bench/learning_curve.py udddm data4x \
        '{"train": {"epochs": 240}, "method": {"udddm": {"estimates_from": "data"}}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dddm.config import merge_params, parse_config  # noqa: E402
from dddm.curves import LearningCurve  # noqa: E402
from dddm.evaluation import evaluate_samples  # noqa: E402
from dddm.finetune import starting_points  # noqa: E402
from dddm.methods import METHODS  # noqa: E402
from dddm.sampling import sample  # noqa: E402
from dddm.training import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=METHODS, help="the method to train")
    ap.add_argument("name", help="the run's name: its files go to bench/out/<method>-<name>/")
    ap.add_argument("overrides", help="params.yaml overrides as JSON")
    ap.add_argument("--mid", help="ECT, CD: comma-separated mid t of the two-step rows to score at the end")
    args = ap.parse_args()
    if args.mid and args.method not in ("ect", "cd"):
        ap.error("--mid: only ECT's and CD's two-step samplers have a mid t here")
    raw = merge_params(yaml.safe_load((ROOT / "params.yaml").read_text()), json.loads(args.overrides))
    work = ROOT / "bench" / "out" / f"{args.method}-{args.name}"
    raw["train"]["checkpoint_dir"] = str(work / "checkpoints")
    raw["finetune"]["init_from"] = raw["finetune"]["teacher"] = str(ROOT / "out/train/edm/model.pt")
    cfg = parse_config(raw)
    method = cfg.make_method(args.method)
    info = json.loads((ROOT / "data/prepared.json").read_text())
    shape = (info["channels"], info["image_size"], info["image_size"])
    init, teacher = starting_points(cfg, method, info["image_size"], info["channels"])
    curve = LearningCurve(method, shape, work / "run", ROOT / "data/classifier.pt", cfg.score,
                          cfg.train.eval_samples, "cpu")
    start = time.time()
    result = train(cfg, args.method, ROOT / "data/prepared.arrow", work / "model", work / "run", progress=False,
                   init=init, curve=curve, teacher=teacher)
    print(f"{args.name}: {time.time() - start:.0f} s")
    for row in curve.rows():
        print(args.name, json.dumps(row))
    if not args.mid:
        return
    net = result.ema.module.eval()
    mids = [float(m) for m in args.mid.split(",")]
    # the one-step row does not depend on the mid t: scored once, then the two-step row at each mid t
    for steps, mid in [(1, mids[0])] + [(2, m) for m in mids]:
        sampler = getattr(cfg.sampler, args.method).model_copy(update={"sigmas": (mid,)})
        x = sample(cfg.make_method(args.method, sampler, cfg.seed), net, cfg.sample.num_samples, shape, steps,
                   cfg.sample.batch_size)
        scores = evaluate_samples(x.numpy(), ROOT / "data/reference", ROOT / "data/classifier.pt", cfg.score,
                                  "cpu", f"{steps}-step samples, mid t {mid}")
        print(args.name, f"{steps}-step" + (f" mid t {mid}" if steps == 2 else ""),
              {k: round(scores[k], 3) for k in ("fid_classifier", "precision", "recall", "classes")})

if __name__ == "__main__":
    main()
