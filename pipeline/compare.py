"""Stage compare: every method's scores and sample grids side by side -> <out>/table.md (the README's
first table, with the training images behind each row), <out>/grids.png (the samples of each method and
step count, labelled), <out>/learning_curves.png (fid_classifier while each method trained), and the data
of dvc.yaml's plots: <out>/fid_by_nfe.tsv (FID per method against network evaluations),
<out>/learning_curves.tsv (each method's fewest-step curve against training images), the same two for the
fine-tuned methods (*_finetuned.tsv), and <out>/precision_recall.tsv (each method and step count as a point
in the precision-recall plane); and <headline>, a metrics file of one FID per method and row (the columns
`python -m pipeline.exp show` keeps)."""

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
    """Markdown: one line per (name, steps, numbers); `images` in numbers: the training images behind the row."""
    keys = [(k, TITLES.get(k, k)) for k in HEADLINE if any(k in numbers for _, _, numbers in rows)]
    lines = ["| method | sampling | network evaluations | training images | " + " | ".join(t for _, t in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for name, sampling, numbers in rows:
        cells = [number(numbers.get(k, "")) for k, _ in keys]
        images = f"{numbers['images']:,}" if "images" in numbers else ""
        lines.append(f"| {name} | {sampling} | {numbers.get('nfe', '')} | {images} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def method_label(report: dict) -> str:
    """The method's name, and where its training started when it was fine-tuned (and the model it distilled)."""
    init = report["init"]
    teacher = f", distilling {init['teacher']}'s" if init and "teacher" in init else ""
    return report["method"] if init is None else \
        f"{report['method']} (from {init['method']}'s model{teacher}, {init['images']:,} images)"


def curves_tsv(curves: dict[str, tuple[list[int], list[dict]]]) -> str:
    """Each method's fewest-step fid_classifier against training images."""
    from dddm.curves import column

    fid = {(name, int(row["images"])): row[column("fid_classifier", steps[0])]
           for name, (steps, rows) in curves.items() for row in rows}
    return wide_tsv("images", fid, list(curves))


def plot_curves(curves: dict[str, tuple[list[int], list[dict]]], path) -> None:
    """fid_classifier against training images, a line per method and followed row (2-step dashed)."""
    import matplotlib

    from dddm.curves import column

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (name, (steps, rows)) in enumerate(curves.items()):
        for s, style in zip(steps, ("-", "--")):
            ax.plot([r["images"] for r in rows], [r[column("fid_classifier", s)] for r in rows], style, marker="o",
                    markersize=3, color=f"C{i}", label=f"{name} {s}-step")
    ax.set_xlabel("training images (a fine-tuned method's include its initialisation's)")
    ax.set_ylabel("fid_classifier (lower is better)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def wide_tsv(x: str, values: dict[tuple[str, int], float], columns: list[str]) -> str:
    """TSV: one line per x value, one column per name in `columns` (NaN where it has no value: an empty cell
    is drawn as a point at 0, NaN is left out)."""
    lines = ["\t".join([x, *columns])]
    for at in sorted({at for name, at in values if name in columns}):
        lines.append("\t".join([str(at), *(f"{values[m, at]:.6g}" if (m, at) in values else "NaN" for m in columns)]))
    return "\n".join(lines) + "\n"


def fid_by_nfe(rows: list[tuple[str, str, dict]], methods: list[str]) -> str:
    """One FID column per method against network evaluations."""
    return wide_tsv("nfe", {(name, numbers["nfe"]): numbers[fid_name(numbers)] for name, _, numbers in rows}, methods)


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
                      samples="the sample stages' directory", runs="the train stages' directory (curve.tsv)",
                      real="the real-data row's metrics JSON",
                      out="the directory for table.md, grids.png, learning_curves.png and the plots' TSV files",
                      headline="the headline metrics JSON (one FID per method and row)")
    from dddm.curves import read_tsv

    real = json.loads(args.real.read_text())["real"]
    rows, trained = [("real digits (held out)", "-", real | {"nfe": 0})], []
    grids, curves = [], {}
    for name in cfg.compared:
        report = json.loads((args.scores / name / "report.json").read_text())
        label = method_label(report)
        method_rows = [(name, f"{row['steps']}-step", row) for row in report["rows"]]
        grids += [(f"{name} {sampling}", Image.open(args.samples / name / f"{sampling}.png"))
                  for _, sampling, _ in method_rows]
        trained += method_rows
        rows += [(label, sampling, row | {"images": report["images"]}) for _, sampling, row in method_rows]
        if "untrained" in report:
            rows.append((f"{name}, untrained network", "1-step", report["untrained"] | {"nfe": 1}))
        steps, points = read_tsv(args.runs / name / "curve.tsv")
        if points:
            curves[name] = (steps, points)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (args.out / "table.md").write_text(text)
    for suffix, names in (("", cfg.methods), ("_finetuned", cfg.finetune.methods)):
        (args.out / f"fid_by_nfe{suffix}.tsv").write_text(fid_by_nfe(trained, list(names)))
        (args.out / f"learning_curves{suffix}.tsv").write_text(
            curves_tsv({m: curves[m] for m in names if m in curves}))
    plot_curves(curves, args.out / "learning_curves.png")
    (args.out / "precision_recall.tsv").write_text(precision_recall(rows[:1] + trained))
    labelled_grids(grids).save(args.out / "grids.png")
    args.headline.write_text(json.dumps(headline_fids(real, trained), indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
