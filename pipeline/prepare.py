"""Stage prepare: the dataset source (params `data`) -> the prepared Arrow file (+ its info JSON)."""

import json
from dataclasses import asdict

from .stage import start


def main() -> None:
    cfg, args = start("prepare", __doc__, prepared="the prepared Arrow file to write", info="its info JSON")
    from dddm.data import DataError, prepare_dataset

    try:
        info = prepare_dataset(cfg.data.source, cfg.data.path, cfg.data.image_size, args.prepared)
    except DataError as e:
        raise SystemExit(f"prepare: {e}")
    args.info.write_text(json.dumps(asdict(info), indent=2))


if __name__ == "__main__":
    main()
