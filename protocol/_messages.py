"""The STOQ envelope: requests, responses and events as frozen messages.

Each message validates itself when built from a received CBOR item
(``from_item``) and turns back into one for sending (``to_item``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._errors import ErrorCode, InvalidRequest, RemoteProtocolError, error_from_wire

MAX_OP_LENGTH = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """``{"op": tstr, "args": {...}}``: one operation, sent alone on a new stream."""

    op: str
    """Operation name, such as ``"node.health"``."""
    args: dict[str, Any] = field(default_factory=dict)
    """Arguments; their schema is the op's (see :mod:`protocol._ops`)."""

    @classmethod
    def from_item(cls, item: Any) -> Request:
        """Validate a decoded frame as a request.

        :raises InvalidRequest: not a map, ``op`` missing or not text, ``args``
            not a map, or a key other than ``op`` and ``args``.
        """
        if type(item) is not dict:
            raise InvalidRequest(f"a request must be a CBOR map, not {_kind(item)}")
        op = item.get("op")
        if op is None:
            raise InvalidRequest("the request has no 'op'", field="op")
        if type(op) is not str:
            raise InvalidRequest(f"'op' must be a text string, not {_kind(op)}", field="op")
        if not 0 < len(op) <= MAX_OP_LENGTH:
            raise InvalidRequest(f"'op' must be 1 to {MAX_OP_LENGTH} characters", field="op")
        args = item.get("args", {})
        if type(args) is not dict:
            raise InvalidRequest(f"'args' must be a map, not {_kind(args)}", field="args")
        for key in item:
            if key not in ("op", "args"):
                raise InvalidRequest(f"unknown request key {key!r}", field=str(key))
        return cls(op=op, args=args)

    def to_item(self) -> dict[str, Any]:
        return {"op": self.op, "args": self.args}


@dataclass(frozen=True, slots=True, kw_only=True)
class Ok:
    """``{"ok": {...}}``: the successful result of a unary op."""

    result: dict[str, Any]

    def to_item(self) -> dict[str, Any]:
        return {"ok": self.result}


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """``{"error": {"code", "message", ...}}``: a refused or failed request."""

    code: ErrorCode
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_item(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code.value, "message": self.message}
        body.update(self.details)
        return {"error": body}

    def to_exception(self) -> Exception:
        return error_from_wire(self.to_item()["error"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """``{"event": tstr, "data": any}``: one item of a streaming op."""

    event: str
    data: Any = None

    def to_item(self) -> dict[str, Any]:
        return {"event": self.event, "data": self.data}


Response = Ok | Error


def parse_server_item(item: Any) -> Ok | Error | Event:
    """Classify a frame received from a server.

    :raises RemoteProtocolError: the item is none of ``ok``, ``error``, ``event``.
    """
    if type(item) is dict and len(item) in (1, 2):
        if "ok" in item and len(item) == 1 and type(item["ok"]) is dict:
            return Ok(result=item["ok"])
        if "error" in item and len(item) == 1 and type(item["error"]) is dict:
            body = item["error"]
            code_text = body.get("code")
            message = body.get("message", "")
            if type(code_text) is str and type(message) is str:
                try:
                    code = ErrorCode.from_text(code_text)
                except ValueError:
                    code = ErrorCode.INTERNAL
                details = {k: v for k, v in body.items() if k not in ("code", "message")}
                if code is ErrorCode.INTERNAL and code_text != "internal":
                    details["unknown_code"] = code_text
                return Error(code=code, message=message, details=details)
        if "event" in item and type(item["event"]) is str and set(item) <= {"event", "data"}:
            return Event(event=item["event"], data=item.get("data"))
    raise RemoteProtocolError(f"the server sent a frame that is not ok/error/event: {item!r:.80}")


def _kind(value: Any) -> str:
    names = {dict: "a map", list: "an array", str: "a text string", bytes: "a byte string",
             int: "an integer", float: "a float", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """Who sent a request, as the transport saw it."""

    address: str
    """The client's IPv6 address."""
    port: int
    alpn: str
    certificate: bytes | None = None
    """DER of the client certificate presented over mutual TLS, if any."""
