"""Certificate authorities for tests.

- :func:`make_ca`: a test CA outside TrustChain, a root and an intermediate that make
  chains and precertificates for the CT log (``ct.add-chain`` with ``ct.extra_roots``).
- :func:`open_replica`: the replicated state of one validator, a real
  :class:`handlers.replica.CaStateMachine` on real stores in a directory, for tests
  that hand it blocks themselves.
- :func:`open_validator`: a TrustChain CA of one validator without a socket, composed
  as ``trustchain._compose`` composes a node (hierarchy, state machine, rules, the
  consensus chain of one, decisions, proofs, the CA), with an injected clock and the
  publishers a test chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from handlers.ca import (
    CertificateAuthority,
    Cluster,
    Hierarchy,
    HierarchyConfig,
    LocalSigner,
    NamingPolicy,
    Publishers,
)
from handlers.consensus import BeaconChain, ConsensusChain, ProofVerifier, Sealer, SealOpener
from handlers.consensus.bft import Validator, ValidatorSet
from handlers.consensus.bft._core import Timeouts
from handlers.ct import ChainValidator, CtLog
from handlers.replica import CaRules, CaStateMachine, DecisionLog, KeysAnnouncer
from protocol.ops.consensus import Operation, ProofParams
from store import AuditLog, DataDirectory, KeyStore, Signer, StateDatabase, open_keystore
from trustchain._compose import local_keys
from trustchain._peers import StoqPeerLinks

DER = serialization.Encoding.DER


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


@dataclass
class CaForTests:
    """A root and an intermediate, for making chains the log accepts."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(DER)

    @property
    def der(self) -> bytes:
        return self.intermediate.public_bytes(DER)

    @property
    def signer(self) -> Any:
        ca = self

        class _Signer:
            def private_key(self) -> ec.EllipticCurvePrivateKey:
                return ca.key
        return _Signer()

    def leaf_builder(self, *names: str, not_before: float | None = None,
                     lifetime: float = 86400.0) -> x509.CertificateBuilder:
        now = not_before if not_before is not None else datetime.datetime.now(
            datetime.UTC).timestamp() - 60
        key = ec.generate_private_key(ec.SECP256R1())
        return (x509.CertificateBuilder().subject_name(_name(names[0]))
                .issuer_name(self.intermediate.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_utc(now)).not_valid_after(_utc(now + lifetime))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True))

    def leaf(self, *names: str, **kwargs: Any) -> bytes:
        return self.leaf_builder(*names, **kwargs).sign(self.key, hashes.SHA256()).public_bytes(DER)

    def precert(self, *names: str) -> tuple[bytes, x509.CertificateBuilder]:
        builder = self.leaf_builder(*names)
        pre = builder.add_extension(x509.PrecertPoison(), critical=True).sign(
            self.key, hashes.SHA256())
        return pre.public_bytes(DER), builder


