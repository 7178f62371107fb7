"""What a TrustChain leaf must be, checked by anyone who holds the request and the issuer.

A validator that seals an issuance signs the precertificate itself and puts it
in the decision: it fixes the serial number (128 random bits, top bit set),
the validity (from the decision's time, back-dated, capped by the issuing
intermediate) and everything else from the CSR and the profile of
:func:`_x509.leaf_builder`. Every other validator rebuilds the expected TBS
from the same inputs (written directly, :func:`_x509.leaf_tbs`: no signature)
and compares bytes (:func:`check_precertificate`), so an
issuer can sign nothing the rules did not allow; the final certificate must
then be the same TBS with the SCT list in place of the poison
(:func:`check_certificate`), or is assembled from the committed precertificate,
the SCT list and the signature (:func:`assemble_certificate`).
"""

from __future__ import annotations

from cryptography import x509

from protocol.ct_structs import (
    SCT_LIST_OID,
    StructureError,
    certificate_der,
    certificate_parts,
    precert_tbs,
)

from . import _x509
from ._policy import CheckedRequest


class ProfileError(ValueError):
    """A certificate that is not what the rules allow; the message says what differs."""


def validity(at_ms: int, *, lifetime: float, backdate: float,
             issuer: x509.Certificate) -> tuple[int, int]:
    """``(not_before, not_after)`` of a leaf decided at ``at_ms``: back-dated, and never
    beyond the issuing intermediate."""
    start = at_ms // 1000
    return (start - int(backdate),
            min(start + int(lifetime), int(issuer.not_valid_after_utc.timestamp())))


def expected_tbs(request: CheckedRequest, issuer: x509.Certificate, *, serial: int,
                 not_before: int, not_after: int,
                 extensions: list[x509.Extension[x509.ExtensionType]]) -> bytes:
    """The TBSCertificate the profile makes of these inputs (the signature aside)."""
    return _x509.leaf_tbs(issuer, request, serial=serial, not_before=not_before,
                          not_after=not_after, extensions=extensions,
                          algorithm=_x509.issuer_signature_algorithm(issuer))


def _verify_issued(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    if not _x509.issued_by(cert, issuer):
        raise ProfileError("it is not signed by the issuing intermediate")


def check_precertificate(precertificate: bytes, *, request: CheckedRequest,
                         issuer: x509.Certificate, at_ms: int, lifetime: float,
                         backdate: float, verify: bool = True) -> x509.Certificate:
    """The precertificate, if it is exactly what ``request`` decided at ``at_ms`` allows.

    :param verify: check the issuer's signature (False: the caller made it itself).

    :raises ProfileError: it is not (the message says what differs).
    """
    try:
        cert = x509.load_der_x509_certificate(precertificate)
    except ValueError:
        raise ProfileError("the precertificate is not a DER certificate") from None
    serial = cert.serial_number
    if serial >> (_x509.SERIAL_BITS - 1) != 1:
        raise ProfileError("the serial number is not 128 bits with the top bit set")
    not_before, not_after = validity(at_ms, lifetime=lifetime, backdate=backdate,
                                     issuer=issuer)
    if not_after < not_before:
        raise ProfileError("the intermediate had expired when the issuance was decided")
    expected = expected_tbs(request, issuer, serial=serial, not_before=not_before,
                            not_after=not_after, extensions=[_x509.precertificate_poison()])
    if cert.tbs_certificate_bytes != expected:
        raise ProfileError("the precertificate is not the one the request and the profile "
                           "make (names, key, validity or extensions differ)")
    if verify:
        _verify_issued(cert, issuer)
    return cert


def check_certificate(certificate: bytes, *, precertificate: bytes,
                      issuer: x509.Certificate, verify: bool = True) -> x509.Certificate:
    """The final certificate, if it is the committed precertificate with an SCT list
    instead of the poison, signed by the issuer.

    :param verify: check the issuer's signature (False: the caller made it itself).

    :raises ProfileError: it is not.
    """
    try:
        cert = x509.load_der_x509_certificate(certificate)
        cert.extensions.get_extension_for_oid(SCT_LIST_OID)
    except x509.ExtensionNotFound:
        raise ProfileError("the certificate carries no SCT list") from None
    except ValueError:
        raise ProfileError("the certificate is not a DER certificate") from None
    try:
        committed = precert_tbs(precertificate)
    except StructureError as exc:
        raise ProfileError(f"the committed precertificate cannot be read: {exc}") from None
    if cert.tbs_precertificate_bytes != committed:
        raise ProfileError("the certificate is not the committed precertificate (with its "
                           "SCTs): serial, names, key, validity or extensions differ")
    if verify:
        _verify_issued(cert, issuer)
    return cert


def assemble_certificate(*, precertificate: bytes, sct_list: bytes, signature: bytes,
                         issuer: x509.Certificate, verify: bool = True) -> bytes:
    """The final certificate's DER, assembled from the committed precertificate, the SCT
    list and the signature (as :func:`protocol.ct_structs.certificate_of`), if the issuer's
    key signed its TBS.

    :param verify: check the issuer's signature (False: the caller made it itself).

    :raises ProfileError: the SCT list cannot be read, or the signature does not verify.
    """
    try:
        tbs, algorithm = certificate_parts(precertificate, sct_list)
    except StructureError as exc:
        raise ProfileError(f"its SCT list cannot be read: {exc}") from None
    if verify and not _x509.signs(issuer, tbs, signature):
        raise ProfileError("its signature is not the issuing intermediate's over the "
                           "committed precertificate with this SCT list")
    return certificate_der(tbs, algorithm, signature)
