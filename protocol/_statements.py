"""Statements a key holder signs to authorise a CA operation (spec/stoq.md, "ca.*").

They are deterministic CBOR (RFC 8949 §4.2.1) so every implementation signs
and checks the same bytes.
"""

from __future__ import annotations

import hashlib

from ._cbor import encode_deterministic


def revocation_statement(serial: str, reason: str, at: int) -> bytes:
    """What a holder or an administrator signs to revoke ``serial`` at time ``at``."""
    return encode_deterministic({"ctx": "trustchain-revoke-v1", "serial": serial,
                                 "reason": reason, "time": at})


def renewal_statement(serial: str, csr: bytes) -> bytes:
    """What the key of certificate ``serial`` signs to hand its names to ``csr``'s key."""
    return encode_deterministic({"ctx": "trustchain-renew-v1", "serial": serial,
                                 "csr_sha256": hashlib.sha256(csr).digest()})
