"""The rendezvous handler: torch's dynamic rendezvous on a c10d TCP store (default) or on etcd's v2 API.

Where the store lives decides which node the job cannot lose. Three forms:

- ``c10d`` with ``stalwart store`` serving the endpoint on a head node (the deploy default): no
  training node holds the store, and every launcher is a client of it;
- ``etcd-v2`` (``etcd`` is the same): ``--rdzv-endpoint HOST:PORT[,HOST:PORT...]`` lists etcd
  members, the client fails over between them, and a member may be lost while the quorum stands;
- ``c10d`` with nobody serving the endpoint: the launcher on that host serves it itself (torchrun's
  way). That node is then the one node the job cannot lose.

The launcher creates the stores itself, instead of torch's built-in helpers, so that an
unreachable endpoint fails within ``--rdzv-connect-timeout`` seconds with one line (not after the
read timeout and the 600 s join timeout), so that "does this node host the store" also
recognises one of this machine's interface addresses without a DNS name (torch only compares host
names), so that a TCP client reconnects to a store that came back, and so that the etcd client
knows every member. The job store's URL (:class:`~stalwart.parallel.job_store.StoreAddress`) goes
to the ranks in ``$STALWART_JOB_STORE``.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import psutil

from stalwart.errors import UserError

if TYPE_CHECKING:
    from torch.distributed import Store
    from torch.distributed.elastic.rendezvous import RendezvousHandler

    from stalwart.parallel.job_store import StoreAddress

DEFAULT_PORT = 29400
ETCD_BACKENDS = ("etcd", "etcd-v2")  # both: torch's dynamic rendezvous on etcd's v2 API


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

    On the endpoint's machine the first launcher hosts the store unless something (``stalwart
    store``, an earlier launcher) already serves it there; everyone else connects to it. A client
    reconnects when the store comes back after an outage.
    """
    from torch.distributed import TCPStore

    from stalwart.parallel.job_store import ReconnectingStore

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
    return ReconnectingStore(host, port, read_timeout_s, client=store), False


@dataclass(frozen=True)
class Rendezvous:
    """The agent's handler and what the launcher needs to know about the store behind it."""

    handler: RendezvousHandler
    hosting: bool  # this launcher serves the c10d store: the one node the job cannot lose
    store: StoreAddress  # the job store, for the ranks ($STALWART_JOB_STORE)
    keep_alive_expiry_s: float  # a node silent this long is dropped from torch's rendezvous state
    # Put back what the backend needs in a store that restarted empty: torch's c10d backend seeds its
    # state key once, at construction, and then blocks for the read timeout on every sync without it.
    reseed: Callable[[], None] = lambda: None

    @property
    def store_host(self) -> str | None:
        """The TCP store's host (the controller's default host), None for etcd."""
        return self.store.endpoints[0][0] if self.store.kind == "tcp" else None


def etcd_endpoints(endpoint: str) -> tuple[tuple[str, int], ...]:
    from stalwart.parallel.job_store import ETCD_PORT, StoreAddressError, split_host_port

    try:
        endpoints = tuple(split_host_port(e, ETCD_PORT) for e in endpoint.split(",") if e.strip())
    except StoreAddressError as e:
        raise RendezvousUnreachable(f"--rdzv-endpoint: {e} (etcd: HOST:PORT[,HOST:PORT...])") from None
    if not endpoints:
        raise RendezvousUnreachable("--rdzv-endpoint is empty; list the etcd members as HOST:PORT[,HOST:PORT...]")
    return endpoints


def build_handler(opts: RendezvousOptions) -> Rendezvous:
    """The handler for the agent on the store ``opts`` names (module docstring)."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from stalwart.parallel.job_store import StoreAddress, etcd_client, etcd_store

    params = RendezvousParameters(
        backend=opts.backend,
        endpoint=opts.endpoint,
        run_id=opts.run_id,
        min_nodes=opts.min_nodes,
        max_nodes=opts.max_nodes,
        local_addr=opts.local_addr,
        **opts.conf,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    read_timeout_s = params.get_as_int("read_timeout", 60)
    expiry_s = float(params.get_as_int("keep_alive_interval", 5) * params.get_as_int("keep_alive_max_attempt", 3))
    prefix = f"stalwart/{opts.run_id}"
    if opts.backend in ETCD_BACKENDS:
        from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend

        endpoints = etcd_endpoints(opts.endpoint)
        client = etcd_client(endpoints, read_timeout_s, opts.connect_timeout_s)
        backend = EtcdRendezvousBackend(client, opts.run_id, key_prefix="/torch/elastic/rendezvous")
        handler = create_handler(etcd_store(client, "/torch/elastic/store"), backend, params)
        return Rendezvous(handler, False, StoreAddress("etcd", endpoints, prefix), expiry_s)
    if opts.backend != "c10d":
        raise RendezvousUnreachable(f"--rdzv-backend {opts.backend!r}: choose c10d or etcd-v2")
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    host, port = split_endpoint(opts.endpoint)
    store, hosting = connect_store(host, port, opts.connect_timeout_s, read_timeout_s)
    handler = create_handler(store, C10dRendezvousBackend(store, opts.run_id), params)

    def reseed() -> None:
        C10dRendezvousBackend(store, opts.run_id)  # its constructor seeds the state key when absent

    return Rendezvous(handler, hosting, StoreAddress("tcp", ((host, port),), prefix), expiry_s, reseed)
