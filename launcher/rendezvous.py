"""The rendezvous handler: torch's c10d dynamic rendezvous (default) or any registered backend (etcd).

For c10d the launcher creates the TCP store itself, instead of torch's built-in helper, for two
reasons. An unreachable endpoint must fail within ``--rdzv-connect-timeout`` seconds with one line,
not after the store's read timeout and the 600 s join timeout. And "does this node host the store"
must also recognise an endpoint that is one of this machine's interface addresses without a DNS
name (secondary NICs, containers, network namespaces); torch only compares host names. The store
host is the one node the c10d backend cannot lose; use ``--rdzv-backend etcd`` where it must be.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import psutil

from stalwart.errors import UserError

if TYPE_CHECKING:
    from torch.distributed import Store
    from torch.distributed.elastic.rendezvous import RendezvousHandler

DEFAULT_PORT = 29400


class RendezvousUnreachable(UserError):
    """The rendezvous endpoint cannot be used; the message names the fix."""


@dataclass(frozen=True)
class RendezvousOptions:
    backend: str
    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    local_addr: str | None = None
    conf: dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float = 60.0


def split_endpoint(endpoint: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[V6]:PORT``; raises RendezvousUnreachable for a malformed one."""
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        return parse_rendezvous_endpoint(endpoint, default_port)
    except ValueError as e:
        raise RendezvousUnreachable(
            f"--rdzv-endpoint {endpoint!r}: {e}; write HOST:PORT (e.g. node0:{DEFAULT_PORT})"
        ) from None


def is_local_address(host: str) -> bool:
    """True when ``host`` names this machine: loopback, its host name, or one of its interface addresses."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    local = {
        a.address.split("%")[0]
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except socket.gaierror:
        return False
    return bool(resolved & local)


def _wait_for_listener(host: str, port: int, timeout_s: float) -> float:
    """Retry name resolution and a TCP connect for ``timeout_s`` (the store host may start later); the time left."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 2.0), 0.1)).close()
            return max(deadline - time.monotonic(), 1.0)
        except socket.gaierror as e:
            error = f"rendezvous host {host!r} does not resolve ({e.strerror}); check --rdzv-endpoint"
        except OSError as e:
            error = (
                f"cannot reach the rendezvous store at {host}:{port} within {timeout_s:g}s "
                f"({e.strerror or type(e).__name__}); "
                f"start the launcher on {host} first, check --rdzv-endpoint and firewalls, or raise "
                "--rdzv-connect-timeout"
            )
        if time.monotonic() >= deadline:
            raise RendezvousUnreachable(error)
        time.sleep(0.5)


def connect_store(host: str, port: int, connect_timeout_s: float, read_timeout_s: float) -> tuple[Store, bool]:
    """The rendezvous TCP store and whether this process hosts it.

    On the endpoint's machine the first launcher hosts the store and later ones (tests, or several
    launchers per machine) connect to it.
    """
    from torch.distributed import TCPStore

    if is_local_address(host):
        try:
            return TCPStore(
                host, port, is_master=True, multi_tenant=True, timeout=timedelta(seconds=read_timeout_s)
            ), True
        except RuntimeError:
            pass  # the port is taken: another launcher on this machine hosts the store
    left_s = _wait_for_listener(host, port, connect_timeout_s)
    try:
        store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=left_s))
    except RuntimeError as e:  # DistNetworkError / DistStoreError: something listens, but not a store
        raise RendezvousUnreachable(
            f"{host}:{port} answers but is not a rendezvous store ({type(e).__name__}); check --rdzv-endpoint"
        ) from None
    store.set_timeout(timedelta(seconds=read_timeout_s))
    return store, False


def build_handler(opts: RendezvousOptions) -> tuple[RendezvousHandler, bool]:
    """The handler for the agent, and whether this launcher hosts the c10d store."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    params = RendezvousParameters(
        backend=opts.backend,
        endpoint=opts.endpoint,
        run_id=opts.run_id,
        min_nodes=opts.min_nodes,
        max_nodes=opts.max_nodes,
        local_addr=opts.local_addr,
        **opts.conf,
    )
    if opts.backend != "c10d":
        from torch.distributed.elastic.rendezvous import registry

        return registry.get_rendezvous_handler(params), False
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    host, port = split_endpoint(opts.endpoint)
    store, hosting = connect_store(host, port, opts.connect_timeout_s, params.get_as_int("read_timeout", 60))
    return create_handler(store, C10dRendezvousBackend(store, opts.run_id), params), hosting
