"""Wiring of the CT log and the fingerprint service into a node.

``attach(node)`` opens ``DATA/ct`` (or ``ct.storage_path``): the database, the
shards' tiles (repairing them from staged bundles after a crash) and the
shards' keys (``ct-log-N`` in the node's keystore); registers the ``ct.*``
and ``fp.*`` ops; makes the CA log every certificate it issues through the
precertificate flow; and logs, as an x509 entry, the node's own TLS
certificate when it was issued before the log was attached (at start-up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from handlers.ct import ChainValidator, CtLog, CtService
from handlers.fingerprint import FingerprintService
from protocol import TrustChainError
from protocol.ct_structs import embedded_scts
from store import CtDatabase, credential_paths

from ._config import ConfigError

log = logging.getLogger("trustchain.ct")


def ct_directory(node: Any) -> Path:
    configured = node.cfg.ct.storage_path
    return Path(configured) if configured else Path(node.data_dir) / "ct"


def _extra_roots(paths: list[str]) -> list[bytes]:
    roots: list[bytes] = []
    for i, path in enumerate(paths):
        try:
            certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ct.extra_roots[{i}]: cannot load {path}: {exc}") from exc
        roots += [c.public_bytes(serialization.Encoding.DER) for c in certs]
    return roots


def attach(node: Any) -> None:
    cfg = node.cfg.ct
    if cfg.storage.backend != "filesystem":
        log.warning("ct.storage.backend %r is not implemented in this version; the tiles go "
                    "to the filesystem at %s", cfg.storage.backend, ct_directory(node))
    directory = ct_directory(node)
    db = CtDatabase(directory / "ct.sqlite3")
    ct_log = CtLog(directory=directory, db=db, keystore=node.keystore, origin=cfg.log_id,
                   max_entries_per_shard=cfg.max_entries_per_shard,
                   batch_interval=cfg.batch_interval, max_batch=cfg.max_batch,
                   sth_interval=cfg.merkle_update_interval,
                   feed_capacity=cfg.subscription_buffer, clock=time.time)
    ct_log.open()
    roots = [node.hierarchy.root_der, *_extra_roots(list(cfg.extra_roots))]
    service = CtService(ct_log, ChainValidator(roots, clock=time.time))
    service.register(node.router)
    node.ca.precert_logger = service.log_precertificate
    node.services["ct"] = service
    fingerprints: FingerprintService | None = None
    if cfg.enable_realtime_fingerprinting:
        hierarchy = node.hierarchy

        def issuer_der(name: str) -> bytes | None:
            return next((a.der for a in hierarchy.intermediates() if a.name == name), None)

        fingerprints = FingerprintService(db=db, log=ct_log, certs=node.certs,
                                          issuer_der=issuer_der)
        fingerprints.register(node.router)
        node.ca.on_issued.append(fingerprints.issued)
        node.ca.on_revoked.append(fingerprints.revoked)
        ct_log.on_sequenced.append(fingerprints.sequenced)
        node.services["fp"] = fingerprints
    ct_log.start()
    backlog = asyncio.get_running_loop().create_task(_log_node_certificate(node, service))

    async def stop() -> None:
        backlog.cancel()
        node.ca.precert_logger = None
        await ct_log.stop()
        if fingerprints is not None:
            await fingerprints.close()
        db.close()

    node.on_stop.append(stop)


async def _log_node_certificate(node: Any, service: CtService) -> None:
    """The node's TLS certificate is issued before the log starts: log it as an x509
    entry unless it already carries an SCT."""
    credential = credential_paths(node.data_dir)
    try:
        chain = x509.load_pem_x509_certificates(credential.certfile.read_bytes())
    except (OSError, ValueError):
        return
    if not chain or embedded_scts(chain[0]):
        return
    ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]
    try:
        checked = service.validator.check(ders, precert=False)
        submitted = await service.log.submit(checked, precert=False)
    except TrustChainError as exc:
        log.warning("the node's TLS certificate could not be logged: %s", exc.message)
        return
    log.info("node TLS certificate logged", extra={"shard": submitted.shard,
                                                   "leaf_index": submitted.leaf_index})
