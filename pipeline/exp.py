"""`dvc exp run` and `dvc exp show` for this project.

    python -m pipeline.exp -S method.udddm.process=vp [any other `dvc exp run` argument]
    python -m pipeline.exp show [any other `dvc exp show` argument]

`run` (the default) checks the `-S` overrides first, before DVC changes any file: a key params.yaml lacks
is named with the nearest key (DVC's own message advises `+key`, which adds a key the check stage then
rejects), and a bad value is named as the check stage names it.

`show` narrows DVC's table, which has a column for every key of params.yaml, every metric of every file
and every dependency's hash (DVC has no setting for its default view), to the experiments' changed
params and out/headline.json's FID per method and row.
"""

import argparse
import os
import sys
from pathlib import Path

from flows.dvcrun import check_sets

# dvc exp show's column names: a metric is `<key>`, or `<file>:<key>` where two files share the key;
# a dependency is its path (params.yaml is the check stage's). out/headline.json's keys (`real`,
# `<method>.nfe<k>`) name no file.
HEADLINE_COLUMNS = r"^real$|^[a-z0-9_]+\.nfe\d+$"
NOT_SHOWN = r".*[/:]|^dddm$|^params\.yaml$|^(nfe\d+|real|untrained)\."  # hashes, per-method files, real's file


def dvc(*args: str) -> None:
    os.execv(sys.executable, [sys.executable, "-m", "dvc", "exp", *args])


def main() -> None:
    if sys.argv[1:2] == ["show"]:
        dvc("show", "--only-changed", "--keep", HEADLINE_COLUMNS, "--drop", NOT_SHOWN, *sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m pipeline.exp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set-param", dest="sets", action="append", default=[], help="as `dvc exp run -S`")
    args, _ = ap.parse_known_args()
    from dvc.exceptions import DvcException

    try:
        check_sets(Path("params.yaml"), args.sets)
    except (ValueError, DvcException) as e:
        sys.exit(f"exp: {e}")
    dvc("run", *sys.argv[1:])


if __name__ == "__main__":
    main()
