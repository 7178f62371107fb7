"""DNS over QUIC (RFC 9250) without I/O: the stream rules and a small DNS wire reader.

The transport feeds what QUIC delivered — :meth:`DoqConnection.receive_data`,
:meth:`DoqConnection.stream_reset` and :meth:`DoqConnection.handle_timer`,
each with the current time ``now`` — and gets events back. What the
connection wants done comes out of :meth:`DoqConnection.data_to_send` as
:class:`SendData`, :class:`StopSending`, :class:`ResetStream` and
:class:`CloseConnection` instructions. There is no clock, socket or event
loop here.

The rules (RFC 9250 §4.2, §4.3.3, §5.5.2):

- one query per client-initiated bidirectional stream: a 2-octet length,
  then the DNS message, then the FIN; the server answers only after the FIN
  and ends its side with FIN after one answer;
- the Message ID of every query is 0;
- a non-zero Message ID, bytes after the message, a FIN before the whole
  message (an empty FIN on a stream already ended is a retransmission and
  is ignored), no FIN within ``fin_timeout`` after a complete message, data on a
  unidirectional or server-initiated stream, and an ``edns-tcp-keepalive``
  option are protocol errors: the connection is closed with
  DOQ_PROTOCOL_ERROR;
- more than ``max_buffered`` bytes of unfinished queries on one connection
  close it with DOQ_EXCESSIVE_LOAD.

:func:`parse_query` reads just enough of a query (header, question, OPT
record) to answer from a precomputed response; anything it cannot read is
:class:`DnsFormatError` (FORMERR).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from ._connection import ResetStream, SendData, StopSending
from ._errors import LocalProtocolError

ALPN_DOQ = "doq"
"""The ALPN token of DNS over QUIC (RFC 9250 §4.1)."""

# QUIC application error codes of DoQ (RFC 9250 §4.3).
DOQ_NO_ERROR = 0x0
DOQ_INTERNAL_ERROR = 0x1
DOQ_PROTOCOL_ERROR = 0x2
DOQ_REQUEST_CANCELLED = 0x3
DOQ_EXCESSIVE_LOAD = 0x4
DOQ_UNSPECIFIED_ERROR = 0x5

MAX_MESSAGE_SIZE = 65535
"""The largest DNS message a 2-octet length can carry."""
MAX_NAME_LENGTH = 255
"""Octets of a domain name in wire form, length octets and root label included."""
QUERIES_REMEMBERED = 4096
"""Queries a :class:`QueryMemo` keeps at most (it is emptied when full)."""
REMEMBERED_SIZE = 512
"""The longest query message a :class:`QueryMemo` keeps."""
ENDED_STREAMS_KEPT = 256
"""Ended streams a connection remembers, to ignore duplicates of their last frames
(more than the streams a client may have open at once, so all that are still in QUIC's
retransmission window)."""

EDNS_TCP_KEEPALIVE = 11
"""EDNS(0) option code of edns-tcp-keepalive (RFC 7828); forbidden in DoQ."""
EDNS_PADDING = 12
"""EDNS(0) option code of Padding (RFC 7830)."""
PADDING_BLOCK = 468
"""Responses are padded to a multiple of this many octets (RFC 8467 §4.1)."""

TYPE_OPT = 41
TYPE_TSIG = 250
OPCODE_QUERY = 0

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")


# --- the DNS wire reader ---------------------------------------------------------


class DnsFormatError(Exception):
    """The message is not a DNS query this server can read (answered with FORMERR)."""

    def __init__(self, message: str, *, flags: int | None = None) -> None:
        super().__init__(message)
        self.flags = flags
        """The query's flags word, when its header could be read."""


@dataclass(frozen=True, slots=True)
class Edns:
    """The OPT pseudo-record of a query (RFC 6891)."""

    payload: int
    """The requester's UDP payload size."""
    version: int
    """EDNS version; only 0 exists."""
    dnssec_ok: bool
    """The DO bit (RFC 3225)."""
    options: tuple[tuple[int, bytes], ...] = ()
    """``(code, data)`` of each option, in message order."""

    def has_option(self, code: int) -> bool:
        return any(c == code for c, _ in self.options)


