"""What the CA will sign: CSR checks and the naming policy.

Every refusal is an :class:`protocol.InvalidRequest` (or ``Unauthorized`` for
a name held by another key) whose message says exactly what is wrong.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from protocol import InvalidRequest, Unauthorized

_HEX_AND_COLONS = re.compile(r"[0-9A-Fa-f:]+")


def is_address(name: str) -> bool:
    """Whether a certificate name is an IPv6 address (it owns no DNS records)."""
    if ":" not in name:  # every IPv6 address has one; spares a DNS name the parser's error
        return False
    if _HEX_AND_COLONS.fullmatch(name):  # (what str(IPv6Address) writes, but ::ffff:a.b.c.d)
        try:
            socket.inet_pton(socket.AF_INET6, name)  # the C parser: about 20 times faster
            return True
        except OSError:
            pass  # ipaddress has the last word
    try:
        ipaddress.IPv6Address(name)
    except ValueError:
        return False
    return True

MAX_CSR_BYTES = 16_384
MAX_NAMES = 100
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

SubjectKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, kw_only=True)
class NamingPolicy:
    """Rules for the names in a certificate (``[ca.policy]``, spec/config.md)."""

    domains: tuple[str, ...]
    """TrustChain top-level domains; every DNS name must be one of them or below one."""
    allow_wildcards: bool = False
    """Whether ``*.example.trust`` (one leftmost wildcard label) may be requested."""
    name_conflict: Literal["reject", "allow"] = "reject"
    """What to do when a name is held by an unexpired, unrevoked certificate for
    another key: ``reject`` (the holder must revoke first, or let it expire) or
    ``allow`` (several keys may hold one name)."""


@dataclass(frozen=True)
class CheckedRequest:
    """A CSR that passed every check."""

    public_key: SubjectKey
    spki_der: bytes
    spki_sha256: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[ipaddress.IPv6Address, ...]
    names: tuple[str, ...] = field(init=False, compare=False, repr=False)
    """The DNS names, then the addresses as text: made once, since a request checked once
    is read at every step of its issuance (``str`` of an address is slow)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", self.dns_names + tuple(
            str(ip) for ip in self.ip_addresses))


def load_csr(der: bytes) -> x509.CertificateSigningRequest:
    if len(der) > MAX_CSR_BYTES:
        raise InvalidRequest(f"the CSR is {len(der)} bytes; the limit is {MAX_CSR_BYTES}",
                             field="csr")
    try:
        csr = x509.load_der_x509_csr(der)
    except (ValueError, x509.InvalidVersion) as exc:  # (InvalidVersion is no ValueError)
        raise InvalidRequest(f"csr is not a DER PKCS#10 certificate request: {exc}",
                             field="csr") from None
    return csr


def check_key(csr: x509.CertificateSigningRequest) -> SubjectKey:
    try:
        key = csr.public_key()
    except Exception as exc:
        raise InvalidRequest(f"the CSR's public key cannot be read: {exc}", field="csr") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise InvalidRequest(f"EC curve {key.curve.name} is not accepted; use P-256, "
                                 "P-384 or Ed25519", field="csr")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        raise InvalidRequest("RSA keys are not accepted; use P-256, P-384 or Ed25519",
                             field="csr")
    raise InvalidRequest(f"{type(key).__name__} keys are not accepted; use P-256, P-384 or "
                         "Ed25519", field="csr")


