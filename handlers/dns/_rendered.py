"""Rendered DNS answers kept as wire bytes, and what makes them stale.

An authoritative answer is rendered once with dnspython and then served from
here with the question spliced in; a zone change drops exactly the answers it
touched (those about the changed names, and every negative answer, which
carries the SOA; answers to NSEC queries count as negative: a compact NSEC's
bitmap depends on the names below its owner). A forwarded answer is kept for
the rest of the second it was rendered in (its TTLs are still right then).

Each answer is also kept whole under the query message it answered: a DoQ
query has Message ID 0, so a client asking again sends the same bytes, and
the answer goes back as it is, without building the key or splicing.
"""

from __future__ import annotations

from typing import Any

import dns.name

WIRE_CACHE_LIMIT = 65_536
"""Rendered answers kept at most, of each kind (the cache is emptied when full)."""

MESSAGE_SIZE_KEPT = 512
"""The longest query message an answer is kept under."""

AnswerKey = tuple[Any, ...]
"""(qname, qtype, qclass, flags that shape the answer, EDNS version and DO bit)."""


class RenderedAnswers:
    """Wire answers by question: authoritative ones until their zone changes, forwarded
    ones for one second."""

    def __init__(self) -> None:
        self._zone: dict[AnswerKey, bytes] = {}
        self._positive: dict[dns.name.Name, list[AnswerKey]] = {}
        """The keys of ``_zone``'s answers with data, by question name."""
        self._negative: list[AnswerKey] = []
        """The keys of its NXDOMAIN and NODATA answers (they carry the SOA)."""
        self._forwarded: dict[AnswerKey, tuple[int, bytes]] = {}
        """Forwarded answers as sent, with the (monotonic) second they were rendered in."""
        self._zone_by_message: dict[bytes, bytes] = {}
        """Authoritative answers as sent, by the query message they answered."""
        self._messages: dict[AnswerKey, list[bytes]] = {}
        """The messages of ``_zone_by_message`` under each key of ``_zone``."""
        self._forwarded_by_message: dict[bytes, tuple[int, bytes]] = {}

    def zone_answer(self, key: AnswerKey) -> bytes | None:
        return self._zone.get(key)

    def zone_answer_to(self, message: bytes) -> bytes | None:
        """The authoritative answer sent before to exactly this query ``message``, if its
        zone has not changed since."""
        return self._zone_by_message.get(message)

    def forwarded_answer_to(self, message: bytes, second: int) -> bytes | None:
        """The forwarded answer sent during ``second`` to exactly this query ``message``."""
        found = self._forwarded_by_message.get(message)
        return found[1] if found is not None and found[0] == second else None

    def keep_zone_message(self, key: AnswerKey, message: bytes, wire: bytes) -> None:
        """Keep ``wire``, the answer under ``key``, as the answer to ``message``."""
        if len(message) > MESSAGE_SIZE_KEPT or key not in self._zone:
            return
        if len(self._zone_by_message) >= WIRE_CACHE_LIMIT:
            self._zone_by_message.clear()
            self._messages.clear()
        self._zone_by_message[message] = wire
        self._messages.setdefault(key, []).append(message)

    def keep_forwarded_message(self, message: bytes, second: int, wire: bytes) -> None:
        if len(message) > MESSAGE_SIZE_KEPT:
            return
        if len(self._forwarded_by_message) >= WIRE_CACHE_LIMIT:
            self._forwarded_by_message.clear()
        self._forwarded_by_message[message] = (second, wire)

    def forwarded_answer(self, key: AnswerKey, second: int) -> bytes | None:
        """The forwarded answer rendered during ``second``, if any."""
        found = self._forwarded.get(key)
        return found[1] if found is not None and found[0] == second else None

    def keep_zone_answer(self, key: AnswerKey, name: dns.name.Name, wire: bytes, *,
                         positive: bool) -> None:
        if len(self._zone) >= WIRE_CACHE_LIMIT:
            self.clear()
        self._zone[key] = wire
        if positive:
            self._positive.setdefault(name, []).append(key)
        else:
            self._negative.append(key)

    def keep_forwarded(self, key: AnswerKey, second: int, wire: bytes) -> None:
        if len(self._forwarded) >= WIRE_CACHE_LIMIT:
            self._forwarded.clear()
        self._forwarded[key] = (second, wire)

    def clear(self) -> None:
        """Forget every authoritative answer (a zone was rebuilt whole)."""
        self._zone.clear()
        self._positive.clear()
        self._negative.clear()
        self._zone_by_message.clear()
        self._messages.clear()

    def invalidate(self, changed: set[dns.name.Name]) -> None:
        """Forget the answers that the change of ``changed``'s RRsets (and of the SOA, in
        every negative answer) made stale."""
        for key in self._negative:
            self._drop(key)
        self._negative.clear()
        for name in changed:
            for key in self._positive.pop(name, ()):
                self._drop(key)

    def _drop(self, key: AnswerKey) -> None:
        """Forget the answer under ``key`` and every message it was kept under."""
        self._zone.pop(key, None)
        by_message = self._zone_by_message
        for message in self._messages.pop(key, ()):
            by_message.pop(message, None)
