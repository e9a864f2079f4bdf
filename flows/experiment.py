"""One pipeline experiment as a Prefect flow.

Parameter overrides go into params.yaml through DVC's own `-S` code, each dvc.yaml stage runs as its own
task (`dvc repro --single-item <stage>`: DVC's cache and run-cache skip what did not change), and the finished
workspace is saved as a DVC experiment (`dvc exp save`), which is what `dvc exp run -S ...` does in one command.
A failing stage fails the flow run and rolls the workspace back to the results it had before.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Failed, State

from dddm.headline import HEADLINE
from flows import dvcrun
from dddm.registry import (REGISTER_LATER, NotRegistered, lower_is_better, model_name, register_if_better,
                           resolve_uri, run_link, run_url, split_metric)
from dddm.tracking import TrackingUnavailable, check_reachable, tag_run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_METRIC = "udddm/nfe1/fid_classifier"


@contextmanager
def workspace_lock(repo: Path):
    """One experiment at a time per workspace (the nightly run waits for a manual one, and so on)."""
    path = repo / ".dvc" / "tmp" / "udddm-flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            get_run_logger().info("waiting for another flow run that uses %s", repo)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, dest, symlinks=True)
    else:
        shutil.copy2(source, dest)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def rollback_on_failure(repo: Path, planned: dict):
    """If the body fails, put the workspace back as it was: params.yaml, dvc.lock, the uncached outputs (files
    and directories: metrics, plots, out/compare) and the .gitignore files beside outputs from a copy, the
    cached outputs with `dvc checkout`, and every output path that did not exist before (those of methods
    the `planned` params add) removed. Caches stay: DVC's, MLflow's store, the checkpoints."""
    before = dvcrun.outputs(repo)
    declared = before | {path: cached for path, cached in dvcrun.outputs(repo, planned).items() if path not in before}
    # copied: what `dvc checkout` cannot restore (uncached outputs; what only the planned params declare)
    kept = ["params.yaml", "dvc.lock", *(path for path, cached in declared.items() if not cached or path not in before)]
    kept += sorted({str(Path(path).parent / ".gitignore") for path in declared} - set(kept))
    existed = {path for path in [*kept, *declared] if (repo / path).exists()}
    folders = {parent for path in declared for parent in Path(path).parents if (repo / parent).is_dir()}
    with tempfile.TemporaryDirectory(dir=repo / ".dvc" / "tmp", prefix="udddm-snapshot-") as snapshot:
        for rel in kept:
            if rel in existed:
                _copy(repo / rel, Path(snapshot) / rel)
        try:
            yield
        except BaseException:
            logger = get_run_logger()
            logger.warning("a step failed: putting back params.yaml, dvc.lock and the outputs of before")
            for rel in ("params.yaml", "dvc.lock"):
                _remove(repo / rel)
                if rel in existed:
                    _copy(Path(snapshot) / rel, repo / rel)
            if (repo / "dvc.lock").is_file():
                try:
                    dvcrun.run(["checkout", "--force"], repo, logger)
                except Exception as e:  # never hide the stage's own error behind this one
                    logger.error("restoring the earlier outputs failed: %s", e)
            for rel in dict.fromkeys([*kept, *declared]):  # after the checkout, which writes .gitignore entries
                if rel in kept or rel not in existed:
                    _remove(repo / rel)
                if rel in kept and rel in existed:
                    _copy(Path(snapshot) / rel, repo / rel)
                for parent in Path(rel).parents:  # folders the failed run made, left empty
                    if parent in folders or parent == Path("."):
                        break
                    if (repo / parent).is_dir():
                        if any((repo / parent).iterdir()):
                            break
                        (repo / parent).rmdir()
            raise


class FailedRunTracebackFilter(logging.Filter):
    """Drops the traceback Prefect's engine logs when a flow ends in the Failed state it returned: the engine
    re-raises that state as FailedRun ("Engine execution exited with unexpected exception"), but the flow run's
    state message already says what failed, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.exceptions import FailedRun

        return not (record.exc_info and isinstance(record.exc_info[1], FailedRun))


