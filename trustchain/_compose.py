"""The composition root: one node's services, built in plain order.

stores -> keys and hierarchy -> proofs -> chain -> CT -> publishers (fingerprints,
DNS) -> CA -> rotation -> router. Every collaborator goes in through a
constructor; nothing is changed on a service after it is built. Whatever must
be stopped or closed is pushed on one :class:`contextlib.AsyncExitStack`, so
the node stops in the reverse order of this file.

:class:`NodeParts` builds a node with fewer services; only the benchmarks do
that, to measure what each stage adds to an issuance.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

import stoq
from handlers import NodeService, Router
from handlers.ca import (
    Admission,
    CertificateAuthority,
    Hierarchy,
    HierarchyConfig,
    KeystoreSettings,
    LeafSigner,
    LocalAdmission,
    LocalSigner,
    NamingPolicy,
    Publisher,
    Publishers,
    Rotator,
    SigningWorkers,
    check_request,
)
from handlers.consensus import (
    BeaconChain,
    CaRules,
    ChainBeacons,
    ChainFaucet,
    ChainService,
    CheckpointSubmitter,
    ConsensusAdmission,
    ConsensusChain,
    ConsensusService,
    Faucet,
    FourProofAdmission,
    LedgerFaucet,
    ProofVerifier,
    StakeLedger,
)
from handlers.consensus.bft import Block, Validator, ValidatorSet, validator_id
from handlers.consensus.bft._core import Timeouts
from handlers.ct import ChainValidator, CtLog, CtService
from handlers.dns import (
    AnswerCache,
    DnsAnswers,
    DnsService,
    DnsSettings,
    Forwarder,
    KeyRing,
    RenderedAnswers,
    TrustChainZones,
    Upstream,
    ZoneSettings,
)
from handlers.fingerprint import FingerprintService, FingerprintWatchers
from protocol import TrustChainError
from protocol.ct_structs import embedded_scts
from protocol.doq import ALPN_DOQ
from protocol.ops.consensus import ProofParams
from store import (
    Algorithm,
    AuditLog,
    CertificateStore,
    ChainStore,
    DataDirectory,
    KeyStore,
    KeyStoreError,
    LedgerStore,
    Signer,
    TlsCredential,
    open_keystore,
)

from ._config import Config, ConfigError, parse_upstream
from ._peers import StoqPeerLinks

log = logging.getLogger("trustchain")

AUDIT_KEY = "audit"
BEACON_KEY = "beacon"
"""Keystore names of the keys that sign audit checkpoints and epoch beacons."""
DNS_MAINTENANCE_INTERVAL = 60.0
"""Seconds between passes that expire records, roll keys and refresh signatures."""

Audit = Callable[[str, dict[str, Any]], Any]


@dataclass(frozen=True, kw_only=True)
class NodeParts:
    """Which services a node builds: a node builds every one; the benchmarks build the
    CA with fewer, to measure what each stage adds to an issuance."""

    proofs: bool = True
    """Four-proof admission: the stake ledger, epoch beacons, ``consensus.*`` ops."""
    chain: bool = True
    """The validator chain: every CA decision committed in a block (needs ``proofs``)."""
    transparency: bool = True
    """The CT log (every certificate through the precertificate flow) and ``fp.*``."""
    dns: bool = True
    """The DNS service and DNS over QUIC (when ``dns.enabled``)."""


EVERY_PART = NodeParts()
"""A node's services: all of them."""
PART_SETS = {
    "all": EVERY_PART,
    "ca-alone": NodeParts(proofs=False, chain=False, transparency=False, dns=False),
    "four-proof": NodeParts(chain=False, transparency=False, dns=False),
    "consensus": NodeParts(transparency=False, dns=False),
}
"""The nodes the benchmarks compare: every service; the CA with its local admission
(no proofs checked) and nothing else; with four-proof admission; with four proofs and
the validator chain."""


