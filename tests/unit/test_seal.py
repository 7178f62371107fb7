"""Sealed decisions: the plain form, batch seals (one signature over a Merkle root),
the opener's cache of verified batch signatures, and the sealer that batches a loop
turn's decisions (spec/stoq.md §18.5)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pycddl
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from handlers.consensus import (
    Sealer,
    SealError,
    SealOpener,
    open_sealed,
    seal,
    seal_batch,
    unseal,
)
from handlers.consensus._sealed import BATCH_LABEL, Batch, _fields, batch_message, encode_sealed
from handlers.consensus.bft import Block, Validator, ValidatorSet
from protocol import MalformedFrame, decode_item, encode_deterministic
from protocol.ct_merkle import leaf_hash, root_from_hashes
from protocol.decisions import StakeCredit

from ..helpers import CDDL
from ..state_fixtures_ct import PARAMS, LoneValidator, cluster_ca, now


def _key(seed: bytes) -> tuple[Ed25519PrivateKey, Validator]:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    return key, Validator(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


KEY, ME = _key(bytes([1]) * 32)
OTHER_KEY, OTHER = _key(bytes([2]) * 32)
VALIDATORS = ValidatorSet((ME, OTHER))

OLD_FORM = bytes.fromhex(
    "a364626f6479583aa5646b696e64657374616b656561745f6d731b0000018bcfe5680066616d6f75"
    "6e7401666b65795f6964616b66726561736f6e6666617563657465656e7472797828353634373561"
    "61373534363334373463303238356466356462663262636162373364613635313335697369676e61"
    "7475726558409c93ab44d6b91e7a75c3a33ef2b9c4fc5ebcc8024589c3669177844b09de3f61bd95"
    "a106095c63a7bf67a114b55b0092a65298262b9a30feb5b43eec1f79f70b")
"""A ``stake`` decision sealed by the code before batch seals (key seed 0..31)."""


def _body(i: int) -> dict[str, Any]:
    return {"kind": "stake", "key_id": f"key-{i}", "amount": i, "reason": "faucet",
            "at_ms": 1_700_000_000_000 + i}


def _batch(n: int, key: Ed25519PrivateKey = KEY, entry: str = ME.id) -> list[bytes]:
    return seal_batch([encode_deterministic(_body(i)) for i in range(n)], entry, key.sign)


def _edit(decision: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    item = decode_item(decision)
    change(item)
    return encode_deterministic(item)


def _cddl_check(decision: bytes) -> None:
    pycddl.Schema(f"root = sealed-decision\n{CDDL}").validate_cbor(decision)


@pytest.mark.parametrize("n", [2, 3, 5, 64, 200])
def test_a_batch_opens_with_one_verification(n: int) -> None:
    batch = _batch(n)
    opener = SealOpener()
    for i, decision in enumerate(batch):
        sealed = opener.open(decision, VALIDATORS)
        assert sealed.body == _body(i) and sealed.entry == ME.id
        assert encode_deterministic(decode_item(decision)) == decision
        _cddl_check(decision)
    assert (opener.verifications, opener.reused) == (1, n - 1)
    # what is signed: the label, the size and the RFC 9162 root of the bodies
    item = decode_item(batch[0])
    root = root_from_hashes([leaf_hash(encode_deterministic(_body(i))) for i in range(n)])
    KEY.public_key().verify(item["signature"], BATCH_LABEL + n.to_bytes(8, "big") + root)
    assert batch_message(n, root) == BATCH_LABEL + n.to_bytes(8, "big") + root


def test_a_batch_of_one_is_the_plain_form() -> None:
    [decision] = _batch(1)
    assert decision == seal(_body(0), ME.id, KEY.sign)
    assert encode_deterministic(decode_item(decision)) == decision
    assert set(decode_item(decision)) == {"body", "entry", "signature"}
    _cddl_check(decision)
    opener = SealOpener()
    assert opener.open(decision, VALIDATORS).body == _body(0)
    assert (opener.verifications, opener.reused) == (1, 0)


def test_old_plain_seals_still_open() -> None:
    sealed = open_sealed(OLD_FORM, ValidatorSet((_key(bytes(range(32)))[1],)))
    assert sealed.body["kind"] == "stake" and sealed.body["at_ms"] == 1_700_000_000_000
    assert unseal(OLD_FORM) == sealed
    _cddl_check(OLD_FORM)


def test_a_decision_of_a_batch_opens_alone() -> None:
    batch = _batch(200)
    assert open_sealed(batch[137], VALIDATORS).body == _body(137)
    opener = SealOpener()
    assert opener.open(batch[199], VALIDATORS).body == _body(199)
    assert unseal(batch[5]).body == _body(5)


def _path(i: int) -> Callable[[dict[str, Any]], None]:
    def change(item: dict[str, Any]) -> None:
        item["batch"]["path"][i] = bytes(32)
    return change


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(item: dict[str, Any]) -> None:
        item["batch"][key] = value
    return change


def _other_body(item: dict[str, Any]) -> None:
    item["body"] = encode_deterministic(_body(999))


def _flip_signature(item: dict[str, Any]) -> None:
    item["signature"] = bytes([item["signature"][0] ^ 1]) + item["signature"][1:]


def _short_path(item: dict[str, Any]) -> None:
    item["batch"]["path"] = item["batch"]["path"][:-1]


TAMPERED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "body": (_other_body, "signature of the batch root does not verify"),
    "path element": (_path(2), "signature of the batch root does not verify"),
    "path too short": (_short_path, "path does not hold"),
    "index": (_set("index", 11), "signature of the batch root does not verify"),
    "index beyond the size": (_set("index", 64), "path does not hold"),
    "size": (_set("size", 63), "signature of the batch root does not verify"),
    "size too large": (_set("size", 5000), "size 5000 is not 2 to 4096"),
    "size one": (_set("size", 1), "size 1 is not 2 to 4096"),
    "signature": (_flip_signature, "signature of the batch root does not verify"),
    "index not a number": (_set("index", "10"), "not {index, size, path}"),
    "index negative": (_set("index", -1), "not {index, size, path}"),
    "size negative": (_set("size", -64), "not {index, size, path}"),
}


@pytest.mark.parametrize("what", sorted(TAMPERED))
def test_a_tampered_batch_decision_is_refused(what: str) -> None:
    change, message = TAMPERED[what]
    batch = _batch(64)
    opener = SealOpener()
    opener.open(batch[10], VALIDATORS)  # the root is known: the cache must not help
    tampered = _edit(batch[10], change)
    with pytest.raises(SealError, match=message):
        opener.open(tampered, VALIDATORS)
    with pytest.raises(SealError, match=message):
        open_sealed(tampered, VALIDATORS)


def test_a_path_to_another_root_is_refused() -> None:
    """A body with the path of another batch: the root it leads to was never signed
    with this signature."""
    first, second = _batch(8), seal_batch(
        [encode_deterministic(_body(i)) for i in range(100, 108)], ME.id, KEY.sign)
    opener = SealOpener()
    opener.open(first[3], VALIDATORS)
    opener.open(second[3], VALIDATORS)

    def graft(item: dict[str, Any]) -> None:
        item["batch"]["path"] = decode_item(second[3])["batch"]["path"]
    with pytest.raises(SealError, match="batch root does not verify"):
        opener.open(_edit(first[3], graft), VALIDATORS)


def test_another_validators_root_is_refused() -> None:
    """A decision of OTHER's batch, claimed by ME (or ME's body in OTHER's batch)."""
    theirs = _batch(16, OTHER_KEY, OTHER.id)
    opener = SealOpener()
    assert opener.open(theirs[0], VALIDATORS).entry == OTHER.id

    def claim(item: dict[str, Any]) -> None:
        item["entry"] = ME.id
    with pytest.raises(SealError, match="batch root does not verify"):
        opener.open(_edit(theirs[1], claim), VALIDATORS)
    mine = _batch(16)

    def their_signature(item: dict[str, Any]) -> None:
        item["signature"] = decode_item(theirs[1])["signature"]
    with pytest.raises(SealError, match="batch root does not verify"):
        opener.open(_edit(mine[1], their_signature), VALIDATORS)


