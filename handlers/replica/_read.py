"""Sealed decisions read once per validator.

A validator reads every decision twice: when it checks it before the vote
(:meth:`CaRules.check`, which also verifies the seal) and when the committed
block is executed. The second reading is a lookup of the first: decoding the
CBOR and building the typed decision is the same work on the same bytes, and
the typed decisions are frozen values.
"""

from __future__ import annotations

from collections import OrderedDict

from protocol.decisions import Decision, DecisionError, parse

from ..consensus._sealed import unseal

MAX_REMEMBERED = 4096
"""About twenty full blocks: between a decision's check and its execution."""

_read: OrderedDict[bytes, tuple[str, Decision]] = OrderedDict()
"""Oldest first; an ``OrderedDict`` drops its oldest in constant time (a plain dict
skips the slots of every key dropped before)."""


def remember(raw: bytes, entry: str, decision: Decision) -> None:
    """Keep what checking ``raw`` read, for its execution."""
    if len(_read) >= MAX_REMEMBERED:
        _read.popitem(last=False)  # the oldest: insertion order
    _read[raw] = (entry, decision)


def read_sealed(raw: bytes) -> tuple[str, Decision]:
    """``(entry, decision)`` of a committed sealed decision; its seal is not checked here.

    :raises SealError: not a sealed decision.
    :raises MalformedDecision: a malformed body (sealed by its ``entry``).
    """
    found = _read.pop(raw, None)
    if found is not None:
        return found
    sealed = unseal(raw)
    try:
        return sealed.entry, parse(sealed.body)
    except DecisionError as exc:
        raise MalformedDecision(sealed.entry, str(exc)) from None


class MalformedDecision(DecisionError):
    """A well-sealed decision whose body is malformed: its sealer answers for it."""

    def __init__(self, entry: str, message: str) -> None:
        super().__init__(message)
        self.entry = entry
