"""The composition root: one node's services, built in plain order.

stores and keys -> the replicated state and its CT log -> proofs -> publishers
(fingerprints, DNS) -> the state machine and the validator chain -> the ops
that submit decisions (CA, CT, DNS, stake) -> rotation -> router. Every
collaborator goes in through a constructor; nothing is changed on a service
after it is built. Whatever must be stopped or closed is pushed on one
:class:`contextlib.AsyncExitStack`, so the node stops in the reverse order of
this file.

A node is a validator of its cluster (or, alone, of a cluster of one): every
state change is a decision that a block commits and every validator executes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

import stoq
from handlers import NodeService, Router, cancel_and_wait
from handlers.ca import (
    ROOT_KEY,
    CertificateAuthority,
    Cluster,
    Hierarchy,
    HierarchyConfig,
    KeystoreSettings,
    LeafSigner,
    LocalSigner,
    NamingPolicy,
    Publisher,
    Publishers,
    Rotator,
    SigningWorkers,
)
from handlers.consensus import (
    BeaconChain,
    ChainBeacons,
    ChainFaucet,
    ChainService,
    CheckpointSubmitter,
    ConsensusChain,
    ConsensusService,
    Faucet,
    LinkVerifier,
    ProofVerifier,
    Sealer,
    SealOpener,
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
from handlers.replica import (
    CaRules,
    CaStateMachine,
    DecisionLog,
    KeysAnnouncer,
    ReplicaService,
    ValidatorDirectory,
    ValidatorKeys,
)
from protocol import Unavailable
from protocol.doq import ALPN_DOQ
from protocol.ops.consensus import ProofParams
from store import (
    Algorithm,
    AuditError,
    AuditLog,
    AuthorityStore,
    BeaconStore,
    ChainStore,
    DataDirectory,
    KeyStore,
    KeyStoreError,
    LockedBucket,
    Pkcs11KeyStore,
    S3Location,
    S3Objects,
    Signer,
    StateDatabase,
    TlsCredential,
    open_keystore,
)

from ._config import AuditStorageConfig, Config, ConfigError, parse_upstream
from ._peers import ServedTlsKeys, StoqPeerLinks

log = logging.getLogger("trustchain")

AUDIT_KEY = "audit"
BEACON_KEY = "beacon"
"""Keystore names of the keys that sign audit checkpoints and epoch beacons."""
DNS_MAINTENANCE_INTERVAL = 60.0
"""Seconds between passes that expire records, roll keys and refresh signatures."""

Audit = Callable[[str, dict[str, Any]], Any]


@dataclass(frozen=True, kw_only=True)
class Services:
    """What :func:`build_services` made: the router and the services a caller may ask."""

    router: Router
    applications: tuple[tuple[str, stoq.DoqApplication], ...]
    """``(alpn, application)`` pairs the server serves besides STOQ."""
    keystore: KeyStore
    audit: AuditLog
    hierarchy: Hierarchy
    state: StateDatabase
    machine: CaStateMachine
    ca: CertificateAuthority
    rotator: Rotator
    keys: KeysAnnouncer | None
    """None: this node follows the cluster without a validator key."""
    tls: TlsCredential
    proofs: ConsensusService
    chain: ConsensusChain
    ct: CtService
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
    """The node's data directory, with the CT tiles where ``ct.storage_path`` or
    ``ct.storage`` puts them.

    :raises ObjectStoreError: ``ct.storage`` is S3 and no AWS credentials are set.
    """
    configured = cfg.ct.storage_path
    return DataDirectory(data_dir, ct_directory=Path(configured) if configured else None,
                         ct_objects=ct_objects(cfg))


def ct_objects(cfg: Config) -> S3Objects | None:
    """The S3 bucket of the CT tiles (``ct.storage.backend = "s3"``), else None."""
    storage = cfg.ct.storage
    if storage.backend != "s3":
        return None
    return S3Objects(_s3_location(storage.bucket, storage.region, storage.endpoint,
                                  storage.prefix, storage.encryption))


def _s3_location(bucket: str, region: str, endpoint: str, prefix: str,
                 encryption: Literal["", "AES256", "aws:kms"] = "") -> S3Location:
    """Where a ``[*.storage]`` table points; an empty region is AWS's default one."""
    return S3Location(bucket=bucket, region=region or "us-east-1",
                      endpoint=endpoint or None, prefix=prefix,
                      encryption=encryption or None)


