"""Prefect flows that drive the DVC pipeline (they never reimplement a stage): `flows.experiment` runs
one experiment, `flows.sweep` a grid of them, `flows.deploy` serves the deployments; the
MLflow Model Registry's champion is kept by `dddm.registry`. See flows/README.md."""