def completed_task_line(record: logging.LogRecord) -> bool:
    """False for the engine's "Finished in state Completed()" of each task: one per stage, saying nothing the
    task's state does not (a failed task's line stays)."""
    return not record.getMessage().startswith("Finished in state Completed(")


# the runner's flow-run process imports this module before its engine runs the flow
logging.getLogger("prefect.flow_runs").addFilter(FailedRunTracebackFilter())
logging.getLogger("prefect.task_runs").addFilter(completed_task_line)


def failed(message: str) -> State:
    """The flow run's Failed state with `message` (one line, no traceback), logged and sent to the server first:
    `prefect deployment run --watch` stops listening a few seconds after the final state, before the engine's
    own "Finished in state" line may arrive."""
    from prefect.logging.handlers import APILogHandler

    get_run_logger().error(message)
    APILogHandler().flush()
    return Failed(message=message)


class StepFailed(RuntimeError):
    """A step failed in a way it would fail again (a bad override, a stage's own error): its message is the
    flow run's state message, with no traceback."""


def raise_if_failed(state: State) -> None:
    if state.is_failed():
        raise StepFailed(state.message)


def planned_params(repo: Path, overrides: dict[str, Any] | None) -> dict:
    """The params `overrides` give the workspace's params.yaml, validated as every stage validates them; a
    StepFailed naming the key (and the nearest one) or the value as the check stage names it."""
    from dvc.exceptions import DvcException

    try:
        return dvcrun.check_sets(repo / "params.yaml", dvcrun.set_params(overrides))
    except (ValueError, DvcException) as e:
        cause = f" ({e.__cause__})" if e.__cause__ and str(e.__cause__) not in str(e) else ""
        raise StepFailed(f"bad override: {e}{cause}") from None


def override_problem(repo: Path, overrides: dict[str, Any] | None) -> str | None:
    """What is wrong with `overrides` (planned_params), or None."""
    try:
        planned_params(repo, overrides)
    except StepFailed as e:
        return str(e)
    return None


@task(name="apply-params", task_run_name="apply-params")
def apply_params(repo: str, overrides: dict[str, Any] | None) -> list[str]:
    sets = dvcrun.apply_overrides(Path(repo), overrides)
    get_run_logger().info("params.yaml overrides (dvc exp run -S): %s", " ".join(sets) or "none")
    return sets


@task(name="stage", task_run_name="{stage}", retries=2, retry_delay_seconds=30,
      retry_condition_fn=dvcrun.retry_if_transient)
def run_stage(stage: str, repo: str, timeout_s: float, pull: bool = False) -> State | None:
    """`dvc repro --single-item <stage>`: runs the stage unless DVC's cache says it is up to date; its output
    streams into this task's log. The flow has run every stage upstream of it in the tasks before, so DVC need not
    check them again (each check re-reads the stages' dependencies: about 1 s of a task on a 21-stage graph).
    `pull` (`--pull`): an up-to-date stage's outputs missing here come from DVC's default remote instead of
    being made again (a work pool's fresh clone: the data stages another clone ran and pushed). A failure that
    would repeat ends the task in a Failed state carrying the stage's own message; a transient one raises, to be
    retried."""
    try:
        dvcrun.run(["repro", "--single-item", *(["--pull"] if pull else []), stage], Path(repo), get_run_logger(),
                   timeout_s, what=f"stage {stage}")
    except dvcrun.StageFailed as e:
        if e.transient:
            raise
        return Failed(message=str(e))
    return None


