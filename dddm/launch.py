"""Single-node launcher with every listener on loopback: `python -m dddm.launch --nproc N -m MODULE [ARGS]`.

It does for one node what `torchrun --standalone` does, because torchrun cannot be kept off the
network: its TCPStore binds all interfaces whatever address it is given (`ss -ltnp` shows
`*:<port>` for --standalone, static and c10d rendezvous alike; torch 2.14). This launcher binds
127.0.0.1 on a free port itself and hands that socket to rank 0's store (TCPStore
master_listen_fd, see dddm.distributed); gloo and NCCL are pinned to the loopback interface unless
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set.

Workers get the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), stay in the launcher's process group (a kill of the group reaches them) and are
SIGKILLed by the kernel when the launcher itself dies. When one worker fails the others are
stopped, and the launcher exits with the first failure's status. SIGINT / SIGTERM are passed on.
For several nodes use torchrun (README, "Multi-GPU and multi-node").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from .distributed import STORE_FD, kill_with_parent


def _worker_env(rank: int, nproc: int, port: int, store_fd: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DDDM_LAUNCH="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    env.pop(STORE_FD, None)
    if store_fd is not None:
        env[STORE_FD] = str(store_fd)
    return env


def _start(cmd: list[str], env: dict[str, str], pass_fds: tuple[int, ...]) -> subprocess.Popen:
    launcher = os.getpid()

    def in_child() -> None:  # between fork and exec: die with the launcher, also if it is already gone
        kill_with_parent()
        if os.getppid() != launcher:
            os._exit(1)

    return subprocess.Popen(cmd, env=env, pass_fds=pass_fds, preexec_fn=in_child)


def launch(nproc: int, cmd: list[str]) -> int:
    """Run `cmd` as `nproc` ranks; the exit status of the first that fails, else 0."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port, fd = listener.getsockname()[1], listener.fileno()
    workers = [_start(cmd, _worker_env(rank, nproc, port, fd if rank == 0 else None), (fd,) if rank == 0 else ())
               for rank in range(nproc)]
    listener.close()  # rank 0 holds it now

    def pass_on(signum, _frame):
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    signal.signal(signal.SIGINT, pass_on)
    signal.signal(signal.SIGTERM, pass_on)
    status = 0
    while True:
        codes = [w.poll() for w in workers]
        if all(c is not None for c in codes):
            return status or next((c for c in codes if c), 0)
        failed = next((rank for rank, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None and not status:
            status = codes[failed]
            print(f"dddm.launch: rank {failed} (pid {workers[failed].pid}) exited with {status}; stopping the "
                  f"others", file=sys.stderr)
            pass_on(signal.SIGTERM, None)
            deadline = time.time() + 30
            while any(w.poll() is None for w in workers) and time.time() < deadline:
                time.sleep(0.1)
            pass_on(signal.SIGKILL, None)
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dddm.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, required=True, help="processes (ranks) on this node")
    parser.add_argument("-m", dest="module", required=True, help="the module each rank runs (python -m MODULE)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to the module")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc: must be >= 1, got {args.nproc}")
    status = launch(args.nproc, [sys.executable, "-u", "-m", args.module, *args.args])
    sys.exit(status if status >= 0 else 128 - status)


if __name__ == "__main__":
    main()
