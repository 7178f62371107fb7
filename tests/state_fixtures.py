"""The replicated state (``store.StateDatabase``) as the CA's state machine leaves it.

The DNS zones, ``dns.register`` and the CA read certificates and
registrations from the state, where only executed blocks write. Issuing a
real certificate through a block takes proofs, an announced intermediate and
SCTs; these builders write the same rows directly instead, one block at a
time, exactly as :class:`handlers.replica.CaStateMachine` writes them (the
canonical rows, the height, the rows hash and the state hash, which
:meth:`CaStateMachine.open` checks). What needs no more than the state, a
``register`` decision, goes through a real :class:`CaStateMachine`
(:class:`SoleValidator`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from handlers.ca import NamingPolicy, Publishers
from handlers.consensus import seal
from handlers.consensus.bft import Block
from handlers.ct import ChainValidator, CtLog
from handlers.replica import CaStateMachine, Decision, Outcome
from store import (
    CertificateRecord,
    DataDirectory,
    MultisetHash,
    Row,
    SoftwareKeyStore,
    StateChanges,
    StateDatabase,
    certificate_row,
    state_hash,
)
from store._state import _KEYS

from .ca_fixtures import make_ca

DAY = 86400.0
_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_ISSUER = hashlib.sha256(b"the test intermediate").hexdigest()


def make_record(names: Sequence[str], *, issued_at: float, key: Any = None,
                lifetime: float = DAY) -> tuple[CertificateRecord, Any]:
    """A certificate for ``names`` (IPv6 addresses become IP SANs) and its key, as the
    registry's record of an issued certificate (not yet in any state)."""
    key = key or ed25519.Ed25519PrivateKey.generate()
    san: list[x509.GeneralName] = []
    for name in names:
        try:
            san.append(x509.IPAddress(ipaddress.IPv6Address(name)))
        except ValueError:
            san.append(x509.DNSName(name))
    serial = x509.random_serial_number() | (1 << 127)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(x509.Name([x509.NameAttribute(x509.OID_COMMON_NAME, "test CA")]))
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(datetime.datetime.fromtimestamp(issued_at - 300, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(issued_at + lifetime,
                                                             datetime.UTC))
            .add_extension(x509.SubjectAlternativeName(san), critical=True)
            .sign(_CA_KEY, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    record = CertificateRecord(
        serial=format(serial, "x"), der=der, fingerprint=hashlib.sha256(der).hexdigest(),
        spki_sha256=hashlib.sha256(spki).hexdigest(), issuer=_ISSUER,
        not_before=issued_at - 300, not_after=issued_at + lifetime, issued_at=issued_at,
        revoked_at=None, revocation_reason=None, names=tuple(names))
    return record, key


def certificate_rows(record: CertificateRecord) -> list[Row]:
    """The rows of a certificate in the state: its registry row, its names (in SAN
    order) and, once it is signed, its fingerprint (as the state machine writes them)."""
    rows: list[Row] = [certificate_row(record)]
    rows += [("names", name, record.serial, position)
             for position, name in enumerate(record.names)]
    if not record.pending:
        fingerprint = bytes.fromhex(record.fingerprint)
        rows.append(("fingerprints", fingerprint, bytes.fromhex(record.spki_sha256), "issued",
                     record.ct_shard, record.ct_index, record.serial,
                     round(record.issued_at * 1000)))
        rows += [("fingerprint_names", name, fingerprint) for name in record.names]
    return rows


def commit_block(state: StateDatabase, upserts: Sequence[Row] = (),
                 deletes: Sequence[tuple[str, tuple[Any, ...]]] = ()) -> int:
    """Write one block's changes at the state's next height, with the rows hash and the
    state hash the state machine would store; the new height.

    A row replacing one with the same key takes its place in the hash, as in
    :meth:`CaStateMachine.execute`.
    """
    current = {(row[0], row[1:1 + len(_KEYS[row[0]])]): row for row in state.rows()}
    stored = state.meta("rows_hash")
    rows = MultisetHash.from_bytes(stored) if stored is not None else MultisetHash()
    height = state.height() + 1
    changes = StateChanges(height=height,
                           block_id=hashlib.sha256(b"test block %d" % height).digest(),
                           rows_hash=rows, state_hash=b"")
    for table, key in deletes:
        old = current.pop((table, tuple(key)), None)
        if old is not None:
            rows.remove(old)
        changes.delete(table, tuple(key))
    for row in upserts:
        key = (row[0], row[1:1 + len(_KEYS[row[0]])])
        old = current.get(key)
        if old is not None:
            rows.remove(old)
        current[key] = row
        rows.add(row)
        changes.upsert(row)
    changes.state_hash = state_hash(height, rows)
    state.apply(changes)
    return height


def add_certificate(state: StateDatabase, record: CertificateRecord) -> CertificateRecord:
    """Commit ``record`` (issued, or pending with an empty ``der``) in a block of its
    own; the record as the state now holds it (what the publishers are told)."""
    placed = dataclasses.replace(record, height=state.height() + 1, position=0)
    commit_block(state, certificate_rows(placed))
    stored = state.certificate(record.serial)
    assert stored is not None
    return stored


def revoke_certificate(state: StateDatabase, serial: str, at: float,
                       reason: str = "superseded") -> CertificateRecord:
    """Commit the revocation of ``serial`` at ``at``; the record as the state now holds it."""
    record = state.certificate(serial)
    assert record is not None, f"no certificate {serial} in the state"
    commit_block(state, [certificate_row(dataclasses.replace(
        record, revoked_at=at, revocation_reason=reason))])
    revoked = state.certificate(serial)
    assert revoked is not None
    return revoked


class SoleValidator:
    """The decisions of a one-validator cluster without a network: what
    :class:`handlers.replica.DecisionLog` is to ``DnsService`` and the CA, with the
    consensus rounds left out. Each decision is sealed, committed at once in a block of
    its own and executed by a real :class:`CaStateMachine`, which writes the state and
    tells ``publishers``; decisions submitted together are committed one after the
    other, in the order they were submitted.

    :param data: where the CT log's tiles and this validator's keys go.
    """

    entry = "validator-1"

    def __init__(self, *, state: StateDatabase, data: DataDirectory, publishers: Publishers,
                 clock: Callable[[], float], domains: Sequence[str]) -> None:
        self.state = state
        self.clock = clock
        self._key = ed25519.Ed25519PrivateKey.generate()
        self.audited: list[tuple[str, dict[str, Any]]] = []
        self._chain = asyncio.Lock()
        root_der = make_ca().root_der
        ct = CtLog(tiles=data.ct_tiles(), state=state,
                   keystore=SoftwareKeyStore(data.root / "validator-keys"),
                   origin="trustchain.test/ct", clock=clock)
        ct.open()
        self.machine = CaStateMachine(
            state=state, ct=ct, chains=ChainValidator([root_der], clock=clock),
            policy=NamingPolicy(domains=tuple(domains)), root_der=root_der, node_names={},
            publishers=publishers, audit=self._audit, epoch_length=3600, lifetime=DAY,
            backdate=300, minimum_stake=0, development=True, clock=clock)

    async def _audit(self, records: Sequence[tuple[str, dict[str, Any]]]) -> None:
        self.audited.extend(records)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def commit(self, decision: Decision, *, checked: bool = False) -> Outcome:
        """Commit ``decision`` in the next block, at the clock's time; its outcome."""
        machine = self.machine
        async with self._chain:
            # the state as the file holds it: blocks written beside this machine count
            # too, and their rows must match their stored hash
            await machine.open()
            assert machine.corrupt is None, machine.corrupt
            block = Block(height=machine.height + 1,
                          previous=self.state.meta("block_id") or bytes(32),
                          time_ms=self.now_ms(), proposer=self.entry,
                          decisions=(seal(decision.body(), self.entry, self._key.sign),),
                          app_hash=machine.state_hash)
            executed = await machine.execute(block)
        (outcome,) = executed.outcomes
        assert isinstance(outcome, Outcome)
        return dataclasses.replace(outcome, block_hash=block.id, block_height=block.height)