def registration(repo: Path, overrides: dict[str, Any] | None, registry: bool) -> dict[str, Any]:
    """The overrides with `tracking.register_models` set to `registry` where params.yaml says otherwise (and
    the overrides do not set it): the register stage registers every method's model only when asked, so a
    sweep's points (registry false) add no versions. params.yaml is not rewritten when nothing changes."""
    overrides = dict(overrides or {})
    current = (yaml.safe_load((repo / "params.yaml").read_text()).get("tracking") or {}).get("register_models")
    if "tracking.register_models" not in overrides and current != registry:
        overrides["tracking.register_models"] = registry
    return overrides


@task(name="link-runs", task_run_name="link-runs")
def link_runs(references: dict, repo: Path, experiment: str) -> None:
    """Tags on each method's MLflow training run naming the DVC experiment and the Prefect flow run that
    made it (the flow's artifacts link back to the run)."""
    tags = {"dvc_experiment": experiment, "prefect_flow_run": flow_run.name or "",
            "prefect_flow_run_id": str(flow_run.id or "")}
    if (flow_run.ui_url or "").startswith("http"):  # "None/flow-runs/..." when Prefect knows no UI address
        tags["prefect_flow_run_url"] = flow_run.ui_url
    for reference in references.values():
        tag_run(resolve_uri(reference["tracking_uri"], repo), reference["run_id"], tags)


@task(name="save-experiment", task_run_name="save-experiment")
def save_experiment(repo: str, name: str) -> str | None:
    """The workspace as a DVC experiment (params, dvc.lock, metrics): `dvc exp show`, `dvc exp apply`."""
    logger = get_run_logger()
    if not dvcrun.has_commit(Path(repo)):
        logger.warning("the repository has no commit yet, so no DVC experiment is saved (dvc.lock holds "
                       "the lineage); commit once to get `dvc exp show` entries")
        return None
    # the uncached outputs, and the .gitignore files DVC wrote beside outputs (part of the hashes of the
    # directories later stages depend on: without them `dvc exp apply` elsewhere leaves those stages stale)
    untracked = [path for path in dvcrun.uncached_outputs(Path(repo)) if (Path(repo) / path).exists()]
    untracked += dvcrun.untracked_gitignores(Path(repo))
    include = [arg for path in untracked for arg in ("--include-untracked", path)]
    dvcrun.run(["exp", "save", "--force", "--name", name, *include], Path(repo), logger)
    return name


@task(name="push-outputs", task_run_name="push-outputs")
def push_outputs(repo: str, remote: str | None, experiment: str | None) -> str | None:
    """`dvc push` of the finished run's cached outputs to `remote`, or to DVC's default remote when one is set;
    another clone then `dvc pull`s them and its `dvc repro` has nothing to do. With a git remote `origin`
    (a work pool's clone has one), the DVC experiment goes there too: `dvc exp pull origin NAME` elsewhere."""
    logger = get_run_logger()
    known, default = dvcrun.remotes(Path(repo))
    name = remote or default
    if name is None:
        logger.info("no DVC remote is set: the outputs stay in this workspace (share them with `dvc remote add "
                    "-d NAME URL`: a shared directory, s3://bucket/path, gs://bucket/path, ssh://host/path)")
        return None
    if name not in known:
        raise ValueError(f"DVC remote {name!r} is not configured in {repo} (configured: {', '.join(known) or 'none'}); "
                         f"add it with `dvc remote add {name} URL` (a shared directory, s3://..., gs://..., ssh://...); "
                         "the run's outputs stay in the workspace")
    dvcrun.run(["push", "--remote", name], Path(repo), logger, what=f"dvc push to remote {name!r}")
    if experiment and dvcrun.has_git_remote(Path(repo), "origin"):
        dvcrun.run(["exp", "push", "--remote", name, "origin", experiment], Path(repo), logger,
                   what=f"dvc exp push origin {experiment}")
    return name


