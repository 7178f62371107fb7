"""Op argument schemas: typed, bounded, no unknown keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pytest

from protocol import InvalidRequest, OpSpec, UnknownOp, arg, lookup, parse_args, registered
from protocol.ops import node


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleArgs:
    name: str = arg(max_length=5)
    count: int = arg(1, minimum=1, maximum=10)
    ratio: float = arg(0.5)
    tags: list[str] = arg([])
    blob: bytes | None = arg(None)
    mode: Literal["a", "b"] = arg("a")
    extra: dict[str, Any] = arg({})


SAMPLE = OpSpec(name="test.sample", args=SampleArgs)


def test_valid_arguments_build_the_dataclass() -> None:
    args = parse_args(SAMPLE, {"name": "abc", "count": 3, "ratio": 2, "tags": ["x"],
                               "blob": b"\x00", "mode": "b", "extra": {"k": 1}})
    assert args == SampleArgs(name="abc", count=3, ratio=2.0, tags=["x"], blob=b"\x00",
                              mode="b", extra={"k": 1})


def test_defaults_apply() -> None:
    assert parse_args(SAMPLE, {"name": "a"}) == SampleArgs(name="a")


@pytest.mark.parametrize(("raw", "field", "text"), [
    ({}, "name", "missing argument"),
    ({"name": 1}, "name", "text string"),
    ({"name": "toolong"}, "name", "at most 5"),
    ({"name": "a", "count": True}, "count", "integer"),
    ({"name": "a", "count": 0}, "count", "at least 1"),
    ({"name": "a", "count": 11}, "count", "at most 10"),
    ({"name": "a", "ratio": "x"}, "ratio", "number"),
    ({"name": "a", "tags": "x"}, "tags", "array"),
    ({"name": "a", "tags": [1]}, "tags", "text string"),
    ({"name": "a", "blob": "00"}, "blob", "byte string"),
    ({"name": "a", "mode": "c"}, "mode", "one of"),
    ({"name": "a", "extra": []}, "extra", "map"),
    ({"name": "a", "nope": 1}, "nope", "unknown argument"),
])
def test_bad_arguments_name_the_field(raw: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_args(SAMPLE, raw)
    assert info.value.details["field"] == field
    assert text in info.value.message


def test_unknown_op() -> None:
    with pytest.raises(UnknownOp):
        lookup("no.such-op")


def test_node_ops_registered() -> None:
    assert {"node.health", "node.info", "node.heartbeat", "node.echo"} <= set(registered())
    assert lookup("node.heartbeat") is node.HEARTBEAT and node.HEARTBEAT.streaming
