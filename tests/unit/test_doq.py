"""protocol.doq without sockets: the RFC 9250 stream rules and the DNS wire reader."""

from __future__ import annotations

import contextlib
import struct

import dns.edns
import dns.message
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import LocalProtocolError
from protocol.doq import (
    DOQ_EXCESSIVE_LOAD,
    DOQ_INTERNAL_ERROR,
    DOQ_PROTOCOL_ERROR,
    DOQ_REQUEST_CANCELLED,
    EDNS_TCP_KEEPALIVE,
    ENDED_STREAMS_KEPT,
    REMEMBERED_SIZE,
    CloseConnection,
    ConnectionBroken,
    DnsFormatError,
    DoqConnection,
    QueryCancelled,
    QueryMemo,
    QueryReceived,
    ResetStream,
    SendData,
    StopSending,
    error_response,
    name_to_text,
    parse_query,
)


def query(name: str = "www.trust", rdtype: str = "AAAA", *, msg_id: int = 0,
          **kwargs: object) -> bytes:
    q = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    q.id = msg_id
    return q.to_wire()


def framed(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def header(qdcount: int = 1, ancount: int = 0, nscount: int = 0, arcount: int = 0,
           flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0, flags, qdcount, ancount, nscount, arcount)


QUESTION = b"\x03www\x05trust\x00\x00\x1c\x00\x01"


# --- the wire reader ----------------------------------------------------------------


def test_parse_plain_query() -> None:
    q = parse_query(query("WwW.Trust", "AAAA"))
    assert q.qname == b"\x03www\x05trust\x00"
    assert q.question[:10] == b"\x03WwW\x05Trust"  # as the client wrote it
    assert (q.qtype, q.qclass, q.id, q.opcode) == (28, 1, 0, 0)
    assert q.rd and not q.compressed and q.edns is None
    assert name_to_text(q.qname) == "www.trust."


def test_parse_edns_and_do_bit() -> None:
    q = parse_query(query(want_dnssec=True, use_edns=0, payload=1232,
                          options=[dns.edns.GenericOption(12, b"\0" * 8)]))
    assert q.edns is not None and q.edns.dnssec_ok and q.edns.payload == 1232
    assert q.edns.has_option(12) and not q.edns.has_option(EDNS_TCP_KEEPALIVE)


@pytest.mark.parametrize(("wire", "reason"), [
    (b"\x00\x00\x01", "shorter than a DNS header"),
    (header(qdcount=0), "QDCOUNT is 0"),
    (header(qdcount=2) + QUESTION * 2, "QDCOUNT is 2"),
    (header() + b"\x03www\x05tr", "label runs past"),
    (header() + QUESTION[:-2], "question is truncated"),
    (header() + QUESTION + b"\x00", "1 bytes follow"),
    (header() + b"\xc0\x0c\x00\x1c\x00\x01", "does not point backwards"),  # a loop onto itself
    (header() + b"\x01a\xc0\x0e\x00\x1c\x00\x01", "does not point backwards"),  # forward
    (header() + b"\x41" + b"a" * 65 + b"\x00\x00\x01\x00\x01", "label type 0x1"),
    (header() + b"\x3f" + b"a" * 63 + (b"\x3f" + b"b" * 63) * 3 + b"\x00\x00\x1c\x00\x01",
     "longer than 255"),
    (header(arcount=2) + QUESTION + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 2,
     "OPT record must be unique"),
    (header(ancount=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00",
     "OPT record must be unique"),
    (header(arcount=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x02\x00\x0b",
     "option header is truncated"),
    (header(arcount=1) + QUESTION + b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x09\x00",
     "runs past the end"),
    (header(flags=0x8100) + QUESTION, "is a response"),
])
def test_unreadable_queries(wire: bytes, reason: str) -> None:
    with pytest.raises(DnsFormatError, match=reason) as info:
        parse_query(wire)
    if len(wire) >= 12:
        assert info.value.flags is not None


def test_longest_name_is_accepted() -> None:
    # 255 octets: 3 labels of 63, one of 61, and the root
    name = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"b" * 61 + b"\x00"
    assert len(name) == 255
    assert parse_query(header() + name + b"\x00\x1c\x00\x01").qname == name
    too_long = (b"\x3f" + b"a" * 63) * 3 + b"\x3e" + b"b" * 62 + b"\x00"
    with pytest.raises(DnsFormatError, match="longer than 255"):
        parse_query(header() + too_long + b"\x00\x1c\x00\x01")


def test_backward_pointer_in_additional_section_is_read() -> None:
    # an OPT-less query with a record whose owner points at the question name
    wire = header(arcount=1) + QUESTION + b"\xc0\x0c\x00\x10\x00\x01\x00\x00\x00\x3c\x00\x02\x01x"
    assert parse_query(wire).counts == (1, 0, 0, 1)


def test_tsig_is_noticed() -> None:
    tsig = b"\x03key\x00\x00\xfa\x00\xff\x00\x00\x00\x00\x00\x00"
    assert parse_query(header(arcount=1) + QUESTION + tsig).signed


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_reader_never_fails_otherwise(wire: bytes) -> None:
    with contextlib.suppress(DnsFormatError):
        parse_query(wire)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=200))
def test_reader_on_mutated_queries(tail: bytes) -> None:
    with contextlib.suppress(DnsFormatError):
        parse_query(header() + tail)


def test_error_response_copies_opcode_and_rd() -> None:
    wire = error_response(b"", 1, 0x2900)  # opcode 5 (UPDATE), RD
    msg_id, flags, *counts = struct.unpack("!HHHHHH", wire)
    assert msg_id == 0 and flags == 0x8000 | 0x2900 | 1 and counts == [0, 0, 0, 0]


# --- the stream rules ---------------------------------------------------------------


def test_one_query_then_answer_and_fin() -> None:
    conn = DoqConnection()
    message = query()
    events = conn.receive_data(0, framed(message), True, now=0.0)
    assert events == [QueryReceived(0, message, parse_query(message))]
    conn.send_answer(0, b"answer")
    assert conn.data_to_send() == [SendData(0, b"\x00\x06answer", True)]
    with pytest.raises(LocalProtocolError):
        conn.send_answer(0, b"again")


def test_query_in_pieces_waits_for_the_fin() -> None:
    conn = DoqConnection()
    data = framed(query())
    assert conn.receive_data(4, data[:1], False, 0.0) == []
    assert conn.receive_data(4, data[1:7], False, 0.0) == []
    assert conn.receive_data(4, data[7:], False, 0.0) == []  # complete, but no FIN yet
    events = conn.receive_data(4, b"", True, 0.1)
    assert [type(e) for e in events] == [QueryReceived]


def broken(events: list[object], code: int, reason: str) -> None:
    assert len(events) == 1 and isinstance(events[0], ConnectionBroken), events
    assert events[0].error_code == code and reason in events[0].reason


@pytest.mark.parametrize(("data", "reason"), [
    (framed(query(msg_id=7)), "Message ID is not 0"),
    (framed(query()) + framed(query()), "more than one message"),
    (framed(query()) + b"\x00", "more than one message"),
    (framed(query())[:-3], "ended before the whole message"),
    (b"\x01\x00" + query(), "ended before the whole message"),  # length prefix too large
    (b"\x00", "ended before the whole message"),
    (b"", "ended before the whole message"),
    (framed(query(use_edns=0, options=[dns.edns.GenericOption(EDNS_TCP_KEEPALIVE, b"")])),
     "edns-tcp-keepalive"),
])
def test_protocol_errors_close_the_connection(data: bytes, reason: str) -> None:
    conn = DoqConnection()
    broken(conn.receive_data(0, data, True, 0.0), DOQ_PROTOCOL_ERROR, reason)
    assert conn.data_to_send() == [CloseConnection(DOQ_PROTOCOL_ERROR, conn.closed.reason)]  # type: ignore[union-attr]
    assert conn.receive_data(4, framed(query()), True, 0.0) == []  # nothing after the close


@pytest.mark.parametrize(("stream_id", "kind"), [(2, "unidirectional"), (3, "unidirectional"),
                                                 (1, "server-initiated")])
def test_streams_other_than_client_bidirectional(stream_id: int, kind: str) -> None:
    conn = DoqConnection()
    broken(conn.receive_data(stream_id, framed(query()), True, 0.0), DOQ_PROTOCOL_ERROR, kind)


def test_unreadable_message_is_handed_on_for_formerr() -> None:
    conn = DoqConnection()
    (event,) = conn.receive_data(0, framed(header(qdcount=2)), True, 0.0)
    assert isinstance(event, QueryReceived) and event.query is None
    assert event.error is not None and event.error.flags == 0x0100
    (event,) = conn.receive_data(4, b"\x00\x00", True, 0.0)  # an empty message
    assert isinstance(event, QueryReceived) and event.query is None


def test_missing_fin_is_a_protocol_error_after_the_fin_timeout() -> None:
    conn = DoqConnection(fin_timeout=2.0)
    assert conn.receive_data(0, framed(query()), False, now=10.0) == []
    assert conn.get_timer() == 12.0
    assert conn.handle_timer(11.9) == []
    broken(conn.handle_timer(12.0), DOQ_PROTOCOL_ERROR, "no FIN")
    assert conn.get_timer() is None


def test_stalled_query_is_cancelled_after_the_stream_timeout() -> None:
    conn = DoqConnection(stream_timeout=5.0)
    conn.receive_data(0, b"\x00\x40abc", False, now=1.0)
    assert conn.get_timer() == 6.0
    assert conn.handle_timer(6.0) == []
    assert conn.data_to_send() == [StopSending(0, DOQ_REQUEST_CANCELLED),
                                   ResetStream(0, DOQ_REQUEST_CANCELLED)]
    assert conn.closed is None and conn.get_timer() is None


def test_buffered_bytes_are_bounded() -> None:
    conn = DoqConnection(max_buffered=1000)
    for stream_id in (0, 4):
        assert conn.receive_data(stream_id, b"\x02\x00" + b"x" * 400, False, 0.0) == []
    broken(conn.receive_data(8, b"\x02\x00" + b"x" * 400, False, 0.0), DOQ_EXCESSIVE_LOAD,
           "more than 1000 bytes")


def test_a_query_in_one_piece_is_held_to_the_same_rules_as_one_in_pieces() -> None:
    # A whole query and its FIN in one piece skips the stream buffer: it must still
    # count against max_buffered while other queries are unfinished, and give the
    # same event as the same bytes delivered in two pieces.
    wire = framed(query())
    conn = DoqConnection(max_buffered=len(wire) + 2)
    assert conn.receive_data(0, wire[:5], False, 0.0) == []
    broken(conn.receive_data(4, wire, True, 0.0), DOQ_EXCESSIVE_LOAD, "unfinished queries")
    whole, pieces = DoqConnection(), DoqConnection()
    assert pieces.receive_data(0, wire[:5], False, 0.0) == []
    assert whole.receive_data(0, wire, True, 0.0) == pieces.receive_data(0, wire[5:], True, 0.0)
    assert whole.is_answering(0) and whole.get_timer() is None and whole.buffered == 0
    broken(DoqConnection().receive_data(0, framed(query(msg_id=7)), True, 0.0),
           DOQ_PROTOCOL_ERROR, "Message ID")


def test_answered_streams_free_their_buffer() -> None:
    conn = DoqConnection(max_buffered=600)
    for i in range(20):
        conn.receive_data(4 * i, framed(query()), True, 0.0)
        conn.send_answer(4 * i, b"x")
    assert conn.closed is None


def test_client_reset_cancels_the_query() -> None:
    conn = DoqConnection()
    conn.receive_data(0, framed(query()), True, 0.0)
    assert conn.stream_reset(0) == [QueryCancelled(0)]
    assert conn.data_to_send() == [ResetStream(0, DOQ_REQUEST_CANCELLED)]
    assert not conn.is_answering(0)
    # a reset before the query was complete: nothing to cancel, the stream is released
    conn.receive_data(4, b"\x00", False, 0.0)
    assert conn.stream_reset(4) == []
    assert conn.data_to_send() == [ResetStream(4, DOQ_REQUEST_CANCELLED)]
    assert conn.stream_reset(8) == []  # unknown stream


def test_abandon_resets_with_internal_error() -> None:
    conn = DoqConnection()
    conn.receive_data(0, framed(query()), True, 0.0)
    conn.abandon(0)
    assert conn.data_to_send() == [ResetStream(0, DOQ_INTERNAL_ERROR)]


def test_oversized_answer_is_refused_locally() -> None:
    conn = DoqConnection()
    conn.receive_data(0, framed(query()), True, 0.0)
    with pytest.raises(LocalProtocolError):
        conn.send_answer(0, b"x" * 65536)


def test_unknown_type_is_read() -> None:
    q = parse_query(query("x.trust", "TYPE65280"))
    assert q.qtype == 65280 and dns.rdatatype.to_text(q.qtype) == "TYPE65280"


def test_a_retransmitted_last_frame_after_the_answer_is_ignored() -> None:
    # QUIC reports a duplicate of a stream's data+FIN frame, retransmitted after the
    # answer went out, as an empty FIN: not a new query ended before its message
    conn = DoqConnection()
    conn.receive_data(0, framed(query()), True, 0.0)
    conn.send_answer(0, b"x")
    conn.receive_data(4, framed(query()), True, 0.0)
    conn.abandon(4)
    conn.receive_data(8, framed(query()), True, 0.0)
    conn.stream_reset(8)
    conn.data_to_send()
    for stream_id in (0, 4, 8):
        assert conn.receive_data(stream_id, b"", True, 1.0) == []
    assert conn.closed is None and conn.data_to_send() == []
    # an empty FIN on a stream never seen is still a protocol error
    broken(conn.receive_data(12, b"", True, 1.0), DOQ_PROTOCOL_ERROR, "ended before")


def test_ended_streams_are_remembered_within_a_bound() -> None:
    conn = DoqConnection()
    for i in range(ENDED_STREAMS_KEPT + 10):
        conn.receive_data(4 * i, framed(query()), True, 0.0)
        conn.send_answer(4 * i, b"x")
    latest = 4 * (ENDED_STREAMS_KEPT + 9)
    assert conn.receive_data(latest, b"", True, 1.0) == []
    # the oldest are forgotten: memory stays bounded on a long connection
    broken(conn.receive_data(0, b"", True, 1.0), DOQ_PROTOCOL_ERROR, "ended before")


# --- queries read before ------------------------------------------------------------


def test_a_query_asked_again_is_read_once_for_every_connection() -> None:
    memo = QueryMemo()
    first, second = DoqConnection(memo=memo), DoqConnection(memo=memo)
    message = query(use_edns=0, want_dnssec=True)
    (a,) = first.receive_data(0, framed(message), True, 0.0)
    (b,) = first.receive_data(4, framed(message), True, 0.0)
    (c,) = second.receive_data(0, framed(message), True, 0.0)
    assert isinstance(a, QueryReceived) and isinstance(b, QueryReceived)
    assert isinstance(c, QueryReceived)
    assert a.query == parse_query(message)
    assert b.query is a.query and c.query is a.query  # not read again
    assert len(memo) == 1 and memo.get(message) is a.query


def test_the_memo_keeps_no_rule_breaker_and_stays_bounded() -> None:
    memo = QueryMemo(limit=3)
    keepalive = query(use_edns=0, options=[dns.edns.GenericOption(EDNS_TCP_KEEPALIVE, b"")])
    for _ in range(2):  # a query that breaks a rule breaks it every time it is sent
        broken(DoqConnection(memo=memo).receive_data(0, framed(keepalive), True, 0.0),
               DOQ_PROTOCOL_ERROR, "edns-tcp-keepalive")
    unreadable = header(qdcount=2)
    (event,) = DoqConnection(memo=memo).receive_data(0, framed(unreadable), True, 0.0)
    assert isinstance(event, QueryReceived) and event.query is None
    nonzero = query(msg_id=9)
    broken(DoqConnection(memo=memo).receive_data(0, framed(nonzero), True, 0.0),
           DOQ_PROTOCOL_ERROR, "Message ID")
    assert len(memo) == 0
    big = query("a" * 63 + "." + "b" * 63, use_edns=0,
                options=[dns.edns.GenericOption(12, b"\x00" * REMEMBERED_SIZE)])
    DoqConnection(memo=memo).receive_data(0, framed(big), True, 0.0)
    assert len(memo) == 0  # too long to keep
    conn = DoqConnection(memo=memo)
    for number in range(4):
        conn.receive_data(4 * number, framed(query(f"n{number}.trust")), True, 0.0)
    assert len(memo) == 1  # emptied when full


def test_an_answer_taken_to_write_at_once_ends_its_stream() -> None:
    conn = DoqConnection()
    message = query()
    conn.receive_data(0, framed(message), True, now=0.0)
    conn.receive_data(4, framed(message), True, now=0.0)
    assert conn.take_answer(0, b"answer") == b"\x00\x06answer"
    assert conn.data_to_send() == []  # nothing queued: the transport writes it
    with pytest.raises(LocalProtocolError):
        conn.take_answer(0, b"again")
    with pytest.raises(LocalProtocolError):
        conn.take_answer(4, b"\x00" * 65536)
    assert conn.receive_data(0, b"", True, now=0.1) == []  # a late FIN of an ended stream
    assert conn.is_answering(4)
    conn.close(DOQ_EXCESSIVE_LOAD, "test")
    assert conn.take_answer(4, b"late") is None
