"""Benchmark the score stage against torch-fidelity's own command-line tool, in the same run.

    python bench/bench_scoring.py                       # 10k random 3x32x32 samples, 10k reference
    python bench/bench_scoring.py --inception-samples 2100 --device cpu   # a CPU-sized Inception run

The same random uint8 images are given to both: in memory to the project, as PNG files (lossless,
so identical pixels) to `fidelity --isc --fid --kid`. Measured:
- the project: `compute_reference_stats` (once per dataset) and `score_samples` (per sample set);
  feature extraction images/s is timed inside `extract_features` during `score_samples`;
- the CLI cold (extracts both inputs; caches input2's features under --input2-cache-name) and warm
  (input2 from that cache, so like `score_samples` it extracts only the samples); its images/s is
  samples / warm wall time, process start, imports and PNG decoding included;
- the project's classifier fallback (a randomly initialised `SmallClassifier`, for speed only).
With no Inception weights found, a randomly initialised inception-v3-compat weights file
(`save_random_inception_weights`) is used by both sides: same cost, but the numbers are not FID.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/random_inception.py, as the tests import it

from dddm import scoring as S  # noqa: E402
from dddm.classifier import SmallClassifier, save_classifier  # noqa: E402
from random_inception import save_random_inception_weights  # noqa: E402


def write_pngs(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(arr).save(folder / f"{i:06d}.png")


class ExtractTimer:
    """Times the calls of `S.extract_features` while installed."""

    def __init__(self):
        self.seconds, self.images, self._orig = 0.0, 0, S.extract_features

    def __enter__(self):
        def timed(images, *args, **kwargs):
            t = time.perf_counter()
            out = self._orig(images, *args, **kwargs)
            self.seconds += time.perf_counter() - t
            self.images += len(images)
            return out

        S.extract_features = timed
        return self

    def __exit__(self, *exc):
        S.extract_features = self._orig


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def run_cli(args: list[str]) -> tuple[dict, float]:
    t = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):]), dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=10000, help="samples (and reference images)")
    p.add_argument("--inception-samples", type=int, default=None,
                   help="samples for the Inception comparison (default: --num-samples; >= 2049)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--inception-weights", default=None, help="path or fsspec URL (default: the usual places)")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--skip-inception", action="store_true")
    p.add_argument("--workdir", default=None, help="kept if given; else a temporary directory")
    p.add_argument("--json-out", default=None, help="also write the results here")
    args = p.parse_args()

    device = S.default_device(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_scoring_"))
    work.mkdir(parents=True, exist_ok=True)
    n_cls = args.num_samples
    n_inc = args.inception_samples or args.num_samples
    rng = np.random.default_rng(0)
    shape = (args.channels, args.size, args.size)
    print(f"device {device}, torch threads {torch.get_num_threads()}, workdir {work}", flush=True)

    rows, results = [], {"device": str(device), "image_shape": shape, "batch_size": args.batch_size}

    # -- classifier fallback ---------------------------------------------------------------
    samples = rng.integers(0, 256, (n_cls, *shape), dtype=np.uint8)
    reference = rng.integers(0, 256, (n_cls, *shape), dtype=np.uint8)
    cls_path = save_classifier(SmallClassifier(args.channels, args.size, 10), work / "classifier.pt")
    ref_dir = work / "ref_classifier"
    _, t_ref = timed(S.compute_reference_stats, reference, ref_dir, classifier_path=cls_path, use_inception=False,
                     batch_size=256, device=device, progress=False)
    with ExtractTimer() as et:
        out, t_score = timed(S.score_samples, samples, reference_dir=ref_dir, classifier_path=cls_path,
                             use_inception=False, batch_size=256, device=device, progress=False)
    rows.append(("project classifier fallback (batch 256)", n_cls, et.images / et.seconds, t_ref, t_score))
    results["classifier"] = {"n": n_cls, "images_per_s": et.images / et.seconds, "reference_s": t_ref,
                             "score_s": t_score, "metrics": out}

    # -- Inception: project vs the fidelity CLI --------------------------------------------
    if not args.skip_inception:
        if n_inc < 2049:
            sys.exit(f"--inception-samples: {n_inc} < 2049, too few for a 2048-d Frechet distance")
        weights = S.find_inception_weights(args.inception_weights)
        label = "real FID weights"
        if weights is None:
            weights = save_random_inception_weights(work / "random-inception.pth", seed=0)
            label = "random-init weights: timings only, not FID"
        results["inception_weights"] = f"{weights} ({label})"
        print(f"inception weights: {weights} ({label})", flush=True)
        samples, reference = samples[:n_inc], reference[:n_inc]
        ref_dir = work / "ref_inception"
        _, t_ref = timed(S.compute_reference_stats, reference, ref_dir, inception_weights=weights,
                         use_inception=True, batch_size=args.batch_size, device=device, progress=True)
        with ExtractTimer() as et:
            ours, t_score = timed(S.score_samples, samples, reference_dir=ref_dir, inception_weights=weights,
                                  use_inception=True, batch_size=args.batch_size, device=device, progress=True)
        rows.append((f"project inception (batch {args.batch_size})", n_inc, et.images / et.seconds, t_ref, t_score))
        results["project_inception"] = {"n": n_inc, "images_per_s": et.images / et.seconds, "reference_s": t_ref,
                                        "score_s": t_score, "metrics": ours}
        print(f"project: {ours}", flush=True)

        if not args.skip_cli:
            _, t_png = timed(lambda: (write_pngs(samples, work / "png_samples"),
                                      write_pngs(reference, work / "png_reference")))
            results["png_write_s"] = t_png
            cache = work / "fidelity_cache"
            shutil.rmtree(cache, ignore_errors=True)
            fidelity = shutil.which("fidelity") or str(Path(sys.executable).parent / "fidelity")
            cmd = [fidelity, *(["--gpu", "0"] if device.type == "cuda" else ["--cpu"]),
                   "--isc", "--fid", "--kid", "--kid-subset-size", str(min(1000, n_inc)),
                   "--input1", str(work / "png_samples"), "--input2", str(work / "png_reference"),
                   "--feature-extractor-weights-path", str(weights), "-b", str(args.batch_size), "--json",
                   "--silent", "--cache-root", str(cache), "--input2-cache-name", "bench-reference"]
            print("$ " + " ".join(cmd), flush=True)
            cold, t_cold = run_cli(cmd)
            warm, t_warm = run_cli(cmd)
            rows.append(("fidelity CLI cold (both inputs)", n_inc, 2 * n_inc / t_cold, None, t_cold))
            rows.append(("fidelity CLI warm (input2 cached)", n_inc, n_inc / t_warm, None, t_warm))
            results["cli"] = {"command": cmd, "cold_s": t_cold, "warm_s": t_warm, "metrics": warm}
            fid_rel = abs(ours["fid"] - warm["frechet_inception_distance"]) / max(
                1e-12, abs(warm["frechet_inception_distance"]))
            results["fid_rel_diff_vs_cli"] = fid_rel
            print(f"cli: {warm}", flush=True)
            print(f"FID project {ours['fid']:.6g} vs CLI {warm['frechet_inception_distance']:.6g} "
                  f"(rel diff {fid_rel:.2e}); IS {ours['is']:.6g} vs {warm['inception_score_mean']:.6g}; "
                  f"KID {ours['kid']:.6g} vs {warm['kernel_inception_distance_mean']:.6g}")

    print()
    print(f"{'path':44s} {'images':>7s} {'feat img/s':>11s} {'reference s':>12s} {'score s':>9s}")
    for name, n, ips, t_ref, t_score in rows:
        ref = f"{t_ref:12.1f}" if t_ref is not None else f"{'-':>12s}"
        print(f"{name:44s} {n:7d} {ips:11.1f} {ref} {t_score:9.1f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
