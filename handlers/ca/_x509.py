"""Certificate builders for the hierarchy and for leaves. No I/O, no clock: time is passed in."""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import (
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
    SignatureAlgorithmOID,
)

from protocol.ct_structs import SCT_LIST_OID, sct_list_extension_value
from store import ECDSA_WITH_SHA256

from . import _leaf_der
from ._policy import CheckedRequest

SERIAL_BITS = 128
COMMON_NAME_MAX = 64
"""ub-common-name, RFC 5280 appendix A.1."""


def new_serial() -> int:
    """A random 128-bit serial; the top bit is set so every serial has 32 hex digits."""
    return secrets.randbits(SERIAL_BITS) | (1 << (SERIAL_BITS - 1))


def serial_hex(serial: int) -> str:
    """The lowercase hexadecimal form used in ops, the CLI and logs."""
    return format(serial, "x")


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).replace(microsecond=0)


def _ca_usage(digital_signature: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                         decipher_only=False)


def name_constraints(domains: tuple[str, ...]) -> x509.NameConstraints:
    """DNS names under the TrustChain domains and IPv6 addresses only (no IPv4)."""
    permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in domains]
    permitted.append(x509.IPAddress(ipaddress.IPv6Network("::/0")))
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None)


def hash_for(private_key: Any) -> hashes.SHA256 | None:
    return None if isinstance(private_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def build_root(private_key: Any, public_key: Any, *, ca_id: str, domains: tuple[str, ...],
               not_before: float, not_after: float) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca_id),
                         x509.NameAttribute(NameOID.COMMON_NAME, "TrustChain Root CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(_utc(not_before)).not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(name_constraints(domains), critical=True)
        .sign(private_key, hash_for(private_key))
    )


def intermediate_name(ca_id: str, number: int, holder: str | None = None) -> x509.Name:
    """The subject of an issuing intermediate; ``holder`` names the validator that holds
    its key (a cluster has one intermediate per validator: their names must differ)."""
    common = f"TrustChain Issuing CA {number}" + (f" ({holder})" if holder else "")
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca_id),
                      x509.NameAttribute(NameOID.COMMON_NAME, common[:64])])


def build_intermediate(root_private_key: Any, root: x509.Certificate, public_key: Any, *,
                       ca_id: str, number: int, domains: tuple[str, ...],
                       not_before: float, not_after: float,
                       subject: x509.Name | None = None) -> x509.Certificate:
    subject = subject or intermediate_name(ca_id, number)
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(root.subject).public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(_utc(not_before)).not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
                       critical=False)
        .add_extension(name_constraints(domains), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(root_private_key, hash_for(root_private_key))
    )


def leaf_common_name(request: CheckedRequest) -> str | None:
    """The leaf's ``CN``: its first DNS name of at most 64 characters (ub-common-name);
    None if it has none (see :func:`leaf_subject`)."""
    for name in request.dns_names:
        if len(name) <= COMMON_NAME_MAX:
            return name
    return None


def leaf_subject(issuer: x509.Certificate, request: CheckedRequest) -> x509.Name:
    """``CN=`` the leaf's first DNS name of at most 64 characters (ub-common-name); a leaf
    without one has ``O=`` its CA's organization (the ``ca_id`` of the issuer's subject).

    Never empty: GnuTLS clients (Knot's kdig) refuse a certificate with an empty subject,
    although RFC 5280 allows one. Never ``CN=`` an address: GnuTLS checks a CN against the
    root's DNS name constraints when the certificate has no DNS name, and refuses it.
    """
    common = leaf_common_name(request)
    if common is not None:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
    return x509.Name(issuer.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))


_LEAF_BASIC = x509.BasicConstraints(ca=False, path_length=None)
_LEAF_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)
_LEAF_EXTENDED_USAGE = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH])


def leaf_builder(issuer: x509.Certificate, request: CheckedRequest, *, serial: int,
                 not_before: float, not_after: float) -> x509.CertificateBuilder:
    """Everything of a leaf certificate but the signature.

    The reference form of the profile: :func:`leaf_tbs` writes the same bytes directly.
    """
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in request.dns_names]
    san += [x509.IPAddress(ip) for ip in request.ip_addresses]
    subject = leaf_subject(issuer, request)
    san_critical = not subject  # RFC 5280 §4.2.1.6: an empty subject needs a critical SAN
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer.subject).public_key(request.public_key)
        .serial_number(serial)
        .not_valid_before(_utc(not_before)).not_valid_after(_utc(not_after))
        .add_extension(_LEAF_BASIC, critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(_LEAF_EXTENDED_USAGE, critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=san_critical)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            issuer_ski), critical=False)
    )