def metric_problem(metric: str, metrics: dict) -> str | None:
    """What keeps `metric` from naming one of the experiment's scores (`metrics`: per method), or None."""
    method, row, key = split_metric(metric)
    if key not in metrics.get(method, {}).get(row, {}):
        return (f"metric {metric!r} is not among the scores (they are "
                f"{sorted(f'{m}/{r}/{k}' for m, rows in metrics.items() for r, v in rows.items() for k in v)})")
    return None


def tracking_away(uri: str) -> str | None:
    """Why the MLflow tracking server does not answer (one warning in the flow's log), or None: the flow then ends
    without tagging, registering or linking its runs, which MLflow's own retries would stall for minutes."""
    try:
        check_reachable(uri)
    except TrackingUnavailable as e:
        get_run_logger().warning("%s: the runs are not tagged with this flow run nor linked from its artifacts, and "
                                 "no model is registered (`%s` registers them later)", e, REGISTER_LATER)
        return str(e)
    return None


@task(name="register-model", task_run_name="register-model")
def register_model(tracking_uri: str, run_id: str, name: str, metric: str, alias: str, metrics: dict) -> dict | None:
    """`metrics`: the experiment's scores per method, the score of this configuration even when DVC
    restored the score stage from its run-cache (and so logged nothing new to MLflow). None, said in one
    warning, when the model cannot be registered now (a tracking outage)."""
    logger = get_run_logger()
    problem = metric_problem(metric, metrics)
    if problem:
        raise ValueError(problem)
    method, row, key = split_metric(metric)
    try:
        result = register_if_better(tracking_uri, run_id, name, f"{row}/{key}", alias, score=metrics[method][row][key])
    except NotRegistered as e:
        logger.warning("%s", e)
        return None
    logger.info("registered %s version %s (%s = %.6g, %s is better); alias %r %s", name, result["version"],
                metric, result["score"], result["better"], alias,
                "moved to it" if result["moved"] else f"stays on version {result['previous_version']} "
                f"({result['previous_score']})")
    return result


def scores_table(metrics: dict[str, dict[str, dict]]) -> str:
    """One line per method and row (nfe1, nfe2, ..., untrained)."""
    flat = {f"{method} {row}": m for method, rows in metrics.items() for row, m in rows.items()}
    columns = [k for k in HEADLINE if any(k in m for m in flat.values())]
    rows = [f"| {name} | " + " | ".join(f"{m[k]:.4g}" if k in m else "" for k in columns) + " |"
            for name, m in flat.items()]
    return "\n".join([f"| samples | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|", *rows])


def scores_rows(metrics: dict[str, dict[str, dict]]) -> list[dict]:
    """The same scores as table rows (a Prefect table artifact): method, row, then the headline numbers."""
    return [{"method": method, "row": row, **{k: m[k] for k in HEADLINE if k in m}}
            for method, rows in metrics.items() for row, m in rows.items()]


def read_scores(root: Path, methods: list[str]) -> tuple[dict, dict]:
    """({method: its metrics.json}, {method: its MLflow run reference}), at the paths dvc.yaml declares."""
    paths = {m: dvcrun.method_outputs(root, m) for m in methods}
    return ({m: json.loads(p["metrics"].read_text()) for m, p in paths.items()},
            {m: json.loads(p["run"].read_text()) for m, p in paths.items()})


def experiment_name() -> str:
    """The DVC experiment's name: the flow run's, unique with a piece of its id."""
    return f"{flow_run.name or 'run'}-{str(flow_run.id or '')[:8]}".strip("-")


