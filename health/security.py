"""Transport security shared by healthd and the controller: the job token, TLS / mutual TLS, binding.

The trust model: reads (status, state) are open to whoever can reach the socket, so the servers
bind to loopback unless told the cluster interface; every mutation (kill, exclude, rollback)
carries the job token, compared in constant time. A heartbeat, which can get a silent rank
declared hung and killed, carries the job's heartbeat key (:func:`heartbeat_key`). TLS is optional and, when a CA is
given to a server, mutual: clients must then present a certificate signed by that CA.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from stalwart.errors import UserError
from stalwart.jobenv import TOKEN_FILE_ENV

log = logging.getLogger(__name__)

# A client that lost its server retries this often at most, so it is back within seconds of the
# server's return (gRPC's default backoff grows to two minutes).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_ALL_INTERFACES = ("0.0.0.0", "[::]", "::", "")


class TokenError(UserError):
    """The job token cannot be used; the message names the fix."""


def read_token(path: str | os.PathLike | None) -> str:
    """The job token from ``path`` (or ``$STALWART_TOKEN_FILE``), stripped; warns when others can read it."""
    path = path or os.environ.get(TOKEN_FILE_ENV)
    if not path:
        raise TokenError(
            f"no job token: pass --token-file FILE or set {TOKEN_FILE_ENV} (create one with `openssl rand -hex 32 > "
            "FILE; chmod 600 FILE`)"
        )
    path = Path(path)
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise TokenError(f"cannot read --token-file {path}: {e}") from e
    if not token:
        raise TokenError(f"{path} is empty; write a random secret into it (e.g. `openssl rand -hex 32 > {path}`)")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    return token


def heartbeat_key(token: str) -> str:
    """The job's heartbeat key: what a rank presents to prove it belongs to this node's job.

    Derived from the job token (HMAC), so that a heartbeat, which any rank sends twice a second,
    never carries the token that authorises kills and exclusions itself.
    """
    return hmac.new(token.encode(), b"stalwart heartbeat v1", "sha256").hexdigest()


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing does not leak the token."""
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class TlsConfig:
    """PEM files. Server side: its ``cert``/``key``; ``ca`` makes TLS mutual (client certs required).
    Client side: ``ca`` verifies the server; ``cert``/``key`` are the client's certificate for mTLS."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @classmethod
    def from_paths(cls, cert: str | None, key: str | None, ca: str | None, *, server: bool) -> TlsConfig | None:
        """None when no file is given (plain text); raises ValueError naming the missing half."""
        if not (cert or key or ca):
            return None
        if bool(cert) != bool(key):
            raise ValueError("TLS needs both a certificate and its private key (--tls-cert and --tls-key)")
        if server and not cert:
            raise ValueError("a TLS server needs --tls-cert and --tls-key (--tls-ca alone only verifies clients)")
        for p in (cert, key, ca):
            if p and not Path(p).is_file():
                raise ValueError(f"TLS file {p} does not exist")
        return cls(Path(cert) if cert else None, Path(key) if key else None, Path(ca) if ca else None)

    @property
    def mutual(self) -> bool:
        return self.ca is not None and self.cert is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        assert self.cert and self.key
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes() if self.ca else None,
            require_client_auth=self.ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )

    def server_ssl_context(self) -> ssl.SSLContext:
        """The same policy for the HTTP server (dashboard, /metrics, /api/state)."""
        assert self.cert and self.key
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca:
            ctx.load_verify_locations(cafile=self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


class _MalformedRequestsInOneLine(logging.Filter):
    """grpc logs a request it cannot parse with the parser's whole traceback; a bad client deserves one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and type(error).__name__ == "DecodeError":
            record.msg, record.args, record.exc_info, record.exc_text = (
                "refused a malformed request (%s); the client sent bytes that are not this API's messages",
                (str(error).splitlines()[0][:200],),
                None,
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_MALFORMED = _MalformedRequestsInOneLine()


def quiet_malformed_requests() -> None:
    """One log line, not a library traceback, per request grpc cannot parse (healthd and the controller)."""
    for name in ("grpc._common", "grpc._server"):
        logger = logging.getLogger(name)
        if _MALFORMED not in logger.filters:
            logger.addFilter(_MALFORMED)


def add_port(server: grpc.Server, bind: str, tls: TlsConfig | None, what: str) -> str:
    """Bind ``server`` to ``bind`` (``host:port``, port 0 picks one); returns the bound address."""
    quiet_malformed_requests()
    if bind.rsplit(":", 1)[0] in _ALL_INTERFACES and tls is None:
        log.warning(
            "%s listens on every interface (%s) without TLS: state is readable by anyone who can reach it; mutations "
            "still need the job token",
            what,
            bind,
        )
    try:
        port = server.add_secure_port(bind, tls.server_credentials()) if tls else server.add_insecure_port(bind)
    except RuntimeError:  # grpc reports bind failures (address in use, bad host) this way
        port = 0
    if port == 0:
        raise OSError(f"{what} could not bind {bind!r} (in use or not a local address); pick a free port or port 0")
    return f"{bind.rsplit(':', 1)[0]}:{port}"


def open_channel(address: str, tls: TlsConfig | None = None, max_message_bytes: int = 4 << 20) -> grpc.Channel:
    """A channel that reconnects quickly after its server comes back."""
    options = [
        *RECONNECT_OPTIONS,
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls is not None:
        return grpc.secure_channel(address, tls.channel_credentials(), options=options)
    return grpc.insecure_channel(address, options=options)
