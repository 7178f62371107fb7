"""The replicated CA state machine, on real objects: two validators' replicas (each its
own SQLite state, CT tiles and keys in a temporary directory) execute the same blocks.

Validator A is the entry validator: it has a CA hierarchy, signs precertificates and
certificates with its intermediate and SCTs with its CT log, and seals every decision
with its Ed25519 validator key. B only executes. The tests build the decisions and the
blocks themselves (what the consensus chain would commit) and hand them to
:meth:`CaStateMachine.execute` on both replicas.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycddl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import stoq
from handlers.ca import (
    CheckedRequest,
    Hierarchy,
    Issuer,
    LeafTemplate,
    LocalSigner,
    _x509,
    check_request,
    renewal_statement,
    revocation_statement,
    validity,
)
from handlers.consensus import Executed, seal, seal_batch, unseal
from handlers.consensus.bft import GENESIS_ID, Block, Validator
from handlers.replica import (
    CompactCertificate,
    Issue,
    LogChain,
    Misissued,
    NodeCertificate,
    Outcome,
    Register,
    ReplicaService,
    Revoke,
    SignedCertificate,
    StakeCredit,
    ValidatorKeys,
)
from handlers.replica._read import MalformedDecision, read_sealed, remember
from protocol import encode_deterministic
from protocol.ct_structs import MAX_SCT_LIST, certificate_of, certificate_tbs, encode_sct_list
from protocol.decisions import MAX_SIGNATURE, Decision, DecisionError, parse
from protocol.ops import dns as dns_ops
from protocol.ops.consensus import Operation
from store import (
    MultisetHash,
    Row,
    Signer,
    StateChanges,
    StateDatabase,
    StateError,
    TileCorrupted,
    state_hash,
    verify_log,
)
from tests.helpers import CDDL
from trustchain._cli_consensus import block_holds
from trustchain._compose import local_keys

from ..ca_fixtures import (
    BACKDATE,
    LIFETIME,
    PARAMS,
    CaForTests,
    Clock,
    ReplicaForTests,
    make_ca,
    open_hierarchy,
    open_replica,
    open_stores,
    validator_key,
)

# --- the cluster under test ------------------------------------------------------------


@dataclass
class Request:
    """A requester's CSR and key, and what the entry validator made of it."""

    key: ec.EllipticCurvePrivateKey
    csr: bytes
    leaf: LeafTemplate
    decision: Issue | NodeCertificate

    @property
    def serial(self) -> str:
        return _x509.serial_hex(self.leaf.serial)


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return bytes(key.sign(data, ec.ECDSA(hashes.SHA256())))


def csr_for(key: ec.EllipticCurvePrivateKey, *names: str) -> bytes:
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


