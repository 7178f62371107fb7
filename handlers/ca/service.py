"""``ca.*`` ops: issue, chain, validate, revoke, on the cluster's replicated state.

One issuance reads top to bottom in :meth:`CertificateAuthority._issue`:

1. check the CSR, the names and the proofs here first (a clear error at once);
2. fix the leaf (a random 128-bit serial, the validity from now, this
   validator's intermediate) and sign its precertificate;
3. commit an ``issue`` decision carrying it: every validator checks it, and
   once a block commits it every validator executes it (the names are
   reserved, the precertificate is logged in CT at the same index);
4. take this validator's SCT for that entry, sign the certificate with it;
5. commit the signed ``certificate``: every validator checks it against the
   committed precertificate and stores it, and its DNS records and
   fingerprint appear everywhere;
6. answer, from the replicated state.

Revocation is one decision; validation and the chain are read from the
replicated state, so any validator answers for any certificate.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509

from protocol import (
    InvalidRequest,
    NotFound,
    TrustChainError,
    Unauthorized,
    Unavailable,
    error_from_wire,
    renewal_statement,
    revocation_statement,
)
from protocol.ct_structs import SignedCertificateTimestamp, certificate_tbs, encode_sct_list
from protocol.decisions import CompactCertificate, Decision, Issue, NodeCertificate, Revoke
from protocol.ops import ca as ops
from store import CertificateRecord, StateDatabase, verify_signature

from .._router import RequestContext, Router
from . import _x509
from ._authority import Hierarchy
from ._leaf import LeafSigner, LeafTemplate, LocalSigner
from ._policy import CheckedRequest, NamingPolicy, check_ownership, check_request
from ._profile import validity

log = logging.getLogger("trustchain.ca")

REVOCATION_WINDOW = 300.0
"""Seconds a signed revocation statement's ``time`` may differ from the server's clock."""
PENDING_HOLDS_NAMES = 600.0
"""Seconds an issuance waiting for its certificate holds its names (as the state rules)."""


class CtPosition(Protocol):
    """Where the CT log holds an entry (``handlers.ct.Logged``)."""

    @property
    def shard(self) -> int: ...

    @property
    def leaf_index(self) -> int: ...


class DecisionOutcome(Protocol):
    """What executing a committed decision did (``handlers.replica.Outcome``)."""

    @property
    def accepted(self) -> bool: ...

    @property
    def code(self) -> str: ...

    @property
    def message(self) -> str: ...

    @property
    def details(self) -> dict[str, Any]: ...

    @property
    def value(self) -> dict[str, Any]: ...

    @property
    def logged(self) -> Any: ...

    @property
    def block_hash(self) -> bytes | None: ...

    @property
    def block_height(self) -> int | None: ...

    @property
    def index(self) -> int | None: ...

    @property
    def round(self) -> int | None: ...

    @property
    def chain_id(self) -> str | None: ...

    @property
    def signatures(self) -> list[dict[str, Any]]: ...


class Decisions(Protocol):
    """This validator's way to the cluster (``handlers.replica.DecisionLog``)."""

    async def commit(self, decision: Decision, *, checked: bool = False) -> Any:
        """The outcome of ``decision`` once committed and executed."""
        ...

    def now_ms(self) -> int: ...


class ProofCheck(Protocol):
    async def verify(self, op: Any, request: bytes, raw: Any) -> Any:
        """Raise ``ProofInvalid`` unless ``raw`` proves the request."""
        ...


class SctSource(Protocol):
    def sct(self, logged: Any) -> Any:
        """This validator's SCT for a logged entry (``.sct``: the SCT)."""
        ...


@dataclass
class IssuanceCounts:
    """Certificates issued and requests refused through this validator since it started."""

    issued: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class Cluster:
    """What the CA reads of the cluster besides the state: its validators' keys.

    :param intermediate: SHA-256 (hex) of an intermediate's DER -> its DER.
    :param intermediates: every validator's announced intermediates.
    :param ready: whether the state holds the intermediate this validator issues with.
    :param announce: commits this validator's keys (waits for the block).
    :param admins: SHA-256 (hex) of every administrator certificate -> its validator.
    """

    intermediate: Callable[[str], bytes | None]
    intermediates: Callable[[], list[bytes]]
    ready: Callable[[], bool]
    announce: Callable[[], Awaitable[None]]
    admins: Callable[[], dict[str, str]] = field(default=dict)


