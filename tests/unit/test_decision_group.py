"""Decision groups (spec/stoq.md §18.3): a whole seal batch crosses a link as its bodies
and one signature, and the receiver rebuilds exactly the sealed decisions the entry
made; a group that is malformed or not signed counts against its sender and gives
nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import cbor2
import pycddl
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from handlers.consensus import (
    ConsensusChain,
    Group,
    OpenRules,
    Sealer,
    SealError,
    SealOpener,
    seal,
    seal_batch,
)
from handlers.consensus._sealed import parse_group, whole_batches
from handlers.consensus.bft import Validator, ValidatorSet
from handlers.consensus.bft._core import Timeouts
from protocol import decode_item, encode_deterministic
from store import ChainStore

from ..helpers import CDDL
from .test_chain import InProcessLinks, _cluster, _nothing_lost


def _key(seed: int) -> tuple[Ed25519PrivateKey, Validator]:
    key = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
    return key, Validator(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


KEY, ME = _key(31)
OTHER_KEY, OTHER = _key(32)
VALIDATORS = ValidatorSet((ME, OTHER))
FRAME = 1 << 20


def _bodies(n: int, start: int = 0) -> list[bytes]:
    return [encode_deterministic({"kind": "stake", "key_id": f"key-{i}", "amount": i,
                                  "reason": "faucet", "at_ms": 1_700_000_000_000 + i})
            for i in range(start, start + n)]


def _group_of(n: int) -> tuple[list[bytes], Group]:
    sealed = seal_batch(_bodies(n), ME.id, KEY.sign)
    groups, rest = whole_batches(sealed, ME.id, FRAME)
    assert rest == [] and len(groups) == 1
    return sealed, groups[0]


def _schema(rule: str) -> pycddl.Schema:
    return pycddl.Schema(f"root = {rule}\n{CDDL}")


@pytest.mark.parametrize("n", [2, 3, 255, 256])
def test_a_group_rebuilds_the_sealed_decisions_byte_for_byte(n: int) -> None:
    sealed, group = _group_of(n)
    message = group.message()
    _schema("decision-group").validate_cbor(message)
    assert encode_deterministic(decode_item(message)) == message
    assert group.bodies == tuple(_bodies(n))
    opener = SealOpener()
    rebuilt = opener.open_group(parse_group(decode_item(message)), VALIDATORS)
    assert rebuilt == sealed
    for decision in rebuilt:  # its decisions open with the signature the group verified
        opener.open(decision, VALIDATORS)
    assert (opener.verifications, opener.reused) == (1, n)
    # the group carries no path: the bodies, one signature and a few keys
    assert len(message) < sum(len(b) + 3 for b in _bodies(n)) + 200
    assert len(message) < sum(len(d) for d in sealed) * (0.7 if n > 200 else 0.9)


def test_only_whole_batches_of_the_entry_make_groups() -> None:
    whole = seal_batch(_bodies(4), ME.id, KEY.sign)
    part = seal_batch(_bodies(5, 10), ME.id, KEY.sign)
    theirs = seal_batch(_bodies(3, 20), OTHER.id, OTHER_KEY.sign)
    plain = seal({"kind": "stake", "at_ms": 1}, ME.id, KEY.sign)
    mixed = [part[0], theirs[0], whole[2], plain, whole[0], theirs[1], whole[3], part[4],
             theirs[2], whole[1], b"not a sealed decision"]
    groups, rest = whole_batches(mixed, ME.id, FRAME)
    assert [g.bodies for g in groups] == [tuple(_bodies(4))]
    assert sorted(rest) == sorted([part[0], part[4], *theirs, plain,
                                   b"not a sealed decision"])
    # a group that would not fit a gossip request goes as decisions
    size = len(_group_of(4)[1].message())
    groups, rest = whole_batches(whole, ME.id, size - 1)
    assert groups == [] and sorted(rest) == sorted(whole)


def _item(n: int = 8) -> dict[str, Any]:
    item = decode_item(_group_of(n)[1].message())
    assert isinstance(item, dict)
    return item


def _forged(item: dict[str, Any]) -> None:
    item["signature"] = bytes([item["signature"][0] ^ 1]) + item["signature"][1:]


def _missing(item: dict[str, Any]) -> None:
    del item["bodies"][3]


def _missing_and_size(item: dict[str, Any]) -> None:
    del item["bodies"][3]
    item["size"] -= 1


def _duplicated(item: dict[str, Any]) -> None:
    item["bodies"][3] = item["bodies"][4]


def _reordered(item: dict[str, Any]) -> None:
    item["bodies"][3], item["bodies"][4] = item["bodies"][4], item["bodies"][3]


def _too_large(item: dict[str, Any]) -> None:
    item["size"] = 5000
    item["bodies"] += [os.urandom(8) for _ in range(5000 - 8)]


def _extra_key(item: dict[str, Any]) -> None:
    item["index"] = 0


def _other_entry(item: dict[str, Any]) -> None:
    item["entry"] = OTHER.id


def _not_a_validator(item: dict[str, Any]) -> None:
    item["entry"] = "ab" * 20


def _short_signature(item: dict[str, Any]) -> None:
    item["signature"] = item["signature"][:32]


def _text_body(item: dict[str, Any]) -> None:
    item["bodies"][0] = "text"


BAD: dict[str, tuple[Any, str]] = {
    "forged signature": (_forged, "signature of the batch root does not verify"),
    "a body missing": (_missing, "group of size 8 carries 7 bodies"),
    "a body missing, size too": (_missing_and_size,
                                 "signature of the batch root does not verify"),
    "a body twice": (_duplicated, "carries a body twice"),
    "bodies reordered": (_reordered, "signature of the batch root does not verify"),
    "size too large": (_too_large, "size is not 2 to 4096"),
    "an extra key": (_extra_key, r"exactly \{kind, entry, signature, size, bodies\}"),
    "another entry": (_other_entry, "signature of the batch root does not verify"),
    "not a validator": (_not_a_validator, "is not an active validator"),
    "short signature": (_short_signature, "signature is not 64 octets"),
    "a body not bytes": (_text_body, "bodies are not byte strings"),
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_a_bad_group_is_refused_with_its_reason(what: str) -> None:
    change, reason = BAD[what]
    opener = SealOpener()
    opener.open_group(parse_group(_item()), VALIDATORS)  # the good one: cached, must not help
    item = _item()
    change(item)
    with pytest.raises(SealError, match=reason):
        opener.open_group(parse_group(item), VALIDATORS)


def test_the_cddl_refuses_a_group_with_an_extra_key() -> None:
    item = _item()
    item["index"] = 0
    with pytest.raises(Exception):  # noqa: B017 (pycddl raises its own error type)
        _schema("decision-group").validate_cbor(cbor2.dumps(item))


def _chain(tmp_path: Path) -> ConsensusChain:
    return ConsensusChain(chain_id="unit", validators=VALIDATORS,
                          store=ChainStore(tmp_path / "chain.sqlite3"),
                          transport=InProcessLinks(OTHER.id, {}, _nothing_lost),
                          rules=OpenRules(), me=OTHER.id, sign=OTHER_KEY.sign,
                          timeouts=Timeouts(), block_interval=60.0)


@pytest.mark.parametrize("what", sorted(BAD))
async def test_a_receiver_takes_nothing_from_a_bad_group(tmp_path: Path, what: str) -> None:
    change, reason = BAD[what]
    chain = _chain(tmp_path)
    try:
        item = _item()
        change(item)
        assert await chain.receive([cbor2.dumps(item)], sender=ME.id) == 0
        assert len(chain.mempool) == 0
        assert chain.decision_groups == {"sent": 0, "received": 0, "refused": 1}
        [entry] = chain.misbehaviour
        assert entry["validator"] == ME.id
        assert entry["reason"].startswith("sent a decision group that does not open: ")
        assert re.search(reason, entry["reason"])
        # and a good group after it is taken whole
        sealed, group = _group_of(8)
        assert await chain.receive([group.message()], sender=ME.id) == 8
        assert list(chain.mempool) == [hashlib.sha256(d).digest() for d in sealed]
        assert chain.status()["decision_groups"]["received"] == 1
    finally:
        chain.store.close()


async def test_a_batch_sealed_in_one_turn_crosses_the_link_as_one_group(
        tmp_path: Path) -> None:
    """The sealer batches one loop turn's decisions; the chain gossips them when the
    turn ends, as one group; the peer rebuilds them and both commit the same bytes."""
    chains = await _cluster(tmp_path, [KEY, OTHER_KEY])
    sealer = Sealer(entry=ME.id, sign=KEY.sign)
    bodies = [decode_item(b) for b in _bodies(40)]

    async def issue(body: dict[str, Any]) -> bytes:
        decision = await sealer.seal(body)
        await chains[0].submit(decision, timeout=20)
        return decision

    try:
        decisions = await asyncio.gather(*(issue(body) for body in bodies))
        lone = await issue({"kind": "stake", "at_ms": 5})  # a batch of one: plain
        height = chains[0].core.height - 1
        for _ in range(100):  # the peer decides the same blocks
            if chains[1].last_block is not None and chains[1].last_block.height >= height:
                break
            await asyncio.sleep(0.05)
    finally:
        for chain in chains:
            await chain.stop()
    assert sealer.batches == 2
    links = chains[0].transport
    assert isinstance(links, InProcessLinks)
    sent = [kind for _, kind in links.delivered if kind in ("decision-group", "decisions")]
    assert sent == ["decision-group", "decisions"]
    assert chains[0].decision_groups["sent"] == 1
    assert chains[1].decision_groups == {"sent": 0, "received": 1, "refused": 0}
    for decision in [*decisions, lone]:
        assert chains[1].store.decision(hashlib.sha256(decision).digest()) is not None
    assert chains[1].proposals["wanted"] == 0  # rebuilt from the group's decisions


def test_a_rebuilt_decision_still_needs_an_active_entry() -> None:
    """The opener remembers what it rebuilt from a verified group, and opens it without
    walking its path again, but not once its entry is no longer active."""
    _, group = _group_of(4)
    opener = SealOpener()
    rebuilt = opener.open_group(group, VALIDATORS)
    assert opener.open(rebuilt[0], VALIDATORS).body == decode_item(_bodies(4)[0])
    isolated = ValidatorSet((dataclasses.replace(ME, power=0), OTHER))
    with pytest.raises(SealError, match="is not an active validator"):
        opener.open(rebuilt[1], isolated)
    # the bytes alone, not their object, are what was rebuilt
    assert opener.open(bytes(bytearray(rebuilt[2])), VALIDATORS).entry == ME.id
    assert (opener.verifications, opener.reused) == (1, 2)
