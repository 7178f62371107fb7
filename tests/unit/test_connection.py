"""STOQ state machines in pairs, with no sockets (after aioquic's roundtrip and h11's
ConnectionPair), and the frame vectors of spec/vectors/frames.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handlers import NodeService, Router
from protocol import (
    STOQ_EXCESSIVE_LOAD,
    STOQ_PROTOCOL_ERROR,
    STOQ_REQUEST_CANCELLED,
    ClientConnection,
    Error,
    ErrorCode,
    Event,
    EventReceived,
    LocalProtocolError,
    Ok,
    Peer,
    Request,
    RequestReceived,
    RequestRefused,
    ResetStream,
    ResponseReceived,
    SendData,
    ServerConnection,
    StopSending,
    StreamBroken,
    StreamCancelled,
    StreamEnded,
    TrustChainError,
    decode_item,
    encode_frame,
    frame_payload,
)
from protocol._connection import ENDED_STREAMS_KEPT

VECTORS = json.loads((Path(__file__).parents[2] / "spec/vectors/frames.json").read_text())
PEER = Peer(address="::1", port=1, alpn="stoq/1")


def _router() -> Router:
    router = Router()
    NodeService(describe=dict).register(router)
    return router


class ProtocolPair:
    """A client and a server connection wired back to back."""

    def __init__(self, max_frame_size: int = 1 << 20) -> None:
        self.client = ClientConnection(max_frame_size=max_frame_size)
        self.server = ServerConnection(max_frame_size=max_frame_size)
        self.stops: list[StopSending] = []

    def to_server(self) -> list[Any]:
        events: list[Any] = []
        for item in self.client.data_to_send():
            if isinstance(item, SendData):
                events += self.server.receive_data(item.stream_id, item.data, item.end_stream)
        return events

    def to_client(self) -> list[Any]:
        events: list[Any] = []
        for item in self.server.data_to_send():
            if isinstance(item, SendData):
                events += self.client.receive_data(item.stream_id, item.data, item.end_stream)
            elif isinstance(item, StopSending):
                self.stops.append(item)
        return events


def test_unary_roundtrip() -> None:
    pair = ProtocolPair()
    pair.client.send_request(0, Request(op="node.health"))
    (received,) = pair.to_server()
    assert received == RequestReceived(0, Request(op="node.health", args={}))
    pair.server.send_response(0, Ok(result={"status": "ok"}))
    assert pair.to_client() == [ResponseReceived(0, Ok(result={"status": "ok"})),
                                StreamEnded(0)]
    assert pair.server.open_streams == 0


def test_streaming_roundtrip() -> None:
    pair = ProtocolPair()
    pair.client.send_request(4, Request(op="node.heartbeat", args={"count": 2}))
    pair.to_server()
    pair.server.send_event(4, Event(event="heartbeat", data={"seq": 0}))
    pair.server.send_event(4, Event(event="heartbeat", data={"seq": 1}))
    pair.server.end_stream(4)
    events = pair.to_client()
    assert [type(e) for e in events] == [EventReceived, EventReceived, StreamEnded]
    assert events[1].event == Event(event="heartbeat", data={"seq": 1})


def test_stream_may_end_with_an_error() -> None:
    pair = ProtocolPair()
    pair.client.send_request(0, Request(op="x"))
    pair.to_server()
    pair.server.send_event(0, Event(event="e"))
    pair.server.send_response(0, Error(code=ErrorCode.UNAVAILABLE, message="gone"))
    events = pair.to_client()
    assert isinstance(events[1], ResponseReceived) and isinstance(events[2], StreamEnded)


def test_an_answer_above_the_frame_limit_becomes_too_large() -> None:
    """The server never sends a frame it would refuse itself (spec §3.2)."""
    pair = ProtocolPair(max_frame_size=200)
    pair.client.max_frame_size = 1 << 20  # the client would take it: the server still won't
    pair.client.send_request(0, Request(op="node.echo"))
    pair.to_server()
    pair.server.send_response(0, Ok(result={"data": bytes(300)}))
    events = pair.to_client()
    response = events[0].response
    assert isinstance(response, Error) and response.code is ErrorCode.TOO_LARGE
    assert response.details["limit"] == 200 and response.details["size"] > 300
    assert pair.server.open_streams == 0


def test_an_event_above_the_frame_limit_ends_the_stream() -> None:
    pair = ProtocolPair(max_frame_size=200)
    pair.client.send_request(4, Request(op="ct.subscribe"))
    pair.to_server()
    pair.server.send_event(4, Event(event="entry", data={"leaf": bytes(10)}))
    pair.server.send_event(4, Event(event="entry", data={"leaf": bytes(500)}))
    assert not pair.server.is_open(4)
    events = pair.to_client()
    assert isinstance(events[0], EventReceived)
    assert isinstance(events[1], ResponseReceived)
    assert events[1].response.code is ErrorCode.TOO_LARGE
    assert isinstance(events[2], StreamEnded)


@pytest.mark.parametrize("sends", [
    ["ok", "ok"], ["ok", "event"], ["end", "event"], ["event", "ok"], ["ok", "end"],
])
def test_server_send_in_wrong_state_is_local_error(sends: list[str]) -> None:
    pair = ProtocolPair()
    pair.client.send_request(0, Request(op="x"))
    pair.to_server()
    actions = {"ok": lambda: pair.server.send_response(0, Ok(result={})),
               "event": lambda: pair.server.send_event(0, Event(event="e")),
               "end": lambda: pair.server.end_stream(0)}
    with pytest.raises(LocalProtocolError):
        for send in sends:
            actions[send]()


def test_request_dispatched_only_after_fin() -> None:
    server = ServerConnection()
    frame = encode_frame({"op": "node.health"})
    assert server.receive_data(0, frame, False) == []
    (event,) = server.receive_data(0, b"", True)
    assert isinstance(event, RequestReceived)


def test_data_after_request_frame_refused() -> None:
    server = ServerConnection()
    frame = encode_frame({"op": "node.health"})
    (event,) = server.receive_data(0, frame + b"\x00", False)
    assert isinstance(event, RequestRefused) and event.error.code.value == "invalid_request"
    out = server.data_to_send()
    assert decode_item(out[0].data[4:])["error"]["code"] == "invalid_request"  # type: ignore[union-attr]
    assert out[1] == StopSending(0, STOQ_PROTOCOL_ERROR)
    # the rest of that request is not taken for a new one
    assert server.receive_data(0, frame, True) == []
    assert server.open_streams == 0


def test_oversize_frame_answered_from_the_header_alone() -> None:
    server = ServerConnection(max_frame_size=1000)
    (event,) = server.receive_data(0, (10**6).to_bytes(4, "big"), False)
    assert isinstance(event, RequestRefused) and event.error.code.value == "too_large"
    out = server.data_to_send()
    assert out[0].end_stream  # type: ignore[union-attr]
    assert out[1] == StopSending(0, STOQ_EXCESSIVE_LOAD)


def test_truncated_frame_then_fin() -> None:
    server = ServerConnection()
    (event,) = server.receive_data(0, encode_frame({"op": "node.health"})[:-2], True)
    assert isinstance(event, RequestRefused) and event.error.code.value == "malformed"


def test_empty_stream() -> None:
    server = ServerConnection()
    (event,) = server.receive_data(0, b"", True)
    assert isinstance(event, RequestRefused) and event.error.code.value == "invalid_request"


def test_unidirectional_stream_stopped() -> None:
    server = ServerConnection()
    assert server.receive_data(2, b"\x00\x00\x00\x00", False) == []
    assert server.data_to_send() == [StopSending(2, STOQ_PROTOCOL_ERROR)]


def test_peer_reset_cancels_handling() -> None:
    server = ServerConnection()
    server.receive_data(0, encode_frame({"op": "node.heartbeat"}), True)
    assert server.stream_reset(0) == [StreamCancelled(0)]
    assert not server.is_open(0)
    assert server.data_to_send() == [ResetStream(0, STOQ_REQUEST_CANCELLED)]


def test_peer_reset_while_receiving_resets_our_side() -> None:
    server = ServerConnection()
    server.receive_data(0, b"\x00\x00", False)
    assert server.stream_reset(0) == [StreamCancelled(0)]
    assert server.data_to_send() == [ResetStream(0, STOQ_REQUEST_CANCELLED)]


def test_client_rejects_frames_after_response() -> None:
    client = ClientConnection()
    client.send_request(0, Request(op="node.health"))
    client.data_to_send()
    data = encode_frame({"ok": {}}) + encode_frame({"event": "late"})
    events = client.receive_data(0, data, False)
    assert isinstance(events[-1], StreamBroken)


def test_client_rejects_garbage_from_server() -> None:
    client = ClientConnection()
    client.send_request(0, Request(op="node.health"))
    (event,) = client.receive_data(0, encode_frame({"what": 1}), True)
    assert isinstance(event, StreamBroken)


def test_client_rejects_fin_without_response() -> None:
    client = ClientConnection()
    client.send_request(0, Request(op="node.health"))
    (event,) = client.receive_data(0, b"", True)
    assert isinstance(event, StreamBroken)


def test_client_only_sends_on_bidi_client_streams() -> None:
    with pytest.raises(LocalProtocolError):
        ClientConnection().send_request(1, Request(op="x"))


def _unhex(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"hex"}:
            return bytes.fromhex(value["hex"])
        return {k: _unhex(v) for k, v in value.items()}
    return value


CLIENT_VECTORS = [v for v in VECTORS["vectors"] if v["sent_by"] == "client"]
SERVER_VECTORS = [v for v in VECTORS["vectors"] if v["sent_by"] == "server"]


@pytest.mark.parametrize("vector", CLIENT_VECTORS, ids=[v["name"] for v in CLIENT_VECTORS])
def test_client_vector(vector: dict[str, Any]) -> None:
    frame = bytes.fromhex(vector["hex"])
    server = ServerConnection()
    events = server.receive_data(0, frame, True)
    expect = vector["expect"]
    if "request" in expect:
        request = Request(**_unhex(expect["request"]))
        assert events == [RequestReceived(0, request)]
        # encoding the request gives the vector's bytes
        item = request.to_item() if "args" in decode_item(frame[4:]) else {"op": request.op}
        assert encode_frame(item) == frame
        return
    if events and isinstance(events[0], RequestReceived):
        # envelope fine: the router refuses it
        try:
            reply = _router()(events[0].request, PEER)
        except TrustChainError as exc:
            code = exc.code.value
        else:
            code = reply.code.value if isinstance(reply, Error) else "dispatched"
    else:
        assert isinstance(events[0], RequestRefused)
        code = events[0].error.code.value
    assert code == expect["error"]


@pytest.mark.parametrize("vector", SERVER_VECTORS, ids=[v["name"] for v in SERVER_VECTORS])
def test_server_vector(vector: dict[str, Any]) -> None:
    client = ClientConnection()
    client.send_request(0, Request(op="node.heartbeat"))
    events = client.receive_data(0, bytes.fromhex(vector["hex"]), False)
    expect = vector["expect"]
    (event,) = events
    if "event" in expect:
        assert isinstance(event, EventReceived) and event.event.event == expect["event"]
        assert encode_frame(event.event.to_item()) == bytes.fromhex(vector["hex"])
    elif "ok" in expect:
        assert isinstance(event, ResponseReceived) and isinstance(event.response, Ok)
        assert encode_frame(event.response.to_item()) == bytes.fromhex(vector["hex"])
    else:
        assert isinstance(event, ResponseReceived) and isinstance(event.response, Error)
        assert event.response.code.value == expect["error"]
        assert encode_frame(event.response.to_item()) == bytes.fromhex(vector["hex"])


def test_frame_payload_of_vectors_is_length_prefixed() -> None:
    for vector in VECTORS["vectors"]:
        frame = bytes.fromhex(vector["hex"])
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        assert frame_payload(frame[4:]) == frame


def test_a_request_retransmitted_after_its_answer_is_not_run_again() -> None:
    # The client's ACK of our answer, or our ACK of its request, was lost: QUIC sends the
    # request's STREAM frame again after the stream ended here (issue 16).
    server = ServerConnection()
    frame = encode_frame({"op": "node.health"})
    (event,) = server.receive_data(0, frame, True)
    assert isinstance(event, RequestReceived)
    server.send_response(0, Ok(result={}))
    server.data_to_send()
    assert server.receive_data(0, frame, True) == []
    assert server.receive_data(0, b"", True) == []
    # a refused one is not refused twice either (one log line, one error frame)
    (refused,) = server.receive_data(4, frame_payload(b"\xff"), True)
    assert isinstance(refused, RequestRefused)
    server.data_to_send()
    assert server.receive_data(4, frame_payload(b"\xff"), True) == []
    assert server.data_to_send() == [] and server.open_streams == 0
    # only the latest ended streams are remembered
    for i in range(2, 2 + ENDED_STREAMS_KEPT + 1):
        server.receive_data(4 * i, frame, True)
        server.send_response(4 * i, Ok(result={}))
    (again,) = server.receive_data(0, frame, True)
    assert isinstance(again, RequestReceived)


def test_an_unfinished_request_expires_and_its_buffer_is_released() -> None:
    server = ServerConnection()
    frame = encode_frame({"op": "node.echo", "args": {"data": b"x" * 5000}})
    server.receive_data(0, frame[:3000], False, now=100.0)     # a partial frame
    server.receive_data(4, frame, False, now=103.0)            # a whole frame, no FIN
    server.receive_data(8, frame[:10], False, now=104.0)
    assert server.buffered == (3000 - 4) + (len(frame) - 4) + (10 - 4)  # headers read
    assert server.next_deadline(10.0) == 110.0
    assert server.expire(109.9, 10.0) == []
    assert server.expire(113.5, 10.0) == [0, 4]
    out = server.data_to_send()
    assert [decode_item(o.data[4:])["error"]["code"] for o in out  # type: ignore[union-attr]
            if isinstance(o, SendData)] == ["timeout", "timeout"]
    assert StopSending(0, STOQ_REQUEST_CANCELLED) in out
    assert StopSending(4, STOQ_REQUEST_CANCELLED) in out
    assert server.buffered == 6 and server.next_deadline(10.0) == 114.0
    # the tail of an expired request is not a new one
    assert server.receive_data(0, frame[3000:], True, now=115.0) == []
    # a request that arrives whole in time is not touched
    (done,) = server.receive_data(8, frame[10:], True, now=113.9)
    assert isinstance(done, RequestReceived)
    assert server.next_deadline(10.0) is None and server.buffered == 0
    server.receive_data(12, frame[:100], False, now=120.0)
    server.release()  # the connection closed
    assert server.buffered == 0 and server.open_streams == 0
