"""Checkpoints that survive a crash and can neither poison a run nor run code; the final model file.

A checkpoint is a directory `ckpt-<step>` holding the shared training state (rank 0), one file
per rank (its RNG states and its store state) and `manifest.json` (every file's size and sha256,
written last). It is written as `ckpt-<step>.tmp` and renamed when complete, so a crash while
writing leaves the earlier checkpoints as they were. The new checkpoint is then read back and
checked against its manifest, and only after that are checkpoints beyond the newest
`train.keep_checkpoints` removed.

Every file is read with `torch.load(weights_only=True)`: tensors and plain containers only, so a
crafted pickle is refused without running anything, and an unreadable file is an error naming it.
Resuming takes the newest checkpoint whose files match its manifest and names each one skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed
from .config import parse_config
from .files import atomic_open
from .integrity import file_sha256, weights_sha256
from .store.common import fmt_bytes
from .unet import build_network

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{9})$")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint or model file that cannot be used; the message names the file."""


def atomic_save(obj, path: Path) -> None:
    """torch.save, atomically (`dddm.files.atomic_open`)."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def load_file(path: Path, what: str) -> dict:
    """A file written by atomic_save, loaded with weights_only=True; any failure is a CheckpointError
    naming the file (instead of a PytorchStreamReader / EOFError / UnpicklingError traceback)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except Exception as e:  # noqa: BLE001 - every unpickling failure means a file that cannot be used
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable {what} (truncated, corrupted, or not written by this "
                              f"project; {type(e).__name__}: {first})") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: not a {what} (holds a {type(blob).__name__}, expected a dict)")
    return blob


def complete(run_dir: Path) -> list[Path]:
    """The complete (renamed) checkpoint directories in run_dir, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and _NAME.match(p.name))


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory in run_dir (not verified), or None."""
    done = complete(run_dir)
    return done[-1] if done else None


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _write_manifest(ckpt: Path, step: int, world_size: int, store_backend: str) -> None:
    # The files by name, not whatever is in the directory: a killed earlier attempt at the same step
    # may have left parts of its own files there.
    files = [TRAIN_STATE, *(f"rank{r}.pt" for r in range(world_size))]
    manifest = {"step": step, "world_size": world_size, "store_backend": store_backend,
                "files": {name: {"bytes": (ckpt / name).stat().st_size, "sha256": file_sha256(ckpt / name)}
                          for name in files}}
    tmp = ckpt / (MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / MANIFEST)


def read_manifest(ckpt: Path) -> dict:
    """The checkpoint's manifest (CheckpointError naming the file when missing or malformed)."""
    path = ckpt / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files, world_size = manifest["files"], int(manifest["world_size"])
        int(manifest["step"])
        str(manifest["store_backend"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint was not completed by this code)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    needed = {TRAIN_STATE, *(f"rank{r}.pt" for r in range(world_size))}
    if not isinstance(files, dict) or not needed <= set(files):
        raise CheckpointError(f"{path}: does not list {sorted(needed - set(files or {}))}")
    return manifest


def verify(ckpt: Path) -> dict:
    """The manifest, after checking every file it lists has its size and sha256; else CheckpointError
    naming the file that differs."""
    manifest = read_manifest(ckpt)
    for name, want in manifest["files"].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {ckpt / MANIFEST})")
        if path.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the manifest says {want['bytes']} "
                                  f"(truncated or overwritten)")
        if file_sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from {ckpt / MANIFEST} (the file was corrupted)")
    return manifest