@dataclass(frozen=True, kw_only=True)
class Services:
    """What :func:`build_services` made: the router and the services a caller may ask."""

    router: Router
    applications: tuple[tuple[str, stoq.DoqApplication], ...]
    """``(alpn, application)`` pairs the server serves besides STOQ."""
    keystore: KeyStore
    audit: AuditLog
    hierarchy: Hierarchy
    ca: CertificateAuthority
    rotator: Rotator
    tls: TlsCredential
    proofs: ConsensusService | None
    chain: ConsensusChain | None
    ct: CtService | None
    fingerprints: FingerprintService | None
    dns: DnsService | None


# --- stores and keys ---------------------------------------------------------------------


def open_configured_keystore(cfg: Config, data_dir: Path) -> KeyStore:
    """The keystore ``[ca.hsm]`` names; the PIN comes from the environment.

    :raises ConfigError: the keystore cannot be opened (message says why).
    """
    hsm = cfg.ca.hsm
    if hsm.provider == "software":
        log.warning("DEVELOPMENT MODE: CA keys are software keys on disk in %s; never use "
                    "this in production", data_dir / "keys")
    try:
        return open_keystore(provider=hsm.provider, data_dir=data_dir,
                             module_path=hsm.module_path, token_label=hsm.token_label,
                             pin=os.environ.get(hsm.pin_env, ""))
    except KeyStoreError as exc:
        raise ConfigError(f"ca.hsm: {exc}") from exc


def keystore_settings(cfg: Config, data_dir: Path) -> KeystoreSettings:
    """How a signing worker opens the same keystore as the node (PIN included)."""
    hsm = cfg.ca.hsm
    return KeystoreSettings(provider=hsm.provider, data_dir=str(data_dir),
                            module_path=hsm.module_path, token_label=hsm.token_label,
                            pin=os.environ.get(hsm.pin_env, "") if hsm.provider != "software"
                            else "")


def data_directory(cfg: Config, data_dir: Path) -> DataDirectory:
    """The node's data directory, with the CT log where ``ct.storage_path`` puts it."""
    configured = cfg.ct.storage_path
    return DataDirectory(data_dir, ct_directory=Path(configured) if configured else None)


async def _key(keystore: KeyStore, name: str, algorithm: Algorithm, audit: Audit) -> Signer:
    """The keystore's key ``name``, created (and the creation audited) if missing."""
    signer = keystore.get(name)
    if signer is None:
        signer = keystore.create(name, algorithm)
        await audit("key.generated", {"name": name, "algorithm": signer.algorithm,
                                      "keystore": keystore.kind})
    return signer


def open_ca(cfg: Config, data: DataDirectory, keystore: KeyStore, certs: CertificateStore,
            audit: AuditLog, *, create: bool) -> Hierarchy:
    """Load the CA hierarchy; create it if ``create`` (development, or ``init``).

    :raises ConfigError: there is no CA and ``create`` is false (production).
    """
    config = HierarchyConfig(ca_id=cfg.ca.ca_id, domains=tuple(cfg.dns.domains.trustchain_domains),
                             root_lifetime=cfg.ca.root_lifetime,
                             intermediate_lifetime=cfg.ca.intermediate_lifetime)
    hierarchy = Hierarchy(keystore=keystore, certs=certs, root_file=data.root_certificate(),
                          admin=data.admin_credential(), config=config, clock=time.time,
                          audit=audit.append)
    if not create and certs.active_authority("root") is None:
        raise ConfigError(f"no CA in {data.root}: production mode does not create one by "
                          "itself; run `trustchain init` first")
    hierarchy.ensure()
    if create:
        hierarchy.ensure_admin()
    return hierarchy


@dataclass(frozen=True)
class CaStores:
    """A CA's keystore, certificate database and audit log, open without a node."""

    keystore: KeyStore
    certs: CertificateStore
    audit: AuditLog


@contextlib.contextmanager
def open_ca_stores(cfg: Config, data: DataDirectory) -> Iterator[CaStores]:
    """The CA's stores of ``data`` for a command that runs no node (``trustchain init``,
    ``cluster init``); closed in order: the audit log signs its final checkpoint before
    the keystore closes."""
    data.create()
    keystore = open_configured_keystore(cfg, data.root)
    try:
        certs = data.certificates()
        try:
            audit = data.audit_log(signer=keystore.get_or_create(AUDIT_KEY))
            try:
                yield CaStores(keystore=keystore, certs=certs, audit=audit)
            finally:
                audit.close()
        finally:
            certs.close()
    finally:
        keystore.close()