def audit_bucket(cfg: Config) -> LockedBucket | None:
    """The Object Lock bucket of ``[audit.storage]``; None with the filesystem backend.
    Credentials come from the standard AWS environment (never from the configuration).

    :raises ObjectStoreError: no AWS credentials.
    """
    if cfg.audit.storage.backend != "s3":
        return None
    return locked_bucket(cfg.audit.storage)


def locked_bucket(storage: AuditStorageConfig) -> LockedBucket:
    """The bucket ``storage`` names (``trustchain audit verify --from-s3`` reads it
    whatever the backend)."""
    where = _s3_location(storage.bucket, storage.region, storage.endpoint, storage.prefix)
    return LockedBucket(where, mode="GOVERNANCE" if storage.mode == "governance"
                        else "COMPLIANCE")


async def _key(keystore: KeyStore, name: str, algorithm: Algorithm, audit: Audit) -> Signer:
    """The keystore's key ``name``, created (and the creation audited) if missing."""
    signer = keystore.get(name)
    if signer is None:
        signer = keystore.create(name, algorithm)
        await audit("key.generated", {"name": name, "algorithm": signer.algorithm,
                                      "keystore": keystore.kind})
    return signer


def root_key_name(cfg: Config, keystore: KeyStore) -> str:
    """The keystore name of the root key: ``root``, or the key ``ca.hsm.root_key_id``
    names: its label, or else, written ``0x`` and hex digits, its PKCS#11 CKA_ID.

    :raises ConfigError: the id names no key of the token.
    """
    wanted = cfg.ca.hsm.root_key_id
    if not wanted:
        return ROOT_KEY
    if keystore.get(wanted) is not None:
        return wanted
    if re.fullmatch(r"0x([0-9a-fA-F]{2})+", wanted) and isinstance(keystore, Pkcs11KeyStore):
        label = keystore.label_of_id(bytes.fromhex(wanted[2:]))
        if label is not None:
            return label
    raise ConfigError(f"ca.hsm.root_key_id: {wanted!r} is neither the label nor the CKA_ID "
                      f"(0x...) of a private key in the {keystore.kind} keystore; the root "
                      "key must exist already (empty: the CA makes its own key `root`)")


def ca_hierarchy(cfg: Config, data: DataDirectory, keystore: KeyStore,
                 authorities: AuthorityStore, audit: AuditLog) -> Hierarchy:
    """The CA hierarchy of ``data``, not loaded yet (``ensure`` loads or creates it)."""
    config = HierarchyConfig(ca_id=cfg.ca.ca_id, domains=tuple(cfg.dns.domains.trustchain_domains),
                             root_lifetime=cfg.ca.root_lifetime,
                             intermediate_lifetime=cfg.ca.intermediate_lifetime,
                             root_key=root_key_name(cfg, keystore),
                             root_key_given=bool(cfg.ca.hsm.root_key_id))
    return Hierarchy(keystore=keystore, authorities=authorities,
                     root_file=data.root_certificate(), admin=data.admin_credential(),
                     config=config, clock=time.time, audit=audit.append)


def open_ca(cfg: Config, data: DataDirectory, keystore: KeyStore, authorities: AuthorityStore,
            audit: AuditLog, *, create: bool) -> Hierarchy:
    """Load the CA hierarchy; create it if ``create`` (development, or ``init``).

    :raises ConfigError: there is no CA and ``create`` is false (production).
    """
    hierarchy = ca_hierarchy(cfg, data, keystore, authorities, audit)
    if not create and authorities.active_authority("root") is None:
        raise ConfigError(f"no CA in {data.root}: production mode does not create one by "
                          "itself; run `trustchain init` first")
    hierarchy.ensure()
    if create:
        hierarchy.ensure_admin()
    return hierarchy


@dataclass(frozen=True)
class CaStores:
    """A CA's keystore, authority database and audit log, open without a node."""

    keystore: KeyStore
    authorities: AuthorityStore
    audit: AuditLog


@contextlib.contextmanager
def open_ca_stores(cfg: Config, data: DataDirectory) -> Iterator[CaStores]:
    """The CA's stores of ``data`` for a command that runs no node (``trustchain init``,
    ``cluster init``); closed in order: the audit log signs its final checkpoint before
    the keystore closes."""
    with data.lock():
        yield from _open_ca_stores(cfg, data)


def _open_ca_stores(cfg: Config, data: DataDirectory) -> Iterator[CaStores]:
    keystore = open_configured_keystore(cfg, data.root)
    try:
        authorities = data.authorities()
        try:
            audit = data.audit_log(signer=keystore.get_or_create(AUDIT_KEY))
            try:
                yield CaStores(keystore=keystore, authorities=authorities, audit=audit)
            finally:
                audit.close()
        finally:
            authorities.close()
    finally:
        keystore.close()


