"""Validator link statements (spec §18.2): who may speak for a validator's endpoint."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from handlers.consensus import LinkVerifier, link_refusal, link_statement, spki_sha256
from handlers.consensus.bft import Validator, ValidatorSet
from store import TlsCredential, create_self_signed
from trustchain._peers import ServedTlsKeys

CHAIN = "links-test"


def _validator() -> tuple[Ed25519PrivateKey, Validator]:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return key, Validator(raw)


def test_a_statement_binds_one_validator_to_one_tls_key() -> None:
    (key, me), (other_key, other) = _validator(), _validator()
    validators = ValidatorSet((me, other))
    tls = os.urandom(32)
    good = key.sign(link_statement(CHAIN, me.id, tls))
    assert link_refusal(validators, CHAIN, me.id, tls, good) is None
    # another TLS key, another chain, another validator's name: refused
    assert "does not verify" in str(link_refusal(validators, CHAIN, me.id, os.urandom(32),
                                                 good))
    assert "does not verify" in str(link_refusal(validators, "other-chain", me.id, tls, good))
    assert "does not verify" in str(link_refusal(validators, CHAIN, other.id, tls, good))
    # a key outside the set (an impostor's own), and a validator isolated or retired
    stranger_key, stranger = _validator()
    signed = stranger_key.sign(link_statement(CHAIN, stranger.id, tls))
    assert "not a validator" in str(link_refusal(validators, CHAIN, stranger.id, tls, signed))
    isolated = validators.isolate([me.id])
    assert "isolated or retired" in str(link_refusal(isolated, CHAIN, me.id, tls, good))
    # one validator cannot speak for another
    forged = other_key.sign(link_statement(CHAIN, me.id, tls))
    assert "does not verify" in str(link_refusal(validators, CHAIN, me.id, tls, forged))


def test_the_verifier_accepts_statements_over_any_recent_tls_key() -> None:
    (key, me), (_, other) = _validator(), _validator()
    current = ValidatorSet((me, other))
    verifier = LinkVerifier(chain_id=CHAIN, validators=lambda: current)
    old_tls, new_tls = os.urandom(32), os.urandom(32)
    statement = key.sign(link_statement(CHAIN, me.id, old_tls))
    # a peer connected before this node changed its certificate still gets through
    assert verifier.refusal(me.id, statement, lambda: [new_tls, old_tls]) is None
    assert verifier.refusal(me.id, statement, lambda: [new_tls]) is None  # cached
    fresh = LinkVerifier(chain_id=CHAIN, validators=lambda: current)
    assert "does not verify" in str(fresh.refusal(me.id, statement, lambda: [new_tls]))
    assert "needs the sender" in str(fresh.refusal(None, statement, lambda: [old_tls]))
    assert "needs the sender" in str(fresh.refusal(me.id, None, lambda: [old_tls]))
    assert "no TLS key" in str(fresh.refusal(me.id, statement, list))


def test_served_tls_keys_follow_the_certificate_file(tmp_path: Path) -> None:
    credential = TlsCredential(certfile=tmp_path / "server.pem", keyfile=tmp_path / "server.key")
    keys = ServedTlsKeys(credential)
    assert keys() == []  # no certificate yet
    create_self_signed(credential, names=["node.trust"], addresses=["::1"])
    first = keys()
    assert first == [_spki(credential)]
    create_self_signed(credential, names=["node.trust"], addresses=["::1"])
    stat = credential.certfile.stat()
    os.utime(credential.certfile, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = keys()
    assert second == [_spki(credential), first[0]] and second[0] != first[0]


def _spki(credential: TlsCredential) -> bytes:
    return spki_sha256(credential.read_chain()[0].public_bytes(serialization.Encoding.DER))


def test_a_refused_statement_is_refused_again_from_the_cache_until_something_changes() -> None:
    (key, me), (_, other) = _validator(), _validator()
    (newcomer_key, newcomer) = _validator()
    current = [ValidatorSet((me, other))]
    verifier = LinkVerifier(chain_id=CHAIN, validators=lambda: current[0])
    tls = os.urandom(32)
    forged = os.urandom(64)
    first = verifier.refusal(me.id, forged, lambda: [tls])
    assert "does not verify" in str(first)
    assert verifier.refusal(me.id, forged, lambda: [tls]) == first
    assert len(verifier._refused) == 1
    # a validator that joins the set later: its statement was refused, now it passes
    joined = newcomer_key.sign(link_statement(CHAIN, newcomer.id, tls))
    assert "not a validator" in str(verifier.refusal(newcomer.id, joined, lambda: [tls]))
    current[0] = ValidatorSet((me, other, newcomer))
    assert verifier.refusal(newcomer.id, joined, lambda: [tls]) is None
    # a statement over a TLS key this node only starts to serve later
    new_tls = os.urandom(32)
    later = key.sign(link_statement(CHAIN, me.id, new_tls))
    assert "does not verify" in str(verifier.refusal(me.id, later, lambda: [tls]))
    assert verifier.refusal(me.id, later, lambda: [new_tls, tls]) is None
