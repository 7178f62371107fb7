"""The statements a proof set is hashed and signed over (``work_prefix``,
``binding_statement``) are written by fixed-shape encoders: their bytes must be
exactly ``encode_deterministic``'s for the same map, at every length where a CBOR
head changes size, for random values, and for values the fixed shape does not take
(which go through the generic encoder)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from protocol import LocalProtocolError, encode_deterministic
from protocol.ops.consensus import binding_statement, work_prefix

LENGTHS = (0, 1, 23, 24, 25, 255, 256, 257, 65535, 65536, 65537)
"""Byte-string lengths on both sides of each CBOR head size (1, 2, 3 and 5 octets)."""
EPOCHS = (0, 1, 23, 24, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 63) - 1,
          (1 << 64) - 1)
"""Epochs on both sides of each CBOR head size (1, 2, 3, 5 and 9 octets)."""


def _work_map(op: Any, request: Any, key: Any, epoch: Any) -> dict[str, Any]:
    return {"ctx": "trustchain-work-v1", "op": op, "request": request, "key": key,
            "epoch": epoch}


def _binding_map(op: Any, request: Any, epoch: Any, space: Any, time: Any,
                 nonce: Any) -> dict[str, Any]:
    return {"ctx": "trustchain-proofs-v1", "op": op, "request": request, "epoch": epoch,
            "space": space, "time": time, "nonce": nonce}


def _outcome(encode: Callable[[], bytes]) -> bytes | type[Exception]:
    """The bytes, or the kind of error (a value outside the data model is refused)."""
    try:
        return encode()
    except LocalProtocolError as exc:
        return type(exc)


def _same(op: Any, request: Any, key: Any, epoch: Any, space: Any, time: Any,
          nonce: Any) -> None:
    work_prefix.cache_clear()  # the encoder itself, not a remembered answer
    assert _outcome(lambda: work_prefix(op, request, key, epoch)) == \
        _outcome(lambda: encode_deterministic(_work_map(op, request, key, epoch))), \
        (op, len(request), epoch)
    assert _outcome(lambda: binding_statement(op=op, request=request, epoch=epoch, space=space,
                                              time=time, nonce=nonce)) == \
        _outcome(lambda: encode_deterministic(_binding_map(op, request, epoch, space, time,
                                                           nonce))), \
        (op, len(request), epoch, len(space), len(time), len(nonce))


def test_every_head_boundary() -> None:
    rng = random.Random(15)
    for op in ("issue", "revoke"):
        for length in LENGTHS:
            value = rng.randbytes(length)
            short = rng.randbytes(rng.choice((0, 1, 32)))
            # each field in turn at the boundary length, the others short
            _same(op, value, short, 7, short, short, short)
            _same(op, short, value, 7, short, short, short)
            _same(op, short, short, 7, value, short, short)
            _same(op, short, short, 7, short, value, short)
            _same(op, short, short, 7, short, short, value)
        for epoch in EPOCHS:
            _same(op, rng.randbytes(32), rng.randbytes(32), epoch, rng.randbytes(32),
                  rng.randbytes(32), rng.randbytes(8))


def test_random_values() -> None:
    rng = random.Random(12)

    def octets() -> bytes:
        return rng.randbytes(rng.choice((rng.randrange(0, 300), rng.choice(LENGTHS))))

    for _ in range(500):
        epoch = rng.choice((rng.randrange(1 << 64), rng.randrange(1 << 20),
                            rng.choice(EPOCHS)))
        _same(rng.choice(("issue", "revoke")), octets(), octets(), epoch, octets(), octets(),
              octets())


@pytest.mark.parametrize("value", [
    {"op": "renew"}, {"op": ""}, {"op": "issué"}, {"epoch": -1}, {"epoch": -(1 << 64)},
    {"epoch": True}, {"space": bytearray(b"s")}, {"key": "a text key"},
    {"nonce": None}, {"space": [b"x"]},
], ids=lambda v: repr(v))
def test_values_outside_the_fixed_shape_take_the_generic_encoder(value: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"op": "issue", "request": b"r" * 32, "key": b"k" * 32,
                              "epoch": 3, "space": b"s" * 32, "time": b"t" * 32,
                              "nonce": b"n"}
    fields.update(value)
    _same(**fields)


@pytest.mark.parametrize("epoch", [1 << 64, -(1 << 64) - 1])
def test_out_of_range_epochs_are_refused_as_before(epoch: int) -> None:
    with pytest.raises(LocalProtocolError):
        work_prefix("issue", b"r", b"k", epoch)
    with pytest.raises(LocalProtocolError):
        binding_statement(op="issue", request=b"r", epoch=epoch, space=b"s", time=b"t",
                          nonce=b"n")
