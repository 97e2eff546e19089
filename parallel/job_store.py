"""The job's key-value store: where nodes rendezvous, agents watch each other and ranks re-form groups.

A store that no training node holds is what lets a job lose *any* node, the first one included.
Two forms are supported, both addressed by one URL that the launcher exports to its ranks as
``$STALWART_JOB_STORE`` (:data:`stalwart.jobenv.JOB_STORE_ENV`):

- ``tcp://HOST:PORT/PREFIX``: a c10d ``TCPStore`` served by ``stalwart store`` on a head node (or,
  the legacy form, by the launcher that binds ``--rdzv-endpoint``);
- ``etcd://HOST:PORT[,HOST:PORT...]/PREFIX``: etcd's v2 API through torch's ``EtcdStore`` (the
  ``python-etcd`` client; the server runs with ``--enable-v2``), failing over between members.

:func:`job_store` gives a rank (or the recovery code) a torch ``Store`` on that URL, under the
job's own key prefix, so that ``PrefixStore(f"q{n}", job_store())`` re-forms a process group on a
store that outlives every rank. A plain ``TCPStore`` client never reconnects once its server went
away (torch 2.13: every later call fails with ``Broken pipe``); :class:`ReconnectingStore` opens a
fresh client when that happens, so a head-node store that comes back is used again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

from torch.distributed import DistNetworkError, PrefixStore, Store, TCPStore

from stalwart.errors import UserError
from stalwart.jobenv import JOB_STORE_ENV

TCP_PORT = 29400
ETCD_PORT = 2379
_T = TypeVar("_T")
# A store written in Python must outlive every C++ wrapper around it: PrefixStore and process groups
# keep only the C++ half, and once the Python object is collected pybind finds no override and every
# call fails with "Not implemented" (torch 2.13). The stores opened here live as long as the process.
_OPENED: list[Store] = []


class StoreAddressError(UserError):
    """A store URL or endpoint that cannot be used; the message says how to write it."""


class StoreUnreachable(UserError):
    """No store answers at the address within the connect timeout; the message names it and the fix."""


def split_host_port(endpoint: str, default_port: int) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[V6]:PORT`` -> (host, port)."""
    endpoint = endpoint.strip()
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, sep, port = endpoint.rpartition(":")
        if not sep:
            host, port = endpoint, ""
    if not host:
        raise StoreAddressError(f"{endpoint!r} names no host; write HOST:PORT or tcp://HOST:PORT/PREFIX")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise StoreAddressError(f"{endpoint!r}: port {port!r} is not a number in 1-65535; write HOST:PORT")
    return host, int(port)


