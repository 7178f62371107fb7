"""The one small interface every signing key sits behind, software or HSM.

Root, intermediates, the CT log and the audit log all sign through a
:class:`Signer` so that the code above never learns where a key lives; a
:class:`KeyStore` finds or creates signers by name.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal, Protocol, TypeAlias, get_args

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from protocol.ed25519 import ed25519_verifies

from ._errors import KeyStoreError

Algorithm = Literal["ecdsa-p256-sha256", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)

PublicKey: TypeAlias = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

# Names become file names and token labels: keep them boring.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class Signer(Protocol):
    """One named key pair that can sign, wherever its private half lives."""

    name: str
    algorithm: Algorithm

    def public_key(self) -> PublicKey:
        """The public half, as a ``cryptography`` object."""
        ...

    def sign(self, data: bytes) -> bytes:
        """ECDSA: DER signature over SHA-256(data); Ed25519: the 64-byte signature."""
        ...

    def private_key(self) -> PrivateKey:
        """Something ``CertificateBuilder.sign()`` and friends accept as the key."""
        ...


class KeyStore(Protocol):
    """Named keys in one place: a directory (development) or a PKCS#11 token."""

    kind: Literal["software", "pkcs11"]

    def get(self, name: str) -> Signer | None:
        """The key called ``name``, or None if there is none."""
        ...

    def create(self, name: str, algorithm: Algorithm = "ecdsa-p256-sha256") -> Signer:
        """Generate a new key; KeyStoreError if ``name`` is taken."""
        ...

    def get_or_create(self, name: str, algorithm: Algorithm = "ecdsa-p256-sha256") -> Signer:
        """The existing key ``name`` (of any algorithm), or a new one."""
        ...

    def names(self) -> list[str]:
        """The names of all keys, sorted."""
        ...

    def close(self) -> None:
        """Release the token session (its signers stop working); idempotent."""
        ...


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid key name, else raise KeyStoreError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KeyStoreError(f"invalid key name {name!r}: use 1-64 characters of a-z, 0-9, "
                            "'.', '_' or '-', starting with a letter or digit")
    return name


def check_algorithm(algorithm: str) -> Algorithm:
    """Return ``algorithm`` if it is one we sign with, else raise KeyStoreError."""
    for known in ALGORITHMS:
        if algorithm == known:
            return known
    raise KeyStoreError(f"unsupported key algorithm {algorithm!r}: use one of "
                        f"{', '.join(ALGORITHMS)}")


def algorithm_of(key: PublicKey | PrivateKey) -> Algorithm:
    """The :data:`Algorithm` of a key, or KeyStoreError for any other kind of key."""
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "ed25519"
    if (isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey)
            and isinstance(key.curve, ec.SECP256R1)):
        return "ecdsa-p256-sha256"
    raise KeyStoreError(f"unsupported key type {type(key).__name__}: only P-256 and Ed25519")


def spki_sha256(public_key: PublicKey) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: the key's stable identifier."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


ECDSA_WITH_SHA256 = ec.ECDSA(hashes.SHA256())
"""ECDSA with SHA-256 (built once: every P-256 signature made or checked uses it)."""
ECDSA_WITH_SHA384 = ec.ECDSA(hashes.SHA384())


def verify_signature(public_key: Any, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is valid for ``data``: Ed25519, or DER ECDSA with SHA-256
    (P-256, as :meth:`Signer.sign` makes it) or SHA-384 (P-384). False for any
    other key type or a malformed signature."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return ed25519_verifies(public_key.public_bytes_raw(), signature, data)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ECDSA_WITH_SHA384 if public_key.curve.key_size == 384
                              else ECDSA_WITH_SHA256)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True