def make_ca(cn: str = "Test") -> CaForTests:
    now = datetime.datetime.now(datetime.UTC).timestamp()
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(_name(f"{cn} Root"))
            .issuer_name(_name(f"{cn} Root")).public_key(root_key.public_key())
            .serial_number(1).not_valid_before(_utc(now - 3600))
            .not_valid_after(_utc(now + 86400 * 30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    inter = (x509.CertificateBuilder().subject_name(_name(f"{cn} Issuing"))
             .issuer_name(root.subject).public_key(key.public_key())
             .serial_number(2).not_valid_before(_utc(now - 3600))
             .not_valid_after(_utc(now + 86400 * 30))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(root_key, hashes.SHA256()))
    return CaForTests(root_key=root_key, root=root, key=key, intermediate=inter)


# --- TrustChain's own CA, replicated, one validator ------------------------------------------

DOMAINS = ("trust", "hypermesh")
PARAMS = ProofParams(minimum_stake=1000, minimum_work_difficulty=8, plot_size=18,
                     vdf_iterations=1000, epoch_length=3600)
"""The proof parameters of the tests' configuration (``tests.helpers.config_text``)."""
LIFETIME = 86400.0
BACKDATE = 300.0


class Clock:
    """A wall clock that moves only when the test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class ReplicaForTests:
    """One validator's replicated state: its state machine on its own software keystore
    (CT log keys), audit log, state database and CT tiles."""

    data: DataDirectory
    keystore: KeyStore
    audit: AuditLog
    state: StateDatabase
    ct: CtLog
    machine: CaStateMachine

    async def close(self) -> None:
        """Close every store, in the order a node does (the audit log before its key)."""
        await self.ct.stop()
        self.state.close()
        self.audit.close()
        self.keystore.close()


def open_stores(directory: Path, clock: Callable[[], float]
                ) -> tuple[DataDirectory, KeyStore, AuditLog]:
    """The data directory, software keystore and audit log of a node in ``directory``."""
    data = DataDirectory(directory)
    data.create()
    keystore = open_keystore(provider="software", data_dir=directory)
    audit = AuditLog(data.audit_path, signer=keystore.get_or_create("audit"), clock=clock)
    return data, keystore, audit


def open_hierarchy(data: DataDirectory, keystore: KeyStore, audit: AuditLog,
                   clock: Callable[[], float], *,
                   intermediate_lifetime: float = 90 * 86400.0) -> Hierarchy:
    """A root and an issuing intermediate in ``keystore``, created on first use."""
    hierarchy = Hierarchy(keystore=keystore, authorities=data.authorities(),
                          root_file=data.root_certificate(), admin=data.admin_credential(),
                          config=HierarchyConfig(ca_id="test", domains=DOMAINS,
                                                 intermediate_lifetime=intermediate_lifetime),
                          clock=clock, audit=audit.append)
    hierarchy.ensure()
    return hierarchy


async def open_replica(directory: Path, *, root_der: bytes, clock: Callable[[], float],
                       publishers: Publishers | None = None,
                       node_names: Mapping[str, frozenset[str]] | None = None,
                       genesis: Mapping[str, int] | None = None,
                       extra_roots: Sequence[bytes] = (),
                       stores: tuple[DataDirectory, KeyStore, AuditLog] | None = None,
                       me: str | None = None) -> ReplicaForTests:
    """A :class:`CaStateMachine` as ``trustchain._compose`` builds one, opened (its state
    checked against its hash, ``genesis`` applied to an empty state).

    :param root_der: the cluster's root (announced intermediates chain to it).
    :param extra_roots: further roots the CT log accepts chains to.
    :param stores: the node's own data directory, keystore and audit log, if it has them
        already (else they are opened in ``directory``).
    :param me: the validator this replica belongs to (it trusts its own signatures).
    """
    data, keystore, audit = stores if stores is not None else open_stores(directory, clock)
    state = data.state()
    ct = CtLog(tiles=data.ct_tiles(), state=state, keystore=keystore, origin="test.trust/ct",
               clock=clock)
    try:
        ct.open()
        machine = CaStateMachine(
            state=state, ct=ct, chains=ChainValidator([root_der, *extra_roots], clock=clock),
            policy=NamingPolicy(domains=DOMAINS), root_der=root_der,
            node_names=node_names or {}, publishers=publishers or Publishers(),
            audit=audit.append_all_async, epoch_length=PARAMS.epoch_length, lifetime=LIFETIME,
            backdate=BACKDATE, minimum_stake=PARAMS.minimum_stake, development=True,
            me=me, clock=clock)
        await machine.open(genesis)
    except BaseException:  # a state that does not open: close what this opened
        await ct.stop()
        state.close()
        if stores is None:
            audit.close()
            keystore.close()
        raise
    return ReplicaForTests(data=data, keystore=keystore, audit=audit, state=state, ct=ct,
                           machine=machine)


def validator_key(keystore: KeyStore) -> tuple[Signer, Validator]:
    """A node's Ed25519 validator key, and the validator it is (power 1)."""
    signer = keystore.get_or_create("validator", "ed25519")
    raw = signer.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return signer, Validator(raw, 1, "::1", 0)


@dataclass
class ValidatorForTests:
    """A TrustChain CA of one validator: every service a node's CA uses, nothing mocked."""

    replica: ReplicaForTests
    hierarchy: Hierarchy
    validator: Validator
    beacons: BeaconChain
    verifier: ProofVerifier
    chain: ConsensusChain
    decisions: DecisionLog
    keys: KeysAnnouncer
    ca: CertificateAuthority

    @property
    def state(self) -> StateDatabase:
        return self.replica.state

    @property
    def machine(self) -> CaStateMachine:
        return self.replica.machine

    @property
    def audit(self) -> AuditLog:
        return self.replica.audit

    async def proofs(self, prover: stoq.Prover, op: Operation,
                     request: bytes) -> dict[str, Any]:
        """A requester's real four-proof set for ``op`` on the request digest
        ``request``, for this node's current epoch (what ``stoq.Prover.proofs`` makes
        from ``consensus.beacon``, without the socket)."""
        record = await self.beacons.current()
        beacon = stoq.Beacon(epoch=record.epoch, start=record.start,
                             end=record.start + PARAMS.epoch_length, value=record.value,
                             params=PARAMS, development=True)
        credential = await asyncio.to_thread(prover.credential_for, beacon)
        return prover.build(op, request, beacon, credential).to_wire()

    async def issue_csr(self, prover: stoq.Prover, csr: bytes) -> dict[str, Any]:
        """``ca.issue`` of ``csr`` by the requester ``prover`` (its key holds stake)."""
        proofs = await self.proofs(prover, "issue", hashlib.sha256(csr).digest())
        return await self.ca.issue_csr(csr, proofs, requester="test")


@contextlib.asynccontextmanager
async def open_validator(directory: Path, clock: Callable[[], float], *,
                         publishers: Publishers | None = None,
                         names: Sequence[str] = ("node.trust",),
                         addresses: Sequence[str] = ("::1",),
                         stake: Sequence[str] = (),
                         intermediate_lifetime: float = 90 * 86400.0
                         ) -> AsyncIterator[ValidatorForTests]:
    """A running CA of one validator in ``directory`` (stopped and closed on exit).

    :param names: ``names`` and ``addresses`` are what the validator's own TLS
        certificate may carry (``consensus.validators``).
    :param stake: key ids (hex) that hold the minimum stake from genesis.
    """
    data, keystore, audit = open_stores(directory, clock)
    hierarchy = open_hierarchy(data, keystore, audit, clock,
                               intermediate_lifetime=intermediate_lifetime)
    signer, me = validator_key(keystore)
    node_names = {me.id: frozenset([*names, *addresses])}
    replica = await open_replica(directory, root_der=hierarchy.root_der, clock=clock,
                                 publishers=publishers, node_names=node_names,
                                 genesis={k: PARAMS.minimum_stake for k in stake},
                                 stores=(data, keystore, audit))
    machine = replica.machine
    beacon_store, chain_store = data.beacons(), data.chain()
    beacons = BeaconChain(store=beacon_store, signer=keystore.get_or_create("beacon"),
                          epoch_length=PARAMS.epoch_length, audit=audit.append_async,
                          clock=clock)
    verifier = ProofVerifier(params=PARAMS, ledger=replica.state, beacons=beacons, workers=0,
                             audit=audit.append_async, clock=clock)
    rules = CaRules(machine=machine, policy=machine.policy, verify_proofs=verifier.verify,
                    chains=machine.chains, root=x509.load_der_x509_certificate(
                        hierarchy.root_der), node_names=node_names, lifetime=LIFETIME,
                    backdate=BACKDATE, development=True, minimum_stake=PARAMS.minimum_stake,
                    seals=SealOpener(), cosign=signer.sign, clock=clock)
    links = StoqPeerLinks(chain_id="test", me=me.id, sign=signer.sign,
                          validators=ValidatorSet((me,)), endpoints={me.id: ("::1", 0)},
                          engine=stoq.ENGINES[0])
    chain = ConsensusChain(chain_id="test", validators=ValidatorSet((me,)), store=chain_store,
                           transport=links, rules=rules, me=me.id, sign=signer.sign,
                           timeouts=Timeouts(), block_interval=0.05, gossip_interval=0.05,
                           audit=audit.append_async, clock=clock)
    decisions = DecisionLog(chain=chain, machine=machine,
                            sealer=Sealer(entry=me.id, sign=signer.sign), timeout=30.0,
                            clock=clock)
    keys = KeysAnnouncer(log_=decisions, local=local_keys(hierarchy, replica.ct, None, clock),
                         active=lambda: hierarchy.issuer.der if hierarchy.issuer else b"")
    directory_ = machine.directory

    def intermediate(fingerprint: str) -> bytes | None:
        found = directory_.intermediate(fingerprint)
        return None if found is None else found.der

    ca = CertificateAuthority(
        hierarchy=hierarchy, state=replica.state, policy=machine.policy, decisions=decisions,
        proofs=verifier, transparency=replica.ct,
        cluster=Cluster(intermediate=intermediate,
                        intermediates=lambda: [i.der for i in directory_.intermediates()],
                        ready=keys.ready, announce=keys.announce, admins=directory_.admins),
        audit=audit.append_async, signer=LocalSigner(), lifetime=LIFETIME, backdate=BACKDATE,
        clock=clock)
    await chain.start()
    try:
        yield ValidatorForTests(replica=replica, hierarchy=hierarchy, validator=me,
                                beacons=beacons, verifier=verifier, chain=chain,
                                decisions=decisions, keys=keys, ca=ca)
    finally:
        await chain.stop()
        await links.close()
        await verifier.close()
        chain_store.close()
        beacon_store.close()
        hierarchy.authorities.close()
        await replica.close()
