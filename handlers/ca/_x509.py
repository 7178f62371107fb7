"""Certificate builders for the hierarchy and for leaves. No I/O, no clock: time is passed in."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from protocol.ct_structs import SCT_LIST_OID, sct_list_extension_value

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


def leaf_subject(issuer: x509.Certificate, request: CheckedRequest) -> x509.Name:
    """``CN=`` the leaf's first DNS name of at most 64 characters (ub-common-name); a leaf
    without one has ``O=`` its CA's organization (the ``ca_id`` of the issuer's subject).

    Never empty: GnuTLS clients (Knot's kdig) refuse a certificate with an empty subject,
    although RFC 5280 allows one. Never ``CN=`` an address: GnuTLS checks a CN against the
    root's DNS name constraints when the certificate has no DNS name, and refuses it.
    """
    for name in request.dns_names:
        if len(name) <= COMMON_NAME_MAX:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return x509.Name(issuer.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))


def leaf_builder(issuer: x509.Certificate, request: CheckedRequest, *, serial: int,
                 not_before: float, not_after: float) -> x509.CertificateBuilder:
    """Everything of a leaf certificate but the signature."""
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in request.dns_names]
    san += [x509.IPAddress(ip) for ip in request.ip_addresses]
    subject = leaf_subject(issuer, request)
    san_critical = not subject  # RFC 5280 §4.2.1.6: an empty subject needs a critical SAN
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer.subject).public_key(request.public_key)
        .serial_number(serial)
        .not_valid_before(_utc(not_before)).not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=san_critical)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            issuer_ski), critical=False)
    )


def sign(builder: x509.CertificateBuilder, private_key: Any) -> x509.Certificate:
    return builder.sign(private_key, hash_for(private_key))


def sign_leaf(issuer: x509.Certificate, request: CheckedRequest, *, serial: int,
              not_before: float, not_after: float,
              extensions: Sequence[x509.Extension[x509.ExtensionType]],
              private_key: Any) -> bytes:
    """The DER of :func:`leaf_builder`'s certificate with ``extensions`` added last
    (CT: the precertificate poison, or the SCT list), signed by ``private_key``."""
    builder = leaf_builder(issuer, request, serial=serial, not_before=not_before,
                           not_after=not_after)
    for extension in extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return sign(builder, private_key).public_bytes(serialization.Encoding.DER)


def precertificate_poison() -> x509.Extension[x509.ExtensionType]:
    """The critical poison extension that makes a leaf a precertificate (RFC 6962 §3.1)."""
    return x509.Extension(ExtensionOID.PRECERT_POISON, True, x509.PrecertPoison())


def sct_list(scts: Sequence[bytes]) -> x509.Extension[x509.ExtensionType]:
    """The embedded SCT list extension (RFC 6962 §3.3) of TLS-encoded SCTs."""
    value = x509.UnrecognizedExtension(SCT_LIST_OID, sct_list_extension_value(list(scts)))
    return x509.Extension(SCT_LIST_OID, False, value)


def is_ec(private_key: Any) -> bool:
    return isinstance(private_key, ec.EllipticCurvePrivateKey)