def sign(builder: x509.CertificateBuilder, private_key: Any) -> x509.Certificate:
    return builder.sign(private_key, hash_for(private_key))


# --- the same leaf, written directly (_leaf_der) ------------------------------------------

_EMPTY_NAME = _leaf_der.sequence()
_LEAF_FIXED = b"".join(
    _leaf_der.extension(_leaf_der.object_identifier(value.oid.dotted_string), critical,
                        value.public_bytes())
    for value, critical in ((_LEAF_BASIC, True), (_LEAF_USAGE, True),
                            (_LEAF_EXTENDED_USAGE, False)))
"""The leaf's first three extensions, the same for every leaf."""
_SAN = _leaf_der.object_identifier(ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string)
_SKI = _leaf_der.object_identifier(ExtensionOID.SUBJECT_KEY_IDENTIFIER.dotted_string)
_PROFILE_OIDS = frozenset(oid.dotted_string for oid in (
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER))
_EARLIEST = datetime.datetime(1950, 1, 1, tzinfo=datetime.UTC)
"""The builder refuses validity dates before 1950 (UTCTime's first year)."""


@dataclass(frozen=True, slots=True)
class _IssuerParts:
    """What every leaf of one issuing intermediate shares, encoded."""

    certificate: x509.Certificate
    name: bytes
    """The issuer Name."""
    organization: bytes
    """The subject of a leaf without a CN (:func:`leaf_subject`)."""
    authority_key_id: bytes
    """The AuthorityKeyIdentifier extension."""
    algorithm: bytes
    """The AlgorithmIdentifier of a signature by the issuer's key kind."""
    public_key: Any
    """The issuer's public key, loaded once (every check of its leaves verifies with it)."""


_issuers: dict[int, _IssuerParts] = {}
_ISSUERS_KEPT = 64
_ED25519_OID = SignatureAlgorithmOID.ED25519
_ECDSA_SHA256_OID = SignatureAlgorithmOID.ECDSA_WITH_SHA256


def _issuer_parts(issuer: x509.Certificate) -> _IssuerParts:
    """The encoded parts of ``issuer``, kept by object (hashing a certificate costs as much
    as encoding its name again)."""
    parts = _issuers.get(id(issuer))
    if parts is not None and parts.certificate is issuer:
        return parts
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    public_key = issuer.public_key()
    ed = isinstance(public_key, ed25519.Ed25519PublicKey)
    parts = _IssuerParts(
        certificate=issuer, name=issuer.subject.public_bytes(),
        organization=x509.Name(issuer.subject.get_attributes_for_oid(
            NameOID.ORGANIZATION_NAME)).public_bytes(),
        authority_key_id=_leaf_der.extension(
            _leaf_der.object_identifier(aki.oid.dotted_string), False, aki.public_bytes()),
        algorithm=_leaf_der.ED25519 if ed else _leaf_der.ECDSA_SHA256, public_key=public_key)
    if len(_issuers) >= _ISSUERS_KEPT:
        _issuers.clear()
    _issuers[id(issuer)] = parts  # holds ``issuer``, so its id is not reused meanwhile
    return parts


def issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``certificate``, with the algorithm a TrustChain
    leaf uses (:func:`issuer_signature_algorithm`), in its outer AlgorithmIdentifier too.

    The issuer's Name is not compared: the callers compared the whole TBS, which holds it.
    Unlike ``verify_directly_issued_by`` it keeps the issuer's loaded key (a quarter of
    the cost of a check).
    """
    ed = _issuer_parts(issuer).algorithm == _leaf_der.ED25519
    if certificate.signature_algorithm_oid != (_ED25519_OID if ed else _ECDSA_SHA256_OID):
        return False
    return signs(issuer, certificate.tbs_certificate_bytes, certificate.signature)


def signs(issuer: x509.Certificate, tbs: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``issuer``'s key's of ``tbs``, with the algorithm a
    TrustChain leaf uses (:func:`issuer_signature_algorithm`)."""
    parts = _issuer_parts(issuer)
    try:
        if parts.algorithm == _leaf_der.ED25519:
            parts.public_key.verify(signature, tbs)
        else:
            parts.public_key.verify(signature, tbs, ECDSA_WITH_SHA256)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def issuer_signature_algorithm(issuer: x509.Certificate) -> bytes:
    """The AlgorithmIdentifier of a leaf signed by ``issuer``'s key: Ed25519 for an
    Ed25519 key, else ecdsa-with-SHA256."""
    return _issuer_parts(issuer).algorithm


