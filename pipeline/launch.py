"""The train stage's launcher: torchrun's agent in this process, its options read from params.yaml.

    python -m pipeline.launch pipeline.train --method udddm --prepared data/prepared.arrow --out out/train

dvc.yaml runs it on the node that runs `dvc repro`. One process on one node (train.nproc 1, train.nnodes 1)
needs no agent: the worker module runs in this process. With `train.nnodes` > 1 every other node runs
`python -m pipeline.follow`, which runs this command for each train stage node 0 runs (README, "Running on a
cluster"); their agents meet at `rendezvous.endpoint`
(torchrun's c10d backend). With one node it is torchrun's loopback rendezvous (dddm/rendezvous.py).

No param reaches a shell: the validated values go to torchrun as a list of arguments. Run by DVC, the
launcher stops with DVC (dddm/lifeline.py: DVC exits on SIGTERM without stopping its command), and
torchrun's agent stops its workers when it is stopped.
"""

from dddm.lifeline import continue_stopped_workers, stop_with_stage

stop_with_stage()  # before the imports below (torch: seconds), so a stage stopped meanwhile leaves nothing

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from .common import METHOD_HELP  # noqa: E402
from .stage import PARAMS, dvc_stage_method  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", help="the worker module every process runs (pipeline.train)")
    method = dvc_stage_method()
    ap.add_argument("--method", default=method, required=method is None,
                    help=f"{METHOD_HELP}; run by DVC: the method of DVC_STAGE")
    args, args.worker_args = ap.parse_known_args()  # the rest are the worker's own arguments
    if not re.fullmatch(r"pipeline\.\w+", args.module):
        ap.error(f"module {args.module!r} is not a pipeline stage module (pipeline.train)")
    from dddm.config import ConfigError, load_config  # torch, through the methods' registry
    from dddm.compute import threads_per_process, use_threads
    from dddm.distributed import all_nodes_here, processes_per_machine, torchrun_args

    try:
        cfg = load_config(PARAMS)
        cfg.method_config(args.method)
    except (ConfigError, ValueError) as e:
        sys.exit(f"train: invalid parameters\n{e}")
    params_read = Path(PARAMS).read_bytes()  # compared at the end: what DVC records must be what trained
    tc, rdzv = cfg.train, cfg.rendezvous
    # every worker's thread count, through OMP_NUM_THREADS (torchrun would set 1 only with several processes
    # per node, so 2 nodes x 1 and 1 x 2 summed in other orders): the same for every split of the machine
    use_threads(threads_per_process(tc.threads, processes_per_machine(tc, rdzv.endpoint)))
    if tc.nproc == 1 and tc.nnodes == 1:
        # a world of one needs no agent: the worker runs here (a second interpreter importing torch and
        # torchrun's rendezvous cost about 3 s of a stage), as plain `python -m pipeline.train` would
        sys.argv = [args.module, "--method", args.method, *args.worker_args]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        refuse_if_changed(Path(PARAMS), params_read)
        return
    # the method in the id: each method's stage is its own rendezvous, so a node that starts the next
    # method's launcher early never joins the previous one's closing round
    options = torchrun_args(tc.nproc, tc.nnodes, rdzv.endpoint, f"{rdzv.id}-{args.method}", rdzv.timeout)
    # torch's rendezvous registry first: it loads dddm.rendezvous (the loopback plug-in) by its entry point
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    if tc.nnodes > 1:
        from dddm.rendezvous import EndpointError, check_endpoint

        try:
            check_endpoint(rdzv.endpoint, rdzv.timeout)
        except EndpointError as e:
            sys.exit(f"train: {e}")
    if all_nodes_here(tc, rdzv.endpoint):  # the workers' collectives stay on loopback too
        from dddm.rendezvous import loopback_interface

        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback_interface())

    continue_stopped_workers()  # so that a stopped one takes torchrun's SIGTERM when the others fail
    try:
        run(parse_args([*options, "-m", args.module, "--method", args.method, *args.worker_args]))
    except ChildFailedError as e:  # each worker has said why on stderr: torchrun's report adds no cause
        rank, failure = e.get_first_failure()
        sys.exit(f"train: stopped: rank {rank} (pid {failure.pid}) failed first, "
                 + (f"by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"))
    except RendezvousError as e:
        sys.exit(f"train: the rendezvous at {rdzv.endpoint} (rendezvous.endpoint) failed: "
                 f"{type(e).__name__}: {e}\nNode 0 runs `dvc repro` and each other of the train.nnodes={tc.nnodes} "
                 f"nodes `python -m pipeline.follow` (which runs this launcher for every train stage node 0 runs), "
                 f"with the same params.yaml, within rendezvous.timeout={rdzv.timeout} s of each other, reaching "
                 f"{rdzv.endpoint}")
    refuse_if_changed(Path(PARAMS), params_read)


def refuse_if_changed(params: Path, read: bytes) -> None:
    """Fail the stage when params.yaml changed while it trained. DVC releases its lock while a command runs, so
    a plain `dvc exp run -S train.lr=...` typed meanwhile rewrites params.yaml before it finds the repository
    busy (issue 32); DVC would then record the new values in dvc.lock for a model trained with the old ones.
    A failed stage is not recorded, and the next `dvc repro` resumes it from its checkpoints."""
    if params.read_bytes() != read:
        sys.exit(f"train: {params} changed while this stage trained (a `dvc exp run -S` during `dvc repro` "
                 f"rewrites it); the model was trained with it as it was, so the stage fails rather than let DVC "
                 f"record the new values in dvc.lock. Put {params} back (`git checkout {params}`) or keep the "
                 f"change, and run `dvc repro` again")


if __name__ == "__main__":
    main()