@dataclass
class Cluster:
    """Replicas A (the entry validator) and B, and the chain of blocks both executed."""

    directory: Path
    clock: Clock
    prover: stoq.Prover
    hierarchy: Hierarchy
    signer: Signer
    validator: Validator
    replicas: list[ReplicaForTests]
    foreign: CaForTests
    """A CA outside TrustChain whose chains the CT log accepts (``ct.extra_roots``)."""
    stranger: Issuer
    """The intermediate of another TrustChain CA, not this cluster's."""
    blocks: list[Block] = field(default_factory=list)

    @property
    def a(self) -> ReplicaForTests:
        return self.replicas[0]

    @property
    def b(self) -> ReplicaForTests:
        return self.replicas[1]

    @property
    def entry(self) -> str:
        return self.validator.id

    @property
    def issuer(self) -> Issuer:
        assert self.hierarchy.issuer is not None
        return self.hierarchy.issuer

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def block(self, *decisions: Decision | bytes) -> Block:
        """The next block, its new decisions sealed by A in one batch, stamped with the
        clock (1 ms after the last)."""
        previous = self.blocks[-1] if self.blocks else None
        new = [encode_deterministic(d.body()) for d in decisions if not isinstance(d, bytes)]
        batch = iter(seal_batch(new, self.entry, self.signer.sign) if new else [])
        sealed = tuple(d if isinstance(d, bytes) else next(batch) for d in decisions)
        return Block(height=len(self.blocks) + 1,
                     previous=previous.id if previous else GENESIS_ID,
                     time_ms=max(self.now_ms(), previous.time_ms + 1 if previous else 0),
                     proposer=self.entry, decisions=sealed, app_hash=self.a.machine.state_hash)

    async def run(self, block: Block) -> Executed:
        """Execute ``block`` on every replica; they must agree on everything it did."""
        executed = [await r.machine.execute(block) for r in self.replicas]
        for other in executed[1:]:
            assert other == executed[0], "the replicas executed the block differently"
        self.blocks.append(block)
        self.clock.now += 1
        return executed[0]

    async def commit(self, *decisions: Decision | bytes) -> tuple[Outcome, ...]:
        """Commit one block holding ``decisions``; each one's outcome."""
        executed = await self.run(self.block(*decisions))
        return tuple(executed.outcomes)

    # --- what A decides ----------------------------------------------------------------

    def keys(self) -> ValidatorKeys:
        return local_keys(self.hierarchy, self.a.ct, None, self.clock)(self.now_ms())

    async def proofs(self, op: Operation, request: bytes) -> dict[str, Any]:
        """A real four-proof set (the machine reads its work; the rules verify it)."""
        epoch = int(self.clock() // PARAMS.epoch_length)
        beacon = stoq.Beacon(epoch=epoch, start=epoch * PARAMS.epoch_length,
                             end=(epoch + 1) * PARAMS.epoch_length,
                             value=hashlib.sha256(b"beacon %d" % epoch).digest(),
                             params=PARAMS, development=True)
        credential = self.prover.credential_for(beacon)
        return self.prover.build(op, request, beacon, credential).to_wire()

    def template(self, request: CheckedRequest, at_ms: int, *,
                 issuer: Issuer | None = None, serial: int | None = None) -> LeafTemplate:
        """The leaf the CA fixes for ``request`` at ``at_ms`` (``CertificateAuthority._leaf``)."""
        issuer = issuer or self.issuer
        not_before, not_after = validity(at_ms, lifetime=LIFETIME, backdate=BACKDATE,
                                         issuer=issuer.certificate)
        return LeafTemplate(issuer=issuer, request=request,
                            serial=serial if serial is not None else _x509.new_serial(),
                            not_before=not_before, not_after=not_after)

    async def request(self, *names: str, renewing: Request | None = None,
                      node: bool = False) -> Request:
        """An ``issue`` decision (``node``: a ``node-certificate``) for a fresh key and
        ``names``; ``renewing``: signed by that certificate's key, to take its names."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = csr_for(key, *names)
        at_ms = self.now_ms()
        leaf = self.template(check_request(csr, self.a.machine.policy), at_ms)
        precertificate = await LocalSigner().sign_leaf(leaf, [_x509.precertificate_poison()])
        if node:
            return Request(key=key, csr=csr, leaf=leaf, decision=NodeCertificate(
                csr=csr, precertificate=precertificate, at_ms=at_ms))
        renews = renewing.serial if renewing is not None else None
        signature = (sign(renewing.key, renewal_statement(renewing.serial, csr))
                     if renewing is not None else None)
        decision = Issue(csr=csr, proofs=await self.proofs("issue", hashlib.sha256(csr).digest()),
                         precertificate=precertificate, renews=renews,
                         renewal_signature=signature, at_ms=at_ms)
        return Request(key=key, csr=csr, leaf=leaf, decision=decision)

    async def certificate(self, request: Request, outcome: Outcome) -> CompactCertificate:
        """The certificate of a committed issuance as the CA makes it: the SCT list of
        its SCT from A's log, and the signature of the TBS they make with the
        precertificate."""
        assert outcome.accepted and outcome.logged is not None, outcome
        sct_list = encode_sct_list([self.a.ct.sct(outcome.logged).sct.encode()])
        signature = await LocalSigner().sign_tbs(
            request.leaf.issuer, certificate_tbs(request.decision.precertificate, sct_list))
        return CompactCertificate(serial=request.serial, sct_list=sct_list,
                                  signature=signature, at_ms=self.now_ms())

    async def full_certificate(self, request: Request, outcome: Outcome) -> SignedCertificate:
        """The certificate of a committed issuance whole, its SCT from A's log embedded:
        the ``certificate`` decision of earlier versions."""
        assert outcome.accepted and outcome.logged is not None, outcome
        sct = self.a.ct.sct(outcome.logged).sct
        der = await LocalSigner().sign_leaf(request.leaf, [_x509.sct_list([sct.encode()])])
        return SignedCertificate(serial=request.serial, certificate=der, at_ms=self.now_ms())

    @staticmethod
    def der(request: Request, signed: CompactCertificate | SignedCertificate) -> bytes:
        """The certificate DER a ``certificate`` decision for ``request`` makes."""
        if isinstance(signed, SignedCertificate):
            return signed.certificate
        return certificate_of(request.decision.precertificate, signed.sct_list,
                              signed.signature)

    async def forged(self, request: Request, outcome: Outcome) -> bytes:
        """A certificate for ``request`` with its real SCT, signed by the stranger (whose
        intermediate has the very same name as A's, another key)."""
        assert outcome.logged is not None
        sct = self.a.ct.sct(outcome.logged).sct
        leaf = dataclasses.replace(request.leaf, issuer=self.stranger)
        return await LocalSigner().sign_leaf(leaf, [_x509.sct_list([sct.encode()])])

    async def issued(self, *names: str, renewing: Request | None = None,
                     node: bool = False, full: bool = False
                     ) -> tuple[Request, CompactCertificate | SignedCertificate]:
        """A certificate for ``names``, committed in two blocks as the CA does it
        (``full``: as earlier versions did, the whole certificate in the decision)."""
        request = await self.request(*names, renewing=renewing, node=node)
        (outcome,) = await self.commit(request.decision)
        signed = await (self.full_certificate if full else self.certificate)(request, outcome)
        (done,) = await self.commit(signed)
        assert done.accepted, done
        return request, signed

    async def revoke(self, serial: str, key: ec.EllipticCurvePrivateKey,
                     reason: str = "key_compromise") -> Revoke:
        at = int(self.clock())
        statement = revocation_statement(serial, reason, at)
        return Revoke(serial=serial, reason=reason, time=at, signature=sign(key, statement),
                      admin_certificate=None,
                      proofs=await self.proofs("revoke", hashlib.sha256(statement).digest()),
                      at_ms=self.now_ms())

    def register(self, request: Request, name: str, *addresses: str) -> Register:
        at = int(self.clock())
        statement = dns_ops.registration_statement(request.serial, name, list(addresses), at)
        return Register(serial=request.serial, name=name, addresses=addresses, time=at,
                        signature=sign(request.key, statement), at_ms=self.now_ms())

    def log_chain(self, *chain: bytes) -> LogChain:
        return LogChain(chain=chain, precert=False, at_ms=self.now_ms())

    async def reopen(self, index: int) -> ReplicaForTests:
        """Close replica ``index`` and open it again from its files (a restart)."""
        old = self.replicas[index]
        await old.close()
        self.replicas[index] = await self._open(old.data.root, old.machine.me)
        return self.replicas[index]

    async def _open(self, directory: Path, me: str | None = None) -> ReplicaForTests:
        return await open_replica(directory, root_der=self.hierarchy.root_der, clock=self.clock,
                                  extra_roots=[self.foreign.root_der], me=me)


@pytest.fixture
async def cluster(tmp_path: Path, prover: stoq.Prover) -> AsyncIterator[Cluster]:
    clock = Clock(float(int(time.time())))
    data, keystore, audit = open_stores(tmp_path / "a", clock)
    hierarchy = open_hierarchy(data, keystore, audit, clock)
    signer, validator = validator_key(keystore)
    foreign = make_ca("Foreign")
    stranger_data, stranger_keys, stranger_audit = open_stores(tmp_path / "stranger", clock)
    stranger = open_hierarchy(stranger_data, stranger_keys, stranger_audit, clock)
    assert stranger.issuer is not None
    # A is the entry's own replica: it does not verify its own signatures again
    replicas = [await open_replica(tmp_path / "a", root_der=hierarchy.root_der, clock=clock,
                                   extra_roots=[foreign.root_der],
                                   stores=(data, keystore, audit), me=validator.id),
                await open_replica(tmp_path / "b", root_der=hierarchy.root_der, clock=clock,
                                   extra_roots=[foreign.root_der])]
    cluster = Cluster(directory=tmp_path, clock=clock, prover=prover, hierarchy=hierarchy,
                      signer=signer, validator=validator, replicas=replicas, foreign=foreign,
                      stranger=stranger.issuer)
    (announced,) = await cluster.commit(cluster.keys())
    assert announced.accepted, announced
    try:
        yield cluster
    finally:
        for authorities in (hierarchy.authorities, stranger.authorities):
            authorities.close()
        for replica in cluster.replicas:
            await replica.close()
        stranger_audit.close()
        stranger_keys.close()


def file_rows(state: StateDatabase) -> list[Row]:
    """Every replicated row of the file, in a canonical order."""
    return sorted(state.rows(), key=repr)


def assert_same_state(cluster: Cluster) -> None:
    """Both replicas hold the same rows and hash, and each hash is its file's."""
    a, b = cluster.a, cluster.b
    assert a.machine.height == b.machine.height == len(cluster.blocks)
    assert a.machine.state_hash == b.machine.state_hash
    assert file_rows(a.state) == file_rows(b.state)
    for replica in (a, b):
        assert MultisetHash.of(replica.state.rows()) == replica.machine.rows
        assert replica.state.meta("state_hash") == replica.machine.state_hash


async def a_history(cluster: Cluster) -> dict[str, Request]:
    """Blocks with every kind of decision that changes the state; the requests made."""
    faucet = hashlib.sha256(b"a requester key").hexdigest()
    (credit,) = await cluster.commit(StakeCredit(key_id=faucet, amount=PARAMS.minimum_stake,
                                                 reason="faucet", at_ms=cluster.now_ms()))
    assert credit.accepted
    web, _ = await cluster.issued("www.hypermesh", "api.trust")
    db, _ = await cluster.issued("db.trust", full=True)  # as a block of an earlier version
    node, _ = await cluster.issued("node.trust", node=True)
    # a re-keyed renewal takes the names of the certificate it renews
    renewed, _ = await cluster.issued("www.hypermesh", "api.trust", renewing=web)
    # two issuances and a registration in one block: later decisions see earlier ones
    mail = await cluster.request("mail.trust")
    queue = await cluster.request("queue.trust")
    outcomes = await cluster.commit(mail.decision, queue.decision,
                                    cluster.register(web, "www.hypermesh", "2001:db8::1"))
    assert all(o.accepted for o in outcomes), outcomes
    signed = [await cluster.certificate(r, o) for r, o in zip((mail, queue), outcomes[:2],
                                                               strict=True)]
    outcomes = await cluster.commit(*signed, await cluster.revoke(db.serial, db.key),
                                    cluster.log_chain(cluster.foreign.leaf("x.example"),
                                                      cluster.foreign.der))
    assert all(o.accepted for o in outcomes), outcomes
    return {"web": web, "db": db, "mail": mail, "queue": queue, "node": node,
            "renewed": renewed}


# --- (a) the same blocks, the same state ----------------------------------------------


async def test_two_replicas_executing_the_same_blocks_agree(cluster: Cluster) -> None:
    requests = await a_history(cluster)
    assert_same_state(cluster)
    for replica in cluster.replicas:
        state = replica.state
        web = state.get(requests["web"].serial)
        assert web is not None and web.names == ("www.hypermesh", "api.trust")
        assert web.validator == cluster.entry and web.issuer == hashlib.sha256(
            cluster.issuer.der).hexdigest()
        assert web.ct_shard == 0 and web.ct_index is not None
        revoked = state.get(requests["db"].serial)
        assert revoked is not None and revoked.revocation_reason == "key_compromise"
        assert state.registrations()["www.hypermesh"][2] == ["2001:db8::1"]
        assert state.count() == 6
        assert state.ct_shards()[0][1] == 7  # six precertificates and one foreign chain
        node = state.get(requests["node"].serial)
        assert node is not None and node.kind == "node"
        renewed = state.get(requests["renewed"].serial)
        assert renewed is not None and renewed.names == web.names
        assert renewed.spki_sha256 != web.spki_sha256
        assert replica.machine.refusals == {}
        assert replica.machine.directory.of(cluster.entry) is not None
    # the state hash commits to the height as well as to the rows
    assert cluster.a.machine.state_hash == state_hash(len(cluster.blocks),
                                                      MultisetHash.of(cluster.b.state.rows()))


async def test_a_replica_that_missed_a_block_disagrees(cluster: Cluster) -> None:
    """The check above can fail: a replica that skips a decision has another hash."""
    request = await cluster.request("alone.trust")
    block = cluster.block(request.decision)
    executed = await cluster.a.machine.execute(block)
    assert executed.outcomes[0].accepted
    empty = dataclasses.replace(block, decisions=())
    await cluster.b.machine.execute(empty)
    assert cluster.a.machine.state_hash != cluster.b.machine.state_hash
    assert file_rows(cluster.a.state) != file_rows(cluster.b.state)


# --- (b) the state hash ------------------------------------------------------------------


def _write(path: Path, rows: Iterable[Row]) -> StateDatabase:
    """A state file holding ``rows``, written in the order given (one block's changes)."""
    state = StateDatabase(path)
    changes = StateChanges(height=1, block_id=bytes(32), rows_hash=MultisetHash(),
                           state_hash=bytes(32))
    for row in rows:
        changes.upsert(row)
    state.apply(changes)
    return state


async def test_the_state_hash_does_not_depend_on_row_order(cluster: Cluster,
                                                           tmp_path: Path) -> None:
    await a_history(cluster)
    rows = list(cluster.a.state.rows())
    expected = cluster.a.machine.rows
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert MultisetHash.of(reversed(rows)) == MultisetHash.of(shuffled) == expected
    # the same rows inserted in opposite orders: SQLite returns them in insertion order
    forward = _write(tmp_path / "forward.sqlite3", rows)
    backward = _write(tmp_path / "backward.sqlite3", reversed(rows))
    try:
        assert list(forward.rows()) != list(backward.rows())
        assert file_rows(forward) == file_rows(backward)
        assert MultisetHash.of(forward.rows()) == MultisetHash.of(backward.rows()) == expected
    finally:
        forward.close()
        backward.close()


def _changed(value: Any) -> Any:
    """Another value of the same kind."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, bytes):
        return bytes([value[0] ^ 1]) + value[1:] if value else b"\x00"
    assert isinstance(value, str), value
    return value + "x"


async def test_the_state_hash_changes_with_any_row(cluster: Cluster) -> None:
    await a_history(cluster)
    rows = list(cluster.a.state.rows())
    assert {r[0] for r in rows} >= {"certificates", "names", "registrations", "stake",
                                    "used_work", "validator_keys", "ct_shards", "ct_entries",
                                    "ct_leaves", "fingerprints", "fingerprint_names"}
    original = MultisetHash.of(rows)
    seen = {original}
    for i, row in enumerate(rows):
        others = rows[:i] + rows[i + 1:]
        assert MultisetHash.of(others) != original, f"removing {row[:2]}"
        assert MultisetHash.of([*rows, row]) != original, f"duplicating {row[:2]}"
        for column in range(len(row)):
            edited = (*row[:column], _changed(row[column]), *row[column + 1:])
            digest = MultisetHash.of([*others, edited])
            assert digest not in seen, f"changing column {column} of {row[:2]}"
            seen.add(digest)
    height = cluster.a.machine.height
    assert state_hash(height, original) != state_hash(height + 1, original)


# --- (c) replay ----------------------------------------------------------------------------


async def test_a_block_applied_again_after_a_restart_changes_nothing(cluster: Cluster) -> None:
    await a_history(cluster)
    before = (cluster.a.machine.height, cluster.a.machine.state_hash, file_rows(cluster.a.state))
    replica = await cluster.reopen(0)
    machine = replica.machine
    assert machine.corrupt is None
    assert (machine.height, machine.state_hash, file_rows(replica.state)) == before
    assert machine.rows == cluster.b.machine.rows
    # the chain hands the last block again (a crash after the state's commit)
    with pytest.raises(ValueError, match="does not follow"):
        await machine.execute(cluster.blocks[-1])
    # nor does the file take a block's changes twice
    replay = StateChanges(height=machine.height, block_id=cluster.blocks[-1].id,
                          rows_hash=MultisetHash(), state_hash=bytes(32))
    replay.upsert(("stake", "00" * 32, 5))
    with pytest.raises(StateError, match="does not follow"):
        replica.state.apply(replay)
    assert (machine.height, machine.state_hash, file_rows(replica.state)) == before
    assert replica.state.height() == before[0]
    # and it goes on with the others from where it was
    await cluster.issued("after.trust")
    assert_same_state(cluster)


async def test_decisions_committed_again_change_no_row(cluster: Cluster) -> None:
    """Every decision of the history, in a later block again: refused or a no-op."""
    await a_history(cluster)
    rows = cluster.a.machine.rows.copy()
    replayed = [d for block in cluster.blocks[1:] for d in block.decisions]
    outcomes = await cluster.commit(*replayed)
    assert_same_state(cluster)
    assert cluster.a.machine.rows == rows
    assert cluster.a.machine.state_hash == state_hash(len(cluster.blocks), rows)
    kinds = [d.KIND for d in (_decision(raw) for raw in replayed)]
    results = dict(zip(kinds, outcomes, strict=False))
    assert not results["issue"].accepted and "already taken" in results["issue"].message
    assert results["revoke"].value.get("already_revoked") is True
    assert not results["register"].accepted


def _decision(raw: bytes) -> Decision:
    return parse(unseal(raw).body)


# --- (d) rules at execution --------------------------------------------------------------


async def test_decisions_breaking_a_rule_are_refused_alike(cluster: Cluster) -> None:
    web, _ = await cluster.issued("www.hypermesh")
    other = await cluster.request("other.trust")
    (reserved,) = await cluster.commit(other.decision)
    rows = file_rows(cluster.a.state)
    # another key asks for a name web holds
    taken = await cluster.request("www.hypermesh")
    # other's certificate, with its SCT, but not the precertificate decided: another
    # issuer and validity, signed by a CA that is not a validator's (wrong, not misissued)
    forged = await cluster.forged(other, reserved)
    # a revocation signed by a key that is not web's
    intruder = await cluster.revoke(web.serial, ec.generate_private_key(ec.SECP256R1()))
    outcomes = await cluster.commit(
        taken.decision,
        SignedCertificate(serial=other.serial, certificate=forged, at_ms=cluster.now_ms()),
        intruder)
    name, certificate, revoke = outcomes
    assert (name.accepted, name.code, name.details.get("serial")) == (
        False, "unauthorized", web.serial)
    assert (certificate.accepted, certificate.code) == (False, "invalid_request")
    assert "not the committed precertificate" in certificate.message
    assert (revoke.accepted, revoke.code, revoke.details.get("field")) == (
        False, "unauthorized", "signature")
    assert_same_state(cluster)
    for replica in cluster.replicas:
        assert replica.machine.refusals == {cluster.entry: 3}
        record = replica.state.get(web.serial)
        assert record is not None and record.revoked_at is None
        pending = replica.state.certificate(other.serial)
        assert pending is not None and pending.pending
        assert replica.state.certificate(taken.serial) is None
    # the refused decisions changed no row but one: the name conflict is found after the
    # request's work is marked used (its proofs cannot be replayed)
    added = [r for r in file_rows(cluster.a.state) if r not in rows]
    assert [r[0] for r in added] == ["used_work"]
    assert [r for r in rows if r not in file_rows(cluster.a.state)] == []


async def test_a_node_certificate_must_name_its_node_in_its_subject(cluster: Cluster) -> None:
    """A node certificate for addresses only: the profile makes its subject ``O=`` the
    CA's id (GnuTLS clients such as kdig refuse an empty subject); a precertificate
    with the empty subject (and critical SAN) RFC 5280 would allow is refused by every
    validator."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName(
               [x509.IPAddress(ipaddress.IPv6Address("2001:db8::5")),
                x509.IPAddress(ipaddress.IPv6Address("::1"))]), critical=True)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    at_ms = cluster.now_ms()
    leaf = cluster.template(check_request(csr, cluster.a.machine.policy), at_ms)
    good = x509.load_der_x509_certificate(
        await LocalSigner().sign_leaf(leaf, [_x509.precertificate_poison()]))
    assert good.subject == x509.Name(cluster.issuer.certificate.subject
                                     .get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME))
    assert good.subject.rfc4514_string().startswith("O=")
    san = good.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    empty = x509.CertificateBuilder().subject_name(x509.Name([])) \
        .issuer_name(good.issuer).public_key(good.public_key()) \
        .serial_number(_x509.new_serial()) \
        .not_valid_before(good.not_valid_before_utc).not_valid_after(good.not_valid_after_utc)
    for extension in good.extensions:
        empty = empty.add_extension(extension.value, critical=extension.critical
                                    or extension.oid == san.oid)
    unnamed = empty.sign(cluster.issuer.signer.private_key(), hashes.SHA256())
    refused, accepted = await cluster.commit(
        NodeCertificate(csr=csr, precertificate=unnamed.public_bytes(
            serialization.Encoding.DER), at_ms=at_ms),
        NodeCertificate(csr=csr, precertificate=good.public_bytes(serialization.Encoding.DER),
                        at_ms=at_ms))
    assert (refused.accepted, refused.code) == (False, "invalid_request")
    assert "precertificate" in refused.message
    assert accepted.accepted, accepted
    assert_same_state(cluster)


