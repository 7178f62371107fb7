"""The CA as a replicated state machine: every validator executes every block the same way.

:meth:`CaStateMachine.execute` applies one committed block to the state, in
the order of its decisions, with the block's time as the only clock: an
issuance reserves its names and logs its precertificate, the signed
certificate completes it, a revocation, a DNS registration, a CT submission,
a validator's keys, a stake credit each change what they name. The outcome
of each decision (accepted, or refused with a code and reason) is the same on
every validator, because it depends only on the state before the block and
the block. All of a block's changes, with the height and the state hash they
bring, are written in one transaction; the CT tiles they refer to are staged
on disk first. Only then are the publishers (DNS, ``fp.watch``) and the
audit log told.

The state hash is the multiset hash of every replicated row (:mod:`store`)
with the height; the next block carries it, so a validator whose state has
diverged sees it at once. :meth:`CaStateMachine.open` recomputes it from the
file: state edited at rest is caught before the validator votes again.

What needs a signature check or the proofs is checked before a validator
votes (:mod:`._rules`); what depends on the state (who holds a name, whether
a serial exists, whether work was used) is decided here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from protocol import TrustChainError, renewal_statement, revocation_statement
from protocol.ct_structs import (
    PRECERT_ENTRY,
    SignatureError,
    SignedCertificateTimestamp,
    StructureError,
    TimestampedEntry,
    certificate_of,
    embedded_scts,
    issuer_key_hash,
    parse_sct_list,
    precert_tbs,
    verify_sct,
)
from protocol.decisions import (
    CompactCertificate,
    Decision,
    DecisionError,
    Issue,
    LogChain,
    Misissued,
    NodeCertificate,
    Register,
    Revoke,
    SignedCertificate,
    StakeCredit,
    ValidatorKeys,
)
from protocol.ops import dns as dns_ops
from protocol.ops.consensus import key_id, parse_proofs, work_hash, work_prefix
from store import (
    CertificateRecord,
    FingerprintRecord,
    MultisetHash,
    StateChanges,
    StateDatabase,
    certificate_row,
    registration_row,
    state_hash,
    stored_record,
    verify_signature,
)

from ..ca import (
    CertificateIssued,
    CertificateRevoked,
    LogPosition,
    NamingPolicy,
    Publishers,
    check_request,
)
from ..ca._policy import CheckedRequest, check_ownership, is_address
from ..ca._profile import (
    ProfileError,
    assemble_certificate,
    check_certificate,
    check_precertificate,
)
from ..consensus import Executed, SealError
from ..consensus.bft import Block
from ..ct import ChainValidator, CheckedChain, CtLog, Logged
from ..ct._log import Entry
from ._directory import Announced, Intermediate, ValidatorDirectory, parse_announced
from ._read import MalformedDecision, read_sealed

log = logging.getLogger("trustchain.replica")

AuditRecords = Callable[[Sequence[tuple[str, dict[str, Any]]]], Awaitable[Any]]
"""``async (records)``: ``(kind, data)`` audit records, written together."""

MAX_DECISION_AGE_MS = 600_000
"""A decision sealed more than this before its block's time is stale and refused."""
MAX_CLOCK_AHEAD_MS = 5_000
"""Nor may it be sealed further ahead of its block's time than this."""
PENDING_HOLDS_NAMES_MS = 600_000
"""How long an issuance waiting for its signed certificate holds its names."""
PRECERTIFICATE_NOT_EVIDENCE = (
    "a precertificate is not evidence: an issue decision carries its signed "
    "precertificate before any block commits it (a refused or lost decision leaves one)")
STATEMENT_WINDOW = 300
"""Seconds a signed statement's time may differ from its block's time."""
RECORDS_KEPT = 4096
"""Certificate records (or "no such serial") of the state kept in memory, the most
recently used: an issuance's signed certificate, a renewal or a revocation usually
follows within a few blocks, and finds its record without reading the file."""


@dataclass(frozen=True)
class Outcome:
    """What executing one decision did: accepted, or refused with an error code."""

    accepted: bool
    code: str = ""
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    value: dict[str, Any] = field(default_factory=dict)
    logged: Logged | None = None
    """Where the CT log holds the entry the decision added, if it added one."""
    block_hash: bytes | None = None
    """The block that committed the decision, its height, the decision's index in it,
    the commit's round, its precommit signatures and the chain id they sign for: all
    that the signatures cover (filled in for the validator that submitted it)."""
    block_height: int | None = None
    index: int | None = None
    round: int | None = None
    chain_id: str | None = None
    signatures: list[dict[str, Any]] = field(default_factory=list)


def refused(code: str, message: str, **details: Any) -> Outcome:
    return Outcome(accepted=False, code=code, message=message, details=details)


@dataclass
class _Pending:
    """A decision whose outcome waits for its CT entry's place."""

    index: int
    serial: str | None
    entry: int


