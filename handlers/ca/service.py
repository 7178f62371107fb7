"""``ca.*`` ops: issue, chain, validate, revoke, rotation-status."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cryptography import x509

from protocol import (
    InvalidRequest,
    NotFound,
    TrustChainError,
    Unauthorized,
    renewal_statement,
    revocation_statement,
)
from protocol.ops import ca as ops
from store import CertificateRecord, CertificateStore, verify_signature

from .._router import RequestContext, Router
from . import _x509
from ._admission import Admission, Admitted, Decision
from ._authority import Hierarchy
from ._policy import CheckedRequest, NamingPolicy, check_ownership, check_request
from ._signing import SigningWorkers

SignLeaf = Callable[[Sequence[x509.Extension[Any]]], Awaitable[bytes]]
"""Signs the leaf being issued with extra extensions added last; its DER."""

log = logging.getLogger("trustchain.ca")

REVOCATION_WINDOW = 300.0
"""Seconds a signed revocation statement's ``time`` may differ from the server's clock."""


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


class CertificateAuthority:
    """Answers the ``ca.*`` ops.

    :param audit: ``async (kind, data)`` that returns once the record is durable.
    :param on_issued: called with each new :class:`CertificateRecord` (CT, DNS, ...).
    """

    def __init__(self, *, hierarchy: Hierarchy, certs: CertificateStore, policy: NamingPolicy,
                 admission: Admission, audit: Callable[[str, dict[str, Any]], Any],
                 validity: float = 86400.0, backdate: float = 300.0,
                 clock: Callable[[], float] = time.time,
                 rotation_status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.hierarchy = hierarchy
        self.certs = certs
        self.policy = policy
        self.admission = admission
        self._audit = audit
        self.validity = validity
        self.backdate = backdate
        self.clock = clock
        self._rotation_status = rotation_status
        self._pending_names: dict[str, str] = {}  # name -> spki of an issuance in flight
        self.on_issued: list[Callable[[CertificateRecord], Any]] = []
        self.on_revoked: list[Callable[[CertificateRecord], Any]] = []
        """Called with the revoked :class:`CertificateRecord` after each revocation (DNS)."""
        self.precert_logger: Callable[[SignLeaf, bytes],
                                      Awaitable[list[x509.Extension[Any]]]] | None = None
        """CT (RFC 6962 §3.3): ``(sign, issuer_der)`` signs a precertificate with
        ``sign([poison])``, logs it and returns the extensions the final certificate
        adds (the SCT list); set by the CT service."""
        self.signing_workers: SigningWorkers | None = None
        """Worker processes that sign leaves (``ca.signing_workers``); None: sign here."""
        self.issued = 0
        self.rejected = 0

    # --- ca.issue -----------------------------------------------------------------

    async def issue(self, args: ops.IssueArgs, ctx: RequestContext) -> dict[str, Any]:
        return await self.issue_csr(args.csr, args.proofs, requester=ctx.peer.address,
                                    renews=args.renews,
                                    renewal_signature=args.renewal_signature)

    async def issue_csr(self, csr: bytes, proofs: dict[str, Any] | None, *, requester: str,
                        renews: str | None = None,
                        renewal_signature: bytes | None = None,
                        internal: bool = False) -> dict[str, Any]:
        """Check, admit, sign, store and audit one certificate; the ``ca.issue`` result.

        ``renews`` + ``renewal_signature``: the key of the certificate being
        replaced signed :func:`renewal_statement`, so its names may move to the
        CSR's new key. ``internal``: the node's own certificate, whose names the
        operator configured; the ownership rule does not apply to it.
        """
        try:
            request = check_request(csr, self.policy)
            if not internal:
                renewed = self._check_renewal(csr, renews, renewal_signature)
                self._check_names_free(request, renewed)
        except TrustChainError as exc:
            self.rejected += 1
            await self._audit("ca.issue-rejected", {"code": exc.code.value,
                                                    "reason": exc.message,
                                                    "requester": requester})
            raise
        names = request.names
        for name in names:
            self._pending_names[name] = request.spki_sha256
        try:
            return await self._issue_admitted(request, proofs, csr=csr, internal=internal)
        finally:
            for name in names:
                if self._pending_names.get(name) == request.spki_sha256:
                    del self._pending_names[name]

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

    async def _issue_admitted(self, request: CheckedRequest, proofs: dict[str, Any] | None,
                              *, csr: bytes, internal: bool = False) -> dict[str, Any]:
        decision = Decision(kind="issue", subject={"names": list(request.names),
                                                   "spki_sha256": request.spki_sha256},
                            request=hashlib.sha256(csr).digest(), internal=internal,
                            material={"csr": csr})
        try:
            admitted = await self.admission.admit(decision, proofs)
        except TrustChainError as exc:
            self.rejected += 1
            await self._audit("ca.issue-rejected", {"code": exc.code.value,
                                                    "reason": exc.message,
                                                    "names": list(request.names)})
            raise
        issuer = self.hierarchy.issuer
        assert issuer is not None
        # with consensus, the committed block fixes the serial and the validity
        now = self.clock()
        start = float(admitted.decided_at) if admitted.decided_at is not None else now
        not_before = start - self.backdate
        # never beyond the issuing intermediate (rotation keeps that far away)
        not_after = min(start + self.validity,
                        issuer.certificate.not_valid_after_utc.timestamp())
        serial = admitted.serial if admitted.serial is not None else _x509.new_serial()
        workers = self.signing_workers

        async def sign(extensions: Sequence[x509.Extension[Any]]) -> bytes:
            """The leaf with ``extensions`` added last, signed by the issuer."""
            assert issuer is not None
            if workers is None:
                return _x509.sign_leaf(issuer.certificate, request, serial=serial,
                                       not_before=not_before, not_after=not_after,
                                       extensions=extensions,
                                       private_key=issuer.signer.private_key())
            return await workers.sign(issuer_name=issuer.name, issuer_der=issuer.der,
                                      request=request, serial=serial, not_before=not_before,
                                      not_after=not_after, extensions=extensions)

        extensions: list[x509.Extension[Any]] = []
        if self.precert_logger is not None:  # CT: the SCT goes in the certificate
            extensions = await self.precert_logger(sign, issuer.der)
        der = await sign(extensions)
        record = CertificateRecord(
            serial=_x509.serial_hex(serial), der=der,
            fingerprint=hashlib.sha256(der).hexdigest(), spki_sha256=request.spki_sha256,
            issuer=issuer.name, not_before=float(int(not_before)),
            not_after=float(int(not_after)), issued_at=now, revoked_at=None,
            revocation_reason=None, names=request.names)
        # Both durable before the reply; their fsyncs overlap.
        await asyncio.gather(self.certs.add(record), self._audit("ca.issued", {
            "serial": record.serial, "fingerprint": record.fingerprint,
            "names": list(request.names), "spki_sha256": request.spki_sha256,
            "issuer": issuer.name, "not_after": int(not_after),
            "admission": admitted.admission, "decision": admitted.decision_digest.hex()}))
        self.issued += 1
        for callback in self.on_issued:
            callback(record)
        lifetime = record.not_after - record.not_before
        return {
            "certificate": der,
            "chain": self.hierarchy.chain_der(),
            "serial": record.serial,
            "fingerprint": record.fingerprint,
            "names": list(request.names),
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
        for callback in self.on_revoked:
            callback(revoked)
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

    # --- ca.rotation-status ---------------------------------------------------------------

    def rotation_status(self, args: ops.RotationStatusArgs,
                        ctx: RequestContext) -> dict[str, Any]:
        issuer = self.hierarchy.issuer
        assert issuer is not None
        status: dict[str, Any] = {
            "intermediates": [
                {"name": a.name, "not_before": int(a.not_before), "not_after": int(a.not_after),
                 "active": a.active, "fingerprint": hashlib.sha256(a.der).hexdigest()}
                for a in self.hierarchy.intermediates()],
            "intermediate_renew_at": int(self.hierarchy.intermediate_renew_at()),
            "issued": self.issued,
            "rejected": self.rejected,
        }
        if self._rotation_status is not None:
            status.update(self._rotation_status())
        return status

    def register(self, router: Router) -> None:
        router.add(ops.ISSUE, self.issue)
        router.add(ops.CHAIN, self.chain)
        router.add(ops.VALIDATE, self.validate)
        router.add(ops.REVOKE, self.revoke)
        router.add(ops.ROTATION_STATUS, self.rotation_status)