def node_addresses(cfg: Config, listen: Iterable[tuple[str, int]]) -> list[str]:
    """The addresses the node's certificate names: configured, or those it listens on."""
    return list(cfg.node.addresses) or sorted({h for h, _ in listen if h != "::"} | {"::1"})


# --- proofs and the chain --------------------------------------------------------------------


def proof_params(cfg: Config) -> ProofParams:
    """The proof parameters the configuration asks for."""
    consensus = cfg.consensus
    mode = cfg.ca.mode
    return ProofParams(minimum_stake=consensus.minimum_stake,
                       minimum_work_difficulty=consensus.minimum_work_difficulty,
                       plot_size=consensus.resolved_plot_size(mode),
                       vdf_iterations=consensus.resolved_vdf_iterations(mode),
                       epoch_length=int(consensus.epoch_length))


def validator_set(cfg: Config, own_key: bytes) -> tuple[ValidatorSet, dict[str, str]]:
    """The configured validators (or this node alone) and their names."""
    configured = cfg.consensus.validators
    if not configured:
        me = Validator(own_key, 1, "::1", 0)
        return ValidatorSet((me,)), {me.id: "self"}
    validators = tuple(Validator(bytes.fromhex(v.public_key), v.power, v.address, v.port)
                       for v in configured)
    names = {v.id: c.name or v.id[:8] for v, c in zip(validators, configured, strict=True)}
    return ValidatorSet(validators), names


@dataclass(frozen=True)
class _Validator:
    """This node as a validator: its key, the set, the chain's store and links."""

    signer: Signer
    own_id: str
    me: str | None
    """``own_id`` if the set holds it; None: the node follows without voting."""
    validators: ValidatorSet
    names: dict[str, str]


async def _validator(cfg: Config, keystore: KeyStore, audit: Audit) -> _Validator:
    consensus = cfg.consensus
    signer = await _key(keystore, consensus.validator_key, "ed25519", audit)
    if signer.algorithm != "ed25519":
        raise ConfigError(f"the validator key {consensus.validator_key!r} must be Ed25519")
    own_key = signer.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    validators, names = validator_set(cfg, own_key)
    own_id = validator_id(own_key)
    me: str | None = own_id
    if own_id not in validators.by_id:
        log.warning("this node's validator key is not in consensus.validators: it follows "
                    "the chain without voting", extra={"validator": own_id})
        me = None
    return _Validator(signer=signer, own_id=own_id, me=me, validators=validators, names=names)


def _beacons(cfg: Config, ledger: LedgerStore, signer: Signer, chain_store: ChainStore | None,
             audit: Audit) -> BeaconChain:
    """A cluster's epoch beacon is its first committed block of the epoch; a node
    alone draws and signs its own."""
    epoch_length = int(cfg.consensus.epoch_length)
    if chain_store is not None and len(cfg.consensus.validators) > 1:
        def first_block_at(time_ms: int) -> tuple[int, bytes] | None:
            stored = chain_store.first_at_or_after(time_ms)
            return None if stored is None else (stored.time_ms, stored.id)

        return ChainBeacons(first_block_at=first_block_at, ledger=ledger, signer=signer,
                            epoch_length=epoch_length, audit=audit)
    return BeaconChain(ledger=ledger, signer=signer, epoch_length=epoch_length, audit=audit)


