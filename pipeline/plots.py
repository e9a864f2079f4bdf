"""The HTML template that lets `dvc plots show` and `dvc plots diff` draw their charts without internet.

    python -m pipeline.plots --template   # (re)write it (`make env` does)
    python -m pipeline.plots [show] [any other `dvc plots show` argument]   # then open dvc_plots/index.html
    python -m pipeline.plots diff [revisions] [any other `dvc plots diff` argument]

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so offline (as on most clusters) every
chart is an empty box. .dvc/config's `plots.html_template` names .dvc/tmp/plots-offline.html (DVC's
git-ignored scratch directory), a page that holds those libraries inline, bundled by vl-convert-python
from this environment's install: plain `dvc plots show` uses it once it exists. `show` and `diff` here
write it first where it is missing or from another vl-convert version, then run DVC's command.
"""

import os
import sys
from importlib.metadata import version
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / ".dvc" / "tmp" / "plots-offline.html"
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <meta name="generator" content="{generator}">
    <title>DVC Plot</title>
    <script>
{bundle}
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def generator() -> str:
    return f"vl-convert-python {version('vl-convert-python')}"


def write_template(path: Path = TEMPLATE) -> Path:
    """The page with vega-embed, vega-lite and vega inline (a few seconds)."""
    import vl_convert

    path.parent.mkdir(parents=True, exist_ok=True)
    # the default snippet sets window.vegaEmbed, which DVC's plot scripts call
    text = PAGE.format(generator=generator(), bundle=vl_convert.javascript_bundle())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a `dvc plots show` meanwhile reads the old page or the new one, never half of one
    return path


def current_template(path: Path = TEMPLATE) -> Path:
    """The template, written again if missing or bundled by another vl-convert version."""
    if not (path.is_file() and f'content="{generator()}"' in path.read_text(encoding="utf-8")):
        write_template(path)
    return path


def main() -> None:
    args = sys.argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if args == ["--template"]:
        print(write_template())
        return
    command = args.pop(0) if args[:1] in (["show"], ["diff"]) else "show"
    current_template()
    os.execv(sys.executable, [sys.executable, "-m", "dvc", "plots", command, *args])


if __name__ == "__main__":
    main()