async def test_a_stale_or_future_decision_is_refused_alike(cluster: Cluster) -> None:
    old = await cluster.request("old.trust")
    late = dataclasses.replace(old.decision, at_ms=cluster.now_ms() - 601_000)
    ahead = dataclasses.replace(old.decision, at_ms=cluster.now_ms() + 60_000)
    outcomes = await cluster.commit(late, ahead)
    assert [(o.accepted, o.code) for o in outcomes] == [(False, "invalid_request")] * 2
    assert "stale" in outcomes[0].message and "after its block" in outcomes[1].message
    assert_same_state(cluster)
    assert all(r.machine.refusals == {cluster.entry: 2} for r in cluster.replicas)


# --- (e) state edited at rest ------------------------------------------------------------

EDITS: list[tuple[str, str]] = [
    ("a certificate's expiry", "UPDATE certificates SET not_after = not_after + 86400 "
                               "WHERE serial = (SELECT min(serial) FROM certificates)"),
    ("a revocation undone", "UPDATE certificates SET revoked_ms = NULL, revocation_reason = "
                            "NULL WHERE revoked_ms IS NOT NULL"),
    ("a name dropped", "DELETE FROM names WHERE name = 'db.trust'"),
    ("stake made up", "INSERT INTO stake VALUES ('" + "ab" * 32 + "', 1000000)"),
    ("used work forgotten", "DELETE FROM used_work"),
    ("a CT entry's time moved", "UPDATE ct_entries SET timestamp = timestamp + 1"),
    ("a fingerprint's names dropped", "DELETE FROM fingerprint_names WHERE name = 'db.trust'"),
]