def _chain(cfg: Config, validator: _Validator, store: ChainStore, links: StoqPeerLinks,
           rules: CaRules, audit: Audit) -> ConsensusChain:
    consensus = cfg.consensus
    sign = validator.signer.sign if validator.me else None
    return ConsensusChain(
        chain_id=consensus.chain_id, validators=validator.validators, store=store,
        transport=links, rules=rules, me=validator.me, sign=sign,
        timeouts=Timeouts(propose=consensus.block_interval + consensus.timeout_propose,
                          prevote=consensus.timeout_prevote,
                          precommit=consensus.timeout_precommit,
                          delta=consensus.timeout_delta),
        block_interval=consensus.block_interval, gossip_interval=consensus.gossip_interval,
        max_block_decisions=consensus.max_block_decisions,
        max_frame_size=cfg.network.max_frame_size, names=validator.names, audit=audit)


# --- certificate transparency ----------------------------------------------------------------


def _extra_roots(paths: list[str]) -> list[bytes]:
    roots: list[bytes] = []
    for i, path in enumerate(paths):
        try:
            certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ct.extra_roots[{i}]: cannot load {path}: {exc}") from exc
        roots += [c.public_bytes(serialization.Encoding.DER) for c in certs]
    return roots


async def log_node_certificate(tls: TlsCredential, ct: CtService) -> None:
    """A node TLS certificate issued before the log existed (an older version): log it
    as an x509 entry unless it carries an SCT. The self-signed bootstrap certificate
    (before the CA issued one) is not the CA's and is not logged."""
    chain = tls.read_chain()
    if not chain or chain[0].issuer == chain[0].subject or embedded_scts(chain[0]):
        return
    ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]
    try:
        checked = ct.validator.check(ders, precert=False)
        submitted = await ct.log.submit(checked, precert=False)
    except TrustChainError as exc:
        log.warning("the node's TLS certificate could not be logged: %s", exc.message)
        return
    log.info("node TLS certificate logged", extra={"shard": submitted.shard,
                                                   "leaf_index": submitted.leaf_index})


# --- DNS -------------------------------------------------------------------------------------


def _forwarder(cfg: Config) -> Forwarder:
    dns = cfg.dns
    upstreams = []
    for i, text in enumerate(dns.upstream_servers):
        protocol, address, port, name = parse_upstream(text, f"dns.upstream_servers[{i}]")
        upstreams.append(Upstream("doq" if protocol == "doq" else "udp", address, port, name))
    return Forwarder(upstreams, cache=AnswerCache(dns.cache_size, dns.cache_ttl),
                     cafile=dns.upstream_cafile, timeout=dns.upstream_timeout)


