"""The application shell: configuration -> store -> handlers -> stoq, and its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import protocol
import stoq
from handlers import NodeService, Router
from store import create_self_signed, credential_paths

from . import __version__
from ._config import Config, ConfigError

log = logging.getLogger("trustchain")

CERT_WATCH_INTERVAL = 2.0
"""Seconds between checks of the TLS certificate file for a replacement."""


def server_limits(cfg: Config) -> stoq.ServerLimits:
    net = cfg.network
    return stoq.ServerLimits(
        max_connections=net.max_concurrent_connections,
        idle_timeout=net.connection_timeout,
        keep_alive_interval=net.keep_alive_interval,
        max_frame_size=net.max_frame_size,
        max_streams_per_connection=net.max_streams_per_connection,
        rate_limit_per_minute=cfg.api.rate_limit_per_minute,
        rate_limit_prefix_length=cfg.api.rate_limit_prefix_length,
        drain_timeout=net.drain_timeout,
    )


class Node:
    """One TrustChain node: its data directory, services and QUIC server."""

    def __init__(self, cfg: Config, *, data_dir: str | None = None,
                 listen: list[tuple[str, int]] | None = None) -> None:
        self.cfg = cfg
        self.data_dir = Path(data_dir or cfg.node.data_dir).resolve()
        self.listen = listen or cfg.listen_addresses()
        self.router = Router()
        self.server: stoq.Server | None = None
        self._stopping = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._cert_mtime = 0.0

    @property
    def development(self) -> bool:
        return self.cfg.ca.mode == "development"

    def prepare_data_dir(self) -> None:
        """Create the data directory and, in development mode, a TLS certificate."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        credential = credential_paths(self.data_dir)
        if not credential.exists():
            if not self.development:
                raise ConfigError(
                    f"no TLS certificate in {credential.certfile.parent}: production mode "
                    "does not create one; run `trustchain init` first")
            addresses = sorted({host for host, _ in self.listen if host not in ("::",)} | {"::1"})
            create_self_signed(credential, names=["localhost"], addresses=addresses)
            log.warning("created a self-signed development TLS certificate",
                        extra={"path": str(credential.certfile)})

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
            "ops": self.router.ops,
            "listen": [f"[{h}]:{p}" for h, p in (server.addresses if server else self.listen)],
            "tls_fingerprint": server.fingerprint if server else "",
            "limits": {
                "max_frame_size": limits.max_frame_size,
                "max_streams_per_connection": limits.max_streams_per_connection,
                "max_connections": limits.max_connections,
                "idle_timeout": limits.idle_timeout,
                "keep_alive_interval": limits.keep_alive_interval,
                "rate_limit_per_minute": limits.rate_limit_per_minute,
            },
            "stats": server.stats() if server else {},
        }

    async def start(self) -> None:
        self.prepare_data_dir()
        NodeService(describe=self.describe,
                    checks={"accepting": lambda: self.server is not None
                            and not self.server.draining}).register(self.router)
        credential = credential_paths(self.data_dir)
        self.server = stoq.Server(dispatch=self.router, certfile=str(credential.certfile),
                                  keyfile=str(credential.keyfile),
                                  engine=self.cfg.network.quic_engine,
                                  limits=server_limits(self.cfg))
        await self.server.start(self.listen)
        self._cert_mtime = credential.certfile.stat().st_mtime
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_certificate())

    def reload_certificate(self) -> None:
        """Swap in the TLS certificate now on disk (SIGHUP, or a changed file)."""
        if self.server is None:
            return
        try:
            fingerprint = self.server.reload_certificate()
        except Exception as exc:  # keep serving with the old one
            log.error("TLS certificate reload failed; keeping the current one",
                      extra={"error": str(exc)})
            return
        self._cert_mtime = credential_paths(self.data_dir).certfile.stat().st_mtime
        print(f"tls certificate sha256 {fingerprint}", flush=True)

    async def _watch_certificate(self) -> None:
        certfile = credential_paths(self.data_dir).certfile
        while True:
            await asyncio.sleep(CERT_WATCH_INTERVAL)
            with contextlib.suppress(OSError):
                if certfile.stat().st_mtime != self._cert_mtime:
                    self.reload_certificate()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.server is not None:
            await self.server.shutdown()

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
        print(f"data directory {self.data_dir}", file=out, flush=True)
        if ready is not None:
            ready(self)
        await self._stopping.wait()
        print("shutting down", file=out, flush=True)
        await self.stop()
        print("stopped", file=out, flush=True)