@dataclass(frozen=True)
class StoreAddress:
    """Where the job store lives: its kind, its endpoints (several etcd members) and the job's key prefix."""

    kind: str  # "tcp" or "etcd"
    endpoints: tuple[tuple[str, int], ...]
    prefix: str

    @classmethod
    def parse(cls, url: str) -> StoreAddress:
        """A store URL; a bare ``HOST:PORT`` is a TCP store (prefix ``stalwart``)."""
        if "://" not in url and url.strip():
            host, port = split_host_port(url, TCP_PORT)
            return cls("tcp", ((host, port),), "stalwart")
        parts = urlsplit(url)
        if parts.scheme not in ("tcp", "etcd") or not parts.netloc:
            raise StoreAddressError(
                f"job store {url!r}: write tcp://HOST:PORT/PREFIX or etcd://HOST:PORT[,HOST:PORT...]/PREFIX"
            )
        default = TCP_PORT if parts.scheme == "tcp" else ETCD_PORT
        endpoints = tuple(split_host_port(e, default) for e in parts.netloc.split(",") if e)
        if parts.scheme == "tcp" and len(endpoints) != 1:
            raise StoreAddressError(f"job store {url!r}: a tcp store has exactly one HOST:PORT")
        return cls(parts.scheme, endpoints, parts.path.strip("/") or "stalwart")

    @property
    def url(self) -> str:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)
        return f"{self.kind}://{hosts}/{self.prefix}"

    def describe(self) -> str:
        """How log lines name it: ``the store at head:29400`` / ``etcd at h1:2379,h2:2379``."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.endpoints)
        return f"the store at {hosts}" if self.kind == "tcp" else f"etcd at {hosts}"


# ---------------------------------------------------------------- TCP (head-node store)


def tcp_client(host: str, port: int, timeout_s: float) -> TCPStore:
    """A ``TCPStore`` client; raises ``DistNetworkError`` (a ``RuntimeError``) when nothing answers in time."""
    return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class ReconnectingStore(Store):
    """A ``TCPStore`` client that reconnects when its connection broke (the server restarted or came back).

    One retry per call, on a fresh client: if the server is still gone that call raises, and the
    next one tries again. Timeouts of ``get``/``wait`` (``DistStoreError``) are not connection
    errors and pass through unchanged.
    """

    def __init__(self, host: str, port: int, timeout_s: float, client: TCPStore | None = None) -> None:
        super().__init__()
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._client: TCPStore | None = client
        self._timeout: timedelta | None = None

    def _connect(self) -> TCPStore:
        client = tcp_client(self.host, self.port, min(self.timeout_s, 2.0))  # short: callers poll while it is down
        client.set_timeout(self._timeout or timedelta(seconds=self.timeout_s))
        return client

    def _call(self, op: Callable[[TCPStore], _T]) -> _T:
        if self._client is None:
            self._client = self._connect()
        try:
            return op(self._client)
        except DistNetworkError:
            self._client = None
        self._client = self._connect()  # the server may be back: one more try on a fresh connection
        return op(self._client)

    def set(self, key: str, value: Any) -> None:
        self._call(lambda s: s.set(key, value))

    def get(self, key: str) -> bytes:
        return self._call(lambda s: s.get(key))

    def add(self, key: str, value: int) -> int:
        return self._call(lambda s: s.add(key, value))

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        return self._call(lambda s: s.compare_set(key, expected, desired))

    def check(self, keys: list[str]) -> bool:
        return self._call(lambda s: s.check(keys))

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self._call(lambda s: s.wait(keys))
        else:
            self._call(lambda s: s.wait(keys, timeout))

    def delete_key(self, key: str) -> bool:
        return self._call(lambda s: s.delete_key(key))

    def num_keys(self) -> int:
        return self._call(lambda s: s.num_keys())

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout
        if self._client is not None:
            self._client.set_timeout(timeout)


def host_tcp_store(host: str, port: int) -> TCPStore:
    """Serve a store on ``host:port`` in this process (``stalwart store``, or the legacy hosting launcher)."""
    try:
        return TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False)
    except RuntimeError as e:
        raise StoreAddressError(
            f"cannot serve a store on {host}:{port} ({str(e).splitlines()[0]}); is another store or service "
            "bound there? pick another --bind"
        ) from None


# ---------------------------------------------------------------- etcd (v2 API)


def etcd_client(endpoints: tuple[tuple[str, int], ...], read_timeout_s: float, connect_timeout_s: float) -> Any:
    """A ``python-etcd`` client over every member given, failing over between them.

    Waits up to ``connect_timeout_s`` for a member to answer; raises :class:`StoreUnreachable`
    with one line otherwise. python-etcd fails over only to members left in its cache, and a
    complete outage empties it for good; here the call that finds no member refills it with every
    member given, so the next call tries them all again (the cluster may be back).
    """
    try:
        import etcd
    except ModuleNotFoundError:
        raise StoreAddressError(
            "the etcd store needs the python-etcd client: pip install 'stalwart[etcd]' (or python-etcd)"
        ) from None

    class Client(etcd.Client):  # type: ignore[misc,name-defined]
        def _next_server(self, cause: Exception | None = None) -> str:
            if not self._machines_cache:
                self._machines_cache = [u for u in _uris(endpoints) if u != self._base_uri]
                raise etcd.EtcdConnectionFailed("no etcd member answers", cause=cause)
            return super()._next_server(cause)

    where = ",".join(f"{h}:{p}" for h, p in endpoints)
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            return Client(
                host=tuple(endpoints), read_timeout=max(int(read_timeout_s), 1), allow_reconnect=True, protocol="http"
            )
        except etcd.EtcdException as e:
            if time.monotonic() >= deadline:
                raise StoreUnreachable(
                    f"no etcd member answers at {where} within {connect_timeout_s:g}s ({e}); start etcd with "
                    "--enable-v2 (the v2 API torch's etcd store uses), check --rdzv-endpoint, or raise "
                    "--rdzv-connect-timeout"
                ) from None
            time.sleep(0.5)


def _uris(endpoints: tuple[tuple[str, int], ...]) -> list[str]:
    return [f"http://{h}:{p}" for h, p in endpoints]


def etcd_store(client: Any, prefix: str) -> Store:
    """torch's store on etcd's v2 API, its keys under ``/PREFIX``."""
    from torch.distributed.elastic.rendezvous.etcd_store import EtcdStore

    return EtcdStore(client, "/" + prefix.strip("/"))


# ---------------------------------------------------------------- the job store


def open_store(address: StoreAddress, timeout_s: float = 60.0, connect_timeout_s: float = 30.0) -> Store:
    """A client of the store at ``address``, its keys under the job's prefix."""
    if address.kind == "etcd":
        store = etcd_store(etcd_client(address.endpoints, timeout_s, connect_timeout_s), address.prefix + "/job")
        _OPENED.append(store)
        return store
    ((host, port),) = address.endpoints
    store = ReconnectingStore(host, port, timeout_s)
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            store.check(["stalwart.job"])  # connects
            break
        except RuntimeError as e:
            if time.monotonic() >= deadline:
                raise StoreUnreachable(
                    f"the job store at {host}:{port} does not answer within {connect_timeout_s:g}s "
                    f"({str(e).splitlines()[0]}); is `stalwart store` (or the hosting launcher) running there?"
                ) from None
            time.sleep(0.5)
    _OPENED.append(store)
    return PrefixStore(address.prefix + "/job", store)


def job_store(timeout_s: float = 60.0, connect_timeout_s: float = 30.0) -> Store:
    """The store of the job this process belongs to, from ``$STALWART_JOB_STORE`` (set by ``stalwart launch``).

    Keys live under the job's prefix, apart from torch's rendezvous keys; build ``PrefixStore``s on it.
    """
    url = os.environ.get(JOB_STORE_ENV)
    if not url:
        raise StoreAddressError(f"${JOB_STORE_ENV} is not set: run this process under `stalwart launch`")
    return open_store(StoreAddress.parse(url), timeout_s, connect_timeout_s)