@dataclass
class _ReadAhead:
    """What a block's decisions will ask of the state as it was before the block, read
    with one query per kind for the whole block rather than one per decision. A key not
    read ahead is asked of the state when needed: the answer is the same, since the file
    does not change while a block executes."""

    state: StateDatabase
    works: dict[int, tuple[bytes, int] | None] = field(default_factory=dict)
    """decision index -> the work its proofs did (:meth:`CaStateMachine._work`)."""
    asked_work: set[bytes] = field(default_factory=set)
    used_work: set[bytes] = field(default_factory=set)
    claimants: dict[str, list[str]] = field(default_factory=dict)
    """name -> its claimants' serials, for every name read ahead."""
    fingerprints: dict[bytes, FingerprintRecord | None] = field(default_factory=dict)

    def work_used(self, digest: bytes) -> bool:
        if digest in self.asked_work:
            return digest in self.used_work
        return self.state.work_used(digest)

    def claimants_of(self, name: str) -> list[str]:
        found = self.claimants.get(name)
        return self.state.claimants_of([name]).get(name, []) if found is None else found

    def fingerprint(self, sha256: bytes) -> FingerprintRecord | None:
        if sha256 in self.fingerprints:
            return self.fingerprints[sha256]
        return self.state.fingerprint(sha256)


@dataclass
class _Run:
    """One block being executed: what it changed so far (later decisions see it)."""

    height: int
    time_ms: int
    changes: StateChanges
    rows: MultisetHash
    ahead: _ReadAhead
    certificates: dict[str, CertificateRecord] = field(default_factory=dict)
    """serial -> the record as this block leaves it."""
    before: dict[str, CertificateRecord | None] = field(default_factory=dict)
    """serial -> the record as the state held it (None: new)."""
    claims: dict[str, list[str]] = field(default_factory=dict)
    """name -> serials this block gave it."""
    work: set[bytes] = field(default_factory=set)
    registrations: dict[str, tuple[str, str, list[str], int] | None] = field(
        default_factory=dict)
    stake: dict[str, int] = field(default_factory=dict)
    announced: dict[str, tuple[Announced, bytes]] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    isolate: set[str] = field(default_factory=set)
    audit: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.time_ms / 1000