@pytest.mark.parametrize(("what", "sql"), EDITS, ids=[e[0] for e in EDITS])
async def test_state_edited_on_disk_is_detected_on_open(cluster: Cluster, what: str,
                                                        sql: str) -> None:
    await a_history(cluster)
    path = cluster.a.state.path
    await cluster.a.close()
    with sqlite3.connect(path) as db:
        assert db.execute(sql).rowcount > 0
    cluster.replicas[0] = replica = await cluster._open(path.parent.parent)
    assert replica.machine.corrupt is not None
    assert f"at height {len(cluster.blocks)} does not match its hash" in replica.machine.corrupt
    assert "edited or damaged" in replica.machine.corrupt
    status = ReplicaService(machine=replica.machine, decisions=None).status()
    assert status["state"]["corrupt"] == replica.machine.corrupt
    # its state hash is the file's, so the next block's app_hash shows the divergence too
    assert replica.machine.state_hash != cluster.b.machine.state_hash


async def test_a_state_left_alone_or_its_own_rows_edited_is_not_corrupt(
        cluster: Cluster) -> None:
    await a_history(cluster)
    path = cluster.a.state.path
    await cluster.a.close()
    with sqlite3.connect(path) as db:  # this validator's own rows: not replicated
        assert db.execute("DELETE FROM ct_scts").rowcount > 0
    cluster.replicas[0] = replica = await cluster._open(path.parent.parent)
    assert replica.machine.corrupt is None
    assert replica.machine.state_hash == cluster.b.machine.state_hash


