"""The strict decoder and the deterministic encoder (RFC 8949 §4.2.1)."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import MalformedFrame, decode_item, encode_deterministic
from protocol._cbor import MAX_DEPTH, _encode, _in_order, _scan, _Unusual
from protocol._errors import LocalProtocolError

# RFC 8949 Appendix A examples whose preferred encoding is the deterministic one.
RFC8949_EXAMPLES = [
    (0, "00"), (1, "01"), (10, "0a"), (23, "17"), (24, "1818"), (25, "1819"),
    (100, "1864"), (1000, "1903e8"), (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"), (18446744073709551615, "1bffffffffffffffff"),
    (-1, "20"), (-10, "29"), (-100, "3863"), (-1000, "3903e7"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (0.0, "f90000"), (-0.0, "f98000"), (1.0, "f93c00"), (1.1, "fb3ff199999999999a"),
    (1.5, "f93e00"), (65504.0, "f97bff"), (100000.0, "fa47c35000"),
    (3.4028234663852886e38, "fa7f7fffff"), (1.0e300, "fb7e37e43c8800759c"),
    (5.960464477539063e-8, "f90001"), (0.00006103515625, "f90400"), (-4.0, "f9c400"),
    (-4.1, "fbc010666666666666"), (math.inf, "f97c00"), (-math.inf, "f9fc00"),
    (False, "f4"), (True, "f5"), (None, "f6"),
    (b"", "40"), (bytes.fromhex("01020304"), "4401020304"),
    ("", "60"), ("a", "6161"), ("IETF", "6449455446"), ("\"\\", "62225c"),
    ("\u00fc", "62c3bc"), ("\u6c34", "63e6b0b4"), ("\U00010151", "64f0908591"),
    ([], "80"), ([1, 2, 3], "83010203"), ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"), ({1: 2, 3: 4}, "a201020304"), ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    ({"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
     "a56161614161626142616361436164614461656145"),
]


@pytest.mark.parametrize(("value", "hex_"), RFC8949_EXAMPLES)
def test_rfc8949_examples(value: object, hex_: str) -> None:
    assert encode_deterministic(value).hex() == hex_


def test_nan_is_canonical() -> None:
    assert encode_deterministic(math.nan).hex() == "f97e00"


def test_map_keys_sorted_bytewise() -> None:
    # 10 (0x0a) < 100 (0x1864) < -1 (0x20) < "z" (0x617a) < "aa" (0x626161)
    encoded = encode_deterministic({"aa": 0, "z": 0, -1: 0, 100: 0, 10: 0})
    assert encoded.hex() == "a5" + "0a00" + "186400" + "2000" + "617a00" + "62616100"


def test_insertion_order_does_not_matter() -> None:
    assert encode_deterministic({"b": 1, "a": 2}) == encode_deterministic({"a": 2, "b": 1})


@pytest.mark.parametrize("value", [{1, 2}, object(), 2**64, -(2**64) - 1])
def test_values_outside_the_model_refused(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_deterministic(value)


@pytest.mark.parametrize("hex_", [
    "c11a514b67b0",        # tag 1 (epoch time)
    "d9010282 0102",       # tag 258 (set)
    "c24a" + "ff" * 10,    # tag 2 bignum
    "f7",                  # undefined
    "f0",                  # simple value 16
    "a20101 0102",         # duplicate key
    "a18001",              # array as a map key
    "0000",                # trailing bytes
    "",                    # nothing
    "5aff",                # truncated
    "81" * 40 + "00",      # too deep
    "ff",                  # break without indefinite item
])
def test_decoder_refuses(hex_: str) -> None:
    with pytest.raises(MalformedFrame):
        decode_item(bytes.fromhex(hex_.replace(" ", "")))


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=20)
    | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.integers(-100, 100), children, max_size=5),
    max_leaves=30,
)


@given(plain)
def test_deterministic_round_trip(value: object) -> None:
    encoded = encode_deterministic(value)
    assert decode_item(encoded) == value
    assert cbor2.loads(encoded) == value
    # decoding and re-encoding is the identity on deterministic encodings
    assert encode_deterministic(decode_item(encoded)) == encoded


@given(st.binary(max_size=100))
def test_decoder_raises_only_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedFrame):
        decode_item(data)


@pytest.mark.parametrize("hex_", [
    "d81c81d81d00",          # shared reference to itself (tags 28/29)
    "c24101",                # bignum tag within range
    "d9d9f7a0",              # self-described CBOR tag 55799
    "1c",                    # reserved additional information
    "9f01",                  # unterminated indefinite array
])
def test_scanner_refuses_before_decoding(hex_: str) -> None:
    with pytest.raises(MalformedFrame):
        decode_item(bytes.fromhex(hex_))


def test_shared_reference_bomb_is_cheap_to_refuse() -> None:
    # 40 levels of tag-29 references would expand exponentially if decoded
    payload = bytes.fromhex("d81c82" + "d81d00d81d00" * 40)
    with pytest.raises(MalformedFrame, match="tags"):
        decode_item(payload)


_EDGE_INTS = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
              -1, -24, -25, -256, -257, -65536, -65537, -(2**32), -(2**32) - 1, -(2**64)]
_EDGE_LENGTHS = [0, 1, 23, 24, 255, 256, 65535, 65536]


def _random_value(rng: random.Random, depth: int) -> Any:
    pick = rng.randrange(9 if depth < 4 else 6)
    if pick == 0:
        return max(-(2**64), min(2**64 - 1, rng.choice(_EDGE_INTS) + rng.choice([1, -1])))
    if pick == 1:
        return rng.randbytes(rng.choice(_EDGE_LENGTHS[:6]))
    if pick == 2:
        length = rng.choice([0, 1, 5, 23, 24, 30, 300])
        return "".join(rng.choice("az_é漢🔑") for _ in range(length))
    if pick == 3:
        return rng.choice([True, False, None])
    if pick in (4, 5):
        return rng.choice(_EDGE_INTS)
    if pick == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 3, 24]))]
    if pick == 7:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randrange(4)))
    keys = {"".join(rng.choice("abcé") for _ in range(rng.choice([0, 1, 2, 3, 22, 23, 24, 25])))
            for _ in range(rng.randrange(12))}
    return {k: _random_value(rng, depth + 1) for k in keys}


def _text_keyed(item: Any) -> bool:
    """Whether ``item`` takes encode_deterministic's fast path."""
    try:
        _in_order(item, 0)
    except _Unusual:
        return False
    return True


