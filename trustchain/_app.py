"""The application shell: configuration -> store -> handlers -> stoq, and its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import protocol
import stoq
from handlers import NodeService, Router
from handlers.ca import (
    CertificateAuthority,
    Hierarchy,
    HierarchyConfig,
    KeystoreSettings,
    LocalAdmission,
    NamingPolicy,
    Rotator,
    SigningWorkers,
)
from store import (
    AuditLog,
    CertificateStore,
    KeyStoreError,
    create_self_signed,
    credential_paths,
    open_keystore,
)

from . import __version__
from ._config import Config, ConfigError
from ._services import attachers

log = logging.getLogger("trustchain")

CERT_WATCH_INTERVAL = 2.0
"""Seconds between checks of the TLS certificate file for a replacement."""
ROTATION_CHECK_INTERVAL = 60.0
"""Seconds between rotation passes (intermediate and node certificate)."""


def open_configured_keystore(cfg: Config, data_dir: Path) -> Any:
    """The keystore ``[ca.hsm]`` names; the PIN comes from the environment.

    :raises ConfigError: the keystore cannot be opened (message says why).
    """
    hsm = cfg.ca.hsm
    if hsm.provider == "software":
        log.warning("DEVELOPMENT MODE: CA keys are software keys on disk in %s; never use "
                    "this in production", data_dir / "keys")
    try:
        keystore = open_keystore(provider=hsm.provider, data_dir=data_dir,
                                 module_path=hsm.module_path, token_label=hsm.token_label,
                                 pin=os.environ.get(hsm.pin_env, ""))
    except KeyStoreError as exc:
        raise ConfigError(f"ca.hsm: {exc}") from exc
    return keystore


def keystore_settings(cfg: Config, data_dir: Path) -> KeystoreSettings:
    """How a signing worker opens the same keystore as the node (PIN included)."""
    hsm = cfg.ca.hsm
    return KeystoreSettings(provider=hsm.provider, data_dir=str(data_dir),
                            module_path=hsm.module_path, token_label=hsm.token_label,
                            pin=os.environ.get(hsm.pin_env, "") if hsm.provider != "software"
                            else "")


def open_ca_stores(cfg: Config, data_dir: Path) -> tuple[Any, CertificateStore, AuditLog]:
    """The keystore, certificate database and audit log of ``data_dir``."""
    keystore = open_configured_keystore(cfg, data_dir)
    certs = CertificateStore(data_dir / "ca" / "certificates.sqlite3")
    audit = AuditLog(data_dir / "audit" / "audit.log",
                     signer=keystore.get_or_create("audit"), checkpoint_every=1000)
    return keystore, certs, audit


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
        self._rotation_task: asyncio.Task[None] | None = None
        self._cert_mtime = 0.0
        self.keystore: Any = None
        self.certs: CertificateStore | None = None
        self.audit: AuditLog | None = None
        self.hierarchy: Hierarchy | None = None
        self.ca: CertificateAuthority | None = None
        self.rotator: Rotator | None = None
        self.on_stop: list[Callable[[], Any]] = []
        self._announced = False
        """Called (last added first) when the node stops, before the stores close."""
        self.health_checks: dict[str, Callable[[], bool]] = {}
        """Readiness checks ``node.health`` reports; services add theirs when they attach."""
        self.services: dict[str, Any] = {}
        """Services attached by their wiring modules, by name (``"ct"``, ``"dns"``...)."""
        self.applications: list[tuple[str, Callable[[Any], Any]]] = []
        """``(alpn, session factory)`` pairs that wiring modules add; :meth:`start`
        registers each on the QUIC server (every socket serves every ALPN)."""

    @property
    def development(self) -> bool:
        return self.cfg.ca.mode == "development"

    def open_stores(self) -> None:
        """Open the keystore, the certificate database and the audit log."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.keystore, self.certs, self.audit = open_ca_stores(self.cfg, self.data_dir)

    def prepare_ca(self, *, create: bool) -> None:
        """Load the CA hierarchy; create it if ``create`` (development, or ``init``)."""
        assert self.certs is not None and self.audit is not None
        cfg = self.cfg
        domains = tuple(cfg.dns.domains.trustchain_domains)
        self.hierarchy = Hierarchy(
            keystore=self.keystore, certs=self.certs, data_dir=self.data_dir,
            config=HierarchyConfig(ca_id=cfg.ca.ca_id, domains=domains,
                                   root_lifetime=cfg.ca.root_lifetime,
                                   intermediate_lifetime=cfg.ca.intermediate_lifetime),
            clock=time.time, audit=self.audit.append)
        if not create and self.certs.active_authority("root") is None:
            raise ConfigError(f"no CA in {self.data_dir}: production mode does not create "
                              "one by itself; run `trustchain init` first")
        self.hierarchy.ensure()
        if create:
            self.hierarchy.ensure_admin()
        self.ca = CertificateAuthority(
            hierarchy=self.hierarchy, certs=self.certs,
            policy=NamingPolicy(domains=domains,
                                allow_wildcards=cfg.ca.policy.allow_wildcards,
                                name_conflict=cfg.ca.policy.name_conflict),
            admission=LocalAdmission(), audit=self.audit.append_async,
            validity=cfg.ca.cert_validity_days * 86400.0, backdate=cfg.ca.backdate,
            rotation_status=lambda: self.rotator.status() if self.rotator else {})
        if cfg.ca.signing_workers:
            self.ca.signing_workers = SigningWorkers(cfg.ca.signing_workers,
                                                     keystore_settings(cfg, self.data_dir))
        addresses = list(cfg.node.addresses) or sorted(
            {h for h, _ in self.listen if h != "::"} | {"::1"})
        ca = self.ca

        def issue_node_certificate(csr: bytes) -> Any:
            return ca.issue_csr(csr, None, requester="node", internal=True)

        self.rotator = Rotator(
            hierarchy=self.hierarchy, issue=issue_node_certificate,
            tls=credential_paths(self.data_dir), names=list(cfg.node.names),
            addresses=addresses, installed=self.reload_certificate)
        self.rotator.load_current()

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
        self.open_stores()
        assert self.audit is not None
        self.audit.append("node.started", {"mode": self.cfg.ca.mode, "config": self.cfg.source,
                                            "warnings": list(self.cfg.warnings)})
        self.prepare_ca(create=self.development)
        assert self.ca is not None and self.rotator is not None
        if self.ca.signing_workers is not None:
            await self.ca.signing_workers.warm_up()
        self.health_checks["accepting"] = lambda: (self.server is not None
                                                   and not self.server.draining)
        NodeService(describe=self.describe, checks=self.health_checks).register(self.router)
        self.ca.register(self.router)
        for attach in attachers():
            result = attach(self)
            if asyncio.iscoroutine(result):
                await result
        credential = credential_paths(self.data_dir)
        if not credential.exists():
            # until the CA (through consensus) has issued the node's certificate
            create_self_signed(credential, names=list(self.cfg.node.names) or ["localhost"],
                               addresses=["::1"])
        self.server = stoq.Server(dispatch=self.router, certfile=str(credential.certfile),
                                  keyfile=str(credential.keyfile),
                                  engine=self.cfg.network.quic_engine,
                                  limits=server_limits(self.cfg))
        for alpn, factory in self.applications:
            self.server.add_application(alpn, factory)
        await self.server.start(self.listen)
        self._cert_mtime = credential.certfile.stat().st_mtime
        loop = asyncio.get_running_loop()
        # The node's own QUIC certificate: CA-issued, through the same admission as a
        # client's (so logged in CT), before the node announces itself. A cluster
        # needs a quorum of validators for that, so it serves the bootstrap
        # certificate until its peers are up.
        if len(self.cfg.consensus.validators) <= 1:
            await self.rotator.check()
            self._cert_mtime = credential.certfile.stat().st_mtime
        self._watch_task = loop.create_task(self._watch_certificate())
        self._rotation_task = loop.create_task(self.rotator.run(ROTATION_CHECK_INTERVAL))

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
        self._cert_mtime = credential_paths(self.data_dir).certfile.stat().st_mtime
        if self._announced:
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
        for task in (self._watch_task, self._rotation_task):
            if task is not None:
                task.cancel()
        if self.server is not None:
            await self.server.shutdown()
        for callback in reversed(self.on_stop):
            result = callback()
            if asyncio.iscoroutine(result):
                await result
        if self.ca is not None and self.ca.signing_workers is not None:
            await self.ca.signing_workers.close()
        if self.audit is not None:
            self.audit.append("node.stopped", {})
            self.audit.close()
        if self.certs is not None:
            self.certs.close()
        if self.keystore is not None:
            self.keystore.close()

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
        self._announced = True
        if ready is not None:
            ready(self)
        await self._stopping.wait()
        print("shutting down", file=out, flush=True)
        await self.stop()
        print("stopped", file=out, flush=True)