class CaStateMachine:
    """The replicated CA state of one validator.

    :param chains: checks chains submitted to the CT log (at the block's time).
    :param node_names: validator id -> the names its own TLS certificate may carry.
    :param publishers: told of certificates issued and revoked, once committed.
    :param audit: ``async (records)`` (``AuditLog.append_all_async``); records what this
        validator executed, a block's records at once (one write, one flush).
    :param epoch_length: seconds per proof epoch (used work of old epochs is dropped).
    :param directory: every validator's announced keys, kept up to date here (others read
        it: the CA, ``fp.verify``).
    :param me: this validator's id. It does not verify again the signatures it made
        itself (its precertificates, certificates and SCTs: it made them from what the
        block fixed); every other validator does, and a block it got wrong would show as
        a diverged state hash.
    """

    def __init__(self, *, state: StateDatabase, ct: CtLog, chains: ChainValidator,
                 policy: NamingPolicy, root_der: bytes, node_names: Mapping[str, frozenset[str]],
                 publishers: Publishers, audit: AuditRecords, epoch_length: int, lifetime: float,
                 backdate: float, minimum_stake: int, development: bool,
                 directory: ValidatorDirectory | None = None, me: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.me = me
        self.ct = ct
        self.chains = chains
        self.policy = policy
        self.root_der = root_der
        self.node_names = dict(node_names)
        self.publishers = publishers
        self._audit = audit
        self.epoch_length = epoch_length
        self.lifetime = lifetime
        self.backdate = backdate
        self.minimum_stake = minimum_stake
        self.development = development
        self.clock = clock
        self.directory = directory if directory is not None else ValidatorDirectory()
        self.rows = MultisetHash()
        self.height = 0
        self.state_hash = state_hash(0, self.rows)
        self.corrupt: str | None = None
        """Why the stored state cannot be trusted (it does not match its hash)."""
        self.checkpoints: dict[str, tuple[int, int, int]] = {}
        """CT origin -> (size, block height, decision index) of its latest committed
        checkpoint (``consensus.checkpoint``)."""
        self.refusals: dict[str, int] = {}
        """validator id -> decisions it sealed that execution refused."""
        self.executed = 0
        self._kept: OrderedDict[str, CertificateRecord | None] = OrderedDict()
        """serial -> its record as the state after :attr:`height` holds it (None: none);
        at most :data:`RECORDS_KEPT`. Changed only after a block's changes are durable."""

    # --- opening ----------------------------------------------------------------------

    async def open(self, genesis: Mapping[str, int] | None = None) -> None:
        """Load the state and check it against its stored hash (corruption at rest).

        :param genesis: key id -> stake before the first block (the configuration's; it
            must be the same on every validator). Applied once, to an empty state.
        """
        self._kept.clear()  # the file is the authority: it may have changed meanwhile
        stored = self.state.meta("rows_hash")
        rows = MultisetHash.of(self.state.rows())
        self.height = self.state.height()
        self.rows = rows
        self.state_hash = state_hash(self.height, rows)
        if stored is None and self.height > 0:
            self.corrupt = (f"the stored state at height {self.height} has no stored hash: "
                            "it was changed outside the blocks (edited or damaged)")
            log.critical("replicated state corrupt: %s", self.corrupt)
        elif stored is not None and MultisetHash.from_bytes(stored) != rows:
            self.corrupt = (f"the stored state at height {self.height} does not match its "
                            "hash: it was changed outside the blocks (edited or damaged)")
            log.critical("replicated state corrupt: %s", self.corrupt)
        if genesis and self.height == 0 and not any(
                self.state.known(key) for key in genesis):
            rows = self.rows.copy()
            stake = [("stake", key, amount) for key, amount in sorted(genesis.items())]
            for row in stake:
                rows.add(row)
            self.state.write_genesis(stake, rows, state_hash(0, rows))
            self.rows, self.state_hash = rows, state_hash(0, rows)
            await self._audit([("consensus.stake-changed", {
                "key": key, "before": 0, "after": amount, "reason": "genesis"})
                for _, key, amount in stake])
        elif genesis and any(self.state.balance(k) != v for k, v in genesis.items()):
            log.warning("consensus.genesis differs from the stake the state holds; the state "
                        "is the authority once blocks exist (the configured genesis is "
                        "applied to an empty state only)")
        for validator, announced in self.state.validator_keys().items():
            try:
                self.directory.update(parse_announced(
                    validator, ValidatorKeys.from_announced(announced)))
            except (DecisionError, ValueError) as exc:
                log.error("the stored keys of validator %s do not parse: %s", validator, exc)

    # --- executing a block ------------------------------------------------------------

    async def execute(self, block: Block) -> Executed:
        """Apply ``block`` (the next height) to the state; durable when this returns.

        :raises StateError: the state cannot be written (the node must stop).
        """
        if block.height != self.height + 1:
            raise ValueError(f"block {block.height} does not follow the state's height "
                             f"{self.height}")
        rows = self.rows.copy()
        run = _Run(height=block.height, time_ms=block.time_ms, rows=rows,
                   changes=StateChanges(height=block.height, block_id=block.id,
                                        rows_hash=rows, state_hash=b""),
                   ahead=_ReadAhead(self.state))
        decisions: list[tuple[str, Decision] | SealError | DecisionError] = []
        for raw in block.decisions:
            try:
                decisions.append(read_sealed(raw))
            except (SealError, DecisionError) as exc:
                decisions.append(exc)
        self._read_ahead(run, decisions)
        outcomes: list[Outcome] = []
        for index, read in enumerate(decisions):
            entry = None
            try:
                if not isinstance(read, tuple):
                    raise read
                entry, decision = read
                outcome = self._apply(run, index, decision, entry)
            except (SealError, DecisionError) as exc:  # checked before commit: not expected
                outcome = refused("invalid_request", f"the decision is malformed: {exc}")
                if isinstance(exc, MalformedDecision):
                    entry = exc.entry
            if not outcome.accepted and entry is not None:
                self.refusals[entry] = self.refusals.get(entry, 0) + 1
            outcomes.append(outcome)
        self._forget_old_work(run)
        batch = self.ct.append(run.entries, run.time_ms, run.changes, run.rows)
        for pending in run.pending:
            logged = batch.logged[pending.entry]
            if pending.serial is not None:
                record = run.certificates[pending.serial]
                run.certificates[pending.serial] = dataclasses.replace(
                    record, ct_shard=logged.shard, ct_index=logged.leaf_index)
            outcomes[pending.index] = Outcome(  # an accepted issuance or CT submission
                accepted=True, value=outcomes[pending.index].value, logged=logged)
        self._certificate_rows(run)
        run.changes.state_hash = state_hash(block.height, run.rows)
        await self.ct.stage(batch)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.state.apply,
                                                             run.changes)
        except BaseException as exc:
            self.ct.abandon(f"the state of block {block.height} was not committed: {exc}")
            raise
        self.rows, self.height, self.state_hash = run.rows, block.height, run.changes.state_hash
        for serial, record in run.certificates.items():
            self._keep(serial, stored_record(record))
        self.ct.published(batch)
        await self._committed(run)
        self.executed += len(block.decisions)
        return Executed(outcomes=tuple(outcomes), app_hash=self.state_hash,
                        isolate=tuple(sorted(run.isolate)))

    def _read_ahead(self, run: _Run,
                    decisions: Sequence[tuple[str, Decision] | SealError | DecisionError]
                    ) -> None:
        """Read at once what the block's issuances and certificates will ask of the
        state: whether their serials, work and fingerprints exist, who claims their
        names. Only keys: whatever does not parse here is refused when applied."""
        ahead = run.ahead
        serials: list[str] = []
        names: set[str] = set()
        fingerprints: list[bytes] = []
        for index, read in enumerate(decisions):
            if not isinstance(read, tuple):
                continue
            decision = read[1]
            if isinstance(decision, Issue | NodeCertificate):
                try:
                    number = x509.load_der_x509_certificate(
                        decision.precertificate).serial_number
                    request = check_request(decision.csr, self.policy)
                except (ValueError, TrustChainError):
                    continue
                serials.append(format(number, "x"))
                names.update(request.names)
                if isinstance(decision, Issue):
                    ahead.works[index] = self._work(
                        "issue", hashlib.sha256(decision.csr).digest(), decision.proofs)
            elif isinstance(decision, SignedCertificate):
                fingerprints.append(hashlib.sha256(decision.certificate).digest())
            elif isinstance(decision, CompactCertificate):
                record = self._kept.get(decision.serial)  # its issuance: a few blocks ago
                if record is None or not record.pending:
                    continue
                try:
                    der = certificate_of(record.precertificate, decision.sct_list,
                                         decision.signature)
                except StructureError:
                    continue
                fingerprints.append(hashlib.sha256(der).digest())
        unknown = [serial for serial in serials if serial not in self._kept]
        if unknown:
            found = self.state.certificates(unknown)
            for serial in unknown:
                self._keep(serial, found.get(serial))
        digests = [work[0] for work in ahead.works.values() if work is not None]
        if digests:
            ahead.asked_work.update(digests)
            ahead.used_work = self.state.works_used(digests)
        if names:
            ahead.claimants = {name: [] for name in names}
            ahead.claimants.update(self.state.claimants_of(sorted(names)))
        if fingerprints:
            ahead.fingerprints = dict.fromkeys(fingerprints)
            ahead.fingerprints.update(self.state.fingerprints(fingerprints))

    def _apply(self, run: _Run, index: int, decision: Decision, entry: str) -> Outcome:
        stale = self._fresh(run, decision.at_ms)  # every decision: its seal time bounds it
        if stale is not None:
            return stale
        if isinstance(decision, Issue | NodeCertificate):
            return self._issue(run, index, decision, entry)
        if isinstance(decision, SignedCertificate | CompactCertificate):
            return self._certificate(run, decision, entry)
        if isinstance(decision, Revoke):
            return self._revoke(run, decision)
        if isinstance(decision, Register):
            return self._register(run, decision)
        if isinstance(decision, LogChain):
            return self._log(run, index, decision)
        if isinstance(decision, ValidatorKeys):
            return self._keys(run, decision, entry)
        if isinstance(decision, Misissued):
            return self._misissued(run, decision)
        if isinstance(decision, StakeCredit):
            return self._stake(run, decision)
        self.checkpoints[decision.origin] = (decision.size, run.height, index)
        return Outcome(accepted=True)

    # --- certificates -----------------------------------------------------------------

    def _record(self, run: _Run, serial: str) -> CertificateRecord | None:
        if serial in run.certificates:
            return run.certificates[serial]
        return self._stored(serial)

    def _put(self, run: _Run, record: CertificateRecord) -> None:
        if record.serial not in run.before:
            run.before[record.serial] = self._stored(record.serial)
        run.certificates[record.serial] = record

    def _stored(self, serial: str) -> CertificateRecord | None:
        """The state's record of ``serial`` before this block (None: no such serial):
        kept in memory, else read once and kept."""
        kept = self._kept
        if serial in kept:
            kept.move_to_end(serial)
            return kept[serial]
        record = self.state.certificate(serial)
        self._keep(serial, record)
        return record

    def _keep(self, serial: str, record: CertificateRecord | None) -> None:
        kept = self._kept
        kept[serial] = record
        kept.move_to_end(serial)
        if len(kept) > RECORDS_KEPT:
            kept.popitem(last=False)

    def _fresh(self, run: _Run, at_ms: int) -> Outcome | None:
        if at_ms > run.time_ms + MAX_CLOCK_AHEAD_MS:
            return refused("invalid_request", "the decision is stamped after its block")
        if at_ms < run.time_ms - MAX_DECISION_AGE_MS:
            return refused("invalid_request", "the decision is stale (sealed more than "
                           f"{MAX_DECISION_AGE_MS // 1000} s before its block)")
        return None

    def _holds(self, run: _Run, record: CertificateRecord) -> bool:
        """Whether ``record`` still holds its names at the block's time."""
        if record.revoked_at is not None:
            return False
        if record.pending:
            return record.issued_at * 1000 + PENDING_HOLDS_NAMES_MS > run.time_ms
        return record.not_after > run.seconds

    def _holders(self, run: _Run, name: str) -> list[tuple[str, str, float]]:
        serials = {*run.ahead.claimants_of(name), *run.claims.get(name, ())}
        held = []
        for serial in sorted(serials):
            record = self._record(run, serial)
            if record is not None and self._holds(run, record):
                held.append((record.serial, record.spki_sha256, record.not_after))
        return held

    def _issue(self, run: _Run, index: int, decision: Issue | NodeCertificate,
               entry: str) -> Outcome:
        try:
            request = check_request(decision.csr, self.policy)
        except TrustChainError as exc:  # checked before commit
            return refused(exc.code.value, exc.message, **exc.details)
        found = self._issuer(run, entry, decision, request)
        if isinstance(found, Outcome):
            return found
        issuer, precert = found
        names = request.names  # built anew at each reading
        serial = format(precert.serial_number, "x")
        if self._record(run, serial) is not None:
            return refused("invalid_request", f"serial {serial} is already taken")
        kind = "node"
        if isinstance(decision, Issue):
            kind = "client"
            work = run.ahead.works[index] if index in run.ahead.works else self._work(
                "issue", hashlib.sha256(decision.csr).digest(), decision.proofs)
            problem = (self._use_work(run, work)
                       or self._check_names(run, request, decision))
            if problem is not None:
                return problem
        record = CertificateRecord(
            serial=serial, der=b"", fingerprint="", spki_sha256=request.spki_sha256,
            issuer=issuer.fingerprint, not_before=precert.not_valid_before_utc.timestamp(),
            not_after=precert.not_valid_after_utc.timestamp(), issued_at=run.seconds,
            revoked_at=None, revocation_reason=None, names=names, validator=entry,
            kind=kind, precertificate=decision.precertificate, height=run.height,
            position=index)
        self._put(run, record)
        for position, name in enumerate(names):
            run.claims.setdefault(name, []).append(serial)
            row = ("names", name, serial, position)
            run.changes.upsert(row)
            run.rows.add(row)
        run.pending.append(_Pending(index=index, serial=serial, entry=len(run.entries)))
        run.entries.append(Entry(chain=self._precert_chain(decision.precertificate, issuer.der,
                                                           issuer.certificate, request, names),
                                 precert=True))
        return Outcome(accepted=True, value={"serial": serial})

    def _issuer(self, run: _Run, entry: str, decision: Issue | NodeCertificate,
                request: CheckedRequest) -> tuple[Intermediate, x509.Certificate] | Outcome:
        """The entry's announced intermediate that signed the precertificate, if the
        precertificate is exactly what the request and the profile allow."""
        announced = self._announced(run, entry)
        if announced is None:
            return refused("unavailable", f"validator {entry} has announced no issuing "
                           "intermediate")
        problem = "no intermediate"
        for intermediate in reversed(announced.intermediates):
            try:
                precert = check_precertificate(
                    decision.precertificate, request=request, issuer=intermediate.certificate,
                    at_ms=decision.at_ms, lifetime=self.lifetime, backdate=self.backdate,
                    verify=entry != self.me)
            except ProfileError as exc:
                problem = str(exc)
                continue
            return intermediate, precert
        return refused("invalid_request", f"precertificate: {problem}")

    def _check_names(self, run: _Run, request: CheckedRequest, decision: Issue
                     ) -> Outcome | None:
        renews = None
        if decision.renews is not None and decision.renewal_signature is not None:
            renews = decision.renews
            old = self._record(run, renews)
            if old is None or old.pending or not self._holds(run, old):
                return refused("unauthorized", f"certificate {renews} is unknown, revoked or "
                               "expired; it cannot hand its names on", field="renews")
            key = x509.load_der_x509_certificate(old.der).public_key()
            if not verify_signature(key, decision.renewal_signature,
                                    renewal_statement(renews, decision.csr)):
                return refused("unauthorized", "renewal_signature is not a signature of "
                               f"certificate {renews}'s key over this CSR",
                               field="renewal_signature")
        holders = {name: self._holders(run, name) for name in request.names}
        try:
            check_ownership(request, holders, self.policy, renews)
        except TrustChainError as exc:
            return refused(exc.code.value, exc.message, **exc.details)
        return None

    def _precert_chain(self, precertificate: bytes, issuer_der: bytes,
                       issuer: x509.Certificate, request: CheckedRequest,
                       names: tuple[str, ...]) -> CheckedChain:
        return CheckedChain(leaf_der=precertificate, issuers=(issuer_der, self.root_der),
                            issuer_key_hash=issuer_key_hash(issuer),
                            tbs=precert_tbs(precertificate), names=names,
                            spki_sha256=bytes.fromhex(request.spki_sha256))

    def _certificate(self, run: _Run, decision: SignedCertificate | CompactCertificate,
                     entry: str) -> Outcome:
        """A pending issuance's signed certificate: whole (:class:`SignedCertificate`, as
        earlier versions made it) or assembled from the committed precertificate, the SCT
        list and the signature (:class:`CompactCertificate`)."""
        record = self._record(run, decision.serial)
        if record is None:
            return refused("not_found", f"no committed issuance with serial {decision.serial}",
                           field="serial")
        if not record.pending:
            if record.der == self._assembled(record, decision):
                return Outcome(accepted=True, value={"serial": record.serial})
            return refused("invalid_request", f"certificate {record.serial} is already signed")
        issuer = self.directory.intermediate(record.issuer)
        if issuer is None:
            return refused("unavailable", "the issuing intermediate is not announced")
        own = record.validator == entry == self.me  # signed and sealed by this validator
        if isinstance(decision, CompactCertificate):
            try:
                scts = [SignedCertificateTimestamp.parse(sct)
                        for sct in parse_sct_list(decision.sct_list)]
            except StructureError as exc:
                return refused("invalid_request", f"certificate {record.serial}: its SCT "
                               f"list cannot be read: {exc}")
            try:
                der = assemble_certificate(precertificate=record.precertificate,
                                           sct_list=decision.sct_list,
                                           signature=decision.signature,
                                           issuer=issuer.certificate, verify=not own)
            except ProfileError as exc:
                return refused("invalid_request", f"certificate {record.serial}: {exc}")
        else:
            der = decision.certificate
            try:
                cert = check_certificate(der, precertificate=record.precertificate,
                                         issuer=issuer.certificate, verify=not own)
            except ProfileError as exc:
                if self._signed_by(der, issuer.certificate):
                    self._isolate(run, record.validator, "misissuance")
                    run.audit.append(("consensus.misissuance", {
                        "validator": record.validator, "serial": record.serial,
                        "reason": str(exc)}))
                return refused("invalid_request", f"certificate {record.serial}: {exc}")
            try:
                scts = embedded_scts(cert)
            except Exception as exc:
                return refused("invalid_request", f"certificate {record.serial}: its SCT "
                               f"list cannot be read: {exc}")
        problem = None if own else self._check_scts(scts, issuer.certificate, record)
        if problem is not None:
            return refused("invalid_request", f"certificate {record.serial}: {problem}")
        self._store_certificate(run, record, der)
        return Outcome(accepted=True, value={"serial": record.serial})

    @staticmethod
    def _assembled(record: CertificateRecord,
                   decision: SignedCertificate | CompactCertificate) -> bytes | None:
        """The certificate DER ``decision`` makes of ``record`` (None: it makes none)."""
        if isinstance(decision, SignedCertificate):
            return decision.certificate
        try:
            return certificate_of(record.precertificate, decision.sct_list, decision.signature)
        except StructureError:
            return None

    def _store_certificate(self, run: _Run, record: CertificateRecord, der: bytes) -> None:
        """Complete the pending ``record`` with its signed certificate: the record, its
        fingerprint and the fingerprint's names (in place of a ``ct.add-chain`` one)."""
        digest = hashlib.sha256(der).digest()
        done = dataclasses.replace(record, der=der, fingerprint=digest.hex())
        self._put(run, done)
        logged = run.ahead.fingerprint(digest)
        if logged is not None:  # submitted with ct.add-chain first: the issued row replaces it
            run.rows.remove(("fingerprints", logged.sha256, logged.spki_sha256, logged.kind,
                             logged.shard, logged.leaf_index, logged.serial,
                             round(logged.first_seen * 1000)))
            for name in logged.names:
                run.rows.remove(("fingerprint_names", name, logged.sha256))
        row = ("fingerprints", digest, bytes.fromhex(record.spki_sha256),
               "issued", record.ct_shard, record.ct_index, record.serial, run.time_ms)
        run.changes.upsert(row)
        run.rows.add(row)
        for name in record.names:
            name_row = ("fingerprint_names", name, digest)
            run.changes.upsert(name_row)
            run.rows.add(name_row)
        run.issued.append(record.serial)

    @staticmethod
    def _signed_by(der: bytes, issuer: x509.Certificate) -> bool:
        try:
            x509.load_der_x509_certificate(der).verify_directly_issued_by(issuer)
        except Exception:
            return False
        return True

    def _check_scts(self, scts: Sequence[SignedCertificateTimestamp],
                    issuer: x509.Certificate, record: CertificateRecord) -> str | None:
        """At least one of the certificate's SCTs, of a validator's log for this entry,
        verifies over the committed precertificate's entry (its TBS, which the
        certificate's is with the SCT list in the poison's place)."""
        signed_entry: bytes | None = None
        for sct in scts:
            found = self.directory.log_key(sct.log_id)
            if found is None:
                continue
            _, shard, spki = found
            if shard != record.ct_shard:
                continue
            if signed_entry is None:
                signed_entry = TimestampedEntry(
                    timestamp=0, entry_type=PRECERT_ENTRY,
                    issuer_key_hash=issuer_key_hash(issuer),
                    tbs_certificate=precert_tbs(record.precertificate)).signed_entry()
            try:
                verify_sct(sct, _log_key(spki), PRECERT_ENTRY, signed_entry)
            except SignatureError:
                return "an embedded SCT does not verify"
            if sct.extensions and record.ct_index is not None:
                try:
                    index = sct.leaf_index
                except StructureError:
                    return "an embedded SCT has no leaf index"
                if index != record.ct_index:
                    return "an embedded SCT is for another log entry"
            return None
        return "it carries no SCT of a validator's log for its entry"

    # --- revocation, registration -------------------------------------------------------

    def _revoke(self, run: _Run, decision: Revoke) -> Outcome:
        record = self._record(run, decision.serial)
        if record is None:
            return refused("not_found", f"no certificate with serial {decision.serial}",
                           field="serial")
        if record.revoked_at is not None:
            return Outcome(accepted=True, value={
                "serial": record.serial, "revoked_at": int(record.revoked_at),
                "reason": record.revocation_reason, "already_revoked": True})
        if abs(run.seconds - decision.time) > STATEMENT_WINDOW:
            return refused("unauthorized", "the revocation statement's time is more than "
                           f"{STATEMENT_WINDOW} s from the block's time", field="time")
        statement = revocation_statement(record.serial, decision.reason, decision.time)
        if decision.admin_certificate is not None:
            fingerprint = hashlib.sha256(decision.admin_certificate).hexdigest()
            if fingerprint not in self.directory.admins():
                return refused("unauthorized", "admin_certificate is not an administrator "
                               "certificate of this CA", field="admin_certificate")
            key = x509.load_der_x509_certificate(decision.admin_certificate).public_key()
            by = f"admin:{fingerprint}"
        else:
            key = x509.load_der_x509_certificate(record.der or record.precertificate
                                                 ).public_key()
            by = "holder"
        if not verify_signature(key, decision.signature, statement):
            return refused("unauthorized", "the signature does not prove possession of the "
                           + ("administrator's" if by != "holder" else "certificate's")
                           + " key", field="signature")
        problem = self._use_work(run, self._work(
            "revoke", hashlib.sha256(statement).digest(), decision.proofs))
        if problem is not None:
            return problem
        self._put(run, dataclasses.replace(record, revoked_at=run.seconds,
                                           revocation_reason=decision.reason))
        run.revoked.append(record.serial)
        run.audit.append(("ca.revoked", {"serial": record.serial, "reason": decision.reason,
                                         "by": by, "block_height": run.height}))
        return Outcome(accepted=True, value={
            "serial": record.serial, "revoked_at": int(run.seconds), "reason": decision.reason,
            "already_revoked": False})

    def _register(self, run: _Run, decision: Register) -> Outcome:
        record = self._record(run, decision.serial)
        if record is None or record.pending:
            return refused("not_found", f"no certificate with serial {decision.serial}",
                           field="serial")
        if record.revoked_at is not None or record.not_after <= run.seconds:
            return refused("unauthorized", f"certificate {record.serial} is revoked or expired",
                           field="serial")
        name = decision.name
        if name not in record.names or name.startswith("*.") or is_address(name):
            return refused("unauthorized", f"certificate {record.serial} does not carry the "
                           f"DNS name {name!r}", field="name")
        if abs(run.seconds - decision.time) > STATEMENT_WINDOW:
            return refused("unauthorized", "the registration statement's time is more than "
                           f"{STATEMENT_WINDOW} s from the block's time", field="time")
        previous = (run.registrations[name] if name in run.registrations
                    else self.state.registrations().get(name))
        if previous is not None and previous[0] == record.spki_sha256 \
                and decision.time <= previous[3]:
            return refused("unauthorized", "a registration at this time or later is already "
                           "recorded (replayed statement?)", field="time")
        statement = dns_ops.registration_statement(record.serial, name,
                                                   list(decision.addresses), decision.time)
        key = x509.load_der_x509_certificate(record.der).public_key()
        if not verify_signature(key, decision.signature, statement):
            return refused("unauthorized", "the signature does not prove possession of the "
                           "certificate's key", field="signature")
        stored = self.state.registrations().get(name)
        old = run.registrations.get(name, stored)
        if old is not None:
            run.rows.remove(registration_row(name, *old))
        if decision.addresses:
            new = (record.spki_sha256, record.serial, list(decision.addresses), decision.time)
            row = registration_row(name, *new)
            run.changes.upsert(row)
            run.rows.add(row)
            run.registrations[name] = new
        else:
            run.changes.delete("registrations", (name,))
            run.registrations[name] = None
        return Outcome(accepted=True, value={"name": name, "serial": record.serial,
                                             "addresses": list(decision.addresses)})

    # --- CT, keys, evidence, stake --------------------------------------------------------

    def _log(self, run: _Run, index: int, decision: LogChain) -> Outcome:
        try:
            chain = self.chains.check(list(decision.chain), precert=decision.precert,
                                      at=run.seconds)
        except TrustChainError as exc:
            return refused(exc.code.value, exc.message, **exc.details)
        run.pending.append(_Pending(index=index, serial=None, entry=len(run.entries)))
        run.entries.append(Entry(chain=chain, precert=decision.precert))
        return Outcome(accepted=True)

    def _announced(self, run: _Run, validator: str) -> Announced | None:
        if validator in run.announced:
            return run.announced[validator][0]
        return self.directory.of(validator)

    def _keys(self, run: _Run, decision: ValidatorKeys, entry: str) -> Outcome:
        try:
            announced = parse_announced(entry, decision)
        except ValueError as exc:  # checked before commit
            return refused("invalid_request", f"the keys do not parse: {exc}")
        data = decision.announced()
        stored = self.state.validator_keys().get(entry)
        old = run.announced[entry][1] if entry in run.announced else stored
        if old is not None:
            run.rows.remove(("validator_keys", entry, old))
        row = ("validator_keys", entry, data)
        run.changes.upsert(row)
        run.rows.add(row)
        run.announced[entry] = (announced, data)
        return Outcome(accepted=True)

    def _misissued(self, run: _Run, decision: Misissued) -> Outcome:
        try:
            cert = x509.load_der_x509_certificate(decision.certificate)
        except ValueError:
            return refused("invalid_request", "not a DER certificate")
        if is_precertificate(cert):
            return refused("invalid_request", PRECERTIFICATE_NOT_EVIDENCE)
        issuer = self.directory.issuer_of(cert)
        if issuer is None:
            return refused("invalid_request", "no validator's intermediate signed it")
        record = self._record(run, format(cert.serial_number, "x"))
        if record is not None and record.issuer == issuer.fingerprint:
            if record.der == decision.certificate:
                return refused("invalid_request", "it is a committed certificate")
            try:
                check_certificate(decision.certificate, precertificate=record.precertificate,
                                  issuer=issuer.certificate)
                return refused("invalid_request", "it is the committed issuance, signed")
            except ProfileError:
                pass
            try:
                if cert.tbs_certificate_bytes == x509.load_der_x509_certificate(
                        record.precertificate).tbs_certificate_bytes:
                    return refused("invalid_request", "it is the committed precertificate")
            except ValueError:
                pass
        self._isolate(run, issuer.validator, "misissuance")
        run.audit.append(("consensus.misissuance", {
            "validator": issuer.validator, "serial": format(cert.serial_number, "x"),
            "fingerprint": hashlib.sha256(decision.certificate).hexdigest()}))
        return Outcome(accepted=True, value={"offender": issuer.validator})

    def _isolate(self, run: _Run, validator: str, reason: str) -> None:
        """Record that the block proved ``validator`` faulty: the chain isolates it (power
        0 from the next height), and the state keeps it, so that a restart does too."""
        if validator in run.isolate:
            return
        run.isolate.add(validator)
        if validator not in self.state.isolated():
            row = ("isolated", validator, run.height, reason)
            run.changes.upsert(row)
            run.rows.add(row)

    def paused(self) -> str | None:
        """Why executing blocks waits now (the CT tiles' object store cannot be reached),
        else None: new decisions are refused meanwhile rather than queued."""
        if self.ct.unreachable is None:
            return None
        return f"its CT tiles' object store cannot be reached: {self.ct.unreachable}"

    def isolated(self) -> frozenset[str]:
        """The validators the executed blocks proved faulty."""
        return frozenset(self.state.isolated())

    def _stake(self, run: _Run, decision: StakeCredit) -> Outcome:
        before = run.stake.get(decision.key_id, self.state.balance(decision.key_id))
        if self.state.known(decision.key_id) or decision.key_id in run.stake:
            run.rows.remove(("stake", decision.key_id, before))
        row = ("stake", decision.key_id, decision.amount)
        run.changes.upsert(row)
        run.rows.add(row)
        run.stake[decision.key_id] = decision.amount
        run.audit.append(("consensus.stake-changed", {
            "key": decision.key_id, "before": before, "after": decision.amount,
            "reason": decision.reason}))
        return Outcome(accepted=True, value={"key_id": decision.key_id,
                                             "amount": decision.amount})

    # --- used work --------------------------------------------------------------------

    @staticmethod
    def _work(op: Any, request: bytes, raw: Any) -> tuple[bytes, int] | None:
        try:
            proofs = parse_proofs(raw)
        except Exception:
            return None
        return (work_hash(work_prefix(op, request, key_id(proofs.requester_key), proofs.epoch),
                          proofs.nonce), proofs.epoch)

    def _use_work(self, run: _Run, work: tuple[bytes, int] | None) -> Outcome | None:
        if work is None:
            return refused("proof_invalid", "the proofs cannot be read", proof="work")
        digest, epoch = work
        if digest in run.work or run.ahead.work_used(digest):
            return refused("proof_invalid", "this proof of work was already used (a replayed "
                           "request); every request needs fresh work", proof="work")
        run.work.add(digest)
        row = ("used_work", digest, epoch)
        run.changes.upsert(row)
        run.rows.add(row)
        return None

    def _forget_old_work(self, run: _Run) -> None:
        """Drop used work of epochs no longer accepted (the block's epoch minus two)."""
        epoch = int(run.seconds // self.epoch_length)
        for digest, old in self.state.stale_work(epoch - 1):
            if digest in run.work:
                continue
            run.changes.delete("used_work", (digest,))
            run.rows.remove(("used_work", digest, old))

    # --- committing -------------------------------------------------------------------

    def _certificate_rows(self, run: _Run) -> None:
        for serial, record in run.certificates.items():
            old = run.before.get(serial)
            if old is not None:
                run.rows.remove(certificate_row(old))
            row = certificate_row(record)
            run.changes.upsert(row)
            run.rows.add(row)

    async def _committed(self, run: _Run) -> None:
        """After the commit: the directory, the publishers and the audit log hear of it."""
        for announced, _ in run.announced.values():
            self.directory.update(announced)
        for serial in run.issued:
            record = run.certificates[serial]
            logged = None
            if record.ct_shard is not None and record.ct_index is not None:
                logged = LogPosition(shard=record.ct_shard, leaf_index=record.ct_index,
                                     log_id=self.ct.shard(record.ct_shard).log_id)
            self.publishers.issued(CertificateIssued(record=record, logged=logged))
            run.audit.append(("ca.issued", {
                "serial": record.serial, "fingerprint": record.fingerprint,
                "names": list(record.names), "spki_sha256": record.spki_sha256,
                "validator": record.validator, "not_after": int(record.not_after),
                "admission": "consensus", "block_height": run.height}))
        for serial in run.revoked:
            self.publishers.revoked(CertificateRevoked(record=run.certificates[serial]))
        for name in run.registrations:
            self.publishers.registration_changed(name)
        if run.audit:
            await self._audit(run.audit)



@functools.lru_cache(maxsize=64)
def _log_key(spki: bytes) -> Any:
    """A validator log's public key, parsed once (every SCT check of its log needs it)."""
    return serialization.load_der_public_key(spki)


def check_fresh(at_ms: int, now_ms: int) -> str | None:
    """Why a decision sealed at ``at_ms`` is not fresh at ``now_ms`` (None if it is)."""
    if abs(now_ms - at_ms) > MAX_DECISION_AGE_MS // 2:
        return "it is stamped more than 5 minutes from this validator's clock"
    return None


def is_precertificate(cert: x509.Certificate) -> bool:
    """Whether ``cert`` carries the CT poison (RFC 6962 §3.1): not usable for TLS."""
    try:
        cert.extensions.get_extension_for_oid(ExtensionOID.PRECERT_POISON)
    except x509.ExtensionNotFound:
        return False
    return True
