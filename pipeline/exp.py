"""`dvc exp run` and `dvc exp show` for this project.

    python -m pipeline.exp -S method.udddm.process=vp [any other `dvc exp run` argument]
    python -m pipeline.exp show [any other `dvc exp show` argument]
    python -m pipeline.exp verify

`verify` compares the params dvc.lock records for each train stage with those its model.pt was trained
with (the train stage writes them into the file), and names every difference: what an experiment started
during a run used to leave behind (README, Known issues).

`run` (the default) checks the `-S` overrides first, before any file changes: a key params.yaml lacks
is named with the nearest key (DVC's own message advises `+key`, which adds a key the check stage then
rejects), and a bad value is named as the check stage names it. It then writes them into params.yaml
itself, changing only those values (DVC's `-S` writer rewrites the whole file: `[1, 2]` lists become
block lists, `null` an empty value), and runs `dvc exp run`; with `--queue`, `--temp` or `--run-all` the
`-S` go to DVC, which applies them to the experiment's copy. Models are not registered unless asked:
`tracking.register_models=false` is added unless an override sets it. It refuses to start while another
DVC operation holds the repository (DVC's own `exp run` would rewrite params.yaml first, and the running
operation would record those params for outputs made with others), and when `dvc exp run` fails,
params.yaml is put back as it was.

`show` narrows DVC's table, which has a column for every key of params.yaml, every metric of every file
and every dependency's hash (DVC has no setting for its default view), to the experiments' changed
params and out/headline.json's FID per method and row.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from flows.dvcrun import RepositoryBusy, check_sets, refuse_if_busy, write_sets

# dvc exp show's column names: a metric is `<key>`, or `<file>:<key>` where two files share the key;
# a dependency is its path (params.yaml is the check stage's). out/headline.json's keys (`real`,
# `<method>.nfe<k>`) name no file.
HEADLINE_COLUMNS = r"^real$|^[a-z0-9_]+\.nfe\d+$"
NOT_SHOWN = r".*[/:]|^dddm$|^params\.yaml$|^(nfe\d+|real|untrained)\."  # hashes, per-method files, real's file


def dvc(*args: str) -> None:
    os.execv(sys.executable, [sys.executable, "-m", "dvc", "exp", *args])


def lock_differences(lock_path: Path) -> list[str]:
    """`<model.pt>: <key>: ...` for each param dvc.lock records for a train stage that differs from the
    one its model file was trained with."""
    import yaml

    from dddm.checkpoint import load_model, params_differences

    out = []
    for name, stage in (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}).items():
        model = next((o["path"] for o in stage.get("outs", []) if o["path"].endswith("model.pt")), None)
        if not name.startswith("train@") or model is None or not Path(model).is_file():
            continue
        trained = load_model(model).cfg.model_dump(mode="json")
        for key, recorded in (stage.get("params") or {}).get("params.yaml", {}).items():
            value = trained
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            found = params_differences({key: value}, {key: recorded})
            out += [f"{model}: {d.replace(' now', ' in dvc.lock')}" for d in found]
    return out


def main() -> None:
    if sys.argv[1:2] == ["verify"]:
        differences = lock_differences(Path("dvc.lock"))
        if differences:
            sys.exit("exp: dvc.lock records other params than the models were trained with (retrain them with "
                     "`dvc repro -f train@<method>`):\n" + "\n".join(differences))
        print("exp: dvc.lock records the params each model was trained with")
        return
    if sys.argv[1:2] == ["show"]:
        dvc("show", "--only-changed", "--keep", HEADLINE_COLUMNS, "--drop", NOT_SHOWN, *sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m pipeline.exp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set-param", dest="sets", action="append", default=[], help="as `dvc exp run -S`")
    args, rest = ap.parse_known_args()
    from dvc.exceptions import DvcException

    params = Path("params.yaml")
    before = params.read_bytes()
    try:
        refuse_if_busy(Path("."))
        check_sets(params, args.sets)  # the overrides as given, named in the message
        sets = args.sets + unregistered(params, args.sets)
        if {"--queue", "--temp", "--run-all"} & set(rest):  # DVC applies -S to the experiment's copy only
            dvc("run", *rest, *(a for s in sets for a in ("-S", s)))
        write_sets(params, sets)  # in the workspace, as `dvc exp run -S` would, keeping the layout
    except (ValueError, RepositoryBusy, DvcException) as e:
        sys.exit(f"exp: {e}")
    code = subprocess.call([sys.executable, "-m", "dvc", "exp", "run", *rest])
    if code != 0 and params.read_bytes() != before:
        params.write_bytes(before)
        print(f"exp: dvc exp run failed (exit {code}); params.yaml restored as it was", file=sys.stderr)
    sys.exit(code)


def unregistered(params_file: Path, sets: list[str]) -> list[str]:
    """`tracking.register_models=false` unless the overrides set it or params.yaml already says so: an
    experiment adds no model versions to the registry unless asked (`-S tracking.register_models=true`)."""
    import yaml

    if any(s.lstrip("+~").startswith("tracking.register_models=") for s in sets):
        return []
    if (yaml.safe_load(params_file.read_text()).get("tracking") or {}).get("register_models") is False:
        return []
    print("exp: models are not registered (-S tracking.register_models=true to register them)", file=sys.stderr)
    return ["tracking.register_models=false"]


if __name__ == "__main__":
    main()