def _overwritten_by_arrow(older: dict, newer_step: int, steps_per_epoch: int) -> bool:
    """Whether the Arrow store may have overwritten estimates an older checkpoint needs: the store
    keeps a checkpoint's estimates only until the epoch after it starts writing (dddm.store), which
    happens only after that epoch's end checkpoint, so a newer checkpoint at or past that end means
    the run may have gone on into the next epoch."""
    if older["store_backend"] != "arrow":
        return False  # the device store's estimates are inside the checkpoint
    step = older["step"]
    epoch_end = step if step % steps_per_epoch == 0 else (step // steps_per_epoch + 1) * steps_per_epoch
    return newer_step >= epoch_end


def resumable(run_dir: Path, steps_per_epoch: int) -> Path | None:
    """The newest checkpoint in run_dir that verifies; each newer one is skipped with a warning naming
    it and why. None when there is none (training starts from step 0). A CheckpointError when the
    newest verifying checkpoint cannot be resumed consistently (its Arrow estimates may be gone)."""
    remove_unfinished(run_dir)
    skipped: list[Path] = []
    for ckpt in reversed(complete(run_dir)):
        try:
            manifest = verify(ckpt)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", ckpt, e)
            skipped.append(ckpt)
            continue
        if skipped and _overwritten_by_arrow(manifest, step_of(skipped[0]), steps_per_epoch):
            raise CheckpointError(f"{skipped[0]}: does not verify, and the older {ckpt} cannot be resumed: its "
                                  f"x0 estimates in the Arrow store may have been overwritten since; delete "
                                  f"{run_dir} to train afresh")
        if skipped:
            log.warning("resuming from the older checkpoint %s (skipped: %s)", ckpt,
                        ", ".join(p.name for p in skipped))
        return ckpt
    if skipped:
        log.warning("no checkpoint in %s verifies (skipped: %s); training starts from step 0", run_dir,
                    ", ".join(p.name for p in skipped))
    return None


def _prune(run_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints, and unfinished ones."""
    done = complete(run_dir)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_unfinished(run_dir)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _tensor_bytes(obj) -> int:
    """The bytes of every tensor in a nest of dicts, lists and tuples: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _write(obj, path: Path, step: int) -> None:
    """atomic_save, a failure (disk full, an I/O error) turned into one line naming the file and the
    space it needs; the partial file is gone (atomic_open) and the unfinished directory is removed."""
    try:
        atomic_save(obj, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        shutil.rmtree(path.parent, ignore_errors=True)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        free = shutil.disk_usage(path.parent.parent).free
        raise CheckpointError(f"{path}: writing the checkpoint of step {step} failed ({reason}); "
                              f"{fmt_bytes(free)} free there, the file needs about {fmt_bytes(_tensor_bytes(obj))}; "
                              f"the older checkpoints are kept: free space (or set train.checkpoint_dir) and rerun to "
                              f"resume") from None


def remove_unfinished(run_dir: Path) -> None:
    """Remove the `ckpt-*.tmp` directories an interrupted write left (a crash, a full disk)."""
    for tmp in run_dir.glob("ckpt-*.tmp"):
        log.info("removing %s, an unfinished checkpoint of an earlier run", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def save(run_dir: Path, step: int, world, *, net, ema, opt, sched, store, method, keep: int) -> Path:
    final = run_dir / f"ckpt-{step:09d}"
    tmp = run_dir / f"ckpt-{step:09d}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    _write({"world_size": world.world_size, "rng": _rng_state(),
            "store": store.state_dict() if store is not None else None}, tmp / f"rank{world.rank}.pt", step)
    if world.is_main:
        own = method.training_state()  # (written only where a method has one: a CD target network)
        _write({"step": step, "world_size": world.world_size, "model": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **({"method": own} if own else {})},
               tmp / TRAIN_STATE, step)
    distributed.barrier()
    if world.is_main:
        try:
            _write_manifest(tmp, step, world.world_size, store.backend if store is not None else "none")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{tmp / MANIFEST}: writing the checkpoint of step {step} failed ({e.strerror}); "
                                  f"{fmt_bytes(shutil.disk_usage(run_dir).free)} free there; the older checkpoints "
                                  f"are kept: free space and rerun to resume") from None
        if final.exists():  # a resumed run re-reaching a step it had saved before
            shutil.rmtree(final)
        os.replace(tmp, final)
        try:
            verify(final)
        except CheckpointError as e:
            raise CheckpointError(f"{final}: just written, but it does not verify ({e}); the older checkpoints "
                                  f"are kept") from None
        _prune(run_dir, keep)
    distributed.barrier()
    return final


def restore(path: Path, world, *, net, ema, opt, sched, store, method) -> int:
    """Load a verified checkpoint into the given objects; returns its global step."""
    shared = load_file(path / TRAIN_STATE, "training state")
    if shared["world_size"] != world.world_size:
        raise CheckpointError(f"{path}: written by {shared['world_size']} process(es) but this run has "
                              f"{world.world_size}; resume with train.nnodes x train.nproc = {shared['world_size']} "
                              "or start a new run")
    own = load_file(path / f"rank{world.rank}.pt", "rank state")
    net.load_state_dict(shared["model"])
    ema.load_state_dict(shared["ema"])
    opt.load_state_dict(shared["optimizer"])
    sched.load_state_dict(shared["scheduler"])
    method.load_training_state(shared.get("method", {}))
    if store is not None:
        store.load_state_dict(own["store"])
    torch.set_rng_state(own["rng"]["torch"])
    if "cuda" in own["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["rng"]["cuda"])
    return int(shared["step"])


def save_model(path: Path, cfg, method: str, info, module: torch.nn.Module, images: int,
               init: dict | None = None) -> None:
    """The final EMA network with the params, method and dataset info needed to rebuild it, the training
    images behind it (`images`, the initialisation's included) and where it started (`init`: None from
    scratch, else dddm.finetune.Initialisation.describe()), and the digest of its weights (a model file
    has no manifest: bytes changed inside a tensor are caught by this)."""
    state = module.state_dict()
    atomic_save({"params": cfg.model_dump(mode="json"), "method": method, "dataset": asdict(info),
                 "state_dict": state, "weights_sha256": weights_sha256(state), "images": images, "init": init}, path)


# train.* keys that do not change the trained network
NOT_TRAINING = ("resume", "device", "keep_checkpoints", "log_every")


def training_identity(cfg, method: str) -> dict:
    """The params that make a trained network what it is (run directories are named by their hash; a
    model file's are compared with the params a later stage reads)."""
    identity = cfg.model_dump(mode="json", include={"seed", "data", "model", "train"})
    identity["train"] = {k: v for k, v in identity["train"].items() if k not in NOT_TRAINING}
    identity["method"] = {method: cfg.method_config(method).model_dump(mode="json")}
    if cfg.finetuned(method):
        identity["finetune"] = cfg.finetune.model_dump(mode="json", include={"init_from", "epochs", "lr"})
        if method in cfg.finetune.dropout:  # (absent for a method not listed: its runs from before keep their names)
            identity["finetune"]["dropout"] = cfg.finetune.dropout[method]
    return identity


def params_differences(trained: dict, current: dict, prefix: str = "") -> list[str]:
    """`key: trained value, now value` for each flattened key whose values differ (keys of `trained`)."""
    out = []
    for key, value in trained.items():
        name, other = f"{prefix}{key}", current.get(key) if isinstance(current, dict) else None
        if isinstance(value, dict):
            out += params_differences(value, other if isinstance(other, dict) else {}, name + ".")
        elif value != other:
            out.append(f"{name}: {value!r} in the model, {other!r} now")
    return out


def check_trained_with(trained: TrainedModel, cfg, path: Path, where: str) -> None:
    """CheckpointError unless the model at `path` was trained with the params `cfg` holds (`where`
    names them): a model trained with other params than those recorded for it (dvc.lock) is never
    sampled or scored under their name."""
    differences = params_differences(training_identity(trained.cfg, trained.method.name),
                                     training_identity(cfg, trained.method.name))
    if differences:
        raise CheckpointError(f"{path}: was trained with other params than {where} holds ({'; '.join(differences)}); "
                              f"retrain it (`dvc repro -f train@{trained.method.name}`) or set the params back")


@dataclass
class TrainedModel:
    net: torch.nn.Module  # in eval mode
    cfg: object           # the Config it was trained with
    method: object        # its dddm.methods.Method
    dataset: dict         # the prepared dataset's info
    images: int           # training images behind it, its initialisation's included
    init: dict | None     # None: trained from scratch; else the model it was fine-tuned from (path, method, ...)
    weights_sha256: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dataset["channels"], self.dataset["image_size"], self.dataset["image_size"])

    def with_sampler(self, cfg):
        """The model's method (its training params) with the sampling params and seed of `cfg`, the
        current params: sampling settings change without retraining."""
        return self.cfg.make_method(self.method.name, getattr(cfg.sampler, self.method.name), cfg.seed)

    def untrained(self) -> torch.nn.Module:
        """The same network as initialised by the train stage (the floor any training must beat)."""
        torch.manual_seed(self.cfg.seed)
        return build_network(self.cfg.model, self.dataset["image_size"], self.dataset["channels"],
                             self.method.conditioning).to(next(self.net.parameters()).device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu", expect_method: str | None = None) -> TrainedModel:
    """The network, its params and method from a file written by save_model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found (run the train stage first)")
    blob = load_file(path, "model file (rerun the train stage)")
    if not {"params", "method", "dataset", "state_dict", "weights_sha256", "images", "init"} <= set(blob):
        raise CheckpointError(f"{path}: not a model file written by the train stage (keys {sorted(blob)}); rerun it")
    if weights_sha256(blob["state_dict"]) != blob["weights_sha256"]:
        raise CheckpointError(f"{path}: the weights do not match the file's checksum (the file was corrupted); "
                              f"rerun the train stage")
    cfg = parse_config(blob["params"], str(path))
    method = cfg.make_method(blob["method"])
    if expect_method is not None and method.name != expect_method:
        raise ValueError(f"{path}: holds a {method.name} model, not {expect_method}")
    net = build_network(cfg.model, blob["dataset"]["image_size"], blob["dataset"]["channels"], method.conditioning)
    net.load_state_dict(blob["state_dict"])
    return TrainedModel(net.to(device).eval(), cfg, method, blob["dataset"], blob["images"], blob["init"],
                        blob["weights_sha256"])
