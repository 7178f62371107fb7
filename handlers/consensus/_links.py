"""Validator link binding: a validator's key certifies the TLS key of its endpoint.

A STOQ connection between validators is authenticated in both directions
(spec §18.2):

- the connecting validator reads the TLS certificate the endpoint presented,
  asks ``consensus.identity`` and checks that the endpoint's validator key
  signed a *link statement* naming that certificate's public key; an endpoint
  that cannot show one (an impostor on the address, a retired key) is refused;
- the connecting validator sends, with every ``consensus.gossip``, its own
  link statement over the *endpoint's* TLS key. Only that endpoint ever sees
  it (inside TLS), and it names that endpoint's key, so nobody can replay it
  elsewhere; the endpoint accepts gossip only from a validator of the set.

The statement is static per (validator, TLS key): the node computes it once
per key, and a verifier caches what it checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .bft import ValidatorSet

LINK_LABEL = b"trustchain validator link v1\n"


def spki_sha256(certificate_der: bytes) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo of a DER certificate (the TLS key it names)."""
    certificate = x509.load_der_x509_certificate(certificate_der)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def link_statement(chain_id: str, validator: str, tls_key: bytes) -> bytes:
    """The bytes ``validator`` signs to say "``tls_key`` (an SPKI hash) speaks for me"."""
    return b"".join((LINK_LABEL, chain_id.encode(), b"\n", validator.encode(), b"\n",
                     tls_key))


def link_refusal(validators: ValidatorSet, chain_id: str, validator: str, tls_key: bytes,
                 signature: bytes) -> str | None:
    """None if ``signature`` binds ``tls_key`` to ``validator``, a voting member of
    ``validators``; else why the link is refused."""
    member = next((v for v in validators.validators if v.id == validator), None)
    if member is None:
        return f"{validator[:16]} is not a validator of this chain"
    if member.power == 0:
        return f"validator {validator[:16]} is isolated or retired"
    if not member.verify(signature, link_statement(chain_id, validator, tls_key)):
        return (f"the link statement does not verify under validator {validator[:16]}'s key "
                "for this TLS key")
    return None


class LinkVerifier:
    """Checks inbound link statements against this node's recent TLS keys.

    :param validators: the current validator set (isolation changes it).
    """

    CACHE = 256

    def __init__(self, *, chain_id: str, validators: Callable[[], ValidatorSet]) -> None:
        self.chain_id = chain_id
        self.validators = validators
        self._checked: dict[tuple[str, bytes], bool] = {}
        self._refused: dict[tuple[str, bytes],
                            tuple[ValidatorSet, tuple[bytes, ...], str]] = {}
        """Statements refused, with the validator set and TLS keys they were checked
        against: a peer repeating a forged statement costs a lookup, not a signature
        check, until either changes."""

    def refusal(self, validator: str | None, signature: bytes | None,
                own_keys: Callable[[], list[bytes]]) -> str | None:
        """None if the gossip comes from ``validator`` over a link it bound; else why not.

        :param own_keys: the SPKI hashes of the TLS keys this node served with since it
            started (a peer's connection may predate a certificate change).
        """
        if validator is None or signature is None:
            return "consensus.gossip needs the sender's validator id and link statement"
        key = (validator, signature)
        if self._checked.get(key):
            return None
        validators = self.validators()
        keys = tuple(own_keys())
        refused = self._refused.get(key)
        if refused is not None and refused[0] is validators and refused[1] == keys:
            return refused[2]
        reasons = [link_refusal(validators, self.chain_id, validator, own, signature)
                   for own in keys]
        if None in reasons:
            if len(self._checked) >= self.CACHE:
                self._checked.clear()
            self._checked[key] = True
            self._refused.pop(key, None)
            return None
        reason = next((r for r in reasons if r is not None), "this node has no TLS key yet")
        if len(self._refused) >= self.CACHE:
            self._refused.clear()
        self._refused[key] = (validators, keys, reason)
        return reason
