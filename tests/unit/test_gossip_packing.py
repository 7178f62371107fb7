"""``consensus.gossip`` requests travel packed (spec §18.3): what inflates and what is refused."""

from __future__ import annotations

import os
import zlib

import cbor2
import pycddl
import pytest

from protocol import InvalidRequest, encode_item
from protocol.ops.consensus import (
    MAX_GOSSIP_MESSAGES,
    PACK_AT_BYTES,
    GossipArgs,
    pack_messages,
    unpack_messages,
)
from tests.helpers import CDDL

LIMIT = 1 << 20


def _schema(rule: str) -> pycddl.Schema:
    return pycddl.Schema(f"root = {rule}\n{CDDL}")


def _messages() -> list[bytes]:
    """Messages that look like a decision batch: a shared template, a little random."""
    template = bytes(range(256)) * 3
    return [cbor2.dumps({"kind": "decisions", "items": [template + os.urandom(32)]})
            for _ in range(20)]


def test_packed_messages_inflate_to_the_same_messages_and_shrink() -> None:
    messages = _messages()
    packed = pack_messages(messages)
    assert unpack_messages(packed, LIMIT) == messages
    assert len(packed) < sum(len(m) for m in messages) // 2
    assert sum(len(m) for m in messages) >= PACK_AT_BYTES


def test_both_forms_of_the_request_match_the_cddl() -> None:
    link = {"sender": "ab" * 20, "link": bytes(64)}
    schema = _schema("consensus.gossip.args")
    schema.validate_cbor(cbor2.dumps({"packed": pack_messages(_messages()), **link}))
    schema.validate_cbor(cbor2.dumps({"messages": _messages(), **link}))
    _schema("gossip-messages").validate_cbor(zlib.decompress(pack_messages(_messages())))
    with pytest.raises(Exception):  # noqa: B017 (pycddl raises its own error type)
        schema.validate_cbor(cbor2.dumps({"messages": [], "packed": b"", **link}))


def test_the_args_take_packed_without_messages() -> None:
    args = GossipArgs(packed=b"x", sender="ab" * 20)
    assert args.messages == [] and args.packed == b"x"


@pytest.mark.parametrize(("packed", "message"), [
    (b"not zlib at all", "not a zlib stream"),
    (zlib.compress(encode_item([b"a"]))[:-3], "not exactly one complete zlib stream"),
    (zlib.compress(encode_item([b"a"])) + b"more", "not exactly one complete zlib stream"),
    (zlib.compress(b"\xff\x00"), "does not hold CBOR"),
    (zlib.compress(encode_item({"kind": "decisions"})), "array of at most 512 byte strings"),
    (zlib.compress(encode_item([b"a", 7])), "array of at most 512 byte strings"),
    (zlib.compress(encode_item([b""] * (MAX_GOSSIP_MESSAGES + 1))),
     "array of at most 512 byte strings"),
])
def test_a_bad_packed_request_is_refused_with_the_reason(packed: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        unpack_messages(packed, LIMIT)
    assert caught.value.details.get("field") == "packed"


def test_a_zlib_bomb_is_refused_without_inflating_it() -> None:
    """64 MiB of zeros packs into about 64 KiB; at most LIMIT bytes are ever inflated."""
    bomb = zlib.compress(encode_item([bytes(64 << 20)]), 9)
    assert len(bomb) < 100_000
    with pytest.raises(InvalidRequest, match=f"inflates to more than {LIMIT} bytes"):
        unpack_messages(bomb, LIMIT)
