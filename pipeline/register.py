"""Stage register: each method's EMA model into the MLflow Model Registry as `<method>-<data.source>`,
the alias `champion` moved to it when its score (the FID of its fewest-step row) beats the current
holder's, whoever registered that (this stage, or a Prefect flow) -> <out> (what was registered)."""

import json
from pathlib import Path

from dddm.headline import fid_key

from .common import start


def main() -> None:
    cfg, args = start("register", __doc__, scores="the score stages' directory (one sub-directory per method)",
                      runs="the train stages' directory (each method's mlflow_run.json)",
                      out="the JSON file of what was registered")
    from dddm.registry import model_name, register_if_better, resolve_uri  # MLflow

    registered = {}
    if cfg.tracking.register_models:
        for method in cfg.compared:
            metrics = json.loads((args.scores / method / "metrics.json").read_text())
            reference = json.loads((args.runs / method / "mlflow_run.json").read_text())
            metric = fid_key(metrics)
            row, name = metric.split("/")
            # a relative SQLite URI is relative to the repository, where DVC runs the stage
            result = register_if_better(resolve_uri(reference["tracking_uri"], Path.cwd()), reference["run_id"],
                                        model_name(method, cfg.data.source), metric, score=metrics[row][name])
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