async def test_a_ct_tree_edited_on_disk_is_refused_on_open(cluster: Cluster) -> None:
    """The tree's root is checked against the tiles before the state hash is."""
    await a_history(cluster)
    path = cluster.a.state.path
    await cluster.a.close()
    with sqlite3.connect(path) as db:
        assert db.execute("UPDATE ct_shards SET root = zeroblob(32)").rowcount == 1
    with pytest.raises(TileCorrupted, match="the committed checkpoint 0000"):
        await cluster._open(path.parent.parent)
    cluster.replicas.pop(0)  # closed already


async def test_an_edit_that_removes_the_stored_hash_is_detected(cluster: Cluster) -> None:
    await a_history(cluster)
    path = cluster.a.state.path
    await cluster.a.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE certificates SET not_after = not_after + 86400")
        db.execute("DELETE FROM meta WHERE key = 'rows_hash'")
    cluster.replicas[0] = replica = await cluster._open(path.parent.parent)
    assert replica.machine.corrupt is not None


# --- (f) a certificate that is not its precertificate, signed by its validator ----------


async def test_a_certificate_unlike_its_precertificate_isolates_its_signer(
        cluster: Cluster) -> None:
    request = await cluster.request("svc.trust")
    (outcome,) = await cluster.commit(request.decision)
    honest = await cluster.certificate(request, outcome)
    # the issuer signs the same serial with a longer life than the block decided
    longer = dataclasses.replace(request.leaf, not_after=request.leaf.not_after + 86400 * 30)
    assert outcome.logged is not None
    sct = cluster.a.ct.sct(outcome.logged).sct
    misissued = await LocalSigner().sign_leaf(longer, [_x509.sct_list([sct.encode()])])
    executed = await cluster.run(cluster.block(
        SignedCertificate(serial=request.serial, certificate=misissued,
                          at_ms=cluster.now_ms())))
    (refused,) = executed.outcomes
    assert (refused.accepted, refused.code) == (False, "invalid_request")
    assert executed.isolate == (cluster.entry,)
    assert_same_state(cluster)
    for replica in cluster.replicas:
        assert replica.machine.refusals == {cluster.entry: 1}
        record = replica.state.certificate(request.serial)
        assert record is not None and record.pending  # still waits for the right one
        await replica.audit.append_async("test.mark", {})
    for name in ("a", "b"):
        log = (cluster.directory / name / "audit" / "audit.log").read_text()
        assert '"consensus.misissuance"' in log and request.serial in log
    # the honest certificate still completes the issuance, and isolates no one
    executed = await cluster.run(cluster.block(honest))
    assert executed.outcomes[0].accepted and executed.isolate == ()


async def test_a_certificate_unlike_its_precertificate_from_another_signer_isolates_no_one(
        cluster: Cluster) -> None:
    request = await cluster.request("svc.trust")
    (outcome,) = await cluster.commit(request.decision)
    forged = await cluster.forged(request, outcome)
    executed = await cluster.run(cluster.block(
        SignedCertificate(serial=request.serial, certificate=forged, at_ms=cluster.now_ms())))
    assert not executed.outcomes[0].accepted and executed.isolate == ()
    assert_same_state(cluster)


