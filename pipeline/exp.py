"""`dvc exp run`, with this project's check of its `-S` overrides first, before DVC changes any file: a key
params.yaml lacks is named with the nearest key (DVC's own message advises `+key`, which adds a key the
check stage then rejects), and a bad value is named as the check stage names it.

    python -m pipeline.exp -S method.udddm.process=vp [any other `dvc exp run` argument]
"""

import argparse
import os
import sys
from pathlib import Path

from dvc.exceptions import DvcException

from flows.dvcrun import check_sets


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.exp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set-param", dest="sets", action="append", default=[], help="as `dvc exp run -S`")
    args, _ = ap.parse_known_args()
    try:
        check_sets(Path("params.yaml"), args.sets)
    except (ValueError, DvcException) as e:
        sys.exit(f"exp: {e}")
    os.execv(sys.executable, [sys.executable, "-m", "dvc", "exp", "run", *sys.argv[1:]])


if __name__ == "__main__":
    main()
