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


def _scan(data: bytes) -> None:
    """Check the item's structure without building it.

    Exactly one well-formed item; no tags; no simple values but false, true
    and null; map keys only integers or text; depth within MAX_DEPTH. This
    runs before cbor2 sees the bytes, because cbor2 acts on some tags while
    decoding (28/29 shared references build self-referencing or exponentially
    large values from a few bytes). What passes decodes to the plain data
    model only: int (64-bit), bytes, str, list, dict, bool, None, float.
    """
    end = len(data)
    pos = 0
    # Open containers: [items left (-1: indefinite), is_map, items seen].
    stack: list[list[int]] = []
    while True:
        if pos >= end:
            raise MalformedFrame("truncated CBOR item")
        initial = data[pos]
        pos += 1
        major = initial >> 5
        info = initial & 0x1F
        if stack:
            top = stack[-1]
            if top[1] and not top[2] & 1 and major not in (0, 1, 3) and initial != 0xFF:
                raise MalformedFrame("map keys must be integers or text strings")
        if initial == 0xFF:  # break
            if not stack or stack[-1][0] != -1:
                raise MalformedFrame("unexpected CBOR break")
            closed = stack.pop()
            if closed[1] and closed[2] & 1:
                raise MalformedFrame("indefinite map with a key but no value")
        else:
            if info < 24:
                arg = info
            elif info <= 27:
                size = 1 << (info - 24)
                if pos + size > end:
                    raise MalformedFrame("truncated CBOR item")
                arg = int.from_bytes(data[pos:pos + size], "big")
                pos += size
            elif info == 31 and 2 <= major <= 5:
                arg = -1
            else:
                raise MalformedFrame(f"reserved CBOR additional information {info}")
            if major == 6:
                raise MalformedFrame("CBOR tags are not allowed")
            if major == 7:
                if (info < 24 and not 20 <= arg <= 22) or info == 24:
                    raise MalformedFrame("CBOR simple values other than false, true and "
                                         "null are not allowed")
            elif major == 2 or major == 3:
                if arg == -1:  # indefinite string: definite chunks until a break
                    stack.append([-1, 0, 0])
                    continue
                if arg > end - pos:
                    raise MalformedFrame("truncated CBOR string")
                pos += arg
            elif major >= 4:
                count = arg if arg == -1 or major == 4 else arg * 2
                if count != 0:
                    if len(stack) >= MAX_DEPTH:
                        raise MalformedFrame(f"CBOR nesting deeper than {MAX_DEPTH}")
                    stack.append([count, major == 5, 0])
                    continue
        # An item (or an indefinite container) is complete: count it in its parent.
        while stack:
            top = stack[-1]
            top[2] += 1
            if top[0] == -1:
                break
            top[0] -= 1
            if top[0]:
                break
            stack.pop()
        if not stack:
            break
    if pos != end:
        raise MalformedFrame(f"{end - pos} bytes after the CBOR item")


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

    What is signed and hashed is mostly maps with text keys, and for those cbor2's
    canonical mode (RFC 7049 §3.9: keys ordered by encoded length, then bytewise)
    gives the very same bytes at half the cost: a text key's encoded length grows
    with its head, so "shorter first" is "smaller head first". Maps with integer
    keys (where the two orders differ), floats and anything unusual take the
    encoder below.

    :raises LocalProtocolError: ``item`` holds a value outside the data model.
    """
    if _text_keyed(item, 0):
        return cbor2.dumps(item, canonical=True)
    return _encode(item)


def _text_keyed(item: Any, depth: int) -> bool:
    """Only text-keyed maps, arrays, byte and text strings, 64-bit integers, booleans
    and null (of exactly those types), nested at most :data:`MAX_DEPTH` deep."""
    kind = type(item)
    if kind is bytes or kind is str or kind is bool or item is None:
        return True
    if kind is int:
        return bool(_INT_MIN <= item <= _INT_MAX)
    if depth >= MAX_DEPTH:
        return False
    if kind is dict:
        return all(type(k) is str and _text_keyed(v, depth + 1) for k, v in item.items())
    if kind is list or kind is tuple:
        return all(_text_keyed(v, depth + 1) for v in item)
    return False


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
