"""``ca.*``: issuance, chain, validation, revocation and rotation of certificates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .._schema import OpSpec, arg, register

RevocationReason = Literal["unspecified", "key_compromise", "affiliation_changed",
                           "superseded", "cessation_of_operation", "privilege_withdrawn"]


@dataclass(frozen=True, slots=True, kw_only=True)
class IssueArgs:
    csr: bytes = arg(max_length=16_384, doc="DER PKCS#10 request; names in its subjectAltName")
    proofs: dict[str, Any] | None = arg(None, doc="the four-proof set (see consensus ops)")
    renews: str | None = arg(None, max_length=40,
                             doc="serial of the certificate this one replaces with a new key")
    renewal_signature: bytes | None = arg(None, max_length=512,
                                          doc="that certificate's key's signature over the "
                                              "renewal statement (spec)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainArgs:
    """No arguments."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidateArgs:
    serial: str = arg(max_length=40, doc="lowercase hexadecimal serial number")


@dataclass(frozen=True, slots=True, kw_only=True)
class RevokeArgs:
    serial: str = arg(max_length=40)
    reason: RevocationReason = arg("unspecified")
    time: int = arg(minimum=0, doc="signer's clock, seconds since 1970; within 5 minutes")
    signature: bytes = arg(max_length=512, doc="over the revocation statement (spec)")
    admin_certificate: bytes | None = arg(None, max_length=16_384,
                                          doc="DER; set when an administrator signs")
    proofs: dict[str, Any] | None = arg(None)


@dataclass(frozen=True, slots=True, kw_only=True)
class RotationStatusArgs:
    """No arguments."""


ISSUE = register(OpSpec(name="ca.issue", args=IssueArgs,
                        summary="issue a 24-hour certificate for a CSR"))
CHAIN = register(OpSpec(name="ca.chain", args=ChainArgs,
                        summary="the issuing chain and the root certificate"))
VALIDATE = register(OpSpec(name="ca.validate", args=ValidateArgs,
                           summary="status of a certificate by serial"))
REVOKE = register(OpSpec(name="ca.revoke", args=RevokeArgs,
                         summary="revoke a certificate (holder or administrator)"))
ROTATION_STATUS = register(OpSpec(name="ca.rotation-status", args=RotationStatusArgs,
                                  summary="intermediate and server certificate rotation"))
