"""The validator directory's CT log lookup: every announced log key by its RFC 6962 log
ID, and a key that is announced again elsewhere, or replaced, found where it is now."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from handlers.replica._directory import ValidatorDirectory, parse_announced
from protocol.decisions import ValidatorKeys


def _spki() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _keys(*logs: tuple[int, bytes]) -> ValidatorKeys:
    return ValidatorKeys(intermediates=(), ct_logs=logs, dnskeys=(), admins=(), at_ms=0)


def _id(spki: bytes) -> bytes:
    return hashlib.sha256(spki).digest()


def test_log_keys_are_found_by_log_id_and_follow_each_announcement() -> None:
    a0, a1, b0 = _spki(), _spki(), _spki()
    directory = ValidatorDirectory([parse_announced("a", _keys((0, a0), (1, a1))),
                                    parse_announced("b", _keys((0, b0)))])
    assert directory.log_key(_id(a0)) == ("a", 0, a0)
    assert directory.log_key(_id(a1)) == ("a", 1, a1)
    assert directory.log_key(_id(b0)) == ("b", 0, b0)
    assert directory.log_key(_id(_spki())) is None
    assert directory.log_key(a0) is None  # the SPKI itself is not its log ID
    # a replaces its keys: the old ones are gone, the new found
    fresh = _spki()
    directory.update(parse_announced("a", _keys((0, fresh))))
    assert directory.log_key(_id(a0)) is None and directory.log_key(_id(a1)) is None
    assert directory.log_key(_id(fresh)) == ("a", 0, fresh)
    assert directory.log_key(_id(b0)) == ("b", 0, b0)
    # a key two validators announce belongs to the first that did
    directory.update(parse_announced("c", _keys((2, b0))))
    assert directory.log_key(_id(b0)) == ("b", 0, b0)
    directory.update(parse_announced("b", _keys()))
    assert directory.log_key(_id(b0)) == ("c", 2, b0)
