"""Connecting to NATS: sane reconnect settings, logged callbacks, and a background link.

Example::

    nc = await connect(DEFAULT_NATS_URL, name="edge-1")                  # fails fast
    link = await connect_in_background(DEFAULT_NATS_URL, name="edge-1")  # never fails
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client

from mesh.errors import MeshUnavailableError

logger = logging.getLogger(__name__)

# Where a node looks for the mesh unless told otherwise: a local server on NATS's port
# (what ``tandem up`` starts, and a leaf node on a device listens on).
DEFAULT_NATS_PORT = 4222  # NATS's own default client port
DEFAULT_NATS_URL = f"nats://127.0.0.1:{DEFAULT_NATS_PORT}"

OnConnect = Callable[[Client], Awaitable[None] | None]

_JWT_CREDS_MARK = "BEGIN NATS USER JWT"


@dataclass(frozen=True)
class MeshCredentials:
    """How a node proves who it is to NATS, and which servers it trusts.

    ``creds``: the node's nkey seed file (``tandem mesh add-edge NAME`` writes
    ``creds/NAME.nk``), or a NATS ``.creds`` file (JWT and seed) from an operator's
    own tooling. The identity's name is the file's stem: it names the node's private
    inbox prefix (``mesh.security.inbox_prefix``), which its permissions allow.
    ``tls_ca``: verify the server's certificate against this CA (links are TLS then).
    """

    creds: Path | None = None
    tls_ca: Path | None = None

    def connect_options(self) -> dict[str, Any]:
        """nats-py ``connect`` options for these credentials."""
        from mesh.security import inbox_prefix

        options: dict[str, Any] = {}
        if self.creds is not None:
            try:
                text = self.creds.read_text()
            except OSError as exc:
                raise MeshUnavailableError(
                    f"cannot read NATS credentials {self.creds}: {exc}"
                ) from exc
            key = "user_credentials" if _JWT_CREDS_MARK in text else "nkeys_seed"
            options[key] = str(self.creds)
            options["inbox_prefix"] = inbox_prefix(self.creds.stem)
        if self.tls_ca is not None:
            options["tls"] = ssl.create_default_context(cafile=str(self.tls_ca))
        return options


_DEFAULT_OPTIONS: dict[str, Any] = {
    "allow_reconnect": True,
    "max_reconnect_attempts": -1,  # a node never gives up on the mesh
    "reconnect_time_wait": 0.5,
    "connect_timeout": 2,
    # A silently dead link (no TCP reset) is noticed after ping_interval * max_outstanding_pings.
    "ping_interval": 5,
    "max_outstanding_pings": 3,
}
# nats-py applies one attempt limit to the first connect and to reconnects, and with -1 its
# first connect() retries forever (even on bad credentials). So the first connect gets this
# limit (2 tries per server), and the configured one is installed once connected.
_FIRST_CONNECT_MAX_RECONNECTS = 1
# nats-py lower-cases the server's "-ERR 'Permissions Violation ...'" text.
_PERMISSIONS_VIOLATION = "permissions violation"


async def _log_error(exc: Exception) -> None:
    # nats-py has no exception type for a permission violation and reports it only here,
    # asynchronously, so the message text is all there is to recognise it by.
    if isinstance(exc, nats.errors.Error) and _PERMISSIONS_VIOLATION in str(exc).lower():
        logger.error("NATS refused an operation: %s", exc)
    elif isinstance(exc, OSError | TimeoutError):
        # Each failed (re)connect attempt lands here; the disconnect itself is logged once.
        logger.debug("NATS connect attempt failed: %r", exc)
    else:
        logger.warning("NATS error: %r", exc)


def _remember_cause(seen: list[Exception], exc: Exception) -> None:
    # nats-py's last_error ends as NoServersError; the cause (say, bad credentials) reaches
    # only error_cb. A server's refusal outranks the socket errors of the hang-up after it.
    if seen and isinstance(seen[0], nats.errors.Error) and not isinstance(exc, nats.errors.Error):
        return
    seen[:] = [exc]


def _callbacks(name: str, seen: list[Exception], nc: Client) -> dict[str, Any]:
    async def error(exc: Exception) -> None:
        _remember_cause(seen, exc)
        await _log_error(exc)

    async def disconnected() -> None:
        if nc.is_closed or nc.is_draining:  # our own close: nothing to warn about
            return
        logger.warning("%s: disconnected from NATS; reconnecting", name)

    async def reconnected() -> None:
        logger.info("%s: reconnected to NATS", name)

    async def closed() -> None:
        logger.info("%s: NATS connection closed", name)

    return {
        "error_cb": error,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "closed_cb": closed,
    }


async def _discard(nc: Client) -> None:
    # A client whose first connect failed may hold half-made transports and tasks.
    with contextlib.suppress(Exception):
        await nc.close()


async def connect(
    url: str | list[str],
    *,
    name: str,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    credentials: MeshCredentials | None = None,
    **overrides: Any,
) -> Client:
    """Connect to NATS (reconnecting forever afterwards); ``MeshUnavailableError`` if down."""
    servers = [url] if isinstance(url, str) else list(url)
    secrets = {"token": token, "user": user, "password": password}
    auth: dict[str, Any] = {key: value for key, value in secrets.items() if value is not None}
    if credentials is not None:
        auth.update(credentials.connect_options())
    if "inbox_prefix" not in auth:
        from mesh.security import inbox_prefix

        # An open mesh names inboxes after the node too (nats-py's default is random), so
        # a stream's inbox says whose it is everywhere: workers honour cancels by it.
        auth["inbox_prefix"] = inbox_prefix(name)
    seen: list[Exception] = []
    nc = Client()
    options = {**_DEFAULT_OPTIONS, **_callbacks(name, seen, nc), **auth, **overrides}
    max_reconnects = options.pop("max_reconnect_attempts")
    # nats-py can hang on a failed TLS handshake (a plain-text client meeting a TLS hub):
    # bound the whole first connect, and report the cause error_cb saw.
    first_connect_s = options["connect_timeout"] * (2 * _FIRST_CONNECT_MAX_RECONNECTS + 2)
    try:
        async with asyncio.timeout(first_connect_s * len(servers)):
            await nc.connect(
                servers, name=name, max_reconnect_attempts=_FIRST_CONNECT_MAX_RECONNECTS, **options
            )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        await _discard(nc)
        cause = seen[-1] if seen else exc
        raise MeshUnavailableError(f"cannot connect to NATS at {servers}: {cause!r}") from exc
    except asyncio.CancelledError:
        await _discard(nc)
        raise
    nc.options["max_reconnect_attempts"] = max_reconnects
    where = nc.connected_url.netloc if nc.connected_url else servers
    logger.info("%s: connected to NATS at %s", name, where)
    return nc


class MeshLink:
    """A NATS connection that may not exist yet: ``nc`` is ``None`` until the first connect."""

    def __init__(
        self,
        url: str | list[str],
        *,
        name: str,
        on_connect: OnConnect | None = None,
        retry_interval_s: float = 1.0,
        **connect_options: Any,
    ) -> None:
        self._url = url
        self._name = name
        self._on_connect = on_connect
        self._retry_interval_s = retry_interval_s
        self._connect_options = connect_options
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.nc: Client | None = None

    @property
    def connected(self) -> bool:
        """Whether the link is connected right now (false while reconnecting)."""
        return self.nc is not None and self.nc.is_connected

    def start(self) -> None:
        """Start trying to connect in a background task."""
        if self._task is None:
            self._task = asyncio.create_task(self._connect_loop(), name=f"mesh-link-{self._name}")

    async def wait_connected(self, timeout_s: float | None = None) -> Client:
        """Wait for the first connect (and ``on_connect``); ``MeshUnavailableError`` on timeout."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError as exc:
            raise MeshUnavailableError(f"no NATS at {self._url} after {timeout_s} s") from exc
        assert self.nc is not None
        return self.nc

    async def close(self) -> None:
        """Stop connecting and close the connection, if any."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        nc, self.nc = self.nc, None
        if nc is not None:
            await _discard(nc)

    async def _connect_loop(self) -> None:
        nc = await self._connect_with_retries()
        self.nc = nc
        if self._on_connect is not None:
            await self._run_on_connect(nc)
        self._ready.set()

    async def _connect_with_retries(self) -> Client:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await connect(self._url, name=self._name, **self._connect_options)
            except MeshUnavailableError as exc:
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                logger.log(level, "%s: %s; retrying in the background", self._name, exc)
            await asyncio.sleep(self._retry_interval_s)

    async def _run_on_connect(self, nc: Client) -> None:
        try:
            result = self._on_connect(nc) if self._on_connect else None
            if inspect.isawaitable(result):
                await result
        except Exception:
            # The link stays up: a failing callback is a bug to see, not a reason to go offline.
            logger.exception("%s: on_connect callback failed", self._name)


async def connect_in_background(
    url: str | list[str],
    *,
    name: str,
    on_connect: OnConnect | None = None,
    retry_interval_s: float = 1.0,
    **connect_options: Any,
) -> MeshLink:
    """Return at once a ``MeshLink`` that keeps trying to connect until it succeeds."""
    link = MeshLink(
        url, name=name, on_connect=on_connect, retry_interval_s=retry_interval_s, **connect_options
    )
    link.start()
    return link