def test_text_keyed_items_encode_as_the_reference_encoder_does() -> None:
    """The fast path (maps rebuilt in deterministic key order, then cbor2's plain encoder)
    gives the bytes of the RFC 8949 §4.2.1 encoder byte for byte: edge integers, string
    lengths around every head size, keys of lengths around 23/24, non-ASCII keys, nesting,
    maps given in any order."""
    rng = random.Random(8949)
    fast = 0
    for _ in range(3000):
        value = _random_value(rng, 0)
        assert encode_deterministic(value) == _encode(value)
        fast += _text_keyed(value)
    assert fast > 2500  # the comparison covers the fast path, not only the fallback
    assert encode_deterministic({"a": 1.5}) == _encode({"a": 1.5})  # floats: the fallback
    assert not _text_keyed({1: "x", "a": 2}) and not _text_keyed(2**64)
    assert not _text_keyed({"a": 1.5}) and not _text_keyed({"a": bytearray(b"x")})
    with pytest.raises(LocalProtocolError):
        encode_deterministic({"a": 2**64})
    with pytest.raises(LocalProtocolError):
        encode_deterministic({"a": bytearray(b"x")})


# --- the scanner against a plainly written reference ----------------------------------


class _Refused(Exception):
    pass


def _reference_accepts(data: bytes) -> bool:
    """The rules of ``_scan``'s docstring, written as plainly as possible: one item,
    well formed; no tags; of the simple values only false, true, null (and floats);
    map keys integers or text; no item (nor the break of an indefinite array or map)
    enclosed by more than MAX_DEPTH arrays and maps; indefinite strings made of
    definite strings of their own type."""

    def head(pos: int) -> tuple[int, int, int, int]:
        """(major type, additional information, argument, position after the head)."""
        if pos >= len(data):
            raise _Refused
        major, info = data[pos] >> 5, data[pos] & 0x1F
        if info < 24:
            return major, info, info, pos + 1
        if info <= 27:
            width = 2 ** (info - 24)
            if pos + 1 + width > len(data):
                raise _Refused
            return major, info, int.from_bytes(data[pos + 1:pos + 1 + width], "big"), \
                pos + 1 + width
        if info == 31:
            return major, info, -1, pos + 1
        raise _Refused  # 28, 29, 30: reserved

    def string_end(pos: int, length: int) -> int:
        if pos + length > len(data):
            raise _Refused
        return pos + length

    def is_break(pos: int) -> bool:
        return pos < len(data) and data[pos] == 0xFF

    def item(pos: int, depth: int, key: bool) -> int:
        if depth > MAX_DEPTH:
            raise _Refused
        major, info, arg, pos = head(pos)
        if key and major not in (0, 1, 3):
            raise _Refused
        if major in (0, 1):
            if info == 31:
                raise _Refused
            return pos
        if major in (2, 3):
            if info != 31:
                return string_end(pos, arg)
            while not is_break(pos):
                chunk_major, chunk_info, length, pos = head(pos)
                if chunk_major != major or chunk_info == 31:
                    raise _Refused
                pos = string_end(pos, length)
            return pos + 1
        if major == 4:
            if info != 31:
                for _ in range(arg):
                    pos = item(pos, depth + 1, False)
                return pos
            while not is_break(pos):
                pos = item(pos, depth + 1, False)
            if depth + 1 > MAX_DEPTH:
                raise _Refused
            return pos + 1
        if major == 5:
            if info != 31:
                for _ in range(arg):
                    pos = item(item(pos, depth + 1, True), depth + 1, False)
                return pos
            while not is_break(pos):
                pos = item(item(pos, depth + 1, True), depth + 1, False)
            if depth + 1 > MAX_DEPTH:
                raise _Refused
            return pos + 1
        if major == 6:
            raise _Refused
        if info in (20, 21, 22, 25, 26, 27):  # false, true, null; half, single, double
            return pos
        raise _Refused

    try:
        return item(0, 0, False) == len(data)
    except _Refused:
        return False


