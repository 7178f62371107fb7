"""Editing audit log records the way a careful forger would, for the tamper tests."""

from __future__ import annotations

import hashlib
from typing import Any

from protocol import encode_deterministic


def rehash(obj: dict[str, Any]) -> None:
    """Recompute an edited record's own hash (its JSON form), so that only the chain or a
    checkpoint's signature can give the edit away."""
    def decode(v: Any) -> Any:
        if isinstance(v, dict):
            if set(v) == {"hex"}:
                return bytes.fromhex(v["hex"])
            return {k: decode(x) for k, x in v.items()}
        return [decode(x) for x in v] if isinstance(v, list) else v
    obj["hash"] = hashlib.sha256(encode_deterministic({
        "seq": obj["seq"], "time": obj["time"], "kind": obj["kind"], "data": decode(obj["data"]),
        "prev": bytes.fromhex(obj["prev"])})).hexdigest()
