"""The numbers a comparison row shows (dvc metrics); the rest of a score's output is information.
Plain names, importable without torch (the compare and register stages' `--help` stays fast)."""

HEADLINE = ("fid", "fid_classifier", "precision", "recall", "classes")


def fid_name(result: dict) -> str:
    """Which FID a result holds: `fid` (Inception features) or `fid_classifier` (the fallback's)."""
    return "fid" if "fid" in result else "fid_classifier"


def headline(result: dict) -> dict:
    return {k: result[k] for k in HEADLINE if k in result}