def _raw_item(rng: random.Random, depth: int) -> bytes:
    """Random CBOR, often ill-formed or outside the data model: any initial byte,
    non-shortest heads, indefinite strings, arrays and maps (with chunks of the wrong
    type, keys of any type, missing or extra items and breaks), deep nesting."""
    pick = rng.randrange(16 if depth < MAX_DEPTH + 3 else 3)
    if pick == 0:
        return bytes([rng.randrange(256)])
    if pick == 1:
        return bytes([rng.choice([0x18, 0x19, 0x1A, 0x1B, 0x38, 0x3B, 0x58, 0x59, 0x78, 0x98,
                                  0xB8, 0xD8, 0xF8, 0xF9, 0xFA, 0xFB])]) \
            + rng.randbytes(rng.randrange(10))
    if pick == 2:
        return rng.choice([b"\xf4", b"\xf5", b"\xf6", b"\x00", b"\x61a", b"\x40", b"\xf7",
                           b"\xc1\x00", b"\xff", b"\x1c", b"\xfc"])
    if pick in (3, 4):
        chunks = [b"\x41a", b"\x40", b"\x61a", b"\x60", b"\x01", b"\x5f\xff", b"\x7f\xff",
                  b"\x58\x01b", b"\x78\x01b", b"\x80"]
        return (b"\x5f" if pick == 3 else b"\x7f") \
            + b"".join(rng.choice(chunks) for _ in range(rng.randrange(3))) \
            + rng.choice([b"\xff", b"\xff", b""])
    if pick in (5, 6, 7):
        n = rng.randrange(4)
        head = rng.choice([bytes([0x80 + n]), bytes([0x98, n]), bytes([0x9A, 0, 0, 0, n])])
        return head + b"".join(_raw_item(rng, depth + 1)
                               for _ in range(max(0, n + rng.choice([0, 0, 0, 1, -1]))))
    if pick in (8, 9):
        n = rng.randrange(4)
        pairs = b"".join(_raw_key(rng) + _raw_item(rng, depth + 1) for _ in range(n))
        return bytes([0xA0 + n]) + pairs + rng.choice([b"", b"", b"", b"\x00"])
    if pick == 10:
        items = b"".join(_raw_item(rng, depth + 1) for _ in range(rng.randrange(4)))
        return b"\x9f" + items + rng.choice([b"\xff", b"\xff", b""])
    if pick == 11:
        pairs = b"".join(_raw_key(rng) + _raw_item(rng, depth + 1) for _ in range(rng.randrange(3)))
        return b"\xbf" + pairs + rng.choice([b"\xff", b"\xff", b"\x00\xff", b""])
    if pick in (12, 13):  # nested around the limit, closed properly
        nesting = rng.randrange(MAX_DEPTH - 1, MAX_DEPTH + 2) - depth
        opening, closing = rng.choice([(b"\x81", b""), (b"\x9f", b"\xff"), (b"\xa1\x00", b""),
                                       (b"\xbf\x00", b"\xff")])
        inner = rng.choice([b"\x00", b"\x80", b"\x9f\xff", b"\xa0", b"\x5f\xff"])
        return opening * nesting + inner + closing * nesting
    return encode_deterministic(_random_value(rng, 3))


