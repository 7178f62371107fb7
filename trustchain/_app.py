"""The application shell: a node's lifetime around its services and its QUIC server.

:mod:`._compose` builds the services; :class:`Node` starts them and the server,
announces itself, serves until SIGTERM/SIGINT, then stops the server and the
services in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import protocol
import stoq
from handlers.ca import CertificateAuthority
from protocol import TrustChainError
from store import create_self_signed

from . import __version__
from ._compose import Services, build_services, data_directory
from ._config import ROTATION_CHECK_INTERVAL, Config, informational

log = logging.getLogger("trustchain")

CERT_WATCH_INTERVAL = 2.0
"""Seconds between checks of the TLS certificate file for a replacement."""


def server_limits(cfg: Config) -> stoq.ServerLimits:
    net = cfg.network
    return stoq.ServerLimits(
        max_connections=net.max_concurrent_connections,
        max_connections_per_address=net.max_connections_per_address,
        max_connections_per_prefix=net.max_connections_per_prefix,
        connection_prefix_length=net.connection_prefix_length,
        max_handshakes_per_second=net.max_handshakes_per_second,
        idle_timeout=net.connection_timeout,
        keep_alive_interval=net.keep_alive_interval,
        max_frame_size=net.max_frame_size,
        max_streams_per_connection=net.max_streams_per_connection,
        rate_limit_per_minute=cfg.api.rate_limit_per_minute,
        rate_limit_prefix_length=cfg.api.rate_limit_prefix_length,
        drain_timeout=net.drain_timeout,
        request_timeout=net.request_timeout,
    )


class Node:
    """One TrustChain node: its data directory, services and QUIC server."""

    def __init__(self, cfg: Config, *, data_dir: str | None = None,
                 listen: list[tuple[str, int]] | None = None,
                 check_audit_log: bool = False) -> None:
        self.cfg = cfg
        self.check_audit_log = check_audit_log
        self.data_dir = Path(data_dir or cfg.node.data_dir).resolve()
        self.data = data_directory(cfg, self.data_dir)
        self.listen = listen or cfg.listen_addresses()
        self.server: stoq.Server | None = None
        self.services: Services | None = None
        self._exits = contextlib.AsyncExitStack()
        self._stopping = asyncio.Event()
        self._cert_mtime = 0.0
        self._announced = False

    @property
    def development(self) -> bool:
        return self.cfg.ca.mode == "development"

    @property
    def ca(self) -> CertificateAuthority:
        assert self.services is not None
        return self.services.ca

    def accepting(self) -> bool:
        return self.server is not None and not self.server.draining

    def describe(self) -> dict[str, Any]:
        """The facts ``node.info`` reports."""
        server = self.server
        limits = server.limits if server else server_limits(self.cfg)
        return {
            "version": __version__,
            "protocol": protocol.ALPN,
            "mode": self.cfg.ca.mode,
            "engine": {"name": server.engine.name if server else self.cfg.network.quic_engine,
                       "version": server.engine.version if server else ""},
            "alpns": server.alpns if server else [protocol.ALPN],
            "ops": self.services.router.ops if self.services else [],
            "listen": [f"[{h}]:{p}" for h, p in (server.addresses if server else self.listen)],
            "tls_fingerprint": server.fingerprint if server else "",
            "limits": {
                "max_frame_size": limits.max_frame_size,
                "max_streams_per_connection": limits.max_streams_per_connection,
                "max_connections": limits.max_connections,
                "max_connections_per_address": limits.max_connections_per_address,
                "max_connections_per_prefix": limits.max_connections_per_prefix,
                "connection_prefix_length": limits.connection_prefix_length,
                "max_handshakes_per_second": limits.max_handshakes_per_second,
                "idle_timeout": limits.idle_timeout,
                "keep_alive_interval": limits.keep_alive_interval,
                "rate_limit_per_minute": limits.rate_limit_per_minute,
            },
            "stats": server.stats() if server else {},
            "informational": informational(self.cfg),
        }

    async def start(self) -> None:
        """Build the services, then serve: QUIC on every listen address."""
        try:
            self.services = await build_services(
                self.cfg, self.data, self._exits, listen=self.listen, describe=self.describe,
                accepting=self.accepting, installed=self.reload_certificate,
                check_audit_log=self.check_audit_log)
        except BaseException:
            await self._exits.aclose()
            raise
        services = self.services
        credential = services.tls
        if not credential.exists():
            # until the CA (through consensus) has issued the node's certificate
            create_self_signed(credential, names=list(self.cfg.node.names) or ["localhost"],
                               addresses=["::1"])
        self.server = stoq.Server(dispatch=services.router, certfile=str(credential.certfile),
                                  keyfile=str(credential.keyfile),
                                  engine=self.cfg.network.quic_engine,
                                  limits=server_limits(self.cfg))
        for alpn, application in services.applications:
            self.server.add_application(alpn, application)
        await self.server.start(self.listen)
        self._cert_mtime = credential.certfile.stat().st_mtime
        # The node's own QUIC certificate: CA-issued, through the same admission as a
        # client's (so logged in CT), before the node announces itself. A cluster
        # needs a quorum of validators for that, so it serves the bootstrap
        # certificate until its peers are up.
        if len(self.cfg.consensus.validators) <= 1:
            try:
                if services.keys is not None:
                    await services.keys.announce()
                await services.rotator.check()
            except TrustChainError as exc:  # serve reads with the certificate it has
                log.error("the node's TLS certificate could not be renewed: %s", exc.message)
            self._cert_mtime = credential.certfile.stat().st_mtime
        loop = asyncio.get_running_loop()
        for task in (loop.create_task(self._watch_certificate(), name="tls-watch"),
                     loop.create_task(services.rotator.run(ROTATION_CHECK_INTERVAL),
                                      name="rotation")):
            self._exits.push_async_callback(_cancel, task)

    def reload_certificate(self) -> None:
        """Swap in the TLS certificate now on disk (SIGHUP, a changed file, a renewal)."""
        if self.server is None or self.server.draining:
            return
        try:
            fingerprint = self.server.reload_certificate()
        except Exception as exc:  # keep serving with the old one
            log.error("TLS certificate reload failed; keeping the current one",
                      extra={"error": str(exc)})
            return
        self._cert_mtime = self.data.tls_credential().certfile.stat().st_mtime
        if self._announced:
            print(f"tls certificate sha256 {fingerprint}", flush=True)

    async def _watch_certificate(self) -> None:
        certfile = self.data.tls_credential().certfile
        while True:
            await asyncio.sleep(CERT_WATCH_INTERVAL)
            with contextlib.suppress(OSError):
                if certfile.stat().st_mtime != self._cert_mtime:
                    self.reload_certificate()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        """Stop accepting and drain, then stop the services in reverse order."""
        try:
            if self.server is not None:
                await self.server.shutdown()
        finally:
            await self._exits.aclose()

    async def run(self, out: TextIO = sys.stdout,
                  ready: Callable[[Node], None] | None = None) -> None:
        """Start, announce, serve until SIGTERM/SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        await self.start()
        assert self.server is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload_certificate)
        mode = "development mode" if self.development else "production mode"
        print(f"TrustChain {__version__} ({mode}, QUIC engine {self.server.engine.name} "
              f"{self.server.engine.version}, pid {os.getpid()})", file=out)
        for host, port in self.server.addresses:
            print(f"listening on [{host}]:{port} alpn {','.join(self.server.alpns)}", file=out)
        print(f"tls certificate sha256 {self.server.fingerprint}", file=out)
        shown = ", ".join(f"{k} = {json.dumps(v)}" for k, v in informational(self.cfg).items())
        print(f"informational settings (they describe the deployment, the node does not use "
              f"them): {shown}", file=out)
        print(f"data directory {self.data_dir}", file=out, flush=True)
        self._announced = True
        if ready is not None:
            ready(self)
        await self._stopping.wait()
        print("shutting down", file=out, flush=True)
        await self.stop()
        print("stopped", file=out, flush=True)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
