"""Apply a preset (a partial params file, see presets/) and KEY=VALUE overrides to params.yaml.

    python -m pipeline.preset presets/cifar10-vp.yaml data.path=/data/cifar-10-python.tar.gz train.nproc=4

The result is validated before anything is written; params.yaml keeps its comments and layout.
"""

import argparse
import sys
from pathlib import Path

import yaml

from .stage import PARAMS


def parse_assignment(text: str) -> dict:
    """'a.b.c=value' -> {"a": {"b": {"c": value}}}, the value read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"preset: override {text!r} is not KEY=VALUE (for example train.nproc=4)")
    nested: dict = yaml.safe_load(value)
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", type=Path, nargs="?", help="a partial params file, e.g. presets/cifar10-vp.yaml")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE, e.g. data.path=/data/cifar-10-python.tar.gz")
    args = ap.parse_args()
    from dddm.config import ConfigError, merge_params, parse_config  # torch, through the methods' registry
    from dddm.sections import read_yaml

    overrides: dict = {}
    if args.preset is not None:
        if "=" in str(args.preset):  # only overrides given
            args.overrides.insert(0, str(args.preset))
        elif not args.preset.is_file():
            raise SystemExit(f"preset: {args.preset}: no such file (see presets/)")
        else:
            try:
                overrides = read_yaml(args.preset.read_text(), str(args.preset)) or {}
            except ConfigError as e:
                raise SystemExit(f"preset: {e}") from None
    for text in args.overrides:
        overrides = merge_params(overrides, parse_assignment(text))

    from dddm.params_file import round_trip, update_in_place

    rt = round_trip()
    params_path = Path(PARAMS)
    document = rt.load(params_path.read_text())
    try:
        parse_config(merge_params(read_yaml(params_path.read_text(), str(params_path)), overrides), str(params_path))
    except ConfigError as e:
        sys.exit(f"preset: not applied, the result would be invalid\n{e}")
    update_in_place(document, overrides)
    with open(params_path, "w") as f:
        rt.dump(document, f)
    print(f"preset: updated {params_path}")


if __name__ == "__main__":
    main()
