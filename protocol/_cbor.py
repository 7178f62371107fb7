"""CBOR for STOQ: a strict decoder for untrusted frames and a deterministic encoder.

The decoder accepts exactly one data item of the plain JSON-like data model
(integers within 64 bits, byte and text strings, arrays, maps with text or
integer keys, booleans, null, floats). Tags, undefined, simple values,
duplicate keys and nesting deeper than :data:`MAX_DEPTH` are refused, so a
handler never sees a ``datetime``, a ``set`` or a 10,000-digit bignum that a
peer smuggled in.

:func:`encode_deterministic` implements the core deterministic encoding of
RFC 8949 §4.2.1 (preferred serialization, definite lengths, map keys sorted by
the bytewise order of their encodings). Everything that is signed or hashed
goes through it; ordinary frames use cbor2's faster encoder.
"""

from __future__ import annotations

import itertools
import math
import struct
from typing import Any

import cbor2

from ._errors import LocalProtocolError, MalformedFrame

MAX_DEPTH = 32
"""Deepest nesting of arrays and maps a peer may send."""

_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    raise MalformedFrame(f"CBOR tag {tag.tag} is not allowed")


def _item_sizes() -> tuple[int, ...]:
    """For each initial byte, the whole size of an item that it alone delimits (an
    integer, a float, false/true/null, a string shorter than 24 octets, an empty
    array or map); 0 for every other initial byte."""
    sizes = [0] * 256
    for initial in range(256):
        major, info = initial >> 5, initial & 0x1F
        if major <= 1 and info < 28:
            sizes[initial] = 1 + (0 if info < 24 else 1 << (info - 24))
        elif major in (2, 3) and info < 24:
            sizes[initial] = 1 + info
        elif initial in (0x80, 0xA0, 0xF4, 0xF5, 0xF6):
            sizes[initial] = 1
        elif initial in (0xF9, 0xFA, 0xFB):
            sizes[initial] = 1 + (1 << (initial - 0xF8))
    return tuple(sizes)


_ITEM_SIZE = _item_sizes()

_KEY_SIZE = tuple(size if initial >> 5 in (0, 1, 3) else 0
                  for initial, size in enumerate(_ITEM_SIZE))
""":data:`_ITEM_SIZE` of the items that may be map keys (integers, short text strings);
0 for every other initial byte."""


def _scan(data: bytes) -> None:
    """Check the item's structure without building it.

    Exactly one well-formed item; no tags; no simple values but false, true
    and null; map keys only integers or text; depth within MAX_DEPTH (no item,
    nor the break of an indefinite-length array or map, enclosed by more than
    MAX_DEPTH arrays and maps); the chunks of an indefinite-length string
    definite strings of its own type. This runs before cbor2 sees the bytes,
    because cbor2 acts on some tags while decoding (28/29 shared references
    build self-referencing or exponentially large values from a few bytes).
    What passes decodes to the plain data model only: int (64-bit), bytes,
    str, list, dict, bool, None, float.

    It runs on every frame and every decision, so it is written for speed: one
    table look-up moves past an item whose initial byte gives its size, a map's
    key and value are one step, and an item that runs past the end is noticed
    when the next read fails (or at the end), not by a check of its own.
    """
    item_size = _ITEM_SIZE
    key_size = _KEY_SIZE
    end = len(data)
    pos = 0
    # The innermost open container: entries still to come (items of an array, key and
    # value pairs of a map; an indefinite container counts down from 0 and never
    # reaches it) and whether it is a map. Outside any container: one item.
    left = 1
    in_map = False
    enclosing: list[tuple[int, bool]] = []
    try:
        while True:
            initial = data[pos]
            if in_map and initial != 0xFF:  # a key, then its value
                size = key_size[initial]
                pos = pos + size if size else _after_key(data, pos)
                initial = data[pos]
                if initial == 0xFF:
                    raise MalformedFrame("unexpected CBOR break" if left > 0 else
                                         "indefinite map with a key but no value")
            size = item_size[initial]
            if size:
                pos += size
            elif 0x40 <= initial < 0x80:  # a string of 24 octets or more, or indefinite
                info = initial & 0x1F
                if info == 24:
                    pos += 2 + data[pos + 1]
                elif info == 25:
                    pos += 3 + (data[pos + 1] << 8 | data[pos + 2])
                else:
                    pos = _after_string(data, pos)
            elif 0x80 <= initial < 0xC0:  # a non-empty array or map
                info = initial & 0x1F
                if info < 24:
                    count = info
                    pos += 1
                elif info == 24:
                    count = data[pos + 1]
                    pos += 2
                elif info < 28:
                    width = 1 << (info - 24)
                    if pos + 1 + width > end:
                        raise MalformedFrame("truncated CBOR item")
                    count = int.from_bytes(data[pos + 1:pos + 1 + width], "big")
                    pos += 1 + width
                elif info == 31:
                    count = 0
                    pos += 1
                else:
                    raise _refusal(data, pos)
                if count or info == 31:
                    if len(enclosing) >= MAX_DEPTH:
                        raise MalformedFrame(f"CBOR nesting deeper than {MAX_DEPTH}")
                    enclosing.append((left, in_map))
                    left = count
                    in_map = initial >= 0xA0
                    continue
            elif initial == 0xFF:  # break: the end of an indefinite array or map
                if left > 0:
                    raise MalformedFrame("unexpected CBOR break")
                pos += 1
                left, in_map = enclosing.pop()
            else:
                raise _refusal(data, pos)
            # An entry is complete: count it, and close the containers it filled.
            left -= 1
            while not left:
                if not enclosing:
                    if pos != end:
                        if pos > end:
                            raise MalformedFrame("truncated CBOR item")
                        raise MalformedFrame(f"{end - pos} bytes after the CBOR item")
                    return
                left, in_map = enclosing.pop()
                left -= 1
    except IndexError:
        raise MalformedFrame("truncated CBOR item") from None


