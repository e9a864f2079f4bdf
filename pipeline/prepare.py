"""Stage prepare: the dataset source (params `data`) -> the prepared Arrow file (+ its info JSON)."""

import errno
import json
from dataclasses import asdict

from .stage import start


def main() -> None:
    cfg, args = start("prepare", __doc__, prepared="the prepared Arrow file to write", info="its info JSON")
    from dddm.data import DataError, prepare_dataset

    writing = args.prepared
    try:
        info = prepare_dataset(cfg.data.source, cfg.data.path, cfg.data.image_size, args.prepared)
        writing = args.info
        args.info.write_text(json.dumps(asdict(info), indent=2))
    except DataError as e:
        raise SystemExit(f"prepare: {e}")
    except OSError as e:  # a full disk names no file (the write of a file already open): name the one written
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise SystemExit(f"prepare: {writing}: {e.strerror} while writing it")


if __name__ == "__main__":
    main()
