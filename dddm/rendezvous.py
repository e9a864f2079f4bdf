"""`torchrun --rdzv-backend=loopback`: a one-machine rendezvous whose every listener binds 127.0.0.1.

`torchrun --standalone` hosts its stores on all interfaces (torch's TCPStore server binds the wildcard
address whatever host it is given), so a single-machine run would accept connections from the network.
This backend binds the store's socket to loopback itself and hands it to TCPStore (`master_listen_fd`),
and points the workers' gloo/NCCL sockets at the loopback interface. torchrun finds it through the
`torchrun.handlers` entry point in pyproject.toml. Several machines use torchrun's c10d backend instead;
`check_endpoint` tests its endpoint first.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading

import psutil
from torch.distributed import PrefixStore, TCPStore
from torch.distributed.elastic.rendezvous import (RendezvousHandler, RendezvousInfo, RendezvousParameters,
                                                  RendezvousStoreInfo)

from .distributed import LOOPBACK


class EndpointError(RuntimeError):
    """Nothing at `rendezvous.endpoint` answers as a torchrun rendezvous store."""


def check_endpoint(endpoint: str, timeout_s: int) -> None:
    """Raise EndpointError unless `endpoint` (host:port) is free on this machine (this node's agent will host the
    store there) or a rendezvous store answers there within `timeout_s`. torch's store client waits without a
    limit for a server that accepts its connection but never answers its handshake: another program holding the
    port hung torchrun 651 s with a 30 s timeout."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store's server does: TIME_WAIT is free
        try:
            s.bind((host, int(port)))
            return
        except OSError:
            pass  # held here, or another machine's address: the agent will connect to it
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - reported below, naming the endpoint
            outcome.append(e)

    # a daemon thread: the client's handshake releases the GIL, and a process may exit with it still waiting
    attempt = threading.Thread(target=connect, daemon=True, name="rendezvous-check")
    attempt.start()
    attempt.join(timeout_s + 2)
    if not outcome:
        raise EndpointError(f"rendezvous.endpoint {endpoint}: something accepts connections there but does not answer "
                            f"as a torchrun rendezvous within rendezvous.timeout={timeout_s} s (another program "
                            f"holds the port?); choose a free port")
    if outcome[0] is not None:
        reason = str(outcome[0]).splitlines()[0] if str(outcome[0]) else type(outcome[0]).__name__
        raise EndpointError(f"rendezvous.endpoint {endpoint}: no rendezvous answered within rendezvous.timeout="
                            f"{timeout_s} s ({reason}); node 0 (the one running `dvc repro`) hosts it")


def loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 (`lo` on Linux, `lo0` on macOS)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    raise RuntimeError(f"no network interface holds {LOOPBACK}")


class LoopbackRendezvous(RendezvousHandler):
    """All workers on this machine; the agent hosts the one store, and the workers share it."""

    def __init__(self, run_id: str, timeout: datetime.timedelta):
        self.run_id = run_id
        self.timeout = timeout
        self._store: TCPStore | None = None
        self._listener: socket.socket | None = None
        self._port = 0

    def get_backend(self) -> str:
        return "loopback"

    @property
    def use_agent_store(self) -> bool:
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.bind((LOOPBACK, 0))
            self._listener.listen(128)
            self._port = self._listener.getsockname()[1]
            self._store = TCPStore(LOOPBACK, self._port, 1, True, self.timeout, multi_tenant=True,
                                   master_listen_fd=self._listener.fileno())
            # The workers inherit the agent's environment: their collective sockets go on loopback too.
            interface = loopback_interface()
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
        return RendezvousInfo(PrefixStore(self.run_id, self._store), 0, 1, RendezvousStoreInfo(LOOPBACK, self._port))

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        if self._listener is not None:
            self._listener.close()
        return True


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    if params.max_nodes != 1:
        raise ValueError(f"--rdzv-backend=loopback runs on one machine: got --nnodes={params.max_nodes}; "
                         "use --rdzv-backend=c10d for several")
    return LoopbackRendezvous(params.run_id, datetime.timedelta(seconds=params.get_as_int("timeout", 600)))


def handler_factory():
    """The `torchrun.handlers` entry point: torchrun calls it to get the handler's constructor."""
    return create_handler

