"""The FID Inception network (torch-fidelity's inception-v3-compat): where its weights file is
looked for, and loading it; nothing here downloads (docs/scoring.md, "Inception weights")."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..files import atomic_open
from .features import default_device

log = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_FID_LAYER = "2048"
INCEPTION_ISC_LAYER = "logits_unbiased"  # torch-fidelity's default for IS: the fc layer without its bias


class InceptionWeightsMissing(FileNotFoundError):
    """The FID Inception weights are not where they were looked for; the message lists where."""

    def __init__(self, searched: Sequence[str], note: str = ""):
        self.searched = list(searched)
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        lines = [
            f"Inception weights for FID/IS/KID not found: expected the file {INCEPTION_WEIGHTS_FILENAME!r} "
            "(torch-fidelity's inception-v3-compat, the TF 2015-12-05 FID Inception converted to PyTorch). "
            "Looked in:",
            *(f"  - {s}" for s in self.searched),
            f"Get it on a machine with internet from {INCEPTION_WEIGHTS_URL} and put it in {hub}/ "
            "(or set $TORCH_HOME), or give its path (a local path or an fsspec URL) as the inception "
            "weights setting in params.yaml.",
        ]
        if note:
            lines.append(note)
        self.message = "\n".join(lines)
        self.expected_file = INCEPTION_WEIGHTS_FILENAME
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def inception_search_locations() -> list[Path]:
    """The library's usual places for the weights file: the torch hub cache (where torch-fidelity's
    `load_state_dict_from_url` and torchmetrics put it), and the default one if $TORCH_HOME moved it."""
    places = [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME]
    default = Path(os.path.expanduser("~/.cache/torch/hub/checkpoints")) / INCEPTION_WEIGHTS_FILENAME
    if default not in places:
        places.append(default)
    return places


def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def _fetch_url(url: str, cache_dir: Path) -> Path:
    """Copy an fsspec URL to cache_dir/<basename> (reused when its size matches); returns the path."""
    import fsspec

    fs, remote = fsspec.core.url_to_fs(url)
    info = fs.info(remote)  # FileNotFoundError if absent
    if info.get("type") == "directory":
        remote = remote.rstrip("/") + "/" + INCEPTION_WEIGHTS_FILENAME
        info = fs.info(remote)
    local = cache_dir / Path(remote).name
    size = info.get("size")
    if local.is_file() and size is not None and local.stat().st_size == size:
        return local

    with atomic_open(local) as f, fs.open(remote, "rb") as src:
        while chunk := src.read(1 << 22):
            f.write(chunk)
    return local


def search_inception_weights(configured: str | os.PathLike | None, cache_dir: str | os.PathLike | None
            ) -> tuple[Path | None, list[str]]:
    searched: list[str] = []
    if configured is not None and str(configured) != "":
        conf = str(configured)
        if _is_url(conf):
            dest = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
            try:
                return _fetch_url(conf, dest), searched
            except Exception as e:  # noqa: BLE001 - any failure means: not found there
                searched.append(f"{conf} (configured fsspec URL, to be copied to {dest}/: {type(e).__name__}: {e})")
        else:
            p = Path(os.path.expanduser(conf.removeprefix("file://")))
            if p.is_dir():
                if (p / INCEPTION_WEIGHTS_FILENAME).is_file():
                    return p / INCEPTION_WEIGHTS_FILENAME, searched
                searched.append(f"{p / INCEPTION_WEIGHTS_FILENAME} (configured directory: no such file)")
            elif p.is_file():
                return p, searched
            else:
                searched.append(f"{p} (configured path: not found)")
    for p in inception_search_locations():
        if p.is_file():
            return p, searched
        searched.append(f"{p} (torch hub cache of torch-fidelity / torchmetrics: not found)")
    return None, searched


def find_inception_weights(configured: str | os.PathLike | None = None, *,
                           cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local path of the Inception weights, or None. Looks in `configured` (a file, a directory
    holding `INCEPTION_WEIGHTS_FILENAME`, or an fsspec URL copied to `cache_dir`, default the hub
    cache), then in `inception_search_locations()`."""
    return search_inception_weights(configured, cache_dir)[0]


def require_inception_weights(configured: str | os.PathLike | None = None, *,
                              cache_dir: str | os.PathLike | None = None) -> Path:
    """As `find_inception_weights`, but raises `InceptionWeightsMissing` (listing where it looked)."""
    found, searched = search_inception_weights(configured, cache_dir)
    if found is None:
        raise InceptionWeightsMissing(searched)
    return found


def resolve_inception(inception_weights: str | os.PathLike | None, use_inception: bool | None,
                      count: int, what: str) -> Path | None:
    """The Inception weights to use for `count` images, or None for the classifier alone. `auto`
    (use_inception None) also falls back, saying why, when the count is below what FID needs."""
    if use_inception is False:
        return None
    found, searched = search_inception_weights(inception_weights, None)
    if found is None and use_inception:
        raise InceptionWeightsMissing(searched)
    needed = int(INCEPTION_FID_LAYER) + 1
    if found is not None and use_inception is None and count < needed:
        log.warning("score.use_inception auto: %s are %d images, fewer than the %d an Inception FID needs; "
                    "using the classifier fallback", what, count, needed)
        return None
    return found


def read_inception_weights(weights_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights file's tensors, read with `torch.load(weights_only=True)`: a crafted pickle is
    refused without running anything (torch-fidelity's own loader unpickles with weights_only=False)."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: Inception weights file not found")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unpickling failure means a file that cannot be used
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{weights_path}: not a torch-fidelity inception-v3-compat state dict "
                         f"({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{weights_path}: not a torch-fidelity inception-v3-compat state dict (not a mapping "
                         f"of names to tensors)")
    return state


def load_inception(weights_path: str | os.PathLike, features: Sequence[str] = (INCEPTION_FID_LAYER,),
                   device: str | torch.device | None = None) -> torch.nn.Module:
    """torch-fidelity's `FeatureExtractorInceptionV3` with the given weights file (never downloads).
    `features`: layers among '64', '192', '768', '2048', 'logits_unbiased', 'logits'; its
    forward takes uint8 (B, 3, H, W) and returns a tuple in that order."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = read_inception_weights(weights_path)
    # torch-fidelity loads what it is given with weights_only=False, so it gets the verified tensors,
    # re-serialised in memory by us, never the file
    verified = io.BytesIO()
    torch.save(state, verified)
    verified.seek(0)
    try:
        model = FeatureExtractorInceptionV3(INCEPTION_NAME, list(features), feature_extractor_weights_path=verified)
    except RuntimeError as e:
        raise ValueError(f"{weights_path}: not a torch-fidelity inception-v3-compat state dict ({e})") from e
    return model.to(default_device(device))


def inception_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    return lambda x: model(x)
