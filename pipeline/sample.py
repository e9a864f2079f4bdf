"""Stage sample: a method's EMA model -> <out>/<s>-step.npz (uint8) and a PNG grid per step count
(`sampler.<name>.steps`); the score stage logs both grids and scores to MLflow."""

from .common import start


def main() -> None:
    cfg, args = start("sample", __doc__, per_method=True, model="the trained model.pt",
                      out="the directory of samples to write")
    import numpy as np

    from dddm.checkpoint import CheckpointError, load_model
    from dddm.distributed import resolve_device
    from dddm.pixels import save_grid, to_uint8
    from dddm.sampling import sample

    device = resolve_device(cfg.train.device)
    try:
        trained = load_model(args.model, device, expect_method=args.method)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"sample: {e}")
    method = trained.with_sampler(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    for steps in method.sampler.steps:
        images = sample(method, trained.net, cfg.sample.num_samples, trained.shape, steps,
                        cfg.sample.batch_size, device, progress=True)
        np.savez_compressed(args.out / f"{steps}-step.npz", images=to_uint8(images.cpu()).numpy())
        save_grid(images, args.out / f"{steps}-step.png")


if __name__ == "__main__":
    main()
