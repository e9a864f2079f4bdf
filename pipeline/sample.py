"""Stage sample: a method's EMA model (<runs>/<method>/model.pt) -> <out>/<method>/<s>-step.npz (uint8, with
the images' sha256) and a PNG grid per step count (`sampler.<name>.steps`); the score stage logs both grids and
scores to MLflow.
Samples are written batch by batch as they are generated: memory holds one batch, not all of them."""

from .common import start
from .stage import PARAMS

GRID_IMAGES = 64  # as many as dddm.pixels.image_grid shows


def main() -> None:
    cfg, args = start("sample", __doc__, per_method=True, runs="the directory of the methods' training outputs",
                      out="the directory of the methods' samples")
    import torch

    from dddm.checkpoint import CheckpointError, check_trained_with, load_model
    from dddm.compute import resolve_device
    from dddm.integrity import save_samples
    from dddm.pixels import save_grid, to_uint8
    from dddm.sampling import sample_batches

    model, out = args.runs / args.method / "model.pt", args.out / args.method
    device = resolve_device(cfg.train.device)
    try:
        trained = load_model(model, device, expect_method=args.method)
        check_trained_with(trained, cfg, model, PARAMS)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"sample: {e}")
    method = trained.with_sampler(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for steps in method.sampler.steps:
        grid: list[torch.Tensor] = []  # the first GRID_IMAGES samples, kept for the PNG

        def batches():
            for images in sample_batches(method, trained.net, cfg.sample.num_samples, trained.shape, steps,
                                         cfg.sample.batch_size, device, progress=True):
                if sum(map(len, grid)) < GRID_IMAGES:
                    grid.append(images[:GRID_IMAGES])
                yield to_uint8(images).numpy()
        save_samples(batches(), cfg.sample.num_samples, out / f"{steps}-step.npz")
        save_grid(torch.cat(grid), out / f"{steps}-step.png")


if __name__ == "__main__":
    main()
