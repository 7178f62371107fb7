"""This validator's side of the replicated CA: its decisions, its keys, and what it reports.

- :class:`DecisionLog` seals a decision with this validator's key, submits it
  to the chain and answers with its outcome once a block has committed and
  executed it: what the CA, the CT log and the DNS service use to change
  anything.
- :class:`KeysAnnouncer` keeps the validator's announced keys (issuing
  intermediates, CT log keys, DNSSEC keys, administrators) up to date in the
  replicated state.
- :class:`ReplicaService` answers ``consensus.check-certificate`` (is this
  certificate one the cluster committed?) and adds the state to
  ``consensus.status``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509

from protocol import (
    ConsensusRejected,
    InvalidRequest,
    TrustChainError,
    Unavailable,
    error_from_wire,
)
from protocol.decisions import Decision, Misissued, ValidatorKeys
from protocol.ops import consensus as ops
from store import CertificateRecord

from .._router import RequestContext, Router
from .._tasks import cancel_and_wait
from ..ca._profile import ProfileError, check_certificate
from ..consensus import ConsensusChain, Sealer
from ..ct import UNREACHABLE_RETRY_AFTER
from ._machine import (
    PRECERTIFICATE_NOT_EVIDENCE,
    CaStateMachine,
    Outcome,
    is_precertificate,
)
from ._read import remember

log = logging.getLogger("trustchain.replica")



def raise_refused(outcome: Outcome) -> None:
    """Raise the error a refused decision's outcome names (its code, message, details)."""
    if not outcome.accepted:
        raise error_from_wire({**outcome.details, "code": outcome.code,
                               "message": outcome.message})


