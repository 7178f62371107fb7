"""What the verifier does per proof set without the generic code paths: the
statements a set is hashed and signed over (``work_prefix``, ``binding_statement``)
are written by fixed-shape encoders, whose bytes must be exactly
``encode_deterministic``'s for the same map (at every length where a CBOR head
changes size, for random values, and for values the fixed shape does not take,
which go through the generic encoder); and ``parse_proofs`` accepts a well-formed
set in one test, which must decide exactly as its checks one at a time."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from protocol import LocalProtocolError, ProofInvalid, encode_deterministic
from protocol.ops.consensus import (
    MAX_KEY_SIZE,
    MAX_NONCE_SIZE,
    MAX_PLOT_SIZE,
    MAX_SIGNATURE_SIZE,
    MAX_VDF_ITERATIONS,
    MIN_PLOT_SIZE,
    SPACE_CHALLENGES,
    VDF_FORM_SIZE,
    ProofSet,
    _parse_each,
    binding_statement,
    parse_proofs,
    work_prefix,
)

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


# --- parse_proofs: one test for a well-formed set, then each check in turn -----------------

_BOUNDS: dict[tuple[str, ...], tuple[str, int, int]] = {
    ("epoch",): ("int", 0, (1 << 63) - 1),
    ("requester_key",): ("bytes", 1, MAX_KEY_SIZE),
    ("space", "plot_id"): ("bytes", 32, 32),
    ("space", "k"): ("int", MIN_PLOT_SIZE, MAX_PLOT_SIZE),
    ("space", "index"): ("int", 0, SPACE_CHALLENGES - 1),
    ("space", "proof"): ("bytes", 8 * 18, 8 * 18),
    ("time", "iterations"): ("int", 1, MAX_VDF_ITERATIONS),
    ("time", "output"): ("bytes", VDF_FORM_SIZE, VDF_FORM_SIZE),
    ("time", "proof"): ("bytes", VDF_FORM_SIZE, VDF_FORM_SIZE),
    ("work", "nonce"): ("bytes", 1, MAX_NONCE_SIZE),
    ("binding",): ("bytes", 1, MAX_SIGNATURE_SIZE),
}
"""Every leaf of a proof set: its kind and the bounds parse_proofs checks (k = 18)."""


def _well_formed_set(rng: random.Random) -> dict[str, Any]:
    return {"epoch": rng.randrange(1 << 30), "requester_key": rng.randbytes(91),
            "space": {"plot_id": rng.randbytes(32), "k": 18, "index": rng.randrange(32),
                      "proof": rng.randbytes(144)},
            "time": {"iterations": 1000, "output": rng.randbytes(100),
                     "proof": rng.randbytes(100)},
            "work": {"nonce": rng.randbytes(8)}, "binding": rng.randbytes(71)}


def _parsed(parse: Callable[[Any], Any], raw: Any) -> Any:
    try:
        return parse(raw)
    except ProofInvalid as exc:
        return (exc.message, exc.details)


def _mutants(rng: random.Random) -> list[Any]:
    """Proof sets wrong (or right) in one place each: every leaf at and past its bounds,
    of every other type, missing or null, unknown keys, maps that are not maps."""
    out: list[Any] = [None, [], "proofs", {}, 7]
    others: list[Any] = [None, True, False, 1, -1, 1.5, "x", b"x", [], {}]
    for path, (kind, lo, hi) in _BOUNDS.items():
        values: list[Any] = list(others)
        if kind == "int":
            values += [lo - 1, lo, hi, hi + 1, 1 << 64]
        else:
            values += [rng.randbytes(n) for n in {max(lo - 1, 0), lo, hi, hi + 1}]
            values += [bytearray(lo)]
        for value in values:
            raw = _well_formed_set(rng)
            parent = raw
            for step in path[:-1]:
                parent = parent[step]
            parent[path[-1]] = value
            out.append(raw)
        raw = _well_formed_set(rng)
        parent = raw
        for step in path[:-1]:
            parent = parent[step]
        del parent[path[-1]]
        out.append(raw)
    for where in (None, "space", "time", "work"):
        for extra in ("extra", 3, b"k"):
            raw = _well_formed_set(rng)
            target: dict[Any, Any] = raw if where is None else raw[where]
            target[extra] = 1
            out.append(raw)
        if where is not None:
            for value in (None, [], "map", [("k", 18)]):
                raw = _well_formed_set(rng)
                raw[where] = value
                out.append(raw)
    raw = _well_formed_set(rng)
    raw["space"]["k"] = 19  # the proof's size then differs from 8 * k
    out.append(raw)
    raw = _well_formed_set(rng)
    raw["space"]["k"] = 19
    raw["space"]["proof"] = rng.randbytes(8 * 19)
    out.append(raw)
    out += [_well_formed_set(rng) for _ in range(20)]
    return out


def test_parse_proofs_decides_as_each_check_in_turn() -> None:
    rng = random.Random(1012)
    accepted = refused = 0
    for raw in _mutants(rng):
        expected = _parsed(_parse_each, raw)
        assert _parsed(parse_proofs, raw) == expected, raw
        if isinstance(expected, ProofSet):
            accepted += 1
            assert expected.to_wire() == raw
        else:
            refused += 1
    assert accepted >= 20 + 2 * len(_BOUNDS) and refused > 100, (accepted, refused)
