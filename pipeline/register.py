"""Stage register: each method's EMA model into the MLflow Model Registry as `<method>-<data.source>`,
the alias `champion` moved to it when its score (the FID of its fewest-step row) beats the current
holder's, whoever registered that (this stage, or a Prefect flow) -> <out> (what was registered)."""

import json
from pathlib import Path

from dddm.headline import fid_key

from .common import start


def main() -> None:
    cfg, args = start("register", __doc__, scores="the score stages' directory (one sub-directory per method)",
                      runs="the train stages' directory (each method's mlflow_run.json; model.pt, loss.tsv and "
                           "curve.tsv for what a tracking outage kept from its run)",
                      out="the JSON file of what was registered")
    from dddm.registry import NotRegistered, model_name, register_trained  # MLflow

    registered = {}
    if cfg.tracking.register_models:
        for method in cfg.compared:
            metrics = json.loads((args.scores / method / "metrics.json").read_text())
            metric = fid_key(metrics)
            row, name = metric.split("/")
            try:  # DVC runs the stage in the repository
                result = register_trained(args.runs / method, Path.cwd(), model_name(method, cfg.data.source), metric,
                                          metrics[row][name])
            except NotRegistered as e:  # a tracking outage costs no run: the model is registered later
                print(f"register: WARNING: {method}: {e}")
                registered[method] = {"not_registered": str(e)}
                continue
            if result["completed"]:
                print(f"register: {method}: logged into MLflow run {result['run_id']} what a tracking outage kept "
                      f"from it: {', '.join(result['completed'])}")
            registered[method] = {k: result[k] for k in ("name", "version", "metric", "score", "alias", "moved",
                                                         "previous_version", "previous_score")}
            print(f"register: {result['name']} version {result['version']} ({metric} {result['score']:.4g}); "
                  f"{result['alias']} " + ("moved to it" if result["moved"] else
                                           f"stays on version {result['previous_version']}"))
    else:
        print("register: tracking.register_models is false; nothing registered")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"registered": registered}, indent=2) + "\n")


if __name__ == "__main__":
    main()