class DecisionLog:
    """Seals this validator's decisions and waits for their outcome.

    :param sealer: seals with this validator's key (its id is ``sealer.entry``).
    :param timeout: seconds a decision may take to be committed and executed.
    """

    def __init__(self, *, chain: ConsensusChain, machine: CaStateMachine, sealer: Sealer,
                 timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.chain = chain
        self.machine = machine
        self.sealer = sealer
        self.timeout = timeout
        self.clock = clock

    @property
    def entry(self) -> str:
        """This validator's id (the entry of its decisions)."""
        return self.sealer.entry

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def commit(self, decision: Decision, *, checked: bool = False) -> Outcome:
        """Submit ``decision``; its outcome once executed (accepted or refused).

        :param checked: this validator checked it already (it made it).
        :raises ConsensusRejected: a validator's check refused it, or the chain stopped.
        :raises Timeout: not committed within the timeout (it may still be later).
        :raises Unavailable: this validator cannot execute blocks now (its storage).
        """
        paused = self.machine.paused()
        if paused is not None:
            raise Unavailable(f"this validator cannot take new operations now: {paused}; "
                              "try again shortly", retry_after=UNREACHABLE_RETRY_AFTER)
        sealed = await self.sealer.seal(decision.body())
        remember(sealed, self.entry, decision)  # executing it will not read it again
        committed = await self.chain.submit(sealed, checked=checked, timeout=self.timeout)
        outcome = committed.outcome
        if not isinstance(outcome, Outcome):  # committed before a restart: no outcome kept
            raise ConsensusRejected("the decision was committed before this validator "
                                    "restarted; ask again for its result")
        return dataclasses.replace(outcome, block_hash=committed.block_hash,
                                   block_height=committed.block.height,
                                   index=committed.index, round=committed.commit.round,
                                   chain_id=self.chain.chain_id,
                                   signatures=committed.signatures())


class KeysAnnouncer:
    """Announces this validator's keys whenever they differ from what the state holds.

    :param local: what this validator signs with now (a ``keys`` decision's content).
    :param active: the DER of the intermediate this validator issues with now.
    :param interval: seconds between comparisons.
    """

    def __init__(self, *, log_: DecisionLog, local: Callable[[int], ValidatorKeys],
                 active: Callable[[], bytes], interval: float = 10.0) -> None:
        self.decisions = log_
        self.local = local
        self.active = active
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.announced = 0

    def current(self) -> bool:
        """Whether the state holds what this validator signs with now."""
        mine = self.decisions.machine.directory.of(self.decisions.entry)
        return mine is not None and mine.keys.announced() == self.local(0).announced()

    def ready(self) -> bool:
        """Whether the state holds the intermediate this validator issues with (cheap:
        asked before every issuance)."""
        mine = self.decisions.machine.directory.of(self.decisions.entry)
        return mine is not None and mine.active.der == self.active()

    async def announce(self) -> None:
        """Commit this validator's keys if the state lacks them; returns once it holds them.

        :raises ConsensusRejected: refused; :raises Timeout: no commit in time.
        """
        async with self._lock:
            if self.current():
                return
            outcome = await self.decisions.commit(self.local(self.decisions.now_ms()),
                                                  checked=False)
            raise_refused(outcome)
            self.announced += 1
        log.info("validator keys announced", extra={"validator": self.decisions.entry})

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.announce()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("validator keys not announced yet: %s", exc)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


EVIDENCE_DELAY = 2.0
"""Seconds between finding a certificate no block allows and submitting it as evidence."""
MAX_EVIDENCE_PENDING = 1024
"""Fingerprints of misissued certificates already submitted (not submitted twice)."""


class ReplicaService:
    """``consensus.check-certificate``, and the state in ``consensus.status``.

    :param decisions: where evidence of a misissuance goes (None: an observer, which
        only reports it).
    """

    def __init__(self, *, machine: CaStateMachine, decisions: DecisionLog | None) -> None:
        self.machine = machine
        self.decisions = decisions
        self._evidence: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def status(self) -> dict[str, Any]:
        machine = self.machine
        return {"state": {"height": machine.height, "hash": machine.state_hash,
                          "corrupt": machine.corrupt, "executed": machine.executed,
                          "validators": len(machine.directory.validators())},
                "refused": dict(sorted(machine.refusals.items()))}

    def check_certificate(self, args: ops.CheckCertificateArgs,
                          ctx: RequestContext) -> dict[str, Any]:
        """Whether a certificate is one a block committed (spec §18.6); one signed by a
        validator's intermediate that no block allows is evidence, and is submitted."""
        try:
            cert = x509.load_der_x509_certificate(args.certificate)
        except ValueError:
            raise InvalidRequest("certificate is not a DER X.509 certificate",
                                 field="certificate") from None
        record, reason = self._verdict(cert, args.certificate)
        if record is not None:
            return {"committed": True, "block_height": record.height,
                    "index": record.position, "block_hash": self.machine_block_id(record.height),
                    "reason": None}
        return {"committed": False, "block_height": None, "index": None, "block_hash": None,
                "reason": reason}

    def examine(self, der: bytes) -> None:
        """A certificate that reached this validator some other way (``ct.add-chain``):
        if a validator's intermediate signed it without a committed decision, submit the
        evidence (spec §18.7)."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return
        self._verdict(cert, der)

    def _verdict(self, cert: x509.Certificate, der: bytes
                 ) -> tuple[CertificateRecord | None, str]:
        """The committed record behind ``cert``, or why there is none (submitting the
        evidence when a validator's intermediate signed it)."""
        record = self.machine.state.certificate(format(cert.serial_number, "x"))
        issuer = self.machine.directory.issuer_of(cert)
        if record is not None and issuer is not None and record.issuer == issuer.fingerprint:
            committed = record.der == der
            if not committed and record.pending:
                try:
                    check_certificate(der, precertificate=record.precertificate,
                                      issuer=issuer.certificate)
                    committed = True
                except ProfileError:
                    committed = False
            if not committed and record.precertificate == der:
                committed = True  # the precertificate of a committed issuance
            if committed:
                return record, ""
        if issuer is None:
            return None, "it is not signed by a validator's issuing intermediate"
        if is_precertificate(cert):
            return None, PRECERTIFICATE_NOT_EVIDENCE
        self._submit_evidence(der, issuer.validator)
        return None, ("no committed block allows this certificate: it was signed without "
                      "consensus")

    def machine_block_id(self, height: int) -> bytes | None:
        if self.decisions is None:
            return None
        stored = self.decisions.chain.store.block(height)
        return None if stored is None else stored.id

    def _submit_evidence(self, der: bytes, offender: str) -> None:
        fingerprint = hashlib.sha256(der).hexdigest()
        if self.decisions is None or fingerprint in self._evidence \
                or offender in self.machine.isolated():
            return
        if len(self._evidence) >= MAX_EVIDENCE_PENDING:
            self._evidence.clear()  # (a bound: resubmitting is harmless, refused if known)
        self._evidence.add(fingerprint)
        log.warning("misissuance found", extra={"validator": offender,
                                                "fingerprint": fingerprint})
        decisions = self.decisions

        async def submit() -> None:
            # this validator may be a block behind the one that committed the certificate:
            # look again once that block has had time to arrive
            await asyncio.sleep(EVIDENCE_DELAY)
            cert = x509.load_der_x509_certificate(der)
            record = self.machine.state.certificate(format(cert.serial_number, "x"))
            if record is not None and der in (record.der, record.precertificate):
                self._evidence.discard(fingerprint)
                return
            try:
                await decisions.commit(Misissued(certificate=der, at_ms=decisions.now_ms()))
            except (TrustChainError, TimeoutError) as exc:
                log.error("misissuance evidence not committed: %s", exc)

        task = asyncio.get_running_loop().create_task(submit())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def register(self, router: Router) -> None:
        router.add(ops.CHECK_CERTIFICATE, self.check_certificate)