def _after_key(data: bytes, pos: int) -> int:
    """The position after the map key at ``pos`` that :data:`_KEY_SIZE` does not
    cover: a text string of 24 octets or more, or indefinite."""
    if data[pos] >> 5 != 3:
        if data[pos] >> 5 > 1:
            raise MalformedFrame("map keys must be integers or text strings")
        raise _refusal(data, pos)
    return _after_string(data, pos)


def _after_string(data: bytes, pos: int) -> int:
    """The position after the string at ``pos`` whose length is not in its initial
    byte (24 octets or more, or indefinite)."""
    info = data[pos] & 0x1F
    if info == 24:
        return pos + 2 + data[pos + 1]
    if info < 28:
        width = 1 << (info - 24)
        return pos + 1 + width + int.from_bytes(data[pos + 1:pos + 1 + width], "big")
    if info == 31:
        return _skip_chunks(data, pos)
    raise _refusal(data, pos)


def _skip_chunks(data: bytes, pos: int) -> int:
    """The position after the indefinite-length string at ``pos``: definite strings
    of its major type up to a break."""
    major = data[pos] & 0xE0
    pos += 1
    while True:
        initial = data[pos]
        if initial == 0xFF:
            return pos + 1
        info = initial & 0x1F
        if initial & 0xE0 != major or info > 27:
            raise MalformedFrame("an indefinite-length string holds only definite strings "
                                 "of its own type")
        if info < 24:
            pos += 1 + info
        else:
            width = 1 << (info - 24)
            pos += 1 + width + int.from_bytes(data[pos + 1:pos + 1 + width], "big")


def _refusal(data: bytes, pos: int) -> MalformedFrame:
    """Why the item at ``pos`` is refused: a tag, a simple value other than false,
    true and null, or a reserved additional information."""
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    if info >= 28:
        return MalformedFrame(f"reserved CBOR additional information {info}")
    if info >= 24 and pos + 1 + (1 << (info - 24)) > len(data):
        return MalformedFrame("truncated CBOR item")
    if major == 6:
        return MalformedFrame("CBOR tags are not allowed")
    return MalformedFrame("CBOR simple values other than false, true and null are not allowed")


def decode_item(data: bytes) -> Any:
    """Decode exactly one CBOR item from ``data``.

    :raises MalformedFrame: not one well-formed item of the allowed data model.
    """
    _scan(data)
    try:
        item = cbor2.loads(data, tag_hook=_refuse_tag, allow_duplicate_keys=False,
                           max_depth=MAX_DEPTH)
    except MalformedFrame:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MalformedFrame(f"not well-formed CBOR: {exc}") from exc
    return item


def encode_item(item: Any) -> bytes:
    """Encode ``item`` for the wire (fast, not necessarily deterministic)."""
    try:
        return cbor2.dumps(item)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {type(item).__name__}: {exc}") from exc


