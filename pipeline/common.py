"""What every stage does first: logging, and params.yaml validated once (errors name the key)."""

from __future__ import annotations

import logging
import os
import sys

from dddm.config import Config, ConfigError, load_config

PARAMS = os.environ.get("DDDM_PARAMS", "params.yaml")


def start(stage: str) -> Config:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {stage}[{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        return load_config(PARAMS)
    except ConfigError as e:
        sys.exit(f"{stage}: invalid parameters\n{e}")