async def test_misissuance_evidence_isolates_the_signer(cluster: Cluster) -> None:
    committed, signed = await cluster.issued("evidence.trust")
    # a certificate the intermediate signed that no block decided
    stray = await cluster.request("stray.trust")
    stray_der = await LocalSigner().sign_leaf(stray.leaf, [])
    executed = await cluster.run(cluster.block(
        Misissued(certificate=stray_der, at_ms=cluster.now_ms()),
        Misissued(certificate=cluster.der(committed, signed), at_ms=cluster.now_ms())))
    evidence, committed = executed.outcomes
    assert evidence.accepted and evidence.value == {"offender": cluster.entry}
    assert (committed.accepted, committed.message) == (False, "it is a committed certificate")
    assert executed.isolate == (cluster.entry,)
    assert_same_state(cluster)


async def test_the_precertificate_of_a_refused_issuance_is_not_evidence(cluster: Cluster) -> None:
    """An issue decision carries a signed precertificate before any block commits it;
    one refused at execution (here: the name is another key's) leaves a precertificate
    no block allows, which must not frame its honest signer."""
    await cluster.issued("taken.trust")
    late = await cluster.request("taken.trust")
    (refused,) = await cluster.commit(late.decision)
    assert not refused.accepted and "held by another key" in refused.message
    assert isinstance(late.decision, Issue)
    executed = await cluster.run(cluster.block(
        Misissued(certificate=late.decision.precertificate, at_ms=cluster.now_ms())))
    (outcome,) = executed.outcomes
    assert not outcome.accepted and "a precertificate is not evidence" in outcome.message
    assert executed.isolate == ()
    assert_same_state(cluster)


# --- bugs found --------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["after", "same block", "before"])
async def test_logging_an_issued_certificate_keeps_the_state_hash_the_files(
        cluster: Cluster, when: str) -> None:
    request = await cluster.request("logged.trust")
    (reserved,) = await cluster.commit(request.decision)
    signed = await cluster.certificate(request, reserved)
    submitted = cluster.log_chain(cluster.der(request, signed), cluster.issuer.der)
    if when == "after":
        outcomes = (*await cluster.commit(signed), *await cluster.commit(submitted))
    elif when == "before":
        outcomes = (*await cluster.commit(submitted), *await cluster.commit(signed))
    else:
        outcomes = await cluster.commit(signed, submitted)
    assert all(o.accepted for o in outcomes), outcomes
    for replica in cluster.replicas:
        record = replica.state.get(request.serial)
        assert record is not None and record.der == cluster.der(request, signed)
        assert MultisetHash.of(replica.state.rows()) == replica.machine.rows
    replica = await cluster.reopen(1)
    assert replica.machine.corrupt is None


async def test_a_registration_withdrawn_in_the_same_block_is_gone_from_the_file(
        cluster: Cluster) -> None:
    web, _ = await cluster.issued("www.hypermesh")
    publish = cluster.register(web, "www.hypermesh", "2001:db8::1")
    withdraw = dataclasses.replace(cluster.register(web, "www.hypermesh"),
                                   time=publish.time + 1)
    withdraw = dataclasses.replace(withdraw, signature=sign(
        web.key, dns_ops.registration_statement(web.serial, "www.hypermesh", [],
                                                withdraw.time)))
    outcomes = await cluster.commit(publish, withdraw)
    assert all(o.accepted for o in outcomes), outcomes
    for replica in cluster.replicas:
        assert MultisetHash.of(replica.state.rows()) == replica.machine.rows
        assert "www.hypermesh" not in replica.state.registrations()


async def test_a_registration_of_something_not_an_address_is_refused(
        cluster: Cluster) -> None:
    web, _ = await cluster.issued("www.hypermesh")
    (outcome,) = await cluster.commit(cluster.register(web, "www.hypermesh", "not-an-address"))
    assert not outcome.accepted
    assert_same_state(cluster)
    assert "www.hypermesh" not in cluster.a.state.registrations()


async def test_a_malformed_decision_is_refused_and_counted(cluster: Cluster) -> None:
    malformed = seal({"kind": "issue", "at_ms": cluster.now_ms()}, cluster.entry,
                     cluster.signer.sign)
    (outcome,) = await cluster.commit(malformed)
    assert (outcome.accepted, outcome.code) == (False, "invalid_request")
    assert "malformed" in outcome.message
    assert_same_state(cluster)
    assert all(r.machine.refusals == {cluster.entry: 1} for r in cluster.replicas)


def test_a_decision_checked_before_the_vote_is_not_read_again_when_executed() -> None:
    key = Ed25519PrivateKey.generate()
    body = {"kind": "certificate", "serial": "0a", "certificate": b"x", "at_ms": 1}
    raw = seal(body, "v1", key.sign)
    checked = parse(unseal(raw).body)
    remember(raw, "v1", checked)
    entry, decision = read_sealed(raw)
    assert entry == "v1" and decision is checked  # the checked reading itself
    entry, again = read_sealed(raw)  # taken once: a second reading parses afresh
    assert entry == "v1" and again == checked and again is not checked
    bad = seal({"kind": "issue", "at_ms": 1}, "v2", key.sign)
    with pytest.raises(MalformedDecision) as caught:
        read_sealed(bad)
    assert caught.value.entry == "v2"


