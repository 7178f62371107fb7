"""The owner names the zones make, cheap to make and to use as dictionary keys.

Every validator makes the owner names of every certificate it publishes, and
the zones look them up in several dictionaries per issuance. dnspython parses
text one character at a time and hashes a :class:`dns.name.Name` again each
time it is used as a key (a loop over its octets, case-folded); the names here
are made from their labels when the text needs no parsing (no escapes, no
IDNA) and hash once. They equal, hash and render as the names dnspython makes
of the same text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import dns.immutable
import dns.name

_PLAIN = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*")
"""Text whose labels are its characters between the dots: no escape, no IDNA, no empty
label (what certificate names are)."""


@dns.immutable.immutable
class OwnerName(dns.name.Name):
    """A :class:`dns.name.Name` that computes its (case-insensitive) hash and its
    lower-cased labels (:func:`folded`) once."""

    __slots__ = ("_hash", "folded")

    def __init__(self, labels: Iterable[bytes | str]) -> None:
        super().__init__(labels)
        self._hash = super().__hash__()
        self.folded = tuple(label.lower() for label in self.labels)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[OwnerName], tuple[tuple[bytes, ...]]]:
        return OwnerName, (self.labels,)  # (dnspython's state would leave out the hash)


def absolute(name: str) -> OwnerName:
    """``name`` (a final dot implied) as an absolute name, the same as
    ``dns.name.from_text``'s.

    :raises dns.exception.DNSException: ``name`` is not a domain name.
    """
    if _PLAIN.fullmatch(name):
        return OwnerName((*(label.encode() for label in name.split(".")), b""))
    return OwnerName(dns.name.from_text(name.rstrip(".") + ".").labels)


def prefixed(labels: tuple[bytes, ...], name: dns.name.Name) -> OwnerName:
    """``name`` with ``labels`` in front (``_443._quic.NAME``, ``ns1.ORIGIN``)."""
    return OwnerName((*labels, *name.labels))


def folded(name: dns.name.Name) -> tuple[bytes, ...]:
    """The labels of ``name``, lower-cased: what its hash and comparisons are made of."""
    if isinstance(name, OwnerName):
        return name.folded
    return tuple(label.lower() for label in name.labels)


def within(labels: tuple[bytes, ...], origin: tuple[bytes, ...]) -> bool:
    """Whether the name of lower-cased ``labels`` is ``origin``'s (lower-cased labels) or
    below it: ``Name.is_subdomain`` for absolute names."""
    return len(labels) >= len(origin) and labels[len(labels) - len(origin):] == origin


def spelled(name: dns.name.Name, text: str) -> str:
    """``name`` (made from ``text``) as ``name.to_text(omit_final_dot=True)`` writes it:
    ``text`` itself when it needed no parsing."""
    return text if _PLAIN.fullmatch(text) else name.to_text(omit_final_dot=True)
