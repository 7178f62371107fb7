"""The admission step every CA operation passes before it takes effect.

The four-proof check (space, stake, work, time) and the validator quorum are
separate pieces of work; until they land, :class:`LocalAdmission` is the
single named place where they plug in. It admits a decision that passed
policy and says, in the audit log and the reply, that it was admitted
locally without proofs or quorum (``admission = "local"``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol import encode_deterministic


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What the CA is about to do, in a form that can be hashed and agreed on."""

    kind: str
    """``"issue"`` or ``"revoke"``."""
    subject: dict[str, Any]
    """The decision's content: names and key hash for issuance, serial for revocation."""
    request: bytes = b""
    """SHA-256 of the exact request: the CSR's DER (issue), the revocation statement
    (revoke). Admission proofs are bound to it (``protocol.ops.consensus``)."""
    internal: bool = False
    """The node's own request (its TLS certificate, issued in-process by the
    rotator), not a client's: it carries no client proofs."""
    material: dict[str, Any] = field(default_factory=dict)
    """What validators need to check the decision themselves: the CSR's DER
    (``"csr"``) for an issuance."""

    def digest(self) -> bytes:
        return hashlib.sha256(encode_deterministic({"kind": self.kind,
                                                    "subject": self.subject})).digest()


@dataclass(frozen=True, kw_only=True)
class Admitted:
    decision_digest: bytes
    admission: str
    """How it was admitted: ``"local"``, ``"four-proof"``, ``"node"`` (the node's own
    certificate); later ``"consensus"``."""
    block_hash: bytes | None = None
    """With consensus: the block that committed the decision, its height, and the
    precommit signatures (``validator``, ``signature``) of its commit."""
    block_height: int | None = None
    signatures: list[dict[str, Any]] | None = None
    serial: int | None = None
    """With consensus: the serial number the committed block fixes."""
    decided_at: int | None = None
    """With consensus: the block's time (Unix seconds); the certificate's validity
    starts from it."""


class Admission(Protocol):
    async def admit(self, decision: Decision, proofs: dict[str, Any] | None) -> Admitted:
        """Admit ``decision`` or raise ``ProofInvalid`` / ``ConsensusRejected``."""


class LocalAdmission:
    """Admits every decision that passed policy; no proofs, no quorum (yet)."""

    name = "local"

    async def admit(self, decision: Decision, proofs: dict[str, Any] | None) -> Admitted:
        return Admitted(decision_digest=decision.digest(), admission=self.name)