def _bad_signature(der: bytes) -> bytes:
    """``der`` with the last byte of its signature changed: same TBS, no valid signature."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


async def test_a_validator_trusts_only_the_signatures_it_made_and_sealed_itself(
        cluster: Cluster) -> None:
    request = await cluster.request("own.trust")
    (outcome,) = await cluster.commit(request.decision)
    honest = await cluster.full_certificate(request, outcome)
    broken = SignedCertificate(serial=request.serial, at_ms=cluster.now_ms(),
                               certificate=_bad_signature(honest.certificate))
    # Sealed by another validator: A verifies its own signature like everyone.
    other = Ed25519PrivateKey.generate()
    executed = await cluster.run(cluster.block(seal(broken.body(), "another-validator",
                                                    other.sign)))
    assert not executed.outcomes[0].accepted
    assert "not signed by the issuing intermediate" in executed.outcomes[0].message
    assert_same_state(cluster)
    # Sealed by A itself: A does not verify what it signed (B does), so a broken
    # signature of its own would leave its state apart: the next block's state hash
    # shows it.
    block = cluster.block(broken)
    own, other_replica = [await r.machine.execute(block) for r in cluster.replicas]
    assert own.outcomes[0].accepted and not other_replica.outcomes[0].accepted
    assert cluster.a.machine.state_hash != cluster.b.machine.state_hash


# --- the certificate decision in its compact form ---------------------------------------


def sealed_by_another(decision: Decision) -> bytes:
    """``decision`` sealed by a validator that is not A: A verifies it like everyone."""
    return seal(decision.body(), "another-validator", Ed25519PrivateKey.generate().sign)


async def test_a_compact_certificate_is_refused_for_what_is_wrong_in_it(
        cluster: Cluster) -> None:
    """Whatever a byzantine entry puts in the SCT list or the signature is refused, alike
    on every replica, with the reason; the honest decision then completes the issuance
    and a second certificate for the serial is refused."""
    request = await cluster.request("compact.trust")
    other = await cluster.request("other.trust")
    reserved, other_reserved = await cluster.commit(request.decision, other.decision)
    honest = await cluster.certificate(request, reserved)
    assert isinstance(request.decision, Issue)
    tbs_of = functools.partial(certificate_tbs, request.decision.precertificate)

    async def signed(sct_list: bytes) -> CompactCertificate:
        """A decision with ``sct_list`` and the issuer's true signature over its TBS."""
        signature = await LocalSigner().sign_tbs(request.leaf.issuer, tbs_of(sct_list))
        return dataclasses.replace(honest, sct_list=sct_list, signature=signature)
    sct = cluster.a.ct.sct(reserved.logged).sct  # type: ignore[arg-type]
    tampered_sct = dataclasses.replace(
        sct, signature=sct.signature[:-1] + bytes([sct.signature[-1] ^ 1]))
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    strangers = dataclasses.replace(sct, log_id=hashlib.sha256(
        stranger_key.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo)).digest())
    other_sct = cluster.a.ct.sct(other_reserved.logged).sct  # type: ignore[arg-type]
    cases = [
        (dataclasses.replace(honest, signature=honest.signature[:-1] + bytes(
            [honest.signature[-1] ^ 1])), "invalid_request", "not the issuing intermediate's"),
        (dataclasses.replace(honest, sct_list=encode_sct_list([tampered_sct.encode()])),
         "invalid_request", "not the issuing intermediate's"),
        (await signed(encode_sct_list([tampered_sct.encode()])), "invalid_request",
         "an embedded SCT does not verify"),
        (await signed(encode_sct_list([other_sct.encode()])), "invalid_request",
         "an embedded SCT does not verify"),  # the SCT of another entry
        (await signed(encode_sct_list([strangers.encode()])), "invalid_request",
         "carries no SCT of a validator's log"),
        (dataclasses.replace(honest, sct_list=b"\x00\x03\x00\x01\x00"), "invalid_request",
         "SCT list cannot be read"),
        (dataclasses.replace(honest, serial="01" * 16), "not_found",
         "no committed issuance"),
    ]
    executed = await cluster.run(cluster.block(*(sealed_by_another(d) for d, _, _ in cases)))
    for outcome, (_, code, message) in zip(executed.outcomes, cases, strict=True):
        assert (outcome.accepted, outcome.code) == (False, code), outcome
        assert message in outcome.message, outcome
    assert executed.isolate == ()
    assert_same_state(cluster)
    for replica in cluster.replicas:
        record = replica.state.certificate(request.serial)
        assert record is not None and record.pending
    (done,) = await cluster.commit(sealed_by_another(honest))
    assert done.accepted, done
    der = cluster.der(request, honest)
    for replica in cluster.replicas:
        record = replica.state.certificate(request.serial)
        assert record is not None and record.der == der
        assert record.fingerprint == hashlib.sha256(der).hexdigest()
    # the same certificate again changes nothing; another one for the serial is refused
    again = dataclasses.replace(honest, at_ms=cluster.now_ms())
    second = await signed(encode_sct_list([sct.encode(), sct.encode()]))
    same, refused_second = await cluster.commit(again, sealed_by_another(second))
    assert same.accepted and not refused_second.accepted
    assert "is already signed" in refused_second.message
    assert_same_state(cluster)


def test_a_compact_certificate_decision_is_bounded_and_matches_the_cddl() -> None:
    body = {"kind": "certificate", "serial": "8" + "0" * 31, "sct_list": b"\x00" * 130,
            "signature": b"\x30" * 72, "at_ms": 1}
    encoded = encode_deterministic(body)
    pycddl.Schema(f"root = certificate-decision\n{CDDL}").validate_cbor(encoded)
    pycddl.Schema(f"root = decision\n{CDDL}").validate_cbor(encoded)
    decision = parse(body)
    assert isinstance(decision, CompactCertificate) and decision.body() == body
    full = {"kind": "certificate", "serial": "0a", "certificate": b"x", "at_ms": 1}
    pycddl.Schema(f"root = certificate-decision\n{CDDL}").validate_cbor(
        encode_deterministic(full))
    assert isinstance(parse(full), SignedCertificate)
    for key, value, reason in [
            ("sct_list", bytes(MAX_SCT_LIST + 1), "sct_list must be"),
            ("sct_list", b"", "sct_list must be"),
            ("signature", bytes(MAX_SIGNATURE + 1), "signature must be"),
            ("serial", "a" * 41, "serial must be"),
            ("serial", 7, "serial is missing"),
            ("signature", None, "signature is missing")]:
        with pytest.raises(DecisionError, match=reason):
            parse({**body, key: value})
        if value is not None and key != "serial":
            with pytest.raises(Exception):  # noqa: B017 (pycddl raises its own error type)
                pycddl.Schema(f"root = certificate-decision\n{CDDL}").validate_cbor(
                    encode_deterministic({**body, key: value}))
    with pytest.raises(DecisionError, match="either certificate, or sct_list"):
        parse({**full, "sct_list": b"\x00" * 130})


async def test_the_full_and_the_compact_form_leave_the_same_state(cluster: Cluster) -> None:
    """A replica that executes the issuance's certificate whole (a block of an earlier
    version) holds the same rows and state hash as those that assembled it."""
    c = await cluster._open(cluster.directory / "c")
    try:
        for block in cluster.blocks:
            await c.machine.execute(block)
        request = await cluster.request("both.trust")
        issue = cluster.block(request.decision)
        (reserved,) = (await cluster.run(issue)).outcomes
        await c.machine.execute(issue)
        compact = await cluster.certificate(request, reserved)
        der = cluster.der(request, compact)
        full = cluster.block(SignedCertificate(serial=request.serial, certificate=der,
                                               at_ms=compact.at_ms))
        executed = await cluster.run(cluster.block(compact))
        assert executed.outcomes[0].accepted
        assert (await c.machine.execute(full)).outcomes[0].accepted
        assert c.machine.state_hash == cluster.b.machine.state_hash
        assert file_rows(c.state) == file_rows(cluster.b.state)
        stored = c.state.certificate(request.serial)
        assert stored is not None and stored.der == der
        assert x509.load_der_x509_certificate(der).serial_number == request.leaf.serial
    finally:
        await c.close()