@functools.lru_cache(maxsize=1024)
def _validity(not_before: float, not_after: float) -> bytes:
    """The encoded Validity, refused where the builder refuses it. Kept: a leaf's
    precertificate and certificate, and every validator's check, share theirs."""
    start, end = _utc(not_before), _utc(not_after)
    if start < _EARLIEST:
        raise ValueError("The not valid before date must be on or after 1950 January 1).")
    if end < _EARLIEST:
        raise ValueError("The not valid after date must be on or after 1950 January 1.")
    if end < start:
        raise ValueError("The not valid after date must be after the not valid before date.")
    return _leaf_der.sequence(_leaf_der.time(start), _leaf_der.time(end))


def leaf_tbs(issuer: x509.Certificate, request: CheckedRequest, *, serial: int,
             not_before: float, not_after: float,
             extensions: Sequence[x509.Extension[x509.ExtensionType]],
             algorithm: bytes) -> bytes:
    """The TBSCertificate of :func:`leaf_builder`'s certificate with ``extensions`` added
    last, signed with ``algorithm`` (an encoded AlgorithmIdentifier): the bytes
    ``CertificateBuilder.sign`` makes, without a signature.

    ``request.spki_der`` must be the key as ``cryptography`` encodes it (as
    :class:`CheckedRequest` holds it).

    :raises ValueError: what the builder refuses: a serial number not positive or longer
        than 159 bits, validity before 1950 or ending before it starts, an extension twice.
    """
    if serial <= 0:
        raise ValueError("The serial number should be positive.")
    if serial.bit_length() >= 160:
        raise ValueError("The serial number should not be more than 159 bits.")
    validity = _validity(not_before, not_after)
    parts = _issuer_parts(issuer)
    common = leaf_common_name(request)
    subject = _leaf_der.common_name(common) if common is not None else parts.organization
    names = b"".join([_leaf_der.tlv(0x82, name.encode("ascii")) for name in request.dns_names]
                     + [_leaf_der.tlv(0x87, ip.packed) for ip in request.ip_addresses])
    key_id = hashlib.sha1(_leaf_der.spki_key_bits(request.spki_der)).digest()
    fields = [_LEAF_FIXED,
              _leaf_der.extension(_SAN, subject == _EMPTY_NAME, _leaf_der.sequence(names)),
              _leaf_der.extension(_SKI, False, _leaf_der.tlv(_leaf_der.OCTET_STRING, key_id)),
              parts.authority_key_id]
    seen = set(_PROFILE_OIDS)
    for extra in extensions:
        dotted = extra.value.oid.dotted_string
        if dotted in seen:
            raise ValueError("This extension has already been set.")
        seen.add(dotted)
        fields.append(_leaf_der.extension(_leaf_der.object_identifier(dotted), extra.critical,
                                          extra.value.public_bytes()))
    return _leaf_der.tbs_certificate(
        serial=serial, algorithm=algorithm, issuer=parts.name, validity=validity,
        subject=subject, spki=request.spki_der, extensions=b"".join(fields))


def sign_leaf(issuer: x509.Certificate, request: CheckedRequest, *, serial: int,
              not_before: float, not_after: float,
              extensions: Sequence[x509.Extension[x509.ExtensionType]],
              private_key: Any) -> bytes:
    """The DER of :func:`leaf_builder`'s certificate with ``extensions`` added last
    (CT: the precertificate poison, or the SCT list), signed by ``private_key``: an ECDSA
    or Ed25519 key, in software or in a token (its own ``sign()``).

    :raises ValueError: see :func:`leaf_tbs`.
    :raises TypeError: a key of another kind.
    """
    algorithm = _leaf_der.signature_algorithm(private_key)
    tbs = leaf_tbs(issuer, request, serial=serial, not_before=not_before,
                   not_after=not_after, extensions=extensions, algorithm=algorithm)
    return _leaf_der.signed_certificate(tbs, algorithm, private_key)


def precertificate_poison() -> x509.Extension[x509.ExtensionType]:
    """The critical poison extension that makes a leaf a precertificate (RFC 6962 §3.1)."""
    return x509.Extension(ExtensionOID.PRECERT_POISON, True, x509.PrecertPoison())


def sct_list(scts: Sequence[bytes]) -> x509.Extension[x509.ExtensionType]:
    """The embedded SCT list extension (RFC 6962 §3.3) of TLS-encoded SCTs."""
    value = x509.UnrecognizedExtension(SCT_LIST_OID, sct_list_extension_value(list(scts)))
    return x509.Extension(SCT_LIST_OID, False, value)


def is_ec(private_key: Any) -> bool:
    return isinstance(private_key, ec.EllipticCurvePrivateKey)
