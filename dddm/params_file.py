"""params.yaml edited in place, keeping its layout: comments, flow lists (`[1, 2]`), `null`, key order.

DVC's own `-S` writer (`dvc exp run -S`) rewrites the whole file through its YAML dumper: flow lists
become block lists and `null` becomes an empty value. Here only the values that change are written, over
a ruamel round-trip of the file (presets: pipeline.preset; overrides: pipeline.exp and the flows).
"""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq


def round_trip() -> YAML:
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never fold a long line the file did not fold
    # null as `null`, as params.yaml writes it (ruamel's round-trip writes an empty value)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def _flow_list(values: list) -> CommentedSeq:
    seq = CommentedSeq(values)
    seq.fa.set_flow_style()  # [1, 2, 2, 2], as params.yaml writes lists
    return seq


def update_in_place(document, overrides: dict) -> None:
    """Lay nested `overrides` over a ruamel round-trip document, keeping its comments."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            update_in_place(document[key], value)
        elif isinstance(value, list):
            document[key] = _flow_list(value)
        elif isinstance(value, dict):
            document[key] = CommentedMap(value)
        else:
            document[key] = value


def changes(old: dict, new: dict) -> tuple[dict, list[tuple[str, ...]]]:
    """(the nested values of `new` that differ from `old`, the key paths `new` no longer has)."""
    changed: dict = {}
    removed: list[tuple[str, ...]] = []
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            inner, gone = changes(old[key], value)
            if inner:
                changed[key] = inner
            removed += [(key, *path) for path in gone]
        elif key not in old or old[key] != value:
            changed[key] = value
    removed += [(key,) for key in old if key not in new]
    return changed, removed


def rewrite(path: Path, old: dict, new: dict) -> None:
    """Make `path` (whose content is `old`) hold `new`, writing only what changed."""
    changed, removed = changes(old, new)
    if not changed and not removed:
        return
    rt = round_trip()
    document = rt.load(path.read_text())
    update_in_place(document, changed)
    for keys in removed:
        node = document
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    with open(path, "w") as f:
        rt.dump(document, f)
