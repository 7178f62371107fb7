"""The owner names the zones make, cheap to make and to use as dictionary keys.

Every validator makes the owner names of every certificate it publishes, and
the zones look them up in several dictionaries per issuance. dnspython parses
text one character at a time, checks the labels of a :class:`dns.name.Name`
again as it makes one (in an immutable-object context, about 5 µs a name), and
hashes it again each time it is used as a key (a loop over its octets,
case-folded); the names here are made from their labels when the text needs no
parsing (no escapes, no IDNA), without the checks when the labels are known to
pass them, and hash once. They equal, hash and render as the names dnspython
makes of the same text.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

import dns.immutable
import dns.name

_PLAIN = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*")
"""Text whose labels are its characters between the dots: no escape, no IDNA, no empty
label (what certificate names are)."""


@dns.immutable.immutable
class OwnerName(dns.name.Name):
    """A :class:`dns.name.Name` that computes its (case-insensitive) hash, its
    lower-cased labels (:func:`folded`) and those of the names above it (:func:`above`)
    once."""

    __slots__ = ("_hash", "above", "folded")

    def __init__(self, labels: Iterable[bytes | str]) -> None:
        super().__init__(labels)
        self.folded = tuple([label.lower() for label in self.labels])
        self.above = _above(self.folded)
        self._hash = _hash_of(self.folded)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        """``Name.__eq__`` (the same labels but for case), on the folded labels: dnspython's
        compares label by label in Python. Python asks this first also when a
        ``dns.name.Name`` is compared with an ``OwnerName`` (a subclass)."""
        if isinstance(other, OwnerName):
            return self.folded == other.folded
        if isinstance(other, dns.name.Name):
            return self.folded == tuple([label.lower() for label in other.labels])
        return False

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __reduce__(self) -> tuple[type[OwnerName], tuple[tuple[bytes, ...]]]:
        return OwnerName, (self.labels,)  # (dnspython's state would leave out the hash)


_BASE_9 = [bytes(48 + octet // 9 ** place % 9 for octet in range(256)) for place in (2, 1, 0)]
"""Octet -> the ASCII digit of its 81s, 9s and 1s in base 9 (``bytes.translate`` tables)."""


def _hash_of(folded: tuple[bytes, ...]) -> int:
    """``hash()`` of the name whose lower-cased labels are ``folded``.

    What ``dns.name.Name.__hash__`` returns, h = 9 h + octet over every octet, is the
    number whose base-9 "digits" are the octets; each octet is three base-9 digits
    (81s, 9s, 1s), so h is the sum of three base-9 numerals that ``int(text, 9)`` reads
    in C (dnspython's loop is Python, on ever longer integers). As for any
    ``__hash__``, Python takes the result as is when it fits a ``Py_ssize_t`` and hashes
    it as an integer when not.
    """
    octets = b"".join(folded)
    if not octets:
        return 0  # the root
    digest = (int(octets.translate(_BASE_9[0]) + b"00", 9)
              + int(octets.translate(_BASE_9[1]) + b"0", 9)
              + int(octets.translate(_BASE_9[2]), 9))
    return digest if digest <= sys.maxsize else hash(digest)


_set = object.__setattr__  # (an immutable name's attributes are set once, as it is made)


def _checked(labels: tuple[bytes, ...], lowered: tuple[bytes, ...],
             above: tuple[tuple[bytes, ...], ...]) -> OwnerName:
    """The name of ``labels`` (lower-cased: ``lowered``; the names above it: ``above``),
    which are known to be what ``Name.__init__`` checks (bytes, 1 to 63 octets each but
    the last, empty; 255 octets in all at most), made without checking them again."""
    name = object.__new__(OwnerName)
    _set(name, "labels", labels)
    _set(name, "folded", lowered)
    _set(name, "above", above)
    _set(name, "_hash", _hash_of(lowered))
    return name


def _above(folded: tuple[bytes, ...]) -> tuple[tuple[bytes, ...], ...]:
    return tuple([folded[start:] for start in range(1, len(folded))])


def absolute(name: str) -> OwnerName:
    """``name`` (a final dot implied) as an absolute name, the same as
    ``dns.name.from_text``'s.

    :raises dns.exception.DNSException: ``name`` is not a domain name.
    """
    if len(name) <= 253 and _PLAIN.fullmatch(name):  # (its wire form: 2 octets more)
        encoded = name.encode()
        lowered = (*encoded.lower().split(b"."), b"")
        return _checked((*encoded.split(b"."), b""), lowered, _above(lowered))
    return OwnerName(dns.name.from_text(name.rstrip(".") + ".").labels)


def prefixed(labels: tuple[bytes, ...], name: dns.name.Name) -> OwnerName:
    """``name`` with ``labels`` in front (``_443._quic.NAME``, ``ns1.ORIGIN``).

    :raises dns.name.NameTooLong: the name would be longer than 255 octets.
    """
    joined = (*labels, *name.labels)
    if labels and name.labels and not name.labels[-1] and min(map(len, labels)) > 0 and \
            max(map(len, labels)) < 64 and sum(map(len, joined)) + len(joined) <= 255:
        base = folded(name)
        lowered = (*[label.lower() for label in labels], *base)
        return _checked(joined, lowered, (*[lowered[start:] for start in range(1, len(labels))],
                                          base, *above(name)))
    return OwnerName(joined)


def folded(name: dns.name.Name) -> tuple[bytes, ...]:
    """The labels of ``name``, lower-cased: what its hash and comparisons are made of."""
    if isinstance(name, OwnerName):
        return name.folded
    return tuple(label.lower() for label in name.labels)


def above(name: dns.name.Name) -> tuple[tuple[bytes, ...], ...]:
    """The lower-cased labels of every name above ``name``, its parent first and the
    root last (what a zone counts the names below of)."""
    if isinstance(name, OwnerName):
        return name.above
    return _above(folded(name))


def within(labels: tuple[bytes, ...], origin: tuple[bytes, ...]) -> bool:
    """Whether the name of lower-cased ``labels`` is ``origin``'s (lower-cased labels) or
    below it: ``Name.is_subdomain`` for absolute names."""
    return len(labels) >= len(origin) and labels[len(labels) - len(origin):] == origin


def spelled(name: dns.name.Name, text: str) -> str:
    """``name`` (made from ``text``) as ``name.to_text(omit_final_dot=True)`` writes it:
    ``text`` itself when it needed no parsing."""
    return text if _PLAIN.fullmatch(text) else name.to_text(omit_final_dot=True)
