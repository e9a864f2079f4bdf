"""Every node but node 0 of a multi-node run (train.nnodes > 1): the train stages node 0's `dvc repro` runs,
joined one after the other, with the commands dvc.yaml gives them.

    python -m pipeline.follow        # in the same checkout as node 0 (shared storage), any time after it starts

DVC's own plan gives the stages and their order (the one `dvc repro` follows); a stage runs here when DVC
would run it on node 0: its code, params, data or outputs changed. Before each, it waits (at most
rendezvous.timeout seconds) until the stages it depends on other than train stages (check, prepare,
classifier) are up to date, that is until node 0 is past them. Then it runs the stage's command (no shell),
whose torchrun agent meets node 0's at rendezvous.endpoint.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time

from .stage import PARAMS

POLL_S = 2.0
READ_ATTEMPTS = 5


def is_launch(stage) -> bool:
    return (stage.cmd or "").startswith("python -m pipeline.launch ")


def changed(stage) -> bool:
    """DVC's test of whether `dvc repro` runs the stage (its definition, deps and outputs against dvc.lock),
    read without the repository's lock, which node 0's `dvc repro` holds (Stage.changed asserts it)."""
    return stage.changed_stage() or any(d.status() for d in stage.deps) or any(o.status() for o in stage.outs)


def main() -> None:
    argparse.ArgumentParser(prog="python -m pipeline.follow", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    from dddm.config import ConfigError, load_config

    try:
        cfg = load_config(PARAMS)
    except ConfigError as e:
        sys.exit(f"follow: invalid parameters\n{e}")
    if cfg.train.nnodes == 1:
        sys.exit("follow: train.nnodes is 1: node 0's `dvc repro` trains alone, there is nothing to follow")
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    def planned():
        """The stages of `dvc repro`'s plan, by name, and its graph: read anew each time, since node 0 updates
        dvc.lock after each stage (a stage object compares with the lock as it was read). DVC rewrites dvc.lock
        in place, so a read may meet half a file: read again."""
        for attempt in range(READ_ATTEMPTS):
            try:
                repo = Repo()
                graph = get_active_graph(repo.index.graph)
                return repo, graph, {s.addressing: s for s in plan_repro(graph, collect_stages(repo, ["dvc.yaml"]))}
            except DvcException:
                if attempt == READ_ATTEMPTS - 1:
                    raise
                time.sleep(POLL_S)

    repo, _, stages = planned()
    plan = [name for name, s in stages.items() if is_launch(s) and not s.frozen]
    joined = 0
    for name in plan:
        deadline = time.monotonic() + cfg.rendezvous.timeout
        while True:
            repo, graph, stages = planned()
            # DVC's graph points from a stage to the stages it depends on
            waiting = [s.addressing for s in nx.descendants(graph, stages[name]) if not is_launch(s) and changed(s)]
            if not waiting:
                break
            if time.monotonic() > deadline:
                sys.exit(f"follow: {name}: after rendezvous.timeout={cfg.rendezvous.timeout} s, "
                         f"{', '.join(waiting)} still to run: is node 0's `dvc repro` running?")
            time.sleep(POLL_S)
        stage = stages[name]
        if not changed(stage):
            print(f"follow: {name}: up to date, node 0 skips it", flush=True)
            continue
        print(f"follow: {name}: joining node 0: {stage.cmd}", flush=True)
        # DVC_STAGE as DVC sets it: the launcher reads its method there (dvc.yaml's commands do not name it)
        done = subprocess.run([sys.executable, *shlex.split(stage.cmd)[1:]], cwd=repo.root_dir,
                              env=os.environ | {"DVC_STAGE": name})
        if done.returncode != 0:
            sys.exit(f"follow: {name} failed (exit code {done.returncode}); node 0's `dvc repro` stops there too: "
                     "rerun both")
        joined += 1
    print(f"follow: done, {joined} of {len(plan)} train stages run here", flush=True)


if __name__ == "__main__":
    main()
