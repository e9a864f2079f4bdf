"""The numbers a comparison row shows (dvc metrics); the rest of a score's output is information.
Plain names, importable without torch (the compare and register stages' `--help` stays fast)."""

HEADLINE = ("fid", "fid_classifier", "precision", "recall", "classes")


def fid_name(result: dict) -> str:
    """Which FID a result holds: `fid` (Inception features) or `fid_classifier` (the fallback's)."""
    return "fid" if "fid" in result else "fid_classifier"


def headline(result: dict) -> dict:
    return {k: result[k] for k in HEADLINE if k in result}


def fid_key(metrics: dict) -> str:
    """`nfe<k>/<fid name>` of the fewest network evaluations (`fid` with Inception, else the fallback's), in a
    score stage's metrics ({"nfe1": {...}, "nfe2": {...}, "untrained": {...}}): a method's headline score."""
    rows = sorted((int(row[3:]), row) for row in metrics if row.startswith("nfe"))
    row = rows[0][1]
    return f"{row}/{fid_name(metrics[row])}"
