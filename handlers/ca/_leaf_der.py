"""DER for a leaf certificate, written directly (X.690 DER, RFC 5280 §4.1).

``cryptography`` makes a TBSCertificate only by signing one: every validator
that rebuilt a precertificate's TBS paid a throwaway signature and a whole
encoding for it, and an issuer encodes every leaf through the builder twice.
These are the few DER pieces a TrustChain leaf is made of; the profile that
puts them together is :func:`handlers.ca._x509.leaf_tbs`, held byte for byte
to ``cryptography``'s ``CertificateBuilder`` by ``tests/unit/test_leaf_der.py``.
"""

from __future__ import annotations

import datetime
import functools
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from protocol.ct_structs import certificate_der, der_read, der_tlv
from store import ECDSA_WITH_SHA256

SEQUENCE = 0x30
OCTET_STRING = 0x04
UTF8_STRING = 0x0C
_INTEGER = 0x02
_BIT_STRING = 0x03
_OBJECT_IDENTIFIER = 0x06
_SET = 0x31
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18

ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
"""AlgorithmIdentifier ecdsa-with-SHA256, parameters absent (RFC 5758 §3.2)."""
ED25519 = bytes.fromhex("300506032b6570")
"""AlgorithmIdentifier id-Ed25519, parameters absent (RFC 8410 §3)."""
_VERSION_3 = bytes.fromhex("a003020102")
"""``version [0] EXPLICIT Version`` = v3."""
_CRITICAL = bytes.fromhex("0101ff")
"""``critical BOOLEAN`` TRUE; FALSE is the DEFAULT, so DER leaves it out."""


tlv = der_tlv
"""One DER element: the tag, the definite length, the content."""

def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def integer(value: int) -> bytes:
    """A non-negative INTEGER in its fewest octets (a leading zero when the top bit is set)."""
    return tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def explicit(number: int, content: bytes) -> bytes:
    """``[number] EXPLICIT``: a constructed context-specific tag around ``content``."""
    return tlv(0xA0 | number, content)


def time(moment: datetime.datetime) -> bytes:
    """RFC 5280 §4.1.2.5 Time: UTCTime for 1950 through 2049, GeneralizedTime from 2050;
    whole seconds, ``Z``. ``moment`` is in UTC."""
    clock = (moment.month, moment.day, moment.hour, moment.minute, moment.second)
    if 1950 <= moment.year < 2050:
        return tlv(_UTC_TIME, b"%02d%02d%02d%02d%02d%02dZ" % (moment.year % 100, *clock))
    return tlv(_GENERALIZED_TIME, b"%04d%02d%02d%02d%02d%02dZ" % (moment.year, *clock))


@functools.lru_cache(maxsize=64)
def object_identifier(dotted: str) -> bytes:
    """The OBJECT IDENTIFIER ``dotted`` (``"1.3.6.1.4.1.11129.2.4.3"``)."""
    arcs = [int(arc) for arc in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"{dotted!r} is not an object identifier")
    content = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        content += bytes(reversed(chunk))
    return tlv(_OBJECT_IDENTIFIER, bytes(content))


_COMMON_NAME = object_identifier("2.5.4.3")


def extension(oid: bytes, critical: bool, value: bytes) -> bytes:
    """``Extension ::= SEQUENCE { extnID, critical DEFAULT FALSE, extnValue OCTET STRING }``
    of an encoded OID and an encoded value."""
    return sequence(oid, _CRITICAL if critical else b"", tlv(OCTET_STRING, value))


def common_name(value: str) -> bytes:
    """The Name ``CN=value``: one RDN of one AttributeTypeAndValue, a UTF8String (the
    type ``cryptography`` gives a common name)."""
    attribute = sequence(_COMMON_NAME, tlv(UTF8_STRING, value.encode()))
    return sequence(tlv(_SET, attribute))


def spki_key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey bits of a SubjectPublicKeyInfo (what a subject key
    identifier hashes, RFC 5280 §4.2.1.2 method 1)."""
    _, info, _ = der_read(spki, 0)
    _, _, algorithm_end = der_read(info, 0)
    tag, bits, _ = der_read(info, algorithm_end)
    if tag != _BIT_STRING or not bits or bits[0] != 0:
        raise ValueError("the SubjectPublicKeyInfo does not end in a BIT STRING of octets")
    return bits[1:]


def tbs_certificate(*, serial: int, algorithm: bytes, issuer: bytes, validity: bytes,
                    subject: bytes, spki: bytes, extensions: bytes) -> bytes:
    """``TBSCertificate`` v3 of encoded parts; ``validity`` is ``SEQUENCE { notBefore
    Time, notAfter Time }`` (:func:`time`), ``extensions`` the encoded Extension
    elements, in order."""
    return sequence(_VERSION_3, integer(serial), algorithm, issuer, validity, subject, spki,
                    explicit(3, sequence(extensions)))


def signature_algorithm(private_key: object) -> bytes:
    """The AlgorithmIdentifier a leaf signed by ``private_key`` carries: what
    ``CertificateBuilder.sign`` picks with :func:`handlers.ca._x509.hash_for`.

    :raises TypeError: a key that is neither ECDSA nor Ed25519 (no keystore holds one).
    """
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return ED25519
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return ECDSA_SHA256
    raise TypeError(f"cannot sign a certificate with a {type(private_key).__name__}: "
                    "ECDSA or Ed25519 keys only")


def signature(tbs: bytes, private_key: Any) -> bytes:
    """``private_key``'s signature of ``tbs`` (its own ``sign()``: a software key or a
    token's, alike), with the algorithm of :func:`signature_algorithm`.

    :raises TypeError: a key that is neither ECDSA nor Ed25519.
    """
    if signature_algorithm(private_key) == ED25519:  # (a TypeError for another kind)
        return bytes(private_key.sign(tbs))
    return bytes(private_key.sign(tbs, ECDSA_WITH_SHA256))


def signed_certificate(tbs: bytes, algorithm: bytes, private_key: Any) -> bytes:
    """``Certificate ::= SEQUENCE { tbs, signatureAlgorithm, signatureValue }``, signed by
    ``private_key`` (:func:`signature`).

    ``algorithm`` is :func:`signature_algorithm` of the key, the one inside ``tbs``.
    """
    return certificate_der(tbs, algorithm, signature(tbs, private_key))
