"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes of CBOR."""

from __future__ import annotations

from typing import Any

from ._cbor import encode_item
from ._errors import FrameTooLarge, LocalProtocolError, MalformedFrame

HEADER_SIZE = 4
DEFAULT_MAX_FRAME_SIZE = 1 << 20
"""1 MiB: the default largest frame payload a STOQ endpoint accepts."""
ABSOLUTE_MAX_FRAME_SIZE = (1 << 32) - 1


def encode_frame(item: Any) -> bytes:
    """One frame holding ``item`` encoded as CBOR."""
    payload = encode_item(item)
    if len(payload) > ABSOLUTE_MAX_FRAME_SIZE:
        raise LocalProtocolError("frame payload does not fit a 4-byte length")
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def frame_payload(payload: bytes) -> bytes:
    """Frame already-encoded CBOR ``payload``."""
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


class FrameDecoder:
    """Incremental frame splitter: bytes in, complete frame payloads out.

    A frame whose declared length exceeds ``max_frame_size`` is refused as soon
    as its header is seen, before any of its payload is buffered.
    """

    __slots__ = ("_buffer", "_need", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._need = -1  # payload length of the frame being read; -1: reading a header

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a complete frame."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the payloads of the frames it completed.

        :raises FrameTooLarge: a header declared more than ``max_frame_size``.
        """
        self._buffer += data
        frames: list[bytes] = []
        buf = self._buffer
        while True:
            if self._need < 0:
                if len(buf) < HEADER_SIZE:
                    break
                declared = int.from_bytes(buf[:HEADER_SIZE], "big")
                if declared > self.max_frame_size:
                    buf.clear()
                    raise FrameTooLarge(
                        f"frame of {declared} bytes exceeds the limit of "
                        f"{self.max_frame_size} bytes",
                        limit=self.max_frame_size,
                    )
                del buf[:HEADER_SIZE]
                self._need = declared
            if len(buf) < self._need:
                break
            frames.append(bytes(buf[: self._need]))
            del buf[: self._need]
            self._need = -1
        return frames

    def end_of_stream(self) -> None:
        """The stream ended; a partial frame left in the buffer is an error.

        :raises MalformedFrame: the stream ended inside a frame.
        """
        if self._need >= 0 or self._buffer:
            missing = (self._need - len(self._buffer)) if self._need >= 0 else None
            self._buffer.clear()
            self._need = -1
            if missing is None:
                raise MalformedFrame("stream ended inside a frame header")
            raise MalformedFrame(f"stream ended {missing} bytes short of the frame's end")