def node_addresses(cfg: Config, listen: Iterable[tuple[str, int]]) -> list[str]:
    """The addresses the node's certificate names: configured, or those it listens on."""
    return list(cfg.node.addresses) or sorted({h for h, _ in listen if h != "::"} | {"::1"})


# --- the validator set --------------------------------------------------------------------


def proof_params(cfg: Config) -> ProofParams:
    """The proof parameters the configuration asks for."""
    consensus = cfg.consensus
    mode = cfg.ca.mode
    return ProofParams(minimum_stake=consensus.minimum_stake,
                       minimum_work_difficulty=consensus.minimum_work_difficulty,
                       plot_size=consensus.resolved_plot_size(mode),
                       vdf_iterations=consensus.resolved_vdf_iterations(mode),
                       epoch_length=int(consensus.epoch_length))


@dataclass(frozen=True)
class ValidatorIdentity:
    """This node as a validator: its key, the set, and the names each may certify."""

    signer: Signer
    own_id: str
    me: str | None
    """``own_id`` if the set holds it; None: the node follows without voting."""
    validators: ValidatorSet
    labels: dict[str, str]
    node_names: dict[str, frozenset[str]]
    """validator id -> the names (and addresses) its own TLS certificate may carry."""


def validator_set(cfg: Config, own_key: bytes, addresses: list[str]
                  ) -> tuple[ValidatorSet, dict[str, str], dict[str, frozenset[str]]]:
    """The configured validators (or this node alone), their labels and their names."""
    configured = cfg.consensus.validators
    if not configured:
        me = Validator(own_key, 1, "::1", 0)
        return (ValidatorSet((me,)), {me.id: "self"},
                {me.id: frozenset([*cfg.node.names, *addresses])})
    validators = tuple(Validator(bytes.fromhex(v.public_key), v.power, v.address, v.port)
                       for v in configured)
    labels = {v.id: c.name or v.id[:8] for v, c in zip(validators, configured, strict=True)}
    names = {v.id: frozenset([*c.names, c.address])
             for v, c in zip(validators, configured, strict=True)}
    return ValidatorSet(validators), labels, names


async def validator_identity(cfg: Config, keystore: KeyStore, addresses: list[str],
                             audit: Audit) -> ValidatorIdentity:
    consensus = cfg.consensus
    signer = await _key(keystore, consensus.validator_key, "ed25519", audit)
    if signer.algorithm != "ed25519":
        raise ConfigError(f"the validator key {consensus.validator_key!r} must be Ed25519")
    own_key = signer.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    validators, labels, names = validator_set(cfg, own_key, addresses)
    own_id = validator_id(own_key)
    me: str | None = own_id
    if own_id not in validators.by_id:
        log.warning("this node's validator key is not in consensus.validators: it follows "
                    "the chain without voting", extra={"validator": own_id})
        me = None
    return ValidatorIdentity(signer=signer, own_id=own_id, me=me, validators=validators,
                             labels=labels, node_names=names)


def _beacons(cfg: Config, store: BeaconStore, signer: Signer, chain_store: ChainStore,
             audit: Audit) -> BeaconChain:
    """A cluster's epoch beacon is its first committed block of the epoch; a node
    alone draws and signs its own."""
    epoch_length = int(cfg.consensus.epoch_length)
    if len(cfg.consensus.validators) > 1:
        def first_block_at(time_ms: int) -> tuple[int, bytes] | None:
            stored = chain_store.first_at_or_after(time_ms)
            return None if stored is None else (stored.time_ms, stored.id)

        return ChainBeacons(first_block_at=first_block_at, store=store, signer=signer,
                            epoch_length=epoch_length, audit=audit)
    return BeaconChain(store=store, signer=signer, epoch_length=epoch_length, audit=audit)


def _chain(cfg: Config, validator: ValidatorIdentity, store: ChainStore, links: StoqPeerLinks,
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
        max_frame_size=cfg.network.max_frame_size, names=validator.labels, audit=audit,
        seals=rules.seals)  # a group's signature: verified once, for its decisions too


def _beacon_updates(beacons: BeaconChain) -> Callable[[Block], Coroutine[Any, Any, None]] | None:
    if not isinstance(beacons, ChainBeacons):
        return None

    async def on_block(block: Block) -> None:
        await beacons.on_block(block.time_ms, block.id)

    return on_block


