"""protocol.ed25519 (libsodium) reaches cryptography's (OpenSSL's) verdict on honest
and damaged signatures, and refuses what RFC 8032 makes invalid."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.ed25519 import ed25519_verifies
from store._signer import verify_signature

ORDER = 2**252 + 27742317777372353535851937790883648493
"""The order L of Ed25519's prime-order group."""


def _openssl(key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def test_the_verdicts_are_cryptographys_on_signatures_and_every_one_bit_change() -> None:
    for length in (0, 1, 64, 1000):
        private = Ed25519PrivateKey.generate()
        key = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        message = os.urandom(length)
        signature = private.sign(message)
        assert ed25519_verifies(key, signature, message) is True
        cases = [(key, signature, message + b"x")]
        cases += [(key, signature[:i] + bytes([signature[i] ^ 1 << (i % 8)]) + signature[i + 1:],
                   message) for i in range(64)]
        cases += [(key[:i] + bytes([key[i] ^ 1]) + key[i + 1:], signature, message)
                  for i in range(32)]
        if message:
            cases.append((key, signature, bytes([message[0] ^ 0x80]) + message[1:]))
        for case in cases:
            assert ed25519_verifies(*case) is _openssl(*case) is False


def test_malformed_keys_and_signatures_are_refused_not_raised() -> None:
    private = Ed25519PrivateKey.generate()
    key = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signature = private.sign(b"m")
    assert not ed25519_verifies(key[:31], signature, b"m")
    assert not ed25519_verifies(key + b"\0", signature, b"m")
    assert not ed25519_verifies(key, signature[:63], b"m")
    assert not ed25519_verifies(key, signature + b"\0", b"m")
    assert not ed25519_verifies(b"", b"", b"m")
    assert not ed25519_verifies(bytes(32), bytes(64), b"m")  # a small-order key


def test_a_non_canonical_s_is_refused() -> None:
    """S + L verifies the same equation; RFC 8032 §5.1.7 (and both libraries) refuse it,
    so that one message has one valid signature per key."""
    private = Ed25519PrivateKey.generate()
    key = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signature = private.sign(b"m")
    s = int.from_bytes(signature[32:], "little") + ORDER
    assert s < 2**256
    malleated = signature[:32] + s.to_bytes(32, "little")
    assert not _openssl(key, malleated, b"m")
    assert not ed25519_verifies(key, malleated, b"m")


def test_verify_signature_takes_ed25519_keys_through_libsodium() -> None:
    private = Ed25519PrivateKey.generate()
    signature = private.sign(b"statement")
    assert verify_signature(private.public_key(), signature, b"statement")
    assert not verify_signature(private.public_key(), signature, b"statement!")
    assert not verify_signature(private.public_key(), b"short", b"statement")