def test_the_cache_never_accepts_what_does_not_verify() -> None:
    batch = _batch(4)
    opener = SealOpener()
    forged = _edit(batch[1], _flip_signature)
    for _ in range(2):  # a failure is not remembered
        with pytest.raises(SealError):
            opener.open(forged, VALIDATORS)
    assert opener.open(batch[1], VALIDATORS).body == _body(1)
    with pytest.raises(SealError):  # the root is known, this signature is not
        opener.open(forged, VALIDATORS)
    assert opener.verifications == 4
    # a validator that lost its power: its cached roots count for nothing
    isolated = ValidatorSet((Validator(ME.public_key, power=0), OTHER))
    with pytest.raises(SealError, match="not an active validator"):
        opener.open(batch[2], isolated)


def test_eviction_costs_a_verification_only() -> None:
    batches = [seal_batch([encode_deterministic(_body(i)) for i in range(b * 10, b * 10 + 3)],
                          ME.id, KEY.sign) for b in range(3)]
    opener = SealOpener(capacity=2)
    for batch in batches:
        opener.open(batch[0], VALIDATORS)
    assert opener.verifications == 3
    opener.open(batches[2][1], VALIDATORS)  # still held
    assert (opener.verifications, opener.reused) == (3, 1)
    opener.open(batches[0][1], VALIDATORS)  # evicted: verified again, and accepted
    assert opener.verifications == 4