def _raw_key(rng: random.Random) -> bytes:
    """A map key: mostly an integer or a text string (short, long, non-shortest or
    indefinite), sometimes one that is not allowed (bytes, float, null, array, tag)."""
    return rng.choice([b"\x00", b"\x37", b"\x18\x18", b"\x3b" + bytes(8), b"\x61k",
                       b"\x78\x18" + b"k" * 24, b"\x79\x00\x01k", b"\x7f\x61k\xff",
                       b"\x7f\xff", b"\x41k", b"\x40", b"\xf9\x00\x00", b"\xf6", b"\x80",
                       b"\xa0", b"\xc1\x00", b"\x1c", b"\xff"])


def _mutated(rng: random.Random, data: bytes) -> bytes:
    """``data`` with an octet changed, a bit flipped, an octet inserted, or cut short."""
    out = bytearray(data)
    for _ in range(rng.randrange(1, 3)):
        at = rng.randrange(len(out) + 1)
        action = rng.randrange(4)
        if action == 0 and at < len(out):
            out[at] = rng.randrange(256)
        elif action == 1 and at < len(out):
            out[at] ^= 1 << rng.randrange(8)
        elif action == 2:
            out.insert(at, rng.randrange(256))
        else:
            del out[at:]
    return bytes(out)


def test_the_scanner_accepts_exactly_what_the_reference_accepts() -> None:
    """Differential: deterministic and non-shortest encodings of random values, random
    raw items (ill-formed, tagged, simple values, any map key, deep), and mutations of
    both: the scanner and the reference agree on every one."""
    rng = random.Random(20261207)
    accepted = refused = 0
    for _ in range(4000):
        kind = rng.randrange(5)
        if kind == 0:
            data = encode_deterministic(_random_value(rng, 0))
        elif kind == 1:
            data = cbor2.dumps(_random_value(rng, 1))
        elif kind == 2:
            data = _raw_item(rng, 0)
        else:
            data = _mutated(rng, _raw_item(rng, 0) if kind == 3
                            else encode_deterministic(_random_value(rng, 1)))
        try:
            _scan(data)
            scanned = True
        except MalformedFrame:
            scanned = False
        assert scanned == _reference_accepts(data), data.hex()
        accepted += scanned
        refused += not scanned
    assert accepted > 1000 and refused > 1000  # both sides of every rule get exercised


@pytest.mark.parametrize(("hex_", "message"), [
    ("5f01ff", "indefinite-length string holds only definite strings"),
    ("5f5f4100ffff", "indefinite-length string holds only definite strings"),
    ("7f4161ff", "indefinite-length string holds only definite strings"),
    ("a1c100f6", "map keys must be integers or text strings"),
    ("a14100f6", "map keys must be integers or text strings"),
    ("a15818" + "00" * 24 + "f6", "map keys must be integers or text strings"),
    ("bf6161ff", "indefinite map with a key but no value"),
    ("a16161ff", "unexpected CBOR break"),
    ("9f" * (MAX_DEPTH + 1) + "ff" * (MAX_DEPTH + 1), f"nesting deeper than {MAX_DEPTH}"),
    ("8201c100", "tags are not allowed"),
    ("f8ff", "simple values"),
    ("1c", "reserved CBOR additional information 28"),
    ("7a00010000" + "61" * 5, "truncated CBOR item"),
    ("82010203", "1 bytes after the CBOR item"),
])
def test_the_scanner_says_why(hex_: str, message: str) -> None:
    with pytest.raises(MalformedFrame, match=message):
        _scan(bytes.fromhex(hex_))
