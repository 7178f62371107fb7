"""A leaf certificate before its signature, and who signs it.

The CA fixes everything of a leaf before anyone signs it (:class:`LeafTemplate`:
issuer, subject key, names, serial, validity); signing adds the CT extension
last (the precertificate poison) and the signature. The final certificate's TBS
is made of the committed precertificate and the SCT list
(:func:`protocol.ct_structs.certificate_tbs`), the same bytes on every
validator, and only its signature is asked of the signer (:meth:`sign_tbs`). Signing
happens on the event loop (:class:`LocalSigner`) or in worker processes
(:class:`handlers.ca.SigningWorkers`); both make the same bytes from the same
template, because both call :func:`_x509.sign_leaf`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from . import _leaf_der, _x509
from ._authority import Issuer
from ._policy import CheckedRequest

Extensions = Sequence[x509.Extension[x509.ExtensionType]]


@dataclass(frozen=True, slots=True, kw_only=True)
class LeafTemplate:
    """Everything of a leaf certificate but its CT extension and its signature."""

    issuer: Issuer
    request: CheckedRequest
    serial: int
    not_before: float
    not_after: float


class LeafSigner(Protocol):
    async def sign_leaf(self, leaf: LeafTemplate, extensions: Extensions) -> bytes:
        """The DER of ``leaf`` with ``extensions`` added last, signed by its issuer."""
        ...

    async def sign_tbs(self, issuer: Issuer, tbs: bytes) -> bytes:
        """``issuer``'s signature of the TBSCertificate ``tbs`` (the signatureValue's
        octets), with the key's algorithm, the one ``tbs`` names (:func:`_leaf_der.signature`)."""
        ...


class LocalSigner:
    """Signs on the event loop with the issuer's key (the keystore's signer)."""

    async def sign_leaf(self, leaf: LeafTemplate, extensions: Extensions) -> bytes:
        return _x509.sign_leaf(leaf.issuer.certificate, leaf.request, serial=leaf.serial,
                               not_before=leaf.not_before, not_after=leaf.not_after,
                               extensions=extensions,
                               private_key=leaf.issuer.signer.private_key())

    async def sign_tbs(self, issuer: Issuer, tbs: bytes) -> bytes:
        return _leaf_der.signature(tbs, issuer.signer.private_key())