_ECDSA: dict[x509.ObjectIdentifier, ec.ECDSA] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA224: ec.ECDSA(hashes.SHA224()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA3_224: ec.ECDSA(hashes.SHA3_224()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA3_256: ec.ECDSA(hashes.SHA3_256()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA3_384: ec.ECDSA(hashes.SHA3_384()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA3_512: ec.ECDSA(hashes.SHA3_512()),
}
"""The ECDSA signature algorithms cryptography verifies a CSR with, by OID (not
ecdsa-with-SHA1): what ``csr.signature_algorithm_parameters`` builds for each, made once."""


def signature_verifies(csr: x509.CertificateSigningRequest, key: SubjectKey) -> bool:
    """Whether the CSR's signature verifies with ``key``, its own key already loaded by
    :func:`check_key`: the verdict of ``csr.is_signature_valid``, which loads the key a
    second time.

    As cryptography decides it: the signature algorithm must be one for the key's
    type (ECDSA with any hash it knows for an EC key, Ed25519 for an Ed25519 key;
    a mismatch is a refusal), and the signature is checked over the re-encoded
    ``CertificationRequestInfo`` (``tbs_certrequest_bytes``, what it signs over).
    Any failure on the way is a refusal, as there.
    """
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = _ECDSA.get(csr.signature_algorithm_oid)
            if algorithm is None:
                return False
            key.verify(csr.signature, csr.tbs_certrequest_bytes, algorithm)
            return True
        if csr.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
            return False
        key.verify(csr.signature, csr.tbs_certrequest_bytes)
        return True
    except Exception:  # as in is_signature_valid: any error is an invalid signature
        return False


def normalise_dns_name(name: str, policy: NamingPolicy) -> str:
    """The lowercase form of ``name`` if the policy allows it."""
    text = name.rstrip(".").lower()
    if not text or len(text) > 253:
        raise InvalidRequest(f"{name!r} is not a valid DNS name", field="csr")
    labels = text.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0:
            if not policy.allow_wildcards:
                raise InvalidRequest(f"{name!r}: wildcard names are not allowed by policy",
                                     field="csr")
            if len(labels) < 3:
                raise InvalidRequest(f"{name!r}: a wildcard needs at least two labels below it",
                                     field="csr")
            continue
        if not _LABEL.match(label):
            raise InvalidRequest(f"{name!r} is not a valid DNS name (label {label!r})",
                                 field="csr")
    if not any(text == d or text.endswith("." + d) for d in policy.domains):
        raise InvalidRequest(f"{name!r} is outside the TrustChain domains "
                             f"({', '.join(policy.domains)})", field="csr")
    return text


def check_names(csr: x509.CertificateSigningRequest,
                policy: NamingPolicy) -> tuple[tuple[str, ...], tuple[ipaddress.IPv6Address, ...]]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidRequest("the CSR has no subjectAltName extension; put the names there",
                             field="csr") from None
    except ValueError as exc:
        raise InvalidRequest(f"the CSR's extensions cannot be parsed: {exc}",
                             field="csr") from None
    dns: list[str] = []
    ips: list[ipaddress.IPv6Address] = []
    for general in san:
        if isinstance(general, x509.DNSName):
            dns.append(normalise_dns_name(general.value, policy))
        elif isinstance(general, x509.IPAddress):
            ip = general.value
            if not isinstance(ip, ipaddress.IPv6Address):
                raise InvalidRequest(f"IPv4 address {ip} is not allowed: TrustChain is "
                                     "IPv6 only", field="csr")
            if ip.ipv4_mapped is not None:
                raise InvalidRequest(f"{ip} is an IPv4-mapped address: TrustChain is IPv6 only",
                                     field="csr")
            if ip.is_unspecified or ip.is_multicast:
                raise InvalidRequest(f"{ip} cannot identify a host", field="csr")
            ips.append(ip)
        else:
            raise InvalidRequest(f"subjectAltName entries of type {type(general).__name__} "
                                 "are not allowed; use DNS names and IPv6 addresses",
                                 field="csr")
    if not dns and not ips:
        raise InvalidRequest("the CSR's subjectAltName is empty", field="csr")
    if len(dns) + len(ips) > MAX_NAMES:
        raise InvalidRequest(f"at most {MAX_NAMES} names per certificate", field="csr")
    return tuple(dict.fromkeys(dns)), tuple(dict.fromkeys(ips))


def check_request(der: bytes, policy: NamingPolicy) -> CheckedRequest:
    """Parse and check a CSR: signature, key, names.

    The same CSR is checked by its entry validator, by every validator before the vote
    and again when the block executes: the answer is kept for the most recent ones.

    :raises InvalidRequest: with ``field = "csr"`` and the reason.
    """
    return _check_request(der, policy)


@functools.lru_cache(maxsize=4096)
def _check_request(der: bytes, policy: NamingPolicy) -> CheckedRequest:
    csr = load_csr(der)
    key = check_key(csr)
    if not signature_verifies(csr, key):
        raise InvalidRequest("the CSR's signature does not verify with its own key",
                             field="csr")
    dns, ips = check_names(csr, policy)
    spki = key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return CheckedRequest(public_key=key, spki_der=spki,
                          spki_sha256=hashlib.sha256(spki).hexdigest(),
                          dns_names=dns, ip_addresses=ips)


def check_ownership(request: CheckedRequest, holders: dict[str, list[tuple[str, str, float]]],
                    policy: NamingPolicy, renews: str | None = None) -> None:
    """Refuse names held by another key, if the policy says so.

    A name may pass to a new key when the request renews (``renews``, already
    proven by a signature of the old key) the certificate that holds it.

    :param holders: for each requested name, (serial, spki_sha256, not_after) of
        the unexpired, unrevoked certificates that carry it.
    :raises Unauthorized: a name is held by a certificate for another key.
    """
    if policy.name_conflict == "allow":
        return
    for name, held in holders.items():
        for serial, spki, not_after in held:
            if spki != request.spki_sha256 and serial != renews:
                raise Unauthorized(
                    f"{name} is held by another key (certificate {serial}, valid until "
                    f"{int(not_after)}); it must be revoked or expire first",
                    field="csr", name=name, serial=serial)