def _head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    if value < 0x100:
        return bytes([major << 5 | 24, value])
    if value < 0x10000:
        return bytes([major << 5 | 25]) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes([major << 5 | 26]) + value.to_bytes(4, "big")
    return bytes([major << 5 | 27]) + value.to_bytes(8, "big")


def encode_head(major: int, value: int) -> bytes:
    """The shortest head of a CBOR item of major type ``major`` and argument ``value``
    (for encoders of one fixed shape that must match :func:`encode_deterministic`)."""
    return _head(major, value)


def _encode_float(value: float) -> bytes:
    # Preferred serialization: the shortest of half, single and double that
    # keeps the value exactly (RFC 8949 §4.2.1, with NaN as 0xf97e00).
    if math.isnan(value):
        return b"\xf9\x7e\x00"
    for fmt, head in (("e", 0xF9), ("f", 0xFA)):
        try:
            packed = struct.pack(">" + fmt, value)
        except OverflowError:
            continue
        if struct.unpack(">" + fmt, packed)[0] == value:
            return bytes([head]) + packed
    return b"\xfb" + struct.pack(">d", value)


def encode_deterministic(item: Any) -> bytes:
    """Core deterministic CBOR encoding (RFC 8949 §4.2.1) of ``item``.

    What is signed and hashed is mostly maps with text keys. For those, a copy
    whose maps iterate in the deterministic order (:func:`_in_order`) is encoded
    by cbor2's plain encoder, which keeps a map's order and always writes the
    shortest heads: the same bytes at a third of the cost of cbor2's canonical
    mode, which orders every map by encoding each key apart. Maps with integer
    keys (where the orders differ from the text-key rule), floats (whose
    shortest form cbor2 writes only in canonical mode) and anything unusual
    take the encoder below.

    :raises LocalProtocolError: ``item`` holds a value outside the data model.
    """
    try:
        ordered = _in_order(item, 0)
    except _Unusual:
        return _encode(item)
    return cbor2.dumps(ordered)


class _Unusual(Exception):
    """An item :func:`_in_order` does not take (the general encoder does, or refuses it)."""


def _key_order(key: str) -> tuple[int, bytes]:
    """A text key's place among its map's keys: the bytewise order of their encodings,
    which for text is shorter first (a longer string never has a smaller head), then
    bytewise."""
    raw = key.encode("utf-8")
    return len(raw), raw


def _in_order(item: Any, depth: int) -> Any:
    """``item`` with every map rebuilt in deterministic key order, if it holds only
    text-keyed maps, arrays, byte and text strings, 64-bit integers, booleans and null
    (of exactly those types), nested at most :data:`MAX_DEPTH` deep; else
    :class:`_Unusual`."""
    kind = type(item)
    if kind is bytes or kind is str or kind is bool or item is None:
        return item
    if kind is int:
        if _INT_MIN <= item <= _INT_MAX:
            return item
        raise _Unusual
    if depth >= MAX_DEPTH:
        raise _Unusual
    if kind is dict:
        keys = list(item)
        for key in keys:
            if type(key) is not str:
                raise _Unusual
        keys.sort(key=_key_order)
        return {key: _in_order(item[key], depth + 1) for key in keys}
    if kind is list or kind is tuple:
        return [_in_order(value, depth + 1) for value in item]
    raise _Unusual


def _encode(item: Any) -> bytes:
    kind = type(item)
    if kind is bool:
        return b"\xf5" if item else b"\xf4"
    if item is None:
        return b"\xf6"
    if kind is int:
        if 0 <= item <= _INT_MAX:
            return _head(0, item)
        if _INT_MIN <= item < 0:
            return _head(1, -1 - item)
        raise LocalProtocolError("integer outside the 64-bit range")
    if kind is bytes:
        return _head(2, len(item)) + bytes(item)
    if kind is str:
        raw: bytes = item.encode("utf-8")
        return _head(3, len(raw)) + raw
    if kind in (list, tuple):
        return _head(4, len(item)) + b"".join(_encode(x) for x in item)
    if kind is dict:
        pairs = sorted((_encode(k), _encode(v)) for k, v in item.items())
        for (k1, _), (k2, _) in itertools.pairwise(pairs):
            if k1 == k2:
                raise LocalProtocolError("duplicate map key")
        return _head(5, len(pairs)) + b"".join(k + v for k, v in pairs)
    if kind is float:
        return _encode_float(item)
    raise LocalProtocolError(f"{kind.__name__} has no deterministic CBOR encoding here")