@flow(name="udddm-experiment")
def experiment(overrides: dict[str, Any] | None = None, metric: str = DEFAULT_METRIC, registry: bool = True,
               alias: str = "champion", stage_timeout_s: float = 24 * 3600, stage_retries: int = 2,
               repo: str | None = None, remote: str | None = None) -> dict | State:
    """Run the DVC pipeline with `overrides` ({"method.udddm.process": "vp", "sample.num_samples": 512}), one
    task per stage; register the EMA model of the method `metric` names as `<method>-<data.source>` and move
    `alias` to it if `metric` (`<method>/nfe<k>/<name>`, e.g. udddm/nfe1/fid_classifier, lower is better;
    edm/nfe35/recall, higher) improves. The outputs are pushed to the DVC remote `remote` (default: DVC's
    default remote, if one is set); with a default remote, a stage that is up to date but whose outputs this
    workspace lacks (a fresh clone) pulls them from it instead of running."""
    root = Path(repo).resolve() if repo else REPO
    lower_is_better(metric)  # an unknown metric fails before any work
    method = split_metric(metric)[0]
    name = experiment_name()
    with workspace_lock(root):
        overrides = registration(root, overrides, registry)
        try:
            params = planned_params(root, overrides)
            if method not in dvcrun.compared_methods(params):
                raise StepFailed(f"metric {metric!r}: method {method!r} is not in params.yaml's methods or "
                                 f"finetune.methods {dvcrun.compared_methods(params)}")
            dvcrun.refuse_if_busy(root)  # before the snapshot: restoring it would undo the other operation's writes
            pull = dvcrun.remotes(root)[1] is not None
            with rollback_on_failure(root, params):
                apply_params(str(root), overrides)
                for stage in dvcrun.stages(root):
                    raise_if_failed(run_stage.with_options(retries=stage_retries)(stage, str(root), stage_timeout_s,
                                                                                  pull, return_state=True))
                metrics, references = read_scores(root, dvcrun.compared_methods(params))
                if registry and (problem := metric_problem(metric, metrics)):
                    raise StepFailed(problem)
        except (StepFailed, dvcrun.RepositoryBusy) as e:
            return failed(str(e))
        saved = save_experiment(str(root), name)
        tracking_uri, run_id = resolve_uri(references[method]["tracking_uri"], root), references[method]["run_id"]
        away = tracking_away(tracking_uri)
        if away is None:
            link_runs(references, root, saved or name)
        pushed = push_outputs(str(root), remote, saved)  # after the rollback scope: a failed push keeps the outputs
    registered = None
    if registry and away is None:
        registered = register_model(tracking_uri, run_id, model_name(method, params["data"]["source"]), metric,
                                    alias, metrics)
    url = run_url(tracking_uri, run_id) if away is None else None
    overridden = " ".join(dvcrun.set_params(overrides)) or "none"
    lines = [f"## Experiment `{saved or name}`", "",
             f"Overrides: `{overridden}`; dataset `{params['data']['source']}`, methods "
             f"`{', '.join(dvcrun.compared_methods(params))}`.", "",
             scores_table(metrics), "",
             f"MLflow run of {method}: {run_link(tracking_uri, run_id) if away is None else f'`{run_id}` ({away})'}"]
    if registered:
        outcome = "moved to it" if registered["moved"] else f"stays on version {registered['previous_version']}"
        lines += ["", f"Registry: `{registered['name']}` version {registered['version']}, {metric} = "
                      f"{registered['score']:.4g} ({registered['better']} is better); alias `{alias}` {outcome}."]
    create_markdown_artifact("\n".join(lines), key="udddm-scores", description="scores of one uDDDM experiment")
    create_table_artifact(scores_rows(metrics), key="udddm-scores-table", description="every method's scores")
    if url:
        create_link_artifact(url, link_text=f"MLflow run of {method}", key="udddm-mlflow-run",
                             description="the training run, its samples and scores in the MLflow UI")
    return {"experiment": saved, "pushed_to": pushed, "overrides": overrides or {}, "dataset": params["data"]["source"], "metrics": metrics,
            "run_id": run_id, "tracking_uri": tracking_uri, "registry": registered,
            "runs": {m: {"run_id": r["run_id"], "tracking_uri": resolve_uri(r["tracking_uri"], root)}
                     for m, r in references.items()}}


if __name__ == "__main__":
    print(json.dumps(experiment(), indent=2, default=str))