@dataclass(frozen=True, slots=True)
class Query:
    """What :func:`parse_query` read from a query message."""

    id: int
    flags: int
    """The second header word: QR, opcode, AA, TC, RD, RA, Z, AD, CD, RCODE."""
    qname: bytes
    """The question name in lowercase, uncompressed wire form (``b"\\x03www\\x05trust\\x00"``)."""
    qtype: int
    qclass: int
    question: bytes
    """The question section exactly as the query carries it (name, type, class)."""
    compressed: bool
    """Whether the question name used a compression pointer."""
    edns: Edns | None
    """The OPT record, if the query has one."""
    counts: tuple[int, int, int, int]
    """QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT."""
    signed: bool = False
    """The query carries a TSIG record (not supported; answered by the slow path)."""

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def is_response(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def rd(self) -> bool:
        return bool(self.flags & 0x0100)

    @property
    def cd(self) -> bool:
        return bool(self.flags & 0x0010)

    @property
    def dnssec_ok(self) -> bool:
        return self.edns is not None and self.edns.dnssec_ok


def read_name(wire: bytes, offset: int) -> tuple[bytes, int, bool]:
    """The domain name at ``offset``: ``(lowercase uncompressed wire, end offset, compressed)``.

    Compression pointers must point backwards (before the pointer itself),
    which rules out loops; the whole name is at most 255 octets.

    :raises DnsFormatError: a truncated name, a bad label type, a forward or
        looping pointer, or a name longer than 255 octets.
    """
    labels = bytearray()
    end = -1
    compressed = False
    position = offset
    limit = position  # a pointer must point before this name and before every earlier target
    while True:
        if position >= len(wire):
            raise DnsFormatError("a name runs past the end of the message")
        length = wire[position]
        if length == 0:
            labels.append(0)
            if end < 0:
                end = position + 1
            break
        kind = length & 0xC0
        if kind == 0xC0:
            if position + 1 >= len(wire):
                raise DnsFormatError("a compression pointer runs past the end of the message")
            target = ((length & 0x3F) << 8) | wire[position + 1]
            if end < 0:
                end = position + 2
            if target >= limit:
                raise DnsFormatError("a compression pointer does not point backwards")
            compressed = True
            limit = target
            position = target
            continue
        if kind != 0:
            raise DnsFormatError(f"label type {kind >> 6:#x} is not supported")
        if position + 1 + length > len(wire):
            raise DnsFormatError("a label runs past the end of the message")
        labels += wire[position:position + 1 + length]
        if len(labels) + 1 > MAX_NAME_LENGTH:
            raise DnsFormatError("a name is longer than 255 octets")
        position += 1 + length
    return bytes(labels).lower(), end, compressed


def parse_query(wire: bytes) -> Query:
    """Read the header, the question and the OPT record of a DNS query.

    Every record of every section is walked, so trailing bytes, a truncated
    record or a second OPT record are found.

    :raises DnsFormatError: the message cannot be read, is a response, or has a
        QDCOUNT other than 1 (``flags`` is set whenever the header was read).
    """
    if len(wire) < _HEADER.size:
        raise DnsFormatError("the message is shorter than a DNS header")
    msg_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if flags & 0x8000:
        raise DnsFormatError("the message is a response, not a query", flags=flags)
    if qdcount != 1:
        raise DnsFormatError(f"QDCOUNT is {qdcount}; a query asks exactly one question",
                             flags=flags)
    try:
        qname, offset, compressed = read_name(wire, _HEADER.size)
        if offset + 4 > len(wire):
            raise DnsFormatError("the question is truncated")
        qtype, qclass = struct.unpack_from("!HH", wire, offset)
        question_end = offset + 4
        offset = question_end
        edns: Edns | None = None
        signed = False
        for section, count in ((1, ancount), (2, nscount), (3, arcount)):
            for _ in range(count):
                owner, offset, _c = read_name(wire, offset)
                if offset + _RR_FIXED.size > len(wire):
                    raise DnsFormatError("a resource record is truncated")
                rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, offset)
                offset += _RR_FIXED.size
                if offset + rdlength > len(wire):
                    raise DnsFormatError("a record's data runs past the end of the message")
                rdata = wire[offset:offset + rdlength]
                offset += rdlength
                if rtype == TYPE_OPT:
                    if section != 3 or edns is not None or owner != b"\x00":
                        raise DnsFormatError("an OPT record must be unique, at the root, "
                                             "in the additional section")
                    edns = Edns(payload=rclass, version=(ttl >> 16) & 0xFF,
                                dnssec_ok=bool(ttl & 0x8000), options=_options(rdata))
                elif rtype == TYPE_TSIG:
                    signed = True
        if offset != len(wire):
            raise DnsFormatError(f"{len(wire) - offset} bytes follow the last record")
    except DnsFormatError as exc:
        raise DnsFormatError(str(exc), flags=flags) from None
    return Query(id=msg_id, flags=flags, qname=qname, qtype=qtype, qclass=qclass,
                 question=wire[_HEADER.size:question_end], compressed=compressed, edns=edns,
                 counts=(qdcount, ancount, nscount, arcount), signed=signed)


