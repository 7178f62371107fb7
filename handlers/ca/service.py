"""``ca.*`` ops: issue, chain, validate, revoke.

One issuance reads top to bottom in :meth:`CertificateAuthority._issue`: admit
the decision (four proofs, a committed block), fix the leaf from it, sign its
precertificate and log it (the CT log answers the SCT), sign the certificate
with the SCT, store and audit it, then tell the publishers (DNS,
fingerprints). ``ca.rotation-status`` is the rotator's (:mod:`._rotation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509

from protocol import (
    InvalidRequest,
    NotFound,
    TrustChainError,
    Unauthorized,
    renewal_statement,
    revocation_statement,
)
from protocol.ct_structs import SignedCertificateTimestamp
from protocol.ops import ca as ops
from store import CertificateRecord, CertificateStore, verify_signature

from .._router import RequestContext, Router
from . import _x509
from ._admission import Admission, Admitted, Decision
from ._authority import Hierarchy
from ._leaf import LeafSigner, LeafTemplate, LocalSigner
from ._policy import CheckedRequest, NamingPolicy, check_ownership, check_request
from ._publishing import CertificateIssued, CertificateRevoked, LogPosition, Publishers

log = logging.getLogger("trustchain.ca")

REVOCATION_WINDOW = 300.0
"""Seconds a signed revocation statement's ``time`` may differ from the server's clock."""


class LoggedPrecertificate(Protocol):
    """What the CT log answers for a precertificate: its SCT and where the entry is."""

    @property
    def sct(self) -> SignedCertificateTimestamp: ...

    @property
    def shard(self) -> int: ...

    @property
    def leaf_index(self) -> int: ...


class PrecertificateLog(Protocol):
    """The CT log, as the CA uses it (``handlers.ct.CtService``)."""

    async def log_precertificate(self, precertificate: bytes, *, issuer: x509.Certificate,
                                 chain: Sequence[bytes], names: Sequence[str],
                                 spki_sha256: bytes) -> LoggedPrecertificate:
        """Log ``precertificate`` (issuer then root in ``chain``); its SCT once durable."""
        ...


def _consensus_fields(admitted: Admitted) -> dict[str, Any]:
    """``block_hash``, ``block_height`` and ``signatures`` of a committed decision."""
    if admitted.block_hash is None:
        return {}
    return {"block_hash": admitted.block_hash, "block_height": admitted.block_height,
            "signatures": admitted.signatures or []}


def parse_serial(text: str, field: str = "serial") -> str:
    serial = text.strip().lower()
    if not serial or any(c not in "0123456789abcdef" for c in serial):
        raise InvalidRequest(f"{field} {text!r} is not a hexadecimal number", field=field)
    return serial.lstrip("0") or "0"


@dataclass
class IssuanceCounts:
    """Certificates issued and requests refused since the node started."""

    issued: int = 0
    rejected: int = 0


class CertificateAuthority:
    """Answers ``ca.issue``, ``ca.chain``, ``ca.validate`` and ``ca.revoke``.

    :param admission: admits each decision (four proofs, a committed block) or refuses it.
    :param signer: signs leaves (on the event loop, or in worker processes).
    :param transparency: the CT log every certificate goes to before it is signed
        (RFC 6962 §3.3: precertificate, SCT, certificate); None: no CT.
    :param publishers: told of every certificate once it is durable (DNS, fingerprints).
    :param audit: ``async (kind, data)`` that returns once the record is durable.
    """

    def __init__(self, *, hierarchy: Hierarchy, certs: CertificateStore, policy: NamingPolicy,
                 admission: Admission, audit: Callable[[str, dict[str, Any]], Any],
                 signer: LeafSigner | None = None,
                 transparency: PrecertificateLog | None = None,
                 publishers: Publishers | None = None,
                 validity: float = 86400.0, backdate: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.hierarchy = hierarchy
        self.certs = certs
        self.policy = policy
        self.admission = admission
        self.signer = signer or LocalSigner()
        self.transparency = transparency
        self.publishers = publishers or Publishers()
        self._audit = audit
        self.validity = validity
        self.backdate = backdate
        self.clock = clock
        self._pending_names: dict[str, str] = {}  # name -> spki of an issuance in flight
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
        """The node's own TLS certificate: its names are the operator's configuration, so
        the ownership rule does not apply and no client proofs come with it."""
        return await self.issue_csr(csr, None, requester="node", internal=True)

    async def issue_csr(self, csr: bytes, proofs: dict[str, Any] | None, *, requester: str,
                        renews: str | None = None,
                        renewal_signature: bytes | None = None,
                        internal: bool = False) -> dict[str, Any]:
        """Check, admit, sign, store and audit one certificate; the ``ca.issue`` result.

        ``renews`` + ``renewal_signature``: the key of the certificate being
        replaced signed :func:`renewal_statement`, so its names may move to the
        CSR's new key. ``internal``: the node's own certificate
        (:meth:`issue_node_certificate`).
        """
        try:
            request = check_request(csr, self.policy)
            if not internal:
                renewed = self._check_renewal(csr, renews, renewal_signature)
                self._check_names_free(request, renewed)
        except TrustChainError as exc:
            await self._refused(exc, {"requester": requester})
            raise
        with self._names_in_flight(request):
            return await self._issue(request, proofs, csr=csr, internal=internal)

    @contextlib.contextmanager
    def _names_in_flight(self, request: CheckedRequest) -> Iterator[None]:
        """Hold ``request``'s names while it is issued, so a concurrent request for one
        of them by another key is refused (ownership, :meth:`_check_names_free`)."""
        for name in request.names:
            self._pending_names[name] = request.spki_sha256
        try:
            yield
        finally:
            for name in request.names:
                if self._pending_names.get(name) == request.spki_sha256:
                    del self._pending_names[name]

    async def _refused(self, exc: TrustChainError, context: dict[str, Any]) -> None:
        self.counts.rejected += 1
        await self._audit("ca.issue-rejected", {"code": exc.code.value, "reason": exc.message,
                                                **context})

    def _check_renewal(self, csr: bytes, renews: str | None,
                       signature: bytes | None) -> str | None:
        if renews is None and signature is None:
            return None
        if renews is None or signature is None:
            raise InvalidRequest("renews and renewal_signature go together", field="renews")
        serial = parse_serial(renews, "renews")
        record = self.certs.get(serial)
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
        now = self.clock()
        holders = {}
        for name in request.names:
            held = [(r.serial, r.spki_sha256, r.not_after) for r in self.certs.holders(name, now)]
            pending = self._pending_names.get(name)
            if pending is not None:
                held.append(("(being issued)", pending, now + self.validity))
            holders[name] = held
        check_ownership(request, holders, self.policy, renews)

    async def _issue(self, request: CheckedRequest, proofs: dict[str, Any] | None, *,
                     csr: bytes, internal: bool) -> dict[str, Any]:
        """The issuance itself, in order: admit, fix the leaf, log its precertificate,
        sign it with the SCT, store and audit it, tell the publishers."""
        decision = Decision(kind="issue", subject={"names": list(request.names),
                                                   "spki_sha256": request.spki_sha256},
                            request=hashlib.sha256(csr).digest(), internal=internal,
                            material={"csr": csr})
        try:
            admitted = await self.admission.admit(decision, proofs)
        except TrustChainError as exc:
            await self._refused(exc, {"names": list(request.names)})
            raise
        leaf = self._leaf(request, admitted)
        logged = await self._log_precertificate(leaf)
        der = await self.signer.sign_leaf(
            leaf, [_x509.sct_list([logged.sct.encode()])] if logged is not None else [])
        record = CertificateRecord(
            serial=_x509.serial_hex(leaf.serial), der=der,
            fingerprint=hashlib.sha256(der).hexdigest(), spki_sha256=request.spki_sha256,
            issuer=leaf.issuer.name, not_before=float(int(leaf.not_before)),
            not_after=float(int(leaf.not_after)), issued_at=self.clock(), revoked_at=None,
            revocation_reason=None, names=request.names)
        # Both durable before the reply; their fsyncs overlap.
        await asyncio.gather(self.certs.add(record), self._audit("ca.issued", {
            "serial": record.serial, "fingerprint": record.fingerprint,
            "names": list(request.names), "spki_sha256": request.spki_sha256,
            "issuer": leaf.issuer.name, "not_after": int(leaf.not_after),
            "admission": admitted.admission, "decision": admitted.decision_digest.hex()}))
        self.counts.issued += 1
        self.publishers.issued(CertificateIssued(record=record, logged=None if logged is None
                                                 else LogPosition(shard=logged.shard,
                                                                  leaf_index=logged.leaf_index,
                                                                  log_id=logged.sct.log_id)))
        return self._issue_result(record, admitted)

    def _leaf(self, request: CheckedRequest, admitted: Admitted) -> LeafTemplate:
        """The certificate to sign; with consensus, the committed block fixes its serial
        and the start of its validity."""
        issuer = self.hierarchy.issuer
        assert issuer is not None
        start = float(admitted.decided_at) if admitted.decided_at is not None else self.clock()
        # never beyond the issuing intermediate (rotation keeps that far away)
        not_after = min(start + self.validity,
                        issuer.certificate.not_valid_after_utc.timestamp())
        serial = admitted.serial if admitted.serial is not None else _x509.new_serial()
        return LeafTemplate(issuer=issuer, request=request, serial=serial,
                            not_before=start - self.backdate, not_after=not_after)

    async def _log_precertificate(self, leaf: LeafTemplate) -> LoggedPrecertificate | None:
        """Sign the precertificate (the leaf with the poison) and log it: its SCT."""
        if self.transparency is None:
            return None
        precertificate = await self.signer.sign_leaf(leaf, [_x509.precertificate_poison()])
        return await self.transparency.log_precertificate(
            precertificate, issuer=leaf.issuer.certificate,
            chain=[leaf.issuer.der, self.hierarchy.root_der], names=leaf.request.names,
            spki_sha256=bytes.fromhex(leaf.request.spki_sha256))

    def _issue_result(self, record: CertificateRecord, admitted: Admitted) -> dict[str, Any]:
        lifetime = record.not_after - record.not_before
        return {
            "certificate": record.der,
            "chain": self.hierarchy.chain_der(),
            "serial": record.serial,
            "fingerprint": record.fingerprint,
            "names": list(record.names),
            "not_before": int(record.not_before),
            "not_after": int(record.not_after),
            "renew_after": int(record.not_before + lifetime * 2 / 3),
            "admission": admitted.admission,
            **_consensus_fields(admitted),
        }

    # --- ca.chain -----------------------------------------------------------------

    def chain(self, args: ops.ChainArgs, ctx: RequestContext) -> dict[str, Any]:
        now = self.clock()
        return {
            "chain": self.hierarchy.chain_der(),
            "root": self.hierarchy.root_der,
            "intermediates": [a.der for a in self.hierarchy.intermediates()
                              if a.not_after > now],
        }

    # --- ca.validate ----------------------------------------------------------------

    def validate(self, args: ops.ValidateArgs, ctx: RequestContext) -> dict[str, Any]:
        serial = parse_serial(args.serial)
        record = self.certs.get(serial)
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
        issuer = next((a for a in self.hierarchy.intermediates() if a.name == record.issuer),
                      None)
        result: dict[str, Any] = {
            "serial": record.serial, "status": status, "fingerprint": record.fingerprint,
            "names": list(record.names), "not_before": int(record.not_before),
            "not_after": int(record.not_after), "certificate": record.der,
            "chain": [issuer.der, self.hierarchy.root_der] if issuer else
                     [self.hierarchy.root_der],
        }
        if record.revoked_at is not None:
            result["revoked_at"] = int(record.revoked_at)
            result["reason"] = record.revocation_reason
        return result

    # --- ca.revoke ------------------------------------------------------------------

    async def revoke(self, args: ops.RevokeArgs, ctx: RequestContext) -> dict[str, Any]:
        serial = parse_serial(args.serial)
        try:
            record = self.certs.get(serial)
            if record is None:
                raise NotFound(f"no certificate with serial {serial}", field="serial")
            by = self._authenticate_revocation(serial, record, args)
        except TrustChainError as exc:
            await self._audit("ca.revoke-rejected", {"serial": serial, "code": exc.code.value,
                                                     "reason": exc.message,
                                                     "peer": ctx.peer.address})
            raise
        if record.revoked_at is not None:
            return {"serial": serial, "revoked_at": int(record.revoked_at),
                    "reason": record.revocation_reason, "already_revoked": True}
        decision = Decision(kind="revoke", subject={"serial": serial, "reason": args.reason},
                            request=hashlib.sha256(revocation_statement(
                                serial, args.reason, args.time)).digest())
        admitted = await self.admission.admit(decision, args.proofs)
        now = self.clock()
        first = await self.certs.revoke(serial, args.reason, now)
        if not first:  # a concurrent revocation won
            current = self.certs.get(serial)
            assert current is not None and current.revoked_at is not None
            return {"serial": serial, "revoked_at": int(current.revoked_at),
                    "reason": current.revocation_reason, "already_revoked": True}
        await self._audit("ca.revoked", {"serial": serial, "reason": args.reason, "by": by,
                                         "admission": admitted.admission})
        revoked = dataclasses.replace(record, revoked_at=now, revocation_reason=args.reason)
        self.publishers.revoked(CertificateRevoked(record=revoked))
        return {"serial": serial, "revoked_at": int(now), "reason": args.reason,
                "already_revoked": False}

    def _authenticate_revocation(self, serial: str, record: CertificateRecord,
                                 args: ops.RevokeArgs) -> str:
        if abs(self.clock() - args.time) > REVOCATION_WINDOW:
            raise Unauthorized(f"the revocation statement's time is more than "
                               f"{int(REVOCATION_WINDOW)} s from the server's clock",
                               field="time")
        statement = revocation_statement(serial, args.reason, args.time)
        if args.admin_certificate is not None:
            fingerprint = hashlib.sha256(args.admin_certificate).hexdigest()
            now = self.clock()
            admins = {hashlib.sha256(a.der).hexdigest() for a in self.certs.authorities("admin")
                      if a.not_after > now}
            if fingerprint not in admins:
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