# --- certificate transparency and DNS -----------------------------------------------------


def _extra_roots(paths: list[str]) -> list[bytes]:
    roots: list[bytes] = []
    for i, path in enumerate(paths):
        try:
            certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ct.extra_roots[{i}]: cannot load {path}: {exc}") from exc
        roots += [c.public_bytes(serialization.Encoding.DER) for c in certs]
    return roots


def _forwarder(cfg: Config) -> Forwarder:
    dns_cfg = cfg.dns
    upstreams = []
    for i, text in enumerate(dns_cfg.upstream_servers):
        protocol, address, port, name = parse_upstream(text, f"dns.upstream_servers[{i}]")
        upstreams.append(Upstream("doq" if protocol == "doq" else "udp", address, port, name))
    return Forwarder(upstreams, cache=AnswerCache(dns_cfg.cache_size, dns_cfg.cache_ttl),
                     cafile=dns_cfg.upstream_cafile, timeout=dns_cfg.upstream_timeout)


def _zones(cfg: Config, state: StateDatabase, keyring: KeyRing, rendered: RenderedAnswers,
           addresses: list[str], directory: ValidatorDirectory) -> TrustChainZones:
    dns_cfg = cfg.dns
    settings = DnsSettings(
        domains=tuple(dns_cfg.domains.trustchain_domains),
        nameserver_addresses=tuple(dns_cfg.nameserver_addresses) or tuple(addresses),
        zone=ZoneSettings(record_ttl=int(dns_cfg.record_ttl),
                          negative_ttl=int(dns_cfg.negative_ttl),
                          signature_validity=dns_cfg.signature_validity,
                          signature_refresh=dns_cfg.signature_refresh),
        enable_cert_validation=dns_cfg.enable_cert_validation)
    return TrustChainZones(settings=settings, state=state, keyring=keyring, rendered=rendered,
                           cosigners=directory.dnskeys)