def _raise_refused(outcome: DecisionOutcome) -> None:
    """Raise the error a refused decision's outcome names (its code, message, details)."""
    if not outcome.accepted:
        raise error_from_wire({**outcome.details, "code": outcome.code,
                               "message": outcome.message})


def parse_serial(text: str, field: str = "serial") -> str:
    serial = text.strip().lower()
    if not serial or any(c not in "0123456789abcdef" for c in serial):
        raise InvalidRequest(f"{field} {text!r} is not a hexadecimal number", field=field)
    return serial.lstrip("0") or "0"


class CertificateAuthority:
    """Answers ``ca.issue``, ``ca.chain``, ``ca.validate`` and ``ca.revoke``.

    :param state: the replicated state (the certificate registry).
    :param decisions: commits this validator's decisions.
    :param proofs: checks a request's four proofs before it goes to the cluster.
    :param transparency: this validator's CT log (its SCTs).
    :param audit: ``async (kind, data)`` that returns once the record is durable.
    """

    def __init__(self, *, hierarchy: Hierarchy, state: StateDatabase, policy: NamingPolicy,
                 decisions: Decisions, proofs: ProofCheck, transparency: SctSource,
                 cluster: Cluster, audit: Callable[[str, dict[str, Any]], Any],
                 signer: LeafSigner | None = None, lifetime: float = 86400.0,
                 backdate: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self.hierarchy = hierarchy
        self.state = state
        self.policy = policy
        self.decisions = decisions
        self.proofs = proofs
        self.transparency = transparency
        self.cluster = cluster
        self.signer = signer or LocalSigner()
        self._audit = audit
        self.lifetime = lifetime
        self.backdate = backdate
        self.clock = clock
        self.counts = IssuanceCounts()

    @property
    def issued(self) -> int:
        return self.counts.issued

    # --- ca.issue -----------------------------------------------------------------

    async def issue(self, args: ops.IssueArgs, ctx: RequestContext) -> dict[str, Any]:
        return await self.issue_csr(args.csr, args.proofs, requester=ctx.peer.address,
                                    renews=args.renews,
                                    renewal_signature=args.renewal_signature)

    async def issue_node_certificate(self, csr: bytes) -> dict[str, Any]:
        """This validator's own TLS certificate: names from the validator set, no proofs."""
        return await self.issue_csr(csr, None, requester="node", node=True)

    async def issue_csr(self, csr: bytes, proofs: dict[str, Any] | None, *, requester: str,
                        renews: str | None = None, renewal_signature: bytes | None = None,
                        node: bool = False) -> dict[str, Any]:
        """Check, commit, sign and commit one certificate; the ``ca.issue`` result.

        ``renews`` + ``renewal_signature``: the key of the certificate being
        replaced signed :func:`renewal_statement`, so its names may move to the
        CSR's new key.
        """
        try:
            request = check_request(csr, self.policy)
            if not node:
                renewed = self._check_renewal(csr, renews, renewal_signature)
                self._check_names_free(request, renewed)
                await self.proofs.verify("issue", hashlib.sha256(csr).digest(), proofs)
            if not self.cluster.ready():
                await self.cluster.announce()  # a new intermediate: the cluster learns it first
            if not self.cluster.ready():
                raise Unavailable("this validator's keys are not committed yet; try again "
                                  "in a few seconds", retry_after=2)
            return await self._issue(request, csr, proofs, renews, renewal_signature,
                                     node=node)
        except TrustChainError as exc:
            self.counts.rejected += 1
            await self._audit("ca.issue-rejected", {"code": exc.code.value,
                                                    "reason": exc.message,
                                                    "requester": requester})
            raise

    async def _issue(self, request: CheckedRequest, csr: bytes, proofs: Any,
                     renews: str | None, renewal_signature: bytes | None, *,
                     node: bool) -> dict[str, Any]:
        """Precertificate -> committed issuance -> SCT -> certificate -> committed. The
        certificate decision carries the SCT list and the signature of the TBS they make
        with the precertificate: every validator assembles the same DER from them."""
        at_ms = self.decisions.now_ms()
        leaf = self._leaf(request, at_ms)
        precert = await self.signer.sign_leaf(leaf, [_x509.precertificate_poison()])
        decision: Decision = (NodeCertificate(csr=csr, precertificate=precert, at_ms=at_ms)
                              if node else
                              Issue(csr=csr, proofs=proofs, precertificate=precert,
                                    renews=renews, renewal_signature=renewal_signature,
                                    at_ms=at_ms))
        reserved = await self.decisions.commit(decision, checked=not node)
        _raise_refused(reserved)
        sct: SignedCertificateTimestamp = self.transparency.sct(reserved.logged).sct
        sct_list = encode_sct_list([sct.encode()])
        signature = await self.signer.sign_tbs(leaf.issuer, certificate_tbs(precert, sct_list))
        serial = _x509.serial_hex(leaf.serial)
        signed = await self.decisions.commit(CompactCertificate(
            serial=serial, sct_list=sct_list, signature=signature,
            at_ms=self.decisions.now_ms()), checked=True)
        _raise_refused(signed)
        record = self.state.get(serial)
        if record is None:
            raise Unavailable(f"certificate {serial} was committed but this validator does "
                              "not hold it yet")
        self.counts.issued += 1
        return self._issue_result(record, signed)

    def _leaf(self, request: CheckedRequest, at_ms: int) -> LeafTemplate:
        """The certificate to sign: its serial (random), validity (from ``at_ms``) and
        issuer (this validator's active intermediate)."""
        issuer = self.hierarchy.issuer
        assert issuer is not None
        not_before, not_after = validity(at_ms, lifetime=self.lifetime, backdate=self.backdate,
                                         issuer=issuer.certificate)
        return LeafTemplate(issuer=issuer, request=request, serial=_x509.new_serial(),
                            not_before=not_before, not_after=not_after)

    def _check_renewal(self, csr: bytes, renews: str | None,
                       signature: bytes | None) -> str | None:
        if renews is None and signature is None:
            return None
        if renews is None or signature is None:
            raise InvalidRequest("renews and renewal_signature go together", field="renews")
        serial = parse_serial(renews, "renews")
        record = self.state.get(serial)
        if record is None:
            raise NotFound(f"no certificate with serial {serial} to renew", field="renews")
        if record.revoked_at is not None or record.not_after <= self.clock():
            raise Unauthorized(f"certificate {serial} is revoked or expired; it cannot hand "
                               "its names on", field="renews")
        key = x509.load_der_x509_certificate(record.der).public_key()
        if not verify_signature(key, signature, renewal_statement(serial, csr)):
            raise Unauthorized(f"renewal_signature is not a signature of certificate "
                               f"{serial}'s key over this CSR", field="renewal_signature")
        return serial

    def _check_names_free(self, request: CheckedRequest, renews: str | None = None) -> None:
        """The ownership rule on the state now (the block decides it again, for sure)."""
        now = self.clock()
        holders: dict[str, list[tuple[str, str, float]]] = {}
        for name in request.names:
            holders[name] = [
                (r.serial, r.spki_sha256, r.not_after) for r in self.state.claims(name)
                if (r.issued_at + PENDING_HOLDS_NAMES > now if r.pending
                    else r.not_after > now)]
        check_ownership(request, holders, self.policy, renews)

    def _issue_result(self, record: CertificateRecord, signed: DecisionOutcome
                      ) -> dict[str, Any]:
        lifetime = record.not_after - record.not_before
        return {
            "certificate": record.der,
            "chain": self._chain_of(record),
            "serial": record.serial,
            "fingerprint": record.fingerprint,
            "names": list(record.names),
            "not_before": int(record.not_before),
            "not_after": int(record.not_after),
            "renew_after": int(record.not_before + lifetime * 2 / 3),
            "admission": "consensus",
            "block_hash": signed.block_hash,
            "block_height": signed.block_height,
            "index": signed.index,
            "round": signed.round,
            "chain_id": signed.chain_id,
            "signatures": signed.signatures,
        }

    def _chain_of(self, record: CertificateRecord) -> list[bytes]:
        issuer = self.cluster.intermediate(record.issuer)
        return [issuer, self.hierarchy.root_der] if issuer else [self.hierarchy.root_der]

    # --- ca.chain -----------------------------------------------------------------

    def chain(self, args: ops.ChainArgs, ctx: RequestContext) -> dict[str, Any]:
        now = self.clock()
        intermediates = []
        for der in self.cluster.intermediates():
            cert = x509.load_der_x509_certificate(der)
            if cert.not_valid_after_utc.timestamp() > now:
                intermediates.append(der)
        return {"chain": self.hierarchy.chain_der(), "root": self.hierarchy.root_der,
                "intermediates": intermediates or [self.hierarchy.chain_der()[0]]}

    # --- ca.validate ----------------------------------------------------------------

    def validate(self, args: ops.ValidateArgs, ctx: RequestContext) -> dict[str, Any]:
        serial = parse_serial(args.serial)
        record = self.state.get(serial)
        if record is None:
            return {"serial": serial, "status": "unknown"}
        now = self.clock()
        if record.revoked_at is not None:
            status = "revoked"
        elif now >= record.not_after:
            status = "expired"
        elif now < record.not_before:
            status = "not_yet_valid"
        else:
            status = "valid"
        result: dict[str, Any] = {
            "serial": record.serial, "status": status, "fingerprint": record.fingerprint,
            "names": list(record.names), "not_before": int(record.not_before),
            "not_after": int(record.not_after), "certificate": record.der,
            "chain": self._chain_of(record),
        }
        if record.revoked_at is not None:
            result["revoked_at"] = int(record.revoked_at)
            result["reason"] = record.revocation_reason
        return result

    # --- ca.revoke ------------------------------------------------------------------

    async def revoke(self, args: ops.RevokeArgs, ctx: RequestContext) -> dict[str, Any]:
        serial = parse_serial(args.serial)
        try:
            record = self.state.get(serial)
            if record is None:
                raise NotFound(f"no certificate with serial {serial}", field="serial")
            self._authenticate_revocation(serial, record, args)
            if record.revoked_at is None:
                statement = revocation_statement(serial, args.reason, args.time)
                await self.proofs.verify("revoke", hashlib.sha256(statement).digest(),
                                         args.proofs)
        except TrustChainError as exc:
            await self._audit("ca.revoke-rejected", {"serial": serial, "code": exc.code.value,
                                                     "reason": exc.message,
                                                     "peer": ctx.peer.address})
            raise
        if record.revoked_at is not None:
            return {"serial": serial, "revoked_at": int(record.revoked_at),
                    "reason": record.revocation_reason, "already_revoked": True}
        outcome = await self.decisions.commit(Revoke(
            serial=serial, reason=args.reason, time=args.time, signature=args.signature,
            admin_certificate=args.admin_certificate, proofs=args.proofs,
            at_ms=self.decisions.now_ms()), checked=True)
        _raise_refused(outcome)
        value = outcome.value
        return {"serial": serial, "revoked_at": value["revoked_at"], "reason": value["reason"],
                "already_revoked": value["already_revoked"],
                "block_height": outcome.block_height}

    def _authenticate_revocation(self, serial: str, record: CertificateRecord,
                                 args: ops.RevokeArgs) -> str:
        """The same checks the block applies, here first for a clear error at once."""
        if abs(self.clock() - args.time) > REVOCATION_WINDOW:
            raise Unauthorized(f"the revocation statement's time is more than "
                               f"{int(REVOCATION_WINDOW)} s from the server's clock",
                               field="time")
        statement = revocation_statement(serial, args.reason, args.time)
        if args.admin_certificate is not None:
            fingerprint = hashlib.sha256(args.admin_certificate).hexdigest()
            if fingerprint not in self.cluster.admins():
                raise Unauthorized("admin_certificate is not an administrator certificate of "
                                   "this CA", field="admin_certificate")
            key = x509.load_der_x509_certificate(args.admin_certificate).public_key()
            by = f"admin:{fingerprint}"
        else:
            key = x509.load_der_x509_certificate(record.der).public_key()
            by = "holder"
        if not verify_signature(key, args.signature, statement):
            raise Unauthorized("the signature does not prove possession of the "
                               + ("administrator's" if by != "holder" else "certificate's")
                               + " key", field="signature")
        return by

    def register(self, router: Router) -> None:
        router.add(ops.ISSUE, self.issue)
        router.add(ops.CHAIN, self.chain)
        router.add(ops.VALIDATE, self.validate)
        router.add(ops.REVOKE, self.revoke)