def _task(exits: contextlib.AsyncExitStack, coroutine: Coroutine[Any, Any, None],
          name: str) -> None:
    """Run ``coroutine`` until the node stops."""
    task = asyncio.get_running_loop().create_task(coroutine, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    exits.push_async_callback(stop)


# --- the node --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Foundation:
    """The stores, keys and CA hierarchy every later stage builds on."""

    keystore: KeyStore
    audit_log: AuditLog
    certs: CertificateStore
    hierarchy: Hierarchy
    policy: NamingPolicy
    signer: LeafSigner

    @property
    def audit(self) -> Audit:
        return self.audit_log.append_async


async def _foundation(cfg: Config, data: DataDirectory,
                      exits: contextlib.AsyncExitStack) -> _Foundation:
    """Stores and keys: the keystore, the audit log, the certificates, the hierarchy, and
    who signs leaves (the event loop, or ``ca.signing_workers`` processes)."""
    data.create()
    keystore = open_configured_keystore(cfg, data.root)
    exits.callback(keystore.close)
    audit_log = data.audit_log(signer=keystore.get_or_create(AUDIT_KEY))
    exits.callback(audit_log.close)  # signs its final checkpoint: before the keystore closes
    audit_log.append("node.started", {"mode": cfg.ca.mode, "config": cfg.source,
                                      "warnings": list(cfg.warnings)})
    exits.callback(audit_log.append, "node.stopped", {})
    certs = data.certificates()
    exits.callback(certs.close)
    hierarchy = open_ca(cfg, data, keystore, certs, audit_log,
                        create=cfg.ca.mode == "development")
    policy = NamingPolicy(domains=tuple(cfg.dns.domains.trustchain_domains),
                          allow_wildcards=cfg.ca.policy.allow_wildcards,
                          name_conflict=cfg.ca.policy.name_conflict)
    signer: LeafSigner = LocalSigner()
    if cfg.ca.signing_workers:
        workers = SigningWorkers(cfg.ca.signing_workers, keystore_settings(cfg, data.root))
        exits.push_async_callback(workers.close)
        await workers.warm_up()
        signer = workers
    return _Foundation(keystore=keystore, audit_log=audit_log, certs=certs,
                       hierarchy=hierarchy, policy=policy, signer=signer)


@dataclass(frozen=True)
class _Admitting:
    """What admits CA decisions: the four proofs and, with a chain, a committed block."""

    admission: Admission
    proofs: ConsensusService | None = None
    chain: ConsensusChain | None = None
    validator: _Validator | None = None


async def _admitting(cfg: Config, data: DataDirectory, base: _Foundation, parts: NodeParts,
                     router: Router, checks: dict[str, Callable[[], bool]],
                     exits: contextlib.AsyncExitStack) -> _Admitting:
    """Proofs (stake, beacons, the verifier) and the validator chain, as ``parts`` asks."""
    if not parts.proofs:
        return _Admitting(admission=LocalAdmission())
    development = cfg.ca.mode == "development"
    audit = base.audit
    validator: _Validator | None = None
    chain_store: ChainStore | None = None
    if parts.chain:
        validator = await _validator(cfg, base.keystore, audit)
        chain_store = data.chain()
        exits.callback(chain_store.close)
    params = proof_params(cfg)
    ledger = data.ledger()
    exits.callback(ledger.close)
    beacon_signer = await _key(base.keystore, BEACON_KEY, "ecdsa-p256-sha256", audit)
    beacons = _beacons(cfg, ledger, beacon_signer, chain_store, audit)
    verifier = ProofVerifier(params=params, ledger=ledger, beacons=beacons,
                             workers=cfg.consensus.verify_workers)
    exits.push_async_callback(verifier.close)
    stake = StakeLedger(ledger=ledger, audit=audit)
    await stake.apply_genesis(dict(cfg.consensus.genesis))
    if not isinstance(beacons, ChainBeacons):
        await beacons.current()
    four_proofs = FourProofAdmission(verifier=verifier, audit=audit)
    admission: Admission = four_proofs
    faucet: Faucet = LedgerFaucet(stake)
    chain: ConsensusChain | None = None
    if validator is not None and chain_store is not None:
        links = StoqPeerLinks(me=validator.me,
                              endpoints={v.id: (v.address, v.port)
                                         for v in validator.validators.validators},
                              engine=cfg.network.quic_engine)
        exits.push_async_callback(links.close)
        policy = base.policy
        rules = CaRules(check_csr=lambda csr: check_request(csr, policy),
                        verify_proofs=verifier.verify, set_stake=stake.set_stake,
                        development=development, minimum_stake=params.minimum_stake,
                        on_block=_beacon_updates(beacons),
                        cosign=validator.signer.sign if validator.me else None)
        chain = _chain(cfg, validator, chain_store, links, rules, audit)
        exits.push_async_callback(chain.stop)
        ChainService(chain, rules.checkpoints, validity=cfg.ca.cert_validity_days * 86400.0,
                     backdate=cfg.ca.backdate).register(router)
        running = chain
        checks["consensus"] = lambda: running.started and running.failure is None
        if validator.me is not None:
            timeout = cfg.consensus.finality_timeout
            admission = ConsensusAdmission(local=four_proofs, chain=chain, entry=validator.me,
                                           sign=validator.signer.sign, timeout=timeout)
            faucet = ChainFaucet(chain=chain, entry=validator.me, sign=validator.signer.sign,
                                 timeout=timeout)
    proofs = ConsensusService(stake=stake, beacons=beacons, verifier=verifier, params=params,
                              development=development, faucet=faucet)
    proofs.register(router)
    proofs.start()
    exits.push_async_callback(proofs.stop)
    if not development:
        # a production node starts its VDF worker now, so that the first requester of
        # an epoch does not wait for a process to start (development: at first use)
        await verifier.warm_up()
    if chain is not None:
        await chain.start()
    return _Admitting(admission=admission, proofs=proofs, chain=chain, validator=validator)


@dataclass(frozen=True)
class _Transparency:
    ct: CtService
    fingerprints: FingerprintService | None


def _transparency(cfg: Config, data: DataDirectory, base: _Foundation, admitting: _Admitting,
                  router: Router, exits: contextlib.AsyncExitStack) -> _Transparency:
    """The CT log, its ``ct.*`` ops, the fingerprint index and ``fp.watch``; with a chain,
    the checkpoints go to the validators for cosigning."""
    if cfg.ct.storage.backend != "filesystem":
        log.warning("ct.storage.backend %r is not implemented in this version; the tiles "
                    "go to the filesystem at %s", cfg.ct.storage.backend,
                    data.ct_tiles().directory)
    ct_db = data.ct_database()
    exits.callback(ct_db.close)
    watchers = FingerprintWatchers()
    ct_log = CtLog(tiles=data.ct_tiles(), db=ct_db, keystore=base.keystore,
                   origin=cfg.ct.log_id, max_entries_per_shard=cfg.ct.max_entries_per_shard,
                   batch_interval=cfg.ct.batch_interval, max_batch=cfg.ct.max_batch,
                   sth_interval=cfg.ct.merkle_update_interval,
                   feed_capacity=cfg.ct.subscription_buffer,
                   on_sequenced=[watchers.sequenced], clock=time.time)
    ct_log.open()
    hierarchy = base.hierarchy
    roots = [hierarchy.root_der, *_extra_roots(list(cfg.ct.extra_roots))]
    ct = CtService(ct_log, ChainValidator(roots, clock=time.time))
    ct.register(router)
    fingerprints: FingerprintService | None = None
    if cfg.ct.enable_realtime_fingerprinting:
        def issuer_der(name: str) -> bytes | None:
            return next((a.der for a in hierarchy.intermediates() if a.name == name), None)

        fingerprints = FingerprintService(db=ct_db, log=ct_log, certs=base.certs,
                                          issuer_der=issuer_der, watchers=watchers)
        exits.push_async_callback(fingerprints.close)
        fingerprints.register(router)
    ct_log.start()
    exits.push_async_callback(ct_log.stop)
    _task(exits, log_node_certificate(data.tls_credential(), ct), "ct-node-certificate")
    validator, chain = admitting.validator, admitting.chain
    if chain is not None and validator is not None and validator.me is not None:
        shards = ct_log.shards
        submitter = CheckpointSubmitter(
            chain=chain, checkpoints=lambda: [(s.origin, s.checkpoint) for s in shards],
            entry=validator.me, sign=validator.signer.sign,
            interval=max(1.0, cfg.ct.merkle_update_interval))
        submitter.start()
        exits.push_async_callback(submitter.stop)
    return _Transparency(ct=ct, fingerprints=fingerprints)


async def build_services(cfg: Config, data: DataDirectory, exits: contextlib.AsyncExitStack,
                         *, listen: Iterable[tuple[str, int]],
                         describe: Callable[[], dict[str, Any]],
                         accepting: Callable[[], bool], installed: Callable[[], None],
                         parts: NodeParts = EVERY_PART) -> Services:
    """Build every service of a node, in order; ``exits`` stops them in reverse.

    :param describe: the facts ``node.info`` reports (the shell knows the server).
    :param accepting: whether the server accepts requests (``node.health``).
    :param installed: called when the rotator installed a new TLS certificate.
    """
    base = await _foundation(cfg, data, exits)
    router = Router()
    checks: dict[str, Callable[[], bool]] = {"accepting": accepting}
    NodeService(describe=describe, checks=checks).register(router)
    admitting = await _admitting(cfg, data, base, parts, router, checks, exits)
    publishers: list[tuple[str, Publisher]] = []
    transparency = (_transparency(cfg, data, base, admitting, router, exits)
                    if parts.transparency else None)
    if transparency is not None and transparency.fingerprints is not None:
        publishers.append(("fingerprints", transparency.fingerprints))
    addresses = node_addresses(cfg, listen)
    dns: DnsService | None = None
    applications: list[tuple[str, stoq.DoqApplication]] = []
    if parts.dns and cfg.dns.enabled:
        dns, zones, application = _dns(cfg, data, base.keystore, base.certs, addresses, exits)
        dns.register(router)
        publishers.append(("dns", zones))
        applications.append((ALPN_DOQ, application))
    published = Publishers(publishers)
    checks["publishing"] = published.healthy
    ca = CertificateAuthority(
        hierarchy=base.hierarchy, certs=base.certs, policy=base.policy,
        admission=admitting.admission, audit=base.audit, signer=base.signer,
        transparency=transparency.ct if transparency else None, publishers=published,
        validity=cfg.ca.cert_validity_days * 86400.0, backdate=cfg.ca.backdate)
    ca.register(router)
    tls = data.tls_credential()
    rotator = Rotator(hierarchy=base.hierarchy, issue=ca.issue_node_certificate, tls=tls,
                      names=list(cfg.node.names), addresses=addresses, counts=ca.counts,
                      installed=installed)
    rotator.load_current()
    rotator.register(router)
    return Services(router=router, applications=tuple(applications), keystore=base.keystore,
                    audit=base.audit_log, hierarchy=base.hierarchy, ca=ca, rotator=rotator,
                    tls=tls, proofs=admitting.proofs, chain=admitting.chain,
                    ct=transparency.ct if transparency else None,
                    fingerprints=transparency.fingerprints if transparency else None, dns=dns)


def _beacon_updates(beacons: BeaconChain) -> Callable[[Block], Awaitable[None]] | None:
    """What a committed block does to the beacons: fixes the epoch's beacon in a cluster."""
    if not isinstance(beacons, ChainBeacons):
        return None

    async def on_block(block: Block) -> None:
        await beacons.on_block(block.time_ms, block.id)

    return on_block


def _dns(cfg: Config, data: DataDirectory, keystore: KeyStore, certs: CertificateStore,
         addresses: list[str], exits: contextlib.AsyncExitStack
         ) -> tuple[DnsService, TrustChainZones, stoq.DoqApplication]:
    """The zones, the answers, the ``dns.*`` ops and the DoQ application."""
    dns = cfg.dns
    keyring = KeyRing(keystore=keystore, schedule=data.dns_key_schedule(),
                      algorithm=dns.dnssec_algorithm, zsk_lifetime=dns.zsk_lifetime,
                      prepublish=dns.zsk_prepublish)
    forwarder = _forwarder(cfg)
    exits.push_async_callback(forwarder.close)
    settings = DnsSettings(
        domains=tuple(dns.domains.trustchain_domains),
        nameserver_addresses=tuple(dns.nameserver_addresses) or tuple(addresses),
        zone=ZoneSettings(record_ttl=int(dns.record_ttl), negative_ttl=int(dns.negative_ttl),
                          signature_validity=dns.signature_validity,
                          signature_refresh=dns.signature_refresh),
        enable_cert_validation=dns.enable_cert_validation)
    rendered = RenderedAnswers()
    zones = TrustChainZones(settings=settings, certs=certs, keyring=keyring,
                            registrations=data.dns_registrations(), rendered=rendered)
    zones.start()
    answers = DnsAnswers(zones=zones, forwarder=forwarder, rendered=rendered)
    application = stoq.DoqApplication(answers.answer_doq, stoq.DoqLimits(
        fin_timeout=dns.fin_timeout, max_pending=dns.max_pending_queries,
        rate_limit_per_minute=dns.rate_limit_per_minute,
        rate_limit_prefix_length=cfg.api.rate_limit_prefix_length))
    service = DnsService(zones=zones, answers=answers, forwarder=forwarder,
                         enable_cert_validation=dns.enable_cert_validation,
                         doq_stats=lambda: dataclasses.asdict(application.stats))
    _task(exits, zones.run(DNS_MAINTENANCE_INTERVAL), "dns-maintenance")
    return service, zones, application
