"""Ed25519 signature checks with libsodium (RFC 8032).

A validator checks about one Ed25519 signature per issuance besides its
ECDSA ones (the proof set's binding signature, for an Ed25519 requester key),
plus every vote, proposal and seal. libsodium (the copy PyNaCl ships) does it
in about half the time OpenSSL takes through ``cryptography`` (best of five
runs on the 2-core machine, a 150-byte message: 56 against 115 µs). Every
validator must reach the same verdict on the same bytes, so all of them use
this one function: libsodium refuses a non-canonical ``S`` (at least the group
order), and small-order or non-canonical keys and ``R``, which no honest
signer makes.
"""

from __future__ import annotations

from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

KEY_SIZE = 32
SIGNATURE_SIZE = 64


def ed25519_verifies(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` by the raw
    32-byte ``public_key``; False for any malformed input."""
    if len(public_key) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        crypto_sign_open(signature + message, public_key)
    except (CryptoError, ValueError, TypeError):
        return False
    return True
