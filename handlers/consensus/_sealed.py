"""Sealed decisions: an application record signed by the validator that made it.

A decision travels as deterministic CBOR ``{"body": bstr, "entry":
validator-id, "signature": Ed25519 over body}``. Consensus treats the body
as opaque; the seal says which validator answers for it, so a decision can
be refused (or its maker held to account) by whoever checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol import decode_item, encode_deterministic

from .bft import ValidatorSet


class SealError(ValueError):
    """Not a sealed decision, or not sealed by an active validator."""


@dataclass(frozen=True)
class SealedDecision:
    body: dict[str, Any]
    entry: str
    raw_body: bytes

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))


def seal(body: dict[str, Any], entry: str, sign: Callable[[bytes], bytes]) -> bytes:
    """``body`` sealed by the entry validator ``entry``."""
    raw = encode_deterministic(body)
    return encode_deterministic({"body": raw, "entry": entry, "signature": sign(raw)})


def unseal(decision: bytes) -> SealedDecision:
    """The body and entry of a decision, without checking the seal (for decisions a
    quorum already committed, whose seals were checked before the vote).

    :raises SealError: not a sealed decision.
    """
    try:
        item = decode_item(decision)
        raw, entry = item["body"], item["entry"]
        body = decode_item(raw)
    except Exception:
        raise SealError("not a sealed decision") from None
    if not (isinstance(raw, bytes) and isinstance(entry, str) and isinstance(body, dict)):
        raise SealError("not a sealed decision")
    return SealedDecision(body=body, entry=entry, raw_body=raw)


def open_sealed(decision: bytes, validators: ValidatorSet) -> SealedDecision:
    """The decision's body if an active validator sealed it; :class:`SealError` if not."""
    try:
        item = decode_item(decision)
        signature = item["signature"]
    except Exception:
        raise SealError("not a sealed decision") from None
    sealed = unseal(decision)
    if not isinstance(signature, bytes):
        raise SealError("not a sealed decision")
    validator = validators.by_id.get(sealed.entry)
    if validator is None or validator.power == 0:
        raise SealError(f"{sealed.entry!r} is not an active validator")
    if not validator.verify(signature, sealed.raw_body):
        raise SealError("the entry validator's signature does not verify")
    return sealed
