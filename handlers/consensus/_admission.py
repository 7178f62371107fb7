"""Four-proof admission: the :class:`handlers.ca.Admission` every CA operation passes."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from protocol import Internal, ProofInvalid
from protocol.ops.consensus import MAX_KEY_SIZE, Operation

from ..ca import Admitted, Decision
from ._proofs import ProofVerifier

Audit = Callable[[str, dict[str, Any]], Awaitable[Any]]


class FourProofAdmission:
    """Admits a client's decision only with a valid four-proof set bound to its request.

    The node's own requests (``Decision.internal``: its TLS certificate, which
    the rotator asks for in-process, for the names in the node's configuration)
    carry no client proofs: they cannot arrive over STOQ, where ``ca.issue``
    always names the peer as the requester, and they are admitted as
    ``"node"``. Every refusal is recorded in the audit log
    (``consensus.proofs-rejected``) with the proof that failed.

    :param audit: ``async (kind, data)``, returns once the record is durable.
    """

    name = "four-proof"

    def __init__(self, *, verifier: ProofVerifier, audit: Audit) -> None:
        self.verifier = verifier
        self._audit = audit
        self.internal = 0
        """Decisions admitted as the node's own."""

    async def admit(self, decision: Decision, proofs: dict[str, Any] | None) -> Admitted:
        """Admit ``decision`` or raise ``ProofInvalid`` naming the failed proof."""
        digest = decision.digest()
        if decision.internal:
            self.internal += 1
            return Admitted(decision_digest=digest, admission="node")
        if decision.kind not in ("issue", "revoke") or len(decision.request) != 32:
            raise Internal(f"admission: a {decision.kind!r} decision without a request digest")
        op: Operation = "issue" if decision.kind == "issue" else "revoke"
        try:
            await self.verifier.verify(op, decision.request, proofs)
        except ProofInvalid as exc:
            record: dict[str, Any] = {"op": op, "proof": exc.details.get("proof", ""),
                                      "reason": exc.message, "decision": digest.hex()}
            key = proofs.get("requester_key") if isinstance(proofs, dict) else None
            if isinstance(key, bytes) and len(key) <= MAX_KEY_SIZE:
                record["requester"] = hashlib.sha256(key).hexdigest()
            await self._audit("consensus.proofs-rejected", record)
            raise
        return Admitted(decision_digest=digest, admission=self.name)
