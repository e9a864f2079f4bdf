"""Stage compare: every method's scores and sample grids side by side -> <out>/table.md (the README's
first table), <out>/grids.png (the samples of each method and step count, labelled), and the data of
dvc.yaml's plots: <out>/fid_by_nfe.tsv (FID per method against network evaluations) and
<out>/precision_recall.tsv (each method and step count as a point in the precision-recall plane); and
<headline>, a metrics file of one FID per method and row (the columns `python -m pipeline.exp show` keeps)."""

import json

from PIL import Image, ImageDraw

from dddm.headline import HEADLINE, fid_name

from .common import start

TITLES = {"fid": "FID", "classes": "classes >= 3%"}  # the rest are shown under their own names


def number(value) -> str:
    """A table cell: whole numbers from 100 up (1469, not 1.47e+03), else three significant digits (19.1, 0.695)."""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown: one line per (name, steps, numbers)."""
    keys = [(k, TITLES.get(k, k)) for k in HEADLINE if any(k in numbers for _, _, numbers in rows)]
    lines = ["| method | sampling | network evaluations | " + " | ".join(t for _, t in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for name, sampling, numbers in rows:
        cells = [number(numbers.get(k, "")) for k, _ in keys]
        lines.append(f"| {name} | {sampling} | {numbers.get('nfe', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fid_by_nfe(rows: list[tuple[str, str, dict]], methods: list[str]) -> str:
    """TSV: one line per network-evaluation count, one FID column per method (NaN where it has no row: an empty
    cell is drawn as a point at 0, NaN is left out)."""
    fid = {(name, numbers["nfe"]): numbers[fid_name(numbers)] for name, _, numbers in rows}
    lines = ["\t".join(["nfe", *methods])]
    for nfe in sorted({nfe for name, nfe in fid if name in methods}):
        lines.append("\t".join([str(nfe), *(f"{fid[m, nfe]:.6g}" if (m, nfe) in fid else "NaN" for m in methods)]))
    return "\n".join(lines) + "\n"


def headline_fids(real: dict, trained: list[tuple[str, str, dict]]) -> dict:
    """The FID (in the score stage's feature network: `fid`, else `fid_classifier`) of the real row and of
    each method's rows, keyed `<method>.nfe<k>`: short columns in `dvc exp show`."""
    fids: dict = {"real": real[fid_name(real)]}
    for name, _, numbers in trained:
        fids.setdefault(name, {})[f"nfe{numbers['nfe']}"] = numbers[fid_name(numbers)]
    return fids


def precision_recall(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["point\tprecision\trecall"]
    lines += [f"{name} {sampling}\t{numbers['precision']:.6g}\t{numbers['recall']:.6g}"
              for name, sampling, numbers in rows if "precision" in numbers]
    return "\n".join(lines) + "\n"


def labelled_grids(items: list[tuple[str, Image.Image]]) -> Image.Image:
    """The grids in one row, each with its label above it."""
    pad, label_height = 8, 16
    width = sum(im.width for _, im in items) + pad * (len(items) + 1)
    height = max(im.height for _, im in items) + label_height + 2 * pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for label, im in items:
        draw.text((x, pad), label, fill="black")
        canvas.paste(im.convert("RGB"), (x, pad + label_height))
        x += im.width + pad
    return canvas


def main() -> None:
    cfg, args = start("compare", __doc__, scores="the score stages' directory (one sub-directory per method)",
                      samples="the sample stages' directory", real="the real-data row's metrics JSON",
                      out="the directory for table.md, grids.png and the plots' TSV files",
                      headline="the headline metrics JSON (one FID per method and row)")
    real = json.loads(args.real.read_text())["real"]
    rows, trained = [("real digits (held out)", "-", real | {"nfe": 0})], []
    grids = []
    for name in cfg.methods:
        report = json.loads((args.scores / name / "report.json").read_text())
        method_rows = [(name, f"{row['steps']}-step", row) for row in report["rows"]]
        grids += [(f"{name} {sampling}", Image.open(args.samples / name / f"{sampling}.png"))
                  for _, sampling, _ in method_rows]
        trained += method_rows
        rows += method_rows
        if "untrained" in report:
            rows.append((f"{name}, untrained network", "1-step", report["untrained"] | {"nfe": 1}))
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (args.out / "table.md").write_text(text)
    (args.out / "fid_by_nfe.tsv").write_text(fid_by_nfe(trained, cfg.methods))
    (args.out / "precision_recall.tsv").write_text(precision_recall(rows[:1] + trained))
    labelled_grids(grids).save(args.out / "grids.png")
    args.headline.write_text(json.dumps(headline_fids(real, trained), indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
