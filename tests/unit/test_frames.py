"""Frame splitting: incremental, refuses oversize headers before buffering."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import FrameDecoder, FrameTooLarge, MalformedFrame, encode_frame, frame_payload


def test_one_frame_in_one_piece() -> None:
    decoder = FrameDecoder()
    assert decoder.receive_data(frame_payload(b"\xa0")) == [b"\xa0"]
    decoder.end_of_stream()


def test_byte_by_byte() -> None:
    data = frame_payload(b"hello") + frame_payload(b"") + frame_payload(b"x" * 300)
    decoder = FrameDecoder()
    frames = []
    for i in range(len(data)):
        frames += decoder.receive_data(data[i:i + 1])
    assert frames == [b"hello", b"", b"x" * 300]
    decoder.end_of_stream()


def test_oversize_header_refused_before_payload() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    with pytest.raises(FrameTooLarge) as info:
        decoder.receive_data((101).to_bytes(4, "big"))
    assert info.value.details["limit"] == 100
    assert decoder.buffered == 0


def test_frame_at_limit_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    assert decoder.receive_data(frame_payload(b"a" * 100)) == [b"a" * 100]


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x05ab"])
def test_truncated_at_end_of_stream(tail: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(tail)
    with pytest.raises(MalformedFrame):
        decoder.end_of_stream()


def test_encode_frame_prefixes_length() -> None:
    assert encode_frame({"a": 1}) == bytes.fromhex("00000004" "a1616101")


@given(st.lists(st.binary(max_size=200), max_size=8), st.data())
def test_any_split_gives_the_same_frames(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame_payload(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    got: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        got += decoder.receive_data(stream[start:cut])
        start = cut
    assert got == payloads
    decoder.end_of_stream()


@given(st.binary(max_size=64), st.integers(0, 64))
def test_random_bytes_raise_only_frame_errors(data: bytes, limit: int) -> None:
    decoder = FrameDecoder(max_frame_size=limit)
    try:
        for payload in decoder.receive_data(data):
            assert len(payload) <= limit
        decoder.end_of_stream()
    except (FrameTooLarge, MalformedFrame):
        pass
