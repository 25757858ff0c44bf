"""``cxrembed serve``: a store as a local HTTP service with one page for search and
prediction (FastAPI + uvicorn; optional, imported only by ``serve``).

:class:`StoreService` (the library: no HTTP), :func:`create_app` (the routes),
:func:`bind` + :func:`run_server` (what the command calls).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Any

from cxrembed.errors import ConfigError, StoreError
from cxrembed.serve.service import ServeLimits, StoreService

log = logging.getLogger(__name__)

__all__ = ["ServeLimits", "StoreService", "bind", "create_app", "is_loopback", "open_service",
           "run_server", "url_of"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`cxrembed.serve.app.create_app` (imported here only when called)."""
    from cxrembed.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses other machines cannot reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one).

    Refuses (ConfigError) an address other machines can reach unless a token guards it,
    and names the option to change when the port is taken.
    """
    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host} lets other machines reach the store: give a "
                          "--token (or bind to 127.0.0.1, the default)")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be between 0 and 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Nagle off (accepted connections inherit it): uvicorn writes a response's head and
    # body separately, and with Nagle on the body waits for the client's delayed ACK,
    # ~40 ms on every keep-alive request (measured: 44 ms vs 2 ms for a trivial answer).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another "
                          "--port (or --host)") from None
    return sock


def open_service(store: str | os.PathLike, *, head: str | os.PathLike | None = None,
                 data_root: str | os.PathLike | None = None, index: str = "auto",
                 centre: str = "auto", device: str = "cpu",
                 limits: ServeLimits | None = None) -> StoreService:
    """Open the store (and its index) and, with ``head`` (a ``cxrembed fit`` head folder
    or an adapt run folder), the predictor; a head fitted for the store's encoder shares
    it."""
    from cxrembed.serve.predict import load_predictor
    from cxrembed.store import check_same_encoder

    service = StoreService(store, data_root=data_root, index=index, centre=centre,
                           device=device, limits=limits)
    if head is not None:
        try:
            predictor = load_predictor(head, device=device)
            try:
                check_same_encoder(predictor.fingerprint, service.store)
                predictor.share_encoder(service.encoder)  # one copy of the model in memory
            except StoreError:
                log.info("the head was fitted for another encoder than the store's: it "
                         "loads its own")
        except BaseException:
            service.close()
            raise
        service.predictor = predictor
    return service


def run_server(service: StoreService, sock: socket.socket, *, token: str | None = None,
               access_log: bool = False) -> None:
    """Serve until Ctrl-C (returns) or SIGTERM (ends the process after a graceful
    shutdown); the socket and the store are closed either way."""
    import uvicorn

    host = sock.getsockname()[0]
    allowed = ["*"] if not is_loopback(host) else None  # a token guards non-loopback binds
    app = create_app(service, token=token, allowed_hosts=allowed)
    config = uvicorn.Config(app, log_level="info" if access_log else "warning",
                            access_log=access_log,
                            server_header=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn shut down cleanly on Ctrl-C, then re-raised it: stopping is the point
    finally:
        sock.close()
        service.close()


def url_of(sock: socket.socket) -> str:
    """The page's address for a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