async def test_a_client_finds_its_certificate_in_either_form_of_decision(
        cluster: Cluster) -> None:
    """``trustchain verify --consensus --online`` (``block_holds``): the committed
    decision carries the certificate whole, or its serial, SCT list and signature."""
    compact_request, compact = await cluster.issued("compact-found.trust")
    compact_block = cluster.blocks[-1]
    full_request, full = await cluster.issued("full-found.trust", full=True)
    full_block = cluster.blocks[-1]
    mine, theirs = cluster.der(compact_request, compact), cluster.der(full_request, full)
    for block, der, other in [(compact_block, mine, theirs), (full_block, theirs, mine)]:
        assert block_holds(block.encoded, block.id, 0, der) is None
        assert "does not carry this certificate" in (
            block_holds(block.encoded, block.id, 0, other) or "")
    # the same serial and SCT list, another signature: not the certificate committed
    forged = mine[:-1] + bytes([mine[-1] ^ 1])
    assert "does not carry" in (block_holds(compact_block.encoded, compact_block.id, 0,
                                            forged) or "")


# --- the cost of executing a block -------------------------------------------------------


def certificate_reads(state: StateDatabase) -> list[str]:
    """The point reads of the certificates table ``state`` makes from now on (the SQL
    its reader connection runs, as SQLite traces it)."""
    reads: list[str] = []

    def trace(sql: str) -> None:
        if "FROM certificates WHERE serial" in sql:  # one serial, or a block's
            reads.append(sql)
    state._reader.set_trace_callback(trace)
    return reads


async def test_an_issuance_reads_its_record_at_most_once(cluster: Cluster) -> None:
    """The serial is checked once (new); its signed certificate, a block later, finds
    the pending record in memory."""
    reads = [certificate_reads(replica.state) for replica in cluster.replicas]
    request = await cluster.request("once.trust")
    (outcome,) = await cluster.commit(request.decision)
    assert outcome.accepted, outcome
    assert [len(r) for r in reads] == [1, 1]
    (done,) = await cluster.commit(await cluster.certificate(request, outcome))
    assert done.accepted, done
    assert [len(r) for r in reads] == [1, 1]
    revoke = await cluster.revoke(request.serial, request.key)
    (revoked,) = await cluster.commit(revoke)
    assert revoked.accepted and [len(r) for r in reads] == [1, 1]
    assert_same_state(cluster)
    for replica in cluster.replicas:
        stored = replica.state.certificate(request.serial)
        assert stored is not None and stored.revoked_at is not None
        # what the machine keeps is what the file holds, field for field
        assert replica.machine._stored(request.serial) == stored


def reader_queries(state: StateDatabase) -> list[str]:
    """Every query ``state``'s reader connection runs from now on."""
    queries: list[str] = []
    state._reader.set_trace_callback(queries.append)
    return queries


async def test_a_blocks_issuances_ask_the_state_once_a_kind(cluster: Cluster) -> None:
    """Whether a block's serials and work were used, who claims its names, whether its
    certificates were logged first: one query each for the whole block, not one per
    decision; the answers are those of the point reads (a held name is refused)."""
    held, _ = await cluster.issued("held.trust")
    requests = [await cluster.request(f"n{i}.trust") for i in range(3)]
    taken = await cluster.request("held.trust")
    queries = reader_queries(cluster.b.state)
    outcomes = await cluster.commit(*(r.decision for r in requests), taken.decision)
    assert [o.accepted for o in outcomes] == [True, True, True, False]
    assert outcomes[3].details.get("serial") == held.serial

    def asked(where: str) -> list[str]:
        return [q for q in queries if where in q]
    assert len(asked("FROM certificates WHERE serial IN (")) == 1
    assert len(asked("FROM certificates WHERE serial")) == 1
    assert len(asked("FROM used_work WHERE hash")) == 1
    assert len(asked("WHERE n.name")) == 1
    queries.clear()
    signed = [await cluster.certificate(r, o)
              for r, o in zip(requests, outcomes[:3], strict=False)]
    assert all(o.accepted for o in await cluster.commit(*signed))
    assert len(asked("FROM fingerprints WHERE sha256")) == 1
    assert asked("FROM certificates WHERE serial") == []  # the records are kept
    assert_same_state(cluster)


async def test_a_block_whose_state_is_not_written_leaves_the_kept_records_as_the_file(
        cluster: Cluster, tmp_path: Path) -> None:
    """The signature and the revocation of a block that fails to commit are not kept:
    what the machine keeps in memory never runs ahead of the file."""
    signed_first, _ = await cluster.issued("kept.trust")
    request = await cluster.request("pending.trust")
    (outcome,) = await cluster.commit(request.decision)
    block = cluster.block(await cluster.certificate(request, outcome),
                          await cluster.revoke(signed_first.serial, signed_first.key))
    b = cluster.b
    before = {s: b.state.certificate(s) for s in (signed_first.serial, request.serial)}
    assert all(b.machine._stored(s) == r for s, r in before.items())
    locker = sqlite3.connect(b.state.path, isolation_level=None)
    b.state._db.execute("PRAGMA busy_timeout=50")
    locker.execute("BEGIN EXCLUSIVE")  # the block's transaction cannot start
    try:
        with pytest.raises(StateError):
            await b.machine.execute(block)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert b.machine.height == len(cluster.blocks)
    for serial, record in before.items():
        assert b.state.certificate(serial) == record
        assert b.machine._stored(serial) == record
    assert record is not None and record.pending


async def test_a_block_of_issuances_is_audited_in_one_flush(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    flushed: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        flushed.append(fd)
        real(fd)
    requests = [await cluster.request(f"n{i}.trust") for i in range(12)]
    outcomes = await cluster.commit(*(r.decision for r in requests))
    assert all(o.accepted for o in outcomes), outcomes
    signed = [await cluster.certificate(r, o) for r, o in zip(requests, outcomes, strict=True)]
    monkeypatch.setattr(os, "fdatasync", counting)
    done = await cluster.commit(*signed)
    monkeypatch.undo()
    assert all(o.accepted for o in done), done
    for replica in cluster.replicas:
        assert flushed.count(replica.audit._fd) == 1
        replica.audit.close()  # signs the tail
        records = [json.loads(line) for line in replica.audit.path.read_text().splitlines()]
        issued = [r["data"]["serial"] for r in records if r["kind"] == "ca.issued"]
        assert issued == [r.serial for r in requests]
        report = verify_log(replica.audit.path)
        assert report.ok and report.unsigned_tail == 0, report.problems