def _task(exits: contextlib.AsyncExitStack, coroutine: Coroutine[Any, Any, None],
          name: str) -> None:
    """Run ``coroutine`` until the node stops."""
    task = asyncio.get_running_loop().create_task(coroutine, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    exits.push_async_callback(stop)


def local_keys(hierarchy: Hierarchy, ct_log: CtLog, keyring: KeyRing | None,
               clock: Callable[[], float] = time.time) -> Callable[[int], ValidatorKeys]:
    """What this validator signs with now, as a ``keys`` decision stamped ``at_ms``."""
    def keys(at_ms: int) -> ValidatorKeys:
        intermediates = sorted(hierarchy.intermediates(), key=lambda a: a.created_at)
        active = hierarchy.issuer
        ders = [a.der for a in intermediates if a.not_after > clock()
                and (active is None or a.der != active.der)]
        if active is not None:
            ders.append(active.der)
        logs = tuple((s.number, s.public_key_der()) for s in ct_log.shards)
        dnskeys: tuple[bytes, ...] = ()
        if keyring is not None:
            dnskeys = tuple(sorted(k.dnskey.to_digestable() for k in keyring.published(clock())))
        admins = tuple(a.der for a in hierarchy.authorities.authorities("admin"))
        return ValidatorKeys(intermediates=tuple(ders), ct_logs=logs, dnskeys=dnskeys,
                             admins=admins, at_ms=at_ms)
    return keys


# --- the node --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Foundation:
    """Keys, the audit log, the CA hierarchy, this node as a validator, the router."""

    development: bool
    lifetime: float
    addresses: list[str]
    keystore: KeyStore
    audit_log: AuditLog
    audit: Audit
    hierarchy: Hierarchy
    policy: NamingPolicy
    signer: LeafSigner
    validator: ValidatorIdentity
    router: Router
    checks: dict[str, Callable[[], str | None]]


def _record_stop(audit_log: AuditLog) -> None:
    """``node.stopped`` in the audit log; a log that failed earlier does not stop the stop."""
    try:
        audit_log.append("node.stopped", {})
    except AuditError as exc:
        log.error("node.stopped not audited: %s", exc)


async def _foundation(cfg: Config, data: DataDirectory, exits: contextlib.AsyncExitStack,
                      addresses: list[str], describe: Callable[[], dict[str, Any]],
                      accepting: Callable[[], bool], check_audit_log: bool) -> _Foundation:
    development = cfg.ca.mode == "development"
    data.create()
    keystore = open_configured_keystore(cfg, data.root)
    exits.callback(keystore.close)
    archive = audit_bucket(cfg)
    if archive is not None:  # a bucket without Object Lock is not immutable storage
        await asyncio.to_thread(archive.check_lock)
    audit_log = data.audit_log(signer=keystore.get_or_create(AUDIT_KEY),
                               check_all=check_audit_log, archive=archive,
                               retention=cfg.audit.storage.retention)
    exits.callback(audit_log.close)  # signs its final checkpoint: before the keystore closes
    audit_log.append("node.started", {"mode": cfg.ca.mode, "config": cfg.source,
                                      "warnings": list(cfg.warnings)})
    exits.callback(_record_stop, audit_log)
    signing = asyncio.get_running_loop().create_task(
        audit_log.sign_tail_every(cfg.audit.checkpoint_interval))
    exits.push_async_callback(cancel_and_wait, signing)  # stops before the final checkpoint
    audit = audit_log.append_async
    authorities = data.authorities()
    exits.callback(authorities.close)
    hierarchy = open_ca(cfg, data, keystore, authorities, audit_log, create=development)
    policy = NamingPolicy(domains=tuple(cfg.dns.domains.trustchain_domains),
                          allow_wildcards=cfg.ca.policy.allow_wildcards,
                          name_conflict=cfg.ca.policy.name_conflict)
    signer: LeafSigner = LocalSigner()
    if cfg.ca.signing_workers:
        workers = SigningWorkers(cfg.ca.signing_workers, keystore_settings(cfg, data.root))
        exits.push_async_callback(workers.close)
        await workers.warm_up()
        signer = workers
    validator = await validator_identity(cfg, keystore, addresses, audit)
    router = Router()
    checks: dict[str, Callable[[], str | None]] = {
        "accepting": lambda: None if accepting() else "the server does not accept requests "
                                                      "(starting or shutting down)",
        "audit": audit_log.problem}
    NodeService(describe=describe, checks=checks).register(router)
    return _Foundation(development=development, lifetime=cfg.ca.cert_validity_days * 86400.0,
                       addresses=addresses, keystore=keystore, audit_log=audit_log,
                       audit=audit, hierarchy=hierarchy, policy=policy, signer=signer,
                       validator=validator, router=router, checks=checks)


@dataclass(frozen=True)
class _Replicated:
    """The replicated state, this validator's CT log of it, and the proof verifier."""

    state: StateDatabase
    watchers: FingerprintWatchers
    ct_log: CtLog
    chains: ChainValidator
    params: ProofParams
    chain_store: ChainStore
    beacons: BeaconChain | ChainBeacons
    verifier: ProofVerifier


async def _replicated(cfg: Config, data: DataDirectory, exits: contextlib.AsyncExitStack,
                      base: _Foundation) -> _Replicated:
    state = data.state()
    exits.callback(state.close)
    tiles = data.ct_tiles()
    await asyncio.to_thread(tiles.objects.check)
    watchers = FingerprintWatchers()
    ct_log = CtLog(tiles=tiles, state=state, keystore=base.keystore,
                   origin=cfg.ct.log_id, max_entries_per_shard=cfg.ct.max_entries_per_shard,
                   sth_interval=cfg.ct.merkle_update_interval,
                   feed_capacity=cfg.ct.subscription_buffer,
                   on_sequenced=[watchers.sequenced], clock=time.time)
    ct_log.open()
    chains = ChainValidator([base.hierarchy.root_der, *_extra_roots(list(cfg.ct.extra_roots))],
                            clock=time.time)
    # proofs: beacons and the verifier, on the replicated stake and used work
    params = proof_params(cfg)
    chain_store = data.chain()
    exits.callback(chain_store.close)
    beacon_store = data.beacons()
    exits.callback(beacon_store.close)
    beacon_signer = await _key(base.keystore, BEACON_KEY, "ecdsa-p256-sha256", base.audit)
    beacons = _beacons(cfg, beacon_store, beacon_signer, chain_store, base.audit)
    verifier = ProofVerifier(params=params, ledger=state, beacons=beacons,
                             workers=cfg.consensus.verify_workers, audit=base.audit)
    exits.push_async_callback(verifier.close)
    return _Replicated(state=state, watchers=watchers, ct_log=ct_log, chains=chains,
                       params=params, chain_store=chain_store, beacons=beacons,
                       verifier=verifier)


@dataclass(frozen=True)
class _Publishing:
    """What hears of every committed certificate: fingerprints and the DNS zones."""

    directory: ValidatorDirectory
    fingerprints: FingerprintService | None
    keyring: KeyRing | None
    zones: TrustChainZones | None
    rendered: RenderedAnswers
    published: Publishers


def _publishing(cfg: Config, data: DataDirectory, base: _Foundation,
                replicated: _Replicated) -> _Publishing:
    directory = ValidatorDirectory()
    publishers: list[tuple[str, Publisher]] = []
    fingerprints: FingerprintService | None = None
    if cfg.ct.enable_realtime_fingerprinting:
        fingerprints = FingerprintService(
            state=replicated.state, log=replicated.ct_log, watchers=replicated.watchers,
            issuer_der=lambda fp: _intermediate_der(directory, fp),
            log_key=lambda log_id: _log_key(directory, log_id))
        publishers.append(("fingerprints", fingerprints))
    keyring: KeyRing | None = None
    zones: TrustChainZones | None = None
    rendered = RenderedAnswers()
    if cfg.dns.enabled:
        dns_cfg = cfg.dns
        keyring = KeyRing(keystore=base.keystore, schedule=data.dns_key_schedule(),
                          algorithm=dns_cfg.dnssec_algorithm, zsk_lifetime=dns_cfg.zsk_lifetime,
                          prepublish=dns_cfg.zsk_prepublish)
        zones = _zones(cfg, replicated.state, keyring, rendered, base.addresses, directory)
        zones.start()
        publishers.append(("dns", zones))
    published = Publishers(publishers)
    base.checks["publishing"] = published.problem
    if zones is not None:
        base.checks["dns"] = zones.problem
    return _Publishing(directory=directory, fingerprints=fingerprints, keyring=keyring,
                       zones=zones, rendered=rendered, published=published)


@dataclass(frozen=True)
class _Cluster:
    """The state machine, the validator chain that feeds it, and what submits to it."""

    machine: CaStateMachine
    chain: ConsensusChain
    replica: ReplicaService
    decisions: DecisionLog | None


async def _cluster(cfg: Config, data: DataDirectory, exits: contextlib.AsyncExitStack,
                   base: _Foundation, replicated: _Replicated,
                   publishing: _Publishing) -> _Cluster:
    validator, params = base.validator, replicated.params
    machine = CaStateMachine(
        state=replicated.state, ct=replicated.ct_log, chains=replicated.chains,
        policy=base.policy, root_der=base.hierarchy.root_der,
        node_names=validator.node_names, publishers=publishing.published,
        audit=base.audit_log.append_all_async,
        epoch_length=params.epoch_length, lifetime=base.lifetime, backdate=cfg.ca.backdate,
        minimum_stake=params.minimum_stake, development=base.development,
        directory=publishing.directory, me=validator.own_id)
    await machine.open(dict(cfg.consensus.genesis))
    if machine.corrupt is not None:
        log.critical("%s; this validator will not vote (rebuild its state from the blocks)",
                     machine.corrupt)
    rules = CaRules(machine=machine, policy=base.policy, verify_proofs=replicated.verifier.verify,
                    chains=replicated.chains,
                    root=x509.load_der_x509_certificate(base.hierarchy.root_der),
                    node_names=validator.node_names, lifetime=base.lifetime,
                    backdate=cfg.ca.backdate, development=base.development,
                    minimum_stake=params.minimum_stake,
                    seals=SealOpener(),
                    cosign=validator.signer.sign if validator.me else None,
                    on_block=_beacon_updates(replicated.beacons))
    voting = validator if machine.corrupt is None else dataclasses.replace(validator, me=None)
    links = StoqPeerLinks(chain_id=cfg.consensus.chain_id, me=voting.me,
                          sign=validator.signer.sign if voting.me else None,
                          validators=validator.validators,
                          endpoints={v.id: (v.address, v.port)
                                     for v in validator.validators.validators},
                          engine=cfg.network.quic_engine)
    exits.push_async_callback(links.close)
    chain = _chain(cfg, voting, replicated.chain_store, links, rules, base.audit)
    exits.push_async_callback(chain.stop)
    decisions: DecisionLog | None = None
    if voting.me is not None:
        decisions = DecisionLog(chain=chain, machine=machine,
                                sealer=Sealer(entry=voting.me, sign=validator.signer.sign),
                                timeout=cfg.consensus.finality_timeout)
    replica = ReplicaService(machine=machine, decisions=decisions)
    replica.register(base.router)
    ChainService(chain, machine.checkpoints,
                 links=LinkVerifier(chain_id=chain.chain_id,
                                    validators=lambda: chain.core.validators),
                 tls_keys=ServedTlsKeys(data.tls_credential()),
                 state_status=lambda: {**replica.status(), "links": dict(links.refused)},
                 ).register(base.router)
    base.checks["consensus"] = lambda: consensus_problem(chain, machine)
    return _Cluster(machine=machine, chain=chain, replica=replica, decisions=decisions)


def consensus_problem(chain: ConsensusChain, machine: CaStateMachine) -> str | None:
    """None if this validator runs the chain and executes it, else why not (the
    ``consensus`` health check)."""
    if chain.failure is not None:
        return f"consensus has stopped: {chain.failure}"
    if not chain.started:
        return "consensus is not running"
    if chain.diverged is not None:
        return f"this validator diverged from the chain: {chain.diverged}"
    if machine.corrupt is not None:
        return f"the replicated state is corrupt: {machine.corrupt}"
    return None


def _dns_service(cfg: Config, exits: contextlib.AsyncExitStack, base: _Foundation,
                 publishing: _Publishing, decisions: DecisionLog | None
                 ) -> tuple[DnsService | None, list[tuple[str, stoq.DoqApplication]]]:
    """The ``dns.*`` ops and the DoQ application, when the node serves DNS."""
    zones = publishing.zones
    if zones is None:
        return None, []
    forwarder = _forwarder(cfg)
    exits.push_async_callback(forwarder.close)
    answers = DnsAnswers(zones=zones, forwarder=forwarder, rendered=publishing.rendered)
    application = stoq.DoqApplication(answers.answer_doq, stoq.DoqLimits(
        fin_timeout=cfg.dns.fin_timeout, max_pending=cfg.dns.max_pending_queries,
        rate_limit_per_minute=cfg.dns.rate_limit_per_minute,
        rate_limit_prefix_length=cfg.api.rate_limit_prefix_length))
    dns_service = DnsService(zones=zones, answers=answers, forwarder=forwarder,
                             decisions=decisions,
                             enable_cert_validation=cfg.dns.enable_cert_validation,
                             doq_stats=lambda: dataclasses.asdict(application.stats))
    dns_service.register(base.router)
    _task(exits, zones.run(DNS_MAINTENANCE_INTERVAL), "dns-maintenance")
    return dns_service, [(ALPN_DOQ, application)]


async def _start(cfg: Config, exits: contextlib.AsyncExitStack, base: _Foundation,
                 replicated: _Replicated, chain: ConsensusChain, proofs: ConsensusService,
                 keys: KeysAnnouncer | None, decisions: DecisionLog | None) -> None:
    """Run the beacons, the chain (it executes any stored block first), the CT heads, the
    key announcements and the checkpoints."""
    proofs.start()
    exits.push_async_callback(proofs.stop)
    if not base.development:
        # a production node starts its VDF worker now, so that the first requester of
        # an epoch does not wait for a process to start (development: at first use)
        await replicated.verifier.warm_up()
    await chain.start()
    if not isinstance(replicated.beacons, ChainBeacons):
        await replicated.beacons.current()
    ct_log = replicated.ct_log
    ct_log.start()
    exits.push_async_callback(ct_log.stop)
    if keys is not None and decisions is not None:
        keys.start()
        exits.push_async_callback(keys.stop)
        shards = ct_log.shards
        submitter = CheckpointSubmitter(
            chain=chain, checkpoints=lambda: [(s.origin, s.checkpoint) for s in shards],
            sealer=decisions.sealer,
            interval=max(1.0, cfg.ct.merkle_update_interval))
        submitter.start()
        exits.push_async_callback(submitter.stop)


async def build_services(cfg: Config, data: DataDirectory, exits: contextlib.AsyncExitStack,
                         *, listen: Iterable[tuple[str, int]],
                         describe: Callable[[], dict[str, Any]],
                         accepting: Callable[[], bool],
                         installed: Callable[[], None],
                         check_audit_log: bool = False) -> Services:
    """Build every service of a node, in order; ``exits`` stops them in reverse.

    Stages: the foundation (keys, audit, hierarchy, validator) → the replicated state,
    its CT log and the proof verifier → the publishers → the state machine and the
    chain → the services that submit decisions (proofs, CT, DNS, the CA) → running.

    :param describe: the facts ``node.info`` reports (the shell knows the server).
    :param accepting: whether the server accepts requests (``node.health``).
    :param installed: called when the rotator installed a new TLS certificate.
    :param check_audit_log: verify the whole audit chain at start, not only the records
        from the last signed checkpoint.
    """
    exits.enter_context(data.lock())  # before anything is opened: one node per directory
    base = await _foundation(cfg, data, exits, node_addresses(cfg, listen), describe,
                             accepting, check_audit_log)
    replicated = await _replicated(cfg, data, exits, base)
    publishing = _publishing(cfg, data, base, replicated)
    cluster = await _cluster(cfg, data, exits, base, replicated, publishing)
    chain, decisions, directory = cluster.chain, cluster.decisions, publishing.directory
    hierarchy, ct_log, router = base.hierarchy, replicated.ct_log, base.router

    # what submits decisions: stake, CT, DNS, the CA
    faucet: Faucet = _NoFaucet()
    if decisions is not None:
        faucet = ChainFaucet(chain=chain, sealer=decisions.sealer,
                             timeout=cfg.consensus.finality_timeout)
    proofs = ConsensusService(stake=replicated.state, beacons=replicated.beacons,
                              verifier=replicated.verifier, params=replicated.params,
                              development=base.development, faucet=faucet)
    proofs.register(router)
    ct = CtService(ct_log, replicated.chains, decisions=decisions, watch=cluster.replica)
    ct.register(router)
    if publishing.fingerprints is not None:
        publishing.fingerprints.register(router)
    dns_service, applications = _dns_service(cfg, exits, base, publishing, decisions)
    keys: KeysAnnouncer | None = None
    if decisions is not None:
        keys = KeysAnnouncer(log_=decisions,
                             local=local_keys(hierarchy, ct_log, publishing.keyring),
                             active=lambda: hierarchy.issuer.der if hierarchy.issuer else b"")
    ca = CertificateAuthority(
        hierarchy=hierarchy, state=replicated.state, policy=base.policy,
        decisions=decisions if decisions is not None else _Observer(),
        proofs=replicated.verifier, transparency=ct_log,
        cluster=Cluster(intermediate=lambda fp: _intermediate_der(directory, fp),
                        intermediates=lambda: [i.der for i in directory.intermediates()],
                        ready=keys.ready if keys is not None else lambda: False,
                        announce=keys.announce if keys is not None else _follower_cannot_announce,
                        admins=directory.admins),
        audit=base.audit, signer=base.signer, lifetime=base.lifetime,
        backdate=cfg.ca.backdate)
    ca.register(router)
    tls = data.tls_credential()
    rotator = Rotator(hierarchy=hierarchy, issue=ca.issue_node_certificate, tls=tls,
                      names=list(cfg.node.names), addresses=base.addresses,
                      rotation_interval=cfg.ca.rotation_interval, counts=ca.counts,
                      installed=installed,
                      announce=keys.announce if keys is not None else None)
    rotator.load_current()
    rotator.register(router)
    base.checks["ct"] = ct_log.problem
    base.checks["fingerprints"] = ct_log.listener_problem
    base.checks["rotation"] = rotator.problem

    await _start(cfg, exits, base, replicated, chain, proofs, keys, decisions)
    return Services(router=router, applications=tuple(applications), keystore=base.keystore,
                    audit=base.audit_log, hierarchy=hierarchy, state=replicated.state,
                    machine=cluster.machine, ca=ca, rotator=rotator, keys=keys, tls=tls,
                    proofs=proofs, chain=chain, ct=ct, fingerprints=publishing.fingerprints,
                    dns=dns_service)


def _intermediate_der(directory: ValidatorDirectory, fingerprint: str) -> bytes | None:
    found = directory.intermediate(fingerprint)
    return None if found is None else found.der


def _log_key(directory: ValidatorDirectory, log_id: bytes) -> tuple[int, Any] | None:
    found = directory.log_key(log_id)
    if found is None:
        return None
    _, shard, spki = found
    return shard, serialization.load_der_public_key(spki)


FOLLOWER = ("this node follows the cluster without a validator key and submits no "
            "decisions; ask a validator")
"""Why a follower refuses every op that changes the CA's state: ``unavailable``, the code
``ct.add-chain`` and ``dns.register`` give it too (spec/stoq.md §8.2)."""


async def _follower_cannot_announce() -> None:
    raise Unavailable(FOLLOWER)


class _NoFaucet:
    """A node without a validator key cannot credit stake."""

    async def credit(self, key_id: str, amount: int) -> None:
        raise Unavailable(FOLLOWER)


class _Observer:
    """A node without a validator key submits nothing."""

    async def commit(self, decision: Any, *, checked: bool = False) -> Any:
        raise Unavailable(FOLLOWER)

    def now_ms(self) -> int:
        return int(time.time() * 1000)