def _options(rdata: bytes) -> tuple[tuple[int, bytes], ...]:
    options = []
    offset = 0
    while offset < len(rdata):
        if offset + 4 > len(rdata):
            raise DnsFormatError("an EDNS option header is truncated")
        code, length = struct.unpack_from("!HH", rdata, offset)
        offset += 4
        if offset + length > len(rdata):
            raise DnsFormatError("an EDNS option runs past its record")
        options.append((code, rdata[offset:offset + length]))
        offset += length
    return tuple(options)


def error_response(wire: bytes, rcode: int, flags: int | None = None) -> bytes:
    """A header-only response with ``rcode`` and Message ID 0 (FORMERR, NOTIMP, REFUSED...).

    The opcode and RD bit are copied from ``flags`` (the query's) when known;
    there is no question section (RFC 1035 allows FORMERR without one).
    """
    copied = (flags & 0x7900) if flags is not None else 0  # opcode and RD
    return _HEADER.pack(0, 0x8000 | copied | (rcode & 0xF), 0, 0, 0, 0)


def name_to_text(name: bytes) -> str:
    """``b"\\x03www\\x05trust\\x00"`` as ``"www.trust."`` (for logs and messages)."""
    parts = []
    offset = 0
    while offset < len(name) and name[offset]:
        length = name[offset]
        parts.append(name[offset + 1:offset + 1 + length].decode("ascii", "backslashreplace"))
        offset += 1 + length
    return ".".join(parts) + "."


class QueryMemo:
    """Queries read before, by their message bytes.

    A client asks the same few questions over and over, and a DoQ query always
    carries Message ID 0, so the same question arrives as the same bytes: the
    reader's work (about a tenth of a cached answer's server CPU) is done once.
    Only queries a connection accepts are kept (no edns-tcp-keepalive); a
    :class:`Query` is immutable, so one object serves every connection.
    """

    def __init__(self, limit: int = QUERIES_REMEMBERED) -> None:
        self.limit = limit
        self._queries: dict[bytes, Query] = {}

    def get(self, message: bytes) -> Query | None:
        return self._queries.get(message)

    def keep(self, message: bytes, query: Query) -> None:
        if len(message) > REMEMBERED_SIZE:
            return
        if len(self._queries) >= self.limit:
            self._queries.clear()
        self._queries[message] = query

    def __len__(self) -> int:
        return len(self._queries)


# --- the stream state machine ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryReceived:
    """A whole query and its FIN arrived on ``stream_id``; answer it with
    :meth:`DoqConnection.send_answer`."""

    stream_id: int
    message: bytes
    """The DNS message, without its length prefix."""
    query: Query | None
    """What :func:`parse_query` read, or None if it could not (see ``error``)."""
    error: DnsFormatError | None = None
    """Why the message could not be read: answer FORMERR."""


@dataclass(frozen=True, slots=True)
class QueryCancelled:
    """The client reset or stopped a stream whose query was being answered."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionBroken:
    """The peer broke a rule of RFC 9250: the connection is being closed."""

    error_code: int
    reason: str


DoqEvent = QueryReceived | QueryCancelled | ConnectionBroken


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the whole connection with an application error code (CONNECTION_CLOSE 0x1d)."""

    error_code: int
    reason: str


DoqInstruction = SendData | StopSending | ResetStream | CloseConnection


@dataclass(slots=True)
class _Stream:
    started: float
    buffer: bytearray = field(default_factory=bytearray)
    complete_at: float | None = None
    """When the whole message had arrived (still waiting for the FIN)."""
    answering: bool = False


_ANSWERING = _Stream(started=0.0, answering=True)
"""The state of every stream whose query arrived whole with its FIN in one piece: it
waits for its answer only, holds nothing and is never changed (one object for all)."""


