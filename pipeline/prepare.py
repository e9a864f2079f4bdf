"""Stage prepare: dataset source (params `data`) -> data/prepared.arrow (+ data/prepared.json)."""

import json
from dataclasses import asdict
from pathlib import Path

from dddm.data import DataError, prepare_dataset

from .common import start

OUT = Path("data")


def main() -> None:
    cfg = start("prepare")
    try:
        info = prepare_dataset(cfg.data.source, cfg.data.path, cfg.data.image_size, OUT / "prepared.arrow")
    except DataError as e:
        raise SystemExit(f"prepare: {e}")
    (OUT / "prepared.json").write_text(json.dumps(asdict(info), indent=2))


if __name__ == "__main__":
    main()
