"""Wiring of the DNS service: keys from the keystore, the CA's certificate hooks,
the ``dns.*`` ops, and the ``doq`` ALPN on the node's sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import stoq
from handlers.dns import (
    AnswerCache,
    DnsService,
    DnsSettings,
    Forwarder,
    KeyRing,
    Upstream,
    ZoneSettings,
)
from protocol.doq import ALPN_DOQ

from ._config import parse_upstream

MAINTENANCE_INTERVAL = 60.0
"""Seconds between passes that expire records, roll keys and refresh signatures."""


def attach(node: Any) -> None:
    """Start the DNS service of ``node`` (unless ``dns.enabled`` is false)."""
    cfg = node.cfg.dns
    if not cfg.enabled:
        return
    data_dir = node.data_dir / "dns"
    keyring = KeyRing(keystore=node.keystore, path=data_dir / "keys.json",
                      algorithm=cfg.dnssec_algorithm, zsk_lifetime=cfg.zsk_lifetime,
                      prepublish=cfg.zsk_prepublish)
    upstreams = []
    for i, text in enumerate(cfg.upstream_servers):
        protocol, address, port, name = parse_upstream(text, f"dns.upstream_servers[{i}]")
        upstreams.append(Upstream("doq" if protocol == "doq" else "udp", address, port, name))
    forwarder = Forwarder(upstreams, cache=AnswerCache(cfg.cache_size, cfg.cache_ttl),
                          cafile=cfg.upstream_cafile, timeout=cfg.upstream_timeout)
    addresses = tuple(cfg.nameserver_addresses) or tuple(
        node.rotator.addresses if node.rotator is not None else ["::1"])
    settings = DnsSettings(
        domains=tuple(cfg.domains.trustchain_domains), nameserver_addresses=addresses,
        zone=ZoneSettings(record_ttl=int(cfg.record_ttl), negative_ttl=int(cfg.negative_ttl),
                          signature_validity=cfg.signature_validity,
                          signature_refresh=cfg.signature_refresh),
        enable_cert_validation=cfg.enable_cert_validation)
    service = DnsService(settings=settings, certs=node.certs, keyring=keyring,
                         forwarder=forwarder, data_dir=data_dir)
    service.start()
    node.ca.on_issued.append(service.certificate_issued)
    node.ca.on_revoked.append(service.certificate_revoked)
    service.register(node.router)
    application = stoq.DoqApplication(service.answer_doq, stoq.DoqLimits(
        fin_timeout=cfg.fin_timeout, max_pending=cfg.max_pending_queries,
        rate_limit_per_minute=cfg.rate_limit_per_minute,
        rate_limit_prefix_length=node.cfg.api.rate_limit_prefix_length))
    service.doq_stats = lambda: dataclasses.asdict(application.stats)
    node.applications.append((ALPN_DOQ, application))
    node.services["dns"] = service
    task = asyncio.get_running_loop().create_task(service.run(MAINTENANCE_INTERVAL))

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await forwarder.close()

    node.on_stop.append(stop)