class DoqConnection:
    """The server side of RFC 9250 on one QUIC connection.

    :param fin_timeout: seconds a complete query may wait for its FIN before
        the missing FIN is a protocol error.
    :param stream_timeout: seconds an unfinished query may take to arrive;
        after that the stream is abandoned (STOP_SENDING and RESET_STREAM with
        DOQ_REQUEST_CANCELLED).
    :param max_buffered: bytes of unfinished queries this connection may have
        buffered at once; more closes it with DOQ_EXCESSIVE_LOAD.
    :param memo: queries read before (shared by a server's connections); None: every
        query is read anew.
    """

    def __init__(self, *, fin_timeout: float = 5.0, stream_timeout: float = 10.0,
                 max_buffered: int = 256 * 1024, memo: QueryMemo | None = None) -> None:
        self.fin_timeout = fin_timeout
        self.stream_timeout = stream_timeout
        self.max_buffered = max_buffered
        self._streams: dict[int, _Stream] = {}
        self._ended: OrderedDict[int, None] = OrderedDict()
        """The latest streams this side ended (answered, abandoned, reset), oldest first:
        QUIC reports a duplicate of a query's last frame, retransmitted after the answer,
        as an empty FIN on its stream, which must not read as a new, empty query."""
        self._buffered = 0
        self._out: list[DoqInstruction] = []
        self.closed: ConnectionBroken | None = None
        """Set once the connection broke a rule; everything after is ignored."""
        self.queries = 0
        self._memo = memo

    # --- input --------------------------------------------------------------------

    def receive_data(self, stream_id: int, data: bytes, end_stream: bool,
                     now: float) -> list[DoqEvent]:
        """Bytes (and maybe the FIN) that QUIC delivered on ``stream_id``."""
        if self.closed is not None:
            return []
        if stream_id & 0x3:
            kind = ("unidirectional" if stream_id & 0x2 else "server-initiated")
            return self._break(DOQ_PROTOCOL_ERROR, f"data on a {kind} stream ({stream_id})")
        stream = self._streams.get(stream_id)
        if stream is None:
            if (not data and not end_stream) or stream_id in self._ended:
                return []
            size = len(data)
            if end_stream and size >= 2 and size == 2 + ((data[0] << 8) | data[1]) \
                    and self._buffered + size <= self.max_buffered:
                # The common case: a whole query and its FIN in one piece, answered
                # before anything else is buffered.
                self._streams[stream_id] = _ANSWERING
                return self._received(stream_id, data[2:])
            stream = self._streams[stream_id] = _Stream(started=now)
        elif stream.answering:
            return []  # QUIC delivers nothing after a FIN; a reordered empty frame
        if data:
            stream.buffer += data
            self._buffered += len(data)
            if self._buffered > self.max_buffered:
                return self._break(DOQ_EXCESSIVE_LOAD,
                                   f"more than {self.max_buffered} bytes of unfinished queries")
        buffer = stream.buffer
        if len(buffer) >= 2:
            size = 2 + ((buffer[0] << 8) | buffer[1])
            if len(buffer) > size:
                return self._break(DOQ_PROTOCOL_ERROR,
                                   f"stream {stream_id} carries more than one message")
            if len(buffer) == size and stream.complete_at is None:
                stream.complete_at = now
        if not end_stream:
            return []
        if stream.complete_at is None:
            return self._break(DOQ_PROTOCOL_ERROR,
                               f"stream {stream_id} ended before the whole message")
        message = bytes(buffer[2:])
        self._buffered -= len(buffer)
        stream.buffer = bytearray()
        stream.answering = True
        return self._received(stream_id, message)

    def _received(self, stream_id: int, message: bytes) -> list[DoqEvent]:
        """The whole query ``message`` and its FIN arrived on ``stream_id``."""
        if len(message) >= 2 and (message[0] or message[1]):
            return self._break(DOQ_PROTOCOL_ERROR, "a query's Message ID is not 0")
        self.queries += 1
        memo = self._memo
        query = memo.get(message) if memo is not None else None
        if query is None:
            try:
                query = parse_query(message)
            except DnsFormatError as exc:
                return [QueryReceived(stream_id, message, None, exc)]
            if query.edns is not None and query.edns.has_option(EDNS_TCP_KEEPALIVE):
                return self._break(DOQ_PROTOCOL_ERROR, "a query carries edns-tcp-keepalive")
            if memo is not None:
                memo.keep(message, query)
        return [QueryReceived(stream_id, message, query)]

    def stream_reset(self, stream_id: int) -> list[DoqEvent]:
        """The client sent RESET_STREAM or STOP_SENDING on ``stream_id``."""
        stream = self._streams.pop(stream_id, None)
        if stream is None or self.closed is not None:
            return []
        self._end(stream_id)
        self._buffered -= len(stream.buffer)
        self._out.append(ResetStream(stream_id, DOQ_REQUEST_CANCELLED))
        return [QueryCancelled(stream_id)] if stream.answering else []

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        if self.closed is not None or not self._streams:
            return None
        deadlines = [s.complete_at + self.fin_timeout if s.complete_at is not None
                     else s.started + self.stream_timeout
                     for s in self._streams.values() if not s.answering]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[DoqEvent]:
        """Enforce the FIN and stream timeouts."""
        if self.closed is not None:
            return []
        for stream_id, stream in list(self._streams.items()):
            if stream.answering:
                continue
            if stream.complete_at is not None:
                if now >= stream.complete_at + self.fin_timeout:
                    return self._break(DOQ_PROTOCOL_ERROR,
                                       f"no FIN on stream {stream_id} after its query")
            elif now >= stream.started + self.stream_timeout:
                del self._streams[stream_id]
                self._end(stream_id)
                self._buffered -= len(stream.buffer)
                self._out.append(StopSending(stream_id, DOQ_REQUEST_CANCELLED))
                self._out.append(ResetStream(stream_id, DOQ_REQUEST_CANCELLED))
        return []

    # --- output -------------------------------------------------------------------

    def send_answer(self, stream_id: int, message: bytes) -> None:
        """Queue the answer to the query of ``stream_id``, then FIN.

        :raises LocalProtocolError: the stream has no query waiting for an
            answer, or the message is longer than 65,535 octets.
        """
        framed = self.take_answer(stream_id, message)
        if framed is not None:
            self._out.append(SendData(stream_id, framed, True))

    def take_answer(self, stream_id: int, message: bytes) -> bytes | None:
        """The answer to the query of ``stream_id`` as its stream carries it (the length
        prefix, then ``message``), for the transport to write with FIN now: what
        :meth:`send_answer` queues as :class:`SendData`, without the instruction.
        None: the connection is closed.

        :raises LocalProtocolError: as :meth:`send_answer`.
        """
        if self.closed is not None:
            return None
        stream = self._streams.get(stream_id)
        if stream is None or not stream.answering:
            raise LocalProtocolError(f"stream {stream_id} has no query to answer")
        size = len(message)
        if size > MAX_MESSAGE_SIZE:
            raise LocalProtocolError(f"an answer of {size} octets does not fit DoQ")
        del self._streams[stream_id]
        self._end(stream_id)
        return size.to_bytes(2, "big") + message

    def abandon(self, stream_id: int, error_code: int = DOQ_INTERNAL_ERROR) -> None:
        """Give up on a query without an answer (RESET_STREAM with ``error_code``)."""
        if self._streams.pop(stream_id, None) is not None and self.closed is None:
            self._end(stream_id)
            self._out.append(ResetStream(stream_id, error_code))

    def close(self, error_code: int, reason: str) -> list[DoqEvent]:
        """Close the connection ourselves (for example DOQ_EXCESSIVE_LOAD)."""
        if self.closed is not None:
            return []
        return self._break(error_code, reason)

    @property
    def buffered(self) -> int:
        """Bytes of unfinished queries held now."""
        return self._buffered

    def release(self) -> None:
        """The connection is gone: drop every stream's state and buffer at once."""
        self._streams.clear()
        self._buffered = 0
        self._out.clear()

    def is_answering(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and stream.answering

    def data_to_send(self) -> list[DoqInstruction]:
        """Instructions for the transport, in order; the list is handed over."""
        out, self._out = self._out, []
        return out

    def _end(self, stream_id: int) -> None:
        ended = self._ended
        ended[stream_id] = None
        if len(ended) > ENDED_STREAMS_KEPT:
            ended.popitem(last=False)  # O(1); a plain dict's first key is not

    def _break(self, error_code: int, reason: str) -> list[DoqEvent]:
        event = ConnectionBroken(error_code, reason)
        self.closed = event
        self._streams.clear()
        self._buffered = 0
        self._out = [CloseConnection(error_code, reason)]
        return [event]


__all__ = [
    "ALPN_DOQ",
    "DOQ_EXCESSIVE_LOAD",
    "DOQ_INTERNAL_ERROR",
    "DOQ_NO_ERROR",
    "DOQ_PROTOCOL_ERROR",
    "DOQ_REQUEST_CANCELLED",
    "DOQ_UNSPECIFIED_ERROR",
    "EDNS_PADDING",
    "EDNS_TCP_KEEPALIVE",
    "ENDED_STREAMS_KEPT",
    "MAX_MESSAGE_SIZE",
    "MAX_NAME_LENGTH",
    "PADDING_BLOCK",
    "QUERIES_REMEMBERED",
    "REMEMBERED_SIZE",
    "CloseConnection",
    "ConnectionBroken",
    "DnsFormatError",
    "DoqConnection",
    "DoqEvent",
    "DoqInstruction",
    "Edns",
    "Query",
    "QueryCancelled",
    "QueryMemo",
    "QueryReceived",
    "ResetStream",
    "SendData",
    "StopSending",
    "error_response",
    "name_to_text",
    "parse_query",
    "read_name",
]