def test_a_batch_message_is_never_a_plain_body() -> None:
    """The batch's signature, presented as a plain seal of the signed message."""
    batch = _batch(4)
    item = decode_item(batch[0])
    root = root_from_hashes([leaf_hash(encode_deterministic(_body(i))) for i in range(4)])
    forged = encode_deterministic({"body": batch_message(4, root), "entry": ME.id,
                                   "signature": item["signature"]})
    assert ME.verify(item["signature"], batch_message(4, root))
    with pytest.raises(SealError, match="not a sealed decision"):
        open_sealed(forged, VALIDATORS)
    with pytest.raises(SealError, match="not a sealed decision"):
        unseal(forged)


def test_only_the_deterministic_encoding_with_its_own_keys_opens() -> None:
    """One decision has one encoding: nobody can give it another digest."""
    batch = _batch(4)
    item = decode_item(batch[2])
    reordered = cbor2.dumps({"signature": item["signature"], "batch": item["batch"],
                             "entry": item["entry"], "body": item["body"]})
    with pytest.raises(SealError, match="deterministic CBOR"):
        open_sealed(reordered, VALIDATORS)
    extra = encode_deterministic({**item, "note": "x"})
    with pytest.raises(SealError, match="exactly body, entry, signature"):
        open_sealed(extra, VALIDATORS)
    plain = decode_item(seal(_body(1), ME.id, KEY.sign))
    with pytest.raises(SealError, match="exactly body, entry, signature"):
        open_sealed(encode_deterministic({**plain, "note": "x"}), VALIDATORS)
    with pytest.raises(SealError, match="not a sealed decision"):
        open_sealed(b"\xa0", VALIDATORS)
    with pytest.raises(SealError, match="not a sealed decision"):
        open_sealed(b"not cbor at all", VALIDATORS)


def _generic_fields(decision: bytes) -> tuple[bytes, str, bytes, Batch | None] | None:
    """What a sealed decision holds, read the generic way: decoded as a map, the
    types checked, and encoded again to compare (the opener's reading before it
    read decisions in place)."""
    try:
        item = decode_item(decision)
    except MalformedFrame:
        return None
    if not isinstance(item, dict):
        return None
    raw, entry, signature = item.get("body"), item.get("entry"), item.get("signature")
    if not (isinstance(raw, bytes) and isinstance(entry, str) and isinstance(signature, bytes)
            and len(signature) == 64):
        return None
    batch = None
    if "batch" in item:
        found = item["batch"]
        if not (isinstance(found, dict) and found.keys() == {"index", "size", "path"}):
            return None
        index, size, path = found["index"], found["size"], found["path"]
        if not (type(index) is int and type(size) is int and index >= 0 and size >= 0
                and isinstance(path, list) and all(type(node) is bytes for node in path)):
            return None
        batch = (index, size, path)
    if encode_sealed(raw, entry, signature, batch) != decision:
        return None
    return raw, entry, signature, batch


