"""`dvc plots show` and `dvc plots diff` whose page draws its charts without internet.

    python -m pipeline.plots [show] [any other `dvc plots show` argument]   # then open dvc_plots/index.html
    python -m pipeline.plots diff [revisions] [any other `dvc plots diff` argument]

DVC's page loads vega, vega-lite and vega-embed from a CDN, so offline (as on most clusters) every chart
is an empty box. This passes DVC an HTML template (`--html-template`) that holds those libraries
inline, bundled by vl-convert-python from this environment's install, and written once per
vl-convert version to .dvc/tmp/plots-offline-<version>.html (DVC's git-ignored scratch directory).
"""

import os
import sys
from importlib.metadata import version
from pathlib import Path

TEMPLATE_DIR = Path(".dvc") / "tmp"
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
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


def offline_template(directory: Path = TEMPLATE_DIR) -> Path:
    """The HTML template with vega-embed, vega-lite and vega inline (made on first use: a few seconds)."""
    path = directory / f"plots-offline-{version('vl-convert-python')}.html"
    if not path.is_file():
        import vl_convert

        directory.mkdir(parents=True, exist_ok=True)
        # the default snippet sets window.vegaEmbed, which DVC's plot scripts call
        text = PAGE.format(bundle=vl_convert.javascript_bundle())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def main() -> None:
    args = sys.argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    command = args.pop(0) if args[:1] in (["show"], ["diff"]) else "show"
    template = offline_template()
    os.execv(sys.executable, [sys.executable, "-m", "dvc", "plots", command, "--html-template",
                              str(template.resolve()), *args])


if __name__ == "__main__":
    main()