def _variants(decision: bytes) -> list[bytes]:
    """Other encodings of a decision's map, and maps a little different from it."""
    item = decode_item(decision)
    batch = item.get("batch")
    variants = [
        cbor2.dumps(item),  # insertion order: not the deterministic order
        cbor2.dumps(dict(reversed(item.items()))),
        encode_deterministic({**item, "note": 1}),
        encode_deterministic({k: v for k, v in item.items() if k != "entry"}),
        encode_deterministic({**item, "signature": item["signature"][:63]}),
        encode_deterministic({**item, "signature": item["signature"] + b"x"}),
        encode_deterministic({**item, "entry": item["entry"].encode()}),
        encode_deterministic({**item, "body": item["body"].decode("latin-1")}),
        encode_deterministic({**item, "entry": "\u00e9" + item["entry"]}),
        decision.replace(item["entry"].encode(), b"\xff" + item["entry"].encode()[1:]),
        *(bytes([head]) + decision[1:] for head in (0xA2, 0xA3, 0xA4, 0xA5, 0xBF)),
        decision[:-66] + b"\x59\x00\x40" + decision[-64:],  # a signature head not shortest
        decision[:6] + b"\x5a" + len(item["body"]).to_bytes(4, "big")
        + decision[6 + len(encode_deterministic(item["body"])) - len(item["body"]):],
    ]
    if batch is not None:
        variants += [
            encode_deterministic({**item, "batch": {**batch, "index": -1}}),
            encode_deterministic({**item, "batch": {**batch, "size": 1.0}}),
            encode_deterministic({**item, "batch": {**batch, "extra": 0}}),
            encode_deterministic({**item, "batch": {**batch, "path": batch["path"] + [b"x"]}}),
            encode_deterministic({**item, "batch": {**batch, "path": [b"x" * 24]}}),
            encode_deterministic({**item, "batch": {**batch, "path": [bytes(31), bytes(32)]}}),
            encode_deterministic({**item, "batch": {**batch, "path": [bytes(33), bytes(32)]}}),
            encode_deterministic({**item, "batch": {**batch, "path": ["x" * 32]}}),
            encode_deterministic({**item, "batch": {**batch, "path": []}}),
            encode_deterministic({**item, "batch": [batch["index"], batch["size"]]}),
            encode_deterministic({k: v for k, v in item.items() if k != "batch"}),
        ]
    else:
        variants.append(encode_deterministic(
            {**item, "batch": {"index": 0, "size": 2, "path": [bytes(32)]}}))
    return variants


def _mutations(rng: random.Random, decision: bytes, count: int) -> list[bytes]:
    """``decision`` with octets changed, inserted or removed, or cut short: mostly in
    its keys and heads (outside the body and the signature, where any octet does)."""
    item = decode_item(decision)
    body_at = decision.index(item["body"])
    body_end = body_at + len(item["body"])
    mutated = []
    for _ in range(count):
        out = bytearray(decision)
        for _ in range(rng.randrange(1, 3)):
            if rng.random() < 0.8:
                at = rng.choice([rng.randrange(body_at),
                                 rng.randrange(body_end, len(decision) - 64)])
            else:
                at = rng.randrange(len(decision))
            if at >= len(out):
                break
            action = rng.randrange(5)
            if action == 0:
                out[at] = rng.randrange(256)
            elif action == 1:
                out[at] ^= 1 << rng.randrange(8)
            elif action == 2:
                out.insert(at, rng.randrange(256))
            elif action == 3:
                del out[at]
            else:
                del out[at:]
        mutated.append(bytes(out))
    return mutated


def test_a_decision_read_in_place_holds_what_the_generic_reading_finds() -> None:
    """Differential: the opener reads a decision in place (no decoding of the map, no
    encoding again to compare); on sealed decisions of both forms (batch sizes and
    indexes whose heads take 0, 1 and 2 octets), other encodings and near misses of
    them, and mutations, that reading accepts exactly what the generic reading
    accepts, with the same fields."""
    rng = random.Random(1875)
    decisions = [seal(_body(1), ME.id, KEY.sign), OLD_FORM]
    decisions += [_batch(5)[i] for i in (0, 4)]
    large = seal_batch([encode_deterministic({**_body(i), "pad": bytes(i % 300)})
                        for i in range(300)], OTHER.id, OTHER_KEY.sign)
    decisions += [large[i] for i in (0, 23, 24, 255, 299)]
    accepted = refused = 0
    for decision in decisions:
        assert _fields(decision) == _generic_fields(decision) is not None
        for candidate in _variants(decision) + _mutations(rng, decision, 250):
            expected = _generic_fields(candidate)
            assert _fields(candidate) == expected, candidate.hex()
            accepted += expected is not None
            refused += expected is None
    assert accepted > 200 and refused > 1500
    assert open_sealed(large[299], VALIDATORS).body["pad"] == bytes(299)


# --- the sealer ------------------------------------------------------------------------


async def test_the_sealer_batches_one_loop_turn() -> None:
    signed: list[bytes] = []

    def sign(message: bytes) -> bytes:
        signed.append(message)
        return KEY.sign(message)
    sealer = Sealer(entry=ME.id, sign=sign)
    decisions = await asyncio.gather(*(sealer.seal(_body(i)) for i in range(100)))
    assert len(signed) == 1 and signed[0].startswith(BATCH_LABEL)
    assert (sealer.batches, sealer.sealed) == (1, 100)
    opener = SealOpener()
    assert [opener.open(d, VALIDATORS).body for d in decisions] == [_body(i)
                                                                    for i in range(100)]
    # alone in its turn: the plain form, sealed without waiting for company
    lone = await sealer.seal(_body(500))
    assert "batch" not in decode_item(lone) and opener.open(lone, VALIDATORS).body == _body(500)
    assert len(signed) == 2


async def test_the_sealer_caps_a_batch_and_seals_a_repeated_body_once() -> None:
    sealer = Sealer(entry=ME.id, sign=KEY.sign, limit=8)
    bodies = [_body(i) for i in range(20)] + [_body(19)]
    decisions = await asyncio.gather(*(sealer.seal(b) for b in bodies))
    assert sealer.batches == 3  # 8 + 8 + the last 4 distinct bodies
    assert decisions[19] == decisions[20]
    sizes = {decode_item(d)["batch"]["size"] for d in decisions}
    assert sizes == {8, 4}
    opener = SealOpener()
    for body, decision in zip(bodies, decisions, strict=True):
        assert opener.open(decision, VALIDATORS).body == body


async def test_a_signing_failure_reaches_every_waiter() -> None:
    available = False

    def sign(message: bytes) -> bytes:
        if not available:
            raise OSError("the key store is gone")
        return KEY.sign(message)
    sealer = Sealer(entry=ME.id, sign=sign)
    results = await asyncio.gather(*(sealer.seal(_body(i)) for i in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    available = True  # and the sealer seals again once the key is back
    assert open_sealed(await sealer.seal(_body(1)), VALIDATORS).body == _body(1)


# --- a validator's chain: batch seals committed, forged ones counted against the sender ---


async def test_a_lone_validator_commits_a_batch_and_counts_a_forged_seal_against_its_sender(
        tmp_path: Path) -> None:
    v = await LoneValidator.start(tmp_path, cluster_ca())
    try:
        at_ms = int(now() * 1000)
        credits = [StakeCredit(key_id=hashlib.sha256(bytes([i])).hexdigest(),
                               amount=PARAMS.minimum_stake,
                               reason="faucet", at_ms=at_ms) for i in range(3)]
        outcomes = await asyncio.gather(*(v.decisions.commit(c) for c in credits))
        assert all(o.accepted for o in outcomes), outcomes
        assert (v.decisions.sealer.batches, v.decisions.sealer.sealed) == (1, 3)
        assert len({o.block_height for o in outcomes}) == 1
        stored = v.chain.store.block(outcomes[0].block_height)
        assert stored is not None
        committed = Block.from_wire(decode_item(stored.block)).decisions
        assert [decode_item(d)["batch"]["size"] for d in committed] == [3, 3, 3]

        # a peer gossips a decision of this batch with another body: refused, and
        # counted against that peer, not against the validator whose root it borrowed
        forged = _edit(committed[0], _other_body)
        gossip = encode_deterministic({"kind": "decisions", "items": [forged]})
        peer = "0f" * 20
        assert await v.chain.receive([gossip], sender=peer) == 0
        assert v.machine.refusals == {peer: 1}
        assert await v.chain.receive([gossip], sender=peer) == 0  # a verdict is kept
        assert v.machine.refusals == {peer: 1}
    finally:
        await v.stop()
